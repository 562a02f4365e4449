"""Full-size check on one GPU with random weights: train and sample in fp32 and bf16.

Catches the device, dtype and memory problems a CPU never shows, and times them:

    python scripts/gpu_check.py --out results/        # needs a CUDA GPU, ~5 minutes

For each precision: a few training steps of configs/vico.yaml at batch 4 on the bundled
photos (with previews and checkpoints inside training), then one guided 50-step DDIM
sample from the run's last.ckpt; finally scripts/benchmark.py at full size (with the
compiled-UNet rows, ``--compile reduce-overhead``: CUDA graphs). Writes
``gpu_check.json`` with step times, the steady-state step time (median without the first
two steps and without the steps that write a preview or a checkpoint), the whole run's time
including start-up, and peak memory. Exits with status 1 (after writing everything) when a
logged loss is not finite, a sample fails, writes nothing or holds NaN, or the benchmark fails.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import main  # noqa: E402
import sample  # noqa: E402


class StepTimer(pl.Callback):
    """Wall time of every training step (``(global step, seconds)``) and the peak GPU memory.

    Put first among the callbacks, so that its end of step comes before the previews and
    checkpoints that other callbacks write at the end of a step.
    """

    def __init__(self) -> None:
        self.times: list[tuple[int, float]] = []
        self._start = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        synchronize()
        self.times.append((trainer.global_step, time.perf_counter() - self._start))


def steady_state(times: list[tuple[int, float]], every: list[int]) -> float | None:
    """Median step time without the first two steps and the steps (and the step after each)
    at which a preview or a checkpoint is written (multiples of ``every``)."""
    busy = {s + d for s, _ in times for n in every if n > 0 and s % n == 0 for d in (0, 1)}
    kept = [t for s, t in times[2:] if s not in busy]
    return round(statistics.median(kept), 4) if kept else None


def non_finite_losses(logdir: Path) -> list[str]:
    bad = []
    for path in logdir.glob("metrics/*/metrics.csv"):
        with path.open() as handle:
            for row in csv.DictReader(handle):
                value = row.get("train/loss")
                if value not in (None, "") and not math.isfinite(float(value)):
                    bad.append(f"step {row.get('step')}: train/loss {value}")
    return bad


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else 0.0


def train(config: str, logdir: Path, precision: str, steps: int, base: Path | None, preview_every: int, save_every: int) -> dict:
    devices = ["--gpus", "0,"] if torch.cuda.is_available() else []
    argv = [
        "--base", config, "-t", *devices, "--logdir", str(logdir),
        "-n", f"gpu-{precision}", "--data_root", str(ROOT / "data" / "monster_toy"), "--init_word", "toy",
        "data.params.batch_size=4", f"lightning.trainer.max_steps={steps}", f"lightning.trainer.precision={precision}",
        f"lightning.callbacks.image_logger.params.batch_frequency={preview_every}",
        f"lightning.modelcheckpoint.params.every_n_train_steps={save_every}",
        "lightning.trainer.enable_progress_bar=false",
    ]  # fmt: skip
    argv += ["--actual_resume", str(base)] if base else ["random_base=true"]
    start = time.perf_counter()
    opt, overrides = main.parse_args(argv)
    run = main.setup_run(opt, overrides)
    timer = StepTimer()
    run.trainer.callbacks.insert(0, timer)
    main.train(run)
    synchronize()
    seconds = time.perf_counter() - start
    losses = [line for path in run.logdir.glob("metrics/*/metrics.csv") for line in path.read_text().splitlines()]
    return {
        "logdir": str(run.logdir),
        "run_seconds_including_startup": round(seconds, 2),
        "steady_state_step_seconds": steady_state(timer.times, [preview_every, save_every]),
        "first_step_seconds": round(timer.times[0][1], 3) if timer.times else None,
        "step_seconds": [round(t, 3) for _, t in timer.times],
        "peak_memory_gib": peak_memory_gib(),
        "metrics_csv_tail": losses[-2:],
        "non_finite_losses": non_finite_losses(run.logdir),
        "checkpoint_mib": round((run.logdir / "checkpoints" / "last.ckpt").stat().st_size / 2**20, 1),
    }


def sample_once(checkpoint: Path, outdir: Path, precision: str) -> dict:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    warnings = _Warnings()
    logging.getLogger().addHandler(warnings)
    start = time.perf_counter()
    code = sample.main([
        "--ckpt", str(checkpoint), "--ref", str(ROOT / "data" / "monster_toy" / "00.jpg"),
        "--prompt", "a photo of * on the beach", "--n_samples", "1", "--ddim_steps", "50", "--scale", "7.5",
        "--precision", precision, "--outdir", str(outdir),
    ])  # fmt: skip
    logging.getLogger().removeHandler(warnings)
    return {
        "exit_code": code,
        "nan_warnings": [m for m in warnings.messages if "NaN" in m],
        "seconds": round(time.perf_counter() - start, 2),
        "peak_memory_gib": peak_memory_gib(),
        "files": sorted(p.name for p in outdir.rglob("*.png")),
    }


def main_check() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--preview_every", type=int, default=5, help="image-logger previews every N steps (excluded from the steady state)")
    parser.add_argument("--save_every", type=int, default=6, help="checkpoints every N steps (excluded from the steady state)")
    parser.add_argument("--workdir", default="/tmp/vico-gpu-check")
    parser.add_argument("--config", default=str(ROOT / "configs" / "vico.yaml"), help="the tiny config dry-runs on a CPU")
    args = parser.parse_args()
    out, work = Path(args.out), Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    on_gpu = torch.cuda.is_available()
    results: dict = {"device": torch.cuda.get_device_name(0) if on_gpu else "cpu", "torch": torch.__version__}
    base = None
    failures: list[str] = []
    precisions = (("32", "full"), ("bf16-mixed", "autocast")) if on_gpu else (("32", "full"),)
    for precision, sample_precision in precisions:
        trained = train(args.config, work / "logs", precision, args.steps, base, args.preview_every, args.save_every)
        base = Path(trained["logdir"]) / "random-base.safetensors" if base is None else base
        trained["sample"] = sample_once(Path(trained["logdir"]) / "checkpoints" / "last.ckpt", work / f"samples-{precision}", sample_precision)
        results[f"train_{precision}"] = trained
        failures += [f"{precision}: {bad}" for bad in trained["non_finite_losses"]]
        if trained["sample"]["exit_code"] != 0 or not trained["sample"]["files"]:
            failures.append(f"{precision}: sample.py failed (exit {trained['sample']['exit_code']}, files {trained['sample']['files']})")
        failures += [f"{precision}: {m}" for m in trained["sample"]["nan_warnings"]]
        print(json.dumps({precision: trained}, indent=1), flush=True)
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    bench = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--config", args.config,
         "--device", "cuda" if on_gpu else "cpu", "--precision", "bf16" if on_gpu else "fp32", "--repeats", "5",
         "--compile", "reduce-overhead" if on_gpu else "capture-only", "--out", str(out / "benchmark.json")],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    results["benchmark_bf16"] = bench.stdout[-6000:] + bench.stderr[-1500:]
    print(bench.stdout[-6000:], flush=True)
    if bench.returncode:
        failures.append(f"benchmark.py failed (exit {bench.returncode})")
    results["failures"] = failures
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    if failures:
        print("FAILED:\n" + "\n".join(failures), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main_check()
