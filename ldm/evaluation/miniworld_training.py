"""Training the world classifier (:class:`ldm.evaluation.miniworld.WorldClassifier`) on renders.

The training pictures are random scenes of the world whose main object is single-part about
as often as it is a random composite (two random halves, a random split, a random notch; the
pretraining world never draws those, concepts are made of them), sometimes with a second
small object. Light augmentation (mirroring with the labels mirrored too, blur, resampling,
noise, colour jitter) and, when the base model exists, a pass of part of the pictures through
its autoencoder make the classifier read generated pictures as it reads renders.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor
from tqdm import tqdm

from ldm.data.miniworld import (
    IMAGE_SIZE,
    NOTCHES,
    SCENES,
    SPLITS,
    ConceptSpec,
    Scene,
    WorldSampler,
    concept_scene,
    random_world_object,
    render,
)
from ldm.data.images import to_tensor
from ldm.evaluation.miniworld import (
    HEADS,
    OBJECT_HEADS,
    UNDEFINED,
    Labels,
    WorldClassifier,
    WorldOutput,
    classify,
    mask_targets,
    save_classifier,
    scene_labels,
    stack_labels,
)
from ldm.models.base_checkpoint import read_state_dict
from ldm.util import CheckpointError, instantiate_from_config

logger = logging.getLogger(__name__)

#: Main objects a little smaller and larger than the pretraining and concept ranges.
CLASSIFIER_SAMPLER = WorldSampler(main_radius=(11.0, 23.0), extra_probability=0.25, max_angle=30.0)


@dataclass(frozen=True)
class ClassifierRecipe:
    """How the classifier is trained (the defaults made ``models/miniworld/classifier.safetensors``).

    Attributes:
        scenes: rendered training pictures.
        heldout: rendered held-out pictures (other seeds).
        steps, batch_size, learning_rate, weight_decay: the optimisation (AdamW, one-cycle).
        composite_probability: how often the main object is a random composite.
        autoencoder_fraction: part of the training (and held-out) pictures replaced by their
            reconstruction through the base model's autoencoder, when one is given.
        seed: every random choice.
    """

    scenes: int = 16000
    heldout: int = 2000
    steps: int = 2400
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    composite_probability: float = 0.6
    autoencoder_fraction: float = 0.5
    widths: tuple[int, ...] = (32, 48, 64, 96)
    feature_dim: int = 96
    seed: int = 0


@dataclass
class LabelledPictures:
    """``uint8 [N, 64, 64, 3]`` pictures, their labels (``int64 [N]`` per head) and the main
    objects' masks (``bool [N, 64, 64]``)."""

    images: np.ndarray
    labels: Labels
    masks: np.ndarray

    def __len__(self) -> int:
        return self.images.shape[0]


# -------------------------------------------------------------------- scenes
def classifier_scene(seed: int, composite_probability: float) -> Scene:
    """The training scene of ``seed``: a random object of :func:`random_world_object` in a random scene."""
    rng = np.random.default_rng([seed, 1])
    return CLASSIFIER_SAMPLER.scene(seed, main=random_world_object(rng, composite_probability))


def scene_seeds(count: int, seed: int, stream: int) -> list[int]:
    """``count`` scene seeds of one stream (0: training, 1: held out), independent of the others."""
    return [int(s) for s in np.random.SeedSequence([seed, stream, 7]).generate_state(count)]


