"""Evaluate trained ViCo concepts with the paper's protocol (Sec. 4.1, Appendix B).

For each concept: sample every prompt of Table 7 (the live list for pets, the object list
otherwise) ``--n_samples`` times with DDIM (``--ddim_steps``, guidance ``--scale``) and one
fixed reference photo, then score the samples against the concept's real photos with I_DINO,
I_CLIP and T_CLIP (``ldm.evaluation.metrics``).

    python scripts/evaluate.py \\
        --concept name=monster_toy,ckpt=$RUN/checkpoints/last.ckpt,data=data/monster_toy,ref=data/monster_toy/00.jpg \\
        --clip_weights models/eval/ViT-B-32.pt --dino_weights models/eval/dino_deitsmall16_pretrain.pth \\
        --outdir outputs/eval

``--concept`` (repeatable) takes comma-separated ``key=value`` fields:

* ``name``: a concept of ``configs/eval/concepts.yaml`` (which gives ``live`` and
  ``class_word``), or any other name together with ``live=true|false``;
* ``ckpt``: the trained weights (training checkpoint, adapter export or the authors' pair);
* ``data``: the folder of the concept's real photos (every image in it is scored against);
* ``ref`` (optional): the reference photo, default the first photo of ``data`` by name;
* ``live``, ``class_word`` (optional): override the table's values.

Outputs under ``--outdir``: per concept ``<name>/samples/pPP-sSS.png`` (prompt PP, sample SS),
``<name>/sheet.png``, ``<name>/scores.{json,csv}`` and ``<name>/generation.json`` (the
settings the samples were made with); over all concepts ``scores.{json,csv}``.

The reference is prepared as in ``sample.py`` and the authors' code: squashed to the sampling
size (bilinear) and encoded as a sample of the VAE posterior, drawn per prompt from the
prompt's generator (``--ref_resize crop``, ``--ref_latent mode`` for the alternatives).

Images already on disk are not generated again. Every prompt draws its noise from a generator
seeded by (``--seed``, concept name, prompt index), and a prompt whose samples are partly
missing is sampled again as a whole batch (only the missing files are written), so an
interrupted and resumed run writes the same images as an uninterrupted one. A rerun with
settings that change the images (checkpoint, reference and its preparation, steps, scale,
seed) into the same
folder is refused.

Predictable mistakes print one ``error: ...`` line on stderr and exit with status 2, before
anything is generated.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
import sys
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ldm.data.images import list_images, load_image, to_tensor  # noqa: E402
from ldm.evaluation import (  # noqa: E402
    ClipFeatureExtractor,
    Concept,
    ConceptScores,
    DinoFeatureExtractor,
    PromptLists,
    average_scores,
    clip_text,
    load_clip,
    load_concepts,
    load_dino,
    load_prompts,
    score_concept,
)
from ldm.models.diffusion.ddim import DDIMSampler  # noqa: E402
from ldm.models.diffusion.sampling import (  # noqa: E402
    REFERENCE_LATENTS,
    REFERENCE_RESIZE,
    encode_references,
    load_reference_images,
    make_ddim_timesteps,
    sample_prompt,
)
from ldm.models.loading import (  # noqa: E402
    autoencoder_factor,
    base_checkpoint_path,
    default_image_size,
    load_vico_model,
    read_vico_weights,
    resolve_config,
)
from ldm.util import CheckpointError  # noqa: E402
from ldm.pictures import make_grid, save_png, text_cell, to_uint8  # noqa: E402
from sample import OneLineErrorParser, UsageError, check_outdir, parse_device  # noqa: E402

logger = logging.getLogger("evaluate")

CONCEPT_FIELDS = ("name", "ckpt", "data", "ref", "live", "class_word")
REQUIRED_FIELDS = ("name", "ckpt", "data")
#: Concept names become folder names.
CONCEPT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
SETTINGS_FILE = "generation.json"
#: The longer side of a contact-sheet cell; larger samples are scaled down to it.
SHEET_CELL = 256
#: Table 2's columns and the ConceptScores fields they come from.
METRICS = {"I_DINO": "i_dino", "I_CLIP": "i_clip", "T_CLIP": "t_clip"}
CSV_COLUMNS = ("concept", *METRICS, "num_generated", "num_real")
#: The last 12 bytes of a whole PNG file: its IEND chunk.
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
T_CLIP_TEXTS = {False: "prompt without the placeholder", True: "placeholder replaced by the class word"}


# ------------------------------------------------------------------ arguments
def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description="Generate the paper's evaluation images and compute I_DINO, I_CLIP, T_CLIP.")
    parser.add_argument(
        "--concept", action="append", required=True, metavar="name=...,ckpt=...,data=...[,ref=...]",
        help="a concept to evaluate (repeatable); fields: name, ckpt, data, optional ref, live, class_word",
    )  # fmt: skip
    parser.add_argument("--clip_weights", required=True, help="CLIP ViT-B/32 weights (see docs/EVALUATION.md)")
    parser.add_argument("--dino_weights", required=True, help="DINO ViT-S/16 weights (see docs/EVALUATION.md)")
    parser.add_argument("--base_ckpt", help="base SD checkpoint, overriding the one recorded in each config")
    parser.add_argument("--outdir", default="outputs/eval", help="output folder")
    parser.add_argument("--n_samples", type=int, default=8, help="samples per prompt (one batch)")
    parser.add_argument("--ddim_steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=42, help="seed; each (concept, prompt) derives its own")
    parser.add_argument(
        "--ref_resize", choices=tuple(REFERENCE_RESIZE), default="squash",
        help="squash: resize the whole reference, bilinear (the authors'); crop: centre crop, bicubic",
    )  # fmt: skip
    parser.add_argument(
        "--ref_latent", choices=REFERENCE_LATENTS, default="sample",
        help="sample: a VAE posterior sample per prompt (the authors'); mode: the posterior mean",
    )  # fmt: skip
    parser.add_argument("--max_prompts", type=int, help="only the first N prompts of each list (quick runs)")
    parser.add_argument(
        "--class_word", action="store_true",
        help="T_CLIP text with the placeholder replaced by the class word (default: omitted, as in the paper)",
    )  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    return parser


@dataclass(frozen=True)
class ConceptSpec:
    """One ``--concept`` argument, with ``live`` and ``class_word`` filled from the concept table."""

    name: str
    ckpt: Path
    data: Path
    reference: Path | None
    live: bool
    class_word: str | None


def parse_concept(text: str, table: Mapping[str, Concept]) -> ConceptSpec:
    """Read ``name=...,ckpt=...,data=...[,ref=...][,live=...][,class_word=...]``."""
    fields: dict[str, str] = {}
    for item in text.split(","):
        key, equals, value = (part.strip() for part in item.partition("="))
        if not equals or key not in CONCEPT_FIELDS:
            known_fields = ", ".join(f"{field}=..." for field in CONCEPT_FIELDS)
            raise UsageError(f"--concept '{text}': '{item}' is not one of {known_fields}")
        if key in fields:
            raise UsageError(f"--concept '{text}': '{key}' is given twice")
        fields[key] = value
    missing = [key for key in REQUIRED_FIELDS if not fields.get(key)]
    if missing:
        raise UsageError(f"--concept '{text}': {missing[0]}=... is missing")
    name = fields["name"]
    if not CONCEPT_NAME.match(name):
        raise UsageError(f"--concept '{text}': name '{name}' must be letters, digits, '_' or '-'")
    known = table.get(name)
    if "live" in fields:
        if fields["live"].lower() not in ("true", "false"):
            raise UsageError(f"--concept '{text}': live must be true or false, got '{fields['live']}'")
        live = fields["live"].lower() == "true"
    elif known is not None:
        live = known.live
    else:
        raise UsageError(
            f"unknown concept '{name}': not in configs/eval/concepts.yaml; add live=true or live=false "
            f"to evaluate another concept (it chooses the prompt list)"
        )
    class_word = fields.get("class_word") or (known.class_word if known is not None else None)
    reference = Path(fields["ref"]) if fields.get("ref") else None
    return ConceptSpec(name, Path(fields["ckpt"]), Path(fields["data"]), reference, live, class_word)


# --------------------------------------------------------------------- checks
@dataclass(frozen=True)
class GenerationSettings:
    """What fixes a concept's images; stored beside them so that a resume cannot mix settings."""

    ckpt: str
    base_ckpt: str
    reference: str
    reference_resize: str
    reference_latent: str
    height: int
    width: int
    ddim_steps: int
    scale: float
    seed: int


