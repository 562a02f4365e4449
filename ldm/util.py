"""Config instantiation and the one place that reads and writes checkpoints."""
from __future__ import annotations

import importlib
import logging
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

logger = logging.getLogger(__name__)

#: Prefixes every Stable Diffusion v1 checkpoint must provide in full.
BASE_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")
#: Model keys that are ViCo's own (trained here), never expected in a base checkpoint.
VICO_KEY_MARKERS = (".image_cross_attention.", "embedding_manager.")
#: Keys real checkpoints carry that this code neither needs nor complains about.
TOLERATED_EXTRA_PREFIXES = ("model_ema.", "logvar", "lvlb_weights")
TOLERATED_EXTRA_SUFFIXES = ("embeddings.position_ids",)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line naming the file and the key."""


def get_obj_from_str(string: str) -> Any:
    module, cls = string.rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)


def instantiate_from_config(config: Mapping[str, Any], **kwargs: Any) -> Any:
    """Build ``config["target"](**config["params"], **kwargs)`` (CompVis convention).

    This imports and calls whatever ``target`` names: a config is code. Configs that arrive
    inside files (checkpoints, adapters, run folders) go through :func:`check_stored_config`
    first.
    """
    if "target" not in config:
        raise KeyError(f"config has no 'target' to instantiate: {dict(config)}")
    params = dict(config.get("params") or {})
    return get_obj_from_str(config["target"])(**params, **kwargs)


class UntrustedConfigError(CheckpointError):
    """A config stored in a file names something outside the allow-list of buildable classes."""


#: Classes outside ``ldm`` that a stored config may name (Lightning loggers and callbacks).
TRUSTED_EXTERNAL_TARGETS = frozenset(
    {
        "pytorch_lightning.loggers.CSVLogger",
        "pytorch_lightning.loggers.TensorBoardLogger",
        "pytorch_lightning.loggers.WandbLogger",
        "pytorch_lightning.callbacks.ModelCheckpoint",
        "pytorch_lightning.callbacks.LearningRateMonitor",
    }
)
_PROJECT_TARGET = re.compile(r"^ldm(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def is_trusted_target(target: Any) -> bool:
    """Whether a stored config may build ``target``: a class defined in the ``ldm`` package
    (not a function, not a name ``ldm`` merely imports) or one of :data:`TRUSTED_EXTERNAL_TARGETS`.

    Nothing outside ``ldm`` is imported to decide.
    """
    if not isinstance(target, str):
        return False
    if target in TRUSTED_EXTERNAL_TARGETS:
        return True
    if not _PROJECT_TARGET.match(target):
        return False
    try:
        obj = get_obj_from_str(target)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(obj, type) and obj.__module__.split(".")[0] == "ldm"


def _config_targets(node: Any) -> Iterable[Any]:
    if isinstance(node, Mapping):
        if "target" in node:
            yield node["target"]
        for value in node.values():
            yield from _config_targets(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _config_targets(value)


def check_stored_config(config: Any, source: str | Path) -> None:
    """Refuse a config read from a file the user did not write unless every ``target`` is trusted.

    A YAML passed with ``--base`` (or ``--config``) is code, as in CompVis, and is not checked.
    A config stored in a checkpoint, an adapter export or a shared run folder is data: each
    ``target`` anywhere in it (interpolations resolved) must pass :func:`is_trusted_target`.

    Raises:
        UntrustedConfigError: one line naming the file and the refused target.
    """
    if isinstance(config, (DictConfig, ListConfig)):
        try:
            config = OmegaConf.to_container(config, resolve=True)
        except OmegaConfBaseException as err:
            raise UntrustedConfigError(f"{source}: its stored config does not resolve ({type(err).__name__})") from None
    for target in _config_targets(config):
        if not is_trusted_target(target):
            raise UntrustedConfigError(
                f"{source}: refusing to build {target!r} from a stored config; only the project's own "
                f"classes (ldm.*) are built from files (pass a config you trust with --config or --base)"
            )


class _LightningCallbackKey:
    """Stands in for ``ModelCheckpoint``: old SD ``.ckpt`` files use that class as a dict key.

    Registering this placeholder under the class's pickled name lets ``weights_only`` loading
    read those files without importing or trusting anything else.
    """


_LEGACY_CKPT_GLOBALS: list[Any] = [
    (_LightningCallbackKey, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    np.dtype,
    type(np.dtype(np.float64)),
]
try:
    from numpy._core.multiarray import scalar as _np_scalar
except ImportError:  # numpy < 2
    from numpy.core.multiarray import scalar as _np_scalar
_LEGACY_CKPT_GLOBALS += [(_np_scalar, "numpy.core.multiarray.scalar"), (_np_scalar, "numpy._core.multiarray.scalar")]


def _torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only``; memory-mapped where the file format allows it.

    Mapping a 4 GB SD checkpoint instead of reading it keeps the copy that loading into the
    model makes from doubling the peak memory. Files written before torch 1.6 cannot be mapped.
    """
    with torch.serialization.safe_globals(_LEGACY_CKPT_GLOBALS):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "zipfile" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a ``.ckpt``/``.pt`` (safely, ``weights_only=True``) or ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    try:
        content = _torch_load(path)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: refused to unpickle ({first_line})") from None
    except Exception as err:  # noqa: BLE001 - bytes that are no pickle fail in arbitrary ways (IndexError, KeyError, ...)
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({detail})") from None
    if not isinstance(content, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(content).__name__}")
    return content


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint (the ``state_dict`` entry of Lightning files)."""
    content = read_checkpoint(path)
    state_dict = content.get("state_dict", content)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path}: no state_dict of tensors found")
    return state_dict


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write weights as ``.safetensors`` or as a CompVis-style ``.ckpt`` (``{"state_dict": ...}``)."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if path.suffix == ".safetensors":
        save_file({k: v.clone() for k, v in tensors.items()}, str(path))
    else:
        torch.save({"state_dict": tensors}, path)


def _is_tolerated_extra(key: str) -> bool:
    return key.startswith(TOLERATED_EXTRA_PREFIXES) or key.endswith(TOLERATED_EXTRA_SUFFIXES)


def _is_vico_key(key: str) -> bool:
    return any(marker in key for marker in VICO_KEY_MARKERS)


def is_base_key(key: str) -> bool:
    """Whether a model key belongs to the frozen Stable Diffusion weights of a base checkpoint."""
    return key.startswith(BASE_PREFIXES) and not _is_vico_key(key) and not _is_tolerated_extra(key)


def check_state_dict(
    expected: Mapping[str, torch.Tensor],
    found: Mapping[str, torch.Tensor],
    path: str | Path,
    required_keys: Iterable[str],
) -> None:
    """Raise :class:`CheckpointError` for a missing required key or any shape mismatch."""
    missing = sorted(k for k in required_keys if k not in found)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: missing key '{missing[0]}'{more}")
    for key, value in found.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{path}: key '{key}' has shape {list(value.shape)} but the model expects "
                f"{list(expected[key].shape)}; is this a checkpoint of another base model?"
            )


def load_base_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Fill the frozen Stable Diffusion parts of ``model`` from a CompVis-layout checkpoint.

    Every UNet, autoencoder and text-encoder key must be present with the right shape;
    ViCo's own weights (image attention, placeholder) are not expected; EMA copies, the
    legacy ``position_ids`` buffer and ``logvar`` are ignored; anything else unexpected is
    reported in the log.
    """
    found = read_state_dict(path)
    expected = model.state_dict()
    check_state_dict(expected, found, path, [k for k in expected if is_base_key(k)])
    unexpected = [k for k in found if k not in expected and not _is_tolerated_extra(k)]
    if unexpected:
        logger.warning("%s: ignoring %d unexpected keys, e.g. %s", path, len(unexpected), unexpected[:3])
    model.load_state_dict({k: v for k, v in found.items() if k in expected}, strict=False)
