"""``compile_unet``: the UNet with ViCo's reference stream captured by torch.compile equals eager.

The tests compile with the ``aot_eager`` backend: the same graph capture (Dynamo and AOT
autograd) that inductor and CUDA graphs start from, without generating kernels, which would
take minutes on a 2-core CPU. Whether a compiled UNet is faster is a GPU question
(docs/PERFORMANCE.md).
"""
from __future__ import annotations

import pytest
import torch

import sample
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.latent import LatentDiffusionModel
from ldm.models.diffusion.sampling import sample_prompt
from ldm.util import instantiate_from_config
from tests.test_sampling import LATENT, PROMPT, build_tiny, cli, files, read_png, references, tiny, tiny_config  # noqa: F401 (fixtures)

CAPTURE_ONLY = {"backend": "aot_eager"}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same random tiny ViCo twice, the second with its UNet compiled."""
    eager = build_tiny(tiny_config())
    compiled = build_tiny(tiny_config())
    compiled.compile_unet(**CAPTURE_ONLY)
    return eager, compiled


def loss_and_gradients(model) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    x_start = torch.randn(2, *LATENT, generator=g)
    noise = torch.randn(2, *LATENT, generator=g)
    t = torch.tensor([10, 700])
    tokens = model.tokenize([PROMPT, PROMPT])
    context = model.get_learned_conditioning(tokens)
    reference = model.reference_condition(references(2), context, tokens)
    model.train()
    loss, _ = model.p_losses(x_start, t, context, reference, noise)
    parameters = model.trainable_parameters()
    return loss.detach(), [g.detach() for g in torch.autograd.grad(loss, parameters)]


def test_compiled_training_loss_and_gradients_equal_eager():
    from torch._dynamo.utils import counters

    eager, compiled = pair()
    loss, gradients = loss_and_gradients(eager)
    compiled_loss, compiled_gradients = loss_and_gradients(compiled)
    # the whole UNet with the reference stream (Otsu mask, regulariser terms) is one graph
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-7)
    assert len(compiled_gradients) == len(gradients) > 0
    for got, want in zip(compiled_gradients, gradients):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in compiled_gradients[1:])  # the image attention trains


@torch.no_grad()
def test_compiled_guided_sampling_equals_eager():
    eager, compiled = pair()
    images = [
        sample_prompt(m, DDIMSampler(m), PROMPT, references(1), 2, LATENT, 4, 7.5, torch.Generator().manual_seed(0))[0]
        for m in (eager, compiled)
    ]
    torch.testing.assert_close(images[1], images[0], rtol=1e-4, atol=1e-5)


def test_compiling_keeps_the_compvis_state_dict():
    eager, compiled = pair()
    assert list(compiled.state_dict()) == list(eager.state_dict())


def test_compile_unet_from_the_config_and_bad_values():
    config = tiny_config()
    config.model.params.compile_unet = CAPTURE_ONLY
    model = instantiate_from_config(config.model)
    assert model.model.diffusion_model._compiled_call_impl is not None
    config.model.params.compile_unet = "max-autotune"
    with pytest.raises(ValueError, match="compile_unet must be a mapping"):
        instantiate_from_config(config.model)
    config.model.params.compile_unet = {"mod": "reduce-overhead"}
    with pytest.raises(ValueError, match=r"unknown torch.compile argument\(s\) \['mod'\]"):
        instantiate_from_config(config.model)
    # inductor options can name a compiler executable: not from a config
    config.model.params.compile_unet = {"options": {"cpp.cxx": ["/tmp/not-a-compiler"]}}
    with pytest.raises(ValueError, match=r"unknown torch.compile argument\(s\) \['options'\]"):
        instantiate_from_config(config.model)


def test_sample_py_compiles_with_the_mode_asked(files, tmp_path, monkeypatch):
    """``--compile MODE`` reaches torch.compile (run here with the capture-only backend) and the
    samples equal the eager run's."""
    modes = []
    original = LatentDiffusionModel.compile_unet

    def capture_only(model, **options):
        modes.append(options.pop("mode"))
        original(model, **options, **CAPTURE_ONLY)

    monkeypatch.setattr(LatentDiffusionModel, "compile_unet", capture_only)
    assert sample.main(cli(files, tmp_path / "eager")) == 0
    assert sample.main(cli(files, tmp_path / "compiled", "--compile", "reduce-overhead")) == 0
    assert modes == ["reduce-overhead"]
    eager_samples = sorted((tmp_path / "eager").rglob("samples/*.png"))
    assert len(eager_samples) == 2
    for eager in eager_samples:
        compiled = tmp_path / "compiled" / eager.relative_to(tmp_path / "eager")
        assert abs(read_png(compiled).astype(int) - read_png(eager).astype(int)).max() <= 1


def test_sample_py_compile_flag():
    parser = sample.build_parser()
    required = ["--ckpt", "x", "--ref", "r.png", "--prompt", "p"]
    assert parser.parse_args([*required, "--compile", "reduce-overhead"]).compile == "reduce-overhead"
    assert parser.parse_args(required).compile is None
    with pytest.raises(sample.UsageError, match="invalid choice: 'fast'"):
        parser.parse_args([*required, "--compile", "fast"])
