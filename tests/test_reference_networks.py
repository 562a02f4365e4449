"""The frozen networks against an independent implementation (issue 25).

diffusers' ``UNet2DConditionModel`` and ``AutoencoderKL`` and transformers' ``CLIPTextModel``, at
tiny configs with Stable Diffusion's block types and random weights, are written as a diffusers
folder (``save_pretrained``) and read into our CompVis-layout modules by the project's own loader
(``load_base_checkpoint`` -> ``read_diffusers_folder`` -> :mod:`ldm.models.diffusers_layout`), so
the tests check the loader's values as well as the networks' arithmetic. Both sides then run on
the same inputs, in float64 (a difference is a bug, not rounding: 1e-10 relative) and, without
any patch, in float32.

Every parameter is re-randomised (diffusers and CompVis zero-initialise some output
convolutions, which would hide whatever comes before them), with unit-scale values so that an
epsilon or a scale that is off shows at float64 precision.

Float64 needs one test-local patch: our ``GroupNorm32`` (as CompVis's) casts its input to
float32, which fails on a ``.double()`` model, so the float64 tests let float64 inputs through
(:func:`groupnorm_keeps_float64`); the float32 tests run the code as it is.
"""
from __future__ import annotations

import copy
from pathlib import Path

import diffusers
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from omegaconf import OmegaConf
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.models import diffusers_layout
from ldm.models.diffusion.parameterization import eps_from_v, to_eps, v_target, x0_from_v
from ldm.models.diffusion.sampling import DDIMSchedule, alpha_at
from ldm.modules.diffusionmodules.util import GroupNorm32
from ldm.models.base_checkpoint import read_diffusers_folder, unused_base_keys
from ldm.util import instantiate_from_config
from tests.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"

#: Relative error (max |ours - theirs| / max |theirs|) allowed in float64 and in float32.
FLOAT64_RTOL = 1e-10
FLOAT32_RTOL = 2e-5

# ------------------------------------------------------------------------ configs
# Three levels with SD's block types: attention at the first two levels, none at the last
# (SD: 4 levels, attention at 3), two resnets per level, GroupNorm of 32 groups over 2-4
# channels each. Our configs and diffusers' describe the same network.
CONTEXT_DIM = 32
UNET_V1 = {
    "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
    "params": {
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 64,
        "attention_resolutions": [1, 2],
        "num_res_blocks": 2,
        "channel_mult": [1, 2, 2],
        "num_heads": 4,  # SD v1: num_heads 8 at every level
        "transformer_depth": 1,
        "context_dim": CONTEXT_DIM,
        "image_attention_layers": [],
    },
}
DIFFUSERS_UNET_V1 = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (64, 128, 128),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": CONTEXT_DIM,
    "attention_head_dim": 4,  # as SD v1's unet/config.json uses it: the number of heads (8)
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "downsample_padding": 1,
}
#: SD 2.x: 64 channels a head (here 16), linear proj_in/proj_out.
UNET_V2 = copy.deepcopy(UNET_V1)
del UNET_V2["params"]["num_heads"]
UNET_V2["params"].update(num_head_channels=16, use_linear_in_transformer=True)
DIFFUSERS_UNET_V2 = {
    **DIFFUSERS_UNET_V1,
    "attention_head_dim": (4, 8, 8),  # SD 2.x lists heads per level: [5, 10, 20, 20]
    "use_linear_projection": True,
}
VAE = {
    "target": "ldm.models.autoencoder.AutoencoderKL",
    "params": {
        "embed_dim": 4,
        "ddconfig": {
            "double_z": True,
            "z_channels": 4,
            "resolution": 32,
            "in_channels": 3,
            "out_ch": 3,
            "ch": 64,
            "ch_mult": [1, 2, 2],
            "num_res_blocks": 2,
            "attn_resolutions": [],
            "dropout": 0.0,
        },
    },
}
DIFFUSERS_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (64, 128, 128),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
}

