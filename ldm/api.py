"""The Python API: load a trained ViCo model, sample it with reference photos, export it.

::

    from ldm import api

    vico = api.load("logs/<run>/checkpoints/last.ckpt")   # an adapter or the authors' pair too
    images = api.sample(vico, "a photo of * on the beach", ["data/my_toy/00.jpg"], n_samples=4)
    images[0].save("beach.png")
    api.export(vico, "exports", formats=("adapter", "textual_inversion"))   # adapter-N, <run name>-N

:func:`sample` samples exactly as ``sample.py`` does (through
:func:`ldm.models.diffusion.sampling.sample_seeded`): image ``k`` draws its noise from seed
``seed + k``, the references are squashed to the sampling size and encoded as a VAE posterior
sample drawn from ``seed`` (the authors' way; ``ref_resize="crop"`` and ``ref_latent="mode"``
are the alternatives), so ``api.sample(vico, ..., seed=s)`` returns the images of the first
iteration of ``sample.py --seed s`` with the same settings.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from PIL import Image

from ldm.data.images import to_tensor
from ldm.models.diffusion.latent import LatentDiffusionModel
from ldm.models.diffusion.samplers import make_sampler
from ldm.models.diffusion.sampling import REFERENCE_LATENTS, load_reference_images, references_for_prompt, sample_seeded
from ldm.models.export import export_trained, run_name
from ldm.models.loading import (
    API_ARGUMENTS,
    autoencoder_factor,
    build_vico_model,
    default_image_size,
    missing_config_hint,
    read_vico_weights,
    resolve_config,
)

PathLike = str | os.PathLike[str]

__all__ = ["ViCo", "export", "load", "sample"]


@dataclass
class ViCo:
    """A trained ViCo model, ready to sample, with the config it was built from, the steps it
    trained (when its file records them) and the name of its run (when it sits in one)."""

    model: LatentDiffusionModel
    config: DictConfig
    source: str
    step: int | None = None
    run_name: str | None = None


def load(
    ckpt: PathLike | Sequence[PathLike],
    base_ckpt: PathLike | None = None,
    config: PathLike | None = None,
    device: str | torch.device | None = None,
) -> ViCo:
    """Build a trained model from any ViCo format (as :func:`ldm.models.loading.load_vico_model`;
    errors name this function's arguments).

    Args:
        ckpt: a training checkpoint, an adapter export, or the authors' pair (one file or both).
        base_ckpt: the SD v1 base (a file or a diffusers folder), overriding the one recorded
            with the weights.
        config: a model config overriding the one stored with the weights.
        device: default CUDA when available, else the CPU.

    Raises:
        CheckpointError, ValueError: one-line messages naming the file at fault.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    weights = read_vico_weights(ckpt)
    resolved = resolve_config(weights, config)
    hint = missing_config_hint(weights, config, API_ARGUMENTS)
    model = build_vico_model(weights, resolved, base_ckpt, device, API_ARGUMENTS, hint)
    paths = [ckpt] if isinstance(ckpt, (str, os.PathLike)) else list(ckpt)
    return ViCo(model, resolved, " + ".join(str(p) for p in paths), weights.step, run_name(weights.folder.parent))


def sample(
    vico: ViCo,
    prompt: str,
    references: Sequence[PathLike] | Mapping[str, PathLike],
    n_samples: int = 1,
    negative_prompt: str = "",
    steps: int = 50,
    scale: float = 7.5,
    sampler: str = "ddim",
    eta: float | None = None,
    spacing: str = "uniform",
    seed: int = 42,
    size: int | tuple[int, int] | None = None,
    ref_resize: str = "squash",
    ref_latent: str = "sample",
) -> list[Image.Image]:
    """Sample ``n_samples`` images of ``prompt`` (``*`` is the learned concept).

    Args:
        references: reference photo files; several are concatenated as reference tokens. Several
            concepts (multi-object composition): ``{placeholder: photo}``; the prompt uses the
            photos of the placeholders it names, each masked by its own placeholder's map.
        sampler: ``ddim``, ``plms``, ``dpmpp_2m`` or ``euler_a``; ``spacing`` (``uniform`` or
            ``karras``) sets the noise levels of the last two; ``eta`` as ``sample.py --ddim_eta``.
        seed: image ``k`` uses ``seed + k``; the reference posterior sample uses ``seed``.
        size: pixel side or ``(height, width)``; default the size the model was trained at.
        ref_resize, ref_latent: see ``sample.py --ref_resize/--ref_latent``.

    Returns:
        PIL images (RGB, 8 bit).
    """
    if ref_latent not in REFERENCE_LATENTS:
        raise ValueError(f"ref_latent must be one of {REFERENCE_LATENTS}, got '{ref_latent}'")
    height, width = _image_size(vico.config, size)
    factor = autoencoder_factor(vico.config)
    model = vico.model
    placeholders = None
    if isinstance(references, Mapping):
        keys, photos = list(references), list(references.values())
        used, placeholders = references_for_prompt(model.embedding_manager, model.tokenize([prompt])[0], keys)
        references = [photos[i] for i in used]
    images = to_tensor(load_reference_images(references, (height, width), ref_resize))
    decoded, _ = sample_seeded(
        model,
        make_sampler(sampler, model, spacing),
        prompt,
        images,
        seeds=[seed + k for k in range(n_samples)],
        reference_seed=seed if ref_latent == "sample" else None,
        latent_shape=(model.channels, height // factor, width // factor),
        steps=steps,
        scale=scale,
        eta=eta,
        negative_prompt=negative_prompt,
        reference_placeholders=placeholders,
    )
    pixels = ((decoded.float() + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(image) for image in pixels]


def _image_size(config: DictConfig, size: int | tuple[int, int] | None) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else size or (default_image_size(config),) * 2
    factor = autoencoder_factor(config)
    if height <= 0 or width <= 0 or height % factor or width % factor:
        raise ValueError(f"size {height}x{width} is not a positive multiple of the autoencoder factor {factor}")
    return height, width


def export(
    vico: ViCo, folder: PathLike, formats: Sequence[str] = ("adapter",), step: int | None = None, name: str | None = None
) -> list[Path]:
    """Write the trained weights into ``folder`` (see :func:`ldm.models.export.export_trained`).

    Args:
        formats: any of ``adapter`` (this project's ``adapter-N.safetensors``), ``authors``
            (their ``cross_attention-N.pt`` / ``embeddings_gs-N.pt``), ``textual_inversion``
            and ``diffusers`` (S* alone, for other tools), ``dreambooth`` (the whole model)
            and ``custom_diffusion`` (diffusers' folder), as far as the model has them
            (:func:`ldm.models.export.available_formats`).
        step: the training step ``N`` in the file names; default: the steps ``vico`` trained, as
            its file records them.
        name: the Textual Inversion file's name (its trigger word in AUTOMATIC1111's web UI);
            default: the run's name (:func:`ldm.models.export.embedding_name`).

    Returns:
        The files written.
    """
    step = vico.step if step is None else step
    if step is None:
        raise ValueError(f"{vico.source} does not record its training step; pass step= to api.export")
    return export_trained(vico.model, vico.config, folder, step, formats, name or vico.run_name)
