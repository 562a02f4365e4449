"""Export a trained ViCo run in the formats other code reads (:mod:`ldm.models.export`).

    python scripts/export.py --run logs/<run>                       # last.ckpt, into <run>/checkpoints/
    python scripts/export.py --run logs/<run> --step 300            # step 300: its step=000300.ckpt or exports
    python scripts/export.py --run logs/<run>/checkpoints/last.ckpt --formats diffusers --outdir shared/

``--run`` takes a run folder or any file ``sample.py --ckpt`` takes (a training checkpoint, an
adapter export, a file of the authors' pair). With ``--step N``, a run folder gives the full
checkpoint of that step (``step=00000N.ckpt``, kept with ``save_top_k=-1``) or, by default,
the exports its training wrote at that step (the authors' pair or ``adapter-N.safetensors``).
``--formats`` picks among those of :data:`ldm.models.export.EXPORT_FORMATS` the model has;
default: its method's (:func:`ldm.models.export.method_formats`: ViCo's authors' pair and S*
for Textual Inversion tools, Textual Inversion's S* files, DreamBooth's whole model, Custom
Diffusion's diffusers folder). ``N`` is ``--step``, else the checkpoint's ``global_step``, else
the step in an export's file name. Only ``dreambooth`` (the whole model) reads the Stable
Diffusion weights: the base the run recorded, or ``--base_ckpt``. The written files are listed
on stdout; predictable mistakes print one ``error:`` line and exit with status 2.

An export never writes over a file it reads: exporting one of the authors' pair as the pair
writes into ``exported/`` beside it, and an ``--outdir`` where it would is refused.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ldm.models.diffusion.latent import LatentDiffusionModel  # noqa: E402
from ldm.models.export import EXPORT_FORMATS, build_trained_only, export_trained, method_formats, run_name  # noqa: E402
from ldm.models.loading import (  # noqa: E402
    ViCoWeights,
    build_vico_model,
    missing_config_hint,
    read_vico_weights,
    resolve_config,
)
from ldm.util import CheckpointError  # noqa: E402
from sample import OneLineErrorParser, UsageError  # noqa: E402

_AUTHORS_NAME = re.compile(r"^(cross_attention|embeddings_gs)-(\d+)\.pt$")
#: Files of a run's checkpoints folder that hold everything trained at a step: the full
#: checkpoint (``save_top_k=-1``) and the exports that can be exported again.
_SAVED_STEP = re.compile(r"step=(\d+)\.ckpt|cross_attention-(\d+)\.pt|adapter-(\d+)\.safetensors")
_AUTHORS_SIBLING = {"cross_attention": "embeddings_gs", "embeddings_gs": "cross_attention"}
#: Where the exports go, beside the checkpoint, when its own folder would have them replace it.
DEFAULT_SUBFOLDER = "exported"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a run folder (logs/<run>) or a checkpoint file")
    parser.add_argument("--step", type=int, default=None, help="the training step to export (default: the last)")
    parser.add_argument(
        "--formats", nargs="+", choices=EXPORT_FORMATS, default=None, help="what to write (default: the method's)"
    )
    parser.add_argument(
        "--outdir", default=None,
        help=f"default: the checkpoint's folder, or {DEFAULT_SUBFOLDER}/ in it where the exports would replace the checkpoint",
    )  # fmt: skip
    parser.add_argument("--config", default=None, help="a config overriding the one stored with the weights")
    parser.add_argument(
        "--base_ckpt", default=None,
        help="the Stable Diffusion base, for --formats dreambooth only (default: the one the run recorded)",
    )  # fmt: skip
    parser.add_argument(
        "--name", default=None,
        help="the Textual Inversion file's name, its trigger word in AUTOMATIC1111 (default: the run's name)",
    )  # fmt: skip
    return parser


def find_checkpoint(run: Path, step: int | None) -> Path:
    """The file to export: ``run`` itself, or in a run folder the checkpoint of ``step`` (or
    ``last.ckpt``); without that checkpoint, a file of the step's exports that holds everything
    trained (the authors' pair, an adapter)."""
    if run.is_file():
        return run
    if not run.is_dir():
        raise UsageError(f"--run {run}: no such run folder or file")
    folder = run / "checkpoints"
    checkpoint = folder / ("last.ckpt" if step is None else f"step={step:06d}.ckpt")
    if checkpoint.is_file():
        return checkpoint
    for export in (folder / f"cross_attention-{step}.pt", folder / f"adapter-{step}.safetensors"):
        if step is not None and export.is_file():
            return export
    raise UsageError(
        f"{checkpoint} not found, nor an export of step {step} that holds all its trained weights "
        f"(steps saved there: {', '.join(map(str, saved_steps(folder))) or 'none'})"
    )


def saved_steps(folder: Path) -> list[int]:
    """The steps of ``folder`` that can be exported: full checkpoints, authors' pairs, adapters."""
    matches = (_SAVED_STEP.fullmatch(path.name) for path in folder.iterdir()) if folder.is_dir() else ()
    return sorted({int(next(group for group in match.groups() if group)) for match in matches if match})


def checkpoint_step(checkpoint: Path, weights: ViCoWeights, step: int | None) -> int:
    """``step`` if given, else what the file says (a training checkpoint's ``global_step``,
    an adapter's recorded step, the number in an export's name)."""
    if step is not None:
        return step
    if weights.step is not None:
        return weights.step
    raise UsageError(f"{checkpoint}: the training step is not recorded in it; pass --step")


def build_model(
    args: argparse.Namespace, weights: ViCoWeights, config: DictConfig
) -> tuple[LatentDiffusionModel, list[str]]:
    """The model to export and the formats to write (``--formats``, else the method's): the
    trained weights alone, or on the base weights when a format holds the whole model
    (DreamBooth's)."""
    model = build_trained_only(weights, config)
    formats = list(method_formats(model) if args.formats is None else args.formats)
    if "dreambooth" in formats:
        model = build_vico_model(weights, config, args.base_ckpt, hint=missing_config_hint(weights, args.config))
    return model, formats


def input_files(checkpoint: Path, config: str | None) -> set[Path]:
    """The files an export reads: the checkpoint, the other file of an authors' pair, the config."""
    inputs = {checkpoint}
    authors = _AUTHORS_NAME.match(checkpoint.name)
    if authors:
        inputs.add(checkpoint.with_name(f"{_AUTHORS_SIBLING[authors.group(1)]}-{authors.group(2)}.pt"))
    if config is not None:
        inputs.add(Path(config))
    return {path.resolve() for path in inputs}


def export(args: argparse.Namespace) -> list[Path]:
    """Write the exports without ever replacing a file they were made from.

    They are written into a hidden folder inside the output folder first, so their names are
    known before anything is replaced. Exporting an authors' file as the authors' pair into its
    own folder would write over it: by default the files then go to ``exported/`` beside it;
    with ``--outdir`` that is an error, and nothing is written.
    """
    checkpoint = find_checkpoint(Path(args.run), args.step)
    weights = read_vico_weights(checkpoint)
    config = resolve_config(weights, args.config)
    step = checkpoint_step(checkpoint, weights, args.step)
    model, formats = build_model(args, weights, config)
    name = args.name or run_name(weights.folder.parent)
    inputs = input_files(checkpoint, args.config)
    outdir = Path(args.outdir) if args.outdir else checkpoint.parent
    outdir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=outdir))
    try:
        written = export_trained(model, config, staging, step, formats, name)
        names = [path.relative_to(staging) for path in written]
        replaced = [name for name in names if (outdir.resolve() / name) in inputs]
        if replaced and args.outdir:
            raise UsageError(
                f"--outdir {args.outdir}: the export would write over its input {outdir / replaced[0]}; "
                f"choose another --outdir"
            )
        if replaced:
            outdir = outdir / DEFAULT_SUBFOLDER
        for name in names:
            (outdir / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, outdir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [outdir / name for name in names]


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        written = export(build_parser().parse_args(argv))
    except (CheckpointError, ValueError, OSError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
