"""Stable Diffusion 2.x without weights: the published layout on meta, the OpenCLIP text encoder
and its tokenisation, v-prediction maths and sampling, and the tiny SD2-shaped config end to end."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from omegaconf import OmegaConf
from open_clip.transformer import TextTransformer
from PIL import Image

import main
import sample
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.ksamplers import DPMSolverPP2MSampler, EulerAncestralSampler
from ldm.models.diffusion.parameterization import eps_from_v, to_eps, v_target, x0_from_v
from ldm.models.diffusion.ksamplers import SigmaSchedule
from ldm.models.diffusion.sampling import DDIMSchedule, alpha_at
from ldm.modules.embedding_manager import EmbeddingManager
from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
from ldm.util import check_stored_config, instantiate_from_config
from tests.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
PHOTOS = ROOT / "data" / "monster_toy"
TINY = ROOT / "configs" / "vico-sd2-tiny.yaml"
#: decoder layers 8, 10, 12, 14 of the 16 attention layers (as SD v1)
PATCHED_BLOCKS = ("output_blocks.4.1.", "output_blocks.6.1.", "output_blocks.8.1.", "output_blocks.10.1.")


def build(path: Path):
    return instantiate_from_config(OmegaConf.load(path).model)


def _is_vico(key: str) -> bool:
    return ".image_cross_attention." in key or key.startswith("embedding_manager.")


# ------------------------------------------------------------------ full-size layout on meta
@pytest.mark.parametrize("config", ["vico-sd2.yaml", "vico-sd2-v.yaml"])
def test_full_sd2_model_layout_equals_the_published_checkpoint(config):
    with torch.device("meta"):
        model = build(ROOT / "configs" / config)
    found = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    base = {k: s for k, s in found.items() if not _is_vico(k)}
    expected = read_manifest(DATA / "sd-v2-state-dict.tsv")
    assert sorted(set(expected) - set(base)) == []
    assert sorted(set(base) - set(expected)) == []
    assert {k: (base[k], expected[k]) for k in expected if base[k] != expected[k]} == {}

    # ViCo's part: the SD v1 adapter's blocks, same names and shapes (64-dim heads keep the widths),
    # and a 1024-wide placeholder.
    adapter = read_manifest(DATA / "vico-adapter-state-dict.tsv")
    image_attention = {k: s for k, s in adapter.items() if ".image_cross_attention." in k}
    assert {k: s for k, s in found.items() if ".image_cross_attention." in k} == image_attention
    assert all(k.removeprefix("model.diffusion_model.").startswith(PATCHED_BLOCKS) for k in image_attention)
    assert found["embedding_manager.string_to_param_dict.*"] == (1, 1024)
    assert found["embedding_manager.initial_embeddings.*"] == (1, 1024)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 51_248_960 + 1024
    unet = model.model.diffusion_model
    assert unet.image_attention_layers == (8, 10, 12, 14)
    heads = {type(m).__name__: m.heads for m in unet.output_blocks[4][1].transformer_blocks[0].modules() if hasattr(m, "heads")}
    assert heads == {"CrossAttention": 20}  # 1280 / 64
    assert model.parameterization == ("v" if config.endswith("-v.yaml") else "eps")


# ------------------------------------------------------------------ text encoder
def _tiny_encoder(layer: str, layers: int = 3) -> FrozenOpenCLIPEmbedder:
    torch.manual_seed(0)
    encoder = FrozenOpenCLIPEmbedder(width=32, heads=2, layers=layers, embed_dim=16, layer=layer)
    with torch.no_grad():
        for p in encoder.parameters():
            p.normal_(0, 0.2)
    return encoder


def _open_clip_text(encoder: FrozenOpenCLIPEmbedder, layers: int) -> TextTransformer:
    """open_clip's own text tower holding the encoder's first ``layers`` layers."""
    reference = TextTransformer(
        context_length=77, vocab_size=49408, width=32, heads=2, layers=layers, output_dim=16, output_tokens=True
    )
    state = {
        k: v for k, v in encoder.model.state_dict().items()
        if k != "logit_scale" and not (k.startswith("transformer.resblocks.") and int(k.split(".")[2]) >= layers)
    }  # fmt: skip
    reference.load_state_dict(state, strict=True)
    return reference.eval()


PROMPTS = ["a photo of * on the beach", "", "word " * 100, "a 1:1 sketch, (of) a dog!"]


def test_tokenizer_equals_open_clip_tokenize():
    encoder = FrozenOpenCLIPEmbedder(width=32, heads=2, layers=2, embed_dim=16)
    tokens = encoder.tokenize(PROMPTS)
    assert torch.equal(tokens, open_clip.tokenize(PROMPTS))
    assert tokens[0, 9:].eq(0).all() and tokens[0, 8] == 49407  # end of text, then 0-padding


@torch.no_grad()
def test_open_clip_text_encoder_equals_open_clip():
    """``last``: open_clip's token outputs (all layers, ln_final); ``penultimate``: the same
    with one layer fewer, as Stability's embedder stops before the last resblock."""
    tokens = open_clip.tokenize(PROMPTS)
    last = _tiny_encoder("last")
    _, reference_tokens = _open_clip_text(last, layers=3)(tokens)
    torch.testing.assert_close(last.encode(tokens), reference_tokens, rtol=0, atol=1e-6)

    penultimate = _tiny_encoder("penultimate")
    _, reference_tokens = _open_clip_text(penultimate, layers=2)(tokens)
    torch.testing.assert_close(penultimate.encode(tokens), reference_tokens, rtol=0, atol=1e-6)
    assert not torch.allclose(penultimate.encode(tokens), last.encode(tokens))


