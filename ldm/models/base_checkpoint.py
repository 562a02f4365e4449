"""Stable Diffusion base checkpoints: which keys a base holds, and reading one into a model.

A base is a single CompVis-layout file (``sd-v1-4.ckpt``, its ``.safetensors``, the shipped
``models/miniworld/base.safetensors``) or a diffusers folder, renamed to CompVis keys by
:mod:`ldm.models.diffusers_layout`. The file-level reading (formats, sizes before values,
allow-listed unpickling) is :func:`ldm.util.read_checkpoint`'s; this module knows the model's
key names, so it lives with the models, above :mod:`ldm.util`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from ldm.models import diffusers_layout
from ldm.util import CheckpointError, check_state_dict, read_checkpoint

logger = logging.getLogger(__name__)

#: Prefixes every Stable Diffusion v1 checkpoint must provide in full.
BASE_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")
#: Model keys that are ViCo's own (trained here), never expected in a base checkpoint.
VICO_KEY_MARKERS = (".image_cross_attention.", "embedding_manager.")
#: Keys real checkpoints carry that this code neither needs nor complains about.
TOLERATED_EXTRA_PREFIXES = ("model_ema.", "logvar", "lvlb_weights")
TOLERATED_EXTRA_SUFFIXES = ("embeddings.position_ids",)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint (the ``state_dict`` entry of Lightning files), or of a
    diffusers folder (``unet/``, ``vae/``, ``text_encoder/``) renamed to CompVis keys."""
    path = Path(path)
    if path.is_dir():
        return read_diffusers_folder(path)
    content = read_checkpoint(path)
    state_dict = content.get("state_dict", content)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path}: no state_dict of tensors found")
    return state_dict


# ------------------------------------------------------------ diffusers layout
#: Weight files of each part of a diffusers folder, in order of preference.
DIFFUSERS_PARTS = {
    "unet": ("diffusion_pytorch_model",),
    "vae": ("diffusion_pytorch_model",),
    "text_encoder": ("model", "pytorch_model"),
}
_DIFFUSERS_SUFFIXES = (".safetensors", ".bin", ".fp16.safetensors", ".fp16.bin")


def is_diffusers_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder with at least one part of the diffusers layout."""
    path = Path(path)
    return path.is_dir() and any((path / part).is_dir() for part in DIFFUSERS_PARTS)


def _diffusers_part_file(folder: Path, part: str) -> Path:
    directory = folder / part
    for stem in DIFFUSERS_PARTS[part]:
        for suffix in _DIFFUSERS_SUFFIXES:
            if (directory / f"{stem}{suffix}").is_file():
                return directory / f"{stem}{suffix}"
    if any(directory.glob("*.index.json")):
        raise CheckpointError(f"{directory}: sharded weights are not supported; merge them into one file")
    expected = " or ".join(f"{stem}.safetensors/.bin" for stem in DIFFUSERS_PARTS[part])
    raise CheckpointError(f"{directory}: no weights file ({expected})")


def find_base_checkpoint(path: str | Path) -> Path:
    """Check that ``path`` is a base checkpoint file or a complete diffusers folder; return it.

    Only names are checked (nothing is read), so this is the quick start-up check.
    """
    path = Path(path)
    if path.is_dir():
        if not is_diffusers_folder(path):
            raise CheckpointError(
                f"{path}: is a directory, neither a checkpoint file nor a diffusers folder (unet/, vae/, text_encoder/)"
            )
        missing = [part for part in DIFFUSERS_PARTS if not (path / part).is_dir()]
        if missing:
            raise CheckpointError(
                f"{path}: a diffusers folder needs unet/, vae/ and text_encoder/; {missing[0]}/ is missing"
            )
        for part in DIFFUSERS_PARTS:
            _diffusers_part_file(path, part)
    elif not path.is_file():
        raise CheckpointError(f"base checkpoint not found: {path}")
    return path


def read_diffusers_folder(folder: str | Path) -> dict[str, torch.Tensor]:
    """SD v1 or 2.x weights of a diffusers folder under CompVis keys (:mod:`ldm.models.diffusers_layout`).

    The text encoder's ``config.json`` tells them apart: SD 2.x's OpenCLIP tower, converted to
    transformers' ``CLIPTextModel``, uses ``gelu`` where CLIP ViT-L/14 uses ``quick_gelu``; it is
    read under open_clip's names (:func:`diffusers_layout.open_clip_text_encoder_to_compvis`).
    """
    folder = find_base_checkpoint(folder)
    converters = {
        "unet": diffusers_layout.unet_to_compvis,
        "vae": diffusers_layout.vae_to_compvis,
        "text_encoder": diffusers_layout.open_clip_text_encoder_to_compvis
        if _text_activation(folder) == "gelu"
        else diffusers_layout.text_encoder_to_compvis,
    }
    state_dict: dict[str, torch.Tensor] = {}
    for part, convert in converters.items():
        file = _diffusers_part_file(folder, part)
        tensors = read_state_dict(file)
        state_dict.update(convert(tensors))
        logger.debug("%s: %d tensors from %s", folder, len(tensors), file)
    return state_dict


def _text_activation(folder: Path) -> str | None:
    """``hidden_act`` of a diffusers folder's ``text_encoder/config.json`` (None when absent or unreadable)."""
    try:
        return json.loads((folder / "text_encoder" / "config.json").read_text()).get("hidden_act")
    except (OSError, ValueError, AttributeError):
        return None


