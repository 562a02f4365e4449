"""What a miniworld base model draws from words alone, read by the world classifier.

Two kinds of prompt, each sampled with its own seeded generator so that two base models
are compared on the same starting noise:

* **single-part** ("a photo of a red circle on the beach"): is the named shape, colour and
  scene what the classifier reads?
* **composite** ("a photo of an orange and teal ring on the beach"): are both named colours
  there (in either order: a caption does not say which half is which) and is the shape right?
  The first one is the look of the demo concept ``sunset_ring``, which pretraining never draws.

``python scripts/miniworld.py probe`` prints the table; ``tests/test_evaluate_miniworld.py``
checks the shipped base against a random network with the single-part part.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ldm.data.miniworld import SCENES, with_article
from ldm.evaluation.miniworld import HEADS, WorldClassifier, classify
from ldm.models.diffusion import sampling
from ldm.models.diffusion.ddim import DDIMSampler

# (colour, shape, scene): one prompt per shape, every scene once.
SINGLE_PART_PROMPTS: tuple[tuple[str, str, str], ...] = (
    ("red", "circle", "beach"), ("blue", "square", "snow"), ("yellow", "star", "night"),
    ("green", "heart", "brick"), ("pink", "cross", "grass"), ("white", "triangle", "water"),
    ("orange", "hexagon", "desert"), ("purple", "ring", "studio"),
)  # fmt: skip
# (first colour, second colour, shape, scene); the first is the reserved look of sunset_ring.
COMPOSITE_PROMPTS: tuple[tuple[str, str, str, str], ...] = (
    ("orange", "teal", "ring", "beach"), ("pink", "yellow", "star", "snow"), ("red", "black", "cross", "grass"),
    ("green", "purple", "square", "night"), ("blue", "white", "heart", "beach"), ("orange", "blue", "circle", "snow"),
)  # fmt: skip
SINGLE_PART_HEADS = ("shape", "colour_0", "scene")


def single_part_prompt(colour: str, shape: str, scene: str) -> str:
    return f"a photo of {with_article(f'{colour} {shape}')} {SCENES[scene]}"


def composite_prompt(first: str, second: str, shape: str, scene: str) -> str:
    return f"a photo of {with_article(f'{first} and {second} {shape}')} {SCENES[scene]}"


@dataclass
class ProbeResult:
    """Accuracies per prompt, and the decoded samples (one row per prompt, in [-1, 1])."""

    single_part: list[dict[str, float]] = field(default_factory=list)
    composite: list[dict[str, float]] = field(default_factory=list)
    samples: list[Tensor] = field(default_factory=list)

    def single_part_accuracy(self) -> dict[str, float]:
        """Mean over prompts of each head's accuracy, and ``mean`` over the heads."""
        heads = {h: float(np.mean([row[h] for row in self.single_part])) for h in SINGLE_PART_HEADS}
        return {**heads, "mean": float(np.mean(list(heads.values())))}

    def composite_accuracy(self) -> dict[str, float]:
        return {
            key: float(np.mean([row[key] for row in self.composite])) for key in ("colours", "shape")
        } if self.composite else {}

    def markdown(self) -> str:
        lines = ["| prompt | shape | colour(s) | scene |", "| --- | --- | --- | --- |"]
        for (colour, shape, scene), row in zip(SINGLE_PART_PROMPTS, self.single_part):
            lines.append(f"| {single_part_prompt(colour, shape, scene)} | {row['shape']:.2f} | {row['colour_0']:.2f} | {row['scene']:.2f} |")
        total = self.single_part_accuracy()
        lines.append(f"| **single-part mean** (mean of the three: {total['mean']:.3f}) | {total['shape']:.3f} | {total['colour_0']:.3f} | {total['scene']:.3f} |")
        for case, row in zip(COMPOSITE_PROMPTS, self.composite):
            lines.append(f"| {composite_prompt(*case)} | {row['shape']:.2f} | {row['colours']:.2f} (both) | |")
        if self.composite:
            total = self.composite_accuracy()
            lines.append(f"| **composite mean** | {total['shape']:.3f} | {total['colours']:.3f} (both) | |")
        return "\n".join(lines)


@torch.no_grad()
def sample_prompt(model, prompt: str, n_samples: int, seed: int, ddim_steps: int = 25, scale: float = 7.5) -> Tensor:
    """``n_samples`` decoded pictures of ``prompt`` (classifier-free guidance, no reference), in [-1, 1]."""
    images, _ = sampling.sample_prompt(
        model, DDIMSampler(model), prompt, None, n_samples=n_samples,
        latent_shape=(model.channels, model.image_size, model.image_size), steps=ddim_steps, scale=scale,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    return images


def probe(
    model,
    classifier: WorldClassifier,
    n_samples: int = 4,
    single_part: int = len(SINGLE_PART_PROMPTS),
    composite: int = len(COMPOSITE_PROMPTS),
    ddim_steps: int = 25,
    scale: float = 7.5,
) -> ProbeResult:
    """Sample the first ``single_part`` and ``composite`` prompts; prompt ``i`` of each list
    uses seed ``i`` (single-part) or ``100 + i`` (composite)."""
    result = ProbeResult()
    for index, (colour, shape, scene) in enumerate(SINGLE_PART_PROMPTS[:single_part]):
        images = sample_prompt(model, single_part_prompt(colour, shape, scene), n_samples, index, ddim_steps, scale)
        labels = classify(classifier, images).labels
        expected = {"shape": shape, "colour_0": colour, "scene": scene}
        result.single_part.append({h: float(np.mean(labels[h] == HEADS[h].index(v))) for h, v in expected.items()})
        result.samples.append(images)
    for index, (first, second, shape, scene) in enumerate(COMPOSITE_PROMPTS[:composite]):
        images = sample_prompt(model, composite_prompt(first, second, shape, scene), n_samples, 100 + index, ddim_steps, scale)
        labels = classify(classifier, images).labels
        read = [sorted((HEADS["colour_0"][a], HEADS["colour_1"][b])) for a, b in zip(labels["colour_0"], labels["colour_1"])]
        result.composite.append({
            "colours": float(np.mean([pair == sorted((first, second)) for pair in read])),
            "shape": float(np.mean(labels["shape"] == HEADS["shape"].index(shape))),
        })  # fmt: skip
        result.samples.append(images)
    return result
