"""LatentDiffusion: full-size layout on meta, schedule, q_sample, Eq. 7, checkpoint files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ldm.models.base_checkpoint import load_base_checkpoint, read_state_dict
from ldm.util import CheckpointError, instantiate_from_config, save_state_dict
from tests.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
SCHEDULE_KEYS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
}  # fmt: skip


def build(config_name: str):
    return instantiate_from_config(OmegaConf.load(ROOT / "configs" / config_name).model)


@pytest.fixture(scope="module")
def full_model():
    with torch.device("meta"):
        return build("vico.yaml")


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = build("vico-tiny.yaml")
    with torch.no_grad():  # non-zero output convs, so every path shows in the outputs
        for name, p in model.named_parameters():
            if name.endswith(("proj_out.weight", "out.2.weight", "out_layers.3.weight")):
                p.normal_(0, 0.05)
    return model


def test_full_model_layout_equals_sd_v1_plus_vico_manifests(full_model):
    expected = read_manifest(DATA / "sd-v1-state-dict.tsv") | read_manifest(DATA / "vico-adapter-state-dict.tsv")
    found = {k: tuple(v.shape) for k, v in full_model.state_dict().items()}
    position_ids = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    initial = "embedding_manager.initial_embeddings.*"
    assert found.pop(initial) == (1, 768)
    expected.pop(position_ids)
    assert position_ids not in found  # a buffer of transformers' CLIP, not saved (SD files may hold it)
    assert sorted(set(expected) - set(found)) == []
    assert sorted(set(found) - set(expected)) == []
    assert {k for k in found if k in SCHEDULE_KEYS} == SCHEDULE_KEYS
    mismatched = {k: (found[k], expected[k]) for k in expected if found[k] != expected[k]}
    assert mismatched == {}


def test_full_model_trains_only_placeholder_and_image_attention(full_model):
    trainable = {n: p.numel() for n, p in full_model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == 51_249_728  # the paper's "51.3M"
    assert all(".image_cross_attention." in n or n.startswith("embedding_manager.string_to_param_dict") for n in trainable)
    assert len(full_model.model.diffusion_model.image_attention_layers) == 4
    frozen = sum(p.numel() for p in full_model.parameters() if not p.requires_grad)
    assert frozen == 1_066_235_307 + 768  # SD v1 + the frozen copy of the init embedding


def test_frozen_parts_stay_in_eval_mode(tiny):
    tiny.train()
    assert not tiny.first_stage_model.training and not tiny.cond_stage_model.training
    assert not tiny.model.diffusion_model.training
    blocks = [m.image_cross_attention for m in tiny.model.modules() if getattr(m, "image_cross_attention", None)]
    assert len(blocks) == 2 and all(b.training for b in blocks)
    tiny.eval()
    assert not any(b.training for b in blocks)


def test_schedule_buffers_follow_the_formulas(tiny):
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1 - betas)
    torch.testing.assert_close(tiny.betas, torch.tensor(betas, dtype=torch.float32))
    torch.testing.assert_close(tiny.alphas_cumprod, torch.tensor(alphas_cumprod, dtype=torch.float32))
    assert tiny.alphas_cumprod_prev[0] == 1.0
    assert tiny.posterior_variance[0] == 0.0 and torch.isfinite(tiny.posterior_log_variance_clipped).all()


def test_q_sample(tiny):
    x0, noise = torch.randn(3, 4, 16, 16), torch.randn(3, 4, 16, 16)
    t = torch.tensor([0, 499, 999])
    a = tiny.alphas_cumprod[t].view(3, 1, 1, 1)
    torch.testing.assert_close(tiny.q_sample(x0, t, noise), a.sqrt() * x0 + (1 - a).sqrt() * noise)


def test_loss_is_eq7(tiny):
    prompts = ["a photo of *", "a rendering of a *"]
    tokens = tiny.tokenize(prompts)
    context = tiny.get_learned_conditioning(tokens)
    x0, ref, noise = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    t = torch.tensor([10, 800])
    reference = tiny.reference_condition(ref, context, tokens)
    loss, logs = tiny.p_losses(x0, t, context, reference, noise=noise)
    assert len(reference.regularizer_terms) == 2
    check = tiny.reference_condition(ref, context, tokens, compute_regularizer=True)
    eps = tiny.apply_model(tiny.q_sample(x0, t, noise), t, context, check)
    expected = F.mse_loss(eps, noise) + 5e-4 * sum(check.regularizer_terms)
    torch.testing.assert_close(loss, expected)
    assert logs["loss_reg"] > 0 and torch.isfinite(loss)
    loss.backward()
    assert tiny.embedding_manager.string_to_param_dict["*"].grad.abs().sum() > 0
    assert all(p.grad is not None for p in tiny.image_attention_parameters())
    assert all(p.grad is None for p in tiny.model.diffusion_model.parameters() if not p.requires_grad)


# ------------------------------------------------------------------- checkpoints
def outputs(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    x, ref = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    tokens = model.tokenize(["a photo of *", "a photo of a *"])
    context = model.get_learned_conditioning(tokens)
    with torch.no_grad():
        eps = model.apply_model(x, torch.tensor([5, 600]), context, model.reference_condition(ref, context, tokens))
        image = model.decode_first_stage(x)
    return torch.cat([eps.flatten(), context.flatten(), image.flatten()])


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_tiny_checkpoint_round_trip(tiny, tmp_path, suffix):
    path = tmp_path / f"base{suffix}"
    state = tiny.base_state_dict()
    state["model_ema.decay"] = torch.tensor(0.9999)  # tolerated extras of real files
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_state_dict(state, path)
    torch.manual_seed(123)
    fresh = build("vico-tiny.yaml")
    fresh.embedding_manager.load_state_dict(tiny.embedding_manager.state_dict())
    fresh.model.load_state_dict(
        {k: v for k, v in tiny.model.state_dict().items() if "image_cross_attention" in k}, strict=False
    )
    assert not torch.equal(outputs(fresh), outputs(tiny))
    load_base_checkpoint(fresh, path)
    assert torch.equal(outputs(fresh), outputs(tiny))


def test_missing_key_names_key_and_file(tiny, tmp_path):
    path = tmp_path / "broken.safetensors"
    state = tiny.base_state_dict()
    del state["first_stage_model.decoder.conv_out.bias"]
    save_state_dict(state, path)
    with pytest.raises(CheckpointError) as err:
        load_base_checkpoint(tiny, path)
    message = str(err.value)
    assert "first_stage_model.decoder.conv_out.bias" in message and str(path) in message
    assert "\n" not in message


def test_shape_mismatch_names_key_and_file(tiny, tmp_path):
    path = tmp_path / "other.ckpt"
    state = tiny.base_state_dict()
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 9, 3, 3)
    save_state_dict(state, path)
    with pytest.raises(CheckpointError, match=r"other\.ckpt: key 'model\.diffusion_model\.input_blocks\.0\.0\.weight' has shape \[32, 9, 3, 3\]"):
        load_base_checkpoint(tiny, path)


def test_missing_file_and_garbage_file(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_base_checkpoint(tiny, tmp_path / "nope.ckpt")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.ckpt"):
        read_state_dict(garbage)
    garbage_st = tmp_path / "garbage.safetensors"
    garbage_st.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        read_state_dict(garbage_st)


def test_lightning_era_ckpt_loads_with_weights_only(tmp_path):
    """Old SD .ckpt files key their callback state by the ModelCheckpoint class itself."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    path = tmp_path / "old.ckpt"
    torch.save(
        {
            "state_dict": {"w": torch.ones(2)},
            "global_step": 470000,
            "callbacks": {ModelCheckpoint: {"best_model_score": np.float64(0.12), "dtype": np.dtype("float64")}},
        },
        path,
    )
    assert torch.equal(read_state_dict(path)["w"], torch.ones(2))


