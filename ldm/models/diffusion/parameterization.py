"""What the UNet predicts: the noise (``"eps"``, SD v1, SD 2.x 512-base) or the velocity (``"v"``,
SD 2.x 768; Salimans & Ho 2022), and the conversions between them.

With ``a = alphas_cumprod[t]`` a latent of the training schedule is
``x_t = sqrt(a) x_0 + sqrt(1 - a) eps`` and the velocity is ``v = sqrt(a) eps - sqrt(1 - a) x_0``.
Since ``(sqrt(a), sqrt(1 - a))`` is a unit vector, the pair ``(x_t, v)`` is a rotation of
``(x_0, eps)`` and inverts as

    eps = sqrt(a) v + sqrt(1 - a) x_t        x_0 = sqrt(a) x_t - sqrt(1 - a) v.

The samplers work with ``eps``; a v-model's output is converted once, after classifier-free
guidance (the conversion is affine in the output with the same ``x_t`` in both branches, so
guiding ``v`` and guiding ``eps`` give the same result). On the sigma scale of the k-samplers
(``sigma^2 = (1 - a) / a``) the same formulas hold with ``a = 1 / (1 + sigma^2)``, which is how
they evaluate fractional timesteps.
"""
from __future__ import annotations

from torch import Tensor

PARAMETERIZATIONS = ("eps", "v")


def _coefficients(alpha_cumprod: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """``sqrt(a)`` and ``sqrt(1 - a)``, shaped to broadcast over ``like`` (``a`` is 0-dim or ``[B]``)."""
    a = alpha_cumprod.to(device=like.device, dtype=like.dtype)
    a = a.reshape(a.shape + (1,) * (like.ndim - a.ndim)) if a.ndim else a
    return a.sqrt(), (1 - a).sqrt()


def v_target(x_start: Tensor, noise: Tensor, alpha_cumprod: Tensor) -> Tensor:
    """The velocity ``sqrt(a) eps - sqrt(1 - a) x_0`` (the training target of a v-model)."""
    sqrt_a, sqrt_one_minus_a = _coefficients(alpha_cumprod, x_start)
    return sqrt_a * noise - sqrt_one_minus_a * x_start


def eps_from_v(x_t: Tensor, v: Tensor, alpha_cumprod: Tensor) -> Tensor:
    """The noise of ``x_t`` given its predicted velocity: ``sqrt(a) v + sqrt(1 - a) x_t``."""
    sqrt_a, sqrt_one_minus_a = _coefficients(alpha_cumprod, x_t)
    return sqrt_a * v + sqrt_one_minus_a * x_t


def x0_from_v(x_t: Tensor, v: Tensor, alpha_cumprod: Tensor) -> Tensor:
    """The clean latent of ``x_t`` given its predicted velocity: ``sqrt(a) x_t - sqrt(1 - a) v``."""
    sqrt_a, sqrt_one_minus_a = _coefficients(alpha_cumprod, x_t)
    return sqrt_a * x_t - sqrt_one_minus_a * v


def to_eps(parameterization: str, x_t: Tensor, output: Tensor, alpha_cumprod: Tensor) -> Tensor:
    """The noise prediction of a model ``output`` of the given parameterization."""
    if parameterization == "eps":
        return output
    if parameterization == "v":
        return eps_from_v(x_t, output, alpha_cumprod)
    raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got '{parameterization}'")