@dataclass(frozen=True)
class ConceptJob:
    """One concept, checked: its prompts, T_CLIP texts, photos and generation settings."""

    spec: ConceptSpec
    prompts: tuple[str, ...]
    texts: tuple[str, ...]
    real: tuple[Path, ...]
    reference: np.ndarray
    settings: GenerationSettings
    factor: int
    n_samples: int
    folder: Path

    def sample_path(self, prompt_index: int, sample_index: int) -> Path:
        return self.folder / "samples" / f"p{prompt_index:02d}-s{sample_index:02d}.png"

    def all_samples(self) -> list[Path]:
        """Every sample file, prompt by prompt."""
        return [self.sample_path(p, s) for p in range(len(self.prompts)) for s in range(self.n_samples)]

    def missing(self) -> dict[int, list[int]]:
        """Prompt index -> indices of its samples not on disk yet (or not whole: :func:`is_finished_sample`)."""
        missing: dict[int, list[int]] = {}
        for prompt_index in range(len(self.prompts)):
            samples = [s for s in range(self.n_samples) if not is_finished_sample(self.sample_path(prompt_index, s))]
            if samples:
                missing[prompt_index] = samples
        return missing


@dataclass(frozen=True)
class Evaluation:
    """Every concept of a command, checked, and where and how they are evaluated."""

    concepts: tuple[ConceptJob, ...]
    outdir: Path
    device: torch.device
    class_word: bool


