"""Train the tiny config, then sample from what training wrote, in every format users hold."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from ldm.models.loading import load_vico_model
import main
from tests.test_training import setup

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "data" / "monster_toy" / "00.jpg"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 3-step run: ``checkpoints/`` holds last.ckpt, adapter.safetensors and the random base."""
    run = setup(tmp_path_factory.mktemp("run"), steps=3)
    main.train(run)
    checkpoints = run.logdir / "checkpoints"
    # The authors' release layout, made from the same trained weights.
    model, _ = load_vico_model(checkpoints / "last.ckpt")
    image_attention = {
        key.removeprefix("model."): value
        for key, value in model.trained_state_dict().items()
        if ".image_cross_attention." in key
    }
    torch.save(image_attention, checkpoints / "cross_attention-2.pt")
    model.embedding_manager.save_authors_format(checkpoints / "embeddings_gs-2.pt")
    return checkpoints


def run_sample(checkpoints: Path, outdir: Path, *ckpt: str, extra: tuple[str, ...] = ()) -> int:
    argv = [f"--ckpt={checkpoints / name}" for name in ckpt]
    argv += ["--ref", str(REFERENCE), "--prompt", "a photo of * on the beach", "--n_samples", "2",
             "--ddim_steps", "4", "--outdir", str(outdir), "--seed", "7", *extra]  # fmt: skip
    return sample.main(argv)


def images(outdir: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted((outdir / "samples").glob("*.png"))]


def test_sample_from_every_format_of_a_trained_run(trained, tmp_path):
    config = str(ROOT / "configs" / "vico-tiny.yaml")
    base = str(trained.parent / "random-base.safetensors")
    formats = {
        "last.ckpt": (("last.ckpt",), ()),
        "adapter": (("adapter.safetensors",), ()),
        # The authors' files carry no config: name ours and the base, as users of their release do.
        "authors' pair": (("cross_attention-2.pt", "embeddings_gs-2.pt"), ("--config", config, "--base_ckpt", base)),
    }
    outputs = {}
    for name, (ckpt, extra) in formats.items():
        outdir = tmp_path / name.replace(" ", "_").replace("'", "")
        assert run_sample(trained, outdir, *ckpt, extra=extra) == 0, name
        outputs[name] = images(outdir)
        assert len(outputs[name]) == 2 and outputs[name][0].shape == (64, 64, 3)
        assert list(outdir.glob("grid-*.png"))
    # The same trained weights in three containers give the same images.
    for name in formats:
        for a, b in zip(outputs["last.ckpt"], outputs[name]):
            assert np.array_equal(a, b), name


