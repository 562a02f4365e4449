"""What the samplers share: the DDIM schedule, the guided model call with ViCo's shared
reference stream, and the sampling loop (DDIM and PLMS here and in ``ddim.py``/``plms.py``;
DPM-Solver++(2M) and Euler ancestral in ``ksamplers.py``).

The reference stream (the clean reference latents going through the frozen UNet beside the
noisy samples) does not depend on the noisy samples, only on the references, the text
context and the timestep. Every sample of a sampling batch shares the prompt and the
references, so each step runs the reference stream once per *branch* (one group without
classifier-free guidance, two with it: unconditional first, then conditional) instead of
once per sample; see :class:`ldm.modules.vico.ReferenceCondition` for groups.
"""
from __future__ import annotations

import logging
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from ldm.data.images import load_image
from ldm.models.diffusion.parameterization import to_eps
from ldm.modules.vico import AttentionRecord, ReferenceCondition

logger = logging.getLogger(__name__)

#: One generator for a batch, or one per sample.
Generator = torch.Generator | Sequence[torch.Generator] | None
PathLike = str | os.PathLike[str]


@dataclass
class SamplingReference:
    """The reference images and the prompt shared by every sample of a sampling batch.

    Attributes:
        latents: clean, scaled latents of the K reference images, ``[K, C, h, w]``; several
            references are concatenated as reference tokens (paper, Appendix C).
        tokens: the prompt's token ids, ``[77]``; the placeholder (or, without one, the
            end-of-text token) selects the attention map that gives the Otsu mask.
        placeholders: per reference, the placeholder string whose attention map masks it
            (multi-object composition: each concept's reference is masked by its own
            placeholder's map); ``None`` (for all, or for one reference) takes the prompt's first
            placeholder.
        object_masks: optional ``[K, H, W]`` object masks of the references: the image
            attention is masked by them instead of by the Otsu masks (``true-mask`` analysis,
            paper Fig. 9; :class:`ldm.modules.vico.ReferenceCondition`).
    """

    latents: Tensor
    tokens: Tensor
    placeholders: Sequence[str | None] | None = None
    object_masks: Tensor | None = None

    def __post_init__(self) -> None:
        if self.latents.ndim != 4:
            raise ValueError(f"reference latents must be [K, C, h, w], got shape {list(self.latents.shape)}")
        self.tokens = self.tokens.reshape(-1)
        if self.placeholders is not None and len(self.placeholders) != self.num_references:
            raise ValueError(f"{len(self.placeholders)} placeholders for {self.num_references} references")
        if self.object_masks is not None and (self.object_masks.ndim != 3 or len(self.object_masks) != self.num_references):
            raise ValueError(f"object masks must be [K, H, W] for {self.num_references} references, got {list(self.object_masks.shape)}")

    @property
    def num_references(self) -> int:
        return self.latents.shape[0]


#: How a reference photo is brought to the sampling size, and with which resampling.
REFERENCE_RESIZE = {"squash": "bilinear", "crop": "bicubic"}
#: How a reference image becomes a latent: a draw from the VAE posterior (the authors' code)
#: or its mode (deterministic).
REFERENCE_LATENTS = ("sample", "mode")


@torch.no_grad()
def encode_references(
    model, images: Tensor, posterior: str = "mode", generator: torch.Generator | None = None
) -> Tensor:
    """Scaled latents of reference images ``[K, 3, H, W]`` in [-1, 1].

    Args:
        posterior: ``"sample"`` draws from the VAE posterior with ``generator``, as the
            authors' sampling script does (re-drawn for each batch); ``"mode"`` takes its
            mean, so that the references are fixed by the images alone.
    """
    if posterior not in REFERENCE_LATENTS:
        raise ValueError(f"posterior must be one of {REFERENCE_LATENTS}, got '{posterior}'")
    images = images.to(device=model.device, dtype=next(model.first_stage_model.parameters()).dtype)
    distribution = model.encode_first_stage(images)
    latents = distribution.sample(generator) if posterior == "sample" else distribution.mode()
    return model.scale_factor * latents


