"""The quantitative metrics of ViCo (paper Sec. 4.1): I_DINO, I_CLIP and T_CLIP.

* I_DINO / I_CLIP: mean cosine similarity between DINO ViT-S/16 (resp. CLIP ViT-B/32) image
  features of every (generated image, real training image) pair of a concept.
* T_CLIP: mean cosine similarity between the CLIP feature of each generated image and the CLIP
  text feature of its prompt with the placeholder omitted (:func:`ldm.evaluation.clip_text`).

Both networks are built from their architecture definitions (open_clip, timm) and filled from
local weight files; nothing is downloaded. ``docs/EVALUATION.md`` says which files to get.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import open_clip
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch import Tensor, nn

from ldm.data.images import load_image, to_rgb
from ldm.util import CheckpointError, checkpoint_format, read_checkpoint, read_torchscript_tensors

logger = logging.getLogger(__name__)

CLIP_MODEL = "ViT-B-32"
#: open_clip's name for OpenAI's weights; it fixes the activation (QuickGELU) and normalisation.
CLIP_PRETRAINED_TAG = "openai"
DINO_MODEL = "vit_small_patch16_224.dino"
#: DINO's own evaluation resizes the shorter side to 256 before the 224 centre crop. timm's
#: pretrained config for this model says 0.9 (resize to 248), its generic ViT default.
DINO_CROP_PCT = 224 / 256

CLIP_DOWNLOAD = (
    "OpenAI's ViT-B-32.pt, or open_clip_model.safetensors / open_clip_pytorch_model.bin "
    "of the Hugging Face repository timm/vit_base_patch32_clip_224.openai"
)
DINO_DOWNLOAD = (
    "dino_deitsmall16_pretrain.pth of facebookresearch/dino, or model.safetensors / "
    "pytorch_model.bin of the Hugging Face repository timm/vit_small_patch16_224.dino"
)

#: Entries of TorchScript CLIP archives (OpenAI's ViT-B-32.pt, scripted open_clip models) that
#: are not weights of open_clip's module.
_TORCHSCRIPT_EXTRAS = frozenset({"input_resolution", "context_length", "vocab_size", "attn_mask"})
#: Key prefixes of Hugging Face transformers' CLIPModel, a layout this module does not convert.
_TRANSFORMERS_CLIP_PREFIXES = ("vision_model.", "text_model.")

ImageInput = Image.Image | str | Path
Transform = Callable[[Image.Image], Tensor]


# ----------------------------------------------------------------------------- similarities
def _check_features(features: Tensor, name: str) -> None:
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] feature matrix, got shape {list(features.shape)}")


def cosine_similarity_matrix(a: Tensor, b: Tensor) -> Tensor:
    """``[N, M]`` cosine similarities between the rows of ``a [N, D]`` and ``b [M, D]`` (float64)."""
    _check_features(a, "a")
    _check_features(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} and {b.shape[1]}")
    return F.normalize(a.double(), dim=1) @ F.normalize(b.double(), dim=1).T


def pairwise_image_similarity(gen_feats: Tensor, real_feats: Tensor) -> float:
    """I_DINO / I_CLIP: the mean cosine over all (generated, real) pairs of feature rows."""
    return cosine_similarity_matrix(gen_feats, real_feats).mean().item()


def text_image_similarity(img_feats: Tensor, txt_feats: Tensor) -> float:
    """T_CLIP: the mean cosine between row ``i`` of ``img_feats`` and row ``i`` of ``txt_feats``."""
    _check_features(img_feats, "img_feats")
    _check_features(txt_feats, "txt_feats")
    if img_feats.shape != txt_feats.shape:
        raise ValueError(
            f"need one text feature per image: shapes {list(img_feats.shape)} and {list(txt_feats.shape)}"
        )
    cosines = (F.normalize(img_feats.double(), dim=1) * F.normalize(txt_feats.double(), dim=1)).sum(dim=1)
    return cosines.mean().item()


# ---------------------------------------------------------------------------- preprocessing
def _clip_pretrained_cfg(pretrained_tag: str) -> dict:
    cfg = open_clip.get_pretrained_cfg(CLIP_MODEL, pretrained_tag)
    if not cfg:
        known = ", ".join(open_clip.list_pretrained_tags_by_model(CLIP_MODEL))
        raise ValueError(f"open_clip knows no '{pretrained_tag}' weights for {CLIP_MODEL} (known: {known})")
    return cfg


def clip_transform(pretrained_tag: str = CLIP_PRETRAINED_TAG) -> Transform:
    """open_clip's evaluation transform for ViT-B/32 with the given weights' normalisation.

    For OpenAI's weights: shorter side to 224 (bicubic), centre crop 224, RGB, OpenAI CLIP
    mean/std, as in OpenAI's ``clip.load``.
    """
    cfg = _clip_pretrained_cfg(pretrained_tag)
    return open_clip.image_transform(
        open_clip.get_model_config(CLIP_MODEL)["vision_cfg"]["image_size"],
        is_train=False,
        mean=cfg["mean"],
        std=cfg["std"],
        interpolation=cfg["interpolation"],
        resize_mode=cfg["resize_mode"],
    )


def dino_transform() -> Transform:
    """timm's transform for DINO ViT-S/16 with DINO's 256-then-224 crop.

    Shorter side to 256 (bicubic), centre crop 224, ImageNet mean/std: timm's resolved
    pretrained config with only ``crop_pct`` changed (see :data:`DINO_CROP_PCT`).
    """
    cfg = resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(DINO_MODEL).to_dict())
    return create_transform(**{**cfg, "crop_pct": DINO_CROP_PCT})


def open_image(image: ImageInput) -> Image.Image:
    """An RGB PIL image; files are read like training images (EXIF rotation, alpha over white)."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    return Image.fromarray(load_image(image))


