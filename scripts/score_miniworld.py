"""Score a folder of ``sample.py`` outputs of a miniature-world concept with the world classifier.

    python scripts/score_miniworld.py outputs/demo --concept data/miniworld/sunset_ring \\
        --ckpt logs/<run>/checkpoints/last.ckpt

Reads every ``<samples>/samples/NNNNN.png`` and the prompt stored in its text chunk (the scene
is the world's scene whose phrase the prompt contains, e.g. "on the beach"), and the concept
folder (``concept.yaml``, the photos, ``masks/``). Writes ``<samples>/metrics.md`` and
``metrics.json`` and prints the table:

- object fidelity: fraction of samples in which the world classifier finds every attribute of
  the concept's object (shape, colour and pattern of each half, split, notch), and each
  attribute's accuracy;
- feature similarity: mean cosine similarity of the classifier's features of every (sample,
  photo) pair (the miniature world's I_DINO);
- prompt fidelity: fraction of samples whose background is the scene their prompt names;
- with ``--ckpt``: mask IoU, per patched layer, of the Otsu mask of the S* attention on the
  reference photo with the photo's true mask, averaged over the prompts and five points of the
  DDIM schedule, next to the IoU of a mask that keeps every patch (what separating nothing scores).

The same metrics as ``scripts/evaluate_miniworld.py`` (``ldm.evaluation.miniworld_metrics``),
for pictures made elsewhere. Predictable mistakes print one ``error: ...`` line and exit with 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ldm.data.images import ImageError, load_image, to_tensor  # noqa: E402
from ldm.data.miniworld import IMAGE_SIZE, SCENES, ConceptSpec  # noqa: E402
from ldm.evaluation.miniworld import HEADS, classify, load_classifier, object_labels  # noqa: E402
from ldm.evaluation.miniworld_metrics import (  # noqa: E402
    all_patches_iou,
    attention_mask_iou,
    feature_similarity,
    mean_dicts,
    object_fidelity,
    prompt_fidelity,
)
from ldm.util import CheckpointError, write_atomically  # noqa: E402
from sample import OneLineErrorParser, UsageError  # noqa: E402

logger = logging.getLogger("score_miniworld")

DEFAULT_CLASSIFIER = ROOT / "models" / "miniworld" / "classifier.safetensors"
DEFAULT_BASE = ROOT / "models" / "miniworld" / "base.safetensors"
SAMPLE_NAME = re.compile(r"^\d{5}\.png$")
#: The DDIM schedule whose points (``evaluate_miniworld.ATTENTION_FRACTIONS``) the mask IoU is scored at.
ATTENTION_DDIM_STEPS = 50


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description="Score sample.py outputs of a miniature-world concept.")
    parser.add_argument("samples", help="sample.py's --outdir (its samples/ folder is scored)")
    parser.add_argument("--concept", required=True, help="the concept folder: concept.yaml, photos, masks/")
    parser.add_argument("--ckpt", help="the trained checkpoint: adds the mask IoU of its S* attention")
    parser.add_argument("--ref", help="reference photo for the mask IoU (default: the concept's first photo)")
    parser.add_argument("--base_ckpt", default=str(DEFAULT_BASE), help="the base model the checkpoint was trained on")
    parser.add_argument("--classifier", default=str(DEFAULT_CLASSIFIER), help="the world classifier")
    return parser


def scene_of(prompt: str) -> str | None:
    """The world scene whose caption phrase the prompt contains (the longest match), if any."""
    found = [name for name, phrase in SCENES.items() if phrase in prompt]
    return max(found, key=lambda name: len(SCENES[name])) if found else None


def read_samples(folder: Path) -> tuple[list[Path], list[str]]:
    """The sample files of ``folder/samples`` and the prompt stored in each."""
    sample_dir = folder / "samples"
    paths = sorted(p for p in sample_dir.glob("*.png") if SAMPLE_NAME.match(p.name)) if sample_dir.is_dir() else []
    if not paths:
        raise UsageError(f"no samples in {sample_dir} (expected sample.py's NNNNN.png files)")
    prompts = []
    for path in paths:
        with Image.open(path) as image:
            prompt = image.info.get("prompt")
        if prompt is None:
            raise UsageError(f"{path} has no 'prompt' text chunk: was it written by sample.py?")
        prompts.append(prompt)
    return paths, prompts


def concept_files(folder: Path) -> tuple[ConceptSpec, list[Path]]:
    spec_path = folder / "concept.yaml"
    if not spec_path.is_file():
        raise UsageError(f"{folder} has no concept.yaml (make one with scripts/miniworld.py make-concept)")
    try:
        spec = ConceptSpec.load(spec_path)
    except ValueError as err:
        raise UsageError(str(err)) from None
    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    if not photos:
        raise UsageError(f"{folder} has no photos")
    return spec, photos


def classifier_scores(classifier, spec: ConceptSpec, samples: list[Path], prompts: list[str], photos: list[Path]) -> dict[str, Any]:
    """Object fidelity (all and per attribute), feature similarity and prompt fidelity, overall
    and per scene."""
    predictions = classify(classifier, samples)
    real = classify(classifier, photos).features
    target = object_labels(spec.object)
    scenes = [scene_of(prompt) for prompt in prompts]

    def scores(rows: np.ndarray) -> dict[str, Any]:
        labels = {head: values[rows] for head, values in predictions.labels.items()}
        fidelity = object_fidelity(labels, target)
        named = [i for i in rows if scenes[i] is not None]
        result = {
            "samples": int(len(rows)),
            "object_fidelity": fidelity.fidelity,
            **fidelity.accuracy,
            "feature_similarity": feature_similarity(predictions.features[rows], real),
        }
        if named:
            wanted = [HEADS["scene"].index(scenes[i]) for i in named]
            result["prompt_fidelity"] = prompt_fidelity(predictions.labels["scene"][named], wanted)
        return result

    every = np.arange(len(samples))
    by_scene = {
        scene: scores(np.array([i for i, s in enumerate(scenes) if s == scene]))
        for scene in dict.fromkeys(s for s in scenes if s is not None)
    }
    return {"all": scores(every), "scenes": by_scene}


@torch.no_grad()
def attention_scores(args: argparse.Namespace, prompts: Sequence[str], photos: list[Path]) -> dict[str, Any]:
    """Mask IoU of the checkpoint's S* attention on the reference photo, per patched layer."""
    from ldm.models.diffusion.sampling import encode_references
    from ldm.models.loading import load_vico_model
    from scripts.evaluate_miniworld import attention_timesteps, reference_records

    reference_path = Path(args.ref) if args.ref else photos[0]
    mask_path = reference_path.parent / "masks" / reference_path.name
    if not mask_path.is_file():
        raise UsageError(f"no true mask for {reference_path} (expected {mask_path})")
    true_mask = load_image(mask_path)[..., 0] > 127
    model, _ = load_vico_model(args.ckpt, base_ckpt=args.base_ckpt)
    reference = load_image(reference_path, (IMAGE_SIZE, IMAGE_SIZE))
    reference_latents = encode_references(model, to_tensor(np.stack([reference])))
    timesteps = attention_timesteps(ATTENTION_DDIM_STEPS, model.num_timesteps)
    rows, grids = [], {}
    for prompt in dict.fromkeys(prompts):
        for timestep in timesteps:
            records = reference_records(model, reference_latents, prompt, timestep)
            rows.append(attention_mask_iou(records, [true_mask]))
            grids.update({r.layer: (r.height, r.width) for r in records})
    if not grids:
        raise UsageError(f"{args.ckpt} has no image attention layers: no mask to score")
    layers = mean_dicts(rows)
    return {
        "reference": str(reference_path),
        "timesteps": timesteps,
        "mask_iou": float(np.mean(list(layers.values()))),
        "mask_iou_layers": layers,
        "mask_iou_all_patches": {layer: all_patches_iou(true_mask, *grid) for layer, grid in grids.items()},
        "grid": grids,
    }


def cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def metrics_markdown(spec: ConceptSpec, scores: dict[str, Any], attention: dict[str, Any] | None) -> str:
    attributes = [head for head in HEADS if head in scores["all"]]
    header = ["scene", "samples", "object fidelity", *attributes, "feature sim.", "prompt fidelity"]
    lines = [
        f"# {spec.name}: {scores['all']['samples']} samples",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    named = [*scores["scenes"].items(), ("all", scores["all"])]
    for scene, row in named:
        values = [row["object_fidelity"], *(row[a] for a in attributes), row["feature_similarity"], row.get("prompt_fidelity")]
        lines.append("| " + " | ".join([scene, str(row["samples"]), *map(cell, values)]) + " |")
    lines.append("")
    lines.append(f"Prompt fidelity by chance: {1 / len(SCENES):.3f} (one of {len(SCENES)} scenes).")
    if attention is not None:
        layers = sorted(attention["mask_iou_layers"])
        lines += [
            "",
            f"S* mask IoU on {Path(attention['reference']).name} (mean over prompts and timesteps {attention['timesteps']}):",
            "",
            "| | " + " | ".join(f"layer {layer} ({'x'.join(map(str, attention['grid'][layer]))})" for layer in layers) + " | mean |",
            "|" + " --- |" * (len(layers) + 2),
            "| Otsu mask | " + " | ".join(cell(attention["mask_iou_layers"][layer]) for layer in layers)
            + f" | {cell(attention['mask_iou'])} |",
            "| every patch | " + " | ".join(cell(attention["mask_iou_all_patches"][layer]) for layer in layers)
            + f" | {cell(float(np.mean(list(attention['mask_iou_all_patches'].values()))))} |",
        ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        args = build_parser().parse_args(argv)
        folder, concept = Path(args.samples), Path(args.concept)
        spec, photos = concept_files(concept)
        samples, prompts = read_samples(folder)
        if not Path(args.classifier).is_file():
            raise UsageError(f"no world classifier at {args.classifier} (scripts/miniworld.py train-classifier makes it)")
        classifier = load_classifier(args.classifier)
        scores = classifier_scores(classifier, spec, samples, prompts, photos)
        attention = attention_scores(args, prompts, photos) if args.ckpt else None
    except (UsageError, CheckpointError, ImageError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = metrics_markdown(spec, scores, attention)
    write_atomically(folder / "metrics.md", lambda path: path.write_text(table, encoding="utf-8"))
    record = {"concept": str(concept), "classifier": str(args.classifier), "checkpoint": args.ckpt, **scores}
    if attention is not None:
        record["attention"] = attention
    content = json.dumps(record, indent=2) + "\n"
    write_atomically(folder / "metrics.json", lambda path: path.write_text(content, encoding="utf-8"))
    print(table, end="")
    logger.info("metrics: %s", folder / "metrics.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
