"""Turn a ViCo file into a ready model: the one loader of sample.py, evaluation and exports.

Three formats hold what training learned (:meth:`LatentDiffusionModel.trained_state_dict`: S*
and the image-attention blocks for ViCo; the UNet, or its cross-attention keys and values, for
the DreamBooth and Custom Diffusion baselines):

* a **training checkpoint** ``.ckpt`` written by main.py: ``state_dict`` holds only the keys
  of :meth:`LatentDiffusionModel.trained_state_dict` and ``config`` the whole run config (a plain
  nested dict) whose ``model.params.ckpt_path`` names the base SD checkpoint;
* an **adapter export** ``.safetensors`` (:func:`save_adapter`): the same tensors, with the
  run config as YAML in the metadata (``format: vico-adapter``);
* the **authors' release pair** ``cross_attention-<step>.pt`` (image attention, keys without
  the leading ``model.``) and ``embeddings_gs-<step>.pt`` (S*). Either file finds its sibling
  of the same step in its folder; both may also be given explicitly, in any
  order and under any names. The pair stores no config: inside a run folder
  (``<run>/checkpoints/``) the run's own ``configs/*.yaml`` are read, elsewhere
  ``configs/vico.yaml`` is assumed and an error that may come from that assumption says so.

The base checkpoint is found where the run recorded it (:func:`base_checkpoint_candidates`:
beside the weights, in the checkout, under ``models/``); errors name the argument that gives
it, ``--base_ckpt`` on the command line or ``base_ckpt=`` in :mod:`ldm.api`
(:class:`ArgumentNames`).

Every mistake a user can make raises a one-line :class:`CheckpointError` or ``ValueError``
naming the file.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ldm import CHECKOUT, CONFIG_DIR
from ldm.models.diffusion.latent import SAMPLING_CLASSES, LatentDiffusionModel
from ldm.modules.diffusionmodules.openaimodel import DEFAULT_CHANNEL_MULT
from ldm.modules.embedding_manager import load_authors_embeddings
from ldm.models.base_checkpoint import find_base_checkpoint
from ldm.util import (
    CheckpointError,
    OversizedTensorError,
    check_storage_claims,
    check_stored_config,
    check_tensor_storage,
    check_tensor_values,
    instantiate_from_config,
    read_checkpoint,
    write_atomically,
)

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = CONFIG_DIR / "vico.yaml"
ADAPTER_FORMAT = "vico-adapter"
_ENCODER_CH_MULT = (1, 2, 4, 8)  # the Encoder's default when a config leaves ch_mult out
PLACEHOLDER_PREFIX = "embedding_manager.string_to_param_dict."
_AUTHORS_NAME = re.compile(r"^(cross_attention|embeddings_gs)-(\d+)\.pt$")
_AUTHORS_SIBLING = {"cross_attention": "embeddings_gs", "embeddings_gs": "cross_attention"}
_FORMATS_HELP = (
    "expected a training checkpoint (.ckpt with a 'state_dict'), an adapter export (.safetensors) "
    "or the authors' cross_attention-<step>.pt / embeddings_gs-<step>.pt pair"
)

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class ArgumentNames:
    """How the user of a front end passes the base checkpoint and the config: errors name these,
    so that a user of :mod:`ldm.api` (an installed wheel has no ``sample.py``) is not told about
    a command-line flag."""

    base_ckpt: str
    config: str


CLI_ARGUMENTS = ArgumentNames("--base_ckpt", "--config")
API_ARGUMENTS = ArgumentNames("base_ckpt=... to api.load", "config=... to api.load")


@dataclass
class ViCoWeights:
    """What a ViCo file holds: the trained tensors (model key names), the config stored with
    them or, for the authors' pair in a run folder, the run's (``config_source`` says which
    file), and the training step when the file records it."""

    state_dict: dict[str, torch.Tensor]
    config: DictConfig | None
    source: str
    folder: Path = Path(".")
    step: int | None = None
    config_source: str | None = None


# ------------------------------------------------------------------- reading
def read_vico_weights(ckpt: PathLike | Sequence[PathLike]) -> ViCoWeights:
    """Read one ViCo file, or the two files of the authors' pair, in any of the three formats."""
    paths = [Path(ckpt)] if isinstance(ckpt, (str, os.PathLike)) else [Path(p) for p in ckpt]
    if not 1 <= len(paths) <= 2:
        raise ValueError(f"expected one ViCo checkpoint or the authors' pair of two files, got {len(paths)} paths")
    for path in paths:
        if path.is_dir():
            raise CheckpointError(
                f"{path}: is a directory, not a checkpoint file (pass a file in it, e.g. checkpoints/last.ckpt)"
            )
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
    weights = _read_weights(paths)
    for key, value in weights.state_dict.items():
        check_tensor_values(key, value, True, weights.source)
    weights.folder = paths[0].resolve().parent
    if weights.config is None:
        weights.config, weights.config_source = run_folder_config(weights.folder)
    return weights


