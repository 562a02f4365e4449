import pytest
import torch

from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

TINY_DDCONFIG = dict(
    double_z=True,
    z_channels=4,
    resolution=32,
    in_channels=3,
    out_ch=3,
    ch=32,
    ch_mult=[1, 2],
    num_res_blocks=1,
    attn_resolutions=[],
    dropout=0.0,
)


def _tiny_roundtrip(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = AutoencoderKL(TINY_DDCONFIG, embed_dim=4).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        posterior = model.encode(x)
        z = posterior.sample(generator=torch.Generator().manual_seed(seed))
        dec = model.decode(z)
        dec_mode, _ = model(x, sample_posterior=False)
        torch.testing.assert_close(dec_mode, model.decode(posterior.mode()))
    return posterior.mean, z, dec


def test_tiny_autoencoder_roundtrip_shapes_and_determinism() -> None:
    mean, z, dec = _tiny_roundtrip(seed=0)
    assert mean.shape == (2, 4, 16, 16)
    assert z.shape == (2, 4, 16, 16)
    assert dec.shape == (2, 3, 32, 32)
    for t in (mean, z, dec):
        assert torch.isfinite(t).all()

    mean2, z2, dec2 = _tiny_roundtrip(seed=0)
    torch.testing.assert_close(mean, mean2, rtol=0, atol=0)
    torch.testing.assert_close(z, z2, rtol=0, atol=0)
    torch.testing.assert_close(dec, dec2, rtol=0, atol=0)


def test_diagonal_gaussian_sample_matches_reparameterisation() -> None:
    params = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(1))
    dist = DiagonalGaussianDistribution(params)
    mean, logvar = params[:, :4], params[:, 4:]
    torch.testing.assert_close(dist.mean, mean)
    torch.testing.assert_close(dist.logvar, logvar)
    torch.testing.assert_close(dist.std, torch.exp(0.5 * logvar))
    torch.testing.assert_close(dist.var, torch.exp(logvar))
    assert dist.mode() is dist.mean

    sample = dist.sample(generator=torch.Generator().manual_seed(123))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(123))
    torch.testing.assert_close(sample, dist.mean + dist.std * eps, rtol=0, atol=0)


def test_diagonal_gaussian_logvar_clamping_and_deterministic() -> None:
    mean = torch.zeros(1, 1, 1, 3)
    logvar = torch.tensor([-100.0, 0.0, 100.0]).reshape(1, 1, 1, 3)
    dist = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    assert dist.logvar.flatten().tolist() == [-30.0, 0.0, 20.0]
    torch.testing.assert_close(dist.std, torch.exp(0.5 * dist.logvar))
    assert torch.isfinite(dist.var).all()

    det = DiagonalGaussianDistribution(torch.cat([mean + 1.5, logvar], dim=1), deterministic=True)
    assert torch.count_nonzero(det.std) == 0
    torch.testing.assert_close(det.sample(), det.mean)


def test_autoencoder_rejects_single_z() -> None:
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL({**TINY_DDCONFIG, "double_z": False}, embed_dim=4)
