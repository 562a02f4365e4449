"""Write what ViCo (or a Table 2 baseline) trained in the formats people already use.

:func:`export_trained` writes, for one training step ``N``, any of the formats the model has
(:func:`available_formats`):

* ``authors``: the authors' pair, as their ``on_save_checkpoint`` writes it and their
  ``scripts/vico_txt2img.py --ft_path <run> --load_step N`` reads it from ``<run>/checkpoints/``:
  ``cross_attention-N.pt``, the image-attention tensors under the keys of their
  ``DiffusionWrapper.state_dict()`` (``diffusion_model.output_blocks.*.image_cross_attention.*``),
  and ``embeddings_gs-N.pt``, ``{"string_to_token": {placeholder: 0-dim id tensor},
  "string_to_param": nn.ParameterDict}``. Written by torch 2, the pickled ParameterDict holds its
  entries in ``_parameters`` (what torch 1.10 reads) and lists them in ``_keys`` (what torch 2
  reads);
* ``textual_inversion``: S* alone as ``<name>-N.pt`` in Textual Inversion's ``string_to_param``
  format as AUTOMATIC1111's web UI writes it (plain dicts and tensors, so
  ``torch.load(weights_only=True)`` reads it; the web UI and diffusers' ``load_textual_inversion``
  read the ``"*"`` entry). The web UI makes the file name the trigger word of prompts, so the
  file is named after the run (:func:`embedding_name`): ``my_toy-400.pt`` is triggered by
  "a photo of my_toy-400 on the beach"; ``"name"`` holds the same word, which diffusers takes
  as the token;
* ``diffusers``: S* alone as ``learned_embeds-steps-N.safetensors``, ``{token: [n, D]}`` as
  diffusers' Textual Inversion script writes it;
* ``adapter``: ``adapter-N.safetensors``, this project's export (:func:`save_adapter`);
* ``dreambooth``: ``dreambooth-N.safetensors``, the whole fine-tuned model as one CompVis-layout
  file (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``), what
  ``sd-v1-4.ckpt`` holds: any Stable Diffusion tool (and ``sample.py --base_ckpt``) loads it as
  a base. S* is written into the token embedding row of the identifier it started from
  (``sks``), so that plain prompts ("a photo of sks dog") reach it there;
* ``custom_diffusion``: ``custom_diffusion-N/``, the layout of diffusers' Custom Diffusion script:
  ``pytorch_custom_diffusion_weights.bin`` (``<processor>.to_k_custom_diffusion.weight`` and
  ``.to_v_custom_diffusion.weight`` of every ``attn2`` processor under diffusers' UNet names,
  an empty entry for every ``attn1`` processor, as ``UNet2DConditionModel.save_attn_procs``
  writes it) and ``<new1>.bin``, ``{"<new1>": S*}`` as its ``save_new_embed`` writes the modifier
  token; ``pipe.unet.load_attn_procs(folder, weight_name="pytorch_custom_diffusion_weights.bin")``
  and ``pipe.load_textual_inversion(folder, weight_name="<new1>.bin")`` read them.

S* is the first placeholder of the embedding manager (the one whose attention map gives the
mask); the Textual Inversion formats hold one embedding, so other placeholders are left out of
them with a warning. Every file is written atomically and readable by others
(:func:`ldm.util.write_atomically`). Files are numbered by the steps trained (``-400`` after 400
steps); the authors' own runs number their pair by the last step's index (``-399``), so their
``vico_txt2img.py --load_step`` takes 400 for ours. :func:`export_files` finds a folder's
exports by step (a run keeps those of its last saves).
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from ldm.models.diffusion.latent import CROSS_ATTENTION_KV, LatentDiffusionModel
from ldm.models.loading import ViCoWeights, sampling_model_config, save_adapter
from ldm.modules.diffusionmodules.openaimodel import Downsample
from ldm.util import instantiate_from_config, write_atomically

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("authors", "textual_inversion", "diffusers", "adapter", "dreambooth", "custom_diffusion")
#: ViCo's formats: the authors' pair and S* for other tools.
DEFAULT_FORMATS = ("authors", "textual_inversion", "diffusers")
#: The key under which Textual Inversion ``.pt`` files hold their embedding, whatever its name.
TI_KEY = "*"
#: The Textual Inversion file's name when neither a run nor a word-like placeholder names it.
DEFAULT_EMBEDDING_NAME = "textual_inversion"
#: The files of each format at step ``{step}`` (``{name}``: :func:`embedding_name`); a
#: ``custom_diffusion`` entry is a folder.
FILE_NAMES = {
    "authors": ("cross_attention-{step}.pt", "embeddings_gs-{step}.pt"),
    "textual_inversion": ("{name}-{step}.pt",),
    "diffusers": ("learned_embeds-steps-{step}.safetensors",),
    "adapter": ("adapter-{step}.safetensors",),
    "dreambooth": ("dreambooth-{step}.safetensors",),
    "custom_diffusion": ("custom_diffusion-{step}",),
}
#: A run folder's name, ``<time>_<name>`` (main.py), with the name in group 1.
_RUN_FOLDER = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}_(.+)$")
#: The modifier token's name in Custom Diffusion exports (its scripts' default), for diffusers'
#: tokenizer, which cannot take ``*`` as a new token: prompts there read "<new1> dog".
MODIFIER_TOKEN = "<new1>"
CUSTOM_DIFFUSION_WEIGHTS = "pytorch_custom_diffusion_weights.bin"

PathLike = str | os.PathLike[str]
ConfigLike = DictConfig | Mapping[str, Any]


def available_formats(model: LatentDiffusionModel) -> tuple[str, ...]:
    """The formats that hold what ``model`` trained: the authors' pair needs image attention, the
    Textual Inversion files a trained S*, ``dreambooth`` a fine-tuned UNet (and the base weights
    beside it), ``custom_diffusion`` Custom Diffusion's key and value projections."""
    has = {
        "authors": model.has_image_attention,
        "textual_inversion": model.placeholder_trainable,
        "diffusers": model.placeholder_trainable,
        "adapter": True,
        "dreambooth": model.unet_trainable == "all" and model.holds_base_weights,
        "custom_diffusion": model.unet_trainable == "cross_attention_kv",
    }
    return tuple(name for name in EXPORT_FORMATS if has[name])


