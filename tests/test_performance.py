"""Performance paths that must not change results: cached autocast weights, models built on
the meta device, the training step free of host reads, the benchmark at tiny size."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import main
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.models.diffusion.latent import LatentDiffusionModel
from ldm.modules.precision import cache_autocast_weights, release_autocast_weights
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "vico-tiny.yaml"


def tiny_model(**unet):
    config = OmegaConf.load(TINY)
    for key, value in unet.items():
        config.model.params.unet_config.params[key] = value
    torch.manual_seed(0)
    model = instantiate_from_config(config.model)
    main.fill_zero_initialised_weights(model)
    return model


def training_loss(model, batch=2):
    """Forward and backward of one training step on fixed inputs; the loss and the trained grads."""
    generator = torch.Generator().manual_seed(1)
    shape = (batch, 4, model.image_size, model.image_size)
    latent, reference, noise = (torch.randn(shape, generator=generator) for _ in range(3))
    tokens = model.tokenize(["a photo of *"] * batch)
    t = torch.tensor([10, 700][:batch])
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        context = model.get_learned_conditioning(tokens)
        loss, _ = model.p_losses(latent, t, context, model.reference_condition(reference, context, tokens), noise=noise)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.trainable_parameters()]


@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_cached_autocast_weights_equal_autocast(use_checkpoint):
    """Frozen weights cast once give bit-identical losses and gradients to autocast's per-use casts."""
    model = tiny_model(use_checkpoint=use_checkpoint)
    loss, grads = training_loss(model)
    assert cache_autocast_weights(model.model, torch.bfloat16) > 20
    cache_autocast_weights(model.cond_stage_model, torch.bfloat16)
    cached_loss, cached_grads = training_loss(model)
    assert torch.equal(loss, cached_loss)
    for a, b in zip(grads, cached_grads):
        assert torch.equal(a, b)
    # outside autocast the float32 weights are used, as before
    x = torch.randn(1, 4, model.image_size, model.image_size)
    with torch.no_grad():
        context = torch.randn(1, 77, 32)
        out = model.apply_model(x, torch.tensor([5]), context)
        release_autocast_weights(model)
        assert torch.equal(out, model.apply_model(x, torch.tensor([5]), context))
    assert not any("_autocast_weights" in vars(m) or "forward" in vars(m) for m in model.modules())


def test_trainable_layers_are_not_cached():
    model = tiny_model()
    cache_autocast_weights(model, torch.bfloat16)
    for name, module in model.named_modules():
        if ".image_cross_attention." in name + "." and isinstance(module, torch.nn.Linear):
            assert "_autocast_weights" not in vars(module), name


def test_training_step_has_no_host_reads_on_meta():
    """The step runs on the meta device, where any read of a value on the host (.item(),
    bool(tensor), nonzero, tolist) fails: the training step cannot synchronise on one."""
    config = OmegaConf.load(TINY)
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    batch = 2
    shape = (batch, 4, model.image_size, model.image_size)
    tokens = model.cond_stage_model.tokenize(["a photo of *"] * batch).to("meta")
    latent = torch.randn(shape, device="meta")
    context = model.get_learned_conditioning(tokens)
    loss, _ = model.p_losses(
        latent, torch.zeros(batch, dtype=torch.long, device="meta"), context,
        model.reference_condition(latent, context, tokens), noise=torch.randn(shape, device="meta"),
    )  # fmt: skip
    loss.backward()
    assert all(p.grad is not None for p in model.trainable_parameters())


def test_default_precision_is_32_on_cpu():
    assert main.default_precision("cpu") == "32"


