"""The miniature world's classifier: what a picture shows, in the world's own vocabulary.

A small CNN reads a 64x64 picture and predicts, with one head each, the main object's shape,
the colour and pattern of each of its halves (the first half is the left one of a vertical
split, the top one of a horizontal split: :attr:`ldm.data.miniworld.WorldObject.halves`),
where the halves meet (split), which side is notched, and the background scene. Its
penultimate layer is a feature vector whose cosine similarity plays the part of DINO's in
I_DINO. It is trained on renderer output (:mod:`ldm.evaluation.miniworld_training`) and
shipped as ``models/miniworld/classifier.safetensors``; the metrics built on it are in
:mod:`ldm.evaluation.miniworld_metrics`.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ldm.data.images import load_image, to_tensor
from ldm.data.miniworld import COLOURS, IMAGE_SIZE, NOTCHES, PATTERNS, SCENES, SHAPES, SPLITS, Scene, WorldObject

#: Heads that describe the main object, with their classes.
OBJECT_HEADS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour_0": tuple(COLOURS),
    "pattern_0": PATTERNS,
    "colour_1": tuple(COLOURS),
    "pattern_1": PATTERNS,
    "split": SPLITS,
    "notch": NOTCHES,
}
#: Every head: the object's and the background scene's.
HEADS: dict[str, tuple[str, ...]] = {**OBJECT_HEADS, "scene": tuple(SCENES)}
#: The label of an attribute a picture does not define (the split of an object whose halves
#: look alike); the loss and the metrics skip it.
UNDEFINED = -100
CLASSIFIER_FORMAT = "miniworld-classifier"

Labels = dict[str, np.ndarray]


# --------------------------------------------------------------------- labels
def object_labels(obj: WorldObject) -> dict[str, int]:
    """Class indices of every object head; the split is :data:`UNDEFINED` when the halves look alike."""
    first, second = obj.halves
    halves_differ = first != second
    return {
        "shape": SHAPES.index(obj.shape),
        "colour_0": OBJECT_HEADS["colour_0"].index(first.colour),
        "pattern_0": PATTERNS.index(first.pattern),
        "colour_1": OBJECT_HEADS["colour_1"].index(second.colour),
        "pattern_1": PATTERNS.index(second.pattern),
        "split": SPLITS.index(obj.split) if halves_differ else UNDEFINED,
        "notch": NOTCHES.index(obj.notch),
    }


def scene_labels(scene: Scene) -> dict[str, int]:
    """Class indices of every head for a rendered scene (its main object and its background)."""
    return {**object_labels(scene.main), "scene": HEADS["scene"].index(scene.background)}


def mask_targets(masks: np.ndarray) -> Tensor:
    """``bool [N, 64, 64]`` object masks -> the share of each :data:`MASK_GRID` cell they cover, ``[N, g, g]``."""
    cell = IMAGE_SIZE // MASK_GRID
    covered = torch.from_numpy(np.ascontiguousarray(masks)).float()
    return covered.reshape(-1, MASK_GRID, cell, MASK_GRID, cell).mean(dim=(2, 4))


def stack_labels(rows: Sequence[Mapping[str, int]]) -> Labels:
    """Per-picture label dicts -> one ``int64 [N]`` array per head."""
    return {head: np.array([row[head] for row in rows], dtype=np.int64) for head in HEADS}


def class_names(head: str, indices: np.ndarray) -> list[str]:
    """Class indices of ``head`` -> names (``"?"`` for :data:`UNDEFINED`)."""
    return [HEADS[head][i] if i != UNDEFINED else "?" for i in indices.tolist()]


# -------------------------------------------------------------------- network
def _conv(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


@dataclass
class WorldOutput:
    """The logits of every head (``[N, classes]``), the feature vectors ``[N, feature_dim]`` and
    the logits of the main object's mask on a :data:`MASK_GRID` grid, ``[N, MASK_GRID, MASK_GRID]``."""

    logits: dict[str, Tensor]
    features: Tensor
    mask_logits: Tensor


#: Side of the grid on which the classifier also predicts the main object's mask.
MASK_GRID = 8


