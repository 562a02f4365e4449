"""LatentDiffusion: the model of :mod:`ldm.models.diffusion.latent` with its Lightning
training loop (ViCo's training step, its two learning rates, checkpoints of what trains).

Configs name this class; what only samples builds :class:`LatentDiffusionModel` from the same
config (:data:`ldm.models.diffusion.latent.SAMPLING_CLASSES`): the same weights under the same
keys, without importing Lightning.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from ldm.models.diffusion.latent import LatentDiffusionModel
from ldm.modules.precision import autocast_dtype, cache_autocast_weights, release_autocast_weights
from ldm.util import check_state_dict


class LatentDiffusion(LatentDiffusionModel, pl.LightningModule):
    """:class:`LatentDiffusionModel` trained by Lightning (constructor arguments: its).

    ``seed`` (main.py's ``--seed``) keys each step's randomness; ``run_config`` (the whole
    run config) is stored in every checkpoint.
    """

    seed: int = 0
    run_config: dict[str, Any] | None = None

    @property
    def strict_loading(self) -> bool:
        """Training checkpoints hold only the trained weights (:meth:`on_load_checkpoint` checks them)."""
        return False

    def on_train_start(self) -> None:
        trainable = {id(p) for p in self.trainable_parameters()}
        wrong = [n for n, p in self.named_parameters() if p.requires_grad != (id(p) in trainable)]
        if wrong:
            raise RuntimeError(f"only S* and the image attention may train; check {wrong[:3]}")
        dataset = self.trainer.datamodule.train_dataset
        self.cache_first_stage(dataset.pixels(), with_flips=dataset.flip_p > 0)
        dtype = autocast_dtype(self.trainer.precision)
        if dtype is not None:  # the frozen UNet and text encoder, cast once (bit-identical to autocast's casts)
            cache_autocast_weights(self.model, dtype)
            cache_autocast_weights(self.cond_stage_model, dtype)

    def on_train_end(self) -> None:
        release_autocast_weights(self)

    def step_generator(self, batch_idx: int) -> torch.Generator:
        """Randomness of one training step as a function of (seed, step, micro-batch, rank).

        Timesteps, noise and latent samples then do not depend on how the run was split:
        a resumed run draws what an uninterrupted one would have drawn.
        """
        micro_batch = batch_idx % self.trainer.accumulate_grad_batches
        key = np.random.SeedSequence((self.seed, self.global_step, micro_batch, self.global_rank))
        return torch.Generator(device=self.device).manual_seed(int(key.generate_state(1)[0]))

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        generator = self.step_generator(batch_idx)
        latent = self.cached_latent(batch["image_index"], batch["flip"], generator)
        reference_latent = self.cached_latent(batch["reference_index"], batch["reference_flip"], generator)
        tokens = self.tokenize(batch["caption"])
        context = self.get_learned_conditioning(tokens)
        t = torch.randint(0, self.num_timesteps, (latent.shape[0],), device=self.device, generator=generator)
        noise = torch.randn(latent.shape, generator=generator, device=self.device, dtype=latent.dtype)
        reference = self.reference_condition(reference_latent, context, tokens)
        loss, logs = self.p_losses(latent, t, context, reference, noise=noise)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, on_step=True, batch_size=latent.shape[0])
        self.log("loss", logs["loss"], prog_bar=True, logger=False, batch_size=latent.shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW with the paper's two learning rates: S* and the image attention."""
        groups = [{"params": self.placeholder_parameters(), "lr": self.learning_rate}]
        image_attention = self.image_attention_parameters()
        if image_attention:
            groups.append({"params": image_attention, "lr": self.image_attention_learning_rate})
        return torch.optim.AdamW(groups)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only what was trained (and the run config): a few hundred MB, not 4 GB."""
        checkpoint["state_dict"] = self.trained_state_dict()
        if self.run_config is not None:
            checkpoint["config"] = self.run_config

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        expected = self.trained_state_dict()
        check_state_dict(expected, checkpoint["state_dict"], "checkpoint", expected.keys())