def test_encoder_is_frozen_but_passes_gradients_to_the_placeholder():
    encoder = _tiny_encoder("penultimate")
    manager = EmbeddingManager(encoder, ["*"], ["dog"])
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training
    context = encoder.encode(["a photo of *"], embedding_manager=manager)
    context.sum().backward()
    assert manager.string_to_param_dict["*"].grad.abs().sum() > 0


@pytest.mark.parametrize("vectors", [1, 3])
def test_placeholder_and_end_of_text_positions_for_both_tokenizers(vectors):
    """OpenCLIP pads with 0, SD v1 with end-of-text: S* and end of text sit at the same columns."""
    sd1 = FrozenCLIPEmbedder(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)
    sd2 = FrozenOpenCLIPEmbedder(width=32, heads=2, layers=2, embed_dim=16)
    prompts = ["a photo of * on the beach", "a photo of a dog", "* and *"]
    results = []
    for encoder in (sd1, sd2):
        manager = EmbeddingManager(encoder, ["*"], ["dog"], num_vectors_per_token=vectors)
        results.append(manager.placeholder_positions(encoder.tokenize(prompts)))
    extra = vectors - 1
    # <sot> a photo of * on the beach <eot>; no placeholder: its index falls back to end of text;
    # <sot> * and * <eot>: the first occurrence, end of text shifted by both expansions.
    expected = (torch.tensor([4, 6, 1]), torch.tensor([8 + extra, 6, 4 + 2 * extra]), torch.tensor([True, False, True]))
    for found in results:
        for got, want in zip(found, expected):
            assert torch.equal(got, want)
    # The context really has the end of text there: the padding of the two tokenizers differs after it.
    tokens = sd2.tokenize(prompts)
    assert torch.equal(tokens[torch.arange(3), torch.tensor([8, 6, 4])], torch.full((3,), 49407))


def test_placeholder_never_matches_open_clip_padding(monkeypatch):
    """OpenCLIP pads with id 0, the word-internal '!': a one-token string is always word-final
    ('!' alone is 256), so a placeholder never matches the padding; an id that would is refused."""
    sd2 = FrozenOpenCLIPEmbedder(width=32, heads=2, layers=2, embed_dim=16)
    manager = EmbeddingManager(sd2, ["!"], ["dog"])
    tokens = sd2.tokenize(["a photo of !"])
    assert manager.string_to_token_dict["!"] == 256
    assert torch.equal(manager.placeholder_positions(tokens)[0], torch.tensor([4]))
    assert int((tokens == 256).sum()) == 1
    monkeypatch.setattr(sd2.tokenizer, "encode", lambda text: [0])
    with pytest.raises(ValueError, match="padding"):
        EmbeddingManager(sd2, ["!"], ["dog"])


# ------------------------------------------------------------------ v-prediction maths
def _schedule() -> torch.Tensor:
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return torch.tensor(np.cumprod(1 - betas))


