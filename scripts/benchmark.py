"""Speed, memory and FLOPs of ViCo, Textual Inversion and plain SD on this code, side by side.

    python scripts/benchmark.py                                   # tiny config, CPU
    python scripts/benchmark.py --config configs/vico.yaml --device cuda --precision bf16 --out bench.json

Rows (all on this repository's code, random weights: speed does not depend on them):

  training step        forward, backward and AdamW step at batch 1 and 4, gradient checkpointing
                       off and on; ViCo and Textual Inversion (no reference stream, no image
                       attention; ``image_attention_layers: []``). Latents from cached posteriors.
  sampling step        one classifier-free-guided denoising step (two branches) of n_samples
                       1, 4, 8 sharing one reference; ViCo, Textual Inversion and plain SD (the
                       ViCo model without a reference: bit-exact plain SD v1).
  VAE decode, text encoding   per image.
  compiled UNet        with ``--compile MODE``: ViCo's training and sampling rows again with the
                       UNet under ``torch.compile`` (``compile_unet``), and the first call, which
                       traces and compiles, as its own row. ``capture-only`` traces without
                       generating kernels (a check of graph capture that fits a CPU).
  pretraining step     with ``--pretraining_only`` (and ``--config configs/miniworld/base.yaml``):
                       one step of ``scripts/miniworld.py pretrain``'s diffusion stage (UNet and
                       text encoder forward, backward, AdamW) at the recipe's batch of 64 cached
                       latents, in fp32 and under bf16 autocast side by side, with
                       ``--pretraining_heads N`` with N attention heads, and compiled with
                       ``--compile MODE``: which levers shorten the pretraining on this machine.
  sample.py start-up   a fresh interpreter: importing sample.py, then building the model from an
                       adapter and a base checkpoint on the meta device (``assign=True``), and the
                       old way (random initialisation, then loading) for comparison.

For each row: median and spread of ``--repeats`` timed calls after 2 warm-up calls (with CUDA
synchronisation on CUDA), peak memory allocated (CUDA only), FLOPs counted with
``torch.utils.flop_counter`` on a copy of the model on the ``meta`` device (the CPU counter
misses SDPA), the achieved TFLOP/s, and the ops of one call from the profiler: aten ops
(nested ones included), dtype casts among them (``aten::_to_copy``) and, on CUDA, kernels.

A second table holds in-repo ablations: OUR code with one of its choices reverted (shared
reference stream, cached VAE posteriors, batched Otsu). They are not the authors' code.

On a shared or contended machine only ratios measured side by side in one run mean anything.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omegaconf import OmegaConf  # noqa: E402

from ldm.models.diffusion.sampling import GuidedDenoiser, SamplingReference  # noqa: E402
from ldm.modules.precision import cache_autocast_weights  # noqa: E402
from ldm.modules.vico import ReferenceCondition, otsu_mask  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

GUIDANCE_SCALE = 7.5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_MODES = {
    "default": {},
    "reduce-overhead": {"mode": "reduce-overhead"},  # CUDA graphs
    "max-autotune": {"mode": "max-autotune"},
    "capture-only": {"backend": "aot_eager"},
}
MODELS = ("ViCo", "Textual Inversion", "plain SD")


# ---------------------------------------------------------------- measuring
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def count_ops(fn: Callable[[], object], device: torch.device) -> dict[str, int]:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        synchronize(device)
    events = prof.events()
    ops = {"aten_ops": sum(1 for e in events if e.name.startswith("aten::"))}
    ops["casts"] = sum(1 for e in events if e.name == "aten::_to_copy")
    if device.type == "cuda":
        ops["kernels"] = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return ops


def count_flops(fn: Callable[[], object] | None, module: torch.nn.Module | None) -> tuple[float | None, float | None]:
    """FLOPs of ``fn`` and the MiB of the tensors autograd saves for backward other than the
    weights of ``module`` (the activations, fp32; a view counts as its base, once; inside
    checkpointed blocks only what checkpointing keeps). Run on the meta device: no memory."""
    if fn is None:
        return None, None
    weights = {id(t) for t in (*module.parameters(), *module.buffers())} if module is not None else set()
    kept: dict[int, torch.Tensor] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor._base if tensor._base is not None else tensor
        if id(base) not in weights:
            kept.setdefault(id(base), base)
        return tensor

    with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    saved = sum(t.numel() * t.element_size() for t in kept.values())
    return float(counter.get_total_flops()), saved / 2**20


def time_summary(times: list[float]) -> dict:
    """Median, quartiles and range in milliseconds of call times in seconds."""
    median = statistics.median(times)
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [median, median, median]
    return {
        "median_ms": median * 1e3, "p25_ms": quartiles[0] * 1e3, "p75_ms": quartiles[2] * 1e3,
        "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3, "repeats": len(times),
    }  # fmt: skip


def measure(
    model: str,
    name: str,
    fn: Callable[[], object],
    device: torch.device,
    repeats: int,
    flops_fn: Callable[[], object] | None,
    per: int = 1,
    flops_module: torch.nn.Module | None = None,
) -> dict:
    """One row; ``per`` divides times and FLOPs (per-image rows)."""
    flops, saved_mib = count_flops(flops_fn, flops_module)
    flops = flops / per if flops is not None else None
    row = {
        "model": model,
        "name": name,
        "tflop": flops / 1e12 if flops is not None else None,
        "saved_activations_mib": saved_mib if saved_mib else None,
    }
    if device.type == "meta":  # counts only
        print(f"  {model:18s} {name:55s} {fmt(row['tflop'], '.4f')} TFLOP, saved {fmt(saved_mib, '.0f')} MiB", file=sys.stderr, flush=True)
        return row
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [t / per for t in time_calls(fn, device, repeats)]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    ops = count_ops(fn, device)
    median = statistics.median(times)
    row.update({
        **time_summary(times),
        "peak_mib": peak,
        "tflops_achieved": flops / median / 1e12 if flops is not None else None,
        **{k: v / per for k, v in ops.items()},
    })  # fmt: skip
    print(f"  {model:18s} {name:55s} {median * 1e3:10.2f} ms", file=sys.stderr, flush=True)
    return row


# ------------------------------------------------------------------- models
def load_config(path: str, overrides: list[str]):
    return OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(overrides))


def model_config(config, textual_inversion: bool):
    node = copy.deepcopy(OmegaConf.to_container(config.model, resolve=True))
    node["params"].pop("ckpt_path", None)
    if textual_inversion:
        node["params"]["unet_config"]["params"]["image_attention_layers"] = []
    return node


def build(config, textual_inversion: bool, device: torch.device):
    torch.manual_seed(0)
    with torch.device(device):
        model = instantiate_from_config(model_config(config, textual_inversion))
    if device.type != "meta":
        with torch.no_grad():  # a trained SD has non-zero output layers; keep every path active
            for p in model.parameters():
                if p.dim() > 1 and not p.any():
                    p.normal_(0.0, 0.02)
    return model.eval()


def parameter_counts(model) -> dict[str, int]:
    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    trained = sum(p.numel() for p in model.trainable_parameters())
    return {
        "UNet (frozen)": count(model.model) - sum(p.numel() for p in model.image_attention_parameters()),
        "trained (S* + image attention)": trained,
        "VAE": count(model.first_stage_model),
        "text encoder": count(model.cond_stage_model),
    }


def set_checkpointing(model, on: bool) -> None:
    for module in model.model.modules():
        if hasattr(module, "use_checkpoint"):
            module.use_checkpoint = on


def tokens_for(model, prompts: list[str], device: torch.device) -> torch.Tensor:
    return model.cond_stage_model.tokenizer(prompts).to(device)


def per_sample_guided_step(model, x, t, branch_context, reference_latent, tokens):
    """The ablation of the shared reference stream: a classifier-free-guided step whose
    reference stream runs once per sample and branch (``2n`` reference rows, as the authors'
    sampler does), where :class:`GuidedDenoiser` runs it once per branch."""
    n = x.shape[0]
    rows = 2 * n
    placeholder, eot, _ = model.embedding_manager.placeholder_positions(tokens[:1])
    reference = ReferenceCondition(
        latent=reference_latent.expand(rows, -1, -1, -1),
        context=branch_context.repeat_interleave(n, 0),
        placeholder_index=placeholder.repeat(rows),
        eot_index=eot.repeat(rows),
        timesteps=t.expand(rows),
    )
    output = model.apply_model(torch.cat([x, x]), t.expand(rows), branch_context.repeat_interleave(n, 0), reference)
    uncond, cond = output.chunk(2)
    return uncond + GUIDANCE_SCALE * (cond - uncond)


# -------------------------------------------------------------------- steps
class Setup:
    """Inputs of the rows for one model on one device (the meta copy uses the same code)."""

    def __init__(self, model, device: torch.device, autocast):
        self.model, self.device, self.autocast = model, device, autocast
        latent = model.image_size
        self.latent_shape = (4, latent, latent)
        g = torch.Generator().manual_seed(0)
        self.prompt_tokens = tokens_for(model, ["a photo of *"], device)
        self.prompt_token_ids = tokens_for(model, ["a photo of *"], torch.device("cpu"))[0]  # as sample.py hands them over
        self.uncond_tokens = tokens_for(model, [""], device)
        self.reference = torch.randn(1, *self.latent_shape, generator=g).to(device)
        self.x8 = torch.randn(8, *self.latent_shape, generator=g).to(device)
        self.t = torch.full((16,), 500, device=device, dtype=torch.long)
        self.t_train = torch.tensor([10, 300, 600, 900], device=device)
        self.noise = torch.randn(4, *self.latent_shape, generator=g).to(device)
        self.z = torch.randn(4, *self.latent_shape, generator=g).to(device)
        self.optimizer = None

    def branch_context(self):
        return torch.cat([self.model.get_learned_conditioning(self.uncond_tokens), self.model.get_learned_conditioning(self.prompt_tokens)])

    def sampling_step(self, n: int, use_reference: bool, per_sample_reference: bool = False):
        """One classifier-free-guided step of ``n`` samples as the samplers take it (the
        denoiser is built per step here, so its set-up is timed too)."""
        with torch.no_grad(), self.autocast:
            context = self.branch_context()
            x, t = self.x8[:n], self.t[0]
            if per_sample_reference:
                return per_sample_guided_step(self.model, x, t, context, self.reference, self.prompt_tokens)
            reference = SamplingReference(self.reference, self.prompt_token_ids) if use_reference else None
            return GuidedDenoiser(self.model, context[1:], n, GUIDANCE_SCALE, context[:1], reference)(x, t)

    def training_step(self, b: int, latents: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None, optimizer_step: bool = True):
        model = self.model
        tokens = self.prompt_tokens.expand(b, -1)
        with self.autocast:
            z, z_ref = latents() if latents else (self.z[:b], self.z.flip(0)[:b])
            context = model.get_learned_conditioning(tokens)
            loss, _ = model.p_losses(z, self.t_train[:b], context, model.reference_condition(z_ref, context, tokens), noise=self.noise[:b])
        loss.backward()
        if optimizer_step:
            if self.optimizer is None:
                self.optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-6)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def decode(self, n: int):
        with torch.no_grad(), self.autocast:
            return self.model.decode_first_stage(self.x8[:n])

    def encode_text(self, n: int):
        with torch.no_grad(), self.autocast:
            return self.model.get_learned_conditioning(self.prompt_tokens.expand(n, -1))


def otsu_loop(maps: torch.Tensor, n: int = 10) -> torch.Tensor:
    """Otsu per sample in a Python loop (one host read per candidate threshold): the ablation."""
    norm = (maps - maps.min(-1, keepdim=True)[0]) / (maps.max(-1, keepdim=True)[0] - maps.min(-1, keepdim=True)[0])
    out = []
    for row in norm:
        best_g, best_t = 0.0, 0.0
        for t in range(n):
            low, high = row[row < t / n], row[row >= t / n]
            g = len(low) / len(row) * len(high) / len(row) * (low.mean() - high.mean()) ** 2
            if g > best_g:
                best_g, best_t = g, t / n
        out.append(row >= best_t)
    return torch.stack(out)


# ------------------------------------------------------------------ start-up
IMPORT_SCRIPT = r"""
import json, sys, time
start = time.perf_counter()
sys.path.insert(0, {root!r})
{before}import sample  # noqa: F401  (what `python sample.py` imports before it does anything)
print(json.dumps({{"import_s": time.perf_counter() - start, "lightning_imported": "pytorch_lightning" in sys.modules}}))
"""
#: The import of sample.py, and the same with what it imported before the model left Lightning
#: (ldm.models.diffusion.latent) and the tokenizer left the open_clip package, each in a fresh interpreter.
IMPORT_WAYS = (
    ("sample.py start-up: import", ""),
    ("sample.py start-up: import (old: with pytorch_lightning and open_clip)", "import pytorch_lightning, open_clip; "),
)

STARTUP_SCRIPT = r"""
import json, sys, time
sys.path.insert(0, {root!r})
import torch
from ldm.models.loading import build_vico_model, read_vico_weights, resolve_config, base_checkpoint_path
from ldm.models.base_checkpoint import read_state_dict
from ldm.util import instantiate_from_config
from omegaconf import OmegaConf
device = {device!r}
weights = read_vico_weights({adapter!r})
config = resolve_config(weights)
base = base_checkpoint_path(config, None, weights.source, weights.folder)
read_state_dict(base)  # the file in the page cache for both ways

