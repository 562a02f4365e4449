"""The SD v1 UNet (CompVis names) carrying ViCo's reference stream beside the noisy one."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import avg_pool_nd, conv_nd, linear, normalization, timestep_embedding, zero_module
from ldm.modules.vico import MaskMode, ReferenceCondition

DEFAULT_IMAGE_ATTENTION_LAYERS = (8, 10, 12, 14)
DEFAULT_CHANNEL_MULT = (1, 2, 4, 8)


def attention_layer_count(
    num_res_blocks: int, attention_resolutions: Sequence[int], channel_mult: Sequence[int] = DEFAULT_CHANNEL_MULT
) -> int:
    """How many SpatialTransformers a UNet of these settings has (what ``image_attention_layers``
    indexes): ``num_res_blocks`` per attention level in the encoder, one in the middle block,
    ``num_res_blocks + 1`` per attention level in the decoder (SD v1: 6 + 1 + 9)."""
    levels = sum(2**level in attention_resolutions for level in range(len(channel_mult)))
    return levels * num_res_blocks + 1 + levels * (num_res_blocks + 1)


def check_attention_layers(image_attention_layers: Sequence[int], count: int) -> tuple[int, ...]:
    """The sorted distinct layer indices; a ``ValueError`` (one line) for one a UNet of ``count``
    attention layers does not have, checked before anything is built."""
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in image_attention_layers):
        raise ValueError(f"image_attention_layers must list layer indices (whole numbers), got {list(image_attention_layers)}")
    wanted = tuple(sorted(set(image_attention_layers)))
    missing = [i for i in wanted if not 0 <= i < count]
    if missing:
        raise ValueError(
            f"image_attention_layers {missing} do not exist: this UNet has {count} attention layers (indices 0-{count - 1})"
        )
    return wanted


class TimestepBlock(nn.Module):
    """A module whose forward takes timestep embeddings as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """Runs its layers on the noisy stream and, when present, on the reference stream.

    Layers that treat every sample on its own (ResBlocks, convolutions, resampling) run once
    on both streams stacked along the batch: the same arithmetic as two calls, up to float
    rounding, with half the kernel launches. Spatial transformers, where the streams meet in
    image attention, get both and stack what they can themselves.
    """

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None = None,
        reference_h: torch.Tensor | None = None,
        reference_emb: torch.Tensor | None = None,
        reference: ReferenceCondition | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        for layer in self:
            if isinstance(layer, SpatialTransformer):
                x, reference_h = layer(x, context, reference_h, reference)
            elif reference_h is None:
                x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
            else:
                x, reference_h = run_stacked(layer, x, emb, reference_h, reference_emb)
        return x, reference_h