def render_labelled(scenes: Sequence[Scene], desc: str) -> LabelledPictures:
    images = np.empty((len(scenes), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    masks = np.empty((len(scenes), IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for index, scene in enumerate(tqdm(scenes, desc=desc, unit="scene", leave=False)):
        rendering = render(scene)
        images[index], masks[index] = rendering.image, rendering.mask
    return LabelledPictures(images, stack_labels([scene_labels(s) for s in scenes]), masks)


def render_split(recipe: ClassifierRecipe, stream: int, cache_dir: Path | None) -> LabelledPictures:
    """The training (``stream`` 0) or held-out (1) pictures, from ``cache_dir`` when rendered before."""
    split = "train" if stream == 0 else "heldout"
    count = recipe.scenes if stream == 0 else recipe.heldout
    name = f"classifier-{split}-{count}-p{recipe.composite_probability}-seed{recipe.seed}.npz"
    cache = cache_dir / name if cache_dir is not None else None
    if cache is not None and cache.is_file():
        data = np.load(cache)
        return LabelledPictures(data["images"], {head: data[head] for head in HEADS}, data["masks"])
    seeds = scene_seeds(count, recipe.seed, stream)
    scenes = [classifier_scene(s, recipe.composite_probability) for s in seeds]
    pictures = render_labelled(scenes, f"rendering {split} scenes")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache.with_name(f".{cache.stem}.tmp.npz")
        np.savez(temporary, images=pictures.images, masks=pictures.masks, **pictures.labels)
        os.replace(temporary, cache)
    return pictures


# -------------------------------------------------------------- augmentation
def mirror(images: Tensor, labels: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Mirror pictures left to right and their labels with them.

    Every shape of the world is symmetric about its vertical axis, so a mirrored picture is a
    picture of the world: a vertically split object's halves swap, a left notch becomes a
    right one; top/bottom halves, patterns and scenes keep their labels.
    """
    mirrored = dict(labels)
    vertical = labels["split"] == SPLITS.index("vertical")
    for first, second in (("colour_0", "colour_1"), ("pattern_0", "pattern_1")):
        mirrored[first] = torch.where(vertical, labels[second], labels[first])
        mirrored[second] = torch.where(vertical, labels[first], labels[second])
    notch = labels["notch"].clone()
    left, right = NOTCHES.index("left"), NOTCHES.index("right")
    notch[labels["notch"] == left] = right
    notch[labels["notch"] == right] = left
    mirrored["notch"] = notch
    return images.flip(-1), mirrored


def gaussian_blur(images: Tensor, sigma: Tensor) -> Tensor:
    """Blur each picture with its own ``sigma`` (``[N]``, pixels; 0 leaves it as it is)."""
    radius = 2
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype)
    weights = torch.exp(-(offsets[None] ** 2) / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    weights = weights / weights.sum(-1, keepdim=True)  # [N, K]
    n, c, h, w = images.shape
    padded = F.pad(images.reshape(1, n * c, h, w), (radius,) * 4, mode="replicate")
    kernel = weights.repeat_interleave(c, 0)
    rows = F.conv2d(padded, kernel.view(n * c, 1, 1, -1), groups=n * c)
    blurred = F.conv2d(rows, kernel.view(n * c, 1, -1, 1), groups=n * c)
    return blurred.reshape(n, c, h, w)


def augment(
    images: Tensor, masks: Tensor, labels: Mapping[str, Tensor], generator: torch.Generator
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Light, label-preserving changes that generated pictures show: mirroring (labels and
    mask targets ``[N, g, g]`` mirrored too), blur, down- and up-sampling,
    brightness/contrast/channel-gain jitter, noise."""
    n = images.shape[0]

    def uniform(low: float, high: float, *shape: int) -> Tensor:
        return low + (high - low) * torch.rand(n, *shape, generator=generator)

    flip = torch.rand(n, generator=generator) < 0.5
    mirrored, mirrored_labels = mirror(images, labels)
    images = torch.where(flip[:, None, None, None], mirrored, images)
    masks = torch.where(flip[:, None, None], masks.flip(-1), masks)
    labels = {head: torch.where(flip, mirrored_labels[head], value) for head, value in labels.items()}
    blur = torch.where(torch.rand(n, generator=generator) < 0.5, uniform(0.3, 1.0), torch.zeros(n))
    images = gaussian_blur(images, blur)
    resample = torch.rand(n, generator=generator) < 0.25
    if resample.any():
        small = F.interpolate(images[resample], size=(40, 40), mode="bilinear", antialias=True)
        images[resample] = F.interpolate(small, size=images.shape[-2:], mode="bilinear")
    gain = uniform(0.9, 1.1, 1, 1, 1) * uniform(0.95, 1.05, 3, 1, 1)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    contrast = uniform(0.85, 1.15, 1, 1, 1)
    images = ((images - mean) * contrast + mean + 1) * gain - 1
    images = images + uniform(0.0, 0.08, 1, 1, 1) * torch.randn(images.shape, generator=generator)
    return images.clamp(-1, 1), masks, labels


# -------------------------------------------------------------- autoencoder
def load_autoencoder(base: str | Path, config: str | Path):
    """The first stage (``AutoencoderKL``) of a base model checkpoint, built from ``config``'s
    ``model.params.first_stage_config``, in eval mode and float32."""
    model_config = OmegaConf.load(config).model
    autoencoder = instantiate_from_config(model_config.params.first_stage_config)
    prefix = "first_stage_model."
    weights = {k[len(prefix) :]: v.float() for k, v in read_state_dict(base).items() if k.startswith(prefix)}
    try:
        autoencoder.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"{base}: its autoencoder does not fit {config} ({str(err).splitlines()[0]})") from None
    return autoencoder.eval()


@torch.no_grad()
def autoencoder_round_trip(autoencoder, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """``uint8 [N, H, W, 3]`` pictures encoded (posterior mode) and decoded by ``autoencoder``."""
    out = np.empty_like(images)
    device = next(autoencoder.parameters()).device
    for start in tqdm(range(0, len(images), batch_size), desc="autoencoder round trip", unit="batch", leave=False):
        batch = to_tensor(images[start : start + batch_size]).to(device)
        decoded = autoencoder.decode(autoencoder.encode(batch).mode()).clamp(-1, 1)
        out[start : start + batch_size] = ((decoded + 1) * 127.5).round().byte().movedim(1, -1).cpu().numpy()
    return out


def replace_with_round_trips(pictures: LabelledPictures, autoencoder, fraction: float, seed: int) -> np.ndarray:
    """Replace ``fraction`` of the pictures (a seeded choice) by their reconstruction through
    ``autoencoder``, in place; returns the indices replaced."""
    rng = np.random.default_rng([seed, 11])
    chosen = np.sort(rng.choice(len(pictures), size=int(round(fraction * len(pictures))), replace=False))
    if len(chosen):
        pictures.images[chosen] = autoencoder_round_trip(autoencoder, pictures.images[chosen])
    return chosen


# ------------------------------------------------------------------ training
def classification_loss(output: WorldOutput, labels: Mapping[str, Tensor], masks: Tensor) -> Tensor:
    """Sum over heads of the cross-entropy (undefined labels skipped), plus the binary
    cross-entropy of the mask head against the covered share of each cell."""
    total = F.binary_cross_entropy_with_logits(output.mask_logits, masks)
    for head, head_logits in output.logits.items():
        target = labels[head]
        if bool((target != UNDEFINED).any()):
            total = total + F.cross_entropy(head_logits, target, ignore_index=UNDEFINED)
    return total


def train_network(recipe: ClassifierRecipe, train: LabelledPictures) -> WorldClassifier:
    """Train a fresh classifier for ``recipe.steps`` steps on ``train`` (random batches, augmented)."""
    torch.manual_seed(recipe.seed)
    model = WorldClassifier(recipe.widths, recipe.feature_dim)
    optimiser = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, recipe.learning_rate, total_steps=recipe.steps)
    generator = torch.Generator().manual_seed(recipe.seed)
    images = to_tensor(train.images)
    masks = mask_targets(train.masks)
    labels = {head: torch.from_numpy(values) for head, values in train.labels.items()}
    model.train()
    for step in tqdm(range(recipe.steps), desc="training the world classifier", unit="step"):
        index = torch.randint(len(train), (recipe.batch_size,), generator=generator)
        batch, batch_masks, batch_labels = augment(
            images[index], masks[index], {h: v[index] for h, v in labels.items()}, generator
        )
        loss = classification_loss(model(batch), batch_labels, batch_masks)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    return model.eval()


def head_accuracy(model: WorldClassifier, pictures: LabelledPictures) -> dict[str, float]:
    """Per-head accuracy over the pictures whose label is defined, and ``object`` (every object head right)."""
    predicted = classify(model, pictures.images).labels
    accuracy: dict[str, float] = {}
    object_right = np.ones(len(pictures), dtype=bool)
    for head in HEADS:
        truth = pictures.labels[head]
        defined = truth != UNDEFINED
        right = predicted[head] == truth
        accuracy[head] = float(right[defined].mean()) if defined.any() else math.nan
        if head in OBJECT_HEADS:
            object_right &= right | ~defined
    accuracy["object"] = float(object_right.mean())
    return accuracy


def concept_pictures(specs: Sequence[ConceptSpec], per_scene: int, seed: int) -> LabelledPictures:
    """Each concept in each scene, ``per_scene`` poses: what generated concept pictures should look like."""
    scenes = [
        concept_scene(spec, int(s), background)
        for spec in specs
        for background in SCENES
        for s in np.random.SeedSequence([seed, 3, *map(ord, spec.name)]).generate_state(per_scene)
    ]
    return render_labelled(scenes, "rendering concept pictures")


@dataclass
class ClassifierReport:
    """What training produced: held-out accuracies per head and how long it took."""

    recipe: dict
    heldout_accuracy: dict[str, float]
    heldout_autoencoder_accuracy: dict[str, float] | None
    concept_accuracy: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)
    autoencoder: str | None = None
    parameters: int = 0


def train_classifier(
    recipe: ClassifierRecipe,
    concepts: Sequence[ConceptSpec] = (),
    autoencoder=None,
    autoencoder_source: str | None = None,
    cache_dir: Path | None = None,
) -> tuple[WorldClassifier, ClassifierReport]:
    """Render, (optionally) round-trip through the base model's autoencoder, train and measure.

    Args:
        concepts: concept specs whose renders in every scene are scored as a held-out check
            (the object heads all right on each picture).
        autoencoder: the base model's first stage (:func:`load_autoencoder`), which
            reconstructs part of the training pictures (``recipe.autoencoder_fraction``) and
            a copy of the held-out ones; ``autoencoder_source`` names its file in the report.
        cache_dir: where rendered pictures are cached between runs.
    """
    seconds: dict[str, float] = {}
    started = time.time()
    train = render_split(recipe, 0, cache_dir)
    heldout = render_split(recipe, 1, cache_dir)
    seconds["render"] = time.time() - started
    heldout_round_trip = None
    if autoencoder is not None:
        started = time.time()
        replace_with_round_trips(train, autoencoder, recipe.autoencoder_fraction, recipe.seed)
        heldout_round_trip = LabelledPictures(
            autoencoder_round_trip(autoencoder, heldout.images), heldout.labels, heldout.masks
        )
        seconds["autoencoder"] = time.time() - started
    started = time.time()
    model = train_network(recipe, train)
    seconds["train"] = time.time() - started
    started = time.time()
    concept_accuracy: dict[str, float] = {}
    if concepts:
        pictures = concept_pictures(concepts, per_scene=2, seed=recipe.seed)
        predicted = head_accuracy(model, pictures)
        concept_accuracy = {"object": predicted["object"], "scene": predicted["scene"]}
    report = ClassifierReport(
        recipe=asdict(recipe),
        heldout_accuracy=head_accuracy(model, heldout),
        heldout_autoencoder_accuracy=head_accuracy(model, heldout_round_trip) if heldout_round_trip else None,
        concept_accuracy=concept_accuracy,
        autoencoder=autoencoder_source,
        parameters=sum(p.numel() for p in model.parameters()),
    )
    seconds["evaluate"] = time.time() - started
    report.seconds = {k: round(v, 1) for k, v in seconds.items()}
    return model, report


def write_classifier(model: WorldClassifier, report: ClassifierReport, path: Path, command: str) -> Path:
    """The weights at ``path`` and the report beside them (``<stem>.json``) with the command."""
    save_classifier(model, path, {"command": command, "seed": str(report.recipe["seed"])})
    record = path.with_suffix(".json")
    record.write_text(json.dumps({"command": command, **asdict(report)}, indent=2) + "\n", encoding="utf-8")
    return record
