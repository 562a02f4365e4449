"""ldm.api: the README's example runs as written, and api.sample gives sample.py's images."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sample
from ldm import api
from ldm.models.loading import save_adapter
from ldm.util import save_state_dict
from tests.test_sampling import PHOTOS, PROMPT, build_tiny, tiny_config

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = "logs/my_toy/checkpoints/adapter.safetensors"


def readme_example() -> str:
    """The Python block of the README's "Python API" section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Python API") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("```", start)]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A folder laid out as the example expects: a run with an adapter and its random base, photos."""
    folder = tmp_path_factory.mktemp("project")
    tiny = build_tiny(tiny_config())
    run = folder / "logs" / "my_toy"
    (run / "checkpoints").mkdir(parents=True)
    save_state_dict(tiny.base_state_dict(), run / "random-base.safetensors")
    config = tiny_config()
    config.model.params.ckpt_path = "random-base.safetensors"
    save_adapter(tiny, config, folder / ADAPTER, step=60)
    (folder / "data" / "my_toy").mkdir(parents=True)
    shutil.copy(PHOTOS[0], folder / "data" / "my_toy" / "00.jpg")
    return folder


def test_readme_example_runs(project, monkeypatch):
    monkeypatch.chdir(project)
    exec(compile(readme_example(), "README.md", "exec"), {})
    with Image.open(project / "beach.png") as image:
        assert image.size == (64, 64) and image.mode == "RGB"
    # numbered by the steps the adapter records (issue 23: not -0 for a 60-step model)
    assert sorted(p.name for p in (project / "exports").iterdir()) == ["adapter-60.safetensors", "textual_inversion-60.pt"]


@pytest.mark.parametrize("settings", [{}, {"sampler": "euler_a", "ref_resize": "crop", "ref_latent": "mode"}])
def test_api_sample_gives_sample_py_images(project, monkeypatch, settings):
    monkeypatch.chdir(project)
    vico = api.load(ADAPTER, device="cpu")
    images = api.sample(vico, PROMPT, ["data/my_toy/00.jpg"], n_samples=2, steps=4, seed=7, negative_prompt="dark", **settings)
    flags = [item for key, value in settings.items() for item in (f"--{key}", value)]
    outdir = project / f"cli-{len(settings)}"
    argv = [
        "--ckpt", ADAPTER, "--ref", "data/my_toy/00.jpg", "--prompt", PROMPT, "--negative_prompt", "dark",
        "--n_samples", "2", "--ddim_steps", "4", "--seed", "7", "--outdir", str(outdir), "--device", "cpu", *flags,
    ]  # fmt: skip
    assert sample.main(argv) == 0
    for k, image in enumerate(images):
        with Image.open(outdir / "samples" / f"{k:05d}.png") as written:
            assert np.array_equal(np.asarray(image), np.asarray(written)), k


def test_api_mistakes_are_value_errors(project, monkeypatch):
    monkeypatch.chdir(project)
    vico = api.load(ADAPTER, device="cpu")
    with pytest.raises(ValueError, match="not a positive multiple of the autoencoder factor 4"):
        api.sample(vico, PROMPT, ["data/my_toy/00.jpg"], size=66)
    with pytest.raises(ValueError, match="ref_latent must be one of"):
        api.sample(vico, PROMPT, ["data/my_toy/00.jpg"], ref_latent="median")
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        api.sample(vico, PROMPT, ["data/my_toy/00.jpg"], sampler="heun")
