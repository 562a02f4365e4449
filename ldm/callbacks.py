"""Lightning callbacks of a ViCo run."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.sampling import sample_prompt

logger = logging.getLogger(__name__)


class ImageLogger(pl.Callback):
    """Every ``batch_frequency`` steps, sample the batch's first caption with its reference.

    Writes ``<logdir>/images/train/step-XXXXXX.png``: the reference photo, then
    ``max_images`` guided DDIM samples; the caption goes to the ``.txt`` beside it.
    """

    def __init__(
        self,
        logdir: str,
        batch_frequency: int = 50,
        max_images: int = 4,
        ddim_steps: int = 50,
        guidance_scale: float = 7.5,
    ):
        super().__init__()
        self.folder = Path(logdir) / "images" / "train"
        self.batch_frequency = batch_frequency
        self.max_images = max_images
        self.ddim_steps = ddim_steps
        self.guidance_scale = guidance_scale

    @rank_zero_only
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        end_of_step = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if self.batch_frequency <= 0 or step % self.batch_frequency or not end_of_step:
            return
        caption = batch["caption"][0]
        with torch.no_grad(), _eval_mode(pl_module):
            images = self.sample(pl_module, caption, batch["reference_index"][:1], batch["reference_flip"][:1], step)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step-{step:06d}.png"
        save_image(make_grid((images.float().clamp(-1, 1) + 1) / 2, nrow=images.shape[0]), path)
        path.with_suffix(".txt").write_text(caption + "\n")
        logger.info("logged samples of '%s' to %s", caption, path)

    def sample(self, model: pl.LightningModule, caption: str, reference_index: torch.Tensor, reference_flip: torch.Tensor, seed: int) -> torch.Tensor:
        """The reference (as the VAE sees it) followed by guided samples of ``caption``."""
        generator = torch.Generator(device=model.device).manual_seed(seed)
        reference_latent = model.cached_latent(reference_index, reference_flip, generator)
        samples, _ = sample_prompt(
            model,
            DDIMSampler(model),
            caption,
            reference_latent,
            n_samples=self.max_images,
            latent_shape=tuple(reference_latent.shape[1:]),
            steps=self.ddim_steps,
            scale=self.guidance_scale,
            generator=generator,
        )
        return torch.cat([model.decode_first_stage(reference_latent), samples])


class _eval_mode:
    """Switch a module to eval for the duration of a block, then restore its mode."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.was_training = module.training

    def __enter__(self) -> None:
        self.module.eval()

    def __exit__(self, *exc: object) -> None:
        self.module.train(self.was_training)
