"""Class images of prior preservation (DreamBooth, Custom Diffusion) and their captions.

Prior preservation trains on images of the concept's *class* beside the concept's photos, so
that fine-tuning the UNet does not make every "dog" the user's dog. The methods differ in
where those images come from, one class each:

* :class:`GeneratedClassImages`: drawn by the base model itself from the class prompt ("a photo
  of a dog"), once per run before the first step (DreamBooth; Ruiz et al., and diffusers'
  ``train_dreambooth.py``);
* :class:`ClassImageFolder`: images someone brings, with captions: Custom Diffusion's *real*
  images retrieved from LAION with captions similar to the class (Kumari et al.; the layout of
  its ``retrieve.py``), or any folder of class pictures;
* :class:`MiniworldClassImages`: the miniature world's analogue of retrieval, renders of
  single-part objects of the class's shape with their true captions.

Each is built by :class:`ldm.data.personalized.PersonalizedDataModule` at the training size,
placed in the run (:meth:`ClassImages.locate`) and made ready by the model before training
(:meth:`ClassImages.prepare`, on rank 0: only generation does work there), then encoded once,
its latents cached like the photos'.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ldm.data.images import ImageError, list_images, load_image, to_tensor
from ldm.data.miniworld import SHAPES, WorldObject, WorldSampler, random_part, render
from ldm.util import write_atomically

if TYPE_CHECKING:
    from ldm.models.diffusion.latent import LatentDiffusionModel

logger = logging.getLogger(__name__)

#: The folder of a run where generated class images go when the config names none.
RUN_SUBFOLDER = "class_images"
#: The file beside generated class images that records the prompt they were drawn from.
PROMPT_FILE = "prompt.txt"


class ClassImages:
    """Class images and one caption per image, at the training size.

    Args:
        size: side of the square images (the training photos' size).
        seed: the run's seed (main.py's ``--seed``), for whatever is drawn at random.
    """

    def __init__(self, size: int = 512, seed: int = 0):
        self.size = size
        self.seed = seed
        self.captions: list[str] = []

    def __len__(self) -> int:
        return len(self.captions)

    def caption(self, index: int) -> str:
        return self.captions[index]

    def locate(self, run_folder: Path) -> None:
        """Learn the run's folder (on every process); nothing by default."""

    def prepare(self, model: LatentDiffusionModel) -> None:
        """Make the images available before training (on rank 0 only); nothing by default."""

    def pixels(self) -> torch.Tensor:
        """All images as ``[N, 3, size, size]`` floats in [-1, 1]."""
        raise NotImplementedError


class GeneratedClassImages(ClassImages):
    """DreamBooth's class images: the base model's own samples of the class prompt.

    Image ``i`` is ``<folder>/NNNNN.png``, drawn with DDIM and classifier-free guidance from
    noise seeded by (seed, i) alone, so a run interrupted while generating continues where it
    stopped and draws the same images; images already in the folder are kept (a folder the
    config names can serve several runs of the same class).

    Args:
        class_word: the concept's class ("dog"; the baseline configs take ``--init_word``).
        prompt: the class prompt, ``{}`` standing for the class word.
        num_images: how many (DreamBooth's paper and diffusers' README: 200; at least 100).
        folder: where the images go; default ``<run folder>/class_images``.
        ddim_steps, guidance_scale: sampler settings (diffusers' pipeline defaults: 50, 7.5).
        batch_size: images per sampling batch (diffusers' ``--sample_batch_size``: 4).
    """

    def __init__(
        self,
        class_word: str,
        prompt: str = "a photo of a {}",
        num_images: int = 200,
        folder: str | None = None,
        ddim_steps: int = 50,
        guidance_scale: float = 7.5,
        batch_size: int = 4,
        size: int = 512,
        seed: int = 0,
    ):
        super().__init__(size, seed)
        if num_images < 1 or batch_size < 1 or ddim_steps < 1:
            raise ValueError("num_images, batch_size and ddim_steps of the class images must be at least 1")
        self.prompt = prompt.format(class_word)
        self.captions = [self.prompt] * num_images
        self.folder = Path(folder).resolve() if folder else None
        self.ddim_steps = ddim_steps
        self.guidance_scale = guidance_scale
        self.batch_size = batch_size

    def image_path(self, index: int) -> Path:
        return self.folder / f"{index:05d}.png"

    def image_seed(self, index: int) -> int:
        return int(np.random.SeedSequence((self.seed, index)).generate_state(1)[0])

    def locate(self, run_folder: Path) -> None:
        """Without a folder of their own, the images live in ``<run folder>/class_images``."""
        self.folder = self.folder or run_folder / RUN_SUBFOLDER

    def prepare(self, model: LatentDiffusionModel) -> None:
        """Draw the images the folder lacks with ``model``, writing each batch as it is done."""
        from ldm.models.diffusion.ddim import DDIMSampler
        from ldm.models.diffusion.sampling import sample_prompt

        self.folder.mkdir(parents=True, exist_ok=True)
        self._check_prompt()
        missing = [i for i in range(len(self)) if not self.image_path(i).is_file()]
        if not missing:
            return
        logger.info("generating %d class images of '%s' in %s", len(missing), self.prompt, self.folder)
        started = time.perf_counter()
        shape = (model.channels, model.image_size, model.image_size)
        with tqdm(total=len(missing), desc="class images", unit="image") as progress:
            for start in range(0, len(missing), self.batch_size):
                indices = missing[start : start + self.batch_size]
                generators = [torch.Generator().manual_seed(self.image_seed(i)) for i in indices]
                images, _ = sample_prompt(
                    model, DDIMSampler(model), self.prompt, None, n_samples=len(indices), latent_shape=shape,
                    steps=self.ddim_steps, scale=self.guidance_scale, generator=generators,
                )  # fmt: skip
                pixels = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
                for index, image in zip(indices, pixels.permute(0, 2, 3, 1).cpu().numpy()):
                    write_atomically(self.image_path(index), lambda path, a=image: Image.fromarray(a).save(path, "PNG"))
                progress.update(len(indices))
        # the paper's Table 3 leaves this out of DreamBooth's training time: say it apart
        logger.info("generated %d class images in %.1f s", len(missing), time.perf_counter() - started)

    def _check_prompt(self) -> None:
        """A folder holds the images of one prompt: refuse to mix another class into it."""
        record = self.folder / PROMPT_FILE
        if record.is_file():
            recorded = record.read_text(encoding="utf-8").strip()
            if recorded != self.prompt:
                raise ImageError(
                    f"{self.folder} holds class images of '{recorded}', not '{self.prompt}'; name another folder"
                )
        else:
            record.write_text(self.prompt + "\n", encoding="utf-8")

    def pixels(self) -> torch.Tensor:
        if self.folder is None:
            raise RuntimeError("class images are read after locate() has chosen their folder")
        images = [load_image(self.image_path(i), self.size, resize_mode="squash") for i in range(len(self))]
        return to_tensor(np.stack(images))