def method_formats(model: LatentDiffusionModel) -> tuple[str, ...]:
    """The community formats of ``model``'s method, what a training run writes by default:
    ViCo's :data:`DEFAULT_FORMATS` (Textual Inversion: its two S* files), DreamBooth's full
    checkpoint, Custom Diffusion's diffusers folder."""
    if model.unet_trainable == "all":
        return ("dreambooth",)
    if model.unet_trainable == "cross_attention_kv":
        return ("custom_diffusion",)
    return tuple(name for name in DEFAULT_FORMATS if name in available_formats(model))


def run_name(folder: PathLike) -> str | None:
    """The run's name of a run folder ``<time>_<name>`` (what ``main.py -n`` gave), else None."""
    match = _RUN_FOLDER.match(Path(folder).name)
    return match.group(1) if match else None


def embedding_name(name: str | None, model: LatentDiffusionModel) -> str:
    """The Textual Inversion file's stem, which AUTOMATIC1111's web UI makes the trigger word:
    ``name`` (a run's name), else the placeholder if it is a word (``<my-toy>`` gives ``my-toy``),
    else :data:`DEFAULT_EMBEDDING_NAME`; only letters, digits, ``_``, ``.`` and ``-`` are kept."""
    for candidate in (name, next(iter(model.embedding_manager.string_to_token_dict))):
        cleaned = re.sub(r"[^\w.-]+", "-", candidate or "").strip("-.")
        if re.search(r"[A-Za-z0-9]", cleaned):
            return cleaned
    return DEFAULT_EMBEDDING_NAME


def export_files(folder: PathLike, name: str) -> dict[int, list[Path]]:
    """The exports in ``folder`` by step: every file (or Custom Diffusion folder) of
    :data:`FILE_NAMES` that exists, with ``name`` the Textual Inversion stem."""
    patterns = [
        re.compile(r"(\d+)".join(re.escape(part.format(name=name)) for part in template.split("{step}")) + "$")
        for templates in FILE_NAMES.values()
        for template in templates
    ]
    found: dict[int, list[Path]] = {}
    for path in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
        for pattern in patterns:
            match = pattern.fullmatch(path.name)
            if match:
                found.setdefault(int(match.group(1)), []).append(path)
                break
    return found


