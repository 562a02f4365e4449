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
    """The logits of every head (``[N, classes]``) and the feature vectors ``[N, feature_dim]``."""

    logits: dict[str, Tensor]
    features: Tensor


class WorldClassifier(nn.Module):
    """A small CNN with one linear head per attribute of :data:`HEADS`.

    The 64x64 picture is folded into 32x32 cells of 2x2 pixels (pixel unshuffle: no detail
    is lost, and convolutions at full resolution would cost most of the training time on a
    CPU), then three conv stages (``widths``; the middle one has two convolutions) each halve
    the side, down to a 4x4 grid. The grid is flattened, so that the heads know where in the
    picture each feature is (which the left/right and top/bottom halves need), and projected
    to ``feature_dim``: the feature vector of the similarity metric. The heads read it after
    a ReLU.
    """

    def __init__(self, widths: Sequence[int] = (32, 48, 64), feature_dim: int = 96):
        super().__init__()
        if len(widths) != 3:
            raise ValueError(f"the classifier has three stages, got widths {list(widths)}")
        self.widths = tuple(int(w) for w in widths)
        self.feature_dim = int(feature_dim)
        first, middle, last = self.widths
        self.body = nn.Sequential(
            nn.PixelUnshuffle(2),
            *_conv(12, first),
            nn.MaxPool2d(2),
            *_conv(first, middle),
            *_conv(middle, middle),
            nn.MaxPool2d(2),
            *_conv(middle, last),
            nn.MaxPool2d(2),
        )
        side = IMAGE_SIZE // 16
        self.project = nn.Linear(last * side * side, self.feature_dim)
        self.dropout = nn.Dropout(0.2)
        self.heads = nn.ModuleDict({name: nn.Linear(self.feature_dim, len(classes)) for name, classes in HEADS.items()})
        self.to(memory_format=torch.channels_last)  # about 1.5x faster convolutions on a CPU

    def forward(self, images: Tensor) -> WorldOutput:
        """``images``: ``[N, 3, H, W]`` in [-1, 1]; other sides than 64 are resized to 64."""
        if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
        grid = self.body(images.contiguous(memory_format=torch.channels_last))
        features = self.project(grid.flatten(1))
        hidden = self.dropout(F.relu(features))
        return WorldOutput({name: head(hidden) for name, head in self.heads.items()}, features)

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
