"""Paired comparison of two methods over the folders of ``scripts/evaluate_miniworld.py`` runs.

    python scripts/compare_miniworld.py outputs/eval-miniworld outputs/eval-miniworld-seed24 \\
        --a textual-inversion --b vico

Each folder is one evaluation (typically one ``--seed``); every concept scored for both methods
in a folder is one pair, so two folders of five concepts give ten pairs, each comparing the
two methods on the same photos, prompts and starting noise. Per metric it prints the pairs,
both means, the mean difference (b - a) with its standard deviation and standard error over
the pairs, and in how many pairs b is ahead, level and behind. "attribute accuracy" is the mean
accuracy of shape, both colours, both patterns and notch. Predictable mistakes print one
``error: ...`` line and exit with 2.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sample import OneLineErrorParser, UsageError  # noqa: E402

#: The heads whose mean accuracy is "attribute accuracy" in docs/EVALUATION.md and the claim tests.
ATTRIBUTE_HEADS = ("shape", "colour_0", "pattern_0", "colour_1", "pattern_1", "notch")
METRICS = ("feature_similarity", "attribute_accuracy", "prompt_fidelity", "object_fidelity", "mask_iou")
LABELS = {
    "feature_similarity": "feature sim.",
    "attribute_accuracy": "attribute accuracy",
    "prompt_fidelity": "prompt fidelity",
    "object_fidelity": "object fidelity",
    "mask_iou": "mask IoU",
}


@dataclass(frozen=True)
class Comparison:
    """One metric over the pairs: both means, the differences' statistics and the tally."""

    metric: str
    pairs: int
    mean_a: float
    mean_b: float
    mean_difference: float
    sd: float | None
    se: float | None
    ahead: int
    level: int
    behind: int


def metric_value(row: Mapping[str, Any], metric: str) -> float | None:
    if metric == "attribute_accuracy":
        return sum(row[head] for head in ATTRIBUTE_HEADS) / len(ATTRIBUTE_HEADS)
    value = row.get(metric)
    return None if value is None else float(value)


def read_rows(folder: Path) -> list[dict[str, Any]]:
    path = folder / "scores.json"
    if not path.is_file():
        raise UsageError(f"{folder}: no scores.json (run scripts/evaluate_miniworld.py --outdir {folder} first)")
    return json.loads(path.read_text(encoding="utf-8"))["rows"]


def paired_rows(folders: Sequence[Path], a: str, b: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(row of a, row of b) for every concept that both methods were scored on, folder by folder."""
    pairs = []
    for folder in folders:
        rows = {(row["concept"], row["method"]): row for row in read_rows(folder)}
        for concept in sorted({concept for concept, _ in rows}):
            if (concept, a) in rows and (concept, b) in rows:
                pairs.append((rows[concept, a], rows[concept, b]))
    if not pairs:
        raise UsageError(f"no concept was scored for both '{a}' and '{b}' in {', '.join(map(str, folders))}")
    return pairs


def compare(pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]], metric: str) -> Comparison | None:
    """The paired statistics of one metric, or None where no pair has it for both methods."""
    values = [(metric_value(x, metric), metric_value(y, metric)) for x, y in pairs]
    values = [(x, y) for x, y in values if x is not None and y is not None]
    if not values:
        return None
    differences = [y - x for x, y in values]
    n = len(differences)
    sd = statistics.stdev(differences) if n > 1 else None
    return Comparison(
        metric, n, statistics.fmean(x for x, _ in values), statistics.fmean(y for _, y in values),
        statistics.fmean(differences), sd, sd / math.sqrt(n) if sd is not None else None,
        sum(d > 0 for d in differences), sum(d == 0 for d in differences), sum(d < 0 for d in differences),
    )  # fmt: skip


def markdown(comparisons: Sequence[Comparison], a: str, b: str) -> str:
    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = [
        f"| metric | pairs | {a} | {b} | difference ({b} - {a}) | sd | se | {b} ahead / level / behind |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in comparisons:
        lines.append(
            f"| {LABELS[c.metric]} | {c.pairs} | {c.mean_a:.3f} | {c.mean_b:.3f} | {c.mean_difference:+.3f} "
            f"| {number(c.sd)} | {number(c.se)} | {c.ahead} / {c.level} / {c.behind} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description="Paired comparison of two methods over evaluate_miniworld.py folders.")
    parser.add_argument("folders", nargs="+", help="output folders of scripts/evaluate_miniworld.py (one per seed)")
    parser.add_argument("--a", default="textual-inversion", help="the reference method")
    parser.add_argument("--b", default="vico", help="the method compared with it")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        pairs = paired_rows([Path(folder) for folder in args.folders], args.a, args.b)
        comparisons = [c for c in (compare(pairs, metric) for metric in METRICS) if c is not None]
    except (UsageError, json.JSONDecodeError, KeyError) as err:
        message = f"cannot read a scores.json: {err!r}" if not isinstance(err, UsageError) else str(err)
        print("error: " + " ".join(message.split()), file=sys.stderr)
        return 2
    print(markdown(comparisons, args.a, args.b))
    return 0


if __name__ == "__main__":
    sys.exit(main())
