"""DDIM sampling (Song et al. 2021) with ViCo's shared reference stream, CompVis call signature."""
from __future__ import annotations

from torch import Tensor

from ldm.models.diffusion.sampling import SamplingReference, SamplingRun, ScheduledSampler
from ldm.modules.vico import AttentionRecord

__all__ = ["DDIMSampler", "SamplingReference"]


class DDIMSampler(ScheduledSampler):
    """``DDIMSampler(model).sample(S, batch_size, shape, conditioning, reference=..., ...)``.

    ``eta`` = 0 is deterministic DDIM; ``eta`` > 0 adds ``sigma_t`` noise drawn from the
    ``generator`` passed to :meth:`sample` (``eta`` = 1 is DDPM-like).
    """

    name = "DDIM Sampler"

    def update(
        self, x: Tensor, index: int, run: SamplingRun, records: list[AttentionRecord] | None
    ) -> tuple[Tensor, Tensor]:
        eps = run.denoiser(x, run.schedule.timesteps[index], records)
        return run.schedule.step(x, eps, index, run.generator)
