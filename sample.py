"""Sample personalised images from a trained ViCo model (like CompVis ``scripts/txt2img.py``).

Examples::

    # a training checkpoint (its config names the base SD checkpoint)
    python sample.py --ckpt logs/my_toy/checkpoints/last.ckpt \\
        --ref data/monster_toy/00.jpg --prompt "a photo of * on the beach"

    # an adapter export, several references (concatenated as reference tokens), prompts from a file
    python sample.py --ckpt my_toy.safetensors --ref a.jpg b.jpg --from_file prompts.txt

    # the authors' release: either file of the pair (the sibling of the same step is found)
    # or both, by repeating --ckpt
    python sample.py --ckpt cross_attention-399.pt --ckpt embeddings_gs-399.pt \\
        --base_ckpt models/ldm/stable-diffusion-v1/sd-v1-4.ckpt --ref 00.jpg --prompt "a * toy"

Outputs: ``<outdir>/samples/NNNNN.png`` (numbered after the files already there) and one grid
per prompt, ``<outdir>/grid-<slug>.png``: one row per iteration, the reference image(s) at
the left of the first row. ``--save_attention`` adds, for a few steps of the first iteration
of each prompt, ``<outdir>/attention/<slug>-stepNNN-tTTTT.png``: one row per reference; the
reference, then for each patched layer the S* attention map (upsampled, "hot" colours) and
the reference inside its Otsu mask (paper Fig. 18).

Reference images are centre-cropped and resized to the sampling size and encoded once with
the autoencoder's posterior *mode* (no randomness). Every random number of a prompt comes
from one CPU ``torch.Generator`` seeded with ``--seed`` at the start of that prompt, so the
same arguments give the same images on the same machine, and a prompt's images do not
depend on the prompts before it.

Predictable mistakes print one ``error: ...`` line on stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from PIL import Image, ImageDraw
from tqdm import tqdm

from ldm.data.images import ImageError, load_image, to_tensor
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.sampling import encode_references, make_ddim_timesteps, sample_prompt
from ldm.models.loading import (
    ViCoWeights,
    autoencoder_factor,
    base_checkpoint_path,
    build_vico_model,
    default_image_size,
    read_vico_weights,
    resolve_config,
)
from ldm.modules.vico import AttentionRecord
from ldm.util import CheckpointError

logger = logging.getLogger("sample")

#: Fractions of the sampling run whose attention maps ``--save_attention`` draws.
ATTENTION_STEP_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
GRID_PADDING = 2


class UsageError(ValueError):
    """A mistake in the command line; reported as one ``error:`` line."""


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose mistakes become :class:`UsageError` (one ``error:`` line)."""

    def error(self, message: str) -> None:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description="Sample images of a learned concept S* with ViCo.")
    parser.add_argument(
        "--ckpt", action="append", required=True,
        help="training checkpoint (.ckpt), adapter export (.safetensors), or the authors' "
        "cross_attention-<step>.pt / embeddings_gs-<step>.pt (one finds the other; or repeat --ckpt for both)",
    )
    parser.add_argument("--ref", nargs="+", required=True, help="reference image(s); several are concatenated")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="the prompt; '*' stands for the learned concept")
    prompts.add_argument("--from_file", help="a text file with one prompt per line")
    parser.add_argument("--outdir", default="outputs/samples", help="output folder")
    parser.add_argument("--n_samples", type=int, default=4, help="batch size: samples per iteration")
    parser.add_argument("--n_iter", type=int, default=1, help="iterations (grid rows) per prompt")
    parser.add_argument("--ddim_steps", type=int, default=50, help="sampling steps")
    parser.add_argument("--ddim_eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    parser.add_argument("--plms", action="store_true", help="PLMS instead of DDIM (eta must be 0)")
    parser.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale (1 = none)")
    parser.add_argument(
        "--H", type=int, help="image height (default: the model's latent size x the autoencoder factor)"
    )
    parser.add_argument("--W", type=int, help="image width (default: as --H)")
    parser.add_argument("--seed", type=int, default=42, help="random seed of every prompt")
    parser.add_argument(
        "--precision", choices=("full", "autocast"), default="full",
        help="autocast: bf16 (fp16 where bf16 is unsupported) on CUDA; not available on CPU",
    )
    parser.add_argument("--base_ckpt", help="base SD checkpoint, overriding the one recorded in the config")
    parser.add_argument("--config", help="model config, overriding the one stored with the weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument(
        "--save_attention", action="store_true", help="also draw the S* attention maps and masks (paper Fig. 18)"
    )
    return parser


@dataclass
class Job:
    """Everything checked before the model is built."""

    weights: ViCoWeights
    config: DictConfig
    prompts: list[str]
    references: np.ndarray
    height: int
    width: int
    factor: int
    device: torch.device


# -------------------------------------------------------------- validation
def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        if not args.prompt.strip():
            raise UsageError("--prompt is empty")
        return [args.prompt]
    path = Path(args.from_file)
    if not path.is_file():
        raise UsageError(f"prompt file not found: {path}")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"prompt file has no prompts: {path}")
    return prompts