@dataclass(frozen=True)
class ExportJob:
    """One export: what to write and where (the writers' one argument)."""

    model: LatentDiffusionModel
    config: ConfigLike
    folder: Path
    step: int
    name: str

    def path(self, template: str) -> Path:
        return self.folder / template.format(name=self.name, step=self.step)


def export_trained(
    model: LatentDiffusionModel,
    config: ConfigLike,
    folder: PathLike,
    step: int,
    formats: Sequence[str] | None = None,
    name: str | None = None,
) -> list[Path]:
    """Write the trained S* and image attention of ``model`` at training step ``step``.

    Args:
        model: the trained model (only S* and the image-attention blocks are read).
        config: its run config (stored in the adapter; names the base checkpoint).
        folder: where the files go (created if missing); existing files are replaced.
        step: the training step, part of every file name.
        formats: any of :data:`EXPORT_FORMATS`; ``None``: the method's (:func:`method_formats`).
        name: the run's name, for the Textual Inversion file (:func:`embedding_name`).

    Returns:
        The files written, in the order of ``formats``.

    Raises:
        ValueError: an unknown format, one the model has nothing for (:func:`available_formats`)
            or a negative step (nothing is written).
    """
    formats = method_formats(model) if formats is None else formats
    unknown = [kind for kind in formats if kind not in EXPORT_FORMATS]
    if unknown:
        raise ValueError(f"unknown export format '{unknown[0]}'; choose from {', '.join(EXPORT_FORMATS)}")
    available = available_formats(model)
    missing = [kind for kind in formats if kind not in available]
    if missing:
        raise ValueError(
            f"this model has nothing to write as '{missing[0]}' (it did not train that part, or its base "
            f"weights were not loaded); its formats: {', '.join(available)}"
        )
    if step < 0:
        raise ValueError(f"the training step must be >= 0, got {step}")
    job = ExportJob(model, config, Path(folder), step, embedding_name(name, model))
    written: list[Path] = []
    for kind in dict.fromkeys(formats):
        written += _WRITERS[kind](job)
    logger.info("exported step %d: %s", step, ", ".join(path.name for path in written))
    return written


def _write_authors_pair(job: ExportJob) -> list[Path]:
    model = job.model
    image_attention = {
        key.removeprefix("model."): value.detach().cpu().contiguous().clone()
        for key, value in model.trained_state_dict().items()
        if ".image_cross_attention." in key
    }
    cross_attention, embeddings = (job.path(template) for template in FILE_NAMES["authors"])
    write_atomically(cross_attention, lambda temporary: torch.save(image_attention, temporary))
    write_atomically(embeddings, model.embedding_manager.save_authors_format)
    return [cross_attention, embeddings]


def _write_textual_inversion(job: ExportJob) -> list[Path]:
    _, token_id, vectors = _placeholder_vectors(job.model)
    base = OmegaConf.select(_as_config(job.config), "model.params.ckpt_path")
    content = {
        "string_to_token": {TI_KEY: token_id},
        "string_to_param": {TI_KEY: vectors},
        "name": job.name,
        "step": job.step,
        "sd_checkpoint": None,
        "sd_checkpoint_name": Path(base).stem if base else None,
    }
    (path,) = (job.path(template) for template in FILE_NAMES["textual_inversion"])
    write_atomically(path, lambda temporary: torch.save(content, temporary))
    return [path]


def _write_diffusers(job: ExportJob) -> list[Path]:
    placeholder, _, vectors = _placeholder_vectors(job.model)
    (path,) = (job.path(template) for template in FILE_NAMES["diffusers"])
    tensors = {placeholder: vectors}
    write_atomically(path, lambda temporary: save_file(tensors, str(temporary), metadata={"format": "pt"}))
    return [path]


def _write_adapter(job: ExportJob) -> list[Path]:
    (path,) = (job.path(template) for template in FILE_NAMES["adapter"])
    save_adapter(job.model, job.config, path, job.step)
    return [path]


