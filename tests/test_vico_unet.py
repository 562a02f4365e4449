"""The UNet's two streams, the attention kernels, Otsu and the regulariser, on tiny tensors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm.modules.attention import CrossAttention
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.evaluation.miniworld_metrics import downsample_mask
from ldm.modules.vico import ReferenceCondition, attention_regularizer, grid_mask, otsu_mask

TINY_UNET = dict(
    in_channels=4,
    model_channels=32,
    out_channels=4,
    num_res_blocks=1,
    attention_resolutions=[1, 2],
    channel_mult=[1, 2],
    num_heads=2,
    context_dim=16,
)
# Tiny layout: encoder attention 0-1, middle 2, decoder 3-6; "every other decoder layer" = 4, 6.
TINY_LAYERS = [4, 6]


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere (zero-initialised output convs would hide every branch)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


def tiny_unet(layers=TINY_LAYERS, seed: int = 0, **overrides) -> UNetModel:
    unet = UNetModel(**{**TINY_UNET, **overrides}, image_attention_layers=layers)
    randomize(unet, seed)
    return unet.eval()


def make_reference(batch: int, seed: int = 1, **kwargs) -> ReferenceCondition:
    g = torch.Generator().manual_seed(seed)
    return ReferenceCondition(
        latent=torch.randn(batch, 4, 8, 8, generator=g),
        context=torch.randn(batch, 7, 16, generator=g),
        placeholder_index=torch.full((batch,), 3),
        eot_index=torch.full((batch,), 5),
        **kwargs,
    )


def inputs(batch: int, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, 8, 8, generator=g),
        torch.randint(0, 1000, (batch,), generator=g),
        torch.randn(batch, 7, 16, generator=g),
    )


# ------------------------------------------------------------------ UNet streams
def test_branch_off_is_plain_sd_bit_exact():
    plain = tiny_unet(layers=[])
    vico = UNetModel(**TINY_UNET, image_attention_layers=TINY_LAYERS)
    missing, unexpected = vico.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(".image_cross_attention." in k for k in missing) and missing
    vico.eval()
    x, t, context = inputs(2)
    expected = plain(x, t, context)
    assert torch.equal(vico(x, t, context), expected)
    # A plain UNet ignores a reference entirely.
    assert torch.equal(plain(x, t, context, make_reference(2)), expected)


def test_reference_changes_the_prediction():
    unet = tiny_unet()
    x, t, context = inputs(2)
    assert not torch.allclose(unet(x, t, context, make_reference(2)), unet(x, t, context))


# ------------------------------------------------------------------ given object masks (true-mask switch)
def test_given_object_masks_equal_to_the_otsu_masks_change_nothing():
    """The true-mask path is the Otsu path when the masks agree, and a different mask changes the output."""
    unet = tiny_unet(layers=[4])
    x, t, context = inputs(2)
    recorded = make_reference(2, record_attention=True)
    expected = unet(x, t, context, recorded)
    (record,) = recorded.attention_records
    cells = record.mask.reshape(-1, record.height, record.width)
    pixels = cells.repeat_interleave(8 // record.height, 1).repeat_interleave(8 // record.width, 2)
    assert torch.equal(unet(x, t, context, make_reference(2, object_mask=pixels)), expected)
    assert not record.mask.all()
    everything = torch.ones_like(pixels)
    assert not torch.allclose(unet(x, t, context, make_reference(2, object_mask=everything)), expected)


def test_grid_mask_is_the_metrics_downsampling():
    masks = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.6
    for size in (1, 2, 4, 8, 16):
        expected = [downsample_mask(m.numpy(), size, size).reshape(-1) for m in masks]
        assert torch.equal(grid_mask(masks, size, size), torch.tensor(np.stack(expected)))
    with pytest.raises(ValueError, match="does not divide"):
        grid_mask(masks, 3, 3)


def test_regulariser_collected_once_per_patched_layer():
    unet = tiny_unet()
    x, t, context = inputs(3)
    reference = make_reference(3, compute_regularizer=True, record_attention=True)
    unet(x, t, context, reference)
    assert len(reference.regularizer_terms) == len(TINY_LAYERS)
    assert [r.layer for r in reference.attention_records] == TINY_LAYERS
    for record in reference.attention_records:
        assert record.mask.shape == (3, record.height * record.width)
        assert record.mask.dtype == torch.bool and record.mask.any(dim=-1).all()


def test_reference_stream_stops_after_last_patched_layer():
    unet = tiny_unet(layers=[4])
    batches: dict[int, list[int]] = {}

    def recorder(index):
        def hook(module, args, output):
            batches.setdefault(index, []).append(args[0].shape[0])

        return hook

    for i, block in enumerate(unet.output_blocks):
        block[0].register_forward_hook(recorder(i))
    x, t, context = inputs(2)
    unet(x, t, context, make_reference(2))
    # Layer 4 lives in output block 1: blocks 0-1 run both streams (stacked: 2 noisy + 2
    # reference samples in one call), the rest only the noisy one.
    assert batches == {0: [4], 1: [4], 2: [2], 3: [2]}


def test_bad_layer_index_is_a_clear_error():
    with pytest.raises(ValueError, match=r"image_attention_layers \[9\] do not exist: this UNet has 7"):
        UNetModel(**TINY_UNET, image_attention_layers=[9])


def test_bad_reference_batch_is_a_clear_error():
    unet = tiny_unet()
    x, t, context = inputs(3)
    with pytest.raises(ValueError, match="does not split"):
        unet(x, t, context, make_reference(2, timesteps=torch.zeros(2, dtype=torch.long)))


# --------------------------------------------------------------------- attention
def explicit_attention(attn: CrossAttention, x, context, key_mask=None, after_softmax=False):
    h = attn.heads
    q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
    q, k, v = (t.unflatten(-1, (h, -1)).transpose(1, 2) for t in (q, k, v))
    sim = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_mask is not None and not after_softmax:
        sim = sim.masked_fill(~key_mask[:, None, None, :], -torch.finfo(sim.dtype).max)
    probs = sim.softmax(-1)
    if key_mask is not None and after_softmax:
        probs = probs * key_mask[:, None, None, :]
    out = (probs @ v).transpose(1, 2).flatten(2)
    return attn.to_out(out), probs.mean(1)


@pytest.fixture
def attention():
    torch.manual_seed(0)
    return CrossAttention(query_dim=24, context_dim=12, heads=3, dim_head=8).eval()


@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_mask_modes(attention, mode):
    x, context = torch.randn(2, 10, 24), torch.randn(2, 6, 12)
    key_mask = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    expected, _ = explicit_attention(attention, x, context, key_mask, after_softmax=mode == "probs")
    torch.testing.assert_close(attention(x, context, mask=key_mask, mask_mode=mode), expected, atol=1e-5, rtol=0)
    out, probs = attention(x, context, mask=key_mask, mask_mode=mode, return_probs=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    if mode == "logits":
        # Masked keys get no weight and the rest renormalises.
        assert probs[~key_mask[:, None, :].expand_as(probs)].abs().max() == 0
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 10))
    else:
        # After the softmax the kept weights sum to less than one: nothing renormalises.
        kept = (probs * key_mask[:, None, :]).sum(-1)
        assert (kept < 1 - 1e-3).any()


def test_mask_logits_equals_attention_over_kept_keys_only(attention):
    x, context = torch.randn(1, 5, 24), torch.randn(1, 6, 12)
    keep = torch.tensor([[True, False, True, False, True, True]])
    reduced = attention(x, context[:, keep[0]])
    torch.testing.assert_close(attention(x, context, mask=keep), reduced, atol=1e-5, rtol=0)


def test_grouped_context_equals_per_row(attention):
    x = torch.randn(6, 10, 24)
    context = torch.randn(2, 6, 12)
    mask = torch.tensor([[1, 1, 0, 1, 0, 1], [1, 0, 0, 0, 1, 1]], dtype=torch.bool)
    grouped = attention(x, context, mask=mask)
    per_row = attention(x, context.repeat_interleave(3, 0), mask=mask.repeat_interleave(3, 0))
    torch.testing.assert_close(grouped, per_row, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------- Otsu
def otsu_reference(row: torch.Tensor, n: int = 10) -> torch.Tensor:
    """Per-row loop written after the authors' ``otsu`` (Python floats, strict '>' search)."""
    norm = (row - row.min()) / (row.max() - row.min())
    total = row.shape[0]
    best_g, best_t = 0.0, 0.0
    for t in range(n):
        low, high = norm[norm < t / n], norm[norm >= t / n]
        if len(low) == 0 or len(high) == 0:
            continue  # the original's NaN score never wins
        g = (len(low) / total) * (len(high) / total) * float(low.mean() - high.mean()) ** 2
        if g > best_g:
            best_g, best_t = g, t / n
    if torch.isnan(norm).any():  # constant row: the original's NaN values become True
        return torch.ones_like(row, dtype=torch.bool)
    out = norm.clone()
    out[norm < best_t] = 0
    out[norm > best_t] = 1
    return out.bool()


