"""Diagonal Gaussian posterior produced by the KL autoencoder's encoder."""

import torch
from torch import Tensor


class DiagonalGaussianDistribution:
    """Gaussian with diagonal covariance, parameterised by ``[mean, logvar]`` stacked on dim 1.

    ``mean`` and ``std`` are exposed as plain tensors so callers can cache them and
    draw ``mean + std * randn`` themselves; :meth:`sample` does exactly that.
    """

    LOGVAR_MIN = -30.0
    LOGVAR_MAX = 20.0

    def __init__(self, parameters: Tensor, deterministic: bool = False) -> None:
        self.parameters = parameters
        self.deterministic = deterministic
        mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.mean = mean
        # Clamping keeps exp() finite for badly conditioned encoder outputs.
        self.logvar = torch.clamp(logvar, self.LOGVAR_MIN, self.LOGVAR_MAX)
        if deterministic:
            self.var = torch.zeros_like(mean)
            self.std = torch.zeros_like(mean)
        else:
            self.var = torch.exp(self.logvar)
            self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterised draw ``mean + std * eps``.

        ``eps`` is drawn on the generator's device (so a CPU generator gives the same
        numbers whatever device the mean lives on) and then moved to the mean's device.
        """
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> Tensor:
        return self.mean