def run_folder_config(folder: Path) -> tuple[DictConfig | None, str | None]:
    """The config of the run whose ``checkpoints/`` is ``folder`` (its sessions'
    ``configs/*.yaml`` merged in order, as ``main.py -r`` merges them), and where it was read;
    ``(None, None)`` outside a run folder. It is checked like any stored config when used."""
    configs = sorted((folder.parent / "configs").glob("*.yaml")) if folder.name == "checkpoints" else []
    if not configs:
        return None, None
    try:
        merged = OmegaConf.merge(*(OmegaConf.load(path) for path in configs))
    except (OmegaConfBaseException, ValueError, OSError) as err:
        raise CheckpointError(f"{configs[-1]}: the run's config cannot be read ({type(err).__name__})") from None
    if not isinstance(merged, DictConfig):
        raise CheckpointError(f"{configs[-1]}: the run's config is not a mapping")
    return merged, str(configs[-1])


def _read_weights(paths: Sequence[Path]) -> ViCoWeights:
    if len(paths) == 2:
        return _read_authors_pair(*_order_pair(paths))
    path = paths[0]
    if path.suffix == ".safetensors":
        return _read_adapter(path)
    authors = _AUTHORS_NAME.match(path.name)
    if authors:
        role, step = authors.groups()
        sibling = path.with_name(f"{_AUTHORS_SIBLING[role]}-{step}.pt")
        if not sibling.is_file():
            raise CheckpointError(
                f"{path}: the other file of the authors' pair, {sibling.name}, is not in {path.parent}; "
                f"pass both files"
            )
        pair = (path, sibling) if role == "cross_attention" else (sibling, path)
        return _read_authors_pair(*pair)
    return _read_training_checkpoint(path)


def _read_training_checkpoint(path: Path) -> ViCoWeights:
    content = read_checkpoint(path)
    state_dict = content.get("state_dict")
    if not isinstance(state_dict, dict):
        if content and all(isinstance(v, torch.Tensor) and ".image_cross_attention." in k for k, v in content.items()):
            raise CheckpointError(
                f"{path}: holds only image-attention weights (the authors' cross_attention file?); "
                f"pass its embeddings file too"
            )
        raise CheckpointError(f"{path}: not a ViCo checkpoint; {_FORMATS_HELP}")
    if not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path}: its 'state_dict' does not hold only tensors")
    if not any(".image_cross_attention." in k or k.startswith("embedding_manager.") for k in state_dict):
        raise CheckpointError(
            f"{path}: holds no ViCo weights (a base Stable Diffusion checkpoint? pass that as --base_ckpt); "
            f"{_FORMATS_HELP}"
        )
    config = content.get("config")
    if config is not None and not isinstance(config, Mapping):
        raise CheckpointError(f"{path}: its 'config' is a {type(config).__name__}, expected a nested dict")
    step = content.get("global_step")
    stored = OmegaConf.create(dict(config)) if config is not None else None
    return ViCoWeights(dict(state_dict), stored, str(path), step=step if isinstance(step, int) else None)


