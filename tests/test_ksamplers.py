"""DPM-Solver++(2M) and Euler ancestral: their noise levels, their update rules on stub
denoisers, and on the tiny model against DDIM (same image family, determinism per seed)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ldm.models.diffusion.ksamplers import DPMSolverPP2MSampler, EulerAncestralSampler, SigmaSchedule
from ldm.models.diffusion.samplers import SAMPLERS, make_sampler
from ldm.models.diffusion.sampling import SamplingReference, SamplingRun
from tests.test_sampling import LATENT, build_tiny, conditioning, references, tiny_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def schedule_model():
    """Only what the sigma schedule reads: SD v1's scaled-linear ``alphas_cumprod``."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return SimpleNamespace(alphas_cumprod=torch.cumprod(1 - betas, 0))


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(tiny_config())


def discrete_sigmas(model) -> np.ndarray:
    a = model.alphas_cumprod.numpy()
    return np.sqrt((1 - a) / a)


def test_uniform_noise_levels_follow_k_diffusion(schedule_model):
    schedule = SigmaSchedule.from_model(schedule_model, 10, "uniform", CPU)
    assert len(schedule) == 10 and schedule.sigmas.shape == (11,) and schedule.sigmas[-1] == 0
    assert np.allclose(schedule.timesteps.numpy(), np.linspace(999, 0, 10))
    sigmas = discrete_sigmas(schedule_model)
    assert schedule.sigmas[0].item() == pytest.approx(sigmas[999], rel=1e-6)
    assert schedule.sigmas[9].item() == pytest.approx(sigmas[0], rel=1e-6)
    t = schedule.timesteps[1].item()  # 888: fractional timesteps interpolate log sigma
    low, high = math.floor(t), math.ceil(t)
    expected = math.exp(np.interp(t, [low, high], np.log(sigmas[[low, high]])))
    assert schedule.sigmas[1].item() == pytest.approx(expected, rel=1e-6)
    assert (schedule.sigmas[:-1] > schedule.sigmas[1:]).all()


def test_karras_noise_levels(schedule_model):
    schedule = SigmaSchedule.from_model(schedule_model, 5, "karras", CPU)
    sigmas = discrete_sigmas(schedule_model)
    rho = 7.0
    ramp = np.linspace(0, 1, 5)
    expected = (sigmas[-1] ** (1 / rho) + ramp * (sigmas[0] ** (1 / rho) - sigmas[-1] ** (1 / rho))) ** rho
    assert np.allclose(schedule.sigmas[:-1].numpy(), expected, rtol=1e-5)
    back = np.exp(np.interp(schedule.timesteps.numpy(), np.arange(1000), np.log(sigmas)))
    assert np.allclose(back, expected, rtol=1e-4)  # each sigma's timestep maps back to it


def point_mass_denoiser(schedule: SigmaSchedule, x0: torch.Tensor):
    """The exact noise prediction when all data is ``x0``: every solver must land on it."""

    def denoiser(x, t, records=None):
        step = int(torch.argmin((schedule.timesteps - t).abs()))
        sigma = schedule.sigmas[step]
        return (x * (1 + sigma**2).sqrt() - x0) / sigma

    return denoiser


@pytest.mark.parametrize("sampler_class", [DPMSolverPP2MSampler, EulerAncestralSampler])
@pytest.mark.parametrize("spacing", ["uniform", "karras"])
def test_a_point_mass_is_reached_exactly(schedule_model, sampler_class, spacing):
    sampler = sampler_class(schedule_model, spacing)
    schedule = sampler.make_schedule(8, 0.0, CPU)
    x0 = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(0))
    run = SamplingRun(schedule, point_mass_denoiser(schedule, x0), torch.Generator().manual_seed(1), eta=1.0)
    x = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(2))
    for step in range(len(schedule)):
        x, denoised = sampler.update(x, len(schedule) - 1 - step, run, None)
        torch.testing.assert_close(denoised, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x, x0, atol=1e-4, rtol=1e-4)