def meta_way():
    model = build_vico_model(weights, config, device=device)

def old_way():  # what build_vico_model did before: build on the device (random init), then load
    node = OmegaConf.to_container(config.model, resolve=True); node["params"].pop("ckpt_path", None)
    with torch.device(device):
        model = instantiate_from_config(node)
    model.load_base_checkpoint(str(base)); model.load_trained_state_dict(weights.state_dict, "adapter")
    model.eval().to(device)

times = {{"meta": [], "old": []}}
for _ in range(2):  # interleaved; the faster of two
    for name, way in (("old", old_way), ("meta", meta_way)):
        t0 = time.perf_counter(); way()
        if device.startswith("cuda"): torch.cuda.synchronize()
        times[name].append(time.perf_counter() - t0)
print(json.dumps({{"load_meta_s": min(times["meta"]), "load_random_init_s": min(times["old"])}}))
"""


def startup_rows(config, device: torch.device, workdir: Path) -> list[dict]:
    from ldm.models.loading import save_adapter
    from ldm.util import save_state_dict

    model = build(config, False, torch.device("cpu"))
    save_state_dict(model.base_state_dict(), workdir / "base.safetensors")
    stored = OmegaConf.create(OmegaConf.to_container(config, resolve=True))
    stored.model.params.ckpt_path = str(workdir / "base.safetensors")
    save_adapter(model, stored, workdir / "adapter.safetensors")
    del model
    script = STARTUP_SCRIPT.format(root=str(ROOT), device=str(device), adapter=str(workdir / "adapter.safetensors"))
    found = run_python(script)
    rows = import_rows(repeats=3)
    for key, name in (
        ("load_meta_s", "sample.py start-up: model load (meta, assign)"),
        ("load_random_init_s", "sample.py start-up: model load (old: random init)"),
    ):
        rows.append({"model": "ViCo", "name": name, "median_ms": found[key] * 1e3, "repeats": 1, "note": ""})
    return rows


def checkpoint_rows(meta_model, device: torch.device, workdir: Path, repeats: int) -> list[dict]:
    """What one save of ``last.ckpt`` costs, at the model's trained size (shapes from ``meta_model``).

    The state is what dominates a ViCo checkpoint: the trained parameters and AdamW's two
    moments, fp32, on ``device``. Rows: the write as training does it
    (:class:`ldm.callbacks.AtomicCheckpointIO`: temporary file, fsync, rename), and a clone of
    that state on the device, which an asynchronous write (Lightning's ``AsyncCheckpointIO``)
    adds to the training loop before handing the write to a thread: async pays only where the
    clone is much cheaper than the write.
    """
    from ldm.callbacks import AtomicCheckpointIO

    state = {
        f"{kind}.{index}": torch.randn(p.shape, device=device)
        for index, p in enumerate(meta_model.trainable_parameters())
        for kind in ("weight", "exp_avg", "exp_avg_sq")
    }
    mib = sum(t.numel() * t.element_size() for t in state.values()) / 2**20
    io = AtomicCheckpointIO()
    rows = []
    for name, fn in (
        (f"checkpoint write, atomic + fsync ({mib:.0f} MiB)", lambda: io.save_checkpoint(state, workdir / "last.ckpt")),
        (f"checkpoint state clone on the device ({mib:.0f} MiB)", lambda: {k: v.clone() for k, v in state.items()}),
    ):
        rows.append({"model": "ViCo", "name": name, **time_summary(time_calls(fn, device, repeats))})
        print(f"  {'ViCo':18s} {name:55s} {rows[-1]['median_ms']:10.2f} ms", file=sys.stderr, flush=True)
    return rows


def pretraining_rows(
    config, device: torch.device, repeats: int, batch_size: int, compile_mode: str | None, heads: int | None = None
) -> list[dict]:
    """One diffusion-stage pretraining step of the base model of ``config`` (random weights):
    torch's default AdamW against the pretraining's fused one, fp32 against bf16 autocast,
    with ``heads`` the UNet with that many attention heads (the same parameters), and with
    ``compile_mode`` the UNet compiled."""
    from ldm.models.pretraining import TextToImagePretraining, fused_adamw
    from scripts.miniworld import build_base_model

    def setup(model_config) -> tuple[Any, dict[str, torch.optim.Optimizer], tuple]:
        torch.manual_seed(0)
        model = build_base_model(model_config).to(device)
        tokenizer = model.cond_stage_model.tokenizer
        module = TextToImagePretraining(model, 3e-4, tokenizer([""])[0]).to(device)
        parameters = [p for part in module.trained_modules() for p in part.parameters()]
        optimizers = {"default": torch.optim.AdamW(parameters, lr=3e-4, weight_decay=0.0), "fused": fused_adamw(parameters, 3e-4)}
        params = model_config.params
        mean = torch.randn((batch_size, params.channels, params.image_size, params.image_size), device=device)
        batch = (mean, torch.full_like(mean, 0.1), tokenizer(["a photo of a red striped star on the beach"] * batch_size).to(device))
        return module, optimizers, batch

    def step(setup: tuple, dtype: torch.dtype, optimizer: str) -> None:
        module, optimizers, batch = setup
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss, _ = module.losses(batch)
        loss.backward()
        optimizers[optimizer].step()
        optimizers[optimizer].zero_grad(set_to_none=True)

    base = setup(config.model)
    name = f"pretraining step, batch {batch_size}"
    rows = [
        measure("miniworld base", f"{name}, fp32, AdamW (torch's default)", lambda: step(base, torch.float32, "default"), device, repeats, None),
        measure("miniworld base", f"{name}, fp32, AdamW fused", lambda: step(base, torch.float32, "fused"), device, repeats, None),
        measure("miniworld base", f"{name}, bf16 autocast, AdamW fused", lambda: step(base, torch.bfloat16, "fused"), device, repeats, None),
    ]  # fmt: skip
    if heads is not None:
        other = OmegaConf.merge(config.model, {"params": {"unet_config": {"params": {"num_heads": heads}}}})
        variant = setup(other)
        label = f"{name}, fp32, AdamW fused, {heads} attention heads"
        rows.append(measure("miniworld base", label, lambda: step(variant, torch.float32, "fused"), device, repeats, None))
    if compile_mode is not None:
        base[0].model.compile_unet(**COMPILE_MODES[compile_mode])
        compiled = f"{name}, fp32, AdamW fused, UNet compiled ({compile_mode})"
        started = time.perf_counter()
        step(base, torch.float32, "fused")
        synchronize(device)
        rows.append({"model": "miniworld base", "name": f"{compiled}, first call (compiles)", **time_summary([time.perf_counter() - started])})
        rows.append(measure("miniworld base", compiled, lambda: step(base, torch.float32, "fused"), device, repeats, None))
    return rows


def run_python(script: str) -> dict:
    """Run ``script`` in a fresh interpreter; its last stdout line, as JSON."""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env={**os.environ})
    if result.returncode:
        raise RuntimeError(f"start-up measurement failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def import_rows(repeats: int) -> list[dict]:
    """The :data:`IMPORT_WAYS`, interleaved ``repeats`` times (fresh interpreters), medians."""
    times: dict[str, list[float]] = {name: [] for name, _ in IMPORT_WAYS}
    lightning: dict[str, bool] = {}  # whether sample.py's import pulled Lightning in
    for _ in range(repeats):
        for name, before in IMPORT_WAYS:
            found = run_python(IMPORT_SCRIPT.format(root=str(ROOT), before=before))
            times[name].append(found["import_s"])
            lightning[name] = found["lightning_imported"]
    return [
        {"model": "ViCo", "name": name, "median_ms": statistics.median(times[name]) * 1e3, "repeats": repeats,
         "note": f"pytorch_lightning imported: {lightning[name]}"}
        for name, _ in IMPORT_WAYS
    ]  # fmt: skip


# --------------------------------------------------------------------- table
def fmt(value, spec: str = ".1f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | what | median | spread p25-p75 (min-max) | peak mem | saved activations (meta, fp32) | TFLOP/call | TFLOP/s | aten ops | casts | kernels |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        spread = "-" if "p25_ms" not in r else f"{r['p25_ms']:.1f}-{r['p75_ms']:.1f} ({r['min_ms']:.1f}-{r['max_ms']:.1f})"
        lines.append(
            f"| {r['model']} | {r['name']} | {fmt(r.get('median_ms'), '.1f', ' ms')} | {spread} | {fmt(r.get('peak_mib'), '.0f', ' MiB')} "
            f"| {fmt(r.get('saved_activations_mib'), '.0f', ' MiB')} | {fmt(r.get('tflop'), '.4f')} | {fmt(r.get('tflops_achieved'), '.3f')} "
            f"| {fmt(r.get('aten_ops'), '.0f')} | {fmt(r.get('casts'), '.0f')} | {fmt(r.get('kernels'), '.0f')} |"
        )
    return "\n".join(lines)


def ablation_markdown(rows: list[dict]) -> str:
    lines = ["| in-repo ablation (our code, one choice reverted; NOT the authors' code) | ours | choice reverted | ratio |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['ours_ms']:.1f} ms | {r['reverted_ms']:.1f} ms | {r['reverted_ms'] / r['ours_ms']:.2f}x |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/vico-tiny.yaml")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="write the rows as JSON to this file")
    parser.add_argument("--n_samples", type=int, nargs="+", default=[1, 4, 8], help="sampling-step batch sizes")
    parser.add_argument("--batch_size", type=int, nargs="+", default=[1, 4], help="training batch sizes")
    parser.add_argument("--no_startup", action="store_true", help="skip the sample.py start-up rows")
    parser.add_argument("--quick", action="store_true", help="one size of each row (n_samples 1, batch 1): a smoke test")
    parser.add_argument("--checkpoint_only", action="store_true",
                        help="only the checkpoint rows (write and on-device clone of the trained weights + AdamW state)")
    parser.add_argument("--pretraining_only", action="store_true",
                        help="only the base model's pretraining step (use with --config configs/miniworld/base.yaml)")
    parser.add_argument("--pretraining_batch", type=int, default=64, help="batch of the pretraining rows (the recipe's 64)")
    parser.add_argument("--pretraining_heads", type=int,
                        help="also time the pretraining step with this many attention heads (configs/miniworld/two-heads.yaml: 2)")
    parser.add_argument("--checkpoint_dir", default="logs",
                        help="where the checkpoint rows write (a temporary folder in it): the disk runs write to")
    parser.add_argument("--compile", choices=sorted(COMPILE_MODES), help="also time ViCo with the UNet under torch.compile")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.params.image_size=32")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_samples, args.batch_size = [1], [1]
    device = torch.device(args.device)
    dtype = DTYPES[args.precision]
    config = load_config(args.config, args.overrides)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    if args.pretraining_only:
        if device.type == "meta":
            raise SystemExit("error: --pretraining_only times steps; give a real --device")
        rows = pretraining_rows(config, device, args.repeats, args.pretraining_batch, args.compile, args.pretraining_heads)
        return report(args, device, rows, [], {})
    meta = torch.device("meta")
    meta_model = build(config, False, meta)
    parameters = parameter_counts(meta_model)
    rows: list[dict] = []
    ablations: list[dict] = []
    for textual_inversion in (False, True) if not args.checkpoint_only else ():
        name = "Textual Inversion" if textual_inversion else "ViCo"
        model = build(config, textual_inversion, device)
        if dtype != torch.float32 and device != meta:  # as training does under mixed precision (bit-identical)
            cache_autocast_weights(model.model, dtype)
            cache_autocast_weights(model.cond_stage_model, dtype)
        meta_run = Setup(build(config, textual_inversion, meta), meta, torch.autocast("cpu", enabled=False))
        run = meta_run if device == meta else Setup(model, device, autocast())
        for b in args.batch_size:
            for checkpointing in (False, True):
                set_checkpointing(model, checkpointing)
                set_checkpointing(meta_run.model, checkpointing)
                model.train()
                rows.append(measure(
                    name, f"training step, batch {b}, checkpointing {'on' if checkpointing else 'off'}",
                    lambda b=b: run.training_step(b), device, args.repeats,
                    lambda b=b: meta_run.training_step(b, optimizer_step=False), flops_module=meta_run.model,
                ))  # fmt: skip
                model.eval()
        set_checkpointing(model, False)
        for n in args.n_samples:
            rows.append(measure(
                name, f"sampling step, guided, {n} samples", lambda n=n: run.sampling_step(n, use_reference=not textual_inversion),
                device, args.repeats, lambda n=n: meta_run.sampling_step(n, use_reference=not textual_inversion),
            ))  # fmt: skip
        if not textual_inversion:
            for n in args.n_samples:
                rows.append(measure(
                    "plain SD", f"sampling step, guided, {n} samples", lambda n=n: run.sampling_step(n, use_reference=False),
                    device, args.repeats, lambda n=n: meta_run.sampling_step(n, use_reference=False),
                ))  # fmt: skip
            n = max(args.n_samples)
            rows.append(measure("all", "VAE decode, per image", lambda: run.decode(n), device, args.repeats, lambda: meta_run.decode(n), per=n))
            rows.append(measure("all", "text encoding, per prompt", lambda: run.encode_text(n), device, args.repeats, lambda: meta_run.encode_text(n), per=n))
            if device != meta:
                ablations += in_repo_ablations(model, run, device, args, config)
            if args.compile and device != meta:
                rows += compiled_rows(model, run, meta_run, device, args)
        del model, run, meta_run
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not args.no_startup and not args.checkpoint_only and device != meta:
        with tempfile.TemporaryDirectory() as folder:
            rows += startup_rows(config, device, Path(folder))
    if device != meta:
        Path(args.checkpoint_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=args.checkpoint_dir) as folder:
            rows += checkpoint_rows(meta_model, device, Path(folder), args.repeats)

    return report(args, device, rows, ablations, parameters)


def report(args: argparse.Namespace, device: torch.device, rows: list[dict], ablations: list[dict], parameters: dict[str, int]) -> int:
    """Print the tables (and write ``--out``)."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "meta (counts only)" if device.type == "meta" else f"CPU ({torch.get_num_threads()} threads)"
    header = f"{args.config} {' '.join(args.overrides)} on {where}, {args.precision}, torch {torch.__version__}, median of {args.repeats} after 2 warm-up calls"
    print(header)
    if parameters:
        print("parameters (M): " + ", ".join(f"{k} {v / 1e6:.2f}" for k, v in parameters.items()) + "\n")
    print(markdown(rows) + "\n")
    if ablations:
        print(ablation_markdown(ablations))
    if args.out:
        Path(args.out).write_text(json.dumps({"header": header, "argv": sys.argv, "parameters": parameters, "rows": rows, "ablations": ablations}, indent=1))
    return 0


def compiled_rows(model, run: Setup, meta_run: Setup, device: torch.device, args) -> list[dict]:
    """ViCo's training and sampling steps with the UNet compiled; the first call of each as a row."""
    model.compile_unet(**COMPILE_MODES[args.compile])
    set_checkpointing(meta_run.model, False)
    label = f"compiled ({args.compile})"
    rows = []
    steps = [
        (f"training step, batch {b}, checkpointing off, {label}", lambda b=b: run.training_step(b),
         lambda b=b: meta_run.training_step(b, optimizer_step=False), True)
        for b in args.batch_size
    ] + [
        (f"sampling step, guided, {n} samples, {label}", lambda n=n: run.sampling_step(n, use_reference=True),
         lambda n=n: meta_run.sampling_step(n, use_reference=True), False)
        for n in args.n_samples
    ]  # fmt: skip
    for name, call, meta_call, training in steps:
        model.train(training)
        first = time_calls(call, device, 1, warmup=0)[0]
        rows.append({"model": "ViCo", "name": f"{name}: first call (compiles)", "median_ms": first * 1e3, "repeats": 1})
        rows.append(measure("ViCo", name, call, device, args.repeats, meta_call, flops_module=meta_run.model if training else None))
    model.eval()
    return rows


def in_repo_ablations(model, run: Setup, device: torch.device, args, config) -> list[dict]:
    """Our code with one of its choices reverted, timed interleaved with our code."""
    n = max(args.n_samples)
    b = max(args.batch_size)
    latent = model.image_size
    pixels = latent * 2 ** (len(config.model.params.first_stage_config.params.ddconfig.ch_mult) - 1)
    photos = torch.rand(5, 3, pixels, pixels, device=device) * 2 - 1
    model.cache_first_stage(photos, with_flips=False)
    index = torch.arange(b, device=device) % 5
    no_flip = torch.zeros(b, dtype=torch.bool, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    maps = torch.rand(2 * b, (latent // 2) ** 2, device=device) ** 3
    pairs = [
        (f"shared reference stream (vs once per sample), guided step, {n} samples",
         lambda: run.sampling_step(n, True), lambda: run.sampling_step(n, True, per_sample_reference=True)),
        (f"cached VAE posteriors (vs VAE encoding every step), training step, batch {b}",
         lambda: run.training_step(b, lambda: (model.cached_latent(index, no_flip, generator), model.cached_latent(index, no_flip, generator))),
         lambda: run.training_step(b, lambda: (model.get_first_stage_encoding(photos[index]), model.get_first_stage_encoding(photos[index])))),
        (f"batched Otsu (vs a Python loop per sample), {2 * b} maps", lambda: otsu_mask(maps), lambda: otsu_loop(maps)),
    ]  # fmt: skip
    out = []
    for name, ours, reverted in pairs:
        ours(), reverted()
        a, r = [], []
        for _ in range(args.repeats):  # interleaved
            a += time_calls(ours, device, 1, warmup=0)
            r += time_calls(reverted, device, 1, warmup=0)
        out.append({"name": name, "ours_ms": statistics.median(a) * 1e3, "reverted_ms": statistics.median(r) * 1e3})
    return out


if __name__ == "__main__":
    sys.exit(main())
