"""Pretraining a base model from scratch: the autoencoder, then the UNet with the text encoder.

ViCo itself never trains these parts; this is how the miniature world's base model
(``models/miniworld/base.safetensors``) is made. The result is a :class:`LatentDiffusion` whose
:meth:`~LatentDiffusion.base_state_dict` is written in the CompVis single-file layout, so it
loads exactly as ``sd-v1-4.ckpt`` does.

* :class:`AutoencoderPretraining`: L1 + MSE reconstruction with a small KL term, as the KL
  autoencoders of latent diffusion (without their perceptual and adversarial terms, which
  need downloaded networks); :func:`normalise_latent_scale` then rescales the latent space so
  that the config's ``scale_factor`` gives unit-variance latents.
* :class:`TextToImagePretraining`: noise prediction on cached latents with the captions'
  text encoder trained jointly, caption dropout for classifier-free guidance and min-SNR
  loss weighting (Hang et al., 2023), which speeds up convergence on a small budget.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ldm.models.autoencoder import AutoencoderKL
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.modules.diffusionmodules.util import extract_into_tensor


def warmup_cosine(warmup_steps: int, total_steps: int, final_fraction: float = 0.1):
    """Learning-rate multiplier: linear warm-up, then cosine decay to ``final_fraction``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def to_signed(images: Tensor) -> Tensor:
    """``uint8 [B, H, W, 3]`` -> float ``[B, 3, H, W]`` in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


class ImageArray(Dataset):
    """Items are rows of a ``uint8 [N, H, W, 3]`` array."""

    def __init__(self, images: np.ndarray):
        self.images = torch.from_numpy(images)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index]


def fused_adamw(parameters: Iterable[torch.nn.Parameter], learning_rate: float) -> torch.optim.AdamW:
    """AdamW without weight decay, one fused kernel per step (CPU and CUDA).

    The base model has 736 parameter tensors; torch's default AdamW on CPU updates them one
    by one, some 14,000 more ops per step than the fused update (``scripts/benchmark.py
    --pretraining_only`` times both).
    """
    return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0, fused=True)


class LatentCaptionArray(Dataset):
    """Items are (posterior mean, posterior std, caption tokens) of pre-encoded pictures."""

    def __init__(self, mean: Tensor, std: Tensor, tokens: Tensor):
        if not mean.shape[0] == std.shape[0] == tokens.shape[0]:
            raise ValueError("latents and captions must have the same number of rows")
        self.mean, self.std, self.tokens = mean, std, tokens

    def __len__(self) -> int:
        return self.mean.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.mean[index], self.std[index], self.tokens[index]


class AutoencoderPretraining(pl.LightningModule):
    """Train an :class:`AutoencoderKL` to reconstruct images through its Gaussian posterior.

    Args:
        autoencoder: the model to train (all of it).
        learning_rate: AdamW peak learning rate.
        kl_weight: weight of the KL divergence to N(0, I), summed over latent cells.
        warmup_steps: linear warm-up before the cosine decay over ``trainer.max_steps``.
        crop_size: train on random square crops of this side (the networks are convolutional;
            SD's autoencoder was trained on 256 px crops too); ``None`` uses whole images.
    """

    def __init__(
        self,
        autoencoder: AutoencoderKL,
        learning_rate: float,
        kl_weight: float = 1e-6,
        warmup_steps: int = 100,
        crop_size: int | None = None,
    ):
        super().__init__()
        self.autoencoder = autoencoder
        self.learning_rate = learning_rate
        self.kl_weight = kl_weight
        self.warmup_steps = warmup_steps
        self.crop_size = crop_size

    def crop(self, images: Tensor) -> Tensor:
        """One random crop position per batch (a view, no copy)."""
        size = self.crop_size
        if size is None or size >= min(images.shape[-2:]):
            return images
        top, left = (int(torch.randint(0, extent - size + 1, ())) for extent in images.shape[-2:])
        return images[..., top : top + size, left : left + size]

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        images = self.crop(to_signed(batch))
        posterior = self.autoencoder.encode(images)
        reconstruction = self.autoencoder.decode(posterior.sample())
        l1 = (reconstruction - images).abs().mean()
        mse = F.mse_loss(reconstruction, images)
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).sum(dim=(1, 2, 3)).mean()
        loss = l1 + mse + self.kl_weight * kl
        self.log_dict({"vae/loss": loss, "vae/l1": l1, "vae/mse": mse, "vae/kl": kl}, prog_bar=False)
        self.log("l1", l1, prog_bar=True, logger=False)
        return loss

    def configure_optimizers(self) -> Mapping[str, Any]:
        optimizer = fused_adamw(self.autoencoder.parameters(), self.learning_rate)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(self.warmup_steps, self.trainer.max_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@torch.no_grad()
def normalise_latent_scale(autoencoder: AutoencoderKL, images: Tensor, scale_factor: float, chunk: int = 256) -> float:
    """Rescale the latent space in place so that ``scale_factor * latent`` has unit std.

    The encoder's mean and log-variance outputs and the decoder's input convolution are
    reparameterised exactly (``z' = c z``), so reconstructions do not change; SD instead
    measured its 0.18215 and wrote it into the config. Returns ``c``.

    Args:
        images: ``uint8 [N, H, W, 3]`` pictures whose posterior samples set the scale.
    """
    latents = torch.cat([autoencoder.encode(to_signed(part)).sample() for part in images.split(chunk)])
    c = 1.0 / (scale_factor * latents.float().std().item())
    mean_channels = autoencoder.quant_conv.out_channels // 2
    autoencoder.quant_conv.weight[:mean_channels] *= c
    autoencoder.quant_conv.bias[:mean_channels] *= c
    autoencoder.quant_conv.bias[mean_channels:] += 2.0 * math.log(c)
    autoencoder.post_quant_conv.weight /= c
    return c


class TextToImagePretraining(pl.LightningModule):
    """Train the UNet and the text encoder of a :class:`LatentDiffusion` (autoencoder frozen).

    Batches hold posterior means/stds of pre-encoded pictures and their caption tokens.

    Args:
        model: the latent diffusion model; its UNet and text encoder are made trainable.
        learning_rate: AdamW peak learning rate.
        empty_tokens: ``[77]`` tokens of the empty caption, used for dropped captions.
        caption_dropout: probability of replacing a caption by the empty one (classifier-free
            guidance needs the unconditional prediction).
        snr_gamma: min-SNR weighting ``min(SNR, gamma) / SNR`` of the noise loss; 0 turns it off.
        warmup_steps: linear warm-up before the cosine decay over ``trainer.max_steps``.
    """

    def __init__(
        self,
        model: LatentDiffusion,
        learning_rate: float,
        empty_tokens: Tensor,
        caption_dropout: float = 0.1,
        snr_gamma: float = 5.0,
        warmup_steps: int = 200,
    ):
        super().__init__()
        self.model = model
        self.learning_rate = learning_rate
        self.caption_dropout = caption_dropout
        self.snr_gamma = snr_gamma
        self.warmup_steps = warmup_steps
        self.register_buffer("empty_tokens", empty_tokens.reshape(1, -1).clone(), persistent=False)
        model.requires_grad_(False)
        for part in self.trained_modules():
            part.requires_grad_(True)

    def trained_modules(self) -> list[torch.nn.Module]:
        return [self.model.model.diffusion_model, self.model.cond_stage_model]

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, per_sample = self.losses(batch)
        self.log_dict({"ldm/loss": loss, "ldm/mse": per_sample.mean()}, prog_bar=False)
        self.log("mse", per_sample.mean(), prog_bar=True, logger=False)
        return loss

    def losses(self, batch: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """The min-SNR-weighted loss of a batch and each sample's plain noise MSE."""
        mean, std, tokens = batch
        latent = self.model.scale_factor * (mean + std * torch.randn_like(std))
        dropped = torch.rand(tokens.shape[0], device=tokens.device) < self.caption_dropout
        tokens = torch.where(dropped[:, None], self.empty_tokens, tokens)
        context = self.model.get_learned_conditioning(tokens)
        t = torch.randint(0, self.model.num_timesteps, (latent.shape[0],), device=latent.device)
        noise = torch.randn_like(latent)
        prediction = self.model.apply_model(self.model.q_sample(latent, t, noise), t, context)
        per_sample = (prediction - noise).float().pow(2).mean(dim=(1, 2, 3))
        return (per_sample * self.loss_weights(t)).mean(), per_sample

    def loss_weights(self, t: Tensor) -> Tensor:
        if self.snr_gamma <= 0:
            return torch.ones_like(t, dtype=torch.float32)
        alpha = extract_into_tensor(self.model.alphas_cumprod, t, t.shape)
        snr = alpha / (1 - alpha)
        return snr.clamp(max=self.snr_gamma) / snr

    def configure_optimizers(self) -> Mapping[str, Any]:
        parameters = [p for part in self.trained_modules() for p in part.parameters()]
        optimizer = fused_adamw(parameters, self.learning_rate)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(self.warmup_steps, self.trainer.max_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