def prepare_concept(spec: ConceptSpec, args: argparse.Namespace, prompt_lists: PromptLists) -> ConceptJob:
    """Check one concept's files and settings without generating anything."""
    weights = read_vico_weights(spec.ckpt)
    config = resolve_config(weights)
    base = base_checkpoint_path(config, args.base_ckpt, weights.source, weights.folder)
    placeholders = OmegaConf.select(config, "model.params.personalization_config.params.placeholder_strings") or []
    if prompt_lists.placeholder not in placeholders:
        raise UsageError(
            f"{spec.ckpt}: its placeholder strings {list(placeholders)} do not include the prompts' "
            f"'{prompt_lists.placeholder}'"
        )
    make_ddim_timesteps(args.ddim_steps, int(config.model.params.get("timesteps", 1000)))
    factor = autoencoder_factor(config)
    size = default_image_size(config)
    real = list_images(spec.data)
    for photo in real:  # decoded now: a broken photo would otherwise only show when scoring, after generating
        load_image(photo)
    reference_path = spec.reference or real[0]
    if args.class_word and not spec.class_word:
        raise UsageError(f"--class_word: concept '{spec.name}' has no class word; add class_word=... to its --concept")
    prompts = (prompt_lists.live if spec.live else prompt_lists.object)[: args.max_prompts]
    class_word = spec.class_word if args.class_word else None
    settings = GenerationSettings(
        ckpt=str(spec.ckpt.resolve()),
        base_ckpt=str(base.resolve()),
        reference=str(reference_path.resolve()),
        reference_resize=args.ref_resize,
        reference_latent=args.ref_latent,
        height=size,
        width=size,
        ddim_steps=args.ddim_steps,
        scale=args.scale,
        seed=args.seed,
    )
    folder = Path(args.outdir) / spec.name
    check_previous_settings(folder, settings)
    return ConceptJob(
        spec=spec,
        prompts=prompts,
        texts=tuple(clip_text(p, class_word, prompt_lists.placeholder) for p in prompts),
        real=tuple(real),
        reference=load_reference_images([reference_path], (size, size), args.ref_resize)[0],
        settings=settings,
        factor=factor,
        n_samples=args.n_samples,
        folder=folder,
    )


