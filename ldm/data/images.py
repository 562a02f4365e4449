"""Reading user photos robustly: any mode, EXIF orientation, any size."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

INTERPOLATIONS = {
    "linear": Image.Resampling.BILINEAR,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}


class ImageError(ValueError):
    """An image that cannot be used; the message names the file."""


def list_images(folder: str | Path) -> list[Path]:
    """Image files of a folder (by extension, case-insensitive), in sorted order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"image folder not found: {folder}")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise ImageError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return images


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited over white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.uint32)
        scale = 257 if array.max(initial=0) > 255 else 1
        image = Image.fromarray((array // scale).clip(0, 255).astype(np.uint8))
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
        image = Image.fromarray((array.clip(0, 1) * 255).round().astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


ResizeMode = Literal["squash", "crop"]
RESIZE_MODES: tuple[str, ...] = ("squash", "crop")


def load_image(
    path: str | Path,
    size: int | tuple[int, int] | None = None,
    interpolation: str = "bicubic",
    resize_mode: ResizeMode = "crop",
) -> np.ndarray:
    """Read a photo as ``uint8 [H, W, 3]``: EXIF-rotated, RGB and resized.

    Args:
        path: the file.
        size: output side (square) or ``(height, width)``; ``None`` keeps the image as it is.
        interpolation: resampling filter name.
        resize_mode: ``"crop"`` keeps the aspect ratio, cropping the centre to the output's;
            ``"squash"`` resizes the whole photo to the output size, distorting a photo of
            another aspect ratio (what the authors' code does with training photos).

    Raises:
        ImageError: the file is missing or does not decode.
        ValueError: an unknown ``resize_mode`` or ``interpolation``.
    """
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got '{resize_mode}'")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {tuple(INTERPOLATIONS)}, got '{interpolation}'")
    path = Path(path)
    try:
        with Image.open(path) as image:
            image = to_rgb(ImageOps.exif_transpose(image))
    except FileNotFoundError:
        raise ImageError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"cannot read image {path}: {err}") from None
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else size
        method = INTERPOLATIONS[interpolation]
        if resize_mode == "crop":
            image = ImageOps.fit(image, (width, height), method=method)
        else:
            image = image.resize((width, height), resample=method)
    return np.asarray(image, dtype=np.uint8)


def pixel_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image file, from its header (nothing is decoded)."""
    with Image.open(path) as image:
        return image.size


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """``uint8 [..., H, W, 3]`` -> float ``[..., 3, H, W]`` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).movedim(-1, -3).float() / 127.5 - 1.0
