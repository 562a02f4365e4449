"""Train ViCo: the CompVis ``main.py`` command line on PyTorch Lightning 2.x.

    python main.py --base configs/vico.yaml -t --gpus 0,1,2,3 \\
        --actual_resume models/ldm/stable-diffusion-v1/sd-v1-4.ckpt \\
        -n my_toy --data_root data/my_toy --init_word toy

Dotted config overrides (``data.params.batch_size=4``) may stand anywhere among the flags.
Each run writes ``logs/<time>_<name>/`` with the merged config (``configs/``), the resumable
state (``checkpoints/last.ckpt``), small exports of the trained weights at every save
(``checkpoints/cross_attention-N.pt`` and the other formats of ``ldm.models.export``, kept for
the last saves; the latest also as ``checkpoints/adapter.safetensors``), previews
(``images/``), TensorBoard logs (``tensorboard/``) and CSV metrics (``metrics/``). On one GPU,
``data.params.batch_size=4`` trains at the paper's batch; a line at start-up says the effective
batch and what trains at which rate.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import re
import shutil
import signal
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import yaml
from lightning_fabric.plugins import CheckpointIO
from pytorch_lightning.callbacks import LearningRateMonitor
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm.contrib.logging import logging_redirect_tqdm

from ldm.callbacks import (
    AtomicCheckpointIO,
    CheckpointWriteError,
    ImageLogger,
    NonFiniteTraining,
    StepProgressBar,
    StopOnNonFiniteLoss,
    ViCoCheckpoint,
)
from ldm.config_bounds import BoundsError, check_bounds
from ldm.cli import HelpFormatter
from ldm.config_schema import ConfigError, accepted_parameters, check_instantiable, check_keys, check_parameters
from ldm.data.images import ImageError
from ldm.modules.diffusionmodules.openaimodel import (
    DEFAULT_CHANNEL_MULT,
    DEFAULT_IMAGE_ATTENTION_LAYERS,
    UNetModel,
    attention_layer_count,
    check_attention_layers,
)
from ldm.modules.embedding_manager import single_token_id
from ldm.modules.encoders.modules import CLIPTokenizer
from ldm.trust import check_merged_targets, check_run_folder_layout, resume_values
from ldm.models.base_checkpoint import find_base_checkpoint, is_base_key
from ldm.util import (
    CheckpointError,
    check_stored_config,
    get_obj_from_str,
    instantiate_from_config,
    read_checkpoint,
    save_state_dict,
)

logger = logging.getLogger("main")

#: DDP starts the other ranks by re-running this script; they find the run folder here.
RUN_DIR_VARIABLE = "VICO_RUN_DIR"
DEFAULT_SEED = 23
#: The frozen weights of a ``random_base`` run, saved in its run folder.
RANDOM_BASE = "random-base.safetensors"
#: A command-line word that is a dotted config override, e.g. ``model.params.reg_weight=0``.
OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*(\.[\w-]+)*=")
#: Top-level keys of a run config.
CONFIG_KEYS = ("model", "data", "lightning", "random_base", "seed")
LIGHTNING_KEYS = ("trainer", "modelcheckpoint", "callbacks", "loggers")
#: Settings a resume may change and still continue the same run in place.
CONTINUATION_KEYS = (
    "lightning.trainer.max_steps",
    "lightning.trainer.enable_progress_bar",
    "lightning.trainer.log_every_n_steps",
    "lightning.callbacks.image_logger",
    "lightning.loggers",
)
#: Paths the config records for the data and the base, resolved against where they came from.
DATA_ROOT = "data.params.train.params.data_root"
BASE_CKPT = "model.params.ckpt_path"
PLACEHOLDERS = "model.params.personalization_config.params.placeholder_strings"
INIT_WORDS = "model.params.personalization_config.params.initializer_words"
DATA_PLACEHOLDER = "data.params.train.params.placeholder_token"


class UsageError(Exception):
    """A mistake in the command line or the config, reported as one line."""


class Interrupted(Exception):
    """Training stopped on Ctrl-C; the message says what was saved and how to continue."""


# ------------------------------------------------------------------ command line
class _Parser(argparse.ArgumentParser):
    """An argument parser whose mistakes are one-line :class:`UsageError`s."""

    def error(self, message: str) -> None:  # type: ignore[override]
        hint = " (overrides look like model.params.reg_weight=0)" if message.startswith("unrecognized") else ""
        raise UsageError(f"{message}{hint}; see --help")


def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got '{value}'")


def get_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        description=__doc__.split("\n\n")[0],
        epilog="Dotted overrides such as lightning.trainer.max_steps=300 may stand anywhere among the flags.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("-b", "--base", nargs="*", metavar="config.yaml", default=[],
                        help="configs merged left to right; dotted overrides win over them")
    parser.add_argument("-t", "--train", type=str2bool, nargs="?", const=True, default=False, help="train")
    parser.add_argument("--gpus", type=str, default=None, help="CUDA device ids, e.g. '0,1,2,3' or '0,' (default: CPU)")
    parser.add_argument("--num_processes", type=int, default=1, help="CPU processes (DDP over gloo) without --gpus")
    parser.add_argument("--num_nodes", type=int, default=1, help="machines")
    parser.add_argument("-n", "--name", type=str, default="",
                        help="run name: the run folder is <logdir>/<time>_<name> (default: the config's name)")
    parser.add_argument("--actual_resume", type=str, default=None, help="base Stable Diffusion checkpoint")
    parser.add_argument("--data_root", type=str, action="append", default=None,
                        help="folder of photos of the concept; repeat for several concepts (one placeholder each)")
    parser.add_argument("--init_word", type=str, action="append", default=None,
                        help="single-token word initialising S*; repeat in the order of --data_root")
    parser.add_argument("--placeholder_string", type=str, action="append", default=None,
                        help="the string standing for S* in captions and prompts (default: the config's, '*'); "
                             "repeat in the order of --data_root")
    parser.add_argument("-r", "--resume", type=str, default=None, help="a run folder or a checkpoint in it")
    parser.add_argument("-l", "--logdir", type=str, default="logs", help="where run folders are created")
    parser.add_argument("-s", "--seed", type=int, default=None,
                        help=f"seed of the data stream, initialisation, timesteps and noise "
                             f"(default: {DEFAULT_SEED}, or the resumed run's)")
    parser.add_argument("--scale_lr", type=str2bool, nargs="?", const=True, default=True,
                        help="S* learning rate x accumulate x devices x nodes x batch size (as the original)")
    original = parser.add_argument_group("the original's other flags")
    original.add_argument("-f", "--postfix", type=str, default="", help="appended to the run name, as the original")
    original.add_argument("--datadir_in_name", type=str2bool, nargs="?", const=True, default=False,
                          help="put the --data_root folder's name before the run name (the original's default is on)")
    original.add_argument("--no-test", type=str2bool, nargs="?", const=True, default=False,
                          help="accepted and ignored: there is no test stage")
    original.add_argument("-p", "--project", help=argparse.SUPPRESS)
    original.add_argument("-d", "--debug", type=str2bool, nargs="?", const=True, default=False, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The flags and the dotted overrides of a command line, wherever the overrides stand.

    Overrides are taken out first, so that ``-t key=val`` does not read ``key=val`` as the
    value of ``-t`` and ``--base a.yaml key=val`` does not read it as a config file.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [word for word in argv if OVERRIDE.match(word)]
    flags = [word for word in argv if not OVERRIDE.match(word)]
    return get_parser().parse_args(flags), overrides


def check_options(opt: argparse.Namespace) -> None:
    if opt.project is not None:
        raise UsageError(
            "-p/--project is not supported: runs go to <logdir>/<time>_<name>; use -l/--logdir and -n/--name"
        )
    if opt.debug:
        raise UsageError("-d/--debug (post-mortem debugging) is not supported; run python -m pdb main.py ... instead")
    if opt.num_processes < 1:
        raise UsageError(f"--num_processes must be at least 1, got {opt.num_processes}")
    if opt.num_nodes < 1:
        raise UsageError(f"--num_nodes must be at least 1, got {opt.num_nodes}")
    separators = {"/", "\\", os.sep, *([os.altsep] if os.altsep else [])}
    for flag, value in (("-n/--name", opt.name), ("-f/--postfix", opt.postfix)):
        if any(s in value for s in separators) or value in (".", ".."):
            raise UsageError(f"{flag} must be a plain name without path separators, got '{value}'")


def parse_devices(gpus: str | None, num_processes: int) -> tuple[str, list[int] | int]:
    """``--gpus 0,1`` -> ("gpu", [0, 1]); absent -> ("cpu", num_processes)."""
    if gpus is None or not gpus.strip(","):
        return "cpu", num_processes
    try:
        ids = [int(g) for g in gpus.split(",") if g.strip()]
    except ValueError:
        raise UsageError(f"--gpus expects ids like '0,1,2,3', got '{gpus}'") from None
    if not torch.cuda.is_available():
        raise UsageError(f"--gpus {gpus}: no CUDA device is available on this machine; leave out --gpus to train on the CPU")
    count = torch.cuda.device_count()
    unknown = [i for i in ids if not 0 <= i < count]
    if unknown:
        raise UsageError(f"--gpus {gpus}: no CUDA device {unknown[0]}; this machine has {count} (0-{count - 1})")
    return "gpu", ids


# ------------------------------------------------------------------ configs
@dataclass
class Resume:
    """Where ``-r`` points: the run folder, its checkpoint and its configs (checked, in order)."""

    run: Path
    checkpoint: Path
    configs: list[DictConfig]
    step: int = 0


def find_resume(resume: str) -> Resume:
    """The run folder, checkpoint and configs of ``-r``, which may name the folder or the checkpoint."""
    path = Path(resume)
    if path.is_file():
        run, checkpoint = path.parent.parent, path
    elif path.is_dir():
        run, checkpoint = path, path / "checkpoints" / "last.ckpt"
    else:
        raise UsageError(f"cannot resume: {path} not found")
    configs = sorted((run / "configs").glob("*.yaml"))
    if not configs:
        raise UsageError(f"cannot resume: {run} has no configs/*.yaml, so it is not a run folder written by main.py")
    if not checkpoint.is_file():
        raise UsageError(f"cannot resume: {checkpoint} not found")
    check_run_folder_layout(run)
    return Resume(run, checkpoint, [resume_values(read_stored_config(path, run), path) for path in configs])


def read_yaml(path: Path) -> DictConfig:
    try:
        config = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise UsageError(f"{path}:{where} not valid YAML ({problem})") from None
    except (OSError, OmegaConfBaseException) as err:
        raise UsageError(f"{path}: cannot read the config ({err})") from None
    if not isinstance(config, DictConfig):
        raise UsageError(f"{path}: a config must be a mapping with model, data and lightning sections")
    return config


def read_stored_config(path: Path, run: Path) -> DictConfig:
    """A run folder's config, checked (it may come from someone else).

    A relative base checkpoint path is relative to the run folder (a run's random base lives
    there), so a run folder can be moved.
    """
    config = read_yaml(path)
    check_stored_config(config, path)
    base = OmegaConf.select(config, BASE_CKPT)
    if base and not Path(base).is_absolute():
        OmegaConf.update(config, BASE_CKPT, str((run / base).resolve()))
    return config


def lightning_defaults() -> dict[str, Any]:
    """The defaults of the ``lightning`` section, merged under the config's (as CompVis does).

    Run-specific paths (``dirpath``, ``save_dir``, ``logdir``) are added when instantiating.
    A default callback or logger is switched off by setting it to null.
    """
    return {
        "trainer": {},
        "modelcheckpoint": {"target": "ldm.callbacks.ViCoCheckpoint", "params": {}},
        "loggers": {
            "tensorboard": {
                "target": "pytorch_lightning.loggers.TensorBoardLogger",
                "params": {"name": "tensorboard", "default_hp_metric": False},
            },
            "csv": {"target": "pytorch_lightning.loggers.CSVLogger", "params": {"name": "metrics"}},
        },
        "callbacks": {
            "learning_rate": {
                "target": "pytorch_lightning.callbacks.LearningRateMonitor",
                "params": {"logging_interval": "step"},
            },
            "step_time": {"target": "ldm.callbacks.StepTime"},
            "export": {"target": "ldm.callbacks.TrainedWeightsExport"},
        },
    }


def load_config(opt: argparse.Namespace, overrides: list[str], resume: Resume | None) -> DictConfig:
    """Merge the run's stored configs, ``--base`` and the overrides; apply the flags."""
    if not opt.base and resume is None:
        raise UsageError("give a config with --base (e.g. configs/vico.yaml) or a run to resume with -r")
    for bad in [b for b in opt.base if not Path(b).is_file()]:
        raise UsageError(f"config not found: {bad}")
    users_own = [read_yaml(Path(p)) for p in opt.base]
    try:
        dotlist = OmegaConf.from_dotlist(overrides)
        config = OmegaConf.merge(*(resume.configs if resume else []), *users_own, dotlist)
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise UsageError(f"cannot apply the overrides {overrides}: {str(err).splitlines()[0]}") from None
    if opt.actual_resume is not None:
        OmegaConf.update(config, BASE_CKPT, opt.actual_resume)
    # several --data_root (multi-object composition): lists, one placeholder and init word per folder
    if opt.init_word is not None:
        OmegaConf.update(config, INIT_WORDS, list(opt.init_word), merge=False)
    if opt.placeholder_string is not None:
        OmegaConf.update(config, PLACEHOLDERS, list(opt.placeholder_string), merge=False)
        OmegaConf.update(config, DATA_PLACEHOLDER, _one_or_list(opt.placeholder_string), merge=False)
    if opt.data_root is not None:
        OmegaConf.update(config, DATA_ROOT, _one_or_list(opt.data_root), merge=False)
    for key in (DATA_ROOT, BASE_CKPT):  # relative to where the command runs; recorded absolute
        value = OmegaConf.select(config, key)
        if isinstance(value, ListConfig):
            OmegaConf.update(config, key, [str(Path(v).resolve()) for v in value], merge=False)
        elif value:
            OmegaConf.update(config, key, str(Path(value).resolve()))
    seed = opt.seed if opt.seed is not None else config.get("seed", DEFAULT_SEED)
    config.seed = seed
    OmegaConf.update(config, "data.params.train.params.seed", seed)
    if resume is not None:  # a run folder's values, merged with the user's: check what would be built
        check_merged_targets(config, OmegaConf.merge(*users_own, dotlist))
    return config