class WorldClassifier(nn.Module):
    """A small CNN with one linear head per attribute of :data:`HEADS`.

    The 64x64 picture is folded into 32x32 cells of 2x2 pixels (pixel unshuffle: no detail
    is lost, and convolutions at full resolution would cost most of the training time on a
    CPU); conv stages of ``widths`` (one, two, two and one convolutions) bring it to an 8x8
    grid, where a 1x1 convolution predicts which cells are the main object, and then to a
    4x4 grid whose cells see the whole object. The mask is an auxiliary training target:
    telling the object from a background as textured as itself is what shape and notch need,
    and a dense target teaches it far sooner than the class labels alone. Every attribute is
    relative to the object, wherever it stands in the picture, so the 4x4 grid is pooled
    globally (mean and max) and projected to ``feature_dim``: the feature vector of the
    similarity metric. The heads read it after a ReLU.
    """

    def __init__(self, widths: Sequence[int] = (32, 48, 64, 96), feature_dim: int = 96):
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"the classifier has four stages, got widths {list(widths)}")
        self.widths = tuple(int(w) for w in widths)
        self.feature_dim = int(feature_dim)
        first, second, third, last = self.widths
        self.encoder = nn.Sequential(
            nn.PixelUnshuffle(2),
            *_conv(12, first),
            nn.MaxPool2d(2),
            *_conv(first, second),
            *_conv(second, second),
            nn.MaxPool2d(2),
            *_conv(second, third),
            *_conv(third, third),
        )
        self.mask_head = nn.Conv2d(third, 1, 1)
        self.top = nn.Sequential(nn.MaxPool2d(2), *_conv(third, last))
        self.project = nn.Linear(2 * last, self.feature_dim)
        self.dropout = nn.Dropout(0.2)
        self.heads = nn.ModuleDict({name: nn.Linear(self.feature_dim, len(classes)) for name, classes in HEADS.items()})
        self.to(memory_format=torch.channels_last)  # about 1.5x faster convolutions on a CPU

    def forward(self, images: Tensor) -> WorldOutput:
        """``images``: ``[N, 3, H, W]`` in [-1, 1]; other sides than 64 are resized to 64."""
        if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
        cells = self.encoder(images.contiguous(memory_format=torch.channels_last))
        grid = self.top(cells)
        pooled = torch.cat([grid.mean(dim=(2, 3)), grid.amax(dim=(2, 3))], dim=1)
        features = self.project(pooled)
        hidden = self.dropout(F.relu(features))
        logits = {name: head(hidden) for name, head in self.heads.items()}
        return WorldOutput(logits, features, self.mask_head(cells)[:, 0])

    def config(self) -> dict:
        return {"widths": list(self.widths), "feature_dim": self.feature_dim, "heads": {k: list(v) for k, v in HEADS.items()}}


# ------------------------------------------------------------------ file I/O
def save_classifier(model: WorldClassifier, path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
    """Write the weights as fp16 safetensors (BatchNorm's counters as they are) with the architecture."""
    tensors = {
        key: (value.half() if value.is_floating_point() else value).detach().cpu().contiguous()
        for key, value in model.state_dict().items()
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"format": CLASSIFIER_FORMAT, "config": json.dumps(model.config()), **(metadata or {})}
    temporary = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(temporary), metadata=info)
    temporary.replace(path)


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> WorldClassifier:
    """The classifier of ``path`` in eval mode, float32.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a classifier file, or one made for another vocabulary of the world.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"world classifier not found: {path} (make it with: python scripts/miniworld.py train-classifier)"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    if metadata.get("format") != CLASSIFIER_FORMAT:
        raise ValueError(f"{path}: not a world classifier (format {metadata.get('format')!r})")
    config = json.loads(metadata["config"])
    if config["heads"] != {k: list(v) for k, v in HEADS.items()}:
        raise ValueError(f"{path}: made for another vocabulary of the world; train it again")
    model = WorldClassifier(config["widths"], config["feature_dim"])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
    return model.eval().to(device)


def read_classifier_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


# ----------------------------------------------------------------- predicting
@dataclass
class WorldPredictions:
    """What the classifier sees in N pictures: class indices per head and the feature vectors."""

    labels: Labels
    features: Tensor

    def __len__(self) -> int:
        return self.features.shape[0]


def as_image_batch(images: np.ndarray | Sequence[str | Path] | Tensor) -> Tensor:
    """``uint8 [N, H, W, 3]`` pictures, image files, or a float ``[N, 3, H, W]`` tensor in [-1, 1]."""
    if isinstance(images, Tensor):
        return images.float()
    if isinstance(images, np.ndarray):
        return to_tensor(images)
    return to_tensor(np.stack([load_image(path, (IMAGE_SIZE, IMAGE_SIZE)) for path in images]))


@torch.no_grad()
def classify(
    model: WorldClassifier, images: np.ndarray | Sequence[str | Path] | Tensor, batch_size: int = 256
) -> WorldPredictions:
    """The most likely class of every head and the feature vector of each picture."""
    batch = as_image_batch(images)
    device = next(model.parameters()).device
    labels: dict[str, list[Tensor]] = {head: [] for head in HEADS}
    features = []
    was_training = model.training
    model.eval()
    for chunk in batch.split(batch_size):
        output = model(chunk.to(device))
        for head, logits in output.logits.items():
            labels[head].append(logits.argmax(-1).cpu())
        features.append(output.features.cpu())
    model.train(was_training)
    return WorldPredictions({h: torch.cat(v).numpy() for h, v in labels.items()}, torch.cat(features))