TEXT_V1 = {
    "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
    "params": {"hidden_size": CONTEXT_DIM, "intermediate_size": 4 * CONTEXT_DIM, "num_layers": 2, "num_heads": 2},
}
#: SD v1's text_encoder/config.json at tiny widths.
CLIP_TEXT_V1 = {
    "vocab_size": 49408,
    "hidden_size": CONTEXT_DIM,
    "intermediate_size": 4 * CONTEXT_DIM,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
TEXT_V2 = {
    "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
    "params": {"arch": "ViT-H-14", "layer": "penultimate", "width": CONTEXT_DIM, "heads": 2, "layers": 3, "embed_dim": CONTEXT_DIM},
}
#: SD 2.x's text_encoder/config.json at tiny widths: OpenCLIP converted by diffusers, gelu, and
#: one layer fewer than the OpenCLIP tower (diffusers drops the last; SD 2.x uses the penultimate).
CLIP_TEXT_V2 = {**CLIP_TEXT_V1, "hidden_act": "gelu", "num_hidden_layers": 2}


def latent_diffusion_config(unet: dict, text: dict, ckpt_path: Path | None) -> dict:
    """A LatentDiffusion config of vico-tiny.yaml's kind with the given networks."""
    config = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "vico-tiny.yaml").model)
    config["params"].update(
        unet_config=copy.deepcopy(unet),
        first_stage_config=copy.deepcopy(VAE),
        cond_stage_config=copy.deepcopy(text),
        ckpt_path=None if ckpt_path is None else str(ckpt_path),
    )
    return config


# ------------------------------------------------------------------------ helpers
@torch.no_grad()
def randomise_(module: nn.Module, seed: int) -> nn.Module:
    """Give every parameter a unit-scale random value: weights of fan-in ``n`` ~ N(0, 1/n),
    norm scales 1 + N(0, 0.2^2), biases N(0, 0.2^2)."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters()):
        noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
        if p.ndim >= 2:
            value = noise * p[0].numel() ** -0.5
        elif name.endswith("weight"):
            value = 1 + 0.2 * noise
        else:
            value = 0.2 * noise
        p.copy_(value.to(p.dtype))
    return module


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape
    return float((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max())


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, rtol: float, what: str) -> None:
    assert theirs.abs().max() > 0.1, f"{what}: the reference output is (nearly) zero"
    error = relative_error(ours, theirs)
    print(f"{what}: relative error {error:.3g}")  # shown by pytest -s (or -rP)
    assert error <= rtol, f"{what}: relative error {error:.3g} > {rtol:g}"


@pytest.fixture
def groupnorm_keeps_float64(monkeypatch):
    """GroupNorm32 as it is, except that a float64 input stays float64 (it casts to float32)."""
    cast = GroupNorm32.forward

    def forward(self, x):
        return nn.GroupNorm.forward(self, x) if x.dtype == torch.float64 else cast(self, x)

    monkeypatch.setattr(GroupNorm32, "forward", forward)


def reference_networks(unet_kwargs: dict, text_config: dict, seed: int):
    """diffusers' UNet and VAE and transformers' text encoder, with random weights, float32."""
    torch.manual_seed(seed)
    unet = randomise_(UNet2DConditionModel(**unet_kwargs), seed + 1).eval()
    vae = randomise_(AutoencoderKL(**DIFFUSERS_VAE), seed + 2).eval()
    text = randomise_(CLIPTextModel(CLIPTextConfig(**text_config)), seed + 3).eval()
    return unet, vae, text


def write_diffusers_folder(folder: Path, unet, vae, text) -> Path:
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    return folder


class Reference:
    """diffusers' networks and ours holding the same weights, read from a diffusers folder."""

    def __init__(self, unet, vae, text, ours):
        self.unet, self.vae, self.text, self.ours = unet, vae, text, ours

    @property
    def our_unet(self):
        return self.ours.model.diffusion_model


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """SD v1 shapes; our model built with its diffusers folder as ``ckpt_path`` (the loader's path)."""
    unet, vae, text = reference_networks(DIFFUSERS_UNET_V1, CLIP_TEXT_V1, seed=10)
    folder = write_diffusers_folder(tmp_path_factory.mktemp("sd1") / "sd-v1", unet, vae, text)
    torch.manual_seed(0)
    ours = instantiate_from_config(latent_diffusion_config(UNET_V1, TEXT_V1, folder)).eval()
    return Reference(unet, vae, text, ours)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    """SD 2.x shapes; our model built with its diffusers folder as ``ckpt_path``: the UNet, the VAE
    and the OpenCLIP text encoder (told apart by its gelu) through the folder reader. What
    diffusers' SD 2.x text encoder lacks (its last layer, the projection) is unused at the
    penultimate layer, and stays as built."""
    unet, vae, text = reference_networks(DIFFUSERS_UNET_V2, CLIP_TEXT_V2, seed=20)
    folder = write_diffusers_folder(tmp_path_factory.mktemp("sd2") / "sd-v2", unet, vae, text)
    found = read_diffusers_folder(folder)
    assert not any(k.startswith("cond_stage_model.transformer.") for k in found)  # read as OpenCLIP, not CLIP
    torch.manual_seed(0)
    ours = instantiate_from_config(latent_diffusion_config(UNET_V2, TEXT_V2, folder)).eval()
    last = f"cond_stage_model.model.transformer.resblocks.{TEXT_V2['params']['layers'] - 1}."
    assert sorted(k for k in unused_base_keys(ours) if not k.startswith(last)) == [
        "cond_stage_model.model.logit_scale",
        "cond_stage_model.model.text_projection",
    ]
    return Reference(unet, vae, text, ours)


