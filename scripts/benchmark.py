"""Side-by-side timings of the choices that make this implementation fast.

Each line times two ways of computing the same thing in the same process, interleaved, and
reports the ratio; the model has random weights (speed does not depend on them).

    python scripts/benchmark.py                                   # tiny config, CPU
    python scripts/benchmark.py --config configs/vico.yaml --device cuda --precision bf16

Measured:
  sampling  one guided denoising step, n_samples images sharing one reference: reference
            stream once per guidance branch (ours) vs once per sample (the original)
  training  one training step (forward and backward): latents from cached VAE posteriors
            (ours) vs encoding the photos and references through the VAE every step (the original)
  otsu      Otsu masks of a batch: batched (ours) vs a Python loop per sample (the original)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402

from ldm.modules.vico import ReferenceCondition, otsu_mask  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare(name: str, ours: Callable, theirs: Callable, device: torch.device, repeats: int) -> str:
    ours(), theirs()  # warm-up
    a, b = [], []
    for _ in range(repeats):
        a.append(timed(ours, device))
        b.append(timed(theirs, device))
    ours_s, theirs_s = statistics.median(a), statistics.median(b)
    return f"| {name} | {ours_s * 1e3:.1f} ms | {theirs_s * 1e3:.1f} ms | {theirs_s / ours_s:.2f}x |"


def otsu_loop(maps: torch.Tensor, n: int = 10) -> torch.Tensor:
    """The authors' per-sample Otsu (one Python loop per sample and threshold)."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/vico-tiny.yaml")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--n_samples", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=4, help="training batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.params.image_size=32")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]

    torch.manual_seed(0)
    config = OmegaConf.merge(OmegaConf.load(args.config), OmegaConf.from_dotlist(args.overrides))
    model = instantiate_from_config(config.model).to(device).eval()
    unet = model.model.diffusion_model
    latent = model.image_size
    pixels = latent * 2 ** (len(config.model.params.first_stage_config.params.ddconfig.ch_mult) - 1)
    context_dim = config.model.params.unet_config.params.context_dim
    rows = []
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    # sampling: one guided step, two branches of n samples each
    n = args.n_samples
    x = torch.randn(2 * n, 4, latent, latent, device=device)
    t = torch.full((2 * n,), 500, device=device)
    branch_context = torch.randn(2, 77, context_dim, device=device)
    context = branch_context.repeat_interleave(n, 0)
    ref = torch.randn(1, 4, latent, latent, device=device)

    def condition(rows_context: torch.Tensor) -> ReferenceCondition:
        k = rows_context.shape[0]
        return ReferenceCondition(
            latent=ref.expand(k, -1, -1, -1),
            context=rows_context,
            placeholder_index=torch.full((k,), 5, device=device),
            eot_index=torch.full((k,), 6, device=device),
            timesteps=torch.full((k,), 500, device=device),
        )

    with torch.no_grad(), autocast:
        rows.append(
            compare(
                f"sampling step, guided, {n} samples, 1 reference",
                lambda: unet(x, t, context, condition(branch_context)),
                lambda: unet(x, t, context, condition(context)),
                device,
                args.repeats,
            )
        )

    # training: a whole step (forward + backward) with cached posteriors vs VAE encoding
    b = args.batch_size
    photos = torch.rand(5, 3, pixels, pixels, device=device) * 2 - 1
    model.cache_first_stage(photos, with_flips=False)
    index = torch.arange(b, device=device) % 5
    no_flip = torch.zeros(b, dtype=torch.bool, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    tokens = model.tokenize(["a photo of a *"] * b)
    t_train = torch.randint(0, 1000, (b,), device=device, generator=generator)

    def train_step(latents: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> None:
        with autocast:
            z, z_ref = latents()
            context = model.get_learned_conditioning(tokens)
            loss, _ = model.p_losses(z, t_train, context, model.reference_condition(z_ref, context, tokens))
        loss.backward()

    rows.append(
        compare(
            f"training step, batch {b}",
            lambda: train_step(lambda: (model.cached_latent(index, no_flip, generator), model.cached_latent(index, no_flip, generator))),
            lambda: train_step(lambda: (model.get_first_stage_encoding(photos[index]), model.get_first_stage_encoding(photos[index]))),
            device,
            args.repeats,
        )
    )

    maps = torch.rand(2 * b, (latent // 2) ** 2, device=device) ** 3
    rows.append(compare(f"Otsu masks, {2 * b} maps", lambda: otsu_mask(maps), lambda: otsu_loop(maps), device, args.repeats))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.config} {' '.join(args.overrides)} on {name}, {args.precision}, torch {torch.__version__}, median of {args.repeats}\n")
    print("| what | ours | original's way | speed-up |")
    print("|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
