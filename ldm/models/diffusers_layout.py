"""Stable Diffusion v1 weights in the diffusers folder layout, renamed to CompVis keys.

A diffusers folder (as published for SD 1.4 and 1.5) holds the three frozen networks in
``unet/``, ``vae/`` and ``text_encoder/``, each with its own key names. The rules below are
those of diffusers' conversion scripts (``convert_original_stable_diffusion_to_diffusers.py``
and its inverse), written from their mapping tables:

* UNet: ``down_blocks.i.{resnets,attentions}.j`` is ``input_blocks.(1 + i (R + 1) + j).{0,1}``
  with R resnets per down block, ``down_blocks.i.downsamplers.0.conv`` is
  ``input_blocks.((i + 1)(R + 1)).0.op``, ``up_blocks.i.{resnets,attentions}.j`` is
  ``output_blocks.(i (R + 1) + j).{0,1}`` (up blocks have R + 1 resnets) and
  ``up_blocks.i.upsamplers.0`` the last layer of ``output_blocks.(i (R + 1) + R)``; resnet
  layers and a few top-level layers are renamed.
* VAE: ``down_blocks.i`` is ``down.i``, ``up_blocks.i`` is ``up.(L - 1 - i)`` (reversed),
  ``mid_block.{resnets.0, attentions.0, resnets.1}`` is ``mid.{block_1, attn_1, block_2}``;
  the mid attention's linear projections (``to_q``... or, in older files, ``query``...) are
  CompVis' 1x1 convolutions ``q, k, v, proj_out``.
* Text encoder: transformers' ``CLIPTextModel`` keys, with or without the ``text_model.`` level,
  under ``cond_stage_model.transformer.text_model.``.
* SD 2.x: the UNet and VAE rules above hold unchanged (linear ``proj_in``/``proj_out`` keep
  their names and shapes). The text encoder (:func:`open_clip_text_encoder_to_compvis`):
  diffusers converts the OpenCLIP ViT-H/14 text tower into a transformers ``CLIPTextModel``
  (``hidden_act: gelu``) holding only the layers up to the penultimate one (23 of 24) and neither
  ``text_projection`` nor ``logit_scale``; the rules back to open_clip's names
  (``cond_stage_model.model.``) are the inverse of diffusers' ``convert_open_clip_checkpoint``:
  ``layer_norm1/2`` are ``ln_1/2``, ``mlp.fc1/fc2`` are ``mlp.c_fc/c_proj``,
  ``self_attn.{q,k,v}_proj`` are stacked (q, k, v) into ``attn.in_proj_*``.
  :func:`ldm.models.base_checkpoint.read_diffusers_folder` does not call it yet: it reads an SD 2.x folder's text
  encoder with the SD v1 rules (a "missing key" error), and the folder lacks the last layer and
  the projection that our ``FrozenOpenCLIPEmbedder`` holds (unused at ``layer: penultimate``).

Unknown keys keep their name under the part's CompVis prefix, so that the usual key check
reports them (missing keys are errors, extra ones are logged).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."
OPEN_CLIP_TEXT_PREFIX = "cond_stage_model.model."

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_TOP = {"conv_norm_out": "norm_out"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
#: Linear projections of the VAE's mid attention, 1x1 convolutions in CompVis.
_VAE_CONV_PROJECTIONS = frozenset({"q", "k", "v", "proj_out"})
_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_CLIP_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
_CLIP_QKV = re.compile(r"^self_attn\.([qkv])_proj\.(weight|bias)$")

_BLOCK = re.compile(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$")
_SAMPLER = re.compile(r"^(down|up)_blocks\.(\d+)\.(downsamplers|upsamplers)\.0\.conv\.(.+)$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def _rename_layer(rest: str, table: Mapping[str, str]) -> str:
    """Rename the leading layer name of ``rest`` (``norm1.weight`` -> ``in_layers.0.weight``)."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def _indices(keys: set[str], pattern: str) -> set[int]:
    """The distinct indices ``(\\d+)`` that ``pattern`` matches at the start of ``keys``."""
    regex = re.compile(pattern)
    return {int(m.group(1)) for m in map(regex.match, keys) if m}


def unet_key(key: str, resnets_per_down_block: int, up_blocks_with_attention: set[int]) -> str:
    """The CompVis name (without ``model.diffusion_model.``) of a diffusers UNet key."""
    layers = resnets_per_down_block + 1  # CompVis blocks per level: R resnets + a downsampler, or R + 1 resnets
    module, _, leaf = key.rpartition(".")
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{leaf}"
    if match := _BLOCK.match(key):
        side, i, kind, j, rest = match.groups()
        i, j = int(i), int(j)
        index = 1 + i * layers + j if side == "down" else i * layers + j
        blocks = "input_blocks" if side == "down" else "output_blocks"
        if kind == "resnets":
            return f"{blocks}.{index}.0.{_rename_layer(rest, _UNET_RESNET)}"
        return f"{blocks}.{index}.1.{rest}"
    if match := _SAMPLER.match(key):
        side, i, _, rest = match.groups()
        i = int(i)
        if side == "down":
            return f"input_blocks.{(i + 1) * layers}.0.op.{rest}"
        position = 2 if i in up_blocks_with_attention else 1
        return f"output_blocks.{i * layers + layers - 1}.{position}.conv.{rest}"
    if match := _MID.match(key):
        kind, j, rest = match.groups()
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * int(j)}.{_rename_layer(rest, _UNET_RESNET)}"
    return key


