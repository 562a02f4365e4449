"""Write what ViCo trained in the formats people already use.

:func:`export_trained` writes, for one training step ``N``, any of:

* ``authors``: the authors' pair, as their ``on_save_checkpoint`` writes it and their
  ``scripts/vico_txt2img.py --ft_path <run> --load_step N`` reads it from ``<run>/checkpoints/``:
  ``cross_attention-N.pt``, the image-attention tensors under the keys of their
  ``DiffusionWrapper.state_dict()`` (``diffusion_model.output_blocks.*.image_cross_attention.*``),
  and ``embeddings_gs-N.pt``, ``{"string_to_token": {placeholder: 0-dim id tensor},
  "string_to_param": nn.ParameterDict}``. Written by torch 2, the pickled ParameterDict holds its
  entries in ``_parameters`` (what torch 1.10 reads) and lists them in ``_keys`` (what torch 2
  reads);
* ``textual_inversion``: S* alone as ``textual_inversion-N.pt`` in Textual Inversion's
  ``string_to_param`` format as AUTOMATIC1111's web UI writes it (plain dicts and tensors, so
  ``torch.load(weights_only=True)`` reads it; the web UI and diffusers' ``load_textual_inversion``
  read the ``"*"`` entry, diffusers names the token after ``"name"``);
* ``diffusers``: S* alone as ``learned_embeds-steps-N.safetensors``, ``{token: [n, D]}`` as
  diffusers' Textual Inversion script writes it;
* ``adapter``: ``adapter-N.safetensors``, this project's export (:func:`save_adapter`).

S* is the first placeholder of the embedding manager (the one whose attention map gives the
mask); the Textual Inversion formats hold one embedding, so other placeholders are left out of
them with a warning. Every file is written atomically and readable by others
(:func:`ldm.util.write_atomically`).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from ldm.models.diffusion.latent import LatentDiffusionModel
from ldm.models.loading import ViCoWeights, sampling_model_config, save_adapter
from ldm.util import instantiate_from_config, write_atomically

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("authors", "textual_inversion", "diffusers", "adapter")
#: What a training run writes at every checkpoint: the authors' pair and S* for other tools.
DEFAULT_FORMATS = ("authors", "textual_inversion", "diffusers")
#: The key under which Textual Inversion ``.pt`` files hold their embedding, whatever its name.
TI_KEY = "*"

PathLike = str | os.PathLike[str]
ConfigLike = DictConfig | Mapping[str, Any]


def export_trained(
    model: LatentDiffusionModel,
    config: ConfigLike,
    folder: PathLike,
    step: int,
    formats: Sequence[str] = DEFAULT_FORMATS,
) -> list[Path]:
    """Write the trained S* and image attention of ``model`` at training step ``step``.

    Args:
        model: the trained model (only S* and the image-attention blocks are read).
        config: its run config (stored in the adapter; names the base checkpoint).
        folder: where the files go (created if missing); existing files are replaced.
        step: the training step, part of every file name.
        formats: any of :data:`EXPORT_FORMATS`.

    Returns:
        The files written, in the order of ``formats``.

    Raises:
        ValueError: an unknown format or a negative step (nothing is written).
    """
    unknown = [name for name in formats if name not in EXPORT_FORMATS]
    if unknown:
        raise ValueError(f"unknown export format '{unknown[0]}'; choose from {', '.join(EXPORT_FORMATS)}")
    if step < 0:
        raise ValueError(f"the training step must be >= 0, got {step}")
    folder = Path(folder)
    written: list[Path] = []
    for name in dict.fromkeys(formats):
        written += _WRITERS[name](model, config, folder, step)
    logger.info("exported step %d: %s", step, ", ".join(path.name for path in written))
    return written


def _write_authors_pair(model: LatentDiffusionModel, config: ConfigLike, folder: Path, step: int) -> list[Path]:
    image_attention = {
        key.removeprefix("model."): value.detach().cpu().contiguous().clone()
        for key, value in model.trained_state_dict().items()
        if ".image_cross_attention." in key
    }
    cross_attention = folder / f"cross_attention-{step}.pt"
    embeddings = folder / f"embeddings_gs-{step}.pt"
    write_atomically(cross_attention, lambda temporary: torch.save(image_attention, temporary))
    write_atomically(embeddings, model.embedding_manager.save_authors_format)
    return [cross_attention, embeddings]


def _write_textual_inversion(model: LatentDiffusionModel, config: ConfigLike, folder: Path, step: int) -> list[Path]:
    placeholder, token_id, vectors = _placeholder_vectors(model)
    base = OmegaConf.select(_as_config(config), "model.params.ckpt_path")
    content = {
        "string_to_token": {TI_KEY: token_id},
        "string_to_param": {TI_KEY: vectors},
        "name": placeholder,
        "step": step,
        "sd_checkpoint": None,
        "sd_checkpoint_name": Path(base).stem if base else None,
    }
    path = folder / f"textual_inversion-{step}.pt"
    write_atomically(path, lambda temporary: torch.save(content, temporary))
    return [path]


def _write_diffusers(model: LatentDiffusionModel, config: ConfigLike, folder: Path, step: int) -> list[Path]:
    placeholder, _, vectors = _placeholder_vectors(model)
    path = folder / f"learned_embeds-steps-{step}.safetensors"
    tensors = {placeholder: vectors}
    write_atomically(path, lambda temporary: save_file(tensors, str(temporary), metadata={"format": "pt"}))
    return [path]


def _write_adapter(model: LatentDiffusionModel, config: ConfigLike, folder: Path, step: int) -> list[Path]:
    path = folder / f"adapter-{step}.safetensors"
    save_adapter(model, config, path)
    return [path]


_WRITERS: dict[str, Callable[[LatentDiffusionModel, ConfigLike, Path, int], list[Path]]] = {
    "authors": _write_authors_pair,
    "textual_inversion": _write_textual_inversion,
    "diffusers": _write_diffusers,
    "adapter": _write_adapter,
}


def _placeholder_vectors(model: LatentDiffusionModel) -> tuple[str, int, torch.Tensor]:
    """S* (the first placeholder): its string, CLIP token id and ``[n, D]`` float32 vectors."""
    manager = model.embedding_manager
    placeholder, *others = manager.string_to_token_dict
    if others:
        logger.warning("Textual Inversion exports hold one embedding: %r only, not %s", placeholder, others)
    vectors = manager.string_to_param_dict[placeholder].detach().cpu().float().contiguous().clone()
    return placeholder, manager.string_to_token_dict[placeholder], vectors


def _as_config(config: ConfigLike) -> DictConfig:
    return config if isinstance(config, DictConfig) else OmegaConf.create(dict(config))


def build_trained_only(weights: ViCoWeights, config: DictConfig) -> LatentDiffusionModel:
    """The model of ``config`` holding ``weights`` and nothing else: enough to export it.

    The frozen Stable Diffusion weights are not read (no base checkpoint is needed): the model
    is built on the ``meta`` device and given uninitialised CPU storage, into which only the
    trained tensors are loaded.
    """
    with torch.device("meta"):
        model = instantiate_from_config(sampling_model_config(config))
    if not isinstance(model, LatentDiffusionModel):
        raise ValueError(f"config of {weights.source} builds a {type(model).__name__}, not a LatentDiffusionModel")
    model.to_empty(device="cpu")
    model.load_trained_state_dict(weights.state_dict, weights.source)
    return model.eval()