def test_dpmpp_2m_update_matches_the_formula(schedule_model):
    """A stub whose denoised estimate is a known tensor per step checks the multistep rule."""
    sampler = DPMSolverPP2MSampler(schedule_model)
    schedule = sampler.make_schedule(4, 0.0, CPU)
    sigmas = schedule.sigmas.double()
    targets = [torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in range(4)]

    def denoiser(x, t, records=None):
        step = int(torch.argmin((schedule.timesteps - t).abs()))
        sigma = sigmas[step]
        return ((x.double() * (1 + sigma**2).sqrt() - targets[step]) / sigma).float()

    run = SamplingRun(schedule, denoiser, None)
    x = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(9))
    x_bar = x.double() * (1 + sigmas[0] ** 2).sqrt()
    for step in range(4):
        x, _ = sampler.update(x, 3 - step, run, None)
        s, s_next = sigmas[step], sigmas[step + 1]
        estimate = targets[step]
        if 0 < step and s_next > 0:
            h, h_last = math.log(s / s_next), math.log(sigmas[step - 1] / s)
            r = h_last / h
            estimate = (1 + 1 / (2 * r)) * targets[step] - targets[step - 1] / (2 * r)
        x_bar = (s_next / s) * x_bar + (1 - s_next / s) * estimate
        torch.testing.assert_close(x.double(), x_bar / (1 + s_next**2).sqrt(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x.double(), targets[3], atol=1e-4, rtol=1e-4)  # the last step lands on D


def test_samplers_by_name_and_their_checks(tiny):
    assert set(SAMPLERS) == {"ddim", "plms", "dpmpp_2m", "euler_a"}
    assert make_sampler("euler_a", tiny, "karras").spacing == "karras"
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        make_sampler("heun", tiny)
    with pytest.raises(ValueError, match="uniform DDIM timesteps"):
        make_sampler("ddim", tiny, "karras")
    _, c, uc = conditioning(tiny)
    with pytest.raises(ValueError, match="eta must be 0 for DPM-Solver"):
        make_sampler("dpmpp_2m", tiny).sample(3, 1, LATENT, c, eta=0.5, verbose=False)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="the guidance scale must be a finite number"):
            make_sampler("euler_a", tiny).sample(3, 1, LATENT, c, None, bad, uc, verbose=False)
        with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
            make_sampler("ddim", tiny).sample(3, 1, LATENT, c, eta=bad, verbose=False)


# ------------------------------------------------------------------ tiny model
@pytest.fixture(scope="module")
def tiny_runs(tiny):
    """Final latents of each sampler at 40 steps from the same starting noise, and DDIM from other noise."""
    tokens, c, uc = conditioning(tiny)
    reference = SamplingReference(references(1), tokens)

    def run(name: str, seed: int = 0, noise_seed: int = 1, **kwargs) -> torch.Tensor:
        x_T = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(seed))
        generator = [torch.Generator().manual_seed(noise_seed)]
        sampler = make_sampler(name, tiny)
        return sampler.sample(40, 1, LATENT, c, reference, 3.0, uc, x_T=x_T, generator=generator, verbose=False, **kwargs)[0]

    return {
        "ddim": run("ddim"),
        "ddim_other_noise": run("ddim", seed=5),
        "ddim_eta_1": run("ddim", eta=1.0),
        "ddim_eta_1_other_noise": run("ddim", seed=5, noise_seed=2, eta=1.0),
        "dpmpp_2m": run("dpmpp_2m"),
        "euler": run("euler_a", eta=0.0),
        "euler_a": run("euler_a"),
        "euler_a_again": run("euler_a"),
        "euler_a_other_seed": run("euler_a", noise_seed=2),
    }


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_sigma_samplers_give_the_ddim_image_family(tiny_runs):
    """From the same noise, each sampler ends near DDIM's image (the deterministic ones near
    DDIM with eta 0, Euler ancestral near DDIM with eta 1, which draws its step noise the same
    way), far nearer than DDIM itself from other noise; the two deterministic solvers of the
    same ODE on the same noise levels nearly agree."""
    for name, ddim_name in (("dpmpp_2m", "ddim"), ("euler", "ddim"), ("euler_a", "ddim_eta_1")):
        ddim, other = tiny_runs[ddim_name], tiny_runs[f"{ddim_name}_other_noise"]
        apart = distance(other, ddim)
        assert apart > 0.5, ddim_name
        assert distance(tiny_runs[name], ddim) < min(0.3, apart / 3), name
    assert distance(tiny_runs["dpmpp_2m"], tiny_runs["ddim"]) < 0.15
    assert distance(tiny_runs["dpmpp_2m"], tiny_runs["euler"]) < 0.05


def test_euler_ancestral_is_deterministic_per_seed(tiny_runs):
    assert torch.equal(tiny_runs["euler_a"], tiny_runs["euler_a_again"])
    assert distance(tiny_runs["euler_a_other_seed"], tiny_runs["euler_a"]) > 1e-3
    assert distance(tiny_runs["euler_a"], tiny_runs["euler"]) > 1e-3  # the ancestral noise matters


def test_each_sample_depends_on_its_own_generator_only(tiny):
    """With one generator per sample, sample k of a batch is sample k made alone."""
    tokens, c, uc = conditioning(tiny)
    reference = SamplingReference(references(1), tokens)

    def run(seeds: list[int]) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return make_sampler("euler_a", tiny).sample(6, len(seeds), LATENT, c, reference, 3.0, uc, generator=generators, verbose=False)[0]

    batch = run([11, 12])
    torch.testing.assert_close(batch[1:], run([12]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batch[:1], run([11]), atol=1e-4, rtol=1e-4)