def run_stacked(
    layer: nn.Module, x: torch.Tensor, emb: torch.Tensor, reference_h: torch.Tensor, reference_emb: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One call of a per-sample ``layer`` on the noisy and the reference stream stacked on the batch."""
    stacked = torch.cat([x, reference_h])
    if isinstance(layer, TimestepBlock):
        stacked = layer(stacked, torch.cat([emb, reference_emb]))
    else:
        stacked = layer(stacked)
    return stacked[: x.shape[0]], stacked[x.shape[0] :]


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.conv = conv_nd(dims, channels, self.out_channels, 3, padding=padding) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return x if self.conv is None else self.conv(x)


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op = conv_nd(dims, channels, out_channels, 3, stride=2, padding=padding)
        else:
            if channels != out_channels:
                raise ValueError("average-pool downsampling cannot change the channel count")
            self.op = avg_pool_nd(dims, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding (CompVis layout, no up/down)."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        dims: int = 2,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), conv_nd(dims, channels, self.out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), linear(emb_channels, self.out_channels))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        self.skip_connection = (
            nn.Identity() if self.out_channels == channels else conv_nd(dims, channels, self.out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class UNetModel(nn.Module):
    """The SD v1 denoiser with optional ViCo image attention.

    Args:
        image_size: unused; kept so the original YAML files instantiate.
        in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
        dropout, channel_mult, conv_resample, dims, num_heads, num_head_channels,
        transformer_depth, context_dim: as in CompVis.
        use_checkpoint: gradient checkpointing of every ResBlock and transformer block.
        use_spatial_transformer, legacy: accepted for the original YAML files; SD v1 always
            uses spatial transformers (``use_spatial_transformer=False`` is an error) and
            ``legacy`` only concerned the transformer-free variant.
        image_attention_layers: global indices of the SpatialTransformers that get an
            ``image_cross_attention`` block, counted in execution order (SD v1: encoder 0-5,
            middle 6, decoder 7-15). The default is the authors' choice, every other decoder
            layer; an empty list gives plain SD v1.
        image_attention_mask: ``"logits"`` (authors' code), ``"probs"`` (paper Eq. 5) or
            ``"none"`` (no mask; ablation).
        otsu_thresholds: number of candidate thresholds of the Otsu search.
        use_linear_in_transformer: SD 2.x: the spatial transformers project in and out with
            linear layers instead of 1x1 convolutions (``num_head_channels: 64`` sets the heads).
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = DEFAULT_CHANNEL_MULT,
        conv_resample: bool = True,
        dims: int = 2,
        use_checkpoint: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        transformer_depth: int = 1,
        context_dim: int | None = None,
        image_attention_layers: Sequence[int] = DEFAULT_IMAGE_ATTENTION_LAYERS,
        image_attention_mask: MaskMode = "logits",
        otsu_thresholds: int = 10,
        image_size: int | None = None,
        use_spatial_transformer: bool = True,
        legacy: bool = False,
        use_linear_in_transformer: bool = False,
    ):
        super().__init__()
        if not use_spatial_transformer:
            raise ValueError("this UNet implements the SD v1 layout: use_spatial_transformer must be true")
        if context_dim is None:
            raise ValueError("context_dim is required (768 for SD v1's CLIP ViT-L/14)")
        if (num_heads == -1) == (num_head_channels == -1):
            raise ValueError("set exactly one of num_heads and num_head_channels")
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        wanted_layers = check_attention_layers(
            image_attention_layers, attention_layer_count(num_res_blocks, attention_resolutions, channel_mult)
        )
        transformer_count = 0

        def transformer(ch: int) -> SpatialTransformer:
            nonlocal transformer_count
            heads = num_heads if num_head_channels == -1 else ch // num_head_channels
            block = SpatialTransformer(
                ch,
                heads,
                ch // heads,
                depth=transformer_depth,
                dropout=dropout,
                context_dim=context_dim,
                image_attention=transformer_count in wanted_layers,
                image_attention_mask=image_attention_mask,
                otsu_thresholds=otsu_thresholds,
                layer_index=transformer_count,
                use_checkpoint=use_checkpoint,
                use_linear=use_linear_in_transformer,
            )
            transformer_count += 1
            return block

        def resblock(ch: int, out: int) -> ResBlock:
            return ResBlock(ch, time_embed_dim, dropout, out_channels=out, dims=dims, use_checkpoint=use_checkpoint)

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim), nn.SiLU(), linear(time_embed_dim, time_embed_dim)
        )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))]
        )
        input_block_chans = [model_channels]
        ch = model_channels
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, conv_resample, dims=dims)))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(resblock(ch, ch), transformer(ch), resblock(ch, ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [resblock(ch + input_block_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample, dims=dims))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1))
        )

        self.image_attention_layers = wanted_layers
        blocks = [*self.input_blocks, self.middle_block, *self.output_blocks]
        self._last_reference_block = max(
            (i for i, block in enumerate(blocks) if any(_has_image_attention(m) for m in block)),
            default=-1,
        )

    def image_attention_parameters(self) -> list[nn.Parameter]:
        """Parameters of every ``image_cross_attention`` block (ViCo's trainable part)."""
        return [p for name, p in self.named_parameters() if ".image_cross_attention." in name]

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        reference: ReferenceCondition | None = None,
    ) -> torch.Tensor:
        """Predict the noise of ``x`` at ``timesteps`` given the text ``context``.

        With a ``reference`` (and at least one image-attention layer) the clean reference
        latent runs through the same frozen layers beside ``x``, and only as far as the last
        layer whose reference features are read. Without one, this is plain SD v1.
        """
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        reference_h = reference_emb = None
        if reference is not None and self._last_reference_block >= 0:
            reference.validate(x.shape[0])
            reference_timesteps = timesteps if reference.timesteps is None else reference.timesteps
            reference_emb = self.time_embed(timestep_embedding(reference_timesteps, self.model_channels).to(x.dtype))
            reference_h = reference.latent.to(x.dtype)
        else:
            reference = None

        h = x
        skips: list[torch.Tensor] = []
        reference_skips: list[torch.Tensor | None] = []
        block_index = 0
        for module in self.input_blocks:
            h, reference_h = module(h, emb, context, reference_h, reference_emb, reference)
            reference_h = self._drop_after_last(block_index, reference_h)
            skips.append(h)
            reference_skips.append(reference_h)
            block_index += 1
        h, reference_h = self.middle_block(h, emb, context, reference_h, reference_emb, reference)
        reference_h = self._drop_after_last(block_index, reference_h)
        block_index += 1
        for module in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            reference_skip = reference_skips.pop()
            if reference_h is not None:
                reference_h = torch.cat([reference_h, reference_skip], dim=1)
            h, reference_h = module(h, emb, context, reference_h, reference_emb, reference)
            reference_h = self._drop_after_last(block_index, reference_h)
            block_index += 1
        return self.out(h)

    def _drop_after_last(self, block_index: int, reference_h: torch.Tensor | None) -> torch.Tensor | None:
        """Stop the reference stream once no later block reads it."""
        return reference_h if block_index < self._last_reference_block else None


def _has_image_attention(module: nn.Module) -> bool:
    return isinstance(module, SpatialTransformer) and module.has_image_attention