def _one_or_list(values: list[str]) -> str | list[str]:
    """A repeated flag's values: the value itself when given once (the single-concept config)."""
    return values[0] if len(values) == 1 else list(values)


def check_config(config: DictConfig) -> None:
    """The start-up checks that must fail before anything slow happens."""
    try:
        plain = OmegaConf.to_container(config, resolve=True)
    except OmegaConfBaseException as err:
        raise UsageError(f"the config does not resolve: {str(err).splitlines()[0]}") from None
    check_schema(plain)
    data_root = OmegaConf.select(config, DATA_ROOT)
    if not data_root:
        raise UsageError("no training photos: pass --data_root <folder>")
    base = OmegaConf.select(config, BASE_CKPT)
    if base:
        find_base_checkpoint(base)
    elif not config.get("random_base", False):
        raise UsageError("no base model: pass --actual_resume <sd-v1-x.ckpt, .safetensors or diffusers folder>")
    max_steps = OmegaConf.select(config, "lightning.trainer.max_steps", default=None)
    if not isinstance(max_steps, int) or max_steps <= 0:
        raise UsageError(f"lightning.trainer.max_steps must be a positive number of steps, got {max_steps}")
    check_image_attention_layers(plain)
    check_placeholders(plain)
    check_prior_preservation(plain)