def load_benchmark():
    """scripts/benchmark.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    return benchmark


def test_benchmark_runs_at_tiny_size(tmp_path, capsys):
    """The benchmark's rows at tiny size, in-process (the sample.py start-up rows start a fresh
    interpreter and are left out here; scripts/benchmark.py without --no_startup runs them)."""
    benchmark = load_benchmark()
    out = tmp_path / "bench.json"
    assert benchmark.main([
        "--quick", "--repeats", "1", "--no_startup", "--compile", "capture-only", "--out", str(out), "--checkpoint_dir", str(tmp_path),
    ]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    checkpoint_rows = [row for row in report["rows"] if row["name"].startswith("checkpoint ")]
    assert [row["name"].split(" (")[0] for row in checkpoint_rows] == ["checkpoint write, atomic + fsync", "checkpoint state clone on the device"]
    assert all(row["median_ms"] > 0 for row in checkpoint_rows) and not list(tmp_path.glob("tmp*"))  # its folder is removed
    report["rows"] = [row for row in report["rows"] if row not in checkpoint_rows]
    names = {row["name"] for row in report["rows"]}
    for expected in ("training step", "sampling step", "VAE decode", "text encoding"):
        assert any(expected in name for name in names), (expected, names)
    assert {row["model"] for row in report["rows"]} >= {"ViCo", "Textual Inversion", "plain SD"}
    first_calls = [row for row in report["rows"] if row["name"].endswith("first call (compiles)")]
    assert len(first_calls) == 2 and all(row["median_ms"] > 0 for row in first_calls)
    rows = {(row["model"], row["name"]): row for row in report["rows"] if row not in first_calls}
    assert ("ViCo", "sampling step, guided, 1 samples, compiled (capture-only)") in rows
    compiled_training = rows["ViCo", "training step, batch 1, checkpointing off, compiled (capture-only)"]
    assert compiled_training["tflop"] == rows["ViCo", "training step, batch 1, checkpointing off"]["tflop"]
    for row in rows.values():
        assert row["median_ms"] > 0 and row["tflop"] > 0 and row["aten_ops"] > 0, row
    assert len(report["ablations"]) == 3
    assert "| ViCo | training step, batch 1, checkpointing off |" in capsys.readouterr().out


def test_benchmark_checkpoint_rows_write_the_trained_state_and_adamw_moments(tmp_path, capsys):
    benchmark = load_benchmark()
    out = tmp_path / "bench.json"
    assert benchmark.main(["--checkpoint_only", "--repeats", "2", "--out", str(out), "--checkpoint_dir", str(tmp_path / "disk")]) == 0
    report = json.loads(out.read_text())
    trained_mib = 3 * 4 * report["parameters"]["trained (S* + image attention)"] / 2**20  # weights and two AdamW moments, fp32
    assert len(report["rows"]) == 2, report["rows"]
    for row in report["rows"]:
        assert f"({trained_mib:.0f} MiB)" in row["name"] and row["repeats"] == 2 and row["median_ms"] > 0
    assert list((tmp_path / "disk").iterdir()) == []


def test_benchmark_pretraining_rows_time_the_base_models_step_side_by_side(tmp_path):
    benchmark = load_benchmark()
    out = tmp_path / "bench.json"
    assert benchmark.main([
        "--config", "configs/miniworld/base.yaml", "--pretraining_only", "--pretraining_batch", "2", "--repeats", "1",
        "--compile", "capture-only", "--pretraining_heads", "2", "--out", str(out),
    ]) == 0  # fmt: skip
    rows = {row["name"]: row for row in json.loads(out.read_text())["rows"]}
    prefix = "pretraining step, batch 2, "
    assert sorted(rows) == sorted(prefix + what for what in (
        "fp32, AdamW (torch's default)", "fp32, AdamW fused", "bf16 autocast, AdamW fused", "fp32, AdamW fused, 2 attention heads",
        "fp32, AdamW fused, UNet compiled (capture-only), first call (compiles)", "fp32, AdamW fused, UNet compiled (capture-only)",
    ))  # fmt: skip
    assert all(row["median_ms"] > 0 for row in rows.values())
    # the fused optimizer is what saves ops: one kernel per step instead of one loop per tensor
    assert rows[prefix + "fp32, AdamW fused"]["aten_ops"] < rows[prefix + "fp32, AdamW (torch's default)"]["aten_ops"] - 5000


def test_pretraining_optimizer_is_fused_and_matches_the_default_update():
    from ldm.models.pretraining import fused_adamw

    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    copies = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    fused, default = fused_adamw(weights, 1e-2), torch.optim.AdamW(copies, lr=1e-2, weight_decay=0.0)
    assert fused.defaults["fused"] and fused.defaults["weight_decay"] == 0.0
    for _ in range(3):
        for group in (weights, copies):
            sum((w**2).sum() for w in group).backward()
        fused.step(), default.step()
        fused.zero_grad(), default.zero_grad()
    for w, c in zip(weights, copies):
        torch.testing.assert_close(w, c)


def test_sampling_imports_no_lightning_and_no_open_clip_package():
    """sample.py, the Python API and the exporter start without Lightning and, for SD v1, without
    the open_clip package (its image models): seconds of imports that sampling never uses."""
    code = (
        "import sys, sample, ldm.api, ldm.models.export; from ldm.modules.encoders.modules import CLIPTokenizer; "
        "assert CLIPTokenizer()(['a photo of *']).shape == (1, 77); "
        "print(sorted(m for m in sys.modules if 'lightning' in m or m.startswith('open_clip')))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_meta_built_model_equals_the_randomly_initialised_one(tmp_path):
    """build_vico_model (parameters on meta, loaded with assign=True) gives the weights, buffers
    and outputs of the model built as before (random initialisation, then loading)."""
    from ldm.models.loading import load_vico_model, read_vico_weights, save_adapter
    from ldm.util import save_state_dict
    from tests.test_sampling import build_tiny, tiny_config

    tiny = build_tiny(tiny_config())
    save_state_dict(tiny.base_state_dict(), tmp_path / "base.safetensors")
    config = tiny_config()
    config.model.params.ckpt_path = str(tmp_path / "base.safetensors")
    save_adapter(tiny, config, tmp_path / "adapter.safetensors")

    loaded, _ = load_vico_model(tmp_path / "adapter.safetensors")
    weights = read_vico_weights(tmp_path / "adapter.safetensors")
    model_config = OmegaConf.to_container(config.model, resolve=True)
    model_config["params"].pop("ckpt_path")
    before = instantiate_from_config(model_config)
    before.load_base_checkpoint(str(tmp_path / "base.safetensors"))
    before.load_trained_state_dict(weights.state_dict, "adapter")
    before.eval()

    # Sampling builds the plain model; the config's training class (Lightning) holds the same keys.
    assert type(loaded) is LatentDiffusionModel and type(before) is LatentDiffusion
    expected, got = before.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:  # initial_embeddings (in no file): the init word's row of the loaded base, in both
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key
    for (name, a), (_, b) in zip(before.named_buffers(), loaded.named_buffers()):
        assert torch.equal(a, b), name
    assert [p.requires_grad for p in before.parameters()] == [p.requires_grad for p in loaded.parameters()]
    x = torch.randn(2, 4, 16, 16)
    tokens = loaded.tokenize(["a photo of *"] * 2)
    with torch.no_grad():
        outs = []
        for model in (before, loaded):
            context = model.get_learned_conditioning(tokens)
            reference = model.reference_condition(x.flip(0), context, tokens)
            outs.append(model.apply_model(x, torch.tensor([3, 900]), context, reference))
    assert torch.equal(*outs)