def check_previous_settings(folder: Path, settings: GenerationSettings) -> None:
    """Refuse to add images made with other settings to those already in ``folder``."""
    path = folder / SETTINGS_FILE
    if not path.is_file():
        return
    previous = json.loads(path.read_text(encoding="utf-8"))
    for key, value in asdict(settings).items():
        if previous.get(key) != value:
            raise UsageError(
                f"{folder}: its images were made with {key}={previous.get(key)!r}, not {value!r}; "
                f"use another --outdir or delete {folder}"
            )


def prepare(args: argparse.Namespace) -> Evaluation:
    """Check every argument and concept, before any model is built or image generated."""
    for name in ("n_samples", "ddim_steps", "max_prompts"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be at least 1, got {value}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    device = parse_device(args.device, "full")
    check_outdir(args.outdir)
    table = {concept.name: concept for concept in load_concepts()}
    specs = [parse_concept(text, table) for text in args.concept]
    names = [spec.name for spec in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"concept '{repeated[0]}' is given twice")
    prompt_lists = load_prompts()
    jobs = tuple(prepare_concept(spec, args, prompt_lists) for spec in specs)
    return Evaluation(jobs, Path(args.outdir), device, args.class_word)


# ----------------------------------------------------------------- generating
def prompt_seed(seed: int, concept: str, prompt_index: int) -> int:
    """The seed of one (concept, prompt): independent of the other prompts and concepts evaluated."""
    key = np.random.SeedSequence((seed, zlib.crc32(concept.encode("utf-8")), prompt_index))
    return int(key.generate_state(1)[0])


def is_finished_sample(path: Path) -> bool:
    """Whether ``path`` is a whole PNG (it ends with the IEND chunk). A sample is renamed into
    place only once written, but the rename is not synced: after a crash or a power cut the file
    may be empty or cut short, and it is then drawn again instead of failing the scoring."""
    try:
        with open(path, "rb") as handle:
            if handle.seek(0, os.SEEK_END) < len(PNG_END):
                return False
            handle.seek(-len(PNG_END), os.SEEK_END)
            return handle.read() == PNG_END
    except OSError:
        return False


def save_png_atomically(image: np.ndarray, path: Path) -> None:
    """Write under a hidden name, then rename: an interrupted write never looks like a finished sample."""
    partial = path.with_name(f".{path.name}")
    save_png(image, partial)
    os.replace(partial, path)


def generate_concept(job: ConceptJob, device: torch.device, progress: tqdm) -> None:
    """Sample every prompt with missing images and write those images."""
    missing = job.missing()
    if not missing:
        return
    settings = job.settings
    (job.folder / "samples").mkdir(parents=True, exist_ok=True)
    (job.folder / SETTINGS_FILE).write_text(json.dumps(asdict(settings), indent=2) + "\n", encoding="utf-8")
    model, _ = load_vico_model(job.spec.ckpt, base_ckpt=settings.base_ckpt, device=device)
    sampler = DDIMSampler(model)
    latent_shape = (model.channels, settings.height // job.factor, settings.width // job.factor)
    generator = torch.Generator()
    progress.set_postfix_str(job.spec.name)
    with torch.no_grad():
        reference_images = to_tensor(np.stack([job.reference]))
        for prompt_index, sample_indices in missing.items():
            generator.manual_seed(prompt_seed(settings.seed, job.spec.name, prompt_index))
            reference_latents = encode_references(model, reference_images, settings.reference_latent, generator)
            decoded, _ = sample_prompt(
                model,
                sampler,
                job.prompts[prompt_index],
                reference_latents,
                n_samples=job.n_samples,
                latent_shape=latent_shape,
                steps=settings.ddim_steps,
                scale=settings.scale,
                generator=generator,
            )
            images = to_uint8(decoded)
            for sample_index in sample_indices:
                save_png_atomically(images[sample_index], job.sample_path(prompt_index, sample_index))
            progress.update()
    del model, sampler
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -------------------------------------------------------------- contact sheet
def contact_sheet(job: ConceptJob) -> np.ndarray:
    """The first row: the reference, then the first real photos; then one row per prompt: its text, then its samples."""
    scale = min(1.0, SHEET_CELL / max(job.settings.height, job.settings.width))
    cell = (round(job.settings.height * scale), round(job.settings.width * scale))
    reference = load_reference_images([job.settings.reference], cell, job.settings.reference_resize)[0]
    header = [reference, *(load_image(p, cell) for p in job.real[: job.n_samples])]
    rows = [header]
    for prompt_index, prompt in enumerate(job.prompts):
        samples = [load_image(job.sample_path(prompt_index, s), cell) for s in range(job.n_samples)]
        rows.append([text_cell(f"p{prompt_index:02d}: {prompt}", *cell), *samples])
    return make_grid(rows)


# --------------------------------------------------------------------- scores
def score_row(label: str, values: Mapping[str, float], num_generated: int, num_real: int) -> dict[str, Any]:
    return {
        "concept": label,
        **{column: values[field] for column, field in METRICS.items()},
        "num_generated": num_generated,
        "num_real": num_real,
    }


def write_scores(stem: Path, rows: Sequence[Mapping[str, Any]], details: Mapping[str, Any]) -> None:
    """``<stem>.csv``: one line per row, Table 2's columns; ``<stem>.json``: the rows and ``details``."""
    with open(stem.with_suffix(".csv"), "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: f"{value:.4f}" if key in METRICS else value for key, value in row.items()})
    content = {"scores": list(rows), **details}
    stem.with_suffix(".json").write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def score_job(job: ConceptJob, clip: ClipFeatureExtractor, dino: DinoFeatureExtractor) -> ConceptScores:
    texts = [text for text in job.texts for _ in range(job.n_samples)]
    return score_concept(job.all_samples(), texts, job.real, clip, dino)


def run(evaluation: Evaluation, clip: ClipFeatureExtractor, dino: DinoFeatureExtractor) -> dict[str, ConceptScores]:
    """Generate what is missing, then write the sheets and the scores of every concept and overall."""
    total = sum(len(job.missing()) for job in evaluation.concepts)
    with tqdm(total=total, desc="Generating", unit="prompt") as progress:
        for job in evaluation.concepts:
            generate_concept(job, evaluation.device, progress)
    t_clip_text = T_CLIP_TEXTS[evaluation.class_word]
    scores: dict[str, ConceptScores] = {}
    rows: list[dict[str, Any]] = []
    for job in tqdm(evaluation.concepts, desc="Scoring", unit="concept"):
        save_png(contact_sheet(job), job.folder / "sheet.png")
        result = scores[job.spec.name] = score_job(job, clip, dino)
        details = {
            "t_clip_text": t_clip_text,
            "prompts": len(job.prompts),
            "n_samples": job.n_samples,
            "generation": asdict(job.settings),
        }
        rows.append(score_row(job.spec.name, asdict(result), result.num_generated, result.num_real))
        write_scores(job.folder / "scores", rows[-1:], details)
        logger.info(
            "%s: I_DINO %.4f  I_CLIP %.4f  T_CLIP %.4f", job.spec.name, result.i_dino, result.i_clip, result.t_clip
        )
    pooled = average_scores(list(scores.values()))
    num_generated = sum(s.num_generated for s in scores.values())
    rows.append(score_row("mean", pooled, num_generated, sum(s.num_real for s in scores.values())))
    evaluation.outdir.mkdir(parents=True, exist_ok=True)
    pooling = "the mean row averages all (generated, real) pairs and all generated images of every concept"
    write_scores(evaluation.outdir / "scores", rows, {"t_clip_text": t_clip_text, "pooling": pooling})
    logger.info("mean: I_DINO %.4f  I_CLIP %.4f  T_CLIP %.4f", pooled["i_dino"], pooled["i_clip"], pooled["t_clip"])
    logger.info("scores in %s", evaluation.outdir)
    return scores


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        args = build_parser().parse_args(argv)
        evaluation = prepare(args)
        dino = load_dino(args.dino_weights, evaluation.device)
        clip = load_clip(args.clip_weights, device=evaluation.device)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    try:
        run(evaluation, clip, dino)
    except OSError as err:  # a full disk or a folder removed during the run: finished samples stay
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