def _is_tolerated_extra(key: str) -> bool:
    return key.startswith(TOLERATED_EXTRA_PREFIXES) or key.endswith(TOLERATED_EXTRA_SUFFIXES)


def _is_vico_key(key: str) -> bool:
    return any(marker in key for marker in VICO_KEY_MARKERS)


def is_base_key(key: str) -> bool:
    """Whether a model key belongs to the frozen Stable Diffusion weights of a base checkpoint."""
    return key.startswith(BASE_PREFIXES) and not _is_vico_key(key) and not _is_tolerated_extra(key)


def load_base_checkpoint(model: nn.Module, path: str | Path, assign: bool = False) -> None:
    """Fill the frozen Stable Diffusion parts of ``model`` from a CompVis-layout checkpoint.

    Every UNet, autoencoder and text-encoder key must be present with the right shape;
    ViCo's own weights (image attention, placeholder) are not expected; EMA copies, the
    legacy ``position_ids`` buffer and ``logvar`` are ignored; anything else unexpected is
    reported in the log. ``assign=True`` puts the checkpoint's tensors (cast to the model's
    dtypes) in place of the model's, which may then be on the ``meta`` device.
    """
    found = read_state_dict(path)
    expected = model.state_dict()
    unused = set(unused_base_keys(model))
    required = [k for k in expected if is_base_key(k) and not (k in unused and k not in found)]
    check_state_dict(expected, found, path, required)
    unexpected = [k for k in found if k not in expected and not _is_tolerated_extra(k)]
    if unexpected:
        logger.warning("%s: ignoring %d unexpected keys, e.g. %s", path, len(unexpected), unexpected[:3])
    model.load_state_dict(
        {k: v.to(expected[k].dtype) if assign else v for k, v in found.items() if k in expected},
        strict=False,
        assign=assign,
    )
    for key in sorted(unused - found.keys()):  # kept as built; on the meta device, zeros
        module_name, _, name = key.rpartition(".")
        module = model.get_submodule(module_name)
        tensor = getattr(module, name)
        if tensor.is_meta:
            setattr(module, name, nn.Parameter(torch.zeros(tensor.shape, dtype=tensor.dtype), requires_grad=False))


def unused_base_keys(model: nn.Module) -> list[str]:
    """Base weights the model holds but never computes with (the last layer of a text encoder
    read at its penultimate layer, CLIP's projection): a base file may lack them (diffusers'
    SD 2.x text encoder does), and then they stay as built."""
    encoder = getattr(model, "cond_stage_model", None)
    keys = getattr(encoder, "unused_state_keys", lambda: [])()
    return [f"cond_stage_model.{key}" for key in keys]
