"""The true-mask switch (paper Fig. 9): the image attention masked by the reference's true
object mask instead of the Otsu mask, at training (``data.params.train.params.object_masks``)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.data.images import ImageError
from ldm.data.personalized import PersonalizedBase
from ldm.models.diffusion.ddpm import LatentDiffusion

ROOT = Path(__file__).resolve().parents[1]
CONCEPT = ROOT / "data" / "miniworld" / "sunset_ring"


def test_the_dataset_reads_each_photos_mask():
    dataset = PersonalizedBase(str(CONCEPT), size=64, object_masks=True)
    masks = dataset.object_mask_pixels()
    assert masks.shape == (5, 64, 64) and masks.dtype == torch.bool
    assert 0.05 < masks.float().mean() < 0.6  # an object, not the whole picture
    assert PersonalizedBase(str(CONCEPT), size=64).object_mask_pixels() is None


def test_a_missing_mask_is_one_clear_error(tmp_path):
    folder = tmp_path / "concept"
    shutil.copytree(CONCEPT, folder)
    (folder / "masks" / "03.png").unlink()
    with pytest.raises(ImageError, match="no mask .*03.png"):
        PersonalizedBase(str(folder), size=64, object_masks=True)


def test_the_training_step_gives_each_reference_its_mask_mirrored_with_it():
    model = LatentDiffusion.__new__(LatentDiffusion)
    masks = torch.from_numpy(np.random.default_rng(0).random((3, 8, 8)) > 0.5)
    model.reference_object_masks = masks
    batch = {"reference_index": torch.tensor([2, 0]), "reference_flip": torch.tensor([True, False])}
    given = model.reference_object_mask(batch)
    assert torch.equal(given[0], masks[2].flip(-1)) and torch.equal(given[1], masks[0])
    model.reference_object_masks = None
    assert model.reference_object_mask(batch) is None
