"""The miniature world's metrics on hand-made inputs: object and prompt fidelity, feature similarity, mask IoU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.data.miniworld import Part, WorldObject
from ldm.evaluation.miniworld import HEADS, OBJECT_HEADS, UNDEFINED, object_labels
from ldm.evaluation.miniworld_metrics import (
    all_patches_iou,
    attention_mask_iou,
    downsample_mask,
    feature_similarity,
    mask_iou,
    mean_dicts,
    object_fidelity,
    prompt_fidelity,
)
from ldm.modules.vico import AttentionRecord, otsu_mask

RING = WorldObject("ring", (Part("orange", "checkered"), Part("teal", "dotted")), "vertical", "top")


def predictions_like(target: dict[str, int], count: int) -> dict[str, np.ndarray]:
    return {head: np.full(count, max(target[head], 0)) for head in OBJECT_HEADS}


def test_object_fidelity_counts_pictures_with_every_attribute_right():
    target = object_labels(RING)
    predicted = predictions_like(target, 4)
    predicted["colour_1"][1] = HEADS["colour_1"].index("blue")  # second half's colour wrong
    predicted["notch"][2] = HEADS["notch"].index("none")  # notch missed
    predicted["shape"][2] = HEADS["shape"].index("circle")  # and the shape, on the same picture
    result = object_fidelity(predicted, target)
    assert result.fidelity == pytest.approx(2 / 4)
    assert result.accuracy["colour_1"] == pytest.approx(3 / 4)
    assert result.accuracy["notch"] == pytest.approx(3 / 4) and result.accuracy["shape"] == pytest.approx(3 / 4)
    assert result.accuracy["colour_0"] == 1.0 and set(result.accuracy) == set(OBJECT_HEADS)


def test_object_fidelity_skips_what_the_concept_leaves_undefined():
    notched = WorldObject("star", (Part("red"), Part("red")), "horizontal", "left")  # halves alike: no split
    target = object_labels(notched)
    assert target["split"] == UNDEFINED
    predicted = predictions_like(target, 2)
    predicted["split"][:] = [0, 1]  # whatever the classifier says about the split does not count
    result = object_fidelity(predicted, target)
    assert result.fidelity == 1.0 and "split" not in result.accuracy


def test_object_labels_follow_the_halves():
    labels = object_labels(RING)
    assert HEADS["colour_0"][labels["colour_0"]] == "orange" and HEADS["pattern_0"][labels["pattern_0"]] == "checkered"
    assert HEADS["colour_1"][labels["colour_1"]] == "teal" and HEADS["pattern_1"][labels["pattern_1"]] == "dotted"
    assert HEADS["split"][labels["split"]] == "vertical" and HEADS["notch"][labels["notch"]] == "top"
    single = object_labels(WorldObject("heart", (Part("blue", "striped"),)))
    assert single["colour_0"] == single["colour_1"] and single["split"] == UNDEFINED


def test_feature_similarity_is_the_mean_pairwise_cosine():
    generated = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    real = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    # cosines: (1, 1/sqrt2), (0, 1/sqrt2)
    assert feature_similarity(generated, real) == pytest.approx((1 + 2 / np.sqrt(2)) / 4)
    assert feature_similarity(real, real[:1]) == pytest.approx((1 + 1 / np.sqrt(2)) / 2)


def test_prompt_fidelity():
    assert prompt_fidelity([0, 1, 2, 2], [0, 1, 3, 2]) == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="one prompt scene per picture"):
        prompt_fidelity([0, 1], [0])


def test_downsample_mask_takes_the_majority_of_each_cell():
    mask = np.zeros((64, 64), dtype=bool)
    mask[:32, :32] = True
    mask[32:40, 48:64] = True  # half of the cell at (2, 3) of a 4x4 grid: kept (>= 0.5)
    mask[48:52, 0:16] = True  # a quarter of the cell at (3, 0): dropped
    grid = downsample_mask(mask, 4, 4)
    expected = np.zeros((4, 4), dtype=bool)
    expected[:2, :2] = True
    expected[2, 3] = True
    assert np.array_equal(grid, expected)
    with pytest.raises(ValueError, match="does not divide"):
        downsample_mask(mask, 5, 5)


def test_mask_iou():
    a = np.array([[1, 1, 0, 0]], dtype=bool)
    b = np.array([[0, 1, 1, 0]], dtype=bool)
    assert mask_iou(a, b) == pytest.approx(1 / 3)
    assert mask_iou(a, a) == 1.0
    assert mask_iou(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    with pytest.raises(ValueError, match="shapes"):
        mask_iou(a, b[:, :2])


def object_square() -> np.ndarray:
    """A 64x64 true mask: the square of pixels 16..47 (the middle 4x4 of an 8x8 grid)."""
    mask = np.zeros((64, 64), dtype=bool)
    mask[16:48, 16:48] = True
    return mask


def test_mask_iou_of_an_otsu_mask_on_a_hand_made_attention_map():
    truth = object_square()
    attention = torch.full((8, 8), 0.05)
    attention[2:6, 2:6] = 0.9  # S* attends to the object's patches
    attention[0, 0] = 0.6  # and to one background patch
    placeholder_map = attention.reshape(1, 64)
    mask = otsu_mask(placeholder_map)
    record = AttentionRecord(layer=10, placeholder_map=placeholder_map, mask=mask, height=8, width=8)
    ious = attention_mask_iou([record], [truth])
    assert ious == {10: pytest.approx(16 / 17)}  # the 16 object patches plus the stray one
    shifted = torch.roll(attention, shifts=2, dims=1).reshape(1, 64)
    moved = AttentionRecord(layer=12, placeholder_map=shifted, mask=otsu_mask(shifted), height=8, width=8)
    assert attention_mask_iou([moved], [truth])[12] == pytest.approx(8 / 25)  # 8 shared of 8 + 16 + 1 patches
    with pytest.raises(ValueError, match="reference masks"):
        attention_mask_iou([record], [truth, truth])


def test_all_patches_iou_is_the_object_share_of_the_grid():
    assert all_patches_iou(object_square(), 8, 8) == pytest.approx(16 / 64)
    assert all_patches_iou(object_square(), 4, 4) == pytest.approx(4 / 16)


def test_mean_dicts():
    assert mean_dicts([{8: 0.2, 10: 0.4}, {8: 0.4, 10: 0.6}]) == {8: pytest.approx(0.3), 10: pytest.approx(0.5)}