# ------------------------------------------------------------------------------- weights
def _strip_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Remove ``prefix`` when every key carries it."""
    if all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def read_weights(path: str | Path, what: str, download: str) -> dict[str, Tensor]:
    """Read a state dict of tensors from a local file, without running any code of the file.

    Accepted: ``.safetensors``; ``torch.save`` files (read with ``weights_only=True``), a plain
    state dict or one under ``"state_dict"``; TorchScript archives (OpenAI's CLIP ``.pt``), whose
    tensors are read by :func:`ldm.util.read_torchscript_tensors` (its code is never compiled or
    run; the archive's non-weight tensors ``input_resolution``, ``context_length``,
    ``vocab_size`` and ``attn_mask`` are dropped). A ``module.`` prefix (DataParallel) on every
    key is removed.

    Args:
        path: the file.
        what: the model's name, for messages.
        download: what to download instead, for messages.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights not found: {path} (download {download}; see docs/EVALUATION.md)")
    try:
        if checkpoint_format(path) == "torchscript":
            content = read_torchscript_tensors(path)
            content = {k: v for k, v in content.items() if k.rpartition(".")[2] not in _TORCHSCRIPT_EXTRAS}
        else:
            content = read_checkpoint(path)
    except CheckpointError as err:
        raise ValueError(f"{err} (expected {what} weights: {download})") from None
    if isinstance(content, dict):
        content = content.get("state_dict", content)
    if not isinstance(content, dict) or not content or not all(isinstance(v, Tensor) for v in content.values()):
        raise ValueError(f"{path}: no state dict of tensors found (expected {download})")
    return _strip_prefix(content, "module.")


def load_weights_strict(
    model: nn.Module, state_dict: Mapping[str, Tensor], path: str | Path, what: str, download: str
) -> None:
    """Load ``state_dict`` into ``model``; a missing, unexpected or mis-shaped key is a ValueError naming the file."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        kind, key = ("missing", missing[0]) if missing else ("unexpected", unexpected[0])
        raise ValueError(
            f"{path}: not a {what} state dict: {kind} key '{key}' ({len(missing)} missing, "
            f"{len(unexpected)} unexpected; expected {download})"
        )
    for key, value in state_dict.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{path}: key '{key}' has shape {list(value.shape)}, {what} expects {list(expected[key].shape)}"
            )
    model.load_state_dict(dict(state_dict))


# ---------------------------------------------------------------------------- extractors
class ImageFeatureExtractor(ABC):
    """Images in, one feature row per image out, with the network's own preprocessing.

    Args:
        model: the network; it is put in eval mode, frozen and moved to ``device``.
        transform: PIL image -> ``[3, H, W]`` tensor.
        device: where the network runs; features come back as float32 on the CPU.
        batch_size: images per forward pass.
    """

    def __init__(
        self, model: nn.Module, transform: Transform, device: str | torch.device = "cpu", batch_size: int = 32
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.transform = transform
        self.batch_size = batch_size

    @abstractmethod
    def embed(self, pixels: Tensor) -> Tensor:
        """Features ``[B, D]`` of preprocessed images ``[B, 3, H, W]``."""

    @torch.inference_mode()
    def encode_images(self, images: Sequence[ImageInput]) -> Tensor:
        """``[N, D]`` features of PIL images or image files."""
        if not images:
            raise ValueError("no images to encode")
        rows = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            pixels = torch.stack([self.transform(open_image(image)) for image in chunk]).to(self.device)
            rows.append(self.embed(pixels).float().cpu())
        return torch.cat(rows)


class DinoFeatureExtractor(ImageFeatureExtractor):
    """DINO ViT-S/16: the feature is the final-norm [CLS] token (timm with ``num_classes=0``), as in DINO."""

    def embed(self, pixels: Tensor) -> Tensor:
        return self.model(pixels)


class ClipFeatureExtractor(ImageFeatureExtractor):
    """CLIP ViT-B/32: projected image and text embeddings (``encode_image`` / ``encode_text``)."""

    def __init__(
        self,
        model: nn.Module,
        transform: Transform,
        tokenizer: Callable[[Sequence[str]], Tensor],
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ):
        super().__init__(model, transform, device, batch_size)
        self.tokenizer = tokenizer

    def embed(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(pixels)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """``[N, D]`` text features, in the same space as :meth:`encode_images`."""
        if not texts:
            raise ValueError("no texts to encode")
        rows = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start : start + self.batch_size])).to(self.device)
            rows.append(self.model.encode_text(tokens).float().cpu())
        return torch.cat(rows)


def build_clip(
    pretrained_tag: str = CLIP_PRETRAINED_TAG, device: str | torch.device = "cpu", batch_size: int = 32
) -> ClipFeatureExtractor:
    """A randomly initialised CLIP ViT-B/32 shaped for ``pretrained_tag``'s weights.

    The tag matters beyond the file: OpenAI's weights (and some others) were trained with
    QuickGELU, which open_clip's plain ``ViT-B-32`` definition does not use; loading them into
    a GELU model gives wrong features without any error.
    """
    cfg = _clip_pretrained_cfg(pretrained_tag)
    model = open_clip.create_model(CLIP_MODEL, pretrained=None, force_quick_gelu=bool(cfg.get("quick_gelu")))
    return ClipFeatureExtractor(
        model, clip_transform(pretrained_tag), open_clip.get_tokenizer(CLIP_MODEL), device, batch_size
    )


def load_clip(
    weights: str | Path,
    pretrained_tag: str = CLIP_PRETRAINED_TAG,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
) -> ClipFeatureExtractor:
    """CLIP ViT-B/32 from a local open_clip / OpenAI weight file (see :func:`read_weights`).

    Args:
        weights: the file (OpenAI's ``ViT-B-32.pt`` or an open_clip state dict).
        pretrained_tag: open_clip's name of the weights in the file (``"openai"`` for the
            paper's CLIP; e.g. ``"laion2b_s34b_b79k"`` for LAION's), which fixes the activation
            and normalisation.
        device, batch_size: see :class:`ImageFeatureExtractor`.
    """
    state_dict = read_weights(weights, "CLIP ViT-B/32", CLIP_DOWNLOAD)
    if any(k.startswith(_TRANSFORMERS_CLIP_PREFIXES) for k in state_dict):
        raise ValueError(
            f"{weights}: a Hugging Face transformers CLIPModel checkpoint, which is not converted here; "
            f"use {CLIP_DOWNLOAD}"
        )
    extractor = build_clip(pretrained_tag, device, batch_size)
    load_weights_strict(extractor.model, state_dict, weights, "CLIP ViT-B/32", CLIP_DOWNLOAD)
    logger.info("CLIP %s (%s weights) loaded from %s", CLIP_MODEL, pretrained_tag, weights)
    return extractor


def build_dino(device: str | torch.device = "cpu", batch_size: int = 32) -> DinoFeatureExtractor:
    """A randomly initialised DINO ViT-S/16 backbone (timm, no classifier head)."""
    model = timm.create_model(DINO_MODEL, pretrained=False, num_classes=0)
    return DinoFeatureExtractor(model, dino_transform(), device, batch_size)


def load_dino(weights: str | Path, device: str | torch.device = "cpu", batch_size: int = 32) -> DinoFeatureExtractor:
    """DINO ViT-S/16 from a local backbone weight file (see :func:`read_weights`)."""
    state_dict = read_weights(weights, "DINO ViT-S/16", DINO_DOWNLOAD)
    extractor = build_dino(device, batch_size)
    load_weights_strict(extractor.model, state_dict, weights, "DINO ViT-S/16", DINO_DOWNLOAD)
    logger.info("DINO %s loaded from %s", DINO_MODEL, weights)
    return extractor


# --------------------------------------------------------------------------------- scores
@dataclass(frozen=True)
class ConceptScores:
    """The three metrics of one concept and the counts needed to pool concepts."""

    i_dino: float
    i_clip: float
    t_clip: float
    num_generated: int
    num_real: int


def score_concept(
    generated: Sequence[ImageInput],
    texts: Sequence[str],
    real: Sequence[ImageInput],
    clip: ClipFeatureExtractor,
    dino: DinoFeatureExtractor,
) -> ConceptScores:
    """I_DINO, I_CLIP and T_CLIP of one concept.

    Args:
        generated: the generated images.
        texts: one T_CLIP text per generated image (see :func:`ldm.evaluation.clip_text`).
        real: the concept's real training images.
        clip, dino: the feature extractors.
    """
    if len(texts) != len(generated):
        raise ValueError(f"need one text per generated image: {len(texts)} texts, {len(generated)} images")
    unique_texts = list(dict.fromkeys(texts))
    text_rows = {text: i for i, text in enumerate(unique_texts)}
    text_feats = clip.encode_texts(unique_texts)[[text_rows[t] for t in texts]]
    clip_generated = clip.encode_images(generated)
    return ConceptScores(
        i_dino=pairwise_image_similarity(dino.encode_images(generated), dino.encode_images(real)),
        i_clip=pairwise_image_similarity(clip_generated, clip.encode_images(real)),
        t_clip=text_image_similarity(clip_generated, text_feats),
        num_generated=len(generated),
        num_real=len(real),
    )


def average_scores(scores: Sequence[ConceptScores]) -> dict[str, float]:
    """Pool concepts into the paper's numbers: "the average similarities of all compared pairs".

    Each concept's image metrics weigh by its number of (generated, real) pairs and its T_CLIP
    by its number of generated images, so the result is the mean over all pairs of all
    concepts, not the mean of per-concept means (the two differ when concepts have different
    numbers of real images).
    """
    if not scores:
        raise ValueError("no concept scores to average")
    pairs = [s.num_generated * s.num_real for s in scores]
    generated = [s.num_generated for s in scores]
    return {
        "i_dino": sum(s.i_dino * n for s, n in zip(scores, pairs)) / sum(pairs),
        "i_clip": sum(s.i_clip * n for s, n in zip(scores, pairs)) / sum(pairs),
        "t_clip": sum(s.t_clip * n for s, n in zip(scores, generated)) / sum(generated),
    }
