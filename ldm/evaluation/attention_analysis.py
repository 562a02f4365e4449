"""Where S* attends in the *generated* image (paper Figs. 20-21), and a mask of the generated object.

The method's own masks are read from the reference stream (``AttentionRecord``); these tools
look at the noisy stream instead: the text cross-attention of every SpatialTransformer, read
through forward hooks (nothing in the model changes), averaged over the sampling steps as the
paper's Fig. 20 averages it. On the miniature world the generated object's mask has no ground
truth; :func:`colour_mask` is the documented proxy (pixels in the concept's colours), and
:func:`proxy_quality` measures that proxy against the renderer's true masks.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor, nn

from ldm.data.miniworld import COLOURS, ink_colour
from ldm.modules.attention import SpatialTransformer


class TokenAttentionRecorder:
    """Collects, per SpatialTransformer, the head-averaged attention of the generated image's
    patches to one context token, summed over the UNet calls of a sampling run.

    Args:
        unet: the UNet (``model.model.diffusion_model``).
        token_index: the token's position in the prompt (S*).
        n_samples: samples per batch (``B``); with ``guided`` the UNet sees ``[unconditional B,
            conditional B]`` noisy rows first, then the reference rows (ViCo). Only the
            conditional noisy rows are recorded.
        guided: whether the sampler runs classifier-free guidance (two branches).
    """

    def __init__(self, unet: nn.Module, token_index: int, n_samples: int, guided: bool = True):
        self.token_index = token_index
        self.rows = slice(n_samples, 2 * n_samples) if guided else slice(0, n_samples)
        self.noisy_rows = self.rows.stop
        self.layers = [(index, module) for index, module in enumerate(m for m in unet.modules() if isinstance(m, SpatialTransformer))]
        self.sums: dict[int, Tensor] = defaultdict(lambda: torch.zeros(()))
        self.calls: dict[int, int] = defaultdict(int)
        self.grid: dict[int, tuple[int, int]] = {}

    @contextmanager
    def recording(self) -> Iterator[TokenAttentionRecorder]:
        handles = []
        for index, transformer in self.layers:
            handles.append(transformer.register_forward_pre_hook(self._grid_hook(index)))
            for block in transformer.transformer_blocks:
                handles.append(block.attn2.register_forward_hook(self._attention_hook(index), with_kwargs=True))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _grid_hook(self, index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            self.grid[index] = tuple(args[0].shape[-2:])

        return hook

    def _attention_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
            x = args[0]
            context = kwargs.get("context", args[1] if len(args) > 1 else None)
            if context is None or x.shape[0] < self.noisy_rows or context.shape[0] != x.shape[0]:
                return  # a reference-stream call, or a call without text
            x, context = x[self.rows], context[self.rows]
            heads = module.heads
            q = module.to_q(x).unflatten(-1, (heads, -1)).transpose(1, 2)
            k = module.to_k(context).unflatten(-1, (heads, -1)).transpose(1, 2)
            probs = ((q @ k.transpose(-1, -2)).float() * module.scale).softmax(-1).mean(1)  # [B, P, T]
            self.sums[index] = self.sums[index] + probs[..., self.token_index].detach().cpu()
            self.calls[index] += 1

        return hook

    def maps(self) -> dict[int, Tensor]:
        """Per layer, the mean over calls of the token's map, ``[B, h, w]``."""
        return {
            index: (self.sums[index] / self.calls[index]).reshape(-1, *self.grid[index])
            for index in sorted(self.calls)
        }


def upsampled_mean(maps: dict[int, Tensor], size: int) -> Tensor:
    """The layers' maps resized to ``size`` and averaged (the paper's Fig. 20 averages over
    steps and layers), then min-max normalised per sample: ``[B, size, size]`` in [0, 1]."""
    resized = [torch.nn.functional.interpolate(m[:, None].float(), size=(size, size), mode="bilinear")[:, 0] for m in maps.values()]
    mean = torch.stack(resized).mean(0)
    low = mean.amin(dim=(-2, -1), keepdim=True)
    return (mean - low) / (mean.amax(dim=(-2, -1), keepdim=True) - low).clamp(min=1e-12)


def colour_mask(image: np.ndarray, colours: Sequence[str], tolerance: float = 0.18) -> np.ndarray:
    """Pixels of ``image`` (``uint8 [H, W, 3]``) within ``tolerance`` (RGB distance, colours in
    [0, 1]) of one of the world's ``colours`` or their pattern ink: the proxy of the generated
    object's mask."""
    pixels = image.astype(np.float32) / 255.0
    palette = np.array([c for name in colours for c in (COLOURS[name], ink_colour(name))], dtype=np.float32)
    distance = np.linalg.norm(pixels[:, :, None, :] - palette[None, None], axis=-1).min(-1)
    return distance <= tolerance


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def proxy_quality(images: np.ndarray, true_masks: np.ndarray, colours: Sequence[str]) -> float:
    """Mean IoU of :func:`colour_mask` with the renderer's true masks over ``images``."""
    return float(np.mean([mask_iou(colour_mask(image, colours), mask) for image, mask in zip(images, true_masks)]))
