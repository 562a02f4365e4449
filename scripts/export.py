"""Export a trained ViCo run in the formats other code reads (:mod:`ldm.models.export`).

    python scripts/export.py --run logs/<run>                       # last.ckpt, into <run>/checkpoints/
    python scripts/export.py --run logs/<run> --step 300            # checkpoints/step=000300.ckpt
    python scripts/export.py --run logs/<run>/checkpoints/last.ckpt --formats diffusers --outdir shared/

``--run`` takes a run folder or any file ``sample.py --ckpt`` takes (a training checkpoint, an
adapter export, a file of the authors' pair). ``--formats`` picks among ``authors`` (the
``cross_attention-N.pt`` / ``embeddings_gs-N.pt`` pair of the authors' ``vico_txt2img.py``),
``textual_inversion`` (S* as a ``string_to_param`` ``.pt``), ``diffusers`` (S* as
``learned_embeds-steps-N.safetensors``) and ``adapter`` (this project's ``.safetensors``);
default: the first three. ``N`` is ``--step``, else the checkpoint's ``global_step``, else the
step in an authors' file name. No Stable Diffusion weights are needed. The written files are
listed on stdout; predictable mistakes print one ``error:`` line and exit with status 2.

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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ldm.models.export import DEFAULT_FORMATS, EXPORT_FORMATS, build_trained_only, export_trained  # noqa: E402
from ldm.models.loading import read_vico_weights, resolve_config  # noqa: E402
from ldm.util import CheckpointError, read_checkpoint  # noqa: E402
from sample import OneLineErrorParser, UsageError  # noqa: E402

_AUTHORS_NAME = re.compile(r"^(cross_attention|embeddings_gs)-(\d+)\.pt$")
_AUTHORS_SIBLING = {"cross_attention": "embeddings_gs", "embeddings_gs": "cross_attention"}
#: Where the exports go, beside the checkpoint, when its own folder would have them replace it.
DEFAULT_SUBFOLDER = "exported"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a run folder (logs/<run>) or a checkpoint file")
    parser.add_argument("--step", type=int, default=None, help="the training step to export (default: the last)")
    parser.add_argument(
        "--formats", nargs="+", choices=EXPORT_FORMATS, default=list(DEFAULT_FORMATS), help="what to write"
    )
    parser.add_argument(
        "--outdir", default=None,
        help=f"default: the checkpoint's folder, or {DEFAULT_SUBFOLDER}/ in it where the exports would replace the checkpoint",
    )  # fmt: skip
    parser.add_argument("--config", default=None, help="a config overriding the one stored with the weights")
    return parser


def find_checkpoint(run: Path, step: int | None) -> Path:
    """The file to export: ``run`` itself, or in a run folder the checkpoint of ``step`` (or ``last.ckpt``)."""
    if run.is_file():
        return run
    if not run.is_dir():
        raise UsageError(f"--run {run}: no such run folder or file")
    folder = run / "checkpoints"
    checkpoint = folder / ("last.ckpt" if step is None else f"step={step:06d}.ckpt")
    if not checkpoint.is_file():
        steps = sorted(p.name for p in folder.glob("step=*.ckpt"))
        raise UsageError(f"{checkpoint} not found (checkpoints there: {', '.join(steps) or 'none'})")
    return checkpoint


def checkpoint_step(checkpoint: Path, step: int | None) -> int:
    """``step`` if given, else what the file says: a training checkpoint's ``global_step`` or
    the step in an authors' file name."""
    if step is not None:
        return step
    authors = _AUTHORS_NAME.match(checkpoint.name)
    if authors:
        return int(authors.group(2))
    if checkpoint.suffix == ".ckpt":
        global_step = read_checkpoint(checkpoint).get("global_step")
        if isinstance(global_step, int):
            return global_step
    raise UsageError(f"{checkpoint}: the training step is not recorded in it; pass --step")


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
    step = checkpoint_step(checkpoint, args.step)
    model = build_trained_only(weights, config)
    inputs = input_files(checkpoint, args.config)
    outdir = Path(args.outdir) if args.outdir else checkpoint.parent
    outdir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=outdir))
    try:
        names = [path.relative_to(staging) for path in export_trained(model, config, staging, step, args.formats)]
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
