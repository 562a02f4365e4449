"""scripts/score_miniworld.py: sample.py outputs of a concept scored with the world classifier."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ldm.data.miniworld import SCENES, ConceptSpec, concept_scene, render
from ldm.evaluation.miniworld import WorldClassifier, save_classifier
from sample import save_png
from scripts import score_miniworld as score

ROOT = Path(__file__).resolve().parents[1]
CONCEPT = ROOT / "data" / "miniworld" / "sunset_ring"


def write_samples(folder: Path, scenes: list[str], per_scene: int = 2) -> None:
    """Renderer pictures of the concept in each scene, saved as sample.py saves samples."""
    spec = ConceptSpec.load(CONCEPT / "concept.yaml")
    (folder / "samples").mkdir(parents=True)
    number = 0
    for scene in scenes:
        for k in range(per_scene):
            image = render(concept_scene(spec, 100 + number, scene)).image
            save_png(image, folder / "samples" / f"{number:05d}.png", {"prompt": f"a photo of * {SCENES[scene]}"})
            number += 1


@pytest.fixture
def random_classifier(tmp_path) -> Path:
    path = tmp_path / "classifier.safetensors"
    save_classifier(WorldClassifier(), path)
    return path


def test_scene_of_a_prompt():
    assert score.scene_of("a photo of * on the beach") == "beach"
    assert score.scene_of("a * under the night sky, oil painting") == "night"
    assert score.scene_of("a photo of *") is None


def test_scores_every_sample_per_scene_and_writes_the_table(tmp_path, random_classifier, capsys):
    write_samples(tmp_path / "out", ["beach", "snow"])
    assert score.main([str(tmp_path / "out"), "--concept", str(CONCEPT), "--classifier", str(random_classifier)]) == 0
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert record["all"]["samples"] == 4
    assert set(record["scenes"]) == {"beach", "snow"}
    assert all(row["samples"] == 2 for row in record["scenes"].values())
    for row in (record["all"], *record["scenes"].values()):
        assert 0.0 <= row["object_fidelity"] <= row["shape"] <= 1.0
        assert 0.0 <= row["prompt_fidelity"] <= 1.0
    table = (tmp_path / "out" / "metrics.md").read_text()
    assert "| beach | 2 |" in table and "| all | 4 |" in table
    assert table in capsys.readouterr().out


@pytest.mark.usefixtures("shipped_miniworld_models")  # a missing shipped file fails (tests/conftest.py)
def test_renders_of_the_concept_score_high_with_the_shipped_classifier(tmp_path):
    write_samples(tmp_path / "out", ["beach", "snow", "grass", "night"], per_scene=4)
    assert score.main([str(tmp_path / "out"), "--concept", str(CONCEPT)]) == 0
    scores = json.loads((tmp_path / "out" / "metrics.json").read_text())["all"]
    assert scores["prompt_fidelity"] > 0.8
    assert scores["shape"] > 0.8
    assert scores["object_fidelity"] > 0.4


def test_mistakes_are_one_line_errors(tmp_path, random_classifier, capsys):
    write_samples(tmp_path / "out", ["beach"], per_scene=1)
    cases = [
        ([str(tmp_path / "empty"), "--concept", str(CONCEPT)], "no samples in"),
        ([str(tmp_path / "out"), "--concept", str(tmp_path)], "has no concept.yaml"),
        ([str(tmp_path / "out"), "--concept", str(CONCEPT), "--classifier", str(tmp_path / "none.safetensors")], "no world classifier"),
    ]
    unnamed = tmp_path / "unnamed"
    (unnamed / "samples").mkdir(parents=True)
    save_png(np.zeros((64, 64, 3), np.uint8), unnamed / "samples" / "00000.png")
    cases.append(([str(unnamed), "--concept", str(CONCEPT), "--classifier", str(random_classifier)], "no 'prompt' text chunk"))
    bare = tmp_path / "bare"
    shutil.copytree(CONCEPT, bare, ignore=shutil.ignore_patterns("masks"))
    cases.append(
        ([str(tmp_path / "out"), "--concept", str(bare), "--classifier", str(random_classifier), "--ckpt", "x.ckpt"], "no true mask")
    )
    for arguments, message in cases:
        assert score.main(arguments) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
