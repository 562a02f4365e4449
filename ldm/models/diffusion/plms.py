"""PLMS sampling (pseudo linear multistep, Liu et al. 2022) as in CompVis, with ViCo's shared
reference stream."""
from __future__ import annotations

from torch import Tensor

from ldm.models.diffusion.sampling import SamplingReference, SamplingRun, ScheduledSampler
from ldm.modules.vico import AttentionRecord

__all__ = ["PLMSSampler", "SamplingReference"]

#: Adams-Bashforth coefficients by the number of earlier noise predictions used (1-3); the
#: first step has none and uses the pseudo improved Euler correction instead.
_MULTISTEP = {
    1: ((3.0, -1.0), 2.0),
    2: ((23.0, -16.0, 5.0), 12.0),
    3: ((55.0, -59.0, 37.0, -9.0), 24.0),
}


class PLMSSampler(ScheduledSampler):
    """``PLMSSampler(model).sample(...)``: the DDIM signature, deterministic (``eta`` must be 0).

    The first step takes a DDIM step, evaluates the model there at the next timestep and
    averages the two predictions (pseudo improved Euler); later steps combine the current
    prediction with up to three earlier ones (2nd- to 4th-order linear multistep).
    """

    name = "PLMS Sampler"

    def check_eta(self, eta: float) -> None:
        if eta != 0:
            raise ValueError(f"eta must be 0 for PLMS, got {eta}")

    def update(
        self, x: Tensor, index: int, run: SamplingRun, records: list[AttentionRecord] | None
    ) -> tuple[Tensor, Tensor]:
        schedule, previous = run.schedule, run.previous_eps
        eps = run.denoiser(x, schedule.timesteps[index], records)
        if not previous:
            x_next, _ = schedule.step(x, eps, index)
            eps_next = run.denoiser(x_next, schedule.timesteps[max(index - 1, 0)])
            eps_prime = (eps + eps_next) / 2
        else:
            weights, divisor = _MULTISTEP[len(previous)]
            history = [eps, *reversed(previous)]
            eps_prime = sum(w * e for w, e in zip(weights, history)) / divisor
        previous.append(eps)
        del previous[:-3]
        return schedule.step(x, eps_prime, index)