def unet_inputs(dtype: torch.dtype, seed: int = 5):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 8, 8, generator=generator, dtype=torch.float64).to(dtype)
    timesteps = torch.tensor([1, 417, 999])
    context = torch.randn(3, 77, CONTEXT_DIM, generator=generator, dtype=torch.float64).to(dtype)
    return x, timesteps, context


def compare_unets(ours: nn.Module, theirs: nn.Module, dtype: torch.dtype, rtol: float, what: str) -> torch.Tensor:
    ours, theirs = copy.deepcopy(ours).to(dtype), copy.deepcopy(theirs).to(dtype)
    x, timesteps, context = unet_inputs(dtype)
    with torch.no_grad():
        expected = theirs(x, timesteps, encoder_hidden_states=context).sample
        found = ours(x, timesteps, context)
    assert_close(found, expected, rtol, what)
    return found


# ------------------------------------------------------------------------ SD v1
def test_diffusers_version_is_the_pinned_one():
    pinned = next(
        line.split("==")[1].strip()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.startswith("diffusers==")
    )
    assert diffusers.__version__ == pinned


def test_sd1_unet_equals_diffusers_in_float64(sd1, groupnorm_keeps_float64):
    """Eps for three timesteps (1, 417, 999) and a random context: timestep embedding, ResBlocks,
    spatial transformers, resampling and skip connections, with the mapped weights."""
    compare_unets(sd1.our_unet, sd1.unet, torch.float64, FLOAT64_RTOL, "SD v1 UNet, float64")


def test_sd1_unet_equals_diffusers_in_float32(sd1):
    compare_unets(sd1.our_unet, sd1.unet, torch.float32, FLOAT32_RTOL, "SD v1 UNet, float32")


def test_attention_with_explicit_probabilities_equals_diffusers(sd1):
    """The reference stream's attention (``return_probs=True``: an explicit softmax, whose
    head-averaged probabilities give ViCo's S* map and Otsu mask) against diffusers' cross-attention
    and its ``get_attention_scores``. The UNet comparisons run the SDPA path only. Its logits are
    computed in float32 whatever the input, hence the float32 tolerance."""
    ours = sd1.our_unet.input_blocks[1][1].transformer_blocks[0].attn2
    theirs = sd1.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(2, 64, ours.to_q.in_features, generator=generator)
    context = torch.randn(2, 77, CONTEXT_DIM, generator=generator)
    with torch.no_grad():
        out, probs = ours(x, context, return_probs=True)
        expected = theirs(x, encoder_hidden_states=context)
        query, key = theirs.head_to_batch_dim(theirs.to_q(x)), theirs.head_to_batch_dim(theirs.to_k(context))
        expected_probs = theirs.get_attention_scores(query, key).reshape(2, theirs.heads, 64, 77).mean(1)
    assert_close(out, expected, FLOAT32_RTOL, "attention output with explicit probabilities")
    assert_close(probs, expected_probs, FLOAT32_RTOL, "head-averaged attention probabilities")


def test_sd1_vae_equals_diffusers(sd1):
    """Posterior mean and std of ``encode``, and ``decode``, in float64 and float32."""
    generator = torch.Generator().manual_seed(7)
    image = torch.rand(2, 3, 32, 32, generator=generator, dtype=torch.float64) * 2 - 1
    latent = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    for dtype, rtol in ((torch.float64, FLOAT64_RTOL), (torch.float32, FLOAT32_RTOL)):
        ours = copy.deepcopy(sd1.ours.first_stage_model).to(dtype)
        theirs = copy.deepcopy(sd1.vae).to(dtype)
        with torch.no_grad():
            posterior, expected = ours.encode(image.to(dtype)), theirs.encode(image.to(dtype)).latent_dist
            decoded, expected_decoded = ours.decode(latent.to(dtype)), theirs.decode(latent.to(dtype)).sample
        assert_close(posterior.mean, expected.mean, rtol, f"VAE posterior mean, {dtype}")
        assert_close(posterior.std, expected.std, rtol, f"VAE posterior std, {dtype}")
        assert_close(decoded, expected_decoded, rtol, f"VAE decode, {dtype}")