def vae_key(key: str, levels: int) -> str:
    """The CompVis name (without ``first_stage_model.``) of a diffusers VAE key."""
    coder, _, rest = key.partition(".")
    if coder not in ("encoder", "decoder"):
        return key
    if match := _BLOCK.match(rest):
        side, i, kind, j, tail = match.groups()
        level = int(i) if side == "down" else levels - 1 - int(i)
        return f"{coder}.{side}.{level}.block.{j}.{_rename_layer(tail, _VAE_RESNET)}"
    if match := _SAMPLER.match(rest):
        side, i, _, tail = match.groups()
        level = int(i) if side == "down" else levels - 1 - int(i)
        return f"{coder}.{side}.{level}.{side}sample.conv.{tail}"
    if match := _MID.match(rest):
        kind, j, tail = match.groups()
        if kind == "attentions":
            return f"{coder}.mid.attn_1.{_rename_layer(tail, _VAE_ATTENTION)}"
        return f"{coder}.mid.block_{int(j) + 1}.{_rename_layer(tail, _VAE_RESNET)}"
    return f"{coder}.{_rename_layer(rest, _VAE_TOP)}"


def text_encoder_key(key: str) -> str:
    """The CompVis name (without its prefix) of a transformers ``CLIPTextModel`` key."""
    return key.removeprefix("text_model.")


def unet_to_compvis(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers UNet state dict under CompVis names (``model.diffusion_model.*``)."""
    keys = set(state_dict)
    resnets = len(_indices(keys, r"down_blocks\.0\.resnets\.(\d+)\."))
    with_attention = _indices(keys, r"up_blocks\.(\d+)\.attentions\.")
    return {UNET_PREFIX + unet_key(k, resnets, with_attention): v for k, v in state_dict.items()}


def vae_to_compvis(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers ``AutoencoderKL`` state dict under CompVis names (``first_stage_model.*``)."""
    levels = len(_indices(set(state_dict), r"encoder\.down_blocks\.(\d+)\."))
    converted = {}
    for key, value in state_dict.items():
        name = vae_key(key, levels)
        module, _, leaf = name.rpartition(".")
        if ".mid.attn_1." in name and module.rpartition(".")[2] in _VAE_CONV_PROJECTIONS and leaf == "weight":
            value = value.reshape(*value.shape, 1, 1) if value.ndim == 2 else value
        converted[VAE_PREFIX + name] = value
    return converted


def text_encoder_to_compvis(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A transformers ``CLIPTextModel`` state dict under CompVis names."""
    return {TEXT_PREFIX + text_encoder_key(k): v for k, v in state_dict.items()}


def open_clip_text_encoder_to_compvis(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An SD 2.x diffusers ``text_encoder`` (transformers ``CLIPTextModel``) under open_clip's
    names (``cond_stage_model.model.*``), as :class:`FrozenOpenCLIPEmbedder` holds them.

    The query, key and value projections of a layer become one ``attn.in_proj_weight`` /
    ``in_proj_bias`` (rows q, k, v, as ``nn.MultiheadAttention`` stacks them); a layer that
    lacks one of the three keeps the ones it has under their own names, so that the key check
    reports the missing ``in_proj`` key. What diffusers dropped (the last layer,
    ``text_projection``, ``logit_scale``) is not invented here.
    """
    converted: dict[str, Tensor] = {}
    projections: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        name = key.removeprefix("text_model.")
        if name in _OPEN_CLIP_TOP:
            name = _OPEN_CLIP_TOP[name]
        elif match := _CLIP_LAYER.match(name):
            layer, rest = int(match.group(1)), match.group(2)
            if qkv := _CLIP_QKV.match(rest):
                projections.setdefault((layer, qkv.group(2)), {})[qkv.group(1)] = value
                continue
            name = f"transformer.resblocks.{layer}.{_rename_layer(rest, _OPEN_CLIP_LAYER)}"
        converted[OPEN_CLIP_TEXT_PREFIX + name] = value
    for (layer, leaf), parts in sorted(projections.items()):
        block = f"{OPEN_CLIP_TEXT_PREFIX}transformer.resblocks.{layer}.attn."
        if set(parts) == {"q", "k", "v"}:
            converted[f"{block}in_proj_{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
        else:
            converted.update({f"{block}{p}_proj.{leaf}": v for p, v in parts.items()})
    return converted
