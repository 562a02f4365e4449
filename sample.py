"""Sample personalised images from a trained ViCo model (like CompVis ``scripts/txt2img.py``).

Examples::

    # a training checkpoint (its config names the base SD checkpoint)
    python sample.py --ckpt logs/my_toy/checkpoints/last.ckpt \\
        --ref data/monster_toy/00.jpg --prompt "a photo of * on the beach"

    # an adapter export, several references (concatenated as reference tokens), prompts from a
    # file, another sampler and a negative prompt
    python sample.py --ckpt my_toy.safetensors --ref a.jpg b.jpg --from_file prompts.txt \\
        --sampler dpmpp_2m --ddim_steps 25 --negative_prompt "blurry, low quality"

    # the authors' release: either file of the pair (the sibling of the same step is found)
    # or both, by repeating --ckpt; the base may be a file or a diffusers folder
    python sample.py --ckpt cross_attention-399.pt --ckpt embeddings_gs-399.pt \\
        --base_ckpt models/ldm/stable-diffusion-v1/sd-v1-4.ckpt --ref 00.jpg --prompt "a * toy"

Prompt files: one prompt per line; ``prompt | negative prompt`` gives a line its own negative
prompt (``--negative_prompt`` is the default of lines without one; a prompt cannot contain
``|``). Empty lines are skipped.

Outputs, never overwriting anything: ``<outdir>/samples/NNNNN.png``, numbered after the
highest number already there; one grid per prompt and run, ``<outdir>/grid-<slug>.png`` (or
``grid-<slug>-2.png``, ... when taken): one row per iteration, the reference image(s) at the
left of the first row. ``--save_attention`` adds, for a few steps of the first iteration of
each prompt, ``<outdir>/attention/<slug>-stepNNN-tTTTT.png``: one row per reference; the
reference, then for each patched layer the S* attention map (upsampled, "hot" colours) and the
reference inside its Otsu mask (paper Fig. 18).

Each PNG carries its settings as text chunks (``prompt``, ``negative_prompt``, ``seed``,
``reference_seed``, ``sampler``, ``steps``, ``scale``, ``eta``, ``references``, ``checkpoint``,
...), ``regenerate``: the arguments that make this one image again, alone, and ``parameters``:
the same settings in AUTOMATIC1111's format, which web UIs, ComfyUI and image sites read.
Pictures are written by :mod:`ldm.pictures`, as the training previews and evaluation sheets are.

Seeds: image ``j`` of a prompt (``j = iteration * n_samples + k``) draws all its noise from its
own generator seeded with ``--seed + j``, so it does not depend on the other images of its
batch or on earlier prompts. References follow the authors' code: squashed (resized whole,
bilinear) to the sampling size and encoded as a *sample* of the VAE posterior, drawn for each
iteration from ``--reference_seed`` (default ``--seed``) ``+ iteration * n_samples``.
``--ref_resize crop`` centre-crops instead (bicubic, keeps the aspect ratio); ``--ref_latent
mode`` takes the posterior mean (deterministic, the same for every iteration). To make image
``j`` again alone: ``--seed <seed + j> --reference_seed <its reference seed> --n_samples 1
--n_iter 1`` with the other settings unchanged, which is what its ``regenerate`` chunk says.

Predictable mistakes print one ``error: ...`` line on stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ldm.cli import HelpFormatter
from ldm.data.images import ImageError, to_tensor
from ldm.models.diffusion.latent import LatentDiffusionModel
from ldm.models.diffusion.ksamplers import SPACINGS
from ldm.models.diffusion.samplers import DDIM_GRID_SAMPLERS, SAMPLERS, make_sampler
from ldm.models.diffusion.sampling import (
    REFERENCE_LATENTS,
    REFERENCE_RESIZE,
    load_reference_images,
    make_ddim_timesteps,
    references_for_prompt,
    sample_seeded,
)
from ldm.models.loading import (
    ViCoWeights,
    autoencoder_factor,
    base_checkpoint_path,
    build_vico_model,
    default_image_size,
    missing_config_hint,
    read_vico_weights,
    resolve_config,
    size_multiple,
)
from ldm.pictures import (
    A1111_SAMPLERS,
    a1111_parameters,
    attention_picture,
    make_grid,
    save_new_png,
    save_png,
    to_uint8,
)
from ldm.util import CheckpointError

logger = logging.getLogger("sample")

#: Fractions of the sampling run whose attention maps ``--save_attention`` draws.
ATTENTION_STEP_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: The largest --H/--W accepted, 16 times SD v1's 512 px (--H 400000 used to be killed for
#: memory while the reference was resized).
MAX_SIZE = 8192
#: The seeds torch.Generator.manual_seed accepts.
SEED_RANGE = (-(2**63), 2**64 - 1)
NEGATIVE_SEPARATOR = "|"
SAMPLE_NAME = re.compile(r"^(\d+)\.png$")


class UsageError(ValueError):
    """A mistake in the command line; reported as one ``error:`` line."""


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose mistakes become :class:`UsageError` (one ``error:`` line)."""

    def error(self, message: str) -> None:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        description="Sample images of a learned concept S* with ViCo.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--ckpt", action="append",
        help="training checkpoint (.ckpt), adapter export (.safetensors), or the authors' "
        "cross_attention-<step>.pt / embeddings_gs-<step>.pt (one finds the other; or repeat --ckpt for both)",
    )  # fmt: skip
    parser.add_argument(
        "--ref", "--image_path", nargs="+", action="extend", required=True, metavar="[PLACEHOLDER=]PHOTO",
        help="reference image(s); several are concatenated. Several concepts: one per placeholder, "
        "--ref '*=a.png' --ref '@=b.png'; each prompt uses those of the placeholders it names",
    )  # fmt: skip
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="the prompt; '*' stands for the learned concept")
    prompts.add_argument(
        "--from_file", "--from-file", help="a text file with one prompt per line, optionally 'prompt | negative prompt'"
    )
    authors = parser.add_argument_group(
        "the authors' flags (scripts/vico_txt2img.py)",
        "--ckpt_path is --base_ckpt and --image_path is --ref; --ft_path and --load_step name --ckpt",
    )
    authors.add_argument("--ft_path", metavar="RUN", help="a run folder: its checkpoints/last.ckpt, or with --load_step")
    authors.add_argument(
        "--load_step", type=int, metavar="N",
        help="with --ft_path: RUN/checkpoints/cross_attention-N.pt and embeddings_gs-N.pt (numbered by the steps "
        "trained: 400 for the authors' 399)",
    )  # fmt: skip
    authors.add_argument(
        "--embedding_manager_ckpt", "--embedding_path", dest="embedding_manager_ckpt", help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--negative_prompt", default="", help="what guidance steers away from (the unconditional branch's text)"
    )
    parser.add_argument("--outdir", default="outputs/samples", help="output folder")
    parser.add_argument("--n_samples", type=int, default=4, help="batch size: samples per iteration")
    parser.add_argument("--n_iter", type=int, default=1, help="iterations (grid rows) per prompt")
    parser.add_argument("--sampler", choices=tuple(SAMPLERS), default=None, help="sampler (default: ddim)")
    parser.add_argument("--plms", action="store_true", help="the same as --sampler plms (CompVis flag)")
    parser.add_argument("--ddim_steps", "--steps", dest="ddim_steps", type=int, default=50, help="sampling steps")
    parser.add_argument(
        "--ddim_eta", "--eta", dest="ddim_eta", type=float, default=None,
        help="noise added at each step: DDIM eta (default 0 = deterministic) or Euler ancestral eta (default 1); "
        "plms and dpmpp_2m are deterministic",
    )  # fmt: skip
    parser.add_argument(
        "--spacing", choices=SPACINGS, default="uniform",
        help="noise levels of dpmpp_2m and euler_a (karras: Karras et al.'s rho = 7 spacing)",
    )  # fmt: skip
    parser.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale (1 = none)")
    parser.add_argument(
        "--H", type=int, help="image height (default: the model's latent size x the autoencoder factor)"
    )
    parser.add_argument("--W", type=int, help="image width (default: as --H)")
    parser.add_argument("--seed", type=int, default=42, help="seed of image 0 of every prompt; image j uses seed + j")
    parser.add_argument(
        "--reference_seed", type=int, default=None,
        help="seed of the reference's posterior sample of iteration 0 (default: --seed); iteration i adds i * n_samples",
    )  # fmt: skip
    parser.add_argument(
        "--ref_resize", choices=tuple(REFERENCE_RESIZE), default="squash",
        help="squash: resize the whole reference, bilinear (the authors'); crop: centre crop, bicubic (keeps the aspect ratio)",
    )  # fmt: skip
    parser.add_argument(
        "--ref_latent", choices=REFERENCE_LATENTS, default="sample",
        help="sample: a VAE posterior sample per iteration (the authors'); mode: the posterior mean (deterministic)",
    )  # fmt: skip
    parser.add_argument(
        "--precision", choices=("full", "autocast"), default="full",
        help="autocast: bf16 (fp16 where bf16 is unsupported) on CUDA; not available on CPU",
    )  # fmt: skip
    parser.add_argument(
        "--base_ckpt", "--ckpt_path",
        help="base SD checkpoint or diffusers folder, overriding the one recorded in the config",
    )  # fmt: skip
    parser.add_argument("--config", help="model config, overriding the one stored with the weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument(
        "--save_attention", action="store_true", help="also draw the S* attention maps and masks (paper Fig. 18)"
    )
    parser.add_argument(
        "--compile",
        choices=("default", "reduce-overhead", "max-autotune"),
        help="capture the UNet with torch.compile in this mode (reduce-overhead: CUDA graphs); the first "
        "step then traces it. Unmeasured on a GPU here: docs/PERFORMANCE.md",
    )
    return parser


@dataclass(frozen=True)
class Prompt:
    """One prompt and the negative prompt of its guidance."""

    text: str
    negative: str = ""


@dataclass
class Job:
    """Everything checked before the model is built."""

    weights: ViCoWeights
    config: DictConfig
    prompts: list[Prompt]
    references: np.ndarray
    height: int
    width: int
    factor: int
    device: torch.device
    sampler: str
    #: per reference, the placeholder it was given for (``--ref @=photo``), or None
    reference_placeholders: list[str | None] | None = None
    #: per prompt, the references it uses and their placeholders (:func:`plan_references`)
    plans: list[tuple[list[int], list[str | None] | None]] | None = None


# -------------------------------------------------------------- validation
def parse_prompt_line(line: str, default_negative: str) -> Prompt:
    """``prompt`` or ``prompt | negative prompt`` (see the module docstring)."""
    text, separator, negative = line.partition(NEGATIVE_SEPARATOR)
    if NEGATIVE_SEPARATOR in negative:
        raise UsageError(f"prompt line '{line}' has more than one '{NEGATIVE_SEPARATOR}'")
    if not text.strip():
        raise UsageError(f"prompt line '{line}' has no prompt before '{NEGATIVE_SEPARATOR}'")
    return Prompt(text.strip(), negative.strip() if separator else default_negative)


def read_prompts(args: argparse.Namespace) -> list[Prompt]:
    if args.prompt is not None:
        if not args.prompt.strip():
            raise UsageError("--prompt is empty")
        return [Prompt(args.prompt, args.negative_prompt)]
    path = Path(args.from_file)
    if not path.is_file():
        raise UsageError(f"prompt file not found: {path}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise UsageError(f"prompt file has no prompts: {path}")
    return [parse_prompt_line(line, args.negative_prompt) for line in lines]


def warn_missing_placeholders(prompts: Sequence[Prompt], config: DictConfig) -> None:
    """A prompt without the placeholder samples the base model's idea of the prompt, with the
    reference mask taken from the end-of-text map: legal, but rarely what was meant."""
    placeholders = OmegaConf.select(config, "model.params.personalization_config.params.placeholder_strings") or []
    for prompt in prompts:
        if placeholders and not any(p in prompt.text for p in placeholders):
            logger.warning(
                "warning: prompt '%s' has no placeholder (%s): the learned concept S* is not used",
                prompt.text, ", ".join(f"'{p}'" for p in placeholders),
            )  # fmt: skip


def parse_references(entries: Sequence[str], placeholders: Sequence[str]) -> tuple[list[str], list[str | None]]:
    """``--ref`` entries -> (photo paths, the placeholder of each or None).

    ``PLACEHOLDER=photo`` gives a photo for one placeholder of the model (an existing file whose
    name merely contains ``=`` is a plain photo). Either every entry names its placeholder, or
    none does; a placeholder gets one photo.
    """
    paths: list[str] = []
    keys: list[str | None] = []
    for entry in entries:
        key, separator, path = entry.partition("=")
        if separator and key in placeholders:
            paths.append(path)
            keys.append(key)
        elif separator and not Path(entry).exists():
            raise UsageError(
                f"--ref {entry}: '{key}' is not a placeholder of the model "
                f"({', '.join(repr(p) for p in placeholders)}) and '{entry}' is not a file"
            )
        else:
            paths.append(entry)
            keys.append(None)
    named = [k for k in keys if k is not None]
    if named and len(named) != len(keys):
        raise UsageError("--ref: give every reference with its placeholder (PLACEHOLDER=photo), or none")
    repeated = sorted({k for k in named if named.count(k) > 1})
    if repeated:
        raise UsageError(f"--ref: placeholder '{repeated[0]}' has more than one reference; give one per placeholder")
    for path in paths:
        if not path:
            raise UsageError("--ref: a reference has an empty photo path")
    return paths, keys


def plan_references(job: Job, model: LatentDiffusionModel) -> None:
    """Choose each prompt's references (:func:`references_for_prompt`) before sampling anything."""
    keys = job.reference_placeholders or [None] * len(job.references)
    job.plans = []
    for prompt in job.prompts:
        try:
            job.plans.append(references_for_prompt(model.embedding_manager, model.tokenize([prompt.text])[0], keys))
        except ValueError as err:
            raise UsageError(f"prompt '{prompt.text}': {err}") from None


def parse_device(name: str, precision: str) -> torch.device:
    """A device that holds data and that this torch can use: cpu, cuda (an existing index) or mps."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown --device '{name}'") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name}: models run on cpu, cuda or mps, not {device.type}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: no such CUDA device; this machine has {torch.cuda.device_count()}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available on this machine")
    if precision == "autocast" and device.type != "cuda":
        raise UsageError("--precision autocast needs a CUDA device; use --precision full on the CPU")
    return device


def choose_sampler(args: argparse.Namespace) -> str:
    """The sampler's name, with ``--plms`` and ``--ddim_eta``/``--spacing`` checked against it."""
    if args.plms and args.sampler not in (None, "plms"):
        raise UsageError(f"--plms and --sampler {args.sampler} contradict each other")
    name = "plms" if args.plms else args.sampler or "ddim"
    eta = args.ddim_eta
    if eta is not None and not (math.isfinite(eta) and eta >= 0):
        raise UsageError(f"--ddim_eta must be a finite number >= 0, got {eta}")
    if eta and name in ("plms", "dpmpp_2m"):
        raise UsageError(f"--sampler {name} is deterministic: --ddim_eta must be 0")
    if args.spacing != "uniform" and name in DDIM_GRID_SAMPLERS:
        raise UsageError(f"--spacing {args.spacing} is for --sampler dpmpp_2m or euler_a, not {name}")
    return name


def check_seeds(args: argparse.Namespace) -> None:
    """Every seed the run will use (image ``j``: ``--seed + j``; references: ``--reference_seed``
    plus ``iteration * n_samples``) must be one ``torch.Generator.manual_seed`` takes."""
    last = (args.n_iter * args.n_samples) - 1
    reference_last = (args.n_iter - 1) * args.n_samples
    for flag, first, end in (("--seed", args.seed, last), ("--reference_seed", args.reference_seed, reference_last)):
        if first is not None and not (SEED_RANGE[0] <= first and first + end <= SEED_RANGE[1]):
            raise UsageError(
                f"{flag} {first}: the seeds of this run ({first} to {first + end}) must lie between "
                f"{SEED_RANGE[0]} and {SEED_RANGE[1]}"
            )


def check_steps(name: str, steps: int, num_timesteps: int) -> None:
    if name in DDIM_GRID_SAMPLERS:
        make_ddim_timesteps(steps, num_timesteps)
    elif steps > num_timesteps:
        raise UsageError(f"--ddim_steps {steps} exceeds the model's {num_timesteps} timesteps")


def resolve_authors_flags(args: argparse.Namespace) -> None:
    """Turn the authors' ``--ft_path RUN --load_step N`` into ``--ckpt`` (``--ckpt_path`` and
    ``--image_path`` are plain aliases); their other weight flags are one line naming ours."""
    if args.embedding_manager_ckpt is not None:
        raise UsageError(
            "--embedding_manager_ckpt: pass the embeddings file with --ckpt (its cross_attention-N.pt is found "
            "beside it, or repeat --ckpt for both)"
        )
    if args.load_step is not None and args.ft_path is None:
        raise UsageError("--load_step needs --ft_path (the run folder); or pass the file with --ckpt")
    if args.ft_path is None:
        if not args.ckpt:
            raise UsageError("the following arguments are required: --ckpt (or the authors' --ft_path)")
        return
    if args.ckpt:
        raise UsageError("--ft_path and --ckpt both name the weights; pass one of them")
    folder = Path(args.ft_path) / "checkpoints"
    if args.load_step is None:
        args.ckpt = [str(folder / "last.ckpt")]
        return
    pair = folder / f"cross_attention-{args.load_step}.pt"
    if not pair.is_file():
        steps = sorted(int(p.stem.rpartition("-")[2]) for p in folder.glob("cross_attention-*.pt"))
        raise UsageError(
            f"--ft_path {args.ft_path} --load_step {args.load_step}: no {pair.name} in {folder} (steps there: "
            f"{', '.join(map(str, steps)) or 'none'}; files are numbered by the steps trained: "
            f"the authors' -399 is -400)"
        )
    args.ckpt = [str(pair)]


def prepare(args: argparse.Namespace) -> Job:
    """Check the arguments and read the small files, before the (slow) model build."""
    resolve_authors_flags(args)
    for name in ("n_samples", "n_iter", "ddim_steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not math.isfinite(args.scale):
        raise UsageError(f"--scale must be a finite number, got {args.scale}")
    sampler = choose_sampler(args)
    prompts = read_prompts(args)
    device = parse_device(args.device, args.precision)
    weights = read_vico_weights(args.ckpt)
    config = resolve_config(weights, args.config)
    factor = autoencoder_factor(config)
    default_size = default_image_size(config)
    height = args.H or default_size
    width = args.W or (args.H or default_size)
    multiple = size_multiple(config)
    for flag, value in (("--H", height), ("--W", width)):
        if value <= 0 or value % factor:
            raise UsageError(f"{flag} {value} is not a positive multiple of the autoencoder factor {factor}")
        if value % multiple or value > MAX_SIZE:
            raise UsageError(
                f"{flag} {value}: this model samples sizes that are multiples of {multiple} (the autoencoder "
                f"factor {factor} times the UNet's downsampling), up to {MAX_SIZE}"
            )
    check_seeds(args)
    check_steps(sampler, args.ddim_steps, int(config.model.params.get("timesteps", 1000)))
    hint = missing_config_hint(weights, args.config)
    base_checkpoint_path(config, args.base_ckpt, weights.source, weights.folder, hint=hint)
    placeholders = OmegaConf.select(config, "model.params.personalization_config.params.placeholder_strings") or []
    paths, keys = parse_references(args.ref, list(placeholders))
    references = load_reference_images(paths, (height, width), args.ref_resize)
    warn_missing_placeholders(prompts, config)
    check_outdir(args.outdir)
    return Job(weights, config, prompts, references, height, width, factor, device, sampler, keys)


def check_outdir(outdir: str) -> None:
    """``--outdir`` can be created and written, checked without creating anything."""
    path = Path(outdir).absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--outdir {outdir}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--outdir {outdir}: {existing} is not writable")


# ----------------------------------------------------------------- pictures
def slugify(prompt: str, max_length: int = 80) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower().replace("*", " s ")).strip("-")
    return slug[:max_length].rstrip("-") or "prompt"


def unique_slugs(prompts: Sequence[str]) -> list[str]:
    """File-name slugs of the prompts; repeated ones get ``-2``, ``-3``, ..."""
    slugs: list[str] = []
    for prompt in prompts:
        base = slug = slugify(prompt)
        suffix = 2
        while slug in slugs:
            slug, suffix = f"{base}-{suffix}", suffix + 1
        slugs.append(slug)
    return slugs


def attention_steps(num_steps: int) -> list[int]:
    return sorted({round(f * (num_steps - 1)) for f in ATTENTION_STEP_FRACTIONS})


def next_sample_number(folder: Path) -> int:
    """One more than the highest ``NNNNN.png`` in ``folder`` (0 if none): a file deleted from
    the middle never makes a later run reuse its number and overwrite the ones after it."""
    numbers = [int(match.group(1)) for match in map(SAMPLE_NAME.match, (p.name for p in folder.iterdir())) if match]
    return max(numbers, default=-1) + 1


def save_new_sample(array: np.ndarray, folder: Path, number: int, metadata: dict[str, str]) -> int:
    """Write ``folder/NNNNN.png`` with the first number from ``number`` not taken (another run
    may write into the same folder); return the number used."""
    while True:
        try:
            save_png(array, folder / f"{number:05d}.png", metadata, exclusive=True)
            return number
        except FileExistsError:
            number += 1


def image_metadata(
    args: argparse.Namespace, job: Job, prompt: Prompt, seed: int, reference_seed: int | None, eta: float
) -> dict[str, str]:
    """The PNG text chunks of one sample: its settings, the arguments that make it again alone,
    and the same settings as AUTOMATIC1111's ``parameters`` (:func:`a1111_settings`)."""
    metadata = {
        "prompt": prompt.text,
        "negative_prompt": prompt.negative,
        "seed": str(seed),
        "sampler": job.sampler,
        "steps": str(args.ddim_steps),
        "scale": str(args.scale),
        "eta": str(eta),
        "size": f"{job.width}x{job.height}",
        "references": json.dumps(args.ref),
        "reference_resize": args.ref_resize,
        "reference_latent": args.ref_latent,
        "checkpoint": json.dumps(args.ckpt),
    }
    regenerate = [
        *(item for ckpt in args.ckpt for item in ("--ckpt", ckpt)), "--ref", *args.ref,
        "--prompt", prompt.text, "--negative_prompt", prompt.negative, "--seed", str(seed),
        "--n_samples", "1", "--n_iter", "1", "--sampler", job.sampler, "--ddim_steps", str(args.ddim_steps),
        "--ddim_eta", str(eta), "--scale", str(args.scale), "--H", str(job.height), "--W", str(job.width),
        "--ref_resize", args.ref_resize, "--ref_latent", args.ref_latent, "--precision", args.precision,
    ]  # fmt: skip
    if reference_seed is not None:
        metadata["reference_seed"] = str(reference_seed)
        regenerate += ["--reference_seed", str(reference_seed)]
    if job.sampler not in DDIM_GRID_SAMPLERS:
        metadata["spacing"] = args.spacing
        regenerate += ["--spacing", args.spacing]
    for flag, value in (("base_ckpt", args.base_ckpt), ("config", args.config)):
        if value is not None:
            metadata[flag] = value
            regenerate += [f"--{flag}", value]
    metadata["regenerate"] = shlex.join(regenerate)
    metadata["parameters"] = a1111_parameters(prompt.text, prompt.negative, a1111_settings(args, job, seed, eta))
    return metadata


def a1111_settings(args: argparse.Namespace, job: Job, seed: int, eta: float) -> dict[str, object]:
    """A sample's settings under AUTOMATIC1111's keys; ``Model`` is the base checkpoint's name, and
    the ViCo weights and reference photos, which the web UI has no field for, come last."""
    sampler = A1111_SAMPLERS[job.sampler] + (" Karras" if args.spacing == "karras" else "")
    base = args.base_ckpt or OmegaConf.select(job.config, "model.params.ckpt_path")
    settings: dict[str, object] = {
        "Steps": args.ddim_steps, "Sampler": sampler, "CFG scale": args.scale, "Seed": seed,
        "Size": f"{job.width}x{job.height}",
    }  # fmt: skip
    if base:
        settings["Model"] = Path(base).stem
    if job.sampler in ("ddim", "euler_a"):
        settings["Eta"] = eta
    settings["ViCo weights"] = " + ".join(Path(ckpt).name for ckpt in args.ckpt)
    settings["ViCo reference"] = " + ".join(args.ref)
    return settings


# ------------------------------------------------------------------ sampling
def precision_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "full":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def warn_non_finite(decoded: torch.Tensor) -> None:
    bad = [k for k, image in enumerate(decoded) if not bool(torch.isfinite(image).all())]
    if bad:
        logger.warning("warning: samples %s hold NaN values (saved black); the weights or settings are broken", bad)


def generate(args: argparse.Namespace, job: Job, model: LatentDiffusionModel) -> None:
    """Sample every prompt ``n_iter`` times (with the references of ``job.plans``, set by
    :func:`plan_references`) and write the PNGs, grids and attention pictures."""
    sampler = make_sampler(job.sampler, model, args.spacing)
    eta = sampler.default_eta if args.ddim_eta is None else args.ddim_eta
    outdir = Path(args.outdir)
    sample_dir = outdir / "samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    attention_dir = outdir / "attention"
    if args.save_attention:
        attention_dir.mkdir(exist_ok=True)
    number = next_sample_number(sample_dir)
    latent_shape = (model.channels, job.height // job.factor, job.width // job.factor)
    schedule = sampler.make_schedule(args.ddim_steps, eta, torch.device("cpu"))
    record_steps = attention_steps(len(schedule)) if args.save_attention else []
    progress = tqdm(total=len(job.prompts) * args.n_iter, desc="Sampling", unit="batch")
    with progress, torch.no_grad(), precision_context(args.precision, job.device):
        slugs = unique_slugs([p.text for p in job.prompts])
        for prompt, slug, (used, placeholders) in zip(job.prompts, slugs, job.plans):
            prompt_references = job.references[used]
            reference_images = to_tensor(prompt_references)
            rows: list[list[np.ndarray | None]] = []
            for iteration in range(args.n_iter):
                first = iteration * args.n_samples
                seeds = [args.seed + first + k for k in range(args.n_samples)]
                reference_seed = None
                if args.ref_latent == "sample":
                    reference_seed = (args.seed if args.reference_seed is None else args.reference_seed) + first
                decoded, intermediates = sample_seeded(
                    model,
                    sampler,
                    prompt.text,
                    reference_images,
                    seeds,
                    reference_seed,
                    latent_shape=latent_shape,
                    steps=args.ddim_steps,
                    scale=args.scale,
                    eta=eta,
                    negative_prompt=prompt.negative,
                    record_attention=record_steps if iteration == 0 else (),
                    verbose=True,
                    reference_placeholders=placeholders,
                )
                warn_non_finite(decoded)
                images = to_uint8(decoded)
                for seed, image in zip(seeds, images):
                    metadata = image_metadata(args, job, prompt, seed, reference_seed, eta)
                    number = save_new_sample(image, sample_dir, number, metadata) + 1
                references = list(prompt_references) if iteration == 0 else [None] * len(prompt_references)
                rows.append([*references, *images])
                for step, records in intermediates["attention"].items():
                    stem = f"{slug}-step{step:03d}-t{round(schedule.step_timestep(step)):04d}"
                    save_new_png(attention_picture(records, prompt_references, placeholders), attention_dir, stem)
                progress.update()
            grid_metadata = {"prompt": prompt.text, "negative_prompt": prompt.negative, "seeds": f"{args.seed}-{seeds[-1]}"}
            path = save_new_png(make_grid(rows), outdir, f"grid-{slug}", grid_metadata)
            logger.info("%s: %s", prompt.text, path.name)
    logger.info("samples in %s", sample_dir)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        args = build_parser().parse_args(argv)
        job = prepare(args)
        hint = missing_config_hint(job.weights, args.config)
        model = build_vico_model(job.weights, job.config, args.base_ckpt, job.device, hint=hint)
        if args.compile:
            model.compile_unet(mode=args.compile)
        plan_references(job, model)
    except (CheckpointError, ImageError, ValueError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    try:
        generate(args, job, model)
    except OSError as err:  # a full disk or a folder removed during the run: the files written so far stay
        print(f"error: cannot write to --outdir {args.outdir}: {err.strerror or err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