def sample_tokens(encoder) -> torch.Tensor:
    """Two tokenised prompts of 77 ids (padded as the encoder pads)."""
    return encoder.tokenize(["a photo of a monster toy on a beach", "an oil painting of a cat"]).cpu()


def test_sd1_text_encoder_equals_transformers(sd1):
    """SD v1 conditions on the last layer's output after the final layer norm (last_hidden_state)."""
    tokens = sample_tokens(sd1.ours.cond_stage_model)
    for dtype, rtol in ((torch.float64, FLOAT64_RTOL), (torch.float32, FLOAT32_RTOL)):
        ours = copy.deepcopy(sd1.ours.cond_stage_model).to(dtype)
        theirs = copy.deepcopy(sd1.text).to(dtype)
        with torch.no_grad():
            assert_close(ours(tokens), theirs(tokens).last_hidden_state, rtol, f"SD v1 text encoder, {dtype}")


# ------------------------------------------------------------------------ SD 2.x
def test_sd2_unet_equals_diffusers_in_float64(sd2, groupnorm_keeps_float64):
    """Linear proj_in/proj_out and heads of 16 channels (SD 2.x: 64), per level as diffusers lists them."""
    compare_unets(sd2.our_unet, sd2.unet, torch.float64, FLOAT64_RTOL, "SD 2.x UNet, float64")


def test_sd2_unet_equals_diffusers_in_float32(sd2):
    compare_unets(sd2.our_unet, sd2.unet, torch.float32, FLOAT32_RTOL, "SD 2.x UNet, float32")


def test_sd2_text_encoder_equals_diffusers_conversion(sd2):
    """Our OpenCLIP tower at the penultimate layer (then ln_final) is diffusers' SD 2.x text encoder:
    a CLIPTextModel with gelu, one layer fewer, whose last_hidden_state the pipelines use."""
    tokens = sample_tokens(sd2.ours.cond_stage_model)
    assert tokens[0, -1] == 0  # SD 2.x pads with 0, as diffusers' SD 2.x tokenizer ("!")
    for dtype, rtol in ((torch.float64, FLOAT64_RTOL), (torch.float32, FLOAT32_RTOL)):
        ours = copy.deepcopy(sd2.ours.cond_stage_model).to(dtype)
        theirs = copy.deepcopy(sd2.text).to(dtype)
        with torch.no_grad():
            assert_close(ours(tokens), theirs(tokens).last_hidden_state, rtol, f"SD 2.x text encoder, {dtype}")


def test_v_prediction_equals_diffusers_ddim_scheduler(sd2):
    """Our v-parameterisation (training target, eps and x0 from v) and a DDIM step of a v-model
    against ``DDIMScheduler(prediction_type="v_prediction")`` with SD's schedule."""
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    # diffusers builds the schedule in float32, we in float64
    assert_close(sd2.ours.alphas_cumprod.float(), scheduler.alphas_cumprod, 1e-6, "alphas_cumprod")
    alphas_cumprod = scheduler.alphas_cumprod
    generator = torch.Generator().manual_seed(8)
    x_start, noise, v = (torch.randn(2, 4, 8, 8, generator=generator) for _ in range(3))
    t = torch.tensor([20, 700])
    assert_close(v_target(x_start, noise, alphas_cumprod[t]), scheduler.get_velocity(x_start, noise, t), 1e-6, "v target")

    scheduler.set_timesteps(10)
    schedule = DDIMSchedule.from_model(sd2.ours, 10, eta=0.0, device=torch.device("cpu"))
    assert schedule.timesteps.flip(0).tolist() == scheduler.timesteps.tolist()
    x_t = torch.randn(2, 4, 8, 8, generator=generator)
    for index in (len(schedule) - 1, 4, 0):
        timestep = schedule.timesteps[index]
        step = scheduler.step(v, int(timestep), x_t)
        eps = to_eps("v", x_t, v, alpha_at(alphas_cumprod, timestep))
        x_prev, pred_x0 = schedule.step(x_t, eps, index)
        a = alphas_cumprod[timestep]
        assert_close(eps_from_v(x_t, v, a), eps, 0, "to_eps('v') is eps_from_v")
        assert_close(x0_from_v(x_t, v, a), step.pred_original_sample, 1e-6, f"x0 from v at t={int(timestep)}")
        assert_close(pred_x0, step.pred_original_sample, 1e-5, f"DDIM x0 of a v-model at t={int(timestep)}")
        assert_close(x_prev, step.prev_sample, 1e-5, f"DDIM step of a v-model at t={int(timestep)}")