def _read_adapter(path: Path) -> ViCoWeights:
    check_storage_claims(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state_dict = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    if metadata.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{path}: not a ViCo adapter (no 'format: {ADAPTER_FORMAT}' metadata); {_FORMATS_HELP}")
    config = None
    if "config" in metadata:
        try:
            config = OmegaConf.create(metadata["config"])
        except (OmegaConfBaseException, ValueError) as err:
            raise CheckpointError(f"{path}: its config metadata is not valid YAML ({type(err).__name__})") from None
    step = metadata.get("step")
    return ViCoWeights(state_dict, config, str(path), step=int(step) if step and step.isdigit() else None)


def _order_pair(paths: Sequence[Path]) -> tuple[Path, Path]:
    """``(cross_attention, embeddings)``: by name when the names say so, else by content."""
    roles = [_AUTHORS_NAME.match(p.name) for p in paths]
    if all(roles) and {r.group(1) for r in roles} == set(_AUTHORS_SIBLING):
        first, second = paths
        return (first, second) if roles[0].group(1) == "cross_attention" else (second, first)
    embeddings = []
    for path in paths:
        try:
            _read_embeddings(path)
        except OversizedTensorError:
            raise
        except Exception:  # noqa: BLE001 - any other failure means "not the embeddings file of the pair"
            continue
        embeddings.append(path)
    if len(embeddings) != 1:
        raise CheckpointError(
            f"{paths[0]}, {paths[1]}: two files must be the authors' pair, exactly one of them an "
            f"embeddings file (found {len(embeddings)})"
        )
    other = paths[1] if embeddings[0] == paths[0] else paths[0]
    return other, embeddings[0]


def _read_authors_pair(cross_attention: Path, embeddings: Path) -> ViCoWeights:
    source = f"{cross_attention} + {embeddings.name}"
    tensors = read_checkpoint(cross_attention)
    state_dict: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor) or ".image_cross_attention." not in key:
            raise CheckpointError(f"{cross_attention}: key '{key}' is not an image-attention tensor; {_FORMATS_HELP}")
        state_dict[key if key.startswith("model.") else f"model.{key}"] = value
    vectors = _read_embeddings(embeddings)
    state_dict.update({PLACEHOLDER_PREFIX + name: value for name, value in vectors.items()})
    named = _AUTHORS_NAME.match(cross_attention.name)
    return ViCoWeights(state_dict, None, source, step=int(named.group(2)) if named else None)


def _read_embeddings(path: Path) -> dict[str, torch.Tensor]:
    """S* of an authors' (Textual Inversion) embeddings file, its sizes checked before and after loading."""
    check_storage_claims(path)
    try:
        vectors = load_authors_embeddings(path)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    for name, value in vectors.items():
        check_tensor_storage(f"string_to_param.{name}", value, path)
    return vectors


# -------------------------------------------------------------------- config
def resolve_config(weights: ViCoWeights, config: PathLike | None = None) -> DictConfig:
    """Explicit ``config`` file > the config stored with the weights (or their run folder's)
    > ``configs/vico.yaml``.

    A config stored with the weights came from someone else: it may only name the project's
    own classes (:func:`ldm.util.check_stored_config`).
    """
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise ValueError(f"config not found: {path}")
        resolved = OmegaConf.load(path)
    elif weights.config is not None:
        check_stored_config(weights.config, weights.config_source or weights.source)
        resolved = weights.config
    else:
        resolved = OmegaConf.load(DEFAULT_CONFIG)
    if "model" not in resolved or "target" not in resolved.model:
        raise ValueError(f"config of {weights.source} has no model.target to build")
    return resolved


def autoencoder_factor(config: DictConfig) -> int:
    """Pixels per latent cell of the first stage (8 for SD v1, 4 for the tiny config)."""
    try:
        ddconfig = config.model.params.first_stage_config.params.ddconfig
    except (AttributeError, OmegaConfBaseException):
        raise ValueError("config has no model.params.first_stage_config.params.ddconfig") from None
    return 2 ** (len(ddconfig.get("ch_mult", _ENCODER_CH_MULT)) - 1)


def size_multiple(config: DictConfig) -> int:
    """What a sampling size must be a multiple of, in pixels: the autoencoder factor times the
    UNet's downsampling, so that every level's skip connection matches (64 for SD v1)."""
    channel_mult = OmegaConf.select(config, "model.params.unet_config.params.channel_mult", default=None)
    levels = len(channel_mult) if channel_mult is not None else len(DEFAULT_CHANNEL_MULT)
    return autoencoder_factor(config) * 2 ** (levels - 1)


def default_image_size(config: DictConfig) -> int:
    """Pixel side the model was trained at: latent size x autoencoder factor (512 for SD v1)."""
    return int(config.model.params.get("image_size", 64)) * autoencoder_factor(config)


def models_root() -> Path:
    """``models/`` of the checkout, or of the working folder when running from an installed wheel."""
    return (CHECKOUT if CHECKOUT is not None else Path.cwd()) / "models"


def model_folders() -> list[Path]:
    """``models/`` and its folders three levels down (``models/ldm/stable-diffusion-v1/``, where
    the README puts SD weights; ``models/miniworld/``, the shipped base)."""
    root = models_root()
    return [root, *(p for pattern in ("*", "*/*", "*/*/*") for p in sorted(root.glob(pattern)) if p.is_dir())]


