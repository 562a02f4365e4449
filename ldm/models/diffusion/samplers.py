"""The samplers by name, as ``sample.py --sampler`` and the Python API know them."""
from __future__ import annotations

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.ksamplers import SPACINGS, DPMSolverPP2MSampler, EulerAncestralSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.sampling import ScheduledSampler

SAMPLERS: dict[str, type[ScheduledSampler]] = {
    "ddim": DDIMSampler,
    "plms": PLMSSampler,
    "dpmpp_2m": DPMSolverPP2MSampler,
    "euler_a": EulerAncestralSampler,
}
#: Samplers that run on the DDIM timesteps (the others take any step count and a ``spacing``).
DDIM_GRID_SAMPLERS = ("ddim", "plms")


def make_sampler(name: str, model, spacing: str = "uniform") -> ScheduledSampler:
    """The sampler ``name`` (a key of :data:`SAMPLERS`) for ``model``.

    Args:
        spacing: the noise levels of the sigma samplers (``dpmpp_2m``, ``euler_a``), one of
            :data:`ldm.models.diffusion.ksamplers.SPACINGS`; DDIM and PLMS take the uniform
            CompVis timesteps.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}'; choose one of {', '.join(SAMPLERS)}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got '{spacing}'")
    if name in DDIM_GRID_SAMPLERS:
        if spacing != "uniform":
            raise ValueError(f"{name} runs on the uniform DDIM timesteps; spacing '{spacing}' is for dpmpp_2m and euler_a")
        return SAMPLERS[name](model)
    return SAMPLERS[name](model, spacing)