def _write_dreambooth(job: ExportJob) -> list[Path]:
    model = job.model
    tensors = {key: value.cpu().contiguous().clone() for key, value in model.base_state_dict().items()}
    table = "cond_stage_model." + _token_embedding_name(model)
    manager = model.embedding_manager
    for placeholder, token_id in manager.identifier_token_ids.items():
        tensors[table][token_id] = manager.string_to_param_dict[placeholder][0].detach().cpu()
    unnamed = [p for p in manager.string_to_token_dict if p not in manager.identifier_token_ids]
    if unnamed:
        logger.warning("%s: no identifier word, so other tools' prompts cannot name it in the DreamBooth file", unnamed)
    (path,) = (job.path(template) for template in FILE_NAMES["dreambooth"])
    write_atomically(path, lambda temporary: save_file(tensors, str(temporary), metadata={"format": "pt"}))
    return [path]


def _token_embedding_name(model: LatentDiffusionModel) -> str:
    """The key of the text encoder's token embedding table, under ``cond_stage_model``."""
    table = model.cond_stage_model.token_embedding.weight
    return next(name for name, p in model.cond_stage_model.named_parameters() if p is table)


def _write_custom_diffusion(job: ExportJob) -> list[Path]:
    model = job.model
    processors: dict[str, Any] = {}
    for name, value in model.model.diffusion_model.state_dict().items():
        if ".transformer_blocks." not in name or not name.endswith(CROSS_ATTENTION_KV):
            continue
        block = _diffusers_block_name(name.split(".attn2.")[0], _resnets_per_level(model))
        projection = name.split(".attn2.")[1].split(".")[0]  # to_k or to_v
        processors[f"{block}.attn1.processor"] = {}
        processors[f"{block}.attn2.processor.{projection}_custom_diffusion.weight"] = value.detach().cpu().clone()
    _, _, vectors = _placeholder_vectors(model)
    embedding = {MODIFIER_TOKEN: vectors[0] if len(vectors) == 1 else vectors}
    (target,) = (job.path(template) for template in FILE_NAMES["custom_diffusion"])
    weights, token = target / CUSTOM_DIFFUSION_WEIGHTS, target / f"{MODIFIER_TOKEN}.bin"
    write_atomically(weights, lambda temporary: torch.save(processors, temporary))
    write_atomically(token, lambda temporary: torch.save(embedding, temporary))
    return [weights, token]


def _resnets_per_level(model: LatentDiffusionModel) -> int:
    """ResBlocks per UNet level: the first downsampling block comes after that many, plus the input conv."""
    blocks = model.model.diffusion_model.input_blocks
    return next((i for i, block in enumerate(blocks) if isinstance(block[0], Downsample)), len(blocks)) - 1


def _diffusers_block_name(compvis: str, resnets: int) -> str:
    """diffusers' name of a CompVis transformer block: ``input_blocks.4.1.transformer_blocks.0`` ->
    ``down_blocks.1.attentions.0.transformer_blocks.0`` (the inverse of the rules of
    :mod:`ldm.models.diffusers_layout`; up blocks have one ResBlock more than down blocks)."""
    parts = compvis.split(".")
    if parts[0] == "middle_block":  # middle_block.1.<rest>
        return "mid_block.attentions.0." + ".".join(parts[2:])
    part, index, rest = parts[0], int(parts[1]), ".".join(parts[3:])  # input_blocks.N.1.<rest>
    if part == "input_blocks":
        level, position = divmod(index - 1, resnets + 1)
        return f"down_blocks.{level}.attentions.{position}.{rest}"
    level, position = divmod(index, resnets + 1)
    return f"up_blocks.{level}.attentions.{position}.{rest}"


_WRITERS: dict[str, Callable[[ExportJob], list[Path]]] = {
    "authors": _write_authors_pair,
    "textual_inversion": _write_textual_inversion,
    "diffusers": _write_diffusers,
    "adapter": _write_adapter,
    "dreambooth": _write_dreambooth,
    "custom_diffusion": _write_custom_diffusion,
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
    model.holds_base_weights = False
    model.load_trained_state_dict(weights.state_dict, weights.source)
    return model.eval()
