"""Full-size check on one GPU with random weights: train and sample in fp32 and bf16.

Catches the device, dtype and memory problems a CPU never shows, and times them:

    python scripts/gpu_check.py --out results/        # needs a CUDA GPU, ~5 minutes

For each precision: a few training steps of configs/vico.yaml at batch 4 on the bundled
photos (with the image logger sampling inside training), then one guided 50-step DDIM
sample from the run's last.ckpt; finally scripts/benchmark.py at full size. Writes
``gpu_check.json`` with step times and peak memory.
"""
from __future__ import annotations

import argparse
import json
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
    """Wall time of every training step and the peak GPU memory of the run."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        synchronize()
        self.times.append(time.perf_counter() - self._start)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else 0.0


def train(config: str, logdir: Path, precision: str, steps: int, base: Path | None) -> dict:
    devices = ["--gpus", "0,"] if torch.cuda.is_available() else []
    argv = [
        "--base", config, "-t", *devices, "--logdir", str(logdir),
        "-n", f"gpu-{precision}", "--data_root", str(ROOT / "data" / "monster_toy"), "--init_word", "toy",
        "data.params.batch_size=4", f"lightning.trainer.max_steps={steps}", f"lightning.trainer.precision={precision}",
        f"lightning.callbacks.image_logger.params.batch_frequency={steps}",
        "lightning.callbacks.image_logger.params.ddim_steps=20", "lightning.trainer.enable_progress_bar=false",
        "lightning.trainer.log_every_n_steps=1",
    ]  # fmt: skip
    argv += ["--actual_resume", str(base)] if base else ["random_base=true"]
    opt, overrides = main.parse_args(argv)
    run = main.setup_run(opt, overrides)
    timer = StepTimer()
    run.trainer.callbacks.append(timer)
    main.train(run)
    losses = [line for csv in run.logdir.glob("metrics/*/metrics.csv") for line in csv.read_text().splitlines()]
    return {
        "logdir": str(run.logdir),
        "step_seconds": [round(t, 3) for t in timer.times],
        "peak_memory_gib": peak_memory_gib(),
        "metrics_csv_tail": losses[-2:],
        "checkpoint_mib": round((run.logdir / "checkpoints" / "last.ckpt").stat().st_size / 2**20, 1),
    }


def sample_once(checkpoint: Path, outdir: Path, precision: str) -> dict:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    code = sample.main([
        "--ckpt", str(checkpoint), "--ref", str(ROOT / "data" / "monster_toy" / "00.jpg"),
        "--prompt", "a photo of * on the beach", "--n_samples", "1", "--ddim_steps", "50", "--scale", "7.5",
        "--precision", precision, "--outdir", str(outdir),
    ])  # fmt: skip
    return {
        "exit_code": code,
        "seconds": round(time.perf_counter() - start, 2),
        "peak_memory_gib": peak_memory_gib(),
        "files": sorted(p.name for p in outdir.rglob("*.png")),
    }


def main_check() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/vico-gpu-check")
    parser.add_argument("--config", default=str(ROOT / "configs" / "vico.yaml"), help="the tiny config dry-runs on a CPU")
    args = parser.parse_args()
    out, work = Path(args.out), Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    on_gpu = torch.cuda.is_available()
    results: dict = {"device": torch.cuda.get_device_name(0) if on_gpu else "cpu", "torch": torch.__version__}
    base = None
    precisions = (("32", "full"), ("bf16-mixed", "autocast")) if on_gpu else (("32", "full"),)
    for precision, sample_precision in precisions:
        trained = train(args.config, work / "logs", precision, args.steps, base)
        base = Path(trained["logdir"]) / "random-base.safetensors" if base is None else base
        trained["sample"] = sample_once(Path(trained["logdir"]) / "checkpoints" / "last.ckpt", work / f"samples-{precision}", sample_precision)
        results[f"train_{precision}"] = trained
        print(json.dumps({precision: trained}, indent=1), flush=True)
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    bench = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--config", args.config,
         "--device", "cuda" if on_gpu else "cpu", "--precision", "bf16" if on_gpu else "fp32", "--repeats", "5"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    results["benchmark_bf16"] = bench.stdout[-3000:] + bench.stderr[-1500:]
    print(bench.stdout[-3000:], flush=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main_check()