def make_sampling_reference(
    model, images: Tensor, prompt: str, placeholders: Sequence[str | None] | None = None
) -> SamplingReference:
    """Encode reference images ``[K, 3, H, W]`` (in [-1, 1], posterior mode) and tokenize ``prompt``."""
    return SamplingReference(encode_references(model, images), model.tokenize([prompt])[0], placeholders)


def references_for_prompt(
    embedding_manager, tokens: Tensor, placeholders: Sequence[str | None]
) -> tuple[list[int], list[str | None] | None]:
    """Which references a prompt uses, and the placeholder whose map masks each.

    ``placeholders`` holds, per reference, the placeholder it was given for (``--ref @=photo``)
    or ``None`` (a plain ``--ref photo``). Plain references are all used, masked by the prompt's
    placeholder (the single-concept behaviour; a prompt naming several placeholders then needs
    one reference per placeholder). Given per placeholder, the prompt uses the references of
    the placeholders it names, in the given order, each masked by its own placeholder's map;
    a named placeholder without a reference is an error. A prompt naming no placeholder uses
    every reference (masked by the end-of-text map, with the usual warning).

    Returns:
        The indices of the references to use and their placeholders (``None`` for plain ones).

    Raises:
        ValueError: one line saying which placeholder lacks a reference, or that the references
            are mixed (some given per placeholder, some not).
    """
    named = embedding_manager.placeholders_in(tokens)
    keyed = [p for p in placeholders if p is not None]
    if not keyed:
        if len(named) > 1:
            raise ValueError(
                f"it names {len(named)} placeholders ({', '.join(named)}): give each its reference "
                f"with --ref <placeholder>=<photo>, e.g. --ref {named[0]}=a.png --ref {named[1]}=b.png"
            )
        return list(range(len(placeholders))), None
    if len(keyed) != len(placeholders):
        raise ValueError("give every reference with its placeholder (--ref <placeholder>=<photo>), or none")
    missing = [p for p in named if p not in keyed]
    if missing:
        raise ValueError(f"it names '{missing[0]}' but no reference is given for it (--ref '{missing[0]}=<photo>')")
    if not named:
        return list(range(len(placeholders))), None
    indices = [i for i, p in enumerate(placeholders) if p in named]
    return indices, [placeholders[i] for i in indices]


@torch.no_grad()
def sample_prompt(
    model,
    sampler: ScheduledSampler,
    prompt: str,
    reference_latents: Tensor | None,
    n_samples: int,
    latent_shape: tuple[int, int, int],
    steps: int,
    scale: float,
    generator: Generator,
    eta: float | None = None,
    record_attention: Collection[int] = (),
    verbose: bool = False,
    negative_prompt: str = "",
    reference_placeholders: Sequence[str | None] | None = None,
    reference_object_masks: Tensor | None = None,
) -> tuple[Tensor, dict]:
    """Sample ``n_samples`` images of one prompt with shared references.

    Args:
        reference_latents: ``[K, C, h, w]``; ``None`` samples without a reference stream (the
            plain text-to-image model, e.g. a base model without image attention).
        generator: one generator for the whole batch, or one per sample (then sample ``k``
            depends only on ``generator[k]``: it can be regenerated alone).
        negative_prompt: the text of the unconditional branch of classifier-free guidance
            (empty: plain guidance), which the guided prediction moves away from.
        reference_placeholders: per reference, the placeholder whose map masks it
            (:class:`SamplingReference`); ``None``: the prompt's placeholder for all.
        reference_object_masks: ``[K, H, W]`` object masks that replace the Otsu masks
            (:class:`SamplingReference`); ``None``: the Otsu masks, as the method does.

    Returns:
        The decoded images ``[n_samples, 3, H, W]``, clamped to the image range [-1, 1], and
        the sampler's intermediates (attention records of ``record_attention`` steps included).
    """
    tokens = model.tokenize([prompt])
    latents, intermediates = sampler.sample(
        S=steps,
        batch_size=n_samples,
        shape=latent_shape,
        conditioning=model.get_learned_conditioning(tokens),
        reference=None
        if reference_latents is None
        else SamplingReference(reference_latents, tokens[0], reference_placeholders, reference_object_masks),
        unconditional_guidance_scale=scale,
        unconditional_conditioning=model.get_learned_conditioning([negative_prompt]) if scale != 1.0 else None,
        eta=eta,
        generator=generator,
        verbose=verbose,
        record_attention=record_attention,
    )
    return model.decode_first_stage(latents).clamp(-1.0, 1.0), intermediates


