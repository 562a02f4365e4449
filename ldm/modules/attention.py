"""Attention blocks of the SD v1 / 2.x UNet, with ViCo's optional image-attention branch.

State-dict names follow CompVis (``attn1``, ``attn2``, ``ff.net``, ``norm1..3``, ``proj_in``,
``proj_out``) so SD checkpoints load by name; the branch is a whole
:class:`BasicTransformerBlock` named ``image_cross_attention``, as in the authors' release.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.modules.diffusionmodules.util import normalization, zero_module
from ldm.modules.vico import (
    MASK_MODES,
    AttentionRecord,
    MaskMode,
    ReferenceCondition,
    attention_regularizer,
    grid_mask,
    otsu_mask,
)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = False, dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out or dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` over ``context`` (self-attention without context).

    ``context`` may have fewer rows than ``x``: with ``G`` context rows and ``B = G * r``
    queries rows, rows ``g * r .. (g + 1) * r - 1`` of ``x`` share context row ``g``. Their
    queries are stacked into one sequence per group, so keys and values are projected once per
    group and never copied; the result equals attending row by row.
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = context_dim or query_dim
        self.scale = dim_head**-0.5
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        mask_mode: MaskMode = "logits",
        return_probs: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attend.

        Args:
            x: ``[B, N, query_dim]``.
            context: ``[G, T, context_dim]`` with ``B % G == 0``; ``None`` = self-attention.
            mask: ``[G, T]`` boolean, True where a key may be used.
            mask_mode: ``"logits"`` drops masked keys before the softmax (the authors' code);
                ``"probs"`` multiplies the probabilities by the mask after it (paper Eq. 5,
                computed as masking the values, which is the same product).
            return_probs: also return the head-averaged probabilities ``[B, N, T]``, computed
                explicitly; otherwise attention runs through SDPA.
        """
        context = x if context is None else context
        batch, n_query, _ = x.shape
        groups = context.shape[0]
        h = self.heads
        q = self.to_q(x).reshape(groups, -1, h, self.to_q.out_features // h).transpose(1, 2)
        k = self.to_k(context).unflatten(-1, (h, -1)).transpose(1, 2)
        v = self.to_v(context).unflatten(-1, (h, -1)).transpose(1, 2)

        attn_mask = None
        if mask is not None:
            if mask_mode == "logits":
                attn_mask = mask[:, None, None, :]
            elif mask_mode == "probs":
                v = v * mask[:, None, :, None].to(v.dtype)
            else:
                raise ValueError(f"mask_mode must be 'logits' or 'probs', got '{mask_mode}'")

        if return_probs:
            sim = (q @ k.transpose(-1, -2)).float() * self.scale
            if attn_mask is not None:
                sim = sim.masked_fill(~attn_mask, float("-inf"))
            probs = sim.softmax(dim=-1)
            out = probs.to(v.dtype) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)

        out = out.transpose(1, 2).reshape(batch, n_query, -1)
        out = self.to_out(out)
        if return_probs:
            return out, probs.mean(dim=1).reshape(batch, n_query, -1)
        return out


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention, gated feed-forward, each pre-normed and residual."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        gated_ff: bool = True,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.attn1 = CrossAttention(query_dim=dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(query_dim=dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.use_checkpoint = use_checkpoint

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        mask_mode: MaskMode = "logits",
        return_probs: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """See :meth:`CrossAttention.forward`; ``mask`` and ``return_probs`` concern ``attn2``."""
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, mask, mask_mode, return_probs, use_reentrant=False)
        return self._forward(x, context, mask, mask_mode, return_probs)

    def _forward(self, x, context, mask, mask_mode, return_probs):
        x = self.attn1(self.norm1(x)) + x
        attended = self.attn2(self.norm2(x), context=context, mask=mask, mask_mode=mask_mode, return_probs=return_probs)
        probs = None
        if return_probs:
            attended, probs = attended
        x = attended + x
        x = self.ff(self.norm3(x)) + x
        return (x, probs) if return_probs else x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on text.

    With ``image_attention=True`` it also owns ViCo's ``image_cross_attention`` block
    (Sec. 3.2): the reference stream goes through the same text transformer, the
    head-averaged attention of its patches to S* gives the Otsu mask (Sec. 3.3), and the
    noisy stream then attends to the reference tokens through the new block.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
        image_attention: bool = False,
        image_attention_mask: MaskMode = "logits",
        otsu_thresholds: int = 10,
        layer_index: int = 0,
        use_checkpoint: bool = False,
        use_linear: bool = False,
    ):
        super().__init__()
        if image_attention_mask not in MASK_MODES:
            raise ValueError(f"image_attention_mask must be one of {MASK_MODES}, got '{image_attention_mask}'")
        inner_dim = n_heads * d_head
        self.norm = normalization(in_channels, eps=1e-6)
        # SD v1: 1x1 convolutions; SD 2.x (use_linear_in_transformer): linear layers on the tokens
        self.use_linear = use_linear
        self.proj_in = nn.Linear(in_channels, inner_dim) if use_linear else nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            [
                BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim, use_checkpoint=use_checkpoint)
                for _ in range(depth)
            ]
        )
        self.image_cross_attention = (
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, use_checkpoint=use_checkpoint)
            if image_attention
            else None
        )
        self.proj_out = zero_module(
            nn.Linear(inner_dim, in_channels) if use_linear else nn.Conv2d(inner_dim, in_channels, kernel_size=1)
        )
        self.image_attention_mask = image_attention_mask
        self.otsu_thresholds = otsu_thresholds
        self.layer_index = layer_index

    @property
    def has_image_attention(self) -> bool:
        return self.image_cross_attention is not None

    def _to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_linear:
            return self.proj_in(rearrange(self.norm(x), "b c h w -> b (h w) c"))
        return rearrange(self.proj_in(self.norm(x)), "b c h w -> b (h w) c")

    def _from_tokens(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if self.use_linear:
            return rearrange(self.proj_out(tokens), "b (h w) c -> b c h w", h=height, w=width)
        return self.proj_out(rearrange(tokens, "b (h w) c -> b c h w", h=height, w=width))

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        reference_h: torch.Tensor | None = None,
        reference: ReferenceCondition | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the noisy stream ``x`` and, when given, the reference stream ``reference_h``.

        Returns:
            The new ``x`` and the new reference features (``None`` without a reference).
        """
        if reference_h is None:
            return self._text_transformer(x, context), None

        # The streams only meet in image attention; everything else runs on them stacked on the
        # batch (per-sample arithmetic, so equal to two calls up to float rounding, half the launches).
        height, width = x.shape[-2:]
        noisy_batch = x.shape[0]
        both = torch.cat([x, reference_h])
        if self.image_cross_attention is None:
            both = self._text_transformer(both, torch.cat([context, reference.context]))
            return both[:noisy_batch], both[noisy_batch:]
        both_tokens = self._to_tokens(both)
        tokens, reference_tokens = both_tokens[:noisy_batch], both_tokens[noisy_batch:]
        for block in self.transformer_blocks:
            tokens = block(tokens, context=context)
            reference_tokens, probs = block(reference_tokens, context=reference.context, return_probs=True)
            tokens = self._attend_reference(tokens, reference_tokens, probs, reference, height, width)
        both = self._from_tokens(torch.cat([tokens, reference_tokens]), height, width) + both
        return both[:noisy_batch], both[noisy_batch:]

    def _text_transformer(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """The plain SD layer: the transformer blocks on the tokens of ``x``, plus the residual."""
        height, width = x.shape[-2:]
        tokens = self._to_tokens(x)
        for block in self.transformer_blocks:
            tokens = block(tokens, context=context)
        return self._from_tokens(tokens, height, width) + x

    def _attend_reference(
        self,
        tokens: torch.Tensor,
        reference_tokens: torch.Tensor,
        probs: torch.Tensor,
        reference: ReferenceCondition,
        height: int,
        width: int,
    ) -> torch.Tensor:
        placeholder_map = reference.token_map(probs, reference.placeholder_index)
        if reference.compute_regularizer:
            eot_map = reference.token_map(probs, reference.eot_index)
            reference.regularizer_terms.append(attention_regularizer(placeholder_map, eot_map))
        mask = otsu_mask(placeholder_map.detach(), self.otsu_thresholds)
        if reference.record_attention:
            reference.attention_records.append(
                AttentionRecord(self.layer_index, placeholder_map.detach(), mask, height, width)
            )
        if reference.object_mask is not None:
            mask = grid_mask(reference.object_mask, height, width)
        groups = reference.num_groups
        grouped_tokens = reference_tokens.reshape(groups, -1, reference_tokens.shape[-1])
        grouped_mask = None if self.image_attention_mask == "none" else mask.reshape(groups, -1)
        return self.image_cross_attention(
            tokens, context=grouped_tokens, mask=grouped_mask, mask_mode=self.image_attention_mask
        )
