"""Measure ViCo on the miniature world, where every picture's ground truth is known.

For each concept spec: write its folder of photos (as ``scripts/miniworld.py make-concept``),
train every method on it with ``main.py`` from the world's base model (same steps and seed),
sample ``a photo of * <scene>`` in each scene of the world with one fixed reference photo
(DDIM, classifier-free guidance), and score the samples with the world classifier
(``ldm.evaluation.miniworld_metrics``): object fidelity, feature similarity, prompt fidelity,
and the IoU of the S* attention's Otsu mask with the reference's true mask.

    python scripts/evaluate_miniworld.py --outdir outputs/eval-miniworld

Methods (``--methods``, comma-separated): ``renderer`` (the concept drawn by the renderer in
each scene: the ceiling of every metric), ``base`` (the base model prompted with the concept's
init word, "a photo of a ring on the beach"), ``textual-inversion``, ``vico``, ``no-mask``,
``no-regularizer`` (``configs/miniworld/vico.yaml`` with the ``configs/ablations/`` YAMLs).

Outputs under ``--outdir``: ``table.md`` (methods x metrics: mean over concepts, per layer,
per concept), ``scores.json`` and ``scores.csv`` (one row per concept and method, then the
means), ``settings.json``; per concept ``<concept>/photos/`` (photos, masks, spec),
``<concept>/sheet.png`` (one row per method, one column per scene) and per method
``<concept>/<method>/``: ``runs/`` (the main.py run), ``samples/<scene>-sNN.png``,
``attention.json`` and ``attention.png`` (S* maps and masks), ``scores.json``.

Resumable: finished trainings, samples and attention files are kept; an interrupted training
continues from its last checkpoint. Every (concept, scene) draws its noise from a generator
seeded by (``--seed``, concept, scene), the same for every method. A rerun into the same folder
with another base model, training length, seed, photo count, step count or scale is refused.

Predictable mistakes print one ``error: ...`` line on stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import hashlib
import json
import logging
import sys
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import main as trainer  # noqa: E402
from ldm.config_schema import ConfigError  # noqa: E402
from ldm.data.images import ImageError, load_image, to_tensor  # noqa: E402
from ldm.data.miniworld import IMAGE_SIZE, SCENES, ConceptSpec, concept_scene, render  # noqa: E402
from ldm.evaluation.miniworld import (  # noqa: E402
    HEADS,
    WorldClassifier,
    classify,
    load_classifier,
    object_labels,
)
from ldm.evaluation.miniworld_metrics import (  # noqa: E402
    all_patches_iou,
    attention_mask_iou,
    feature_similarity,
    mean_dicts,
    object_fidelity,
    prompt_fidelity,
)
from ldm.models.diffusion.ddim import DDIMSampler  # noqa: E402
from ldm.models.diffusion.sampling import (  # noqa: E402
    GuidedDenoiser,
    SamplingReference,
    encode_references,
    make_ddim_timesteps,
    sample_prompt,
)
from ldm.models.loading import load_vico_model  # noqa: E402
from ldm.modules.embedding_manager import check_init_word  # noqa: E402
from ldm.modules.vico import AttentionRecord  # noqa: E402
from ldm.util import CheckpointError  # noqa: E402
from sample import OneLineErrorParser, UsageError, attention_picture, make_grid, parse_device, to_uint8  # noqa: E402
from scripts.evaluate import is_finished_sample, save_png_atomically, text_cell  # noqa: E402
from scripts.miniworld import build_base_model, make_concept  # noqa: E402

logger = logging.getLogger("evaluate_miniworld")

CONCEPTS_DIR = ROOT / "configs" / "miniworld" / "concepts"
BASE_CONFIG = ROOT / "configs" / "miniworld" / "base.yaml"
VICO_CONFIG = ROOT / "configs" / "miniworld" / "vico.yaml"
DEFAULT_BASE = ROOT / "models" / "miniworld" / "base.safetensors"
DEFAULT_CLASSIFIER = ROOT / "models" / "miniworld" / "classifier.safetensors"
PROMPT = "a photo of {subject} {scene}"
PLACEHOLDER = "*"
SETTINGS_FILE = "settings.json"
TRAINED_FILE = "training.json"
ATTENTION_FILE = "attention.json"
#: Where in the DDIM schedule the S* attention on the reference is scored (as sample.py --save_attention).
ATTENTION_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Method:
    """A row of the table: how its pictures are made.

    Attributes:
        kind: ``renderer`` (drawn by the renderer), ``base`` (the base model prompted with the
            init word) or ``trained`` (main.py with ``configs/miniworld/vico.yaml``, then ``configs``).
        configs: YAML files merged after ``configs/miniworld/vico.yaml`` (ablations, baselines).
        overrides: this row's own ``main.py`` overrides (after the command's ``--overrides``).
        steps: this row's training steps; ``None``: the command's ``--train_steps`` (ViCo's budget).
        photos: how many of the concept's photos it trains on (the first ones); ``None``: all.
        init_word: the word S* starts from; ``None``: the concept's.
        reference: the reference photo at sampling: ``seen`` (the first training photo) or
            ``unseen`` (a photo of the concept drawn apart from the training photos).
        sample_with_reference: ``False`` samples a trained ViCo with S* alone (no reference stream).
        true_mask: the image attention is masked by the reference's true object mask instead
            of the Otsu mask of the S* attention, at training and at sampling (paper Fig. 9).
        trained_as: the row whose trained model this row samples (same concept and seed) instead
            of training its own: rows that differ only at sampling share one training.
    """

    name: str
    label: str
    kind: str
    configs: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()
    steps: int | None = None
    photos: int | None = None
    init_word: str | None = None
    reference: str = "seen"
    sample_with_reference: bool = True
    true_mask: bool = False
    trained_as: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("renderer", "base", "trained"):
            raise ValueError(f"method {self.name}: unknown kind '{self.kind}'")
        if self.reference not in ("seen", "unseen"):
            raise ValueError(f"method {self.name}: reference must be 'seen' or 'unseen', got '{self.reference}'")

def recipe_steps(config: str) -> int:
    """The training steps a baseline's own recipe sets (``lightning.trainer.max_steps`` of its YAML)."""
    return int(OmegaConf.load(ROOT / config).lightning.trainer.max_steps)


TI_RECIPE = "configs/baselines/miniworld/textual-inversion.yaml"
DREAMBOOTH = "configs/baselines/miniworld/dreambooth.yaml"
CUSTOM_DIFFUSION = "configs/baselines/miniworld/custom-diffusion.yaml"

#: Every row the evaluation knows. The first six are the default of ``--methods``; the others
#: are the paper's baselines at their own recipes and the ablations
#: (``scripts/reproduce_miniworld.py`` runs them all).
METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("renderer", "renderer (ceiling)", "renderer"),
        Method("base", "base model + init word", "base"),
        Method("textual-inversion", "Textual Inversion (ViCo's 400 steps)", "trained", ("configs/ablations/textual-inversion.yaml",)),
        Method("vico", "ViCo", "trained"),
        Method("no-mask", "ViCo w/o mask", "trained", ("configs/ablations/no-mask.yaml",)),
        Method("no-regularizer", "ViCo w/o regulariser", "trained", ("configs/ablations/no-regularizer.yaml",)),
        # Table 2's baselines at their own published recipes (configs/baselines/, docs/BASELINES.md)
        Method("textual-inversion-recipe", f"Textual Inversion (its recipe, {recipe_steps(TI_RECIPE)} steps)", "trained",
               (TI_RECIPE,), steps=recipe_steps(TI_RECIPE)),
        Method("dreambooth", f"DreamBooth ({recipe_steps(DREAMBOOTH)} steps)", "trained", (DREAMBOOTH,), steps=recipe_steps(DREAMBOOTH)),
        Method("custom-diffusion", f"Custom Diffusion ({recipe_steps(CUSTOM_DIFFUSION)} steps)", "trained",
               (CUSTOM_DIFFUSION,), steps=recipe_steps(CUSTOM_DIFFUSION)),
        Method("vico-lr1e-5", "ViCo, image attention at the paper's 1e-5", "trained", ("configs/baselines/vico-lr1e-5.yaml",)),
        # ablations of ViCo (paper Figs. 5-9, 11, 13; Appendix C-D)
        Method("paper-mask", "ViCo, mask after the softmax (Eq. 5)", "trained", ("configs/ablations/paper-mask.yaml",)),
        Method("encoder-layers", "ViCo, image attention in the encoder", "trained", ("configs/ablations/encoder-layers.yaml",)),
        Method("both-layers", "ViCo, image attention in encoder and decoder", "trained", ("configs/ablations/both-layers.yaml",)),
        Method("photos-1", "ViCo, 1 training photo", "trained", photos=1),
        Method("photos-3", "ViCo, 3 training photos", "trained", photos=3),
        Method("init-object", "ViCo, S* from 'object'", "trained", init_word="object"),
        Method("textual-inversion-init-object", "Textual Inversion, S* from 'object'", "trained",
               ("configs/ablations/textual-inversion.yaml",), init_word="object"),
        Method("steps-300", "ViCo, 300 steps", "trained", steps=300),
        Method("reference-unseen", "ViCo, unseen reference photo", "trained", reference="unseen", trained_as="vico"),
        Method("no-reference", "ViCo sampled without its reference (S* alone)", "trained", sample_with_reference=False,
               trained_as="vico"),
        Method("true-mask", "ViCo with the true object mask", "trained", true_mask=True),
    )
}
DEFAULT_METHODS = ("renderer", "base", "textual-inversion", "vico", "no-mask", "no-regularizer")
#: Table columns: metric key -> header.
COLUMNS = {
    "object_fidelity": "object fidelity",
    "shape": "shape",
    "colour_0": "colour 1",
    "pattern_0": "pattern 1",
    "colour_1": "colour 2",
    "pattern_1": "pattern 2",
    "split": "split",
    "notch": "notch",
    "feature_similarity": "feature sim.",
    "prompt_fidelity": "prompt fidelity",
    "mask_iou": "mask IoU",
}
SUMMARY_COLUMNS = ("object_fidelity", "feature_similarity", "prompt_fidelity", "mask_iou")
#: Loggers whose INFO lines (Lightning's banner, main.py's run notes, loading notes) would
#: bury the evaluation's own progress; only their warnings are shown.
CHATTY_LOGGERS = ("pytorch_lightning", "lightning_fabric", "main", "ldm.models.export", "ldm.models.loading")


