"""The few-image concept dataset: every item is a photo, a reference photo and a caption.

Items are a pure function of their index (and the seed): a photo, a reference chosen at
random among the *other* photos (paper, Appendix A), a random horizontal flip of each, and a
Textual Inversion caption template. The photos come in a random order, as the authors' data
loader (``shuffle=True``) draws them: each epoch of ``repeats`` x N items is a fresh permutation
of the photos repeated ``repeats`` times; ``shuffle=False`` takes photo ``i % N`` in name order
(the paper's Appendix A reads as that). Together with :class:`ResumableSampler` this makes a run
resumable to the exact same data stream, on any number of processes.

The photos are decoded once at start-up (all of them: a bad file stops the run before
training) and kept as ``uint8`` arrays; the model encodes them through the VAE once and
caches the posteriors, so items carry indices, not pixels. With prior preservation
(DreamBooth, Custom Diffusion) every item also names a class image and its caption
(:class:`PriorPreservationItems`; the images: :mod:`ldm.data.class_images`).
"""
from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ldm.data.images import ImageError, ResizeMode, list_images, load_image, pixel_size, to_tensor
from ldm.util import instantiate_from_config

if TYPE_CHECKING:
    from ldm.data.class_images import ClassImages

logger = logging.getLogger(__name__)
#: A training photo whose smaller side is below the training size divided by this is "far
#: smaller": it is upscaled into a blur, which the model then learns.
UPSCALE_WARNING = 2

# Textual Inversion's caption templates (``imagenet_templates_small`` of its first, LDM version),
# the placeholder at {}.
SHORT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)


def _recaptioned(prefix: str) -> tuple[str, ...]:
    """The short list with each caption that starts with "a photo of " starting with ``prefix``."""
    photo = "a photo of "
    return tuple(prefix + t.removeprefix(photo) if t.startswith(photo) else t for t in SHORT_TEMPLATES)


# The authors' list (Textual Inversion's Stable Diffusion version, which they forked): the short
# list, then again as "an illustration of" and "a depiction of" captions; 81 entries, 30 of
# them illustrations or depictions.
VICO_TEMPLATES = SHORT_TEMPLATES + _recaptioned("an illustration of ") + _recaptioned("a depiction of ")

CAPTION_TEMPLATES: dict[str, tuple[str, ...]] = {"vico": VICO_TEMPLATES, "short": SHORT_TEMPLATES}