def check_prior_preservation(config: Mapping[str, Any]) -> None:
    """Prior preservation needs both its loss weight and its class images."""
    weight = _params(config["model"]).get("prior_loss_weight", 0.0)
    class_images = _params(config["data"]).get("class_images")
    if (class_images is None) != (weight == 0):
        found = "no data.params.class_images" if class_images is None else "data.params.class_images"
        raise UsageError(
            "prior preservation needs both model.params.prior_loss_weight > 0 and data.params.class_images; "
            f"this config has prior_loss_weight {weight} and {found}"
        )


def check_schema(config: Mapping[str, Any]) -> None:
    """Every key must be one the code reads and every value of the type it expects; sizes and
    learning rates within :mod:`ldm.config_bounds` (``batch_size: 0`` and a NaN learning rate
    are refused here, not after the run folder exists)."""
    check_keys(config, "", CONFIG_KEYS)
    for section in ("model", "data"):
        if section not in config:
            raise ConfigError(f"the config has no '{section}' section")
        check_instantiable(config[section], section, {"model": ["base_learning_rate"]})
    try:
        check_bounds(config)
    except BoundsError as err:
        raise ConfigError(str(err)) from None
    lightning = OmegaConf.to_container(OmegaConf.merge(lightning_defaults(), config.get("lightning") or {}))
    check_keys(lightning, "lightning", LIGHTNING_KEYS)
    check_parameters(lightning["trainer"] or {}, pl.Trainer, "lightning.trainer")
    logger_flag = (lightning["trainer"] or {}).get("logger", True)
    if not isinstance(logger_flag, bool):
        raise ConfigError("lightning.trainer.logger must be true or false; configure loggers under lightning.loggers")
    check_instantiable(lightning["modelcheckpoint"], "lightning.modelcheckpoint")
    for group in ("callbacks", "loggers"):
        for name, node in (lightning[group] or {}).items():
            if node is not None:
                check_instantiable(node, f"lightning.{group}.{name}")