def parse_device(name: str, precision: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown --device '{name}'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    if precision == "autocast" and device.type != "cuda":
        raise UsageError("--precision autocast needs a CUDA device; use --precision full on the CPU")
    return device


def prepare(args: argparse.Namespace) -> Job:
    """Check the arguments and read the small files, before the (slow) model build."""
    for name in ("n_samples", "n_iter", "ddim_steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.ddim_eta < 0:
        raise UsageError(f"--ddim_eta must be >= 0, got {args.ddim_eta}")
    if args.plms and args.ddim_eta != 0:
        raise UsageError("--plms is deterministic: --ddim_eta must be 0")
    prompts = read_prompts(args)
    device = parse_device(args.device, args.precision)
    weights = read_vico_weights(args.ckpt)
    config = resolve_config(weights, args.config)
    factor = autoencoder_factor(config)
    default_size = default_image_size(config)
    height = args.H or default_size
    width = args.W or (args.H or default_size)
    for flag, value in (("--H", height), ("--W", width)):
        if value <= 0 or value % factor:
            raise UsageError(f"{flag} {value} is not a positive multiple of the autoencoder factor {factor}")
    make_ddim_timesteps(args.ddim_steps, int(config.model.params.get("timesteps", 1000)))
    base_checkpoint_path(config, args.base_ckpt, weights.source)
    references = np.stack([load_image(path, (height, width)) for path in args.ref])
    return Job(weights, config, prompts, references, height, width, factor, device)


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


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` in [-1, 1] -> ``uint8 [B, H, W, 3]``."""
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(rows: Sequence[Sequence[np.ndarray | None]], padding: int = GRID_PADDING) -> np.ndarray:
    """Tile equally sized ``uint8 [H, W, 3]`` cells on white; ``None`` leaves a cell blank."""
    cell = next(c for row in rows for c in row if c is not None)
    height, width = cell.shape[:2]
    columns = max(len(row) for row in rows)
    grid = np.full(
        (padding + len(rows) * (height + padding), padding + columns * (width + padding), 3), 255, dtype=np.uint8
    )
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            if image is not None:
                top, left = padding + r * (height + padding), padding + c * (width + padding)
                grid[top : top + height, left : left + width] = image
    return grid


def hot_colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> ``uint8 [..., 3]`` black-red-yellow-white."""
    rgb = np.stack([values * 3, values * 3 - 1, values * 3 - 2], axis=-1).clip(0, 1)
    return (rgb * 255).round().astype(np.uint8)


def attention_picture(records: Sequence[AttentionRecord], references: np.ndarray) -> np.ndarray:
    """One row per reference: the reference, then per patched layer its S* map and masked reference."""
    height, width = references.shape[1:3]
    records = sorted(records, key=lambda r: r.layer)
    rows: list[list[np.ndarray]] = [[reference] for reference in references]
    for record in records:
        maps = record.placeholder_map.float().reshape(-1, 1, record.height, record.width)
        low = maps.amin(dim=(2, 3), keepdim=True)
        span = (maps.amax(dim=(2, 3), keepdim=True) - low).clamp(min=1e-12)
        maps = F.interpolate((maps - low) / span, size=(height, width), mode="bilinear", align_corners=False)
        masks = F.interpolate(record.mask.float().reshape(-1, 1, record.height, record.width), size=(height, width))
        for k, reference in enumerate(references):
            keep = masks[k, 0].cpu().numpy()[..., None]
            rows[k].append(hot_colormap(maps[k, 0].cpu().numpy()))
            rows[k].append((reference * (0.2 + 0.8 * keep)).round().astype(np.uint8))
    labels = ["reference"] + [f"L{r.layer} {kind}" for r in records for kind in ("map", "mask")]
    return _with_header(make_grid(rows), labels, width)


def _with_header(grid: np.ndarray, labels: Sequence[str], cell_width: int) -> np.ndarray:
    band = Image.new("RGB", (grid.shape[1], 14), "white")
    draw = ImageDraw.Draw(band)
    for c, label in enumerate(labels):
        draw.text((GRID_PADDING + c * (cell_width + GRID_PADDING) + 2, 1), label, fill="black")
    return np.concatenate([np.asarray(band), grid])


def attention_steps(num_steps: int) -> list[int]:
    return sorted({round(f * (num_steps - 1)) for f in ATTENTION_STEP_FRACTIONS})


def save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path)


# ------------------------------------------------------------------ sampling
def precision_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "full":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def generate(args: argparse.Namespace, job: Job, model: LatentDiffusion) -> None:
    """Sample every prompt ``n_iter`` times and write the PNGs, grids and attention pictures."""
    sampler = PLMSSampler(model) if args.plms else DDIMSampler(model)
    outdir = Path(args.outdir)
    sample_dir = outdir / "samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    attention_dir = outdir / "attention"
    if args.save_attention:
        attention_dir.mkdir(exist_ok=True)
    count = len(list(sample_dir.glob("*.png")))
    latent_shape = (model.channels, job.height // job.factor, job.width // job.factor)
    timesteps = make_ddim_timesteps(args.ddim_steps, model.num_timesteps)[::-1]
    record_steps = attention_steps(len(timesteps)) if args.save_attention else []
    generator = torch.Generator()
    progress = tqdm(total=len(job.prompts) * args.n_iter, desc="Sampling", unit="batch")
    with progress, torch.no_grad(), precision_context(args.precision, job.device):
        reference_latents = encode_references(model, to_tensor(job.references))
        for prompt, slug in zip(job.prompts, unique_slugs(job.prompts)):
            generator.manual_seed(args.seed)
            rows: list[list[np.ndarray | None]] = []
            for iteration in range(args.n_iter):
                decoded, intermediates = sample_prompt(
                    model,
                    sampler,
                    prompt,
                    reference_latents,
                    n_samples=args.n_samples,
                    latent_shape=latent_shape,
                    steps=args.ddim_steps,
                    scale=args.scale,
                    generator=generator,
                    eta=args.ddim_eta,
                    record_attention=record_steps if iteration == 0 else (),
                    verbose=True,
                )
                images = to_uint8(decoded)
                for image in images:
                    save_png(image, sample_dir / f"{count:05d}.png")
                    count += 1
                references = list(job.references) if iteration == 0 else [None] * len(job.references)
                rows.append([*references, *images])
                for step, records in intermediates["attention"].items():
                    path = attention_dir / f"{slug}-step{step:03d}-t{int(timesteps[step]):04d}.png"
                    save_png(attention_picture(records, job.references), path)
                progress.update()
            save_png(make_grid(rows), outdir / f"grid-{slug}.png")
            logger.info("%s: grid-%s.png", prompt, slug)
    logger.info("samples in %s", sample_dir)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        args = build_parser().parse_args(argv)
        job = prepare(args)
        model = build_vico_model(job.weights, job.config, args.base_ckpt, job.device)
    except (CheckpointError, ImageError, ValueError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    generate(args, job, model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
