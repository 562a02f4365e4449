"""scripts/evaluate.py on the tiny config, scored with randomly initialised CLIP and DINO."""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

import main
from ldm.data.images import load_image
from ldm.evaluation import build_clip, build_dino
from ldm.models.diffusion.ddim import DDIMSampler
from scripts import evaluate
from tests.test_training import setup as setup_training_run

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "data" / "monster_toy"
CONCEPT = "monster_toy"
CELL = 64 + 2  # a tiny sample plus the grid padding


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The tiny config trained for two steps."""
    run = setup_training_run(tmp_path_factory.mktemp("train"), steps=2)
    main.train(run)
    return run.logdir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def extractors() -> tuple:
    return build_clip(), build_dino()


def argv(checkpoint: Path, outdir: Path, *extra: str, concept: str = "") -> list[str]:
    concept = concept or f"name={CONCEPT},ckpt={checkpoint},data={PHOTOS}"
    return [
        "--concept", concept, "--clip_weights", str(outdir.parent / "clip.pt"),
        "--dino_weights", str(outdir.parent / "dino.pth"), "--outdir", str(outdir),
        "--n_samples", "2", "--max_prompts", "2", "--ddim_steps", "2", "--device", "cpu", *extra,
    ]  # fmt: skip


def prepare(arguments: list[str]) -> evaluate.Evaluation:
    return evaluate.prepare(evaluate.build_parser().parse_args(arguments))


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


@pytest.fixture(scope="module")
def first_run(checkpoint, extractors, tmp_path_factory) -> Path:
    outdir = tmp_path_factory.mktemp("eval") / "out"
    evaluate.run(prepare(argv(checkpoint, outdir)), *extractors)
    return outdir


def check_scores(row: dict, num_generated: int, num_real: int) -> None:
    for column in ("I_DINO", "I_CLIP", "T_CLIP"):
        assert math.isfinite(float(row[column])) and -1 <= float(row[column]) <= 1, (column, row)
    assert int(row["num_generated"]) == num_generated and int(row["num_real"]) == num_real


def test_outputs_have_table_2_layout(first_run):
    concept = first_run / CONCEPT
    names = sorted(p.name for p in (concept / "samples").iterdir())
    assert names == ["p00-s00.png", "p00-s01.png", "p01-s00.png", "p01-s01.png"]
    report = json.loads((concept / "scores.json").read_text())
    (row,) = report["scores"]
    assert row["concept"] == CONCEPT
    check_scores(row, num_generated=4, num_real=5)
    assert report["prompts"] == 2 and report["n_samples"] == 2
    assert report["generation"]["ddim_steps"] == 2 and report["generation"]["scale"] == 7.5
    assert report["generation"]["reference"] == str(PHOTOS / "00.jpg")  # the default reference
    overall = json.loads((first_run / "scores.json").read_text())
    assert [r["concept"] for r in overall["scores"]] == [CONCEPT, "mean"]
    for key in ("I_DINO", "I_CLIP", "T_CLIP"):
        assert overall["scores"][1][key] == pytest.approx(row[key])  # one concept: the mean is its scores
    for path in (concept / "scores.csv", first_run / "scores.csv"):
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert list(rows[0]) == ["concept", "I_DINO", "I_CLIP", "T_CLIP", "num_generated", "num_real"]
        for r in rows:
            check_scores(r, num_generated=4, num_real=5)
    assert [r["concept"] for r in rows] == [CONCEPT, "mean"]


def test_contact_sheet_rows_are_prompts(first_run):
    sheet = read_png(first_run / CONCEPT / "sheet.png")
    assert sheet.shape == (2 + 3 * CELL, 2 + 3 * CELL, 3)  # (reference row + 2 prompts) x (label + 2 samples)
    reference = load_image(PHOTOS / "00.jpg", 64, "bilinear", resize_mode="squash")  # as the samples saw it
    assert np.array_equal(sheet[2:66, 2:66], reference)  # the reference, top left
    first_sample = read_png(first_run / CONCEPT / "samples" / "p00-s00.png")
    assert np.array_equal(sheet[2 + CELL : 2 + CELL + 64, 2 + CELL : 2 + CELL + 64], first_sample)
    label = sheet[2 + CELL : 2 + CELL + 64, 2 : 2 + 64]
    assert (label < 128).any() and (label == 255).mean() > 0.5  # dark text on white


def test_prompts_and_t_clip_texts(checkpoint, tmp_path):
    (job,) = prepare(argv(checkpoint, tmp_path / "out")).concepts
    assert job.prompts == ("a * in the jungle", "a * in the snow")
    assert job.texts == ("a in the jungle", "a in the snow")
    (job,) = prepare(argv(checkpoint, tmp_path / "out", "--class_word")).concepts
    assert job.texts == ("a toy in the jungle", "a toy in the snow")
    live = f"name=my_cat,ckpt={checkpoint},data={PHOTOS},live=true,class_word=cat"
    (job,) = prepare(argv(checkpoint, tmp_path / "out", "--max_prompts", "11", "--class_word", concept=live)).concepts
    assert job.prompts[10] == "a * wearing a red hat" and job.texts[10] == "a cat wearing a red hat"


def test_seeds_depend_on_concept_and_prompt_only():
    seeds = {evaluate.prompt_seed(42, c, p) for c in ("a", "b") for p in range(3)}
    assert len(seeds) == 6
    assert evaluate.prompt_seed(42, "a", 1) == evaluate.prompt_seed(42, "a", 1) != evaluate.prompt_seed(7, "a", 1)


def test_resume_regenerates_only_missing_images(checkpoint, extractors, first_run, monkeypatch):
    samples = first_run / CONCEPT / "samples"
    originals = {p.name: read_png(p) for p in samples.iterdir()}
    deleted = ["p00-s01.png", "p01-s00.png"]
    for name in deleted:
        (samples / name).unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in samples.iterdir()}
    calls = []
    original_sample = DDIMSampler.sample

    def counting_sample(self, *args, **kwargs):
        calls.append(kwargs["batch_size"])
        return original_sample(self, *args, **kwargs)

    monkeypatch.setattr(DDIMSampler, "sample", counting_sample)
    evaluate.run(prepare(argv(checkpoint, first_run)), *extractors)
    assert calls == [2, 2]  # one batch for each prompt with a missing image
    assert {p.name: p.stat().st_mtime_ns for p in samples.iterdir() if p.name in kept} == kept
    for name in deleted:
        assert np.array_equal(read_png(samples / name), originals[name]), name
    calls.clear()
    evaluate.run(prepare(argv(checkpoint, first_run)), *extractors)
    assert calls == []


def test_empty_and_cut_samples_are_drawn_again(checkpoint, extractors, first_run, monkeypatch):
    """A crash after a sample's (unsynced) rename may leave it empty or cut short."""
    samples = first_run / CONCEPT / "samples"
    originals = {name: read_png(samples / name) for name in ("p00-s00.png", "p01-s01.png")}
    (samples / "p00-s00.png").write_bytes(b"")
    (samples / "p01-s01.png").write_bytes((samples / "p01-s01.png").read_bytes()[:100])
    calls = []
    original_sample = DDIMSampler.sample

    def counting_sample(self, *args, **kwargs):
        calls.append(kwargs["batch_size"])
        return original_sample(self, *args, **kwargs)

    monkeypatch.setattr(DDIMSampler, "sample", counting_sample)
    evaluate.run(prepare(argv(checkpoint, first_run)), *extractors)
    assert calls == [2, 2]
    for name, image in originals.items():
        assert np.array_equal(read_png(samples / name), image), name