@torch.no_grad()
def sample_seeded(
    model,
    sampler: ScheduledSampler,
    prompt: str,
    reference_images: Tensor,
    seeds: Sequence[int],
    reference_seed: int | None,
    latent_shape: tuple[int, int, int],
    steps: int,
    scale: float,
    eta: float | None = None,
    negative_prompt: str = "",
    record_attention: Collection[int] = (),
    verbose: bool = False,
    reference_placeholders: Sequence[str | None] | None = None,
) -> tuple[Tensor, dict]:
    """Sample one image per seed, each from its own CPU generator, with shared references.

    The references ``[K, 3, H, W]`` (in [-1, 1]) are encoded as a VAE posterior sample drawn
    from ``reference_seed`` (the authors' sampling), or as the posterior mode when it is
    ``None``. Image ``k`` depends only on ``seeds[k]``, the reference seed and the settings:
    it can be made again alone. ``sample.py`` and :mod:`ldm.api` sample through here.
    """
    if reference_seed is None:
        reference_latents = encode_references(model, reference_images)
    else:
        generator = torch.Generator().manual_seed(reference_seed)
        reference_latents = encode_references(model, reference_images, "sample", generator)
    return sample_prompt(
        model,
        sampler,
        prompt,
        reference_latents,
        n_samples=len(seeds),
        latent_shape=latent_shape,
        steps=steps,
        scale=scale,
        generator=[torch.Generator().manual_seed(seed) for seed in seeds],
        eta=eta,
        record_attention=record_attention,
        verbose=verbose,
        negative_prompt=negative_prompt,
        reference_placeholders=reference_placeholders,
    )


def load_reference_images(paths: Sequence[PathLike], size: tuple[int, int], resize: str = "squash") -> np.ndarray:
    """Reference photos as ``uint8 [K, H, W, 3]`` at the sampling size.

    Args:
        resize: ``"squash"`` resizes the whole photo with bilinear resampling (the authors'
            sampling script); ``"crop"`` keeps the aspect ratio by cropping the centre, with
            bicubic resampling (as the training photos' crop).

    Raises:
        ImageError: a photo is missing or does not decode.
    """
    if resize not in REFERENCE_RESIZE:
        raise ValueError(f"resize must be one of {tuple(REFERENCE_RESIZE)}, got '{resize}'")
    return np.stack([load_image(path, size, REFERENCE_RESIZE[resize], resize_mode=resize) for path in paths])


