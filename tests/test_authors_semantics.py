"""What the authors' code computes, pinned on small hand-made tensors.

The invariance tests elsewhere (branch off == plain SD, shared reference stream == per-sample
stream) hold for many wrong implementations too. These pin the definitions themselves: the
normalisation epsilons of the pretrained networks, Otsu's threshold, the logits mask, the
regulariser, the reference stream's inputs, classifier-free guidance with the reference in both
branches, the DDIM update and the latent scale factor (q_sample and the loss of Eq. 7:
tests/test_latent_diffusion.py).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ldm.models.diffusion.sampling import DDIMSchedule, GuidedDenoiser, SamplingReference
from ldm.modules.attention import SpatialTransformer
from ldm.modules.vico import attention_regularizer, otsu_mask
from ldm.util import instantiate_from_config
from tests.test_vico_unet import TINY_LAYERS, inputs, make_reference, tiny_unet

ROOT = Path(__file__).resolve().parents[1]

# (module path pattern, class, epsilon) for every normalisation layer of SD v1 + ViCo. CompVis:
# ResBlocks and the UNet's output use ``normalization`` (GroupNorm32, eps 1e-5), the
# SpatialTransformer its own ``Normalize`` (eps 1e-6), the transformer blocks nn.LayerNorm
# (1e-5), the VAE ``Normalize`` (1e-6); the CLIP text model's layer_norm_eps is 1e-5.
NORM_RULES = [
    (r"model\.diffusion_model\..*\.(in_layers|out_layers)\.0", "GroupNorm32", 1e-5),
    (r"model\.diffusion_model\.out\.0", "GroupNorm32", 1e-5),
    (r"model\.diffusion_model\..*\.\d+\.norm", "GroupNorm32", 1e-6),
    (r"model\.diffusion_model\..*\.(transformer_blocks\.\d+|image_cross_attention)\.norm[123]", "LayerNorm", 1e-5),
    (r"first_stage_model\..*", "GroupNorm", 1e-6),
    (r"cond_stage_model\..*(layer_norm[12]|final_layer_norm)", "LayerNorm", 1e-5),
]


@pytest.fixture(scope="module")
def full_model():
    with torch.device("meta"):
        return instantiate_from_config(OmegaConf.load(ROOT / "configs" / "vico.yaml").model)


def test_every_norm_has_the_pretrained_epsilon(full_model):
    norms = {
        name: module
        for name, module in full_model.named_modules()
        if isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d, nn.InstanceNorm2d))
    }
    used = set()
    for name, module in norms.items():
        rules = [rule for rule in NORM_RULES if re.fullmatch(rule[0], name)]
        assert len(rules) == 1, (name, rules)
        _, class_name, eps = rules[0]
        assert (type(module).__name__, module.eps) == (class_name, eps), name
        used.add(rules[0])
    assert used == set(NORM_RULES)
    assert len(norms) == 61 + 48 + 12 + 52 + 25  # UNet GroupNorms, UNet LayerNorms, ViCo, VAE, CLIP


# ------------------------------------------------------------------------- Otsu
def test_otsu_keeps_patches_exactly_at_the_chosen_threshold():
    """Scores 2 + 3 * [0, .2, .4, .5, .6, 1]: normalised, the between-class variance is largest at
    threshold 0.5 (0.0625 against 0.06125 at 0.3-0.4 and 0.6), and the patch worth exactly 0.5
    is an object patch, as ``mask[mask > t] = 1`` leaves it at 0.5, which is true."""
    scores = torch.tensor([[2.0, 2.6, 3.2, 3.5, 3.8, 5.0]])
    assert otsu_mask(scores).tolist() == [[False, False, False, True, True, True]]


# ------------------------------------------------------- reference stream (Eq. 2)
def spatial_transformers(unet) -> list[SpatialTransformer]:
    return [m for m in unet.modules() if isinstance(m, SpatialTransformer)]


def layer_outputs(unet, *args) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """What every SpatialTransformer returns during ``unet(*args)``, in execution order."""
    outputs: list = []
    hooks = [m.register_forward_hook(lambda _m, _a, out: outputs.append(out)) for m in spatial_transformers(unet)]
    try:
        with torch.no_grad():
            unet(*args)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


@pytest.mark.parametrize("own_timesteps", [False, True])
def test_reference_features_are_the_frozen_unet_on_the_reference(own_timesteps):
    """c_I^l = eps^l(z_r, t, c_T): at every layer the reference stream holds what the plain UNet
    computes from the reference latent, with the reference's text and the step's timestep."""
    unet = tiny_unet()
    x, t, context = inputs(2)
    reference = make_reference(2, timesteps=torch.tensor([17, 940]) if own_timesteps else None)
    assert not torch.equal(reference.context, context)
    with_reference = layer_outputs(unet, x, t, context, reference)
    reference_t = reference.timesteps if own_timesteps else t
    plain = layer_outputs(unet, reference.latent, reference_t, reference.context)
    compared = 0
    for (_, reference_features), (features, _) in zip(with_reference, plain):
        if reference_features is not None:
            # fp32: the explicit softmax of patched layers against SDPA, on features of up to ~700
            torch.testing.assert_close(reference_features, features, atol=1e-6 * features.abs().max().item(), rtol=0)
            compared += 1
    assert compared == max(TINY_LAYERS) + 1  # up to the last patched layer


def test_image_attention_wiring():
    """Per patched layer: the S* column of the reference stream's text attention, its Otsu mask
    on the logits of the image attention, whose queries are the noisy stream after the text
    block and whose keys are the reference stream after it (Eq. 3, Sec. 3.3); the regulariser
    compares the S* and end-of-text columns (Eq. 6)."""
    unet = tiny_unet()
    x, t, context = inputs(2)
    reference = make_reference(2, compute_regularizer=True, record_attention=True)
    reference.placeholder_index = torch.tensor([3, 2])
    reference.eot_index = torch.tensor([5, 6])
    seen: dict[int, dict] = {}
    hooks = []
    for layer in spatial_transformers(unet):
        if not layer.has_image_attention:
            continue
        entry = seen.setdefault(layer.layer_index, {"text": [], "proj_out": []})
        text_block = layer.transformer_blocks[0]
        hooks.append(text_block.register_forward_hook(lambda _m, _a, out, e=entry: e["text"].append(out)))
        hooks.append(layer.proj_out.register_forward_pre_hook(lambda _m, args, e=entry: e["proj_out"].append(args[0])))
        hooks.append(
            layer.image_cross_attention.register_forward_hook(lambda _m, _a, out, e=entry: e.update(image_out=out))
        )
        hooks.append(
            layer.image_cross_attention.register_forward_pre_hook(
                lambda _m, args, kwargs, e=entry: e.update(image_args=args, image_kwargs=kwargs), with_kwargs=True
            )
        )
    with torch.no_grad():
        unet(x, t, context, reference)
    for hook in hooks:
        hook.remove()
    rows = torch.arange(2)
    assert sorted(seen) == TINY_LAYERS
    for record, term, layer in zip(reference.attention_records, reference.regularizer_terms, TINY_LAYERS):
        noisy_tokens, (reference_tokens, probs) = seen[layer]["text"]
        placeholder_map = probs[rows, :, reference.placeholder_index]
        eot_map = probs[rows, :, reference.eot_index]
        assert torch.equal(record.placeholder_map, placeholder_map)
        assert torch.equal(record.mask, otsu_mask(placeholder_map))
        assert torch.equal(term, attention_regularizer(placeholder_map, eot_map))
        kwargs = seen[layer]["image_kwargs"]
        assert torch.equal(seen[layer]["image_args"][0], noisy_tokens)
        assert torch.equal(kwargs["context"], reference_tokens)
        assert torch.equal(kwargs["mask"], record.mask) and kwargs["mask_mode"] == "logits"
        # n'_t = A_I(n_t, c_I) replaces the noisy tokens (the block's own residuals, no other);
        # proj_out runs on both streams stacked on the batch, the noisy samples first.
        noisy_proj_in = seen[layer]["proj_out"][0][: x.shape[0]]
        assert torch.equal(noisy_proj_in.flatten(2).transpose(1, 2), seen[layer]["image_out"])


# ------------------------------------------------------------ sampling (Sec. 3.4)
@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.load(ROOT / "configs" / "vico-tiny.yaml").model)
    return model.eval()


class SpyModel:
    """Stands in for ``apply_model``: records its inputs and answers 1 for rows whose context is
    all zeros (the unconditional branch here) and 3 for the others."""

    def __init__(self, model):
        self.model = model
        self.calls: list[dict] = []

    def __call__(self, x, t, context, reference=None):
        self.calls.append({"x": x, "t": t, "context": context, "reference": reference})
        conditional = context.flatten(1).abs().amax(1) > 0
        return torch.where(conditional, 3.0, 1.0).view(-1, 1, 1, 1).expand_as(x).clone()


@pytest.mark.parametrize("scale", [7.5, 1.0])
def test_guidance_formula_and_the_unconditional_branch_image_condition(tiny_model, monkeypatch, scale):
    """The authors' p_sample_ddim: x_in = [x, x], c_in = [uc, c], the reference in both branches
    with each branch's text in the reference stream and the prompt's S* / end-of-text columns, and
    e = e_uncond + scale * (e_cond - e_uncond); without guidance one conditional pass."""
    spy = SpyModel(tiny_model)
    monkeypatch.setattr(tiny_model, "apply_model", spy)
    tokens = tiny_model.tokenize(["a photo of * on the beach"])[0]  # "*" at 4, end-of-text at 8
    c, uc = torch.ones(1, 77, 32), torch.zeros(1, 77, 32)
    latents = torch.randn(2, 4, 16, 16)
    x = torch.randn(3, 4, 16, 16)
    denoiser = GuidedDenoiser(tiny_model, c, 3, scale, uc, SamplingReference(latents, tokens))
    eps = denoiser(x, torch.tensor(321))
    (call,) = spy.calls
    reference = call["reference"]
    branches = 2 if scale != 1.0 else 1
    assert torch.equal(call["x"], torch.cat([x] * branches)) and call["t"].tolist() == [321] * 3 * branches
    assert torch.equal(reference.latent, latents.repeat(branches, 1, 1, 1)) and reference.references_per_group == 2
    assert reference.timesteps.tolist() == [321] * 2 * branches
    assert reference.placeholder_index.tolist() == [4] * 2 * branches
    assert reference.eot_index.tolist() == [8] * 2 * branches
    if branches == 2:
        assert torch.equal(call["context"], torch.cat([uc.expand(3, -1, -1), c.expand(3, -1, -1)]))
        assert torch.equal(reference.context, torch.cat([uc, uc, c, c]))
        assert torch.equal(eps, torch.full_like(x, 1 + 7.5 * (3 - 1)))
    else:
        assert torch.equal(call["context"], c.expand(3, -1, -1)) and torch.equal(reference.context, torch.cat([c, c]))
        assert torch.equal(eps, torch.full_like(x, 3.0))


def test_ddim_update_on_hand_made_numbers():
    """x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z, x0 = (x - sqrt(1 - a) eps) / sqrt(a)."""
    schedule = DDIMSchedule(
        timesteps=torch.tensor([1, 501]),
        alphas=torch.tensor([0.64, 0.36]),
        alphas_prev=torch.tensor([0.9, 0.64]),
        sigmas=torch.tensor([0.0, 0.48]),
        sqrt_one_minus_alphas=torch.tensor([0.6, 0.8]),
        eta=1.0,
    )
    x, eps = torch.full((1, 1, 2, 2), 1.4), torch.ones(1, 1, 2, 2)
    z = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    x_prev, pred_x0 = schedule.step(x, eps, 1, torch.Generator().manual_seed(3))
    torch.testing.assert_close(pred_x0, torch.full_like(x, 1.0))  # (1.4 - 0.8) / 0.6
    torch.testing.assert_close(x_prev, 0.8 * 1.0 + 0.36 * 1.0 + 0.48 * z)  # sqrt(1 - .64 - .2304) = .36
    deterministic = DDIMSchedule(**{**schedule.__dict__, "sigmas": torch.zeros(2), "eta": 0.0})
    torch.testing.assert_close(deterministic.step(x, eps, 1)[0], torch.full_like(x, 0.8 + 0.6))


# ----------------------------------------------------------------- process, latents
def test_latents_are_scaled_by_the_scale_factor(tiny_model):
    """z = 0.18215 * E(x) for training photos (references: test_sampling.py::test_reference_latents_sample_or_mode,
    with the same scale factor); D(z / 0.18215) to decode."""
    assert tiny_model.scale_factor == 0.18215
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    posterior = tiny_model.encode_first_stage(images)
    sample = tiny_model.get_first_stage_encoding(images, torch.Generator().manual_seed(1))
    torch.testing.assert_close(sample, 0.18215 * posterior.sample(torch.Generator().manual_seed(1)))
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(tiny_model.decode_first_stage(z), tiny_model.first_stage_model.decode(z / 0.18215))
    tiny_model.cache_first_stage(images, with_flips=False)
    cached = tiny_model.cached_latent(torch.tensor([1]), torch.tensor([False]), torch.Generator().manual_seed(2))
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(cached, 0.18215 * (posterior.mean[1:] + posterior.std[1:] * noise))


def test_training_reference_stream_gets_the_caption_and_the_step_timestep(tiny_model, monkeypatch):
    """The authors' training step: the reference latent (a posterior sample of another photo) runs
    with the caption's text and the noisy stream's timestep; the regulariser uses the caption's
    S* and end-of-text columns."""
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    tiny_model.cache_first_stage(images, with_flips=False)
    captured = {}

    def p_losses(x_start, t, context, reference, noise=None):
        captured.update(x_start=x_start, t=t, context=context, reference=reference)
        return torch.zeros(()), {"loss": torch.zeros(()), "loss_simple": torch.zeros(()), "loss_reg": torch.zeros(())}

    monkeypatch.setattr(tiny_model, "p_losses", p_losses)
    monkeypatch.setattr(tiny_model, "step_generator", lambda batch_idx: torch.Generator().manual_seed(4))
    monkeypatch.setattr(tiny_model, "log_dict", lambda *args, **kwargs: None)
    monkeypatch.setattr(tiny_model, "log", lambda *args, **kwargs: None)
    captions = ["a photo of a *", "a rendering of the cool *"]
    batch = {
        "caption": captions,
        "image_index": torch.tensor([0, 2]),
        "flip": torch.tensor([False, False]),
        "reference_index": torch.tensor([1, 0]),
        "reference_flip": torch.tensor([False, False]),
    }
    with torch.no_grad():
        tiny_model.training_step(batch, 0)
    reference = captured["reference"]
    generator = torch.Generator().manual_seed(4)
    latent = tiny_model.cached_latent(batch["image_index"], batch["flip"], generator)
    reference_latent = tiny_model.cached_latent(batch["reference_index"], batch["reference_flip"], generator)
    assert torch.equal(captured["x_start"], latent) and torch.equal(reference.latent, reference_latent)
    with torch.no_grad():
        assert torch.equal(reference.context, tiny_model.get_learned_conditioning(captions))
    assert reference.context is captured["context"] and reference.timesteps is None  # = the noisy t
    assert reference.placeholder_index.tolist() == [5, 6] and reference.eot_index.tolist() == [6, 7]