def test_otsu_matches_reference_on_random_maps():
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.rand(64, 256, generator=g),
        torch.rand(32, 64, generator=g) ** 4,  # skewed, like attention
        torch.softmax(torch.randn(32, 64, generator=g) * 3, -1),
    ]
    for batch in batches:
        mask = otsu_mask(batch)
        expected = torch.stack([otsu_reference(row) for row in batch])
        assert torch.equal(mask, expected)


def test_otsu_ties_constant_and_quantised_maps():
    maps = torch.tensor(
        [
            [0.0, 1.0, 0.0, 1.0, 0.0, 1.0],  # every threshold splits alike: first one wins
            [0.3, 0.3, 0.3, 0.3, 0.3, 0.3],  # constant: no NaN, keep everything
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # constant zero
            [0.0, 0.2, 0.2, 0.4, 0.4, 1.0],  # values exactly on candidate thresholds
            [1.0, 0.5, 0.5, 0.5, 0.5, 0.0],
        ]
    )
    mask = otsu_mask(maps)
    assert not torch.isnan(maps).any()
    expected = torch.stack([otsu_reference(row) for row in maps])
    assert torch.equal(mask, expected)
    assert mask[1].all() and mask[2].all()
    assert torch.equal(mask[0], maps[0].bool())
    # With a single candidate (threshold 0) the authors' ``mask[mask > 0] = 1`` leaves 0 at 0.
    assert otsu_mask(torch.tensor([[0.0, 0.5, 1.0]]), num_thresholds=1).tolist() == [[False, True, True]]