def make_ddim_timesteps(num_steps: int, num_train_timesteps: int) -> np.ndarray:
    """CompVis's uniform DDIM timesteps: ``arange(0, T, T // num_steps) + 1``.

    As in CompVis the count is ``ceil(T / (T // num_steps))``, which can exceed
    ``num_steps`` (7 asks for 8 steps with T = 1000). Step counts whose last timestep
    would be ``T`` (out of the schedule; e.g. 3 or 1000) are refused.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"the number of sampling steps must be in 1..{num_train_timesteps}, got {num_steps}")
    steps = _uniform_timesteps(num_steps, num_train_timesteps)
    if steps[-1] >= num_train_timesteps:
        below, above = (_nearest_fitting(num_steps, num_train_timesteps, direction) for direction in (-1, 1))
        nearest = " or ".join(str(n) for n in (below, above) if n is not None)
        raise ValueError(
            f"{num_steps} sampling steps do not fit CompVis's uniform schedule (its last timestep "
            f"would be {steps[-1]}, beyond {num_train_timesteps - 1}); the nearest that fit: {nearest}"
        )
    return steps


def _uniform_timesteps(num_steps: int, num_train_timesteps: int) -> np.ndarray:
    return np.arange(0, num_train_timesteps, num_train_timesteps // num_steps) + 1


def _nearest_fitting(num_steps: int, num_train_timesteps: int, direction: int) -> int | None:
    """The closest step count below (``direction`` -1) or above (+1) ``num_steps`` whose uniform
    schedule stays inside the ``num_train_timesteps`` of the model, if any."""
    candidate = num_steps + direction
    while 1 <= candidate < num_train_timesteps:
        if _uniform_timesteps(candidate, num_train_timesteps)[-1] < num_train_timesteps:
            return candidate
        candidate += direction
    return None


@dataclass
class DDIMSchedule:
    """Per-step scalars of DDIM (CompVis ``make_ddim_sampling_parameters``), on the device.

    Index ``i`` is a DDIM step in increasing time: ``timesteps[i]`` with ``alphas[i]`` the
    cumulative alpha there and ``alphas_prev[i]`` the one of the step below (``alphas_cumprod[0]``
    for the first). Sampling runs from the last index down to 0. All tensors are precomputed
    once, so a step costs no host-device synchronisation.
    """

    timesteps: Tensor
    alphas: Tensor
    alphas_prev: Tensor
    sigmas: Tensor
    sqrt_one_minus_alphas: Tensor
    eta: float

    @classmethod
    def from_model(cls, model, num_steps: int, eta: float, device: torch.device) -> DDIMSchedule:
        alphas_cumprod = model.alphas_cumprod.detach().cpu().double().numpy()
        steps = make_ddim_timesteps(num_steps, len(alphas_cumprod))
        alphas = alphas_cumprod[steps]
        alphas_prev = np.concatenate([alphas_cumprod[:1], alphas_cumprod[steps[:-1]]])
        sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))

        def to_device(values: np.ndarray) -> Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        return cls(
            timesteps=torch.tensor(steps, dtype=torch.long, device=device),
            alphas=to_device(alphas),
            alphas_prev=to_device(alphas_prev),
            sigmas=to_device(sigmas),
            sqrt_one_minus_alphas=to_device(np.sqrt(1 - alphas)),
            eta=float(eta),
        )

    def __len__(self) -> int:
        return self.timesteps.shape[0]

    def step_timestep(self, step: int) -> float:
        """The timestep of sampling step ``step`` (0 = the first, noisiest)."""
        return float(self.timesteps[len(self) - 1 - step])

    def step(self, x: Tensor, eps: Tensor, index: int, generator: Generator = None) -> tuple[Tensor, Tensor]:
        """One DDIM update from step ``index`` to the one below; returns ``(x_prev, pred_x0)``."""
        a_t, a_prev, sigma = self.alphas[index], self.alphas_prev[index], self.sigmas[index]
        pred_x0 = (x - self.sqrt_one_minus_alphas[index] * eps) / a_t.sqrt()
        x_prev = a_prev.sqrt() * pred_x0 + (1.0 - a_prev - sigma**2).sqrt() * eps
        if self.eta > 0:
            x_prev = x_prev + sigma * randn(x.shape, generator, x.device, x.dtype)
        return x_prev, pred_x0


def randn(shape: tuple[int, ...], generator: Generator, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Gaussian noise drawn on the generator's device, then moved: a CPU generator gives the
    same numbers whatever device the samples live on.

    ``generator`` may be a sequence of one generator per row (``shape[0]`` of them): row ``k``
    is then drawn from ``generator[k]`` alone, so it does not depend on the other rows.
    """
    if isinstance(generator, Sequence):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([randn(tuple(shape[1:]), g, device, dtype) for g in generator])
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source, dtype=dtype).to(device)


