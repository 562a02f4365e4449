"""Pictures written to disk: sample grids, attention sheets, previews and evaluation sheets.

One module for every picture the project writes, so that they look alike (cells on white,
``GRID_PADDING`` pixels apart; the "hot" colour map) and carry their settings the same way
(PNG text chunks, plus AUTOMATIC1111's ``parameters`` chunk that web UIs, ComfyUI and image
sites read). Used by ``sample.py``, the training previews (:class:`ldm.callbacks.ImageLogger`)
and the evaluation sheets (``scripts/evaluate.py``, ``scripts/evaluate_miniworld.py``).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from ldm.modules.vico import AttentionRecord

GRID_PADDING = 2
#: AUTOMATIC1111's names of the samplers (its "Sampler" field), by ``sample.py --sampler``.
A1111_SAMPLERS = {"ddim": "DDIM", "plms": "PLMS", "dpmpp_2m": "DPM++ 2M", "euler_a": "Euler a"}
#: Characters that make AUTOMATIC1111 quote a value of its ``parameters`` line.
_A1111_QUOTED = (",", ":", '"')


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` in [-1, 1] -> ``uint8 [B, H, W, 3]``."""
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(rows: Sequence[Sequence[np.ndarray | None]], padding: int = GRID_PADDING) -> np.ndarray:
    """Tile equally sized ``uint8 [H, W, 3]`` cells on white; ``None`` leaves a cell blank."""
    cell = next(c for row in rows for c in row if c is not None)
    height, width = cell.shape[:2]
    columns = max(len(row) for row in rows)
    grid = np.full(
        (padding + len(rows) * (height + padding), padding + columns * (width + padding), 3), 255, dtype=np.uint8
    )
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            if image is not None:
                top, left = padding + r * (height + padding), padding + c * (width + padding)
                grid[top : top + height, left : left + width] = image
    return grid


def hot_colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> ``uint8 [..., 3]`` black-red-yellow-white."""
    rgb = np.stack([values * 3, values * 3 - 1, values * 3 - 2], axis=-1).clip(0, 1)
    return (rgb * 255).round().astype(np.uint8)


def attention_picture(
    records: Sequence[AttentionRecord], references: np.ndarray, placeholders: Sequence[str | None] | None = None
) -> np.ndarray:
    """One row per reference: the reference, then per patched layer its S* map and masked reference.

    With ``placeholders`` (several concepts), row ``k`` is the map of reference ``k``'s own
    placeholder, whose name is written on its reference.
    """
    height, width = references.shape[1:3]
    records = sorted(records, key=lambda r: r.layer)
    rows: list[list[np.ndarray]] = [[reference] for reference in references]
    for record in records:
        maps = record.placeholder_map.float().reshape(-1, 1, record.height, record.width)
        low = maps.amin(dim=(2, 3), keepdim=True)
        span = (maps.amax(dim=(2, 3), keepdim=True) - low).clamp(min=1e-12)
        maps = F.interpolate((maps - low) / span, size=(height, width), mode="bilinear", align_corners=False)
        masks = F.interpolate(record.mask.float().reshape(-1, 1, record.height, record.width), size=(height, width))
        for k, reference in enumerate(references):
            keep = masks[k, 0].cpu().numpy()[..., None]
            rows[k].append(hot_colormap(maps[k, 0].cpu().numpy()))
            rows[k].append((reference * (0.2 + 0.8 * keep)).round().astype(np.uint8))
    for k, placeholder in enumerate(placeholders or []):
        if placeholder is not None:
            labelled = Image.fromarray(rows[k][0])
            ImageDraw.Draw(labelled).text((2, 2), placeholder, fill="white", stroke_width=1, stroke_fill="black")
            rows[k][0] = np.asarray(labelled)
    labels = ["reference"] + [f"L{r.layer} {kind}" for r in records for kind in ("map", "mask")]
    return with_header(make_grid(rows), labels, width)


def with_header(grid: np.ndarray, labels: Sequence[str], cell_width: int) -> np.ndarray:
    band = Image.new("RGB", (grid.shape[1], 14), "white")
    draw = ImageDraw.Draw(band)
    for c, label in enumerate(labels):
        draw.text((GRID_PADDING + c * (cell_width + GRID_PADDING) + 2, 1), label, fill="black")
    return np.concatenate([np.asarray(band), grid])


def save_png(
    array: np.ndarray, path: Path, metadata: dict[str, str] | None = None, exclusive: bool = False
) -> None:
    """Write ``uint8 [H, W, 3]`` as a PNG with ``metadata`` as text chunks.

    ``exclusive`` refuses (``FileExistsError``) to replace an existing file; a failed write
    leaves no partial file behind.
    """
    info = PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, value)
    with open(path, "xb" if exclusive else "wb") as handle:
        try:
            Image.fromarray(array).save(handle, format="PNG", pnginfo=info)
        except BaseException:
            Path(path).unlink(missing_ok=True)
            raise


def save_new_png(array: np.ndarray, folder: Path, stem: str, metadata: dict[str, str] | None = None) -> Path:
    """Write ``folder/<stem>.png``, or ``<stem>-2.png``, ``<stem>-3.png``, ... : the first name not taken."""
    suffix = 1
    while True:
        path = folder / (f"{stem}.png" if suffix == 1 else f"{stem}-{suffix}.png")
        try:
            save_png(array, path, metadata, exclusive=True)
            return path
        except FileExistsError:
            suffix += 1




def wrap_text(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels (a word longer than a line gets a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def text_cell(text: str, height: int, width: int) -> np.ndarray:
    """``text`` in black on a white ``uint8 [height, width, 3]`` cell, PIL's default font scaled to the cell."""
    font = ImageFont.load_default(size=max(10, height // 14))
    margin = max(2, width // 32)
    cell = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(cell).multiline_text(
        (margin, margin), "\n".join(wrap_text(text, font, width - 2 * margin)), fill="black", font=font
    )
    return np.asarray(cell)


def a1111_parameters(prompt: str, negative_prompt: str, settings: Mapping[str, object]) -> str:
    """The ``parameters`` text of AUTOMATIC1111's web UI: the prompt, ``Negative prompt: ...``,
    then ``Key: value`` pairs on one line (``Steps``, ``Sampler``, ``CFG scale``, ``Seed``,
    ``Size``, ``Model``, ...); a value holding a comma, colon or quote is JSON-quoted, as the
    web UI writes it, so that its parser reads it back whole."""
    pairs = []
    for key, value in settings.items():
        text = str(value)
        pairs.append(f"{key}: {json.dumps(text) if any(c in text for c in _A1111_QUOTED) else text}")
    lines = [prompt, *([f"Negative prompt: {negative_prompt}"] if negative_prompt else []), ", ".join(pairs)]
    return "\n".join(lines)
