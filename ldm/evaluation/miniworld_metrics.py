"""Metrics of the miniature world, where every picture's ground truth is known (no downloaded network).

* **object fidelity** (what Table 2's image metrics stand for, measured exactly): the fraction
  of generated pictures in which the world classifier finds every attribute of the concept's
  object (shape, colour and pattern of each half, split, notch), and the accuracy of each
  attribute alone;
* **feature similarity** (the I_DINO analogue): mean cosine similarity between the
  classifier's feature vectors of every (generated, real photo) pair;
* **prompt fidelity** (the T_CLIP analogue): the fraction of generated pictures whose
  predicted background is the scene the prompt asks for;
* **mask IoU**: intersection over union between the Otsu mask of the S* attention on the
  reference photo (one per patched layer) and the renderer's true object mask of that photo,
  downsampled to the layer's grid.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ldm.evaluation.metrics import pairwise_image_similarity
from ldm.evaluation.miniworld import OBJECT_HEADS, UNDEFINED
from ldm.modules.vico import AttentionRecord


@dataclass(frozen=True)
class ObjectFidelity:
    """``fidelity``: fraction of pictures with every defined attribute right; ``accuracy``: per attribute."""

    fidelity: float
    accuracy: dict[str, float]


def object_fidelity(predicted: Mapping[str, np.ndarray], target: Mapping[str, int]) -> ObjectFidelity:
    """Compare predicted object attributes (``int [N]`` per head) with the concept's.

    Attributes the concept leaves undefined (:data:`~ldm.evaluation.miniworld.UNDEFINED`, e.g.
    the split of an object whose halves look alike) are not scored.
    """
    heads = [head for head in OBJECT_HEADS if target[head] != UNDEFINED]
    count = len(predicted[heads[0]])
    if count == 0:
        raise ValueError("no pictures to score")
    right = {head: np.asarray(predicted[head]) == target[head] for head in heads}
    every = np.logical_and.reduce([right[head] for head in heads])
    return ObjectFidelity(float(every.mean()), {head: float(right[head].mean()) for head in heads})


def feature_similarity(generated: Tensor, real: Tensor) -> float:
    """Mean cosine similarity of every (generated, real) pair of feature vectors ``[N, D]``, ``[M, D]``."""
    return pairwise_image_similarity(generated, real)


def prompt_fidelity(predicted_scenes: Sequence[int] | np.ndarray, prompt_scenes: Sequence[int] | np.ndarray) -> float:
    """Fraction of pictures whose predicted scene index is the one their prompt names."""
    predicted, wanted = np.asarray(predicted_scenes), np.asarray(prompt_scenes)
    if predicted.shape != wanted.shape or predicted.size == 0:
        raise ValueError(f"need one prompt scene per picture, got {predicted.shape} and {wanted.shape}")
    return float((predicted == wanted).mean())


def downsample_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A ``bool [H, W]`` pixel mask on a ``height x width`` grid of equal cells: a cell is object
    when at least half of its pixels are (area average, like the latent grid of a patched layer)."""
    mask = np.asarray(mask, dtype=bool)
    rows, columns = mask.shape
    if rows % height or columns % width:
        raise ValueError(f"a {rows}x{columns} mask does not divide into a {height}x{width} grid")
    cells = mask.reshape(height, rows // height, width, columns // width)
    return cells.mean(axis=(1, 3)) >= 0.5


def mask_iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two boolean masks of one shape (1 when both are empty)."""
    predicted, truth = np.asarray(predicted, dtype=bool), np.asarray(truth, dtype=bool)
    if predicted.shape != truth.shape:
        raise ValueError(f"masks of shapes {predicted.shape} and {truth.shape}")
    union = np.logical_or(predicted, truth).sum()
    return float(np.logical_and(predicted, truth).sum() / union) if union else 1.0


def attention_mask_iou(records: Sequence[AttentionRecord], true_masks: Sequence[np.ndarray]) -> dict[int, float]:
    """Per patched layer: the IoU of its Otsu mask with the true mask, averaged over the references.

    Args:
        records: the attention records of one UNet call (one per patched layer), each with one
            mask row per reference photo.
        true_masks: the renderer's ``bool [H, W]`` object mask of each reference photo.
    """
    ious: dict[int, float] = {}
    for record in records:
        masks = record.mask.reshape(-1, record.height, record.width)
        if masks.shape[0] != len(true_masks):
            raise ValueError(f"layer {record.layer} has {masks.shape[0]} reference masks for {len(true_masks)} true masks")
        scores = [
            mask_iou(mask.cpu().numpy(), downsample_mask(truth, record.height, record.width))
            for mask, truth in zip(masks, true_masks)
        ]
        ious[record.layer] = float(np.mean(scores))
    return ious


def all_patches_iou(true_mask: np.ndarray, height: int, width: int) -> float:
    """The mask IoU of a mask that keeps every patch: the object's share of the grid, the level
    a mask that separates nothing reaches."""
    truth = downsample_mask(true_mask, height, width)
    return mask_iou(np.ones_like(truth), truth)


def mean_dicts(rows: Sequence[Mapping[int, float]]) -> dict[int, float]:
    """Key-wise mean of dicts with the same keys (per-layer IoUs over prompts and timesteps)."""
    keys = sorted({key for row in rows for key in row})
    return {key: float(np.mean([row[key] for row in rows if key in row])) for key in keys}