def _batch_rows(context: Tensor, batch_size: int, name: str) -> Tensor:
    if context.shape[0] == 1:
        return context.expand(batch_size, *context.shape[1:])
    if context.shape[0] != batch_size:
        raise ValueError(f"{name} has {context.shape[0]} rows; expected 1 or the batch size {batch_size}")
    return context


def alpha_at(alphas_cumprod: Tensor, t: Tensor) -> Tensor:
    """The cumulative alpha at timestep ``t`` (0-dim): ``alphas_cumprod[t]`` for an integer ``t``;
    for a fractional one, ``1 / (1 + sigma^2)`` with log sigma interpolated linearly between the
    neighbouring training timesteps, which is how the sigma samplers
    (:class:`ldm.models.diffusion.ksamplers.SigmaSchedule`) relate their noise levels to
    timesteps. Computed on the device, without host synchronisation.
    """
    if not t.is_floating_point():
        return alphas_cumprod[t]
    log_sigmas = 0.5 * ((1 - alphas_cumprod) / alphas_cumprod).log()
    low = t.floor().long().clamp(0, alphas_cumprod.shape[0] - 2)
    log_sigma = torch.lerp(log_sigmas[low], log_sigmas[low + 1], (t - low).to(log_sigmas.dtype))
    return torch.sigmoid(-2 * log_sigma)  # 1 / (1 + exp(2 log sigma))