class TrainingError(Exception):
    """main.py refused or failed a training run; the message names the concept and method."""


# ------------------------------------------------------------------ arguments
def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description="Train and score ViCo and its ablations on the miniature world's concepts.")
    parser.add_argument("--concepts", nargs="+", help=f"concept specs (default: every YAML of {CONCEPTS_DIR.relative_to(ROOT)})")
    parser.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated rows of the table, any of: {', '.join(METHODS)}"
    )
    parser.add_argument("--base_ckpt", default=str(DEFAULT_BASE), help="the world's base model")
    parser.add_argument("--classifier", default=str(DEFAULT_CLASSIFIER), help="the world classifier")
    parser.add_argument("--outdir", default="outputs/eval-miniworld", help="output folder")
    parser.add_argument("--train_steps", type=int, default=400, help="training steps of every method")
    parser.add_argument("--photos", type=int, default=5, help="photos per concept folder")
    parser.add_argument("--scenes", default=",".join(SCENES), help="comma-separated scenes to prompt")
    parser.add_argument("--n_samples", type=int, default=8, help="samples per prompt (one batch)")
    parser.add_argument("--ddim_steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=23, help="training seed; each (concept, scene) derives its noise")
    parser.add_argument(
        "--overrides", nargs="+", default=[], metavar="KEY=VALUE",
        help="config overrides for every method's model (the trained ones and the base row), as main.py takes them "
        "(e.g. model.params.image_attention_learning_rate=1.0e-04)",
    )  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    return parser


@dataclass(frozen=True)
class Settings:
    """What fixes the pictures; stored in the output folder so that a resume cannot mix settings."""

    base_sha256: str
    train_steps: int
    photos: int
    ddim_steps: int
    scale: float
    seed: int
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Evaluation:
    """A checked command: what to evaluate, where, and how."""

    concepts: tuple[ConceptSpec, ...]
    methods: tuple[Method, ...]
    scenes: tuple[str, ...]
    base: Path
    outdir: Path
    settings: Settings
    n_samples: int
    device: torch.device


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def comma_list(text: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        raise UsageError(f"unknown {what} '{unknown[0] if unknown else text}'; choose from {', '.join(allowed)}")
    return tuple(dict.fromkeys(items))


def load_specs(paths: Sequence[str] | None) -> tuple[ConceptSpec, ...]:
    files = [Path(p) for p in paths] if paths else sorted(CONCEPTS_DIR.glob("*.yaml"))
    if not files:
        raise UsageError(f"no concept specs in {CONCEPTS_DIR}")
    try:
        specs = tuple(ConceptSpec.load(path) for path in files)
        for path, spec in zip(files, specs):
            check_init_word(spec.init_word, str(path))
    except ValueError as err:
        raise UsageError(str(err)) from None
    names = [spec.name for spec in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"concept '{repeated[0]}' is given twice")
    return specs


def check_previous_settings(outdir: Path, settings: Settings) -> None:
    path = outdir / SETTINGS_FILE
    if not path.is_file():
        return
    # Compared as stored (tuples become lists); a setting added later has its default in older folders.
    previous = {item.name: item.default for item in fields(Settings) if item.default is not MISSING}
    previous.update(json.loads(path.read_text(encoding="utf-8")))
    previous = json.loads(json.dumps(previous))
    for key, value in json.loads(json.dumps(asdict(settings))).items():
        if previous.get(key) != value:
            raise UsageError(
                f"{outdir}: its pictures were made with {key}={previous.get(key)!r}, not {value!r}; "
                f"use another --outdir or delete {outdir}"
            )


def check_overrides(overrides: Sequence[str]) -> tuple[str, ...]:
    """The training overrides, checked as main.py would check them (key names, value types)."""
    for override in overrides:
        if not trainer.OVERRIDE.match(override):
            raise UsageError(f"--overrides takes KEY=VALUE items as main.py does, got '{override}'")
    try:
        config = OmegaConf.merge(
            *(OmegaConf.load(path) for path in (BASE_CONFIG, VICO_CONFIG)), OmegaConf.from_dotlist(list(overrides))
        )
        trainer.check_schema(OmegaConf.to_container(config, resolve=True))
    except ConfigError as err:
        raise UsageError(f"--overrides: {err}") from None
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise UsageError(f"--overrides {' '.join(overrides)}: {str(err).splitlines()[0]}") from None
    return tuple(overrides)


def prepare(args: argparse.Namespace) -> Evaluation:
    """Check every argument before anything is trained or sampled."""
    for name in ("train_steps", "photos", "n_samples", "ddim_steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.photos < 2:
        raise UsageError("--photos must be at least 2: ViCo pairs each photo with another one as its reference")
    device = parse_device(args.device, "full")
    methods = tuple(METHODS[name] for name in comma_list(args.methods, tuple(METHODS), "method"))
    scenes = comma_list(args.scenes, tuple(SCENES), "scene")
    base = Path(args.base_ckpt)
    if not base.is_file():
        raise CheckpointError(
            f"base model not found: {base} (pretrain it with: python scripts/miniworld.py pretrain)"
        )
    timesteps = int(OmegaConf.load(BASE_CONFIG).model.params.get("timesteps", 1000))
    make_ddim_timesteps(args.ddim_steps, timesteps)
    overrides = check_overrides(args.overrides)
    settings = Settings(
        file_sha256(base), args.train_steps, args.photos, args.ddim_steps, args.scale, args.seed, overrides
    )
    outdir = Path(args.outdir)
    check_previous_settings(outdir, settings)
    return Evaluation(load_specs(args.concepts), methods, scenes, base, outdir, settings, args.n_samples, device)


# ------------------------------------------------------------------ concept jobs
@dataclass(frozen=True)
class MethodJob:
    """One (concept, method) cell: its folder, prompts and samples.

    ``photos`` is the concept's folder of photos (the real photos every metric compares with);
    the method trains on :attr:`training_photos` and samples with :attr:`reference`.
    """

    concept: ConceptSpec
    method: Method
    folder: Path
    photos: Path
    scenes: tuple[str, ...]
    n_samples: int

    def prompt(self, scene: str) -> str:
        if self.method.kind == "base":
            word = self.concept.init_word
            subject = f"{'an' if word[0] in 'aeiou' else 'a'} {word}"
        else:
            subject = PLACEHOLDER
        return PROMPT.format(subject=subject, scene=SCENES[scene])

    def sample_path(self, scene: str, index: int) -> Path:
        return self.folder / "samples" / f"{scene}-s{index:02d}.png"

    def all_samples(self) -> list[Path]:
        return [self.sample_path(scene, s) for scene in self.scenes for s in range(self.n_samples)]

    def missing(self) -> dict[str, list[int]]:
        """Scene -> indices of its samples not on disk yet (or not whole: :func:`is_finished_sample`)."""
        missing = {}
        for scene in self.scenes:
            samples = [s for s in range(self.n_samples) if not is_finished_sample(self.sample_path(scene, s))]
            if samples:
                missing[scene] = samples
        return missing

    @property
    def init_word(self) -> str:
        return self.method.init_word or self.concept.init_word

    @property
    def training_photos(self) -> Path:
        """The folder the method trains on: all photos, or a folder of the first ``method.photos``."""
        if self.method.photos is None:
            return self.photos
        return self.photos.parent / f"photos-{self.method.photos}"

    @property
    def reference(self) -> Path:
        """The reference photo at sampling: the first training photo, or one drawn apart."""
        folder = self.photos if self.method.reference == "seen" else self.photos.parent / "unseen"
        return folder / "00.png"

    @property
    def reference_mask(self) -> Path:
        return self.reference.parent / "masks" / self.reference.name


def scene_seed(seed: int, concept: str, scene: str) -> int:
    """The noise seed of one (concept, scene), shared by every method."""
    key = np.random.SeedSequence((seed, zlib.crc32(concept.encode()), zlib.crc32(scene.encode())))
    return int(key.generate_state(1)[0])


#: Seed of the photo drawn apart from the training photos (``reference: unseen``).
UNSEEN_SEED = 1


def ensure_photos(spec: ConceptSpec, folder: Path, count: int) -> None:
    """The concept's folder of photos and masks, made once (as ``scripts/miniworld.py make-concept``)."""
    if not (folder / "concept.yaml").is_file():
        make_concept(spec, folder, count)


def ensure_job_photos(job: MethodJob) -> None:
    """The photos a method needs beyond the concept's folder: a folder of its first training
    photos (hard links), and the photo drawn apart for an unseen reference."""
    if job.training_photos != job.photos and not (job.training_photos / "concept.yaml").is_file():
        available = photos_of(job)
        if job.method.photos > len(available):
            raise UsageError(f"method {job.method.name} trains on {job.method.photos} photos; --photos is {len(available)}")
        target = job.training_photos
        (target / "masks").mkdir(parents=True, exist_ok=True)
        for photo in available[: job.method.photos]:
            for source, destination in ((photo, target / photo.name), (photo.parent / "masks" / photo.name, target / "masks" / photo.name)):
                destination.unlink(missing_ok=True)
                trainer.copy_into(source, destination.parent)
        spec = OmegaConf.load(job.photos / "concept.yaml")
        spec.photos = job.method.photos
        OmegaConf.save(spec, target / "concept.yaml")
    if job.method.reference == "unseen" and not (job.reference.parent / "concept.yaml").is_file():
        make_concept(job.concept, job.reference.parent, 1, seed=UNSEEN_SEED)


# ------------------------------------------------------------------ training
@contextlib.contextmanager
def warnings_only(names: Sequence[str]) -> Iterator[None]:
    """Raise the given loggers to WARNING for the duration of the block."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def method_steps(method: Method, evaluation: Evaluation) -> int:
    """Training steps of a row: its own budget, or the command's ``--train_steps``."""
    return method.steps if method.steps is not None else evaluation.settings.train_steps


def training_argv(job: MethodJob, evaluation: Evaluation) -> list[str]:
    configs = [str(BASE_CONFIG), str(VICO_CONFIG), *(str(ROOT / path) for path in job.method.configs)]
    true_mask = ["data.params.train.params.object_masks=true"] if job.method.true_mask else []
    return [
        "--base", *configs, "-t", "--actual_resume", str(evaluation.base.resolve()),
        "--data_root", str(job.training_photos), "--init_word", job.init_word,
        "-n", f"{job.concept.name}-{job.method.name}", "--logdir", str(job.folder / "runs"),
        "-s", str(evaluation.settings.seed), f"lightning.trainer.max_steps={method_steps(job.method, evaluation)}",
        "lightning.callbacks.image_logger.params.batch_frequency=0", "lightning.trainer.enable_progress_bar=false",
        "lightning.trainer.enable_model_summary=false", *evaluation.settings.overrides, *job.method.overrides, *true_mask,
        "lightning.callbacks.export.params.keep_last=-1",  # every save's exports: Fig. 19 reads S* at each step
    ]  # fmt: skip


def unfinished_run(job: MethodJob) -> Path | None:
    """The latest run folder of an interrupted training (one with a last checkpoint)."""
    runs = sorted((job.folder / "runs").glob("*/checkpoints/last.ckpt"))
    return runs[-1].parent.parent if runs else None


def run_training(job: MethodJob, evaluation: Evaluation) -> Path:
    """Train with main.py in this process (continuing an interrupted run); the run folder."""
    previous = unfinished_run(job)
    steps = method_steps(job.method, evaluation)
    if previous is not None and trainer.read_resume_checkpoint(previous / "checkpoints" / "last.ckpt") >= steps:
        return previous
    argv = ["-t", "-r", str(previous)] if previous is not None else training_argv(job, evaluation)
    with warnings_only(CHATTY_LOGGERS):
        run = trainer.setup_run(*trainer.parse_args(argv))
        trainer.train(run)
    return run.logdir


def train_method(job: MethodJob, evaluation: Evaluation) -> Path:
    """Train (or finish training) ``job``'s method on the concept once; its last checkpoint.

    Several evaluations may run into one folder at once (rows that share a training, seeds or
    ablations in parallel processes): the first to reach a (concept, method) trains it under an
    exclusive lock, the others wait for it and use its result.
    """
    if job.method.trained_as is not None:
        shared = {m.name: m for m in evaluation.methods}.get(job.method.trained_as, METHODS[job.method.trained_as])
        return train_method(replace(job, method=shared, folder=job.folder.parent / shared.name), evaluation)
    job.folder.mkdir(parents=True, exist_ok=True)
    with open(job.folder / ".training.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _train_method_locked(job, evaluation)


def _train_method_locked(job: MethodJob, evaluation: Evaluation) -> Path:
    marker = job.folder / TRAINED_FILE
    definition = json.loads(json.dumps(asdict(job.method)))
    if marker.is_file():
        record = json.loads(marker.read_text(encoding="utf-8"))
        if record.get("method", definition) != definition:
            raise UsageError(
                f"{job.folder}: trained as another definition of method {job.method.name} "
                f"({record['method']}); delete that folder to train it again"
            )
        return job.folder / record["checkpoint"]
    ensure_job_photos(job)
    started = time.time()
    try:
        run_folder = run_training(job, evaluation)
    except (trainer.UsageError, ConfigError, ImageError, CheckpointError) as err:
        raise TrainingError(f"training {job.method.name} on {job.concept.name}: {err}") from None
    checkpoint = run_folder / "checkpoints" / "last.ckpt"
    record = {
        "checkpoint": str(checkpoint.relative_to(job.folder)),  # relative: the output folder may move
        "steps": method_steps(job.method, evaluation),
        "seconds": round(time.time() - started, 1),
        "method": definition,
    }
    marker.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return checkpoint


# ------------------------------------------------------------------ pictures
def base_model_config(overrides: Sequence[str]) -> DictConfig:
    """The base model's config under the overrides: a base pretrained with another setting
    (``configs/miniworld/two-heads.yaml``: ``model.params.unet_config.params.num_heads=2``)
    is read with it, as the trained methods are."""
    return OmegaConf.merge(OmegaConf.load(BASE_CONFIG), OmegaConf.from_dotlist(list(overrides))).model


def load_method_model(job: MethodJob, evaluation: Evaluation, checkpoint: Path | None):
    """The model that draws ``job``'s samples: the trained one, or the plain base model."""
    if checkpoint is not None:
        model, _ = load_vico_model(checkpoint, base_ckpt=evaluation.base, device=evaluation.device)
        return model
    model = build_base_model(base_model_config(evaluation.settings.overrides))
    model.load_base_checkpoint(str(evaluation.base))
    return model.eval().to(evaluation.device)


@torch.no_grad()
def sample_scene(
    model, job: MethodJob, scene: str, reference_latents, evaluation: Evaluation, object_masks: torch.Tensor | None = None
) -> np.ndarray:
    """``uint8 [n, H, W, 3]`` samples of the scene's prompt, from the scene's seed."""
    settings = evaluation.settings
    generator = torch.Generator().manual_seed(scene_seed(settings.seed, job.concept.name, scene))
    shape = (model.channels, model.image_size, model.image_size)
    decoded, _ = sample_prompt(
        model, DDIMSampler(model), job.prompt(scene), reference_latents,
        n_samples=job.n_samples, latent_shape=shape, steps=settings.ddim_steps, scale=settings.scale, generator=generator,
        reference_object_masks=object_masks,
    )  # fmt: skip
    return to_uint8(decoded)


def has_image_attention(model) -> bool:
    return bool(getattr(model, "image_attention_parameters", list)())


def render_scene(job: MethodJob, scene: str, seed: int) -> np.ndarray:
    """The renderer's pictures of the concept in ``scene``: what a perfect generator would draw."""
    seeds = np.random.SeedSequence(scene_seed(seed, job.concept.name, scene)).generate_state(job.n_samples)
    return np.stack([render(concept_scene(job.concept, int(s), scene)).image for s in seeds])


@torch.no_grad()
def reference_records(model, reference_latents: torch.Tensor, prompt: str, timestep: int) -> list[AttentionRecord]:
    """The S* attention records of the reference stream at ``timestep``: it does not depend on the
    noisy samples, so one UNet call on a dummy latent gives what every sampling step sees."""
    tokens = model.tokenize([prompt])
    reference = SamplingReference(reference_latents, tokens[0])
    denoiser = GuidedDenoiser(model, model.get_learned_conditioning(tokens), 1, reference=reference)
    records: list[AttentionRecord] = []
    x = torch.zeros(1, model.channels, model.image_size, model.image_size, device=model.device)
    denoiser.model_output(x, torch.tensor(timestep, device=model.device), records)
    return records


def attention_timesteps(ddim_steps: int, num_timesteps: int) -> list[int]:
    """The timesteps of a ``ddim_steps`` DDIM schedule at :data:`ATTENTION_FRACTIONS` of it."""
    steps = make_ddim_timesteps(ddim_steps, num_timesteps)
    return sorted({int(steps[round(f * (len(steps) - 1))]) for f in ATTENTION_FRACTIONS})


def score_attention(job: MethodJob, model, reference_latents, evaluation: Evaluation, reference: np.ndarray) -> None:
    """Write ``attention.json`` (mask IoU per scene, timestep and layer; the IoU a mask of every
    patch would reach) and ``attention.png`` (the first scene, mid-schedule)."""
    true_mask = load_image(job.reference_mask)[..., 0] > 127
    timesteps = attention_timesteps(evaluation.settings.ddim_steps, model.num_timesteps)
    ious: dict[str, dict[int, dict[int, float]]] = {}
    grids: dict[int, tuple[int, int]] = {}
    for scene in job.scenes:
        ious[scene] = {}
        for timestep in timesteps:
            records = reference_records(model, reference_latents, job.prompt(scene), timestep)
            ious[scene][timestep] = attention_mask_iou(records, [true_mask])
            grids.update({r.layer: (r.height, r.width) for r in records})
            if scene == job.scenes[0] and timestep == timesteps[len(timesteps) // 2] and records:
                save_png_atomically(attention_picture(records, reference[None]), job.folder / "attention.png")
    content = {
        "timesteps": timesteps,
        "iou": ious,
        "all_patches_iou": {layer: all_patches_iou(true_mask, *grid) for layer, grid in grids.items()},
        "grid": grids,
    }
    (job.folder / ATTENTION_FILE).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def generate(job: MethodJob, evaluation: Evaluation, checkpoint: Path | None, progress: tqdm) -> None:
    """Draw the missing samples of ``job`` and, for models with image attention, its attention scores."""
    missing = job.missing()
    trained = job.method.kind == "trained"  # the base row samples from text alone, without a reference
    needs_attention = trained and not attention_complete(job)
    (job.folder / "samples").mkdir(parents=True, exist_ok=True)
    ensure_job_photos(job)
    if job.method.kind == "renderer":
        for scene, indices in missing.items():
            images = render_scene(job, scene, evaluation.settings.seed)
            for index in indices:
                save_png_atomically(images[index], job.sample_path(scene, index))
            progress.update()
        return
    if not missing and not needs_attention:
        return
    model = load_method_model(job, evaluation, checkpoint)
    visual = trained and has_image_attention(model)
    reference = load_image(job.reference, (IMAGE_SIZE, IMAGE_SIZE))
    reference_latents = encode_references(model, to_tensor(np.stack([reference]))) if visual else None
    object_masks = true_masks([job.reference_mask], model.device) if job.method.true_mask else None
    sampling_reference = reference_latents if job.method.sample_with_reference else None
    for scene, indices in missing.items():
        images = sample_scene(model, job, scene, sampling_reference, evaluation, object_masks)
        for index in indices:
            save_png_atomically(images[index], job.sample_path(scene, index))
        progress.update()
    if needs_attention:
        score_attention(job, model, reference_latents, evaluation, reference) if visual else write_no_attention(job)


def true_masks(paths: Sequence[Path], device: torch.device) -> torch.Tensor:
    """``bool [K, H, W]`` renderer masks of reference photos (white: object)."""
    return torch.from_numpy(np.stack([load_image(path)[..., 0] > 127 for path in paths])).to(device)


def write_no_attention(job: MethodJob) -> None:
    """``attention.json`` of a model without image attention: nothing to score, recorded as done."""
    content = {"timesteps": [], "iou": {scene: {} for scene in job.scenes}, "all_patches_iou": {}, "grid": {}}
    (job.folder / ATTENTION_FILE).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


# ------------------------------------------------------------------ scores
def read_attention(job: MethodJob) -> dict[str, Any] | None:
    path = job.folder / ATTENTION_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def attention_complete(job: MethodJob) -> bool:
    """Whether ``attention.json`` scores every scene of this command."""
    content = read_attention(job)
    return content is not None and set(job.scenes) <= set(content["iou"])


def attention_scores(job: MethodJob) -> dict[str, Any]:
    """Mask IoU over this command's scenes and every scored timestep: per layer, their mean, and
    the level of a mask of every patch."""
    content = read_attention(job)
    if content is None:
        return {}
    rows = [{int(layer): iou for layer, iou in by_layer.items()} for scene in job.scenes for by_layer in content["iou"][scene].values()]
    layers = mean_dicts(rows)
    if not layers:
        return {}
    return {
        "mask_iou": float(np.mean(list(layers.values()))),
        "mask_iou_layers": layers,
        "mask_iou_all_patches": {int(layer): value for layer, value in content["all_patches_iou"].items()},
        "grid": {int(layer): value for layer, value in content["grid"].items()},
    }


def score_job(job: MethodJob, classifier: WorldClassifier, real_features: torch.Tensor) -> dict[str, Any]:
    """Every metric of one (concept, method) cell."""
    predictions = classify(classifier, job.all_samples())
    fidelity = object_fidelity(predictions.labels, object_labels(job.concept.object))
    prompt_scenes = [HEADS["scene"].index(scene) for scene in job.scenes for _ in range(job.n_samples)]
    return {
        "concept": job.concept.name,
        "method": job.method.name,
        "object_fidelity": fidelity.fidelity,
        **fidelity.accuracy,
        "feature_similarity": feature_similarity(predictions.features, real_features),
        "prompt_fidelity": prompt_fidelity(predictions.labels["scene"], prompt_scenes),
        **(attention_scores(job) if job.method.kind == "trained" else {}),
        "num_generated": len(predictions),
    }


def method_means(rows: Sequence[Mapping[str, Any]], methods: Sequence[Method]) -> list[dict[str, Any]]:
    """Per method, the mean over concepts of every metric (and of the per-layer mask IoUs)."""
    means = []
    for method in methods:
        own = [row for row in rows if row["method"] == method.name]
        if not own:
            continue
        mean: dict[str, Any] = {"concept": "mean", "method": method.name}
        for key in COLUMNS:
            values = [row[key] for row in own if key in row]
            if values:
                mean[key] = float(np.mean(values))
        layers = [row["mask_iou_layers"] for row in own if "mask_iou_layers" in row]
        if layers:
            mean["mask_iou_layers"] = mean_dicts(layers)
        mean["num_generated"] = sum(row["num_generated"] for row in own)
        mean["concepts"] = len(own)
        means.append(mean)
    return means


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    fields = ("concept", "method", *COLUMNS, "num_generated")
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: f"{value:.4f}" if isinstance(value, float) else value for key, value in row.items()})


def cell(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def chance_levels(rows: Sequence[Mapping[str, Any]]) -> dict[int, float]:
    """Per layer, the mask IoU of a mask of every patch, averaged over the concepts scored."""
    seen: dict[str, dict[int, float]] = {}
    for row in rows:  # rows of one concept with image attention at other layers add theirs
        seen.setdefault(row["concept"], {}).update(row.get("mask_iou_all_patches", {}))
    return mean_dicts(list(seen.values()))


def table_markdown(rows: Sequence[Mapping[str, Any]], means: Sequence[Mapping[str, Any]], evaluation: Evaluation) -> str:
    """``table.md``: the mean over concepts, mask IoU per layer, then every concept."""
    labels = {m.name: m.label for m in METHODS.values()}
    settings = evaluation.settings
    concepts = sorted({row["concept"] for row in rows})
    lines = [
        "# ViCo on the miniature world",
        "",
        f"{len(concepts)} concepts ({', '.join(concepts)}); {settings.train_steps} training steps, seed "
        f"{settings.seed}, {settings.photos} photos per concept; prompts 'a photo of * <scene>' over "
        f"{len(evaluation.scenes)} scenes, {evaluation.n_samples} samples each, DDIM {settings.ddim_steps}, "
        f"guidance {settings.scale}; base model sha256 {settings.base_sha256[:12]}"
        + (f"; trained with {' '.join(settings.overrides)}." if settings.overrides else "."),
        "",
        "## Mean over concepts",
        "",
        *markdown_table(
            ["method", *COLUMNS.values()],
            [[labels[m["method"]], *(cell(m.get(key)) for key in COLUMNS)] for m in means],
        ),
    ]
    chance = chance_levels(rows)
    layer_means = [m for m in means if "mask_iou_layers" in m]
    if layer_means:
        layers = sorted({layer for m in layer_means for layer in m["mask_iou_layers"]})
        grid = {layer: size for row in rows for layer, size in row.get("grid", {}).items()}
        lines += [
            "",
            "## Mask IoU per patched layer (mean over concepts, scenes and timesteps)",
            "",
            *markdown_table(
                ["method", *(f"layer {layer} ({grid[layer][0]}x{grid[layer][1]})" for layer in layers)],
                [[labels[m["method"]], *(cell(m["mask_iou_layers"].get(layer)) for layer in layers)] for m in layer_means]
                + [["a mask of every patch", *(cell(chance.get(layer)) for layer in layers)]],
            ),
        ]
    lines += [
        "",
        "## Per concept",
        "",
        *markdown_table(
            ["concept", "method", *(COLUMNS[key] for key in SUMMARY_COLUMNS)],
            [[row["concept"], labels[row["method"]], *(cell(row.get(key)) for key in SUMMARY_COLUMNS)] for row in rows],
        ),
        "",
    ]
    return "\n".join(lines)


def write_results(rows: Sequence[Mapping[str, Any]], evaluation: Evaluation) -> None:
    """``scores.json``, ``scores.csv`` and ``table.md`` over the concepts scored so far."""
    means = method_means(rows, evaluation.methods)
    outdir = evaluation.outdir
    content = {"settings": asdict(evaluation.settings), "scenes": list(evaluation.scenes),
               "n_samples": evaluation.n_samples, "rows": list(rows), "means": means}  # fmt: skip
    (outdir / "scores.json").write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    write_csv(outdir / "scores.csv", [*rows, *means])
    (outdir / "table.md").write_text(table_markdown(rows, means, evaluation), encoding="utf-8")


# ------------------------------------------------------------------ sheet
def concept_sheet(jobs: Sequence[MethodJob], photos: Sequence[Path]) -> np.ndarray:
    """The photos (reference first), a row of scene names, then per method its first sample of each scene."""
    size = (IMAGE_SIZE, IMAGE_SIZE)
    scenes = jobs[0].scenes
    rows = [
        [text_cell("photos (ref. first)", *size), *(load_image(p, size) for p in photos)],
        [None, *(text_cell(scene, *size) for scene in scenes)],
    ]
    for job in jobs:
        rows.append([text_cell(job.method.label, *size), *(load_image(job.sample_path(s, 0), size) for s in scenes)])
    return make_grid(rows)


# ------------------------------------------------------------------ driver
def photos_of(job: MethodJob) -> list[Path]:
    """The concept's photos (not their masks), by name: the reference ``00.png`` first."""
    return sorted(job.photos.glob("[0-9][0-9].png"))


def concept_jobs(spec: ConceptSpec, evaluation: Evaluation) -> list[MethodJob]:
    folder = evaluation.outdir / spec.name
    return [
        MethodJob(spec, method, folder / method.name, folder / "photos", evaluation.scenes, evaluation.n_samples)
        for method in evaluation.methods
    ]


def evaluate_concept(spec: ConceptSpec, evaluation: Evaluation, classifier: WorldClassifier) -> list[dict[str, Any]]:
    """Photos, training, samples, scores and sheet of one concept; its rows."""
    jobs = concept_jobs(spec, evaluation)
    ensure_photos(spec, jobs[0].photos, evaluation.settings.photos)
    photos = photos_of(jobs[0])
    real_features = classify(classifier, photos).features
    rows = []
    for job in jobs:
        checkpoint = None
        if job.method.kind == "trained":
            logger.info("%s: training %s (%d steps)", spec.name, job.method.name, method_steps(job.method, evaluation))
            checkpoint = train_method(job, evaluation)
        with tqdm(total=len(job.missing()), desc=f"{spec.name}/{job.method.name}", unit="prompt", leave=False) as bar:
            generate(job, evaluation, checkpoint, bar)
        rows.append(score_job(job, classifier, real_features))
        (job.folder / "scores.json").write_text(json.dumps(rows[-1], indent=2) + "\n", encoding="utf-8")
    save_png_atomically(concept_sheet(jobs, photos), evaluation.outdir / spec.name / "sheet.png")
    return rows


def run(evaluation: Evaluation, classifier: WorldClassifier) -> list[dict[str, Any]]:
    """Evaluate every concept; results are rewritten after each one (partial tables while it runs)."""
    evaluation.outdir.mkdir(parents=True, exist_ok=True)
    (evaluation.outdir / SETTINGS_FILE).write_text(json.dumps(asdict(evaluation.settings), indent=2) + "\n", encoding="utf-8")
    rows: list[dict[str, Any]] = []
    for spec in tqdm(evaluation.concepts, desc="concepts", unit="concept"):
        rows += evaluate_concept(spec, evaluation, classifier)
        write_results(rows, evaluation)
    logger.info("results in %s", evaluation.outdir / "table.md")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        args = build_parser().parse_args(argv)
        evaluation = prepare(args)
        classifier = load_classifier(args.classifier, evaluation.device)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    try:
        run(evaluation, classifier)
    except (TrainingError, CheckpointError, UsageError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    except trainer.Interrupted as err:
        logger.warning("%s; rerun the same command to continue the evaluation", err)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
