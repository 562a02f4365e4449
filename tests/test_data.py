"""Training photos and captions as the authors' data loader makes them."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.data.images import load_image
from ldm.data.personalized import CAPTION_TEMPLATES, SHORT_TEMPLATES, VICO_TEMPLATES, PersonalizedBase

# sha256 of "\n".join(imagenet_templates_small) in haoosz/ViCo's ldm/data/personalized.py (4ac2463).
AUTHORS_TEMPLATES_SHA256 = "9492b607526eaaaefe38c5f4dabd0f5ca492456e6e8437ff1870590754628d7a"


def test_default_captions_are_the_authors_81():
    assert len(VICO_TEMPLATES) == 81 and VICO_TEMPLATES[:27] == SHORT_TEMPLATES
    assert hashlib.sha256("\n".join(VICO_TEMPLATES).encode()).hexdigest() == AUTHORS_TEMPLATES_SHA256
    assert sum("illustration" in t or "depiction" in t for t in VICO_TEMPLATES) == 30
    assert VICO_TEMPLATES[27] == "an illustration of a {}" and VICO_TEMPLATES[54] == "a depiction of a {}"
    assert set(CAPTION_TEMPLATES) == {"vico", "short"}


def striped_photo(folder: Path) -> Path:
    """60x20: red, green and blue thirds from left to right."""
    pixels = np.zeros((20, 60, 3), dtype=np.uint8)
    for channel in range(3):
        pixels[:, 20 * channel : 20 * (channel + 1), channel] = 255
    path = folder / "stripes.png"
    Image.fromarray(pixels).save(path)
    return path


def dominant_channels(image: np.ndarray) -> list[int]:
    """Per column, which of R, G, B is brightest."""
    return image.mean(axis=0).argmax(axis=-1).tolist()


def test_training_photos_are_squashed_by_default_and_cropped_on_request(tmp_path):
    striped_photo(tmp_path)
    squashed = PersonalizedBase(str(tmp_path), size=12).images[0]
    assert dominant_channels(squashed) == [0] * 4 + [1] * 4 + [2] * 4  # the whole photo, distorted
    cropped = PersonalizedBase(str(tmp_path), size=12, resize_mode="crop").images[0]
    assert dominant_channels(cropped) == [1] * 12  # the centre square
    with pytest.raises(ValueError, match="resize_mode must be one of"):
        PersonalizedBase(str(tmp_path), size=12, resize_mode="pad")


def test_load_image_modes(tmp_path):
    path = striped_photo(tmp_path)
    squashed = load_image(path, (10, 30), "bilinear", resize_mode="squash")
    assert squashed.shape == (10, 30, 3)
    reference = np.asarray(Image.open(path).resize((30, 10), Image.Resampling.BILINEAR))
    assert np.array_equal(squashed, reference)
    assert dominant_channels(load_image(path, 8, resize_mode="crop")) == [1] * 8
    with pytest.raises(ValueError, match="interpolation must be one of"):
        load_image(path, 8, "nearest-ish")


def test_caption_templates_option(tmp_path):
    striped_photo(tmp_path)
    default = PersonalizedBase(str(tmp_path), size=8, repeats=400, seed=1)
    captions = {default[i]["caption"] for i in range(len(default))}
    assert captions == {t.format("*") for t in VICO_TEMPLATES}
    short = PersonalizedBase(str(tmp_path), size=8, repeats=400, seed=1, caption_templates="short")
    assert {short[i]["caption"] for i in range(len(short))} == {t.format("*") for t in SHORT_TEMPLATES}
    with pytest.raises(ValueError, match="caption_templates must be one of"):
        PersonalizedBase(str(tmp_path), size=8, caption_templates="long")