def base_checkpoint_candidates(recorded: PathLike, folder: PathLike) -> list[Path]:
    """Where a base checkpoint recorded as ``recorded`` by a ViCo file in ``folder`` may be.

    Runs record a base inside the checkout relative to it (``models/miniworld/base.safetensors``,
    :func:`portable_config`), files written for sharing record any other base by its file name,
    and runs may be moved: the recorded path as given, then relative to the weights' folder,
    its parent (a run folder, for ``checkpoints/*``) and the checkout, then its name in those
    folders and under ``models/`` (:func:`model_folders`).
    """
    recorded, folder = Path(recorded), Path(folder)
    candidates = [recorded]
    if not recorded.is_absolute():
        candidates += [folder / recorded, folder.parent / recorded]
        candidates += [CHECKOUT / recorded] if CHECKOUT is not None else []
    candidates += [place / recorded.name for place in (folder, folder.parent, *model_folders())]
    return list(dict.fromkeys(candidates))


def missing_config_hint(weights: ViCoWeights, config: PathLike | None, names: ArgumentNames = CLI_ARGUMENTS) -> str:
    """What an error must add when the config it used was assumed, not read: the authors' pair
    outside a run folder stores none, and ``configs/vico.yaml`` (SD v1.4) is then a guess."""
    if config is not None or weights.config is not None:
        return ""
    return (
        f"; {weights.source} stores no config and is not in a run folder (<run>/checkpoints/), so "
        f"{_shown(DEFAULT_CONFIG)} was assumed: pass the config it was trained with ({names.config})"
    )


def base_checkpoint_path(
    config: DictConfig,
    base_ckpt: PathLike | None,
    source: str,
    folder: PathLike = ".",
    names: ArgumentNames = CLI_ARGUMENTS,
    hint: str = "",
) -> Path:
    """``base_ckpt`` if given, else the ``model.params.ckpt_path`` of the config, looked for
    where :func:`base_checkpoint_candidates` says; a file or a diffusers folder that must exist.
    Errors name the argument of ``names`` and end with ``hint`` (:func:`missing_config_hint`)."""
    if base_ckpt is not None:
        if not Path(base_ckpt).exists():
            raise CheckpointError(f"base checkpoint not found: {base_ckpt} (from {names.base_ckpt.split('=')[0]})")
        return find_base_checkpoint(base_ckpt)
    recorded = config.model.get("params", {}).get("ckpt_path")
    if not recorded:
        raise ValueError(
            f"{source}: its config names no base Stable Diffusion checkpoint (model.params.ckpt_path); "
            f"pass {names.base_ckpt}{hint}"
        )
    for candidate in base_checkpoint_candidates(recorded, folder):
        if candidate.exists():
            return find_base_checkpoint(candidate)
    raise CheckpointError(
        f"base checkpoint not found: {recorded} (from model.params.ckpt_path of {source}; also looked beside "
        f"it and under {models_root()}); pass {names.base_ckpt}{hint}"
    )


# ------------------------------------------------------------------ building
def sampling_model_config(config: DictConfig) -> dict[str, Any]:
    """The ``model`` section of a run config, to build for sampling or exporting: without the
    base checkpoint (the caller loads it, or none) and with the Lightning training class
    replaced by the plain model (:data:`SAMPLING_CLASSES`), so that nothing imports Lightning."""
    model_config = OmegaConf.to_container(config.model, resolve=True)
    model_config.setdefault("params", {}).pop("ckpt_path", None)
    target = model_config.get("target")
    model_config["target"] = SAMPLING_CLASSES.get(target, target)
    return model_config