class ClassImageFolder(ClassImages):
    """Class images someone brings, with their captions, read (and checked) at construction.

    Two layouts: Custom Diffusion's ``retrieve.py`` (``images.txt`` listing the image files and
    ``caption.txt`` their captions, line by line; the files in ``images/``), or a folder of images
    in name order, each captioned by a ``.txt`` of the same stem beside it or else by the class
    prompt.

    Args:
        folder: the folder.
        class_word, prompt: the caption of an image without one (``prompt`` with ``{}`` = the class word).
        num_images: use the first so many (Custom Diffusion: 200); default all.
    """

    def __init__(
        self,
        folder: str,
        class_word: str = "",
        prompt: str = "a photo of a {}",
        num_images: int | None = None,
        size: int = 512,
        seed: int = 0,
    ):
        super().__init__(size, seed)
        self.folder = Path(folder)
        paths, captions = self._listing(prompt.format(class_word).strip())
        if num_images is not None:
            if len(paths) < num_images:
                raise ImageError(f"{self.folder}: {len(paths)} class images, fewer than num_images={num_images}")
            paths, captions = paths[:num_images], captions[:num_images]
        self.paths, self.captions = paths, captions
        self.images = np.stack([load_image(path, size, resize_mode="squash") for path in paths])

    def _listing(self, default_caption: str) -> tuple[list[Path], list[str]]:
        listed, captioned = self.folder / "images.txt", self.folder / "caption.txt"
        if listed.is_file() and captioned.is_file():
            names = listed.read_text(encoding="utf-8").splitlines()
            captions = captioned.read_text(encoding="utf-8").splitlines()
            if len(names) != len(captions):
                raise ImageError(f"{self.folder}: images.txt lists {len(names)} images, caption.txt {len(captions)} captions")
            return [self.folder / "images" / Path(name).name for name in names], [c.strip() for c in captions]
        paths = list_images(self.folder)
        captions = []
        for path in paths:
            text = path.with_suffix(".txt")
            captions.append(text.read_text(encoding="utf-8").strip() if text.is_file() else default_caption)
        return paths, captions

    def pixels(self) -> torch.Tensor:
        return to_tensor(self.images)


class MiniworldClassImages(ClassImages):
    """The miniature world's retrieval: renders of single-part objects of the class's shape, in
    random colours, patterns, poses and scenes, sometimes beside a second object, each with its
    true caption ("a photo of a red striped ring on the beach").

    Custom Diffusion regularises with real photos whose captions resemble the class; in the
    world the real pictures are renders, and every render of a ring is captioned by what it
    shows. Image ``i`` is a pure function of (seed, i).

    Args:
        shape: the class, one of the world's shapes (the baseline configs take ``--init_word``).
        num_images: how many (Custom Diffusion: 200).
    """

    def __init__(self, shape: str, num_images: int = 200, size: int = 64, seed: int = 0):
        super().__init__(size, seed)
        if shape not in SHAPES:
            raise ValueError(f"class shape '{shape}' is not a shape of the miniature world ({', '.join(SHAPES)})")
        sampler = WorldSampler()
        scenes = []
        for index in range(num_images):
            rng = np.random.default_rng((seed, index))
            main = WorldObject(shape, (random_part(rng),))
            scenes.append(sampler.scene(int(rng.integers(2**31)), main=main))
        renderings = [render(scene, size=size) for scene in scenes]
        self.images = np.stack([r.image for r in renderings])
        self.captions = [r.caption for r in renderings]

    def pixels(self) -> torch.Tensor:
        return to_tensor(self.images)