def test_v_target_and_conversions_round_trip():
    torch.manual_seed(0)
    alphas = _schedule()
    t = torch.tensor([0, 1, 250, 500, 999])
    a = alphas[t].view(-1, 1, 1, 1)
    x0, eps = torch.randn(5, 4, 3, 3, dtype=torch.float64), torch.randn(5, 4, 3, 3, dtype=torch.float64)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = v_target(x0, eps, alphas[t])
    torch.testing.assert_close(v, a.sqrt() * eps - (1 - a).sqrt() * x0, rtol=0, atol=1e-14)
    torch.testing.assert_close(eps_from_v(x_t, v, alphas[t]), eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(x0_from_v(x_t, v, alphas[t]), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(to_eps("v", x_t, v, alphas[t]), eps, rtol=0, atol=1e-12)
    assert to_eps("eps", x_t, eps, alphas[t]) is eps
    # one noise level for the whole batch (a 0-dim alpha), as the samplers pass it
    torch.testing.assert_close(eps_from_v(x_t[2], v[2], alphas[250]), eps[2], rtol=0, atol=1e-12)
    # the pair (x_t, v) is a rotation of (x0, eps): norms are kept
    torch.testing.assert_close(x_t.square() + v.square(), x0.square() + eps.square(), rtol=0, atol=1e-12)


def test_ddim_step_with_v_equals_the_eps_step_on_the_converted_output():
    torch.manual_seed(0)
    model = _IdealDenoiser("v")
    schedule = DDIMSchedule.from_model(model, 10, 0.0, torch.device("cpu"))
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    for index in (9, 5, 0):
        a = schedule.alphas[index].double()
        v = torch.randn_like(x)
        x_prev, pred_x0 = schedule.step(x, eps_from_v(x, v, a), index)
        torch.testing.assert_close(pred_x0, x0_from_v(x, v, a).to(pred_x0.dtype), rtol=0, atol=1e-5)
        a_prev = schedule.alphas_prev[index].double()
        expected = a_prev.sqrt() * x0_from_v(x, v, a) + (1 - a_prev).sqrt() * eps_from_v(x, v, a)
        torch.testing.assert_close(x_prev.double(), expected, rtol=0, atol=1e-5)


def test_loss_target_is_v_for_a_v_model():
    torch.manual_seed(0)
    model = build(TINY)
    x0, noise = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    t = torch.tensor([10, 900])
    context = model.get_learned_conditioning(["a photo of *"] * 2)
    reference = model.reference_condition(torch.randn(2, 4, 16, 16), context, model.tokenize(["a photo of *"] * 2))
    a = model.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = a.sqrt() * noise - (1 - a).sqrt() * x0
    model.apply_model = lambda x, t, c, r=None: v  # a perfect v-model
    _, logs = model.p_losses(x0, t, context, reference, noise=noise)
    assert logs["loss_simple"] < 1e-12
    model.parameterization = "eps"  # the same output judged as noise is wrong
    _, logs = model.p_losses(x0, t, context, reference, noise=noise)
    assert logs["loss_simple"] > 0.1


# ------------------------------------------------------------------ v-prediction sampling
def test_alpha_at_fractional_timesteps_is_the_sigma_samplers_noise_level():
    """The v -> eps conversion of the guided call uses the noise level the sigma samplers sample
    at (log sigma interpolated between training timesteps), and alphas_cumprod[t] at integers."""
    model = _IdealDenoiser("v")
    alphas = model.alphas_cumprod
    t = torch.tensor(500)
    assert torch.equal(alpha_at(alphas, t), alphas[500])
    torch.testing.assert_close(alpha_at(alphas, t.float()), alphas[500], rtol=1e-6, atol=0)
    for spacing in ("uniform", "karras"):
        schedule = SigmaSchedule.from_model(model, 7, spacing, torch.device("cpu"))
        for timestep, sigma in zip(schedule.timesteps, schedule.sigmas[:-1]):
            torch.testing.assert_close(alpha_at(alphas, timestep), 1 / (1 + sigma**2), rtol=1e-5, atol=0)


class _IdealDenoiser(torch.nn.Module):
    """The exact denoiser of Gaussian data x0 ~ N(0, s^2), predicting noise or velocity.

    It knows the noise level of any (fractional) timestep through k-diffusion's log-sigma
    interpolation, so an eps-model and a v-model of the same denoiser must give the same samples
    whatever timesteps a sampler uses.
    """

    def __init__(self, parameterization: str, s: float = 0.7):
        super().__init__()
        self.parameterization = parameterization
        self.s2 = s * s
        self.register_buffer("alphas_cumprod", _schedule().float())
        self.log_sigmas = 0.5 * np.log((1 - _schedule().numpy()) / _schedule().numpy())

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    def apply_model(self, x, t, context, reference=None):
        log_sigma = np.interp(t.double().numpy(), np.arange(1000), self.log_sigmas)
        a = torch.tensor(1 / (1 + np.exp(2 * log_sigma)), dtype=x.dtype).view(-1, 1, 1, 1)
        denominator = a * self.s2 + 1 - a
        eps = (1 - a).sqrt() * x / denominator
        x0 = a.sqrt() * self.s2 * x / denominator
        return eps if self.parameterization == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0


@pytest.mark.parametrize(
    "make_sampler, eta",
    [(DDIMSampler, 0.0), (lambda m: DPMSolverPP2MSampler(m, "karras"), 0.0), (EulerAncestralSampler, 1.0)],
    ids=["ddim", "dpmpp_2m_karras", "euler_a"],
)
def test_samplers_give_the_same_samples_from_an_eps_and_a_v_model(make_sampler, eta):
    results = []
    for parameterization in ("eps", "v"):
        model = _IdealDenoiser(parameterization)
        conditioning = torch.zeros(1, 77, 8)
        samples, _ = make_sampler(model).sample(
            S=7, batch_size=2, shape=(4, 3, 3), conditioning=conditioning, eta=eta,  # fractional timesteps
            unconditional_guidance_scale=3.0, unconditional_conditioning=conditioning,
            generator=torch.Generator().manual_seed(0), verbose=False,
        )  # fmt: skip
        results.append(samples)
    assert results[0].abs().max() > 0.1
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-4)


# ------------------------------------------------------------------ tiny SD2-shaped model end to end
@pytest.fixture
def fresh_run_time(monkeypatch):
    monkeypatch.delenv(main.RUN_DIR_VARIABLE, raising=False)


def test_tiny_sd2_trains_and_samples(tmp_path, fresh_run_time):
    opt, overrides = main.parse_args(
        ["--base", str(TINY), "-t", "--logdir", str(tmp_path / "logs"), "-n", "sd2", "--data_root", str(PHOTOS),
         "lightning.trainer.max_steps=2", "lightning.callbacks.image_logger.params.batch_frequency=0",
         "lightning.trainer.enable_progress_bar=false"]
    )  # fmt: skip
    run = main.setup_run(opt, overrides)
    model = run.model
    assert model.parameterization == "v" and isinstance(model.cond_stage_model, FrozenOpenCLIPEmbedder)
    before = {k: v.clone() for k, v in model.trained_state_dict().items()}
    main.train(run)
    after = model.trained_state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)
    checkpoint = run.logdir / "checkpoints" / "last.ckpt"
    for sampler in ("ddim", "dpmpp_2m"):
        outdir = tmp_path / sampler
        argv = [f"--ckpt={checkpoint}", "--ref", str(PHOTOS / "00.jpg"), "--prompt", "a photo of * on the beach",
                "--n_samples", "1", "--ddim_steps", "4", "--sampler", sampler, "--outdir", str(outdir), "--seed", "3"]  # fmt: skip
        assert sample.main(argv) == 0
        (image,) = (np.asarray(Image.open(p)) for p in (outdir / "samples").glob("*.png"))
        assert image.shape == (64, 64, 3)


# ------------------------------------------------------------------ configs
@pytest.mark.parametrize("name", ["vico-sd2.yaml", "vico-sd2-v.yaml", "vico-sd2-tiny.yaml"])
def test_sd2_configs_pass_the_schema_and_the_stored_config_check(name):
    config = OmegaConf.load(ROOT / "configs" / name)
    main.check_schema(OmegaConf.to_container(config, resolve=True))
    check_stored_config(config, name)
    # the ablation overrides of configs/ablations apply to the SD 2.x configs as they are
    if name == "vico-sd2.yaml":
        for ablation in sorted((ROOT / "configs" / "ablations").glob("*.yaml")):
            merged = OmegaConf.merge(config, OmegaConf.load(ablation))
            main.check_schema(OmegaConf.to_container(merged, resolve=True))