# ------------------------------------------------------------------------ full-size SD 2.x layout
def test_published_sd2_diffusers_layout_maps_onto_the_sd2_checkpoint():
    """diffusers' SD 2.x UNet, VAE and text encoder at full size (on meta) map one to one onto the
    published SD 2.x checkpoint's keys and shapes, except what diffusers drops from the text tower."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(
            **{
                **DIFFUSERS_UNET_V2,
                "sample_size": 96,
                "block_out_channels": (320, 640, 1280, 1280),
                "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                "attention_head_dim": (5, 10, 20, 20),
                "cross_attention_dim": 1024,
            }
        )
        vae = AutoencoderKL(
            **{
                **DIFFUSERS_VAE,
                "block_out_channels": (128, 256, 512, 512),
                "down_block_types": ("DownEncoderBlock2D",) * 4,
                "up_block_types": ("UpDecoderBlock2D",) * 4,
                "sample_size": 768,
            }
        )
        text = CLIPTextModel(
            CLIPTextConfig(
                **{
                    **CLIP_TEXT_V2,
                    "hidden_size": 1024,
                    "intermediate_size": 4096,
                    "num_hidden_layers": 23,
                    "num_attention_heads": 16,
                }
            )
        )
    converted = {
        **diffusers_layout.unet_to_compvis(unet.state_dict()),
        **diffusers_layout.vae_to_compvis(vae.state_dict()),
        **diffusers_layout.open_clip_text_encoder_to_compvis(text.state_dict()),
    }
    converted = {k: tuple(v.shape) for k, v in converted.items() if not k.endswith("position_ids")}
    expected = read_manifest(DATA / "sd-v2-state-dict.tsv")
    expected = {k: v for k, v in expected.items() if k.startswith(("model.", "first_stage_model.", "cond_stage_model."))}
    dropped = {
        k for k in expected
        if k.startswith("cond_stage_model.model.transformer.resblocks.23.")
        or k in ("cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale")
    }
    assert sorted(set(converted) - set(expected)) == []
    assert sorted(set(expected) - set(converted)) == sorted(dropped)
    assert {k: (v, expected[k]) for k, v in converted.items() if v != expected[k]} == {}


def test_open_clip_mapping_leaves_an_incomplete_attention_to_the_key_check():
    """A layer without all three of q, k, v gets no ``in_proj`` (the key check then names it missing)."""
    layer = "text_model.encoder.layers.0.self_attn."
    converted = diffusers_layout.open_clip_text_encoder_to_compvis(
        {f"{layer}q_proj.weight": torch.zeros(2, 2), f"{layer}k_proj.weight": torch.ones(2, 2)}
    )
    block = f"{diffusers_layout.OPEN_CLIP_TEXT_PREFIX}transformer.resblocks.0.attn."
    assert sorted(converted) == [f"{block}k_proj.weight", f"{block}q_proj.weight"]


def test_sd2_folder_loads_onto_a_meta_built_model(sd2, tmp_path):
    """The low-memory path (built on ``meta``, weights assigned): nothing stays on meta, and the
    unused weights the folder lacks become zeros."""
    from ldm.models.base_checkpoint import load_base_checkpoint

    folder = write_diffusers_folder(tmp_path / "sd-v2", sd2.unet, sd2.vae, sd2.text)
    with torch.device("meta"):
        model = instantiate_from_config(latent_diffusion_config(UNET_V2, TEXT_V2, None))
    load_base_checkpoint(model, folder, assign=True)
    base = [name for name, tensor in model.state_dict().items() if tensor.is_meta and is_base_name(name)]
    assert base == []
    assert not model.cond_stage_model.model.text_projection.any()
    tokens = sample_tokens(model.cond_stage_model)
    with torch.no_grad():
        assert_close(model.cond_stage_model(tokens), sd2.ours.cond_stage_model(tokens), FLOAT32_RTOL, "meta-loaded text encoder")


def is_base_name(name: str) -> bool:
    return name.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model."))
