"""The miniature world's renderer: deterministic, masks that match the drawing, a vocabulary CLIP reads."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from ldm.data.miniworld import (
    COLOURS,
    PATTERNS,
    SCENES,
    SHAPES,
    ConceptSpec,
    Part,
    Pose,
    Scene,
    WorldObject,
    WorldSampler,
    concept_scene,
    concept_seeds,
    render,
)
from ldm.modules.encoders.modules import CLIPTokenizer

SPEC = {
    "name": "sunset_ring",
    "init_word": "ring",
    "shape": "ring",
    "split": "vertical",
    "parts": [{"colour": "orange", "pattern": "checkered"}, {"colour": "teal", "pattern": "dotted"}],
    "notch": "top",
}


def test_vocabulary_is_large_enough():
    assert len(SHAPES) >= 8 and len(COLOURS) >= 8 and len(PATTERNS) >= 4 and len(SCENES) >= 6


def test_rendering_is_a_pure_function_of_the_scene():
    sampler = WorldSampler()
    first, again, other = render(sampler.scene(5)), render(sampler.scene(5)), render(sampler.scene(6))
    assert np.array_equal(first.image, again.image) and np.array_equal(first.mask, again.mask)
    assert first.caption == again.caption
    assert not np.array_equal(first.image, other.image)
    assert first.image.shape == (64, 64, 3) and first.image.dtype == np.uint8
    assert first.mask.shape == (64, 64) and first.mask.dtype == bool


@pytest.mark.parametrize("shape", SHAPES)
def test_mask_is_where_the_object_is_drawn(shape):
    obj = WorldObject(shape, (Part("red"),))
    scene = Scene("studio", obj, Pose(30.0, 34.0, 18.0, 10.0), texture_seed=1)
    drawn = render(scene)
    far_away = replace(scene, main_pose=Pose(-500.0, -500.0, 18.0))
    background = render(far_away).image.astype(int)
    changed = np.abs(drawn.image.astype(int) - background).sum(-1) > 0
    # Fully covered pixels are exactly the object's colour; untouched ones are the background.
    red = np.round(np.array(COLOURS["red"]) * 255)
    assert np.array_equal(drawn.image[drawn.coverage == 1], np.broadcast_to(red, (int((drawn.coverage == 1).sum()), 3)))
    assert not changed[drawn.coverage == 0].any()
    assert changed[drawn.mask].all()
    assert 0.02 < drawn.mask.mean() < 0.5


def test_second_object_is_drawn_over_the_main_mask():
    main = WorldObject("square", (Part("blue"),))
    extra = WorldObject("circle", (Part("yellow"),))
    alone = render(Scene("studio", main, Pose(32, 32, 20)))
    covered = render(Scene("studio", main, Pose(32, 32, 20), extra, Pose(32, 32, 6)))
    assert covered.mask.sum() < alone.mask.sum()
    assert not covered.mask[32, 32] and alone.mask[32, 32]
    assert covered.caption == "a photo of a blue square and a small yellow circle on a plain background"


def test_captions_name_what_is_drawn():
    obj = WorldObject("star", (Part("orange", "striped"),))
    scene = Scene("beach", obj, Pose(32, 32, 15), template=0)
    assert render(scene).caption == "a photo of an orange striped star on the beach"
    assert scene.caption("*") == "a photo of * on the beach"
    assert WorldObject("ring", (Part("red", "plain"),)).phrase() == "red ring"


def test_every_caption_word_tokenises_back_to_itself():
    tokenizer = CLIPTokenizer()
    words = {w for name in [*COLOURS, *PATTERNS, *SHAPES, *SCENES.values()] for w in name.split()}
    for word in words:
        assert tokenizer._bpe.decode(tokenizer.encode(word)).strip() == word
    caption = render(WorldSampler().scene(3)).caption
    assert tokenizer([caption]).shape == (1, 77)


def test_composite_captions_name_shape_and_colours_only():
    sunset = ConceptSpec.from_mapping(SPEC).object
    assert sunset.phrase() == "orange and teal ring"
    assert Scene("snow", sunset, Pose(32, 32, 15), template=1).caption() == "an orange and teal ring in the snow"
    # What a caption cannot tell apart: the same shape and colours, whatever the patterns, order, split or notch.
    swapped = WorldObject("ring", (Part("teal", "plain"), Part("orange", "striped")), "horizontal")
    notched_single = WorldObject("ring", (Part("orange", "dotted"),), notch="left")
    assert swapped.resembles(sunset) and swapped.phrase() == "teal and orange ring"
    assert notched_single.is_composite and notched_single.phrase() == "orange ring"
    assert not notched_single.resembles(sunset)
    assert not WorldObject("star", sunset.parts).resembles(sunset)


def test_default_world_draws_single_part_objects_only():
    sampler = WorldSampler()
    assert not any(sampler.scene(seed).main.is_composite for seed in range(300))


def test_composite_world_never_draws_a_reserved_look():
    sunset = ConceptSpec.from_mapping(SPEC).object
    # One composite in 400 has the ring's look by chance: 3000 scenes hold some unless it is reserved.
    free = WorldSampler(composite_probability=1.0)
    reserving = WorldSampler(composite_probability=1.0, reserved=(sunset,))
    mains = [reserving.scene(seed).main for seed in range(3000)]
    assert 0.8 < np.mean([m.is_composite for m in mains]) <= 1.0
    assert not any(m.resembles(sunset) for m in mains if m.is_composite)
    assert any(free.scene(seed).main.resembles(sunset) for seed in range(3000))
    half = WorldSampler(composite_probability=0.5)
    assert 0.4 < np.mean([half.scene(seed).main.is_composite for seed in range(400)]) < 0.6


def test_concept_spec_round_trip_and_photos():
    spec = ConceptSpec.from_mapping(SPEC)
    assert spec.object.is_composite and ConceptSpec.from_mapping(spec.to_mapping()) == spec
    seeds = concept_seeds(spec, 5)
    assert len(set(seeds)) == 5 and seeds == concept_seeds(spec, 5)
    renderings = [render(concept_scene(spec, s), subject="*") for s in seeds]
    assert all(r.caption.count("*") == 1 for r in renderings)
    # The halves keep their colours: orange on the left of the object, teal on the right.
    for scene, r in zip([concept_scene(spec, s) for s in seeds], renderings):
        x, y = int(scene.main_pose.x), int(scene.main_pose.y)
        left = r.image[r.mask[:, :x].nonzero()[0], r.mask[:, :x].nonzero()[1]].astype(float)
        right_cols = r.mask[:, x + 1 :].nonzero()
        right = r.image[right_cols[0], right_cols[1] + x + 1].astype(float)
        assert left[:, 0].mean() > right[:, 0].mean() + 60  # orange has much more red than teal
        assert y > 0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"shape": "blob"}, "unknown shape 'blob'"),
        ({"parts": [{"colour": "red"}]}, "two parts"),
        ({"parts": [{"colour": "red"}, {"colour": "mauve"}]}, "unknown colour 'mauve'"),
        ({"parts": [{"colour": "red"}, {"colour": "red"}], "notch": "none"}, "must not be nameable"),
        ({"notch": "middle"}, "unknown notch"),
        ({"colour": "red"}, "unknown field 'colour'"),
    ],
)
def test_bad_concept_specs_are_one_line(change, message):
    with pytest.raises(ValueError, match=message):
        ConceptSpec.from_mapping({**SPEC, **change}, "spec.yaml")