def test_a_read_only_outdir_is_one_line_before_the_metric_networks_load(checkpoint, tmp_path, capsys, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path and real_access(path, mode))
    monkeypatch.setattr(evaluate, "load_dino", lambda *args: pytest.fail("the metric networks were loaded first"))
    assert evaluate.main(argv(checkpoint, tmp_path / "out")) == 2
    assert capsys.readouterr().err == f"error: --outdir {tmp_path / 'out'}: {tmp_path} is not writable\n"


def error_cases(checkpoint: Path, tmp_path: Path, dino_file: Path) -> dict[str, tuple[list[str], str]]:
    out = tmp_path / "out"
    return {
        "missing ckpt": (
            argv(checkpoint, out, concept=f"name={CONCEPT},ckpt={tmp_path / 'nope.ckpt'},data={PHOTOS}"),
            "checkpoint not found",
        ),
        "unknown concept": (
            argv(checkpoint, out, concept=f"name=my_mug,ckpt={checkpoint},data={PHOTOS}"),
            "unknown concept 'my_mug'",
        ),
        "missing data": (
            argv(checkpoint, out, concept=f"name={CONCEPT},ckpt={checkpoint},data={tmp_path / 'photos'}"),
            "image folder not found",
        ),
        "missing reference": (
            argv(checkpoint, out, concept=f"name={CONCEPT},ckpt={checkpoint},data={PHOTOS},ref={tmp_path / 'r.jpg'}"),
            "image not found",
        ),
        "unknown field": (
            argv(checkpoint, out, concept=f"name={CONCEPT},ckpt={checkpoint},data={PHOTOS},colour=red"),
            "'colour=red' is not one of",
        ),
        "bad steps": (argv(checkpoint, out, "--ddim_steps", "3"), "3 sampling steps do not fit"),
        "negative seed": (argv(checkpoint, out, "--seed", "-1"), "--seed must be >= 0, got -1"),
        "meta device": (argv(checkpoint, out, "--device", "meta"), "--device meta: models run on cpu, cuda or mps"),
        "missing dino weights": (argv(checkpoint, out), "DINO ViT-S/16 weights not found"),
        "missing clip weights": (
            argv(checkpoint, out, "--dino_weights", str(dino_file)),
            "CLIP ViT-B/32 weights not found",
        ),
    }


def test_errors_exit_2_with_one_line_before_generating(checkpoint, extractors, tmp_path, capsys):
    dino_file = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in extractors[1].model.state_dict().items()}, str(dino_file))
    for name, (arguments, fragment) in error_cases(checkpoint, tmp_path, dino_file).items():
        assert evaluate.main(arguments) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err, (name, err)
    assert not (tmp_path / "out").exists()


def test_changed_settings_are_refused(checkpoint, first_run, capsys):
    assert evaluate.main(argv(checkpoint, first_run, "--ddim_steps", "4")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "made with ddim_steps=2, not 4" in err


