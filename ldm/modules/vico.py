"""ViCo's additions to the UNet, kept in one place (paper Sec. 3.2-3.3).

Everything the method adds on top of plain Stable Diffusion that is not a weight lives here:

* :class:`ReferenceCondition`, the per-call carrier for the reference stream: the clean
  reference latent, the text context it attends to, where the placeholder S* and the
  end-of-text token sit in that context, and what the UNet collects on the way
  (regulariser terms of Eq. 6, attention maps for pictures);
* :func:`otsu_mask`, the batched Otsu binarisation of the S* attention map (Fig. 3);
* :func:`attention_regularizer`, Eq. 6.

Samples that share a reference (every sample of a sampling batch does) are described by
*groups*: the reference stream runs once per group and the noisy samples of group ``g`` are
``x[g * samples_per_group:(g + 1) * samples_per_group]``. During training every sample is its
own group.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

MaskMode = Literal["logits", "probs", "none"]
MASK_MODES: tuple[str, ...] = ("logits", "probs", "none")


@dataclass
class AttentionRecord:
    """The S* attention map and the mask derived from it in one patched layer."""

    layer: int
    placeholder_map: torch.Tensor
    mask: torch.Tensor
    height: int
    width: int


@dataclass
class ReferenceCondition:
    """Inputs and outputs of the reference stream for one UNet call.

    Attributes:
        latent: clean reference latents, ``[G * K, C, H, W]`` for G groups of K references.
        context: text context the reference stream attends to, ``[G * K, T, D]``.
        placeholder_index: position of S* in each row of ``context``, ``[G * K]``.
        eot_index: position of the end-of-text token in each row of ``context``, ``[G * K]``.
        timesteps: timesteps of the reference stream, ``[G * K]``; ``None`` means the noisy
            stream's timesteps (then ``G * K`` must equal the noisy batch).
        references_per_group: K; several references of one group are concatenated along the
            token axis in the image attention (paper, Appendix C).
        compute_regularizer: collect Eq. 6 in :attr:`regularizer_terms` (training).
        record_attention: collect :class:`AttentionRecord` s in :attr:`attention_records`.
        object_mask: ``[G * K, H, W]`` given object masks of the references (True or 1 on the
            object, any resolution that divides into every patched layer's grid). When set, the
            image attention is masked by them instead of by the Otsu mask of the S* map (the
            paper's Fig. 9 comparison with ground-truth masks); the records still hold the Otsu
            masks, so both can be scored against the truth.
    """

    latent: torch.Tensor
    context: torch.Tensor
    placeholder_index: torch.Tensor
    eot_index: torch.Tensor
    timesteps: torch.Tensor | None = None
    references_per_group: int = 1
    compute_regularizer: bool = False
    record_attention: bool = False
    object_mask: torch.Tensor | None = None
    regularizer_terms: list[torch.Tensor] = field(default_factory=list)
    attention_records: list[AttentionRecord] = field(default_factory=list)

    @property
    def num_groups(self) -> int:
        return self.latent.shape[0] // self.references_per_group

    def validate(self, batch_size: int) -> None:
        """Check shapes against the noisy batch before any work is done."""
        n = self.latent.shape[0]
        if n % self.references_per_group:
            raise ValueError(
                f"{n} reference latents do not split into groups of {self.references_per_group}"
            )
        if batch_size % self.num_groups:
            raise ValueError(
                f"noisy batch of {batch_size} does not split into {self.num_groups} reference groups"
            )
        names = ("context", "placeholder_index", "eot_index") + (("object_mask",) if self.object_mask is not None else ())
        for name in names:
            if getattr(self, name).shape[0] != n:
                raise ValueError(f"reference {name} has batch {getattr(self, name).shape[0]}, expected {n}")
        if self.timesteps is None and n != batch_size:
            raise ValueError("reference timesteps are required when references are shared between samples")

    def token_map(self, probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Pick one token's column from head-averaged attention probabilities.

        Args:
            probs: ``[N, P, T]`` attention of N reference rows over T context tokens.
            index: ``[N]`` token position per row.

        Returns:
            ``[N, P]``: how much each reference patch attends to that token.
        """
        return torch.take_along_dim(probs, index.view(-1, 1, 1), dim=2).squeeze(2)


def otsu_mask(attention_map: torch.Tensor, num_thresholds: int = 10) -> torch.Tensor:
    """Binarise per-row attention maps with Otsu's method over a fixed threshold grid.

    Follows the authors' code: each row is min-max normalised, the candidate thresholds are
    ``t / num_thresholds`` for ``t = 0 .. num_thresholds - 1``, the between-class variance
    ``w_low * w_high * (mean_low - mean_high) ** 2`` is maximised (the first maximum wins; a
    candidate with an empty class scores 0, and all-zero scores select threshold 0), and a
    patch is kept when its normalised value is at least the threshold and above 0. A
    constant row (nothing to separate) keeps every patch. Batched: no loop over rows, no
    host-device synchronisation.

    Args:
        attention_map: ``[N, P]`` non-negative scores.
        num_thresholds: number of candidate thresholds.

    Returns:
        ``[N, P]`` boolean mask, True for object patches.
    """
    scores = attention_map.float()
    low = scores.amin(dim=-1, keepdim=True)
    span = scores.amax(dim=-1, keepdim=True) - low
    constant = span <= 0
    normalised = (scores - low) / torch.where(constant, torch.ones_like(span), span)

    thresholds = torch.arange(num_thresholds, device=scores.device, dtype=torch.float32) / num_thresholds
    below = normalised.unsqueeze(1) < thresholds.view(1, -1, 1)  # [N, T, P]
    num_patches = scores.shape[-1]
    n_low = below.sum(-1)
    n_high = num_patches - n_low
    sum_low = (normalised.unsqueeze(1) * below).sum(-1)
    sum_high = normalised.sum(-1, keepdim=True) - sum_low
    mean_low = sum_low / n_low.clamp(min=1)
    mean_high = sum_high / n_high.clamp(min=1)
    between = (n_low / num_patches) * (n_high / num_patches) * (mean_low - mean_high) ** 2
    between = torch.where((n_low > 0) & (n_high > 0), between, torch.zeros_like(between))

    threshold = thresholds[between.argmax(dim=-1)].unsqueeze(-1)
    mask = (normalised >= threshold) & (normalised > 0)
    return mask | constant


def grid_mask(object_mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel masks ``[N, H, W]`` on a ``height x width`` grid of equal cells, flattened to
    ``[N, height * width]``: a cell is object when at least half of its pixels are (an area
    average, as :func:`ldm.evaluation.miniworld_metrics.downsample_mask` scores masks)."""
    rows, columns = object_mask.shape[-2:]
    if rows % height or columns % width:
        raise ValueError(f"a {rows}x{columns} object mask does not divide into a {height}x{width} grid")
    cells = object_mask.float().reshape(-1, height, rows // height, width, columns // width)
    return (cells.mean(dim=(2, 4)) >= 0.5).flatten(1)


def attention_regularizer(placeholder_map: torch.Tensor, eot_map: torch.Tensor) -> torch.Tensor:
    """Eq. 6: pull the S* map towards the end-of-text map, each divided by its maximum.

    As in the authors' code the squared difference is averaged over rows and patches (the
    paper writes a squared L2 norm) and the end-of-text map is a fixed target (no gradient).

    Args:
        placeholder_map: ``[N, P]`` attention of the reference patches to S*.
        eot_map: ``[N, P]`` attention of the reference patches to end-of-text.
    """
    target = eot_map.detach()
    return F.mse_loss(
        placeholder_map / placeholder_map.amax(dim=-1, keepdim=True),
        target / target.amax(dim=-1, keepdim=True),
    )