def build_vico_model(
    weights: ViCoWeights,
    config: DictConfig,
    base_ckpt: PathLike | None = None,
    device: str | torch.device = "cpu",
    names: ArgumentNames = CLI_ARGUMENTS,
    hint: str = "",
) -> LatentDiffusionModel:
    """Instantiate the model of ``config`` on ``device``, then load the base and the trained
    weights; a file that does not fit the model is an error ending with ``hint``
    (:func:`missing_config_hint`: the config may be the wrong one)."""
    base = base_checkpoint_path(config, base_ckpt, weights.source, weights.folder, names, hint)
    model_config = sampling_model_config(config)
    with parameters_on_meta():  # no random initialisation of weights the files then replace
        model = instantiate_from_config(model_config)
    if not isinstance(model, LatentDiffusionModel):
        raise ValueError(f"config of {weights.source} builds a {type(model).__name__}, not a LatentDiffusionModel")
    try:
        model.load_base_checkpoint(str(base), assign=True)
        model.load_trained_state_dict(weights.state_dict, weights.source, assign=True)
    except CheckpointError as err:
        raise CheckpointError(f"{err}{hint}") from None
    _fill_initial_embeddings(model)
    left = [name for name, p in model.named_parameters() if p.is_meta]
    if left:
        raise CheckpointError(f"{weights.source} on base {base}: no weights for {left[:3]} ({len(left)} tensors)")
    logger.info("loaded %s on base %s", weights.source, base)
    return model.eval().to(device)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the ``meta`` device (no memory, no random
    initialisation); buffers (the noise schedule, position ids) are built as usual. The
    parameters are then filled with ``load_state_dict(..., assign=True)``."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _fill_initial_embeddings(model: LatentDiffusionModel) -> None:
    """``initial_embeddings`` (the starting value of S*, used by nothing at sampling time) is in
    no file: it takes the loaded S*."""
    manager = model.embedding_manager
    for name, param in manager.initial_embeddings.items():
        if param.is_meta:
            manager.initial_embeddings[name] = nn.Parameter(
                manager.string_to_param_dict[name].detach().clone(), requires_grad=False
            )


def load_vico_model(
    ckpt: PathLike | Sequence[PathLike],
    config: PathLike | None = None,
    base_ckpt: PathLike | None = None,
    device: str | torch.device = "cpu",
    names: ArgumentNames = CLI_ARGUMENTS,
) -> tuple[LatentDiffusionModel, DictConfig]:
    """A ready (eval-mode) ViCo model from any of the three formats, and the config it used.

    Args:
        ckpt: a training checkpoint, an adapter export, one file of the authors' pair (its
            sibling is found by step) or both files of the pair.
        config: a config file overriding the one stored with the weights.
        base_ckpt: the base SD checkpoint, overriding ``model.params.ckpt_path`` of the config.
        device: where the model is built and lives.
        names: how the caller's user passes ``base_ckpt`` and ``config``, for error messages.

    Raises:
        CheckpointError, ValueError: one-line messages naming the file at fault.
    """
    weights = read_vico_weights(ckpt)
    resolved = resolve_config(weights, config)
    hint = missing_config_hint(weights, config, names)
    return build_vico_model(weights, resolved, base_ckpt, device, names, hint), resolved


# ----------------------------------------------------------------- exporting
def portable_config(config: DictConfig | Mapping[str, Any]) -> DictConfig:
    """A copy of ``config`` fit for sharing: no path of the machine that wrote it travels with
    the file. A path inside the checkout is recorded relative to it (the shipped
    ``models/miniworld/base.safetensors`` then loads from any copy of the checkout, without
    ``--base_ckpt``); any other absolute path (the base checkpoint, the data folder, ...) is
    replaced by its file name, and the base is then found by name (:func:`base_checkpoint_candidates`)."""
    container = OmegaConf.to_container(
        config if isinstance(config, DictConfig) else OmegaConf.create(dict(config)), resolve=True
    )

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: strip(value) for key, value in node.items()}
        if isinstance(node, list):
            return [strip(value) for value in node]
        if isinstance(node, str) and (os.path.isabs(node) or node.startswith("~")):
            return _checkout_relative(Path(node)) or Path(node).name
        return node

    return OmegaConf.create(strip(container))


def _shown(path: Path) -> str:
    """``path`` as a user of the checkout reads it (``configs/vico.yaml``), else in full."""
    return _checkout_relative(path) or str(path)


def _checkout_relative(path: Path) -> str | None:
    """``path`` relative to the checkout, if it lies inside it (never for an installed wheel)."""
    if CHECKOUT is None or not path.is_relative_to(CHECKOUT):
        return None
    return path.relative_to(CHECKOUT).as_posix()


def save_adapter(
    model: LatentDiffusionModel, config: DictConfig | Mapping[str, Any], path: PathLike, step: int | None = None
) -> None:
    """Write the adapter export (trained tensors, the run config as YAML and the training step)
    for sharing.

    The config is made portable (:func:`portable_config`: no absolute paths); the file is
    written atomically and readable by others as the umask allows
    (:func:`ldm.util.write_atomically`).
    """
    tensors = {key: value.detach().cpu().contiguous().clone() for key, value in model.trained_state_dict().items()}
    metadata = {"config": OmegaConf.to_yaml(portable_config(config)), "format": ADAPTER_FORMAT}
    if step is not None:
        metadata["step"] = str(step)
    write_atomically(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))
