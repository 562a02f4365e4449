"""Train ViCo: the CompVis ``main.py`` command line on PyTorch Lightning 2.x.

    python main.py --base configs/vico.yaml -t --gpus 0,1,2,3 \\
        --actual_resume models/ldm/stable-diffusion-v1/sd-v1-4.ckpt \\
        -n my_toy --data_root data/my_toy --init_word toy

Each run writes ``logs/<time>_<name>/`` with the merged config (``configs/``), checkpoints
holding only the trained weights (``checkpoints/``, every N steps and ``last.ckpt``), an
adapter export for sharing (``checkpoints/adapter.safetensors``), image logs (``images/``)
and metrics (``metrics/<time>/metrics.csv``, one file per session).
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from ldm.data.images import ImageError
from ldm.models.loading import save_adapter
from ldm.modules.embedding_manager import single_token_id
from ldm.modules.encoders.modules import CLIPTokenizer
from ldm.util import CheckpointError, check_stored_config, instantiate_from_config, save_state_dict

logger = logging.getLogger("main")

RUN_TIME_VARIABLE = "VICO_RUN_TIME"


class UsageError(Exception):
    """A mistake in the command line or the config, reported as one line."""


def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got '{value}'")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-b", "--base", nargs="*", metavar="config.yaml", default=[],
                        help="configs merged left to right; dotted overrides after all flags win")
    parser.add_argument("-t", "--train", type=str2bool, nargs="?", const=True, default=False, help="train")
    parser.add_argument("--gpus", type=str, default=None, help="GPU ids, e.g. '0,1,2,3' or '0,'; absent = CPU")
    parser.add_argument("--num_processes", type=int, default=1, help="CPU processes (DDP over gloo) without --gpus")
    parser.add_argument("--num_nodes", type=int, default=1)
    parser.add_argument("-n", "--name", type=str, default="", help="run name (logs/<time>_<name>)")
    parser.add_argument("--actual_resume", type=str, default=None, help="base Stable Diffusion checkpoint")
    parser.add_argument("--data_root", type=str, default=None, help="folder of photos of the concept")
    parser.add_argument("--init_word", type=str, default=None, help="single-token word initialising S*")
    parser.add_argument("-r", "--resume", type=str, default=None, help="a run folder or a checkpoint in it")
    parser.add_argument("-l", "--logdir", type=str, default="logs")
    parser.add_argument("-s", "--seed", type=int, default=23)
    parser.add_argument("--scale_lr", type=str2bool, nargs="?", const=True, default=True,
                        help="S* learning rate x accumulate x devices x nodes x batch size (as the original)")
    return parser


def parse_devices(gpus: str | None, num_processes: int) -> tuple[str, list[int] | int]:
    """``--gpus 0,1`` -> ("gpu", [0, 1]); absent -> ("cpu", num_processes)."""
    if gpus is None or not gpus.strip(","):
        return "cpu", num_processes
    try:
        return "gpu", [int(g) for g in gpus.split(",") if g.strip()]
    except ValueError:
        raise UsageError(f"--gpus expects ids like '0,1,2,3', got '{gpus}'") from None


def resolve_resume(resume: str) -> tuple[Path, Path]:
    """Run folder and checkpoint of ``-r``, which may name either."""
    path = Path(resume)
    if path.is_file():
        return path.parent.parent, path
    checkpoint = path / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        raise UsageError(f"cannot resume: {checkpoint} not found")
    return path, checkpoint


def load_config(opt: argparse.Namespace, overrides: list[str], resumed_configs: list[Path]) -> DictConfig:
    if not opt.base and not resumed_configs:
        raise UsageError("give a config with --base (e.g. configs/vico.yaml) or a run to resume with -r")
    for bad in [b for b in opt.base if not Path(b).is_file()]:
        raise UsageError(f"config not found: {bad}")
    bad_overrides = [o for o in overrides if "=" not in o]
    if bad_overrides:
        raise UsageError(f"unknown argument '{bad_overrides[0]}' (overrides look like model.params.reg_weight=0)")
    configs = [OmegaConf.load(p) for p in [*resumed_configs, *opt.base]]
    for path, stored in zip(resumed_configs, configs):
        check_stored_config(stored, path)  # a run folder may come from someone else
    config = OmegaConf.merge(*configs, OmegaConf.from_dotlist(overrides))
    params = config.model.params
    if opt.actual_resume is not None:
        params.ckpt_path = str(Path(opt.actual_resume).resolve())
    if opt.init_word is not None:
        params.personalization_config.params.initializer_words = [opt.init_word]
    if opt.data_root is not None:
        config.data.params.train.params.data_root = opt.data_root
    return config


def check_config(config: DictConfig) -> None:
    """The start-up checks that must fail before anything slow happens."""
    data_root = OmegaConf.select(config, "data.params.train.params.data_root")
    if not data_root:
        raise UsageError("no training photos: pass --data_root <folder>")
    base = OmegaConf.select(config, "model.params.ckpt_path")
    if base:
        if not Path(base).is_file():
            raise CheckpointError(f"base checkpoint not found: {base}")
    elif not config.get("random_base", False):
        raise UsageError("no base model: pass --actual_resume <sd-v1-x.ckpt or .safetensors>")
    max_steps = OmegaConf.select(config, "lightning.trainer.max_steps", default=None)
    if not isinstance(max_steps, int) or max_steps <= 0:
        raise UsageError(f"lightning.trainer.max_steps must be a positive number of steps, got {max_steps}")
    tokenizer = CLIPTokenizer()
    words = OmegaConf.select(config, "model.params.personalization_config.params.initializer_words") or []
    for word in words:
        try:
            single_token_id(tokenizer, word, "--init_word", "choose a word that is a single token")
        except ValueError as err:
            raise UsageError(str(err)) from None


def learning_rate(config: DictConfig, opt: argparse.Namespace, devices: list[int] | int) -> float:
    base_lr = config.model.base_learning_rate
    if not opt.scale_lr:
        return base_lr
    n_devices = len(devices) if isinstance(devices, list) else devices
    accumulate = OmegaConf.select(config, "lightning.trainer.accumulate_grad_batches", default=1)
    batch_size = config.data.params.batch_size
    lr = accumulate * n_devices * opt.num_nodes * batch_size * base_lr
    logger.info(
        "learning rate of S*: %.2e = %d (accumulate) x %d (devices) x %d (nodes) x %d (batch) x %.2e (base)",
        lr, accumulate, n_devices, opt.num_nodes, batch_size, base_lr,
    )
    return lr


def build_callbacks(config: DictConfig, logdir: Path) -> list[pl.Callback]:
    lightning = config.get("lightning", {})
    checkpoint_params = {"every_n_train_steps": 50, **lightning.get("modelcheckpoint", {}).get("params", {})}
    callbacks: list[pl.Callback] = [
        ModelCheckpoint(
            dirpath=logdir / "checkpoints",
            filename="step={step:06d}",
            auto_insert_metric_name=False,
            save_top_k=-1,
            save_last=True,
            **checkpoint_params,
        )
    ]
    for name, callback_config in lightning.get("callbacks", {}).items():
        params = dict(callback_config.get("params") or {})
        if callback_config["target"].startswith("ldm.callbacks."):
            params["logdir"] = str(logdir)
        logger.info("callback %s: %s", name, callback_config["target"])
        callbacks.append(instantiate_from_config({"target": callback_config["target"], "params": params}))
    return callbacks


@torch.no_grad()
def fill_zero_initialised_weights(model: torch.nn.Module, std: float = 0.05) -> None:
    """Give a random base the non-zero output layers a trained SD has.

    SD's UNet zero-initialises its output convolutions; left at zero in a random stand-in,
    they would block every gradient to the image attention.
    """
    for parameter in model.parameters():
        if not parameter.requires_grad and parameter.dim() > 1 and not parameter.any():
            parameter.normal_(0.0, std)


@dataclass
class Run:
    """Everything a training run needs, built and checked before the first step."""

    trainer: pl.Trainer
    model: pl.LightningModule
    data: pl.LightningDataModule
    config: DictConfig
    logdir: Path
    checkpoint: Path | None
    started: str


def setup_run(opt: argparse.Namespace, overrides: list[str]) -> Run:
    """Read the configs, check them, build data, model and trainer (no training yet)."""
    # DDP starts the other ranks by re-running this script; they find the run folder through this variable.
    now = os.environ.get(RUN_TIME_VARIABLE) or datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    resumed_configs: list[Path] = []
    checkpoint = None
    if opt.resume:
        logdir, checkpoint = resolve_resume(opt.resume)
        resumed_configs = sorted((logdir / "configs").glob("*.yaml"))
    else:
        name = opt.name or (Path(opt.base[0]).stem if opt.base else "run")
        logdir = Path(opt.logdir) / f"{now}_{name}"

    config = load_config(opt, overrides, resumed_configs)
    check_config(config)
    accelerator, devices = parse_devices(opt.gpus, opt.num_processes)
    pl.seed_everything(opt.seed, workers=True)

    data = instantiate_from_config(config.data)
    model_config = config.model
    model = instantiate_from_config(model_config)
    model.seed = opt.seed
    model.learning_rate = learning_rate(config, opt, devices)

    is_rank_zero = int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0
    if not model_config.params.get("ckpt_path"):
        fill_zero_initialised_weights(model)
        base = (logdir / "random-base.safetensors").resolve()
        if is_rank_zero:
            base.parent.mkdir(parents=True, exist_ok=True)
            save_state_dict(model.base_state_dict(), base)
        model_config.params.ckpt_path = str(base)
    model.run_config = OmegaConf.to_container(config, resolve=True)
    if is_rank_zero:
        (logdir / "configs").mkdir(parents=True, exist_ok=True)
        OmegaConf.save(config, logdir / "configs" / f"{now}-project.yaml")

    trainer_params: dict[str, Any] = {"max_epochs": -1, **config.get("lightning", {}).get("trainer", {})}
    n_processes = (len(devices) if isinstance(devices, list) else devices) * opt.num_nodes
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=opt.num_nodes,
        strategy="ddp" if n_processes > 1 else "auto",
        use_distributed_sampler=False,
        default_root_dir=logdir,
        logger=CSVLogger(save_dir=logdir, name="metrics", version=now),
        callbacks=build_callbacks(config, logdir),
        **trainer_params,
    )
    return Run(trainer, model, data, config, logdir, checkpoint, now)


def train(run: Run) -> None:
    # The frozen SD modules are in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # ResumableSampler continues from the trainer's step, so mid-epoch resumes are exact.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    os.environ[RUN_TIME_VARIABLE] = run.started
    try:
        run.trainer.fit(run.model, datamodule=run.data, ckpt_path=run.checkpoint)
    finally:
        os.environ.pop(RUN_TIME_VARIABLE, None)
    if run.trainer.is_global_zero:
        save_adapter(run.model, run.config, run.logdir / "checkpoints" / "adapter.safetensors")
        logger.info("done: %s", run.logdir)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    opt, overrides = get_parser().parse_known_args(argv)
    if not opt.train:
        print("error: nothing to do; pass -t to train (sampling is sample.py)", file=sys.stderr)
        return 2
    try:
        train(setup_run(opt, overrides))
    except (UsageError, ImageError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