def check_image_attention_layers(config: Mapping[str, Any]) -> None:
    """The UNet's ``image_attention_layers`` must exist in its layout (counted, not built)."""
    unet = _params(config["model"]).get("unet_config") or {}
    target = get_obj_from_str(unet["target"]) if "target" in unet else None
    params = _params(unet)
    if not (isinstance(target, type) and issubclass(target, UNetModel)):
        return
    if "num_res_blocks" not in params or "attention_resolutions" not in params:
        return  # the constructor names what is missing
    count = attention_layer_count(
        params["num_res_blocks"], params["attention_resolutions"], params.get("channel_mult", DEFAULT_CHANNEL_MULT)
    )
    try:
        check_attention_layers(params.get("image_attention_layers", DEFAULT_IMAGE_ATTENTION_LAYERS), count)
    except ValueError as err:
        raise UsageError(f"model.params.unet_config.params.{err}") from None


def check_placeholders(config: Mapping[str, Any]) -> None:
    """The dataset's captions, the model's S* and the preview prompts must use one placeholder."""
    tokenizer = CLIPTokenizer()
    personalization = _params(_params(config["model"]).get("personalization_config"))
    placeholders = list(personalization.get("placeholder_strings", ["*"]))
    for placeholder in placeholders:
        _single_token(tokenizer, placeholder, "placeholder string", "choose a string that is a single token")
    for word in personalization.get("initializer_words") or []:
        _single_token(tokenizer, word, "--init_word", "choose a word that is a single token")
    train = _params(_params(config["data"]).get("train"))
    data_placeholder = train.get("placeholder_token", "*")
    data_placeholders = [data_placeholder] if isinstance(data_placeholder, str) else list(data_placeholder)
    for name, values in (("placeholders", placeholders), ("captions' placeholders", data_placeholders)):
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise UsageError(f"the {name} {values} repeat '{repeated[0]}': each concept needs its own placeholder")
    roots = train.get("data_root")
    num_roots = len(roots) if isinstance(roots, list) else 1
    if num_roots != len(data_placeholders):
        raise UsageError(
            f"{num_roots} --data_root folders and {len(data_placeholders)} placeholder(s) ({DATA_PLACEHOLDER}): "
            f"give one --placeholder_string per folder, in the same order"
        )
    init_words = personalization.get("initializer_words") or []
    if len(init_words) > len(placeholders) or (len(placeholders) > 1 and len(init_words) not in (0, len(placeholders))):
        raise UsageError(
            f"{len(placeholders)} placeholders {placeholders} and {len(init_words)} --init_word {init_words}: "
            f"give one --init_word per placeholder, in the same order"
        )
    for data_placeholder in data_placeholders:
        if data_placeholder not in placeholders:
            raise UsageError(
                f"the captions' placeholder '{data_placeholder}' ({DATA_PLACEHOLDER}) is not the model's "
                f"{placeholders} ({PLACEHOLDERS}): S* would never be trained; set both with --placeholder_string"
            )
    lightning = OmegaConf.to_container(OmegaConf.merge(lightning_defaults(), config.get("lightning") or {}))
    for name, callback in (lightning["callbacks"] or {}).items():
        target = get_obj_from_str(callback["target"]) if callback is not None else None
        if not (isinstance(target, type) and issubclass(target, ImageLogger)):
            continue
        for prompt in _params(callback).get("prompts") or []:
            if not any(p in prompt for p in data_placeholders):
                raise UsageError(
                    f"lightning.callbacks.{name}.params.prompts: '{prompt}' does not contain the placeholder "
                    f"'{' or '.join(data_placeholders)}'"
                )