def test_otsu_half_precision_input_is_handled_in_float32():
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(8, 100, generator=g)
    assert torch.equal(otsu_mask(maps.half()), otsu_mask(maps.half().float()))


# ------------------------------------------------------------------ regulariser
def test_regulariser_matches_eq6():
    placeholder = torch.tensor([[1.0, 2.0, 4.0], [3.0, 3.0, 6.0]], requires_grad=True)
    eot = torch.tensor([[2.0, 2.0, 2.0], [1.0, 0.0, 2.0]], requires_grad=True)
    # Max-normalised: [[.25, .5, 1], [.5, .5, 1]] vs [[1, 1, 1], [.5, 0, 1]].
    expected = (0.75**2 + 0.5**2 + 0 + 0 + 0.5**2 + 0) / 6
    loss = attention_regularizer(placeholder, eot)
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert placeholder.grad is not None and placeholder.grad.abs().sum() > 0
    assert eot.grad is None  # the end-of-text map is the target


def test_regulariser_reaches_image_attention_inputs_only_through_placeholder_map():
    unet = tiny_unet()
    x, t, context = inputs(2)
    reference = make_reference(2, compute_regularizer=True)
    reference.context.requires_grad_(True)
    unet(x, t, context, reference)
    total = torch.stack(reference.regularizer_terms).sum()
    (grad,) = torch.autograd.grad(total, reference.context)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
