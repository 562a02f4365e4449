"""KL-regularised autoencoder used as the frozen first stage of Stable Diffusion v1."""

from typing import Any

from torch import Tensor, nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution


class AutoencoderKL(nn.Module):
    """Image <-> latent autoencoder with a diagonal Gaussian posterior.

    Submodule names match the CompVis layout, so the ``first_stage_model.*`` entries of an
    SD v1 checkpoint (prefix stripped) load with ``load_state_dict`` by name.

    The model is only used frozen here, so there is no loss or training step:
    ``lossconfig`` and ``monitor`` are accepted solely so the original CompVis YAML
    configs still instantiate, and are ignored.
    """

    def __init__(
        self,
        ddconfig: dict[str, Any],
        embed_dim: int,
        lossconfig: dict[str, Any] | None = None,
        monitor: str | None = None,
    ) -> None:
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig['double_z'] = True (encoder must output mean and logvar)")
        z_channels = ddconfig["z_channels"]
        self.embed_dim = embed_dim
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)

    def encode(self, x: Tensor) -> DiagonalGaussianDistribution:
        """Images in [-1, 1], shape (b, in_channels, H, W) -> posterior over (b, embed_dim, H/f, W/f)."""
        moments = self.quant_conv(self.encoder(x))
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: Tensor, sample_posterior: bool = True) -> tuple[Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior
