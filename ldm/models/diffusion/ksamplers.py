"""Samplers on the noise-level (sigma) scale: DPM-Solver++(2M) and Euler ancestral.

These are the samplers Stable Diffusion users know from k-diffusion ("DPM++ 2M", "Euler a"),
written here around ViCo's guided, reference-aware model call (:class:`GuidedDenoiser`) and
the CompVis ``sample(S, batch_size, shape, conditioning, ...)`` signature.

A latent of the training schedule, ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``, is
``x_t / sqrt(a_t) = x_0 + sigma_t eps`` with ``sigma_t = sqrt((1 - a_t) / a_t)`` (Karras et al.
2022): sampling integrates from the largest sigma down to 0. The loop keeps latents on the
training scale, as DDIM does (the sigma-scale latent is ``x sqrt(1 + sigma^2)``), so ``x_T`` and
the intermediates mean the same for every sampler; the denoised estimate is
``D = x sqrt(1 + sigma^2) - sigma eps(x, t)``.

Noise levels (``spacing``):

* ``"uniform"``: k-diffusion's default for CompVis models: ``S`` timesteps evenly spaced from
  ``T - 1`` down to 0, fractional ones taking the sigma interpolated linearly in log sigma
  between training timesteps, then sigma 0;
* ``"karras"``: Karras et al.'s spacing (rho = 7) between the model's smallest and largest
  sigma, then 0 (the "Karras" variants of SD user interfaces).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ldm.models.diffusion.sampling import SamplingRun, ScheduledSampler, randn
from ldm.modules.vico import AttentionRecord

SPACINGS = ("uniform", "karras")
KARRAS_RHO = 7.0


@dataclass
class SigmaSchedule:
    """Noise levels of one sampling call, in sampling order.

    Attributes:
        sigmas: ``[S + 1]`` decreasing noise levels, the last 0.
        timesteps: ``[S]`` the model's (fractional) timestep of ``sigmas[:-1]``.
    """

    sigmas: Tensor
    timesteps: Tensor

    @classmethod
    def from_model(cls, model, num_steps: int, spacing: str, device: torch.device) -> SigmaSchedule:
        if spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got '{spacing}'")
        alphas_cumprod = model.alphas_cumprod.detach().cpu().double().numpy()
        if not 1 <= num_steps <= len(alphas_cumprod):
            raise ValueError(f"the number of sampling steps must be in 1..{len(alphas_cumprod)}, got {num_steps}")
        log_sigmas = 0.5 * np.log((1 - alphas_cumprod) / alphas_cumprod)  # increasing with t
        train_steps = np.arange(len(log_sigmas), dtype=np.float64)
        if spacing == "uniform":
            timesteps = np.linspace(len(log_sigmas) - 1, 0, num_steps)
            sigmas = np.exp(np.interp(timesteps, train_steps, log_sigmas))
        else:
            ramp = np.linspace(0, 1, num_steps)
            low, high = np.exp(log_sigmas[0]) ** (1 / KARRAS_RHO), np.exp(log_sigmas[-1]) ** (1 / KARRAS_RHO)
            sigmas = (high + ramp * (low - high)) ** KARRAS_RHO
            timesteps = np.interp(np.log(sigmas), log_sigmas, train_steps)
        return cls(
            sigmas=torch.tensor(np.append(sigmas, 0.0), dtype=torch.float32, device=device),
            timesteps=torch.tensor(timesteps, dtype=torch.float32, device=device),
        )

    def __len__(self) -> int:
        return self.timesteps.shape[0]

    def step_timestep(self, step: int) -> float:
        """The (fractional) timestep of sampling step ``step`` (0 = the first, noisiest)."""
        return float(self.timesteps[step])


class SigmaSampler(ScheduledSampler):
    """Base of the samplers on the sigma scale: the schedule and the denoised estimate."""

    def __init__(self, model, spacing: str = "uniform"):
        super().__init__(model)
        if spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got '{spacing}'")
        self.spacing = spacing

    def make_schedule(self, steps: int, eta: float, device: torch.device) -> SigmaSchedule:
        return SigmaSchedule.from_model(self.model, steps, self.spacing, device)

    @staticmethod
    def denoise(
        x: Tensor, step: int, run: SamplingRun, records: list[AttentionRecord] | None
    ) -> tuple[Tensor, Tensor]:
        """``(x_bar, D)``: the sigma-scale latent of ``x`` at ``step`` and the denoised estimate."""
        sigma = run.schedule.sigmas[step]
        eps = run.denoiser(x, run.schedule.timesteps[step], records)
        x_bar = x * (1 + sigma**2).sqrt()
        return x_bar, x_bar - sigma * eps

    @staticmethod
    def to_training_scale(x_bar: Tensor, sigma: Tensor) -> Tensor:
        return x_bar / (1 + sigma**2).sqrt()


class DPMSolverPP2MSampler(SigmaSampler):
    """DPM-Solver++(2M) (Lu et al. 2022): deterministic, second-order multistep in log sigma.

    With ``lambda = -log sigma`` and ``h`` the step in ``lambda``, a step moves
    ``x_bar' = (sigma'/sigma) x_bar + (1 - sigma'/sigma) D'``, where ``D'`` is the denoised
    estimate ``D`` on the first and the last step (to sigma 0) and otherwise the extrapolation
    ``(1 + 1/(2r)) D - 1/(2r) D_prev`` with ``r = h_prev / h``. ``eta`` must be 0.
    """

    name = "DPM-Solver++(2M) Sampler"

    def check_eta(self, eta: float) -> None:
        if eta != 0:
            raise ValueError(f"eta must be 0 for DPM-Solver++(2M), got {eta}")

    def update(
        self, x: Tensor, index: int, run: SamplingRun, records: list[AttentionRecord] | None
    ) -> tuple[Tensor, Tensor]:
        step = len(run.schedule) - 1 - index
        sigmas = run.schedule.sigmas
        sigma, sigma_next = sigmas[step], sigmas[step + 1]
        x_bar, denoised = self.denoise(x, step, run, records)
        estimate = denoised
        if run.history and sigma_next > 0:
            h = (sigma / sigma_next).log()
            r = (sigmas[step - 1] / sigma).log() / h
            estimate = (1 + 1 / (2 * r)) * denoised - run.history[-1] / (2 * r)
        run.history[:] = [denoised]
        ratio = sigma_next / sigma
        x_bar = ratio * x_bar + (1 - ratio) * estimate
        return self.to_training_scale(x_bar, sigma_next), denoised


class EulerAncestralSampler(SigmaSampler):
    """Euler ancestral: an Euler step down to ``sigma_down``, then fresh noise of ``sigma_up``.

    ``sigma_up = min(sigma', eta sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2))`` and
    ``sigma_down = sqrt(sigma'^2 - sigma_up^2)``; ``eta`` = 1 (the default) is the usual
    "Euler a", ``eta`` = 0 plain (deterministic) Euler. The noise comes from the ``generator``.
    """

    name = "Euler Ancestral Sampler"
    default_eta = 1.0

    def update(
        self, x: Tensor, index: int, run: SamplingRun, records: list[AttentionRecord] | None
    ) -> tuple[Tensor, Tensor]:
        step = len(run.schedule) - 1 - index
        sigma, sigma_next = run.schedule.sigmas[step], run.schedule.sigmas[step + 1]
        x_bar, denoised = self.denoise(x, step, run, records)
        sigma_up = torch.minimum(
            sigma_next, run.eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt()
        )
        sigma_down = (sigma_next**2 - sigma_up**2).sqrt()
        x_bar = denoised + sigma_down * (x_bar - denoised) / sigma
        if sigma_next > 0 and run.eta > 0:
            x_bar = x_bar + sigma_up * randn(tuple(x.shape), run.generator, x.device, x.dtype)
        return self.to_training_scale(x_bar, sigma_next), denoised
