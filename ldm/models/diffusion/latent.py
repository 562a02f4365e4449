"""The latent diffusion model itself: Stable Diffusion plus ViCo's trainable S* and image
attention, as a plain ``nn.Module`` (no Lightning: sampling, evaluation and exports import
this, and start in a fraction of the time).

What trains is a setting of the model, so that one class holds ViCo and the paper's Table 2
baselines: S* and the image attention (ViCo; Textual Inversion without image-attention layers),
the whole UNet (DreamBooth, optionally with the text encoder), or the key and value projections
of the UNet's text cross-attention with S* (Custom Diffusion). DreamBooth and Custom Diffusion
add a prior-preservation loss on class images (:mod:`ldm.data.class_images`).

State-dict layout is CompVis's (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.*``, the schedule buffers, ``embedding_manager.*``) so SD checkpoints and
the authors' adapters load by name. Training adds the Lightning hooks on top:
:class:`ldm.models.diffusion.ddpm.LatentDiffusion`, the class configs name.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.diffusion.parameterization import PARAMETERIZATIONS, v_target
from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule
from ldm.modules.vico import ReferenceCondition
from ldm.models.base_checkpoint import is_base_key, load_base_checkpoint
from ldm.util import CheckpointError, check_state_dict, instantiate_from_config


#: The class that samples for the class a config names for training: same constructor, same
#: weights under the same keys, no Lightning (see :func:`ldm.models.loading.build_vico_model`).
SAMPLING_CLASSES = {"ldm.models.diffusion.ddpm.LatentDiffusion": "ldm.models.diffusion.latent.LatentDiffusionModel"}

#: Which UNet weights train: none (ViCo, Textual Inversion), all of them (DreamBooth), or the key
#: and value projections of every text cross-attention (Custom Diffusion's ``crossattn_kv``).
UnetTrainable = Literal["none", "all", "cross_attention_kv"]
UNET_TRAINABLE = ("none", "all", "cross_attention_kv")
#: The names, within a SpatialTransformer's text transformer blocks, of Custom Diffusion's weights.
CROSS_ATTENTION_KV = ("attn2.to_k.weight", "attn2.to_v.weight")

#: torch.compile arguments ``compile_unet`` accepts. Not ``options``: inductor's options name
#: executables (``cpp.cxx``), and a config stored in a shared weight file must not run code.
COMPILE_OPTIONS = frozenset({"fullgraph", "dynamic", "backend", "mode", "disable"})


class DiffusionWrapper(nn.Module):
    """Holds the UNet under the name ``diffusion_model``, as CompVis checkpoints expect."""

    def __init__(self, diff_model_config: Mapping[str, Any]):
        super().__init__()
        self.diffusion_model = instantiate_from_config(diff_model_config)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        reference: ReferenceCondition | None = None,
    ) -> torch.Tensor:
        return self.diffusion_model(x, t, context=context, reference=reference)


class LatentDiffusionModel(nn.Module):
    """Stable Diffusion v1 with ViCo (paper Sec. 3) or a baseline of Table 2, without the training loop.

    Args:
        unet_config, first_stage_config, cond_stage_config: ``target``/``params`` configs of
            the UNet, the KL autoencoder and the frozen text encoder.
        personalization_config: config of the :class:`EmbeddingManager` (S*); the text
            encoder is passed to it as ``embedder``.
        timesteps, beta_schedule, linear_start, linear_end, cosine_s: the diffusion schedule.
        scale_factor: latent scaling of SD v1 (0.18215).
        reg_weight: lambda of Eq. 7 (5e-4).
        image_attention_learning_rate: learning rate of the image-attention blocks (1e-5);
            S* uses ``learning_rate`` (set by main.py from ``base_learning_rate``).
        placeholder_trainable: whether S* learns (ViCo, Textual Inversion, Custom Diffusion's
            modifier token); ``False`` keeps it at its initial token, DreamBooth's fixed
            identifier ``[V]``. S* also learns whenever the text encoder does (it is a row of
            the encoder's token embedding).
        unet_trainable: which UNet weights learn: ``"none"``, ``"all"`` (DreamBooth) or
            ``"cross_attention_kv"`` (Custom Diffusion: ``attn2.to_k`` and ``attn2.to_v`` of
            every SpatialTransformer). ViCo's image-attention blocks learn whenever present.
        text_encoder_trainable: the whole text encoder learns too (DreamBooth's
            ``--train_text_encoder``; paper Table 1 counts it for DreamBooth).
        unet_learning_rate: learning rate of the trained UNet weights and of the text encoder;
            ``None``: S*'s ``learning_rate`` (one rate for all, as Custom Diffusion's script).
        prior_loss_weight: weight of the prior-preservation loss, the noise MSE on the class
            images (DreamBooth, Custom Diffusion: 1.0); 0 without class images.
        image_size, channels: latent shape for sampling.
        ckpt_path: optional base SD checkpoint read at construction.
        parameterization: what the UNet predicts: ``"eps"`` (the noise; SD v1, SD 2.x 512-base)
            or ``"v"`` (the velocity; SD 2.x 768), see
            :mod:`ldm.models.diffusion.parameterization`. It sets the training target; the
            samplers convert a v-model's output to noise.
        compile_unet: ``torch.compile`` keyword arguments (``{}`` for the defaults,
            ``{mode: reduce-overhead}`` for CUDA graphs, ...) to capture the UNet, with ViCo's
            reference stream, as one graph; ``None`` (default) runs it eagerly. Compiled in
            place: the state-dict keys stay CompVis's. See :meth:`compile_unet`.
    """

    #: False for a model built with only its trained weights (:func:`ldm.models.export.build_trained_only`):
    #: formats that hold the whole model (DreamBooth's) then have nothing true to write.
    holds_base_weights: bool = True

    def __init__(
        self,
        unet_config: Mapping[str, Any],
        first_stage_config: Mapping[str, Any],
        cond_stage_config: Mapping[str, Any],
        personalization_config: Mapping[str, Any],
        timesteps: int = 1000,
        beta_schedule: str = "linear",
        linear_start: float = 0.00085,
        linear_end: float = 0.012,
        cosine_s: float = 8e-3,
        scale_factor: float = 0.18215,
        reg_weight: float = 5e-4,
        image_attention_learning_rate: float = 1e-5,
        image_size: int = 64,
        channels: int = 4,
        ckpt_path: str | None = None,
        parameterization: str = "eps",
        compile_unet: Mapping[str, Any] | None = None,
        placeholder_trainable: bool = True,
        unet_trainable: UnetTrainable = "none",
        text_encoder_trainable: bool = False,
        unet_learning_rate: float | None = None,
        prior_loss_weight: float = 0.0,
    ):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got '{parameterization}'")
        if unet_trainable not in UNET_TRAINABLE:
            raise ValueError(f"unet_trainable must be one of {UNET_TRAINABLE}, got '{unet_trainable}'")
        if prior_loss_weight < 0:
            raise ValueError(f"prior_loss_weight must be >= 0, got {prior_loss_weight}")
        self.parameterization = parameterization
        self.placeholder_trainable = placeholder_trainable or text_encoder_trainable
        self.unet_trainable = unet_trainable
        self.text_encoder_trainable = text_encoder_trainable
        self.unet_learning_rate = unet_learning_rate
        self.prior_loss_weight = prior_loss_weight
        self.model = DiffusionWrapper(unet_config)
        self.first_stage_model = instantiate_from_config(first_stage_config)
        self.cond_stage_model = instantiate_from_config(cond_stage_config)
        self.embedding_manager = instantiate_from_config(personalization_config, embedder=self.cond_stage_model)
        self.scale_factor = scale_factor
        self.reg_weight = reg_weight
        self.image_attention_learning_rate = image_attention_learning_rate
        self.learning_rate = 5e-3
        self.image_size = image_size
        self.channels = channels
        self.register_buffer("latent_mean", torch.empty(0), persistent=False)
        self.register_buffer("latent_std", torch.empty(0), persistent=False)
        self.register_buffer("class_latent_mean", torch.empty(0), persistent=False)
        self.register_buffer("class_latent_std", torch.empty(0), persistent=False)
        self.register_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        if ckpt_path:
            self.load_base_checkpoint(ckpt_path)
        self.freeze_base_model()
        if compile_unet is not None:
            if not isinstance(compile_unet, Mapping):
                raise ValueError(f"compile_unet must be a mapping of torch.compile arguments or null, got {compile_unet!r}")
            self.compile_unet(**compile_unet)

    @property
    def device(self) -> torch.device:
        """Where the model lives (its buffers and weights move together)."""
        return self.betas.device

    def compile_unet(self, **options: Any) -> None:
        """Compile the UNet's forward in place with ``torch.compile(**options)``; the first call
        traces it (seconds to minutes), later calls with the same shapes reuse the graph."""
        unknown = sorted(set(options) - COMPILE_OPTIONS)
        if unknown:
            raise ValueError(f"compile_unet: unknown torch.compile argument(s) {unknown}; allowed: {sorted(COMPILE_OPTIONS)}")
        self.model.diffusion_model.compile(**options)

    # ----------------------------------------------------------------- set-up
    def register_schedule(
        self,
        beta_schedule: str = "linear",
        timesteps: int = 1000,
        linear_start: float = 0.00085,
        linear_end: float = 0.012,
        cosine_s: float = 8e-3,
    ) -> None:
        """The 12 schedule buffers of CompVis ``DDPM``, computed in float64, stored in float32."""
        betas = make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        self.num_timesteps = int(timesteps)
        to_torch = partial(torch.tensor, dtype=torch.float32)
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, to_torch(value))

    def load_base_checkpoint(self, path: str, assign: bool = False) -> None:
        """Load the frozen SD v1 weights (see :func:`ldm.models.base_checkpoint.load_base_checkpoint`);
        S* then starts at its init word's embedding in those weights."""
        load_base_checkpoint(self, path, assign=assign)
        self.embedding_manager.restart_from_token_table(self.cond_stage_model.token_embedding.weight)

    def freeze_base_model(self) -> None:
        """Only what the settings train learns (:meth:`trainable_parameters`); the rest is frozen."""
        self.requires_grad_(False)
        for p in self.trainable_parameters():
            p.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> LatentDiffusionModel:
        """Frozen SD modules stay in eval mode whatever Lightning asks; what learns follows ``mode``."""
        super().train(mode)
        self.first_stage_model.eval()
        self.cond_stage_model.eval()
        self.model.train(mode and self.unet_trainable != "none")
        for module in self.model.modules():
            image_attention = getattr(module, "image_cross_attention", None)
            if image_attention is not None:
                image_attention.train(mode)
        return self

    def placeholder_parameters(self) -> list[nn.Parameter]:
        """S* (every placeholder's vectors), trained or not."""
        return list(self.embedding_manager.embedding_parameters())

    def image_attention_parameters(self) -> list[nn.Parameter]:
        return self.model.diffusion_model.image_attention_parameters()

    @property
    def has_image_attention(self) -> bool:
        """Whether the UNet has ViCo's image-attention blocks (and so reads a reference)."""
        return bool(self.model.diffusion_model.image_attention_layers)

    def unet_parameters(self) -> list[nn.Parameter]:
        """The UNet weights that learn under ``unet_trainable`` (never the image attention)."""
        if self.unet_trainable == "none":
            return []
        named = self.model.diffusion_model.named_parameters()
        if self.unet_trainable == "all":
            return [p for name, p in named if ".image_cross_attention." not in name]
        return [p for name, p in named if ".transformer_blocks." in name and name.endswith(CROSS_ATTENTION_KV)]

    def text_encoder_parameters(self) -> list[nn.Parameter]:
        """The text encoder's weights when it learns (DreamBooth's switch), else none."""
        return list(self.cond_stage_model.parameters()) if self.text_encoder_trainable else []

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything that learns, in the order of the optimiser's groups."""
        placeholder = self.placeholder_parameters() if self.placeholder_trainable else []
        return placeholder + self.image_attention_parameters() + self.unet_parameters() + self.text_encoder_parameters()

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The Stable Diffusion weights in the CompVis layout (what a base checkpoint holds);
        after DreamBooth, with its fine-tuned UNet."""
        return {k: v.detach() for k, v in self.state_dict().items() if is_base_key(k)}

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """What personalisation made, under the full model's key names: the trained weights and
        S* (kept when it does not learn: DreamBooth's identifier is the vector prompts stand for).

        This is all that training checkpoints and adapter exports hold; the other weights come
        from the base checkpoint.
        """
        kept = {id(p) for p in self.trainable_parameters() + self.placeholder_parameters()}
        return {name: p.detach() for name, p in self.named_parameters() if id(p) in kept}

    def load_trained_state_dict(self, state_dict: Mapping[str, torch.Tensor], source: str, assign: bool = False) -> None:
        """Load the weights of :meth:`trained_state_dict`; every such key must be there with its
        shape (``assign=True``: in place of the model's tensors, which may be on ``meta``)."""
        expected = self.trained_state_dict()
        check_state_dict(expected, state_dict, source, expected.keys())
        unknown = sorted(set(state_dict) - set(expected))
        if unknown:
            raise CheckpointError(f"{source}: unexpected key '{unknown[0]}' for this model configuration")
        if assign:
            state_dict = {k: v.to(expected[k].dtype) for k, v in state_dict.items()}
        self.load_state_dict(dict(state_dict), strict=False, assign=assign)

    # --------------------------------------------------------------- encoders
    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor):
        """Posterior of the autoencoder for images in [-1, 1] (unscaled)."""
        return self.first_stage_model.encode(x)

    @torch.no_grad()
    def get_first_stage_encoding(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A scaled latent sampled from the posterior of ``x``."""
        return self.scale_factor * self.encode_first_stage(x).sample(generator)

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        return self.first_stage_model.decode(z / self.scale_factor)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids ``[B, 77]`` on the model's device; a placeholder with a class word is
        followed by it (:meth:`EmbeddingManager.expand_class_words`)."""
        tokens = self.embedding_manager.expand_class_words(self.cond_stage_model.tokenizer(list(prompts)))
        if self.device.type == "cuda":  # pinned and asynchronous: the host does not wait for the GPU
            return tokens.pin_memory().to(self.device, non_blocking=True)
        return tokens.to(self.device)

    def get_learned_conditioning(self, prompts: Sequence[str] | torch.Tensor) -> torch.Tensor:
        """Text context ``[B, 77, 768]`` with S* substituted by the embedding manager."""
        tokens = prompts if isinstance(prompts, torch.Tensor) else self.tokenize(prompts)
        return self.cond_stage_model.encode(tokens, embedding_manager=self.embedding_manager)

    def reference_condition(
        self,
        reference_latent: torch.Tensor,
        context: torch.Tensor,
        tokens: torch.Tensor,
        timesteps: torch.Tensor | None = None,
        references_per_group: int = 1,
        compute_regularizer: bool = False,
        object_mask: torch.Tensor | None = None,
    ) -> ReferenceCondition:
        """Describe the reference stream: its latent, the context it attends to, and where
        S* and end-of-text sit in that context (``object_mask``: given masks of the references
        in place of the Otsu masks, :class:`ReferenceCondition`)."""
        placeholder_index, eot_index, _found = self.embedding_manager.placeholder_positions(tokens)
        return ReferenceCondition(
            latent=reference_latent,
            context=context,
            placeholder_index=placeholder_index,
            eot_index=eot_index,
            timesteps=timesteps,
            references_per_group=references_per_group,
            compute_regularizer=compute_regularizer,
            object_mask=object_mask,
        )

    # ---------------------------------------------------------------- process
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Diffuse ``x_start`` to step ``t``: sqrt(a_t) x_0 + sqrt(1 - a_t) noise."""
        return (
            extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def apply_model(
        self,
        x_noisy: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        reference: ReferenceCondition | None = None,
    ) -> torch.Tensor:
        """The UNet output (noise, or velocity for ``parameterization="v"``); with ``reference``
        the UNet also attends to the reference image."""
        return self.model(x_noisy, t, context, reference)

    def p_losses(
        self,
        x_start: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        reference: ReferenceCondition | None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Eq. 7: noise MSE + ``reg_weight`` x the regulariser of Eq. 6 summed over patched layers.

        A v-model regresses the velocity ``sqrt(a_t) noise - sqrt(1 - a_t) x_0`` instead of the
        noise (as Stability's SD 2.x training). Without a ``reference`` (class images) this is
        the plain noise MSE.
        """
        noise = torch.randn_like(x_start) if noise is None else noise
        if reference is not None:
            reference.compute_regularizer = True
            reference.regularizer_terms.clear()
        model_output = self.apply_model(self.q_sample(x_start, t, noise), t, context, reference)
        target = noise if self.parameterization == "eps" else v_target(x_start, noise, self.alphas_cumprod[t])
        loss_simple = F.mse_loss(model_output.float(), target.float())
        terms = reference.regularizer_terms if reference is not None else []
        loss_reg = torch.stack(terms).sum() if terms else loss_simple.new_zeros(())
        loss = loss_simple + self.reg_weight * loss_reg
        return loss, {"loss_simple": loss_simple.detach(), "loss_reg": loss_reg.detach(), "loss": loss.detach()}

    # --------------------------------------------------------------- training
    @torch.no_grad()
    def cache_first_stage(self, images: torch.Tensor, with_flips: bool, chunk_size: int = 4) -> None:
        """Encode every training photo (and its mirror image) once and keep the posteriors.

        The VAE encoder costs more than a UNet pass at 512 px; with 4-7 photos encoding them
        at every step is waste. Latents are then drawn from the cached mean and std exactly
        as :meth:`get_first_stage_encoding` would draw them.

        Args:
            images: ``[N, 3, H, W]`` in [-1, 1].
            with_flips: also cache the horizontally flipped photos.
        """
        self.latent_mean, self.latent_std = self._posteriors(images, with_flips, chunk_size)

    @torch.no_grad()
    def cache_class_images(self, images: torch.Tensor, chunk_size: int = 4) -> None:
        """Encode the class images of prior preservation once, as :meth:`cache_first_stage` the photos.

        Args:
            images: ``[N, 3, H, W]`` in [-1, 1].
        """
        self.class_latent_mean, self.class_latent_std = self._posteriors(images, False, chunk_size)

    def _posteriors(self, images: torch.Tensor, with_flips: bool, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std ``[N, V, C, h, w]`` of the posteriors of ``images`` (V = 2 with mirror images)."""
        variants = [images, images.flip(-1)] if with_flips else [images]
        means, stds = [], []
        for variant in variants:
            posteriors = [self.encode_first_stage(chunk.to(self.device)) for chunk in variant.split(chunk_size)]
            means.append(torch.cat([p.mean for p in posteriors]))
            stds.append(torch.cat([p.std for p in posteriors]))
        return torch.stack(means, dim=1), torch.stack(stds, dim=1)

    def cached_latent(self, image_index: torch.Tensor, flip: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A scaled latent of cached photos ``image_index`` (mirrored where ``flip``)."""
        variant = flip.long() if self.latent_mean.shape[1] > 1 else torch.zeros_like(image_index)
        return self._draw(self.latent_mean[image_index, variant], self.latent_std[image_index, variant], generator)

    def cached_class_latent(self, class_index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A scaled latent of cached class images ``class_index``."""
        return self._draw(self.class_latent_mean[class_index, 0], self.class_latent_std[class_index, 0], generator)

    def _draw(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.scale_factor * (mean + std * noise)
