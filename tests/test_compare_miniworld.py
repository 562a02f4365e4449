"""scripts/compare_miniworld.py: paired statistics over evaluation folders, on hand-made scores."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from scripts import compare_miniworld as cmp

HEADS = dict.fromkeys(cmp.ATTRIBUTE_HEADS, 0.5)


def row(concept: str, method: str, feature: float, prompt: float, mask: float | None = None, **heads: float) -> dict:
    scores = {"concept": concept, "method": method, "feature_similarity": feature, "prompt_fidelity": prompt,
              "object_fidelity": 0.0, **HEADS, **heads}  # fmt: skip
    if mask is not None:
        scores["mask_iou"] = mask
    return scores


def folder(tmp_path: Path, name: str, rows: list[dict]) -> Path:
    path = tmp_path / name
    path.mkdir()
    (path / "scores.json").write_text(json.dumps({"rows": rows}))
    return path


@pytest.fixture
def two_seeds(tmp_path) -> list[Path]:
    first = folder(tmp_path, "seed23", [
        row("ring", "textual-inversion", 0.50, 0.25), row("ring", "vico", 0.60, 0.50, mask=0.3, shape=1.0),
        row("star", "textual-inversion", 0.40, 0.50), row("star", "vico", 0.35, 0.50, mask=0.1),
        row("heart", "textual-inversion", 0.70, 0.75),  # no ViCo row: not a pair
    ])  # fmt: skip
    second = folder(tmp_path, "seed24", [row("ring", "textual-inversion", 0.45, 0.50), row("ring", "vico", 0.55, 0.25, mask=0.2)])
    return [first, second]


def test_pairs_are_concepts_scored_for_both_methods_in_each_folder(two_seeds):
    pairs = cmp.paired_rows(two_seeds, "textual-inversion", "vico")
    assert [(a["concept"], b["method"]) for a, b in pairs] == [("ring", "vico"), ("star", "vico"), ("ring", "vico")]


def test_paired_statistics(two_seeds):
    pairs = cmp.paired_rows(two_seeds, "textual-inversion", "vico")
    feature = cmp.compare(pairs, "feature_similarity")
    differences = [0.10, -0.05, 0.10]
    mean = sum(differences) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / 2)
    assert (feature.pairs, feature.ahead, feature.level, feature.behind) == (3, 2, 0, 1)
    assert feature.mean_a == pytest.approx(0.45) and feature.mean_b == pytest.approx(0.5)
    assert feature.mean_difference == pytest.approx(mean) and feature.sd == pytest.approx(sd)
    assert feature.se == pytest.approx(sd / math.sqrt(3))
    prompt = cmp.compare(pairs, "prompt_fidelity")
    assert (prompt.ahead, prompt.level, prompt.behind) == (1, 1, 1)
    attributes = cmp.compare(pairs, "attribute_accuracy")  # shape 1.0 instead of 0.5 in one pair of three
    assert attributes.mean_difference == pytest.approx(0.5 / 6 / 3) and attributes.ahead == 1
    assert cmp.compare(pairs, "mask_iou") is None  # Textual Inversion has no mask


def test_command_prints_the_table_and_refuses_mistakes_in_one_line(two_seeds, tmp_path, capsys):
    assert cmp.main([*map(str, two_seeds)]) == 0
    table = capsys.readouterr().out
    assert "| feature sim. | 3 | 0.450 | 0.500 | +0.050 |" in table and "mask IoU" not in table
    for arguments, message in (
        ([str(tmp_path / "none")], "no scores.json"),
        ([str(two_seeds[0]), "--b", "dreambooth"], "no concept was scored for both 'textual-inversion' and 'dreambooth'"),
        ([str(folder(tmp_path, "broken", [{"concept": "ring", "method": m} for m in ("textual-inversion", "vico")]))],
         "cannot read a scores.json: KeyError('shape')"),
    ):
        assert cmp.main(arguments) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