class GuidedDenoiser:
    """The model call of one sampling step: classifier-free guidance plus the shared reference.

    Without guidance (``unconditional_conditioning`` is ``None`` or the scale is 1) the UNet
    sees the batch once with ``conditioning``. With it, it sees ``cat([x, x])`` with
    ``cat([uc, c])`` and the result is ``e_u + scale * (e_c - e_u)``. With a reference, one
    :class:`ReferenceCondition` serves the whole batch: one group of K reference rows per
    branch, whose context is the branch's (prompt or unconditional) row; as in the authors'
    code the unconditional branch sees the reference too, and in both branches the mask comes
    from the map of the prompt's placeholder.

    Every row of ``conditioning`` must encode the prompt of ``reference.tokens`` (a single row
    is broadcast to the batch); the reference stream uses the first row.
    """

    def __init__(
        self,
        model,
        conditioning: Tensor,
        batch_size: int,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Tensor | None = None,
        reference: SamplingReference | None = None,
    ):
        self.model = model
        self.scale = float(unconditional_guidance_scale)
        if not math.isfinite(self.scale):
            raise ValueError(f"the guidance scale must be a finite number, got {unconditional_guidance_scale}")
        self.guided = unconditional_conditioning is not None and self.scale != 1.0
        cond = _batch_rows(conditioning, batch_size, "conditioning")
        branches = [cond]
        if self.guided:
            branches.insert(0, _batch_rows(unconditional_conditioning, batch_size, "unconditional_conditioning"))
        self.context = torch.cat(branches)
        self.references_per_group = 0
        if reference is not None:
            self._prepare_reference(reference, [branch[:1] for branch in branches])

    def _prepare_reference(self, reference: SamplingReference, branch_rows: list[Tensor]) -> None:
        k = reference.num_references
        device = self.context.device
        tokens = reference.tokens.view(1, -1)  # positions found where the tokens are; host tokens also serve a meta model
        placeholders = list(reference.placeholders) if reference.placeholders is not None else [None] * k
        manager = self.model.embedding_manager
        positions = {name: manager.placeholder_positions(tokens, name) for name in dict.fromkeys(placeholders)}
        for name, (_, _, found) in positions.items():
            if not bool(found.item()):
                logger.warning(
                    "the prompt has no placeholder token: the reference mask falls back to the end-of-text "
                    "attention map"
                    if name is None
                    else f"the prompt does not name '{name}': its reference's mask falls back to the end-of-text map"
                )
        # each reference row is masked by its own placeholder's map (one concept: all the same)
        placeholder_index = torch.cat([positions[name][0] for name in placeholders]).to(device)
        eot_index = positions[placeholders[0]][1].to(device)
        rows = k * len(branch_rows)
        self.references_per_group = k
        self.reference_latent = reference.latents.to(device).repeat(len(branch_rows), 1, 1, 1)
        self.reference_context = torch.cat([row.expand(k, *row.shape[1:]) for row in branch_rows])
        self.placeholder_index = placeholder_index.repeat(len(branch_rows))
        self.eot_index = eot_index.repeat(rows)
        masks = reference.object_masks
        self.object_mask = None if masks is None else masks.to(device).repeat(len(branch_rows), 1, 1)

    def reference_condition(self, t: Tensor, record_attention: bool = False) -> ReferenceCondition | None:
        """The shared reference condition of a step at timestep ``t`` (0-dim tensor)."""
        if not self.references_per_group:
            return None
        return ReferenceCondition(
            latent=self.reference_latent,
            context=self.reference_context,
            placeholder_index=self.placeholder_index,
            eot_index=self.eot_index,
            timesteps=t.expand(self.reference_latent.shape[0]),
            references_per_group=self.references_per_group,
            record_attention=record_attention,
            object_mask=self.object_mask,
        )

    def model_output(self, x: Tensor, t: Tensor, records: list[AttentionRecord] | None = None) -> Tensor:
        """The raw UNet output for every branch, ``[branches * B, ...]`` (unconditional first).

        Args:
            x: noisy latents ``[B, C, h, w]``.
            t: the step's timestep, a 0-dim tensor.
            records: when given, the conditional branch's attention records are appended
                (one row per reference).
        """
        branches = 2 if self.guided else 1
        x_in = torch.cat([x] * branches)
        reference = self.reference_condition(t, record_attention=records is not None)
        output = self.model.apply_model(x_in, t.expand(x_in.shape[0]), self.context, reference)
        if records is not None and reference is not None:
            k = self.references_per_group
            records.extend(
                AttentionRecord(r.layer, r.placeholder_map[-k:], r.mask[-k:], r.height, r.width)
                for r in reference.attention_records
            )
        return output

    def __call__(self, x: Tensor, t: Tensor, records: list[AttentionRecord] | None = None) -> Tensor:
        """The (guided) noise prediction for ``x`` at timestep ``t``.

        A v-prediction model's guided output is converted to noise at the noise level of ``t``
        (:func:`alpha_at`: ``alphas_cumprod[t]``, or for the fractional timesteps of the sigma
        samplers the level they sample at).
        """
        output = self.model_output(x, t, records)
        if self.guided:
            out_uncond, out_cond = output.chunk(2)
            output = out_uncond + self.scale * (out_cond - out_uncond)
        parameterization = getattr(self.model, "parameterization", "eps")
        if parameterization == "eps":
            return output
        return to_eps(parameterization, x, output, alpha_at(self.model.alphas_cumprod, t))


@dataclass
class SamplingRun:
    """State of one :meth:`ScheduledSampler.sample` call, passed to each update.

    ``previous_eps`` and ``history`` keep what multistep samplers reuse from earlier steps.
    """

    schedule: Any
    denoiser: GuidedDenoiser
    generator: Generator
    eta: float = 0.0
    previous_eps: list[Tensor] = field(default_factory=list)
    history: list[Tensor] = field(default_factory=list)


