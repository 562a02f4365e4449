"""What a run folder someone else wrote may decide when it is resumed (``main.py -t -r``).

A YAML passed with ``--base`` is code, as in CompVis. A run folder is data: its
``configs/*.yaml`` and ``checkpoints/last.ckpt`` may come from anyone. The rules, enforced here
and in :class:`ldm.callbacks.ViCoCheckpoint` (checkpoint state), in one place each:

* **Values take effect, wiring does not.** From a stored config the ``model``, ``data``,
  ``seed`` and ``random_base`` sections are kept (they are what the run *is*), plus the
  training values of ``lightning`` listed below (step count, precision, save interval,
  preview settings). Everything else under ``lightning`` is dropped: paths (``dirpath``,
  ``filename``, ``logdir``, ``save_dir``), plugins, strategies, loggers (W&B included) and
  any callback that is not one of the project's. Those come from the project's defaults and
  the user's command line, never from the folder.
* **Targets are literal and allow-listed.** Every ``target`` a stored file names is a plain
  string, never an interpolation, and a class of the ``ldm`` package
  (:func:`ldm.util.check_stored_config`). After the stored configs, the user's ``--base``
  files and overrides are merged and the flags applied, every ``target`` of the result is
  checked again: it must be allow-listed or be what the user's own files resolve it to, so a
  value one stored file plants cannot become another file's target.
* **Writes stay inside the folder.** The folder's ``configs``, ``checkpoints`` and log
  folders must not lead outside it (symbolic links are refused), and the checkpoint
  callback's stored paths are re-rooted in the run's own checkpoint folder.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.util import UntrustedConfigError, is_trusted_target

logger = logging.getLogger(__name__)

#: Top-level sections of a stored config that take effect on resume as they are.
VALUE_SECTIONS = ("model", "data", "seed", "random_base")
#: ``lightning.trainer`` settings that are values of the training, not wiring.
TRAINER_VALUES = frozenset(
    {
        "max_steps",
        "precision",
        "accumulate_grad_batches",
        "gradient_clip_val",
        "gradient_clip_algorithm",
        "log_every_n_steps",
        "enable_progress_bar",
        "benchmark",
        "deterministic",
    }
)
#: ``lightning.modelcheckpoint.params`` a stored config may set (no paths, no file names).
CHECKPOINT_VALUES = frozenset({"every_n_train_steps", "save_top_k", "save_last"})
#: The project's callbacks a stored config may switch on and tune; their paths are the run's.
PROJECT_CALLBACKS = frozenset({"ldm.callbacks.ImageLogger", "ldm.callbacks.TrainedWeightsExport", "ldm.callbacks.StepTime"})
#: Callback parameters that are paths: never taken from a stored config.
PATH_PARAMETERS = frozenset({"logdir", "dirpath", "filename", "save_dir"})
#: Values of the model and data sections that name a folder the run *writes* into, with the
#: target that writes there: dropped from a stored config (the run's own folder is used).
WRITTEN_VALUE_PATHS = {"data.params.class_images.params.folder": "ldm.data.class_images.GeneratedClassImages"}
#: Sub-folders main.py writes into; none may lead outside the run folder.
WRITTEN_FOLDERS = ("configs", "checkpoints", "images", "tensorboard", "metrics")


def resume_values(config: DictConfig, source: str | Path) -> DictConfig:
    """The part of a stored run config that may take effect on resume (see the module doc).

    What is dropped is logged in one line, so a user who resumes their own run with a custom
    logger knows to pass it again.
    """
    values = OmegaConf.create({key: config[key] for key in VALUE_SECTIONS if key in config})
    dropped = [str(key) for key in config if key not in (*VALUE_SECTIONS, "lightning")]
    dropped += _drop_written_paths(values)
    lightning = config.get("lightning")
    if isinstance(lightning, DictConfig):
        kept, dropped_lightning = _lightning_values(lightning)
        dropped += dropped_lightning
        if kept:
            values.lightning = kept
    elif lightning is not None:
        dropped.append("lightning")
    if dropped:
        logger.info(
            "%s: not taken from a stored config on resume (paths, loggers, plugins and other wiring come from "
            "the project's defaults and your command line): %s",
            source, ", ".join(dropped),
        )
    return values


def _drop_written_paths(values: DictConfig) -> list[str]:
    """Remove :data:`WRITTEN_VALUE_PATHS` whose node is built by the class that writes there."""
    dropped = []
    for key, writer in WRITTEN_VALUE_PATHS.items():
        parent, _, name = key.rpartition(".")
        node = OmegaConf.select(values, parent)
        if isinstance(node, DictConfig) and name in node and OmegaConf.select(values, parent.rpartition(".")[0] + ".target") == writer:
            del node[name]
            dropped.append(key)
    return dropped


def _lightning_values(lightning: DictConfig) -> tuple[dict[str, Any], list[str]]:
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    for section in lightning:
        node = lightning[section]
        if section == "trainer" and isinstance(node, DictConfig):
            values = {k: node[k] for k in node if k in TRAINER_VALUES}
            dropped += [f"lightning.trainer.{k}" for k in node if k not in TRAINER_VALUES]
            if values:
                kept["trainer"] = values
        elif section == "modelcheckpoint" and isinstance(node, DictConfig):
            params = node.get("params") or {}
            values = {k: params[k] for k in params if k in CHECKPOINT_VALUES}
            dropped += [f"lightning.modelcheckpoint.{k}" for k in node if k != "params"]
            dropped += [f"lightning.modelcheckpoint.params.{k}" for k in params if k not in CHECKPOINT_VALUES]
            if values:
                kept["modelcheckpoint"] = {"params": values}
        elif section == "callbacks" and isinstance(node, DictConfig):
            callbacks: dict[str, Any] = {}
            for name in node:
                callback = node[name]
                if callback is None:  # switching a default off takes nothing from the folder
                    callbacks[name] = None
                elif isinstance(callback, DictConfig) and _literal_target(callback) in PROJECT_CALLBACKS:
                    params = callback.get("params") or {}
                    callbacks[name] = {
                        "target": callback.target,
                        "params": {k: params[k] for k in params if k not in PATH_PARAMETERS},
                    }
                    dropped += [f"lightning.callbacks.{name}.params.{k}" for k in params if k in PATH_PARAMETERS]
                else:
                    dropped.append(f"lightning.callbacks.{name}")
            if callbacks:
                kept["callbacks"] = callbacks
        elif section == "loggers" and isinstance(node, DictConfig):
            switched_off = {name: None for name in node if node[name] is None}
            dropped += [f"lightning.loggers.{name}" for name in node if node[name] is not None]
            if switched_off:
                kept["loggers"] = switched_off
        else:
            dropped.append(f"lightning.{section}")
    return kept, dropped


def _literal_target(node: DictConfig) -> str | None:
    if "target" not in node or OmegaConf.is_interpolation(node, "target"):
        return None
    target = node.target
    return target if isinstance(target, str) else None


def targets(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted path, target)`` of every node with a ``target`` in a plain config."""
    if isinstance(node, Mapping):
        if "target" in node:
            yield path, node["target"]
        for key, value in node.items():
            yield from targets(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            yield from targets(value, f"{path}.{index}" if path else str(index))


def check_merged_targets(merged: DictConfig, users_own: DictConfig) -> None:
    """Refuse a ``target`` of the merged config that neither the allow-list nor the user set.

    ``users_own`` is the merge of the user's ``--base`` files and overrides alone. A target
    there is the user's code; any other target of ``merged`` is data from the run folder and
    must pass :func:`ldm.util.is_trusted_target` after the merge, however it was assembled.

    Raises:
        UntrustedConfigError: one line naming the key and the refused target.
    """
    try:
        resolved = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as err:
        raise UntrustedConfigError(f"the resumed run's merged config does not resolve ({type(err).__name__})") from None
    own = dict(targets(_resolved_or_none(users_own)))
    for path, target in targets(resolved):
        if is_trusted_target(target) or (path in own and own[path] == target):
            continue
        raise UntrustedConfigError(
            f"refusing to build {target!r} at {path}: after merging the run folder's configs it names a class "
            f"outside the allow-list (only the project's own classes, ldm.*, are built from a run folder)"
        )


def _resolved_or_none(config: DictConfig | ListConfig) -> Any:
    """The user's own config resolved on its own; what does not resolve alone is not theirs."""
    try:
        return OmegaConf.to_container(config, resolve=True)
    except OmegaConfBaseException:
        return OmegaConf.to_container(config, resolve=False)


def check_run_folder_layout(run: Path) -> None:
    """Refuse a run folder whose written sub-folders lead outside it (symbolic links)."""
    root = run.resolve()
    for name in WRITTEN_FOLDERS:
        folder = run / name
        if folder.is_symlink() or (folder.exists() and folder.resolve().parent != root):
            raise UntrustedConfigError(
                f"cannot resume {run}: {name}/ leads outside the run folder (to {folder.resolve()}); "
                f"a run folder's parts must be inside it"
            )


def confined_checkpoint_path(path: Any, folder: str | Path, extension: str) -> str:
    """``path`` re-rooted in ``folder`` by its file name, or ``""`` where that is not a checkpoint file there.

    Checkpoint callback state names files (``best_model_path``, ``last_model_path``, ...) that
    Lightning may later delete as a "previous best"; a shared checkpoint can name any file
    (``../../victim``) and Lightning's guard is a lexical prefix test. A moved run's state
    names its old folder: re-rooting keeps its bookkeeping.
    """
    if not isinstance(path, str) or not path:
        return ""
    folder = Path(folder)
    name = Path(path).name
    candidate = (folder / name).resolve()
    if candidate.parent != folder.resolve() or not name.endswith(extension) or name.startswith("."):
        return ""
    return str(folder / name)