def _params(node: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return (node or {}).get("params") or {}


def _single_token(tokenizer: CLIPTokenizer, text: str, role: str, advice: str) -> None:
    try:
        single_token_id(tokenizer, text, role, advice)
    except ValueError as err:
        raise UsageError(str(err)) from None


def read_resume_checkpoint(path: Path) -> int:
    """Check with the safe reader that ``path`` is a resumable checkpoint; its step."""
    content = read_checkpoint(path)
    missing = [key for key in ("state_dict", "optimizer_states", "loops", "global_step") if key not in content]
    if missing:
        raise CheckpointError(
            f"{path}: not a resumable training checkpoint (no '{missing[0]}'); -r needs a run's last.ckpt"
        )
    if "config" in content:
        check_stored_config(content["config"], path)
    return int(content["global_step"])


# ------------------------------------------------------------------ run folders
def flatten(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, Mapping) and node:
        for key, value in node.items():
            yield from flatten(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, node


def changed_settings(before: DictConfig, after: DictConfig) -> list[str]:
    """Keys whose values differ, other than those a continuing run may change."""
    old = dict(flatten(OmegaConf.to_container(before, resolve=True)))
    new = dict(flatten(OmegaConf.to_container(after, resolve=True)))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return [k for k in changed if not any(k == c or k.startswith(c + ".") for c in CONTINUATION_KEYS)]


def branch_reason(resume: Resume, config: DictConfig) -> str | None:
    """Why resuming cannot continue in the run's own folder (None: it can)."""
    if resume.checkpoint.name != "last.ckpt":
        return f"{resume.checkpoint.name} is not the run's latest checkpoint"
    stored = OmegaConf.merge(*resume.configs)
    stored.seed = stored.get("seed", DEFAULT_SEED)
    changed = changed_settings(stored, config)
    if changed:
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        return f"the settings changed ({', '.join(changed[:3])}{more})"
    return None


def create_run_folder(parent: Path, stem: str) -> Path:
    """A new folder ``parent/stem`` (``stem-1``, ``stem-2``, ... if taken), created exclusively."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(1000):
            folder = parent / (stem if attempt == 0 else f"{stem}-{attempt}")
            try:
                folder.mkdir()
                return folder
            except FileExistsError:
                continue
    except OSError as err:
        raise UsageError(f"cannot create a run folder in {parent}: {err.strerror or err}") from None
    raise UsageError(f"cannot create a run folder in {parent}: {stem} and its 999 variants exist")


def run_name(opt: argparse.Namespace, resume: Resume | None) -> str:
    """``-n``, else the resumed run's or the first config's name; with the original's
    ``--postfix`` after it and ``--datadir_in_name``'s data folder before it."""
    if opt.name:
        name = opt.name
    elif resume is not None:
        name = resume.run.name.partition("_")[2] or resume.run.name
    else:
        name = Path(opt.base[0]).stem if opt.base else "run"
    if opt.datadir_in_name and opt.data_root:
        name = f"{Path(opt.data_root[0]).resolve().name}_{name}"
    return name + opt.postfix


def portable(config: DictConfig, logdir: Path) -> DictConfig:
    """The config as recorded in the run: paths inside the run folder relative to it."""
    config = config.copy()
    base = OmegaConf.select(config, BASE_CKPT)
    if base and Path(base).resolve().is_relative_to(logdir.resolve()):
        OmegaConf.update(config, BASE_CKPT, str(Path(base).resolve().relative_to(logdir.resolve())))
    return config


def config_path(logdir: Path, session: str) -> Path:
    return logdir / "configs" / f"{session}-project.yaml"


def write_config(config: DictConfig, logdir: Path, session: str) -> None:
    """The run's config, resolved (a stored config names its classes literally)."""
    path = config_path(logdir, session)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(portable(config, logdir), path, resolve=True)
    except OSError as err:
        raise UsageError(f"cannot write to the run folder {logdir}: {err.strerror or err}") from None


def remove_leftovers(logdir: Path) -> None:
    """Temporary files of writes that a ``kill -9`` cut short (``.last.ckpt.*.tmp``); the
    files they were replacing are whole (:func:`ldm.util.write_atomically`)."""
    for leftover in (logdir / "checkpoints").glob(".*.tmp"):
        if leftover.is_file() and not leftover.is_symlink():
            leftover.unlink(missing_ok=True)
            logger.info("removed %s, left by an interrupted write", leftover)


def copy_into(source: Path, folder: Path) -> Path:
    """``source`` in ``folder``: a hard link where possible, else a copy."""
    target = folder / source.name
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    return target


# ------------------------------------------------------------------ building
#: The paper's batch (4 GPUs x 1 in the authors' command).
PAPER_BATCH = 4


@dataclass(frozen=True)
class TrainingPlan:
    """What a run trains at which rate, from the config and the flags, before anything is built."""

    batch_size: int
    devices: int
    nodes: int
    accumulate: int
    base_lr: float
    scale_lr: bool
    model: Mapping[str, Any]

    @classmethod
    def of(cls, config: DictConfig, opt: argparse.Namespace, devices: list[int] | int) -> TrainingPlan:
        return cls(
            batch_size=int(config.data.params.batch_size),
            devices=len(devices) if isinstance(devices, list) else devices,
            nodes=opt.num_nodes,
            accumulate=int(OmegaConf.select(config, "lightning.trainer.accumulate_grad_batches", default=1) or 1),
            base_lr=float(config.model.base_learning_rate),
            scale_lr=opt.scale_lr,
            model=_params(OmegaConf.to_container(config.model, resolve=True)),
        )

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.devices * self.nodes * self.accumulate

    @property
    def learning_rate(self) -> float:
        """S*'s rate: the base rate x the effective batch under ``--scale_lr`` (the authors'
        5e-3 x 4 = 2e-2), else the base rate."""
        return self.base_lr * self.effective_batch if self.scale_lr else self.base_lr

    def rates(self) -> dict[str, float | None]:
        """The learning rate of each kind of weight (None: frozen), as the model's optimiser sets them."""
        model = self.model
        layers = _params(model.get("unet_config")).get("image_attention_layers", DEFAULT_IMAGE_ATTENTION_LAYERS)
        unet = model.get("unet_trainable", "none")
        text_encoder = bool(model.get("text_encoder_trainable", False))
        shared = self.learning_rate if model.get("unet_learning_rate") is None else float(model["unet_learning_rate"])
        return {
            "S*": self.learning_rate if model.get("placeholder_trainable", True) or text_encoder else None,
            "image attention": float(model.get("image_attention_learning_rate", 1e-5)) if layers else None,
            "the UNet" if unet == "all" else "the UNet's cross-attention k/v": shared if unet != "none" else None,
            "the text encoder": shared if text_encoder else None,
        }

    def summary(self) -> str:
        """One line: the effective batch and what trains at which rate."""
        batch = (
            f"effective batch {self.effective_batch} = {self.batch_size} (data.params.batch_size) x {self.devices} "
            f"(devices) x {self.nodes} (nodes) x {self.accumulate} (accumulate)"
        )
        rates = self.rates()
        trained = []
        for name, rate in rates.items():
            if rate is None:
                continue
            if name == "S*" and self.scale_lr:
                trained.append(f"S* at {rate:.2e} ({self.base_lr:.2e} x {self.effective_batch}, --scale_lr)")
            else:
                trained.append(f"{name} at {rate:.2e}")
        frozen = " (S* frozen)" if rates["S*"] is None else ""
        paper = ""
        if rates["image attention"] is not None and self.effective_batch < PAPER_BATCH:
            paper = f"; the paper trained at batch {PAPER_BATCH} (on one GPU: data.params.batch_size={PAPER_BATCH})"
        return f"{batch}; training {', '.join(trained)}{frozen}{paper}"


def _with_run_paths(node: Mapping[str, Any], logdir: Path, session: str, name: str, group: str) -> dict[str, Any]:
    """A ``target``/``params`` node with the run's paths added to params it does not set."""
    run_paths = {
        "loggers": {"save_dir": str(logdir), "version": session, "name": name},
        "modelcheckpoint": {"dirpath": str(logdir / "checkpoints")},
        "callbacks": {"logdir": str(logdir)},
    }[group]
    accepted, _ = accepted_parameters(get_obj_from_str(node["target"]))
    params = {key: value for key, value in run_paths.items() if key in accepted}
    return {"target": node["target"], "params": {**params, **(node.get("params") or {})}}


def build_loggers(lightning: DictConfig, logdir: Path, session: str, name: str) -> list[pl.loggers.Logger]:
    """The loggers of ``lightning.loggers``; a missing optional package is one line, now."""
    loggers = []
    for key, node in lightning.loggers.items():
        if node is None:
            continue
        try:
            loggers.append(instantiate_from_config(_with_run_paths(node, logdir, session, name, "loggers")))
        except ImportError as err:
            raise UsageError(
                f"lightning.loggers.{key} ({node.target}) cannot start: {str(err).splitlines()[0]} "
                f"(install it, or remove lightning.loggers.{key})"
            ) from None
    return loggers


def build_callbacks(
    lightning: DictConfig, logdir: Path, session: str, enable_progress_bar: bool, has_loggers: bool
) -> list[pl.Callback]:
    """The checkpoint callback and ``lightning.callbacks``; without a logger (``logger=false``,
    or every logger set to null) the learning-rate monitor, which writes only to loggers and
    refuses to start without one, is left out."""
    nodes = [("modelcheckpoint", lightning.modelcheckpoint)]
    nodes += [("callbacks", node) for node in lightning.callbacks.values() if node is not None]
    callbacks = [instantiate_from_config(_with_run_paths(node, logdir, session, "", group)) for group, node in nodes]
    if not has_loggers:
        callbacks = [callback for callback in callbacks if not isinstance(callback, LearningRateMonitor)]
    callbacks.append(StopOnNonFiniteLoss())
    return [*callbacks, StepProgressBar()] if enable_progress_bar else callbacks


def build_trainer(
    config: DictConfig, opt: argparse.Namespace, devices: tuple[str, list[int] | int], logdir: Path, session: str
) -> pl.Trainer:
    """The trainer: the run's defaults, then the config's ``lightning.trainer`` over them."""
    lightning = OmegaConf.merge(lightning_defaults(), config.get("lightning") or {})
    accelerator, device_list = devices
    n_processes = (len(device_list) if isinstance(device_list, list) else device_list) * opt.num_nodes
    params: dict[str, Any] = {
        "accelerator": accelerator,
        "devices": device_list,
        "num_nodes": opt.num_nodes,
        "strategy": "ddp" if n_processes > 1 else "auto",
        "use_distributed_sampler": False,
        "default_root_dir": str(logdir),
        "max_epochs": -1,
        # Its table's FLOPs column reads 0 (no example input); the start-up line says what trains.
        "enable_model_summary": False,
        **OmegaConf.to_container(lightning.trainer, resolve=True),
    }
    params["plugins"] = with_atomic_checkpoints(params.get("plugins"))
    if params.get("precision") is None:
        params["precision"] = default_precision(accelerator)
        logger.info("lightning.trainer.precision not set: training in %s", params["precision"])
    use_loggers = params.pop("logger", True)
    params["logger"] = build_loggers(lightning, logdir, session, logdir.name) if use_loggers else False
    progress_bar = params.get("enable_progress_bar", True) is not False
    params["callbacks"] = build_callbacks(lightning, logdir, session, progress_bar, bool(params["logger"]))
    return pl.Trainer(**params)


def with_atomic_checkpoints(plugins: Any) -> list[Any]:
    """The configured plugins with :class:`AtomicCheckpointIO` added: checkpoints are always
    written atomically and read with the safe reader, whatever ``lightning.trainer.plugins`` says."""
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    for plugin in plugins:
        if isinstance(plugin, CheckpointIO) and not isinstance(plugin, AtomicCheckpointIO):
            raise UsageError(f"lightning.trainer.plugins: {type(plugin).__name__} would replace the atomic checkpoint writer")
    if not any(isinstance(plugin, AtomicCheckpointIO) for plugin in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def default_precision(accelerator: str) -> str:
    """bf16-mixed on GPUs that compute in bf16 (autocast; the trained weights stay fp32), else 32."""
    if accelerator == "gpu" and torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16-mixed"
    return "32"


@torch.no_grad()
def fill_zero_initialised_weights(model: torch.nn.Module, std: float = 0.05) -> None:
    """Give a random base the non-zero output layers a trained SD has.

    SD's UNet zero-initialises its output convolutions; left at zero in a random stand-in,
    they would block every gradient to the image attention. They are chosen by key, among the
    base weights (:func:`ldm.models.base_checkpoint.is_base_key`), whether they train or not: a
    DreamBooth UNet trains its own, and the image attention's zero-initialised output is the
    method's (trained from zero, as in the authors' code).
    """
    for name, parameter in model.named_parameters():
        if is_base_key(name) and parameter.dim() > 1 and not parameter.any():
            parameter.normal_(0.0, std)


def build_model(config: DictConfig, logdir: Path, new_random_base: bool, is_rank_zero: bool) -> pl.LightningModule:
    """The model of the config; a new random base is drawn and saved in the run folder
    (atomically: a full disk is one line, exit status 1, and leaves no partial file)."""
    model_config = OmegaConf.to_container(config.model, resolve=True)
    if new_random_base:
        model_config["params"].pop("ckpt_path", None)
    model = instantiate_from_config(model_config)
    if new_random_base:
        fill_zero_initialised_weights(model)
        if is_rank_zero:
            try:
                save_state_dict(model.base_state_dict(), logdir / RANDOM_BASE)
            except OSError as err:
                raise CheckpointWriteError(f"cannot write {logdir / RANDOM_BASE}: {err.strerror or err}") from None
    return model


def warn_single_photo(data: pl.LightningDataModule, config: DictConfig) -> None:
    dataset = data.train_dataset
    roots = getattr(dataset, "data_roots", [OmegaConf.select(config, DATA_ROOT)])
    for concept, root in enumerate(roots):
        photos = dataset.concept_images(concept) if hasattr(dataset, "concept_images") else range(dataset.num_images)
        if len(photos) == 1:
            logger.warning(
                "only one training photo in %s: ViCo needs another photo of the object as the reference, "
                "so this photo is its own reference; add more photos to train the method as published",
                root,
            )


@dataclass
class Run:
    """Everything a training run needs, built and checked before the first step."""

    trainer: pl.Trainer
    model: pl.LightningModule
    data: pl.LightningDataModule
    config: DictConfig
    logdir: Path
    checkpoint: Path | None


def choose_run_folder(
    opt: argparse.Namespace, config: DictConfig, resume: Resume | None, session: str
) -> tuple[Path, bool]:
    """The run folder and whether this session created it.

    A resume continues in its own folder when it takes up the run's latest state with the
    same settings; otherwise it branches into a new folder beside it, so that the original
    run's checkpoints and exports are never overwritten by another line of training.
    """
    inherited = os.environ.get(RUN_DIR_VARIABLE)
    if inherited:
        return Path(inherited), False
    name = run_name(opt, resume)
    if resume is None:
        return create_run_folder(Path(opt.logdir), f"{session}_{name}"), True
    reason = branch_reason(resume, config)
    if reason is None:
        logger.info("resuming %s at step %d", resume.run, resume.step)
        return resume.run, False
    folder = create_run_folder(resume.run.parent, f"{session}_{name}")
    base = OmegaConf.select(config, BASE_CKPT)
    if base and Path(base).resolve().is_relative_to(resume.run.resolve()):
        OmegaConf.update(config, BASE_CKPT, str(copy_into(Path(base), folder)))
    logger.warning(
        "resuming %s from %s (step %d), but %s: training continues in the new run folder %s; %s stays as it was",
        resume.run, resume.checkpoint.name, resume.step, reason, folder, resume.run.name,
    )
    return folder, True


def setup_run(opt: argparse.Namespace, overrides: list[str]) -> Run:
    """Read the configs, check them, build data, model and trainer (no training yet)."""
    session = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    check_options(opt)
    devices = parse_devices(opt.gpus, opt.num_processes)
    resume = find_resume(opt.resume) if opt.resume else None
    config = load_config(opt, overrides, resume)
    check_config(config)
    plan = TrainingPlan.of(config, opt, devices[1])
    logger.info("%s", plan.summary())
    if resume is not None:
        resume.step = read_resume_checkpoint(resume.checkpoint)
    new_random_base = bool(config.get("random_base", False)) and not OmegaConf.select(config, BASE_CKPT)
    logdir, created = choose_run_folder(opt, config, resume, session)
    is_rank_zero = int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0
    if is_rank_zero and not created:
        remove_leftovers(logdir)
    try:
        if new_random_base:
            OmegaConf.update(config, BASE_CKPT, str(logdir / RANDOM_BASE))
        if is_rank_zero:
            write_config(config, logdir, session)
        trainer = build_trainer(config, opt, devices, logdir, session)
        pl.seed_everything(config.seed, workers=True)
        data = instantiate_from_config(config.data)
        warn_single_photo(data, config)
        model = build_model(config, logdir, new_random_base, is_rank_zero)
    except BaseException:
        if created:
            shutil.rmtree(logdir, ignore_errors=True)
        elif is_rank_zero:  # a failed in-place resume leaves the folder as it found it
            config_path(logdir, session).unlink(missing_ok=True)
        raise
    model.seed = config.seed
    model.learning_rate = plan.learning_rate
    model.run_config = OmegaConf.to_container(portable(config, logdir), resolve=True)
    return Run(trainer, model, data, config, logdir, resume.checkpoint if resume else None)


# ------------------------------------------------------------------ training
def checkpoint_callback(trainer: pl.Trainer) -> ViCoCheckpoint | None:
    return next((c for c in trainer.callbacks if isinstance(c, ViCoCheckpoint)), None)


def train(run: Run) -> None:
    """Fit; on Ctrl-C the state is saved and :class:`Interrupted` says where."""
    # The frozen SD modules are in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # ResumableSampler continues from the trainer's step, so mid-epoch resumes are exact.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    # A branched or moved run keeps no best-model paths of the old folder: there are none to keep.
    warnings.filterwarnings("ignore", message="The dirpath has changed from")
    # Lightning 2.6 on torch >= 2.10 (nothing to act on).
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    os.environ[RUN_DIR_VARIABLE] = str(run.logdir)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with logging_redirect_tqdm(loggers=console_loggers()):
            run.trainer.fit(run.model, datamodule=run.data, ckpt_path=run.checkpoint)
    except SystemExit:
        callback = checkpoint_callback(run.trainer)
        if callback is None or callback.interrupted_at is None:
            raise
        raise Interrupted(interruption_message(run, callback)) from None
    finally:
        os.environ.pop(RUN_DIR_VARIABLE, None)
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores Ctrl-C after the first
    logger.info("done: %s", run.logdir)


def interruption_message(run: Run, callback: ViCoCheckpoint) -> str:
    step = callback.interrupted_at
    if not step:
        return "interrupted before the first step; nothing was saved"
    return (
        f"interrupted at step {step}: saved {callback.last_path} and its export; "
        f"continue with: python main.py -t -r {run.logdir}"
    )


def console_loggers() -> list[logging.Logger]:
    """Loggers whose console output must not land inside progress bars."""
    return [logging.getLogger(), logging.getLogger("pytorch_lightning"), logging.getLogger("lightning_fabric")]


class DropAdvertising(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing [litlogger]/[litmodels]" lines, which it
    prints on every run and which say nothing about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(DropAdvertising())


def exception_context(err: BaseException) -> Iterator[BaseException]:
    """``err`` and the exceptions it was raised while handling. Lightning's failure handling
    writes the loggers' last lines; on a full disk that write fails too and hides the error
    that stopped the run (a checkpoint that could not be written), which is then reported."""
    while err is not None:
        yield err
        err = err.__context__


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    try:
        opt, overrides = parse_args(argv)
        if not opt.train:
            raise UsageError("nothing to do; pass -t to train (sampling is sample.py)")
        train(setup_run(opt, overrides))
    except (UsageError, ConfigError, ImageError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except CheckpointWriteError as err:
        print(f"error: {err}; the run stopped", file=sys.stderr)
        return 1
    except OSError as err:  # a full disk or a lost mount under a logger or a preview
        stopped_by = next((e for e in exception_context(err) if isinstance(e, CheckpointWriteError)), None)
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {stopped_by or where + (err.strerror or str(err))}; the run stopped", file=sys.stderr)
        return 1
    except NonFiniteTraining as err:
        print(f"error: {err}; the run stopped, and its last checkpoint is the last finite state "
              f"(lower the learning rate or use lightning.trainer.precision=32)", file=sys.stderr)
        return 1
    except Interrupted as err:
        logger.warning("%s", err)
        return 130
    except KeyboardInterrupt:
        logger.warning("interrupted before training started; nothing was saved")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