class ScheduledSampler(ABC):
    """Base of the samplers: argument checks, initial noise and the loop.

    Subclasses implement :meth:`update`, one step from schedule index ``index`` down, and may
    replace :meth:`make_schedule` (the sigma samplers of :mod:`ldm.models.diffusion.ksamplers`).
    """

    name = "sampler"
    #: The ``eta`` of a :meth:`sample` call that passes none.
    default_eta = 0.0

    def __init__(self, model):
        self.model = model

    def check_eta(self, eta: float) -> None:
        if not eta >= 0 or eta == float("inf"):
            raise ValueError(f"eta must be a finite number >= 0, got {eta}")

    def make_schedule(self, steps: int, eta: float, device: torch.device) -> Any:
        """The step sequence of a call (a :class:`DDIMSchedule` unless a sampler needs another)."""
        return DDIMSchedule.from_model(self.model, steps, eta, device)

    @abstractmethod
    def update(
        self, x: Tensor, index: int, run: SamplingRun, records: list[AttentionRecord] | None
    ) -> tuple[Tensor, Tensor]:
        """One step from DDIM index ``index`` down; returns ``(x_prev, pred_x0)``."""

    @torch.no_grad()
    def sample(
        self,
        S: int,
        batch_size: int,
        shape: tuple[int, int, int],
        conditioning: Tensor,
        reference: SamplingReference | None = None,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Tensor | None = None,
        eta: float | None = None,
        x_T: Tensor | None = None,
        generator: Generator = None,
        verbose: bool = True,
        callback: Callable[[int], None] | None = None,
        record_attention: Collection[int] = (),
        log_every_t: int = 100,
    ) -> tuple[Tensor, dict]:
        """Sample ``batch_size`` latents of ``shape`` = ``(C, h, w)`` (CompVis call).

        Args:
            S: number of steps (DDIM and PLMS: the uniform CompVis schedule, see
                :func:`make_ddim_timesteps`).
            conditioning: text context, 1 or ``batch_size`` rows of the same prompt.
            reference: the shared reference images and prompt tokens; ``None`` samples plain SD.
            unconditional_guidance_scale, unconditional_conditioning: classifier-free guidance.
            eta: stochasticity (DDIM: 0 = deterministic DDIM; Euler ancestral: 1 = ancestral);
                ``None`` takes the sampler's :attr:`default_eta`.
            x_T: starting noise; drawn from ``generator`` otherwise.
            generator: source of every random number of the call (initial and step noise);
                a sequence of one generator per sample makes each sample independent of
                the others.
            verbose: show a tqdm progress bar.
            callback: called with the step number after every step.
            record_attention: step numbers (0 = the first, noisiest step) whose attention
                records are collected in ``intermediates["attention"][step]``.
            log_every_t: keep ``x`` and ``pred_x0`` every that many steps (and at the last).

        Returns:
            ``(samples, intermediates)`` with ``intermediates`` holding ``x_inter``,
            ``pred_x0`` and ``attention``.
        """
        eta = self.default_eta if eta is None else float(eta)
        self.check_eta(eta)
        device = self.model.device
        schedule = self.make_schedule(S, eta, device)
        total = len(schedule)
        record_steps = set(record_attention)
        outside = sorted(i for i in record_steps if not 0 <= i < total)
        if outside:
            raise ValueError(f"record_attention steps {outside} are outside 0..{total - 1}")
        size = (batch_size, *shape)
        if x_T is None:
            x = randn(size, generator, device, torch.float32)
        elif tuple(x_T.shape) != size:
            raise ValueError(f"x_T has shape {list(x_T.shape)}, expected {list(size)}")
        else:
            x = x_T.to(device)
        denoiser = GuidedDenoiser(
            self.model, conditioning, batch_size, unconditional_guidance_scale, unconditional_conditioning, reference
        )
        run = SamplingRun(schedule, denoiser, generator, eta)
        intermediates: dict = {"x_inter": [x], "pred_x0": [x], "attention": {}}
        logger.debug("%s: %d steps", self.name, total)
        for i in tqdm(range(total), desc=self.name, total=total, disable=not verbose):
            records: list[AttentionRecord] | None = [] if i in record_steps else None
            x, pred_x0 = self.update(x, total - 1 - i, run, records)
            if records is not None:
                intermediates["attention"][i] = records
            if i % log_every_t == 0 or i == total - 1:
                intermediates["x_inter"].append(x)
                intermediates["pred_x0"].append(pred_x0)
            if callback is not None:
                callback(i)
        return x, intermediates