class PersonalizedBase(Dataset):
    """Photos of one concept (or several) with reference photos and placeholder captions.

    Several concepts (multi-object composition, paper Appendix, Fig. 25) are given as lists:
    ``data_root: [a, b]`` with ``placeholder_token: ["*", "@"]``, one placeholder per folder.
    Item ``i`` then belongs to concept ``i % C`` (the concepts take turns, whatever their photo
    counts) and is that concept's item ``i // C``: a photo of it, a reference photo of the *same*
    concept and a caption with *its* placeholder. With one concept this is the single-concept
    dataset, item for item.

    Args:
        data_root: folder of photos (jpg, jpeg, png, webp, bmp; other files are ignored), or
            a list of folders, one per concept.
        size: side of the square images fed to the autoencoder.
        repeats: nominal epoch length is ``repeats`` x the number of photos.
        interpolation: resampling filter for resizing.
        resize_mode: ``"squash"`` resizes the whole photo to ``size`` x ``size`` (the authors'
            code; a non-square photo is distorted); ``"crop"`` keeps the aspect ratio and crops
            the centre square.
        flip_p: probability of a horizontal flip of the photo and, independently, of the
            reference (the original's default is 0).
        placeholder_token: the string standing for S* in the captions; with several folders,
            a list of as many distinct strings (concept ``c`` is captioned with the ``c``-th).
        caption_templates: ``"vico"``, the authors' 81 captions, ``"short"``, the 27
            "photo"/"rendering"/"rendition" captions of the first Textual Inversion, or a list
            of templates with ``{}`` for the placeholder: the baselines' single instance prompt,
            ``["a photo of a {}"]`` (DreamBooth's "a photo of a [V] dog": the model's
            tokenisation adds the class word) or ``["photo of a {}"]`` (Custom Diffusion's).
        seed: seed of the per-item choices.
        object_masks: also read each photo's object mask, ``masks/<photo name>`` beside it
            (white: object; the miniature world's concept folders have them): the image
            attention is then masked by the reference's true mask instead of the Otsu mask of
            the S* attention (the paper's Fig. 9 comparison with ground-truth masks).
        shuffle: draw the photos in a random order per epoch, as the authors' data loader does
            (default); ``False``: in name order, photo ``i % N``.
    """

    def __init__(
        self,
        data_root: str | list[str],
        size: int = 512,
        repeats: int = 100,
        interpolation: str = "bicubic",
        flip_p: float = 0.0,
        placeholder_token: str | list[str] = "*",
        seed: int = 0,
        resize_mode: ResizeMode = "squash",
        caption_templates: str | list[str] = "vico",
        object_masks: bool = False,
        shuffle: bool = True,
    ):
        if isinstance(caption_templates, str):
            if caption_templates not in CAPTION_TEMPLATES:
                raise ValueError(
                    f"caption_templates must be one of {tuple(CAPTION_TEMPLATES)} or a list, got '{caption_templates}'"
                )
            self.templates = CAPTION_TEMPLATES[caption_templates]
        else:
            self.templates = tuple(caption_templates)
            if not self.templates or any(t.count("{}") != 1 for t in self.templates):
                raise ValueError(
                    f"caption_templates: each template needs one '{{}}' for the placeholder, got {caption_templates}"
                )
        roots = [data_root] if isinstance(data_root, (str, os.PathLike)) else list(data_root)
        placeholders = [placeholder_token] if isinstance(placeholder_token, str) else list(placeholder_token)
        if not roots or len(roots) != len(placeholders):
            raise ValueError(
                f"{len(roots)} data folder(s) and {len(placeholders)} placeholder(s): give one placeholder per folder"
            )
        if len(set(placeholders)) != len(placeholders):
            raise ValueError(f"the concepts' placeholders {placeholders} repeat: each concept needs its own")
        self.paths, self.concept_start, images = [], [], []
        for root in roots:
            paths = list_images(root)
            errors = []
            self.concept_start.append(len(self.paths))
            for path in paths:
                try:
                    images.append(load_image(path, size, interpolation, resize_mode))
                except ImageError as err:
                    errors.append(f"{path.name} ({err})")
            if errors:
                raise ImageError(f"{len(errors)} unreadable image(s) in {root}: " + "; ".join(errors))
            warn_small_photos(root, paths, size)
            self.paths += paths
        self.concept_start.append(len(self.paths))
        self.images = np.stack(images)
        self.masks = np.stack([read_object_mask(path, size, resize_mode) for path in self.paths]) if object_masks else None
        self.size = size
        self.repeats = repeats
        self.flip_p = flip_p
        self.placeholder_tokens = placeholders
        self.seed = seed
        self.shuffle = shuffle

    @property
    def num_images(self) -> int:
        return len(self.paths)

    @property
    def num_concepts(self) -> int:
        return len(self.placeholder_tokens)

    def concept_images(self, concept: int) -> range:
        """Indices (into :meth:`pixels`) of concept ``concept``'s photos."""
        return range(self.concept_start[concept], self.concept_start[concept + 1])

    def __len__(self) -> int:
        return self.num_images * self.repeats

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng((self.seed, index))
        concept = index % self.num_concepts
        photos = self.concept_images(concept)
        image_index = photos[self.photo_of_item(concept, index // self.num_concepts)]
        others = [i for i in photos if i != image_index] or [image_index]
        reference_index = others[rng.integers(len(others))]
        placeholder = self.placeholder_tokens[concept]
        return {
            "caption": self.templates[rng.integers(len(self.templates))].format(placeholder),
            "image_index": image_index,
            "reference_index": reference_index,
            "flip": bool(rng.random() < self.flip_p),
            "reference_flip": bool(rng.random() < self.flip_p),
        }

    def photo_of_item(self, concept: int, item: int) -> int:
        """Which of ``concept``'s photos its ``item``-th item shows (see the module docstring)."""
        count = len(self.concept_images(concept))
        if not self.shuffle:
            return item % count
        epoch, slot = divmod(item, count * self.repeats)
        return int(_epoch_order(self.seed, concept, epoch, count * self.repeats)[slot]) % count

    def pixels(self) -> torch.Tensor:
        """All photos as ``[N, 3, size, size]`` floats in [-1, 1]."""
        return to_tensor(self.images)

    def object_mask_pixels(self) -> torch.Tensor | None:
        """The photos' object masks as ``bool [N, size, size]``, or ``None`` without ``object_masks``."""
        return None if self.masks is None else torch.from_numpy(self.masks)


#: Keeps the shuffle's random stream apart from the per-item one (seeded by ``(seed, index)``).
_SHUFFLE_STREAM = 0x5EED


@functools.lru_cache(maxsize=8)
def _epoch_order(seed: int, concept: int, epoch: int, length: int) -> np.ndarray:
    """The authors' shuffled epoch: a permutation of its ``length`` items, a pure function of the
    seed, the concept and the epoch (so a resumed run draws the same order)."""
    return np.random.default_rng((seed, _SHUFFLE_STREAM, concept, epoch)).permutation(length)


def warn_small_photos(root: str | os.PathLike[str], paths: list[Path], size: int) -> None:
    """Warn about training photos far smaller than the training size (16x16 for 512)."""
    sides = {path: min(pixel_size(path)) for path in paths}
    small = sorted((side, path) for path, side in sides.items() if side * UPSCALE_WARNING < size)
    if small:
        side, path = small[0]
        logger.warning(
            "%d of %d training photos in %s are far smaller than the training size %d px (the smallest, %s, "
            "has a %d px side): they are upscaled to blurs, which the model then learns; use photos of at "
            "least %d px", len(small), len(paths), root, size, path.name, side, size // UPSCALE_WARNING,
        )  # fmt: skip


def read_object_mask(photo: Path, size: int, resize_mode: ResizeMode = "squash") -> np.ndarray:
    """The object mask of ``photo`` (``masks/<photo name>`` beside it), ``bool [size, size]``."""
    path = photo.parent / "masks" / photo.name
    if not path.is_file():
        raise ImageError(f"object_masks: no mask {path} for {photo.name} (a white-on-black image of the object)")
    return load_image(path, size, "nearest", resize_mode)[..., 0] > 127


class PriorPreservationItems(Dataset):
    """The concept's items, each with a class image and its caption (prior preservation).

    Item ``i`` adds class image ``i % N`` (as diffusers' DreamBooth and Custom Diffusion
    datasets pair them), so the class images take turns whatever the batch size and the
    number of processes, and a resumed run meets the same ones.
    """

    def __init__(self, instances: PersonalizedBase, class_images: ClassImages):
        self.instances = instances
        self.class_images = class_images

    def __len__(self) -> int:
        return len(self.instances)

    def __getitem__(self, index: int) -> dict[str, Any]:
        class_index = index % len(self.class_images)
        return {**self.instances[index], "class_index": class_index, "class_caption": self.class_images.caption(class_index)}


class ResumableSampler(Sampler[int]):
    """Item indices for the optimisation steps still to run, split across processes.

    Batch ``b`` of process ``rank`` holds items ``(b * world_size + rank) * batch_size + j``.
    Each iteration starts at the batch given by ``start_batch()`` (the trainer's progress) and
    runs to ``total_batches``, so a resumed run (or any restart of the iteration) continues
    exactly where training stands, whatever the loop's epoch bookkeeping does.
    """

    def __init__(
        self,
        total_batches: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        start_batch: Callable[[], int] = lambda: 0,
    ):
        self.total_batches = total_batches
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.total_batches * self.batch_size

    def __iter__(self) -> Iterator[int]:
        for batch in range(self.start_batch(), self.total_batches):
            first = (batch * self.world_size + self.rank) * self.batch_size
            yield from range(first, first + self.batch_size)


class PersonalizedDataModule(pl.LightningDataModule):
    """Builds the training set at construction (so bad data fails before anything else).

    The trainer must set ``max_steps``: the sampler covers exactly the steps still to run.

    Args:
        train: ``target``/``params`` config of the dataset.
        batch_size: per process.
        num_workers: data-loader workers.
        class_images: ``target``/``params`` config of the class images of prior preservation
            (a :class:`ldm.data.class_images.ClassImages`, built at the photos' size with the
            run's seed); ``None`` without prior preservation.
    """

    def __init__(
        self,
        train: Mapping[str, Any],
        batch_size: int = 4,
        num_workers: int = 0,
        class_images: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.train_dataset: PersonalizedBase = instantiate_from_config(train)
        self.class_images: ClassImages | None = None
        if class_images is not None:
            dataset = self.train_dataset
            self.class_images = instantiate_from_config(class_images, size=dataset.size, seed=dataset.seed)
        self.batch_size = batch_size
        self.num_workers = num_workers

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        accumulate = trainer.accumulate_grad_batches
        sampler = ResumableSampler(
            total_batches=trainer.max_steps * accumulate,
            batch_size=self.batch_size,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            start_batch=lambda: trainer.global_step * accumulate,
        )
        dataset = self.train_dataset
        if self.class_images is not None:
            dataset = PriorPreservationItems(dataset, self.class_images)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=trainer.strategy.root_device.type == "cuda",  # asynchronous copies to the GPU
        )

