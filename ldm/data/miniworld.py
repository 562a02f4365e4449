"""The miniature world: a deterministic renderer of 64x64 scenes whose ground truth is known.

Every scene is one main object (and optionally a second, smaller one) on a background that
reads as a place, with a caption that names what is drawn and the main object's pixel mask.
It is the training data of the project's own small base model (``models/miniworld/``) and the
instrument that measures ViCo where Stable Diffusion weights cannot exist: the attributes
and the mask of every object are known exactly.

Vocabulary: :data:`SHAPES`, :data:`COLOURS`, :data:`PATTERNS`, :data:`SCENES`. An object is
single-part (one colour, one pattern: its caption names all of it) or a **composite**: its left
and right halves (or top and bottom) have their own colour and pattern, and it may have a notch
cut out; a caption names only a composite's shape and colours ("an orange and teal ring"), never
its patterns, split or notch. A **concept** (what ViCo learns) is a composite described by a
small YAML spec (:class:`ConceptSpec`) and drawn in new poses, sizes and scenes; the pretraining
world draws composites too, but never one with a reserved concept's shape and colours.

Geometry: an object lives in its own coordinates ``(u, v)`` in ``[-1, 1]``, ``v`` pointing
up, scaled by its radius in pixels and rotated by its angle; patterns and halves are defined
in those coordinates, so they move with the object. Every picture is rendered at
``supersample`` times the resolution and box-filtered down, which anti-aliases the edges.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

Array = np.ndarray

# ---------------------------------------------------------------- vocabulary
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (0.98, 0.88, 0.10),
    "green": (0.15, 0.68, 0.20),
    "teal": (0.00, 0.60, 0.60),
    "blue": (0.15, 0.30, 0.90),
    "purple": (0.55, 0.20, 0.75),
    "pink": (1.00, 0.50, 0.75),
    "white": (0.97, 0.97, 0.97),
    "black": (0.08, 0.08, 0.08),
}
PATTERNS = ("plain", "striped", "dotted", "checkered")
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "heart", "hexagon")
#: Scene name -> the phrase captions use for it.
SCENES: dict[str, str] = {
    "beach": "on the beach",
    "grass": "on the grass",
    "snow": "in the snow",
    "night": "under the night sky",
    "brick": "in front of a brick wall",
    "water": "on the water",
    "desert": "in the desert",
    "studio": "on a plain background",
}
SPLITS = ("vertical", "horizontal")
NOTCHES = ("none", "top", "bottom", "left", "right")
CAPTION_TEMPLATES = (
    "a photo of {object} {scene}",
    "{object} {scene}",
    "a picture of {object} {scene}",
    "a rendering of {object} {scene}",
)
IMAGE_SIZE = 64


# --------------------------------------------------------------- what is drawn
@dataclass(frozen=True)
class Part:
    """Colour and surface pattern of an object, or of one half of a composite."""

    colour: str
    pattern: str = "plain"

    def __post_init__(self) -> None:
        _check("colour", self.colour, COLOURS)
        _check("pattern", self.pattern, PATTERNS)


@dataclass(frozen=True)
class WorldObject:
    """A shape with one part (pretraining objects) or two halves (concepts).

    Attributes:
        shape: one of :data:`SHAPES`.
        parts: one :class:`Part`, or two: (left, right) for a vertical split, (top, bottom)
            for a horizontal one.
        split: where two parts meet, ``"vertical"`` (left | right) or ``"horizontal"``.
        notch: a wedge cut from one side (``"none"`` for pretraining objects).
    """

    shape: str
    parts: tuple[Part, ...]
    split: str = "vertical"
    notch: str = "none"

    def __post_init__(self) -> None:
        _check("shape", self.shape, SHAPES)
        _check("split", self.split, SPLITS)
        _check("notch", self.notch, NOTCHES)
        if len(self.parts) not in (1, 2):
            raise ValueError(f"an object has one or two parts, got {len(self.parts)}")

    @property
    def halves(self) -> tuple[Part, Part]:
        """(left, right) or (top, bottom); a single-part object has two equal halves."""
        return (self.parts[0], self.parts[-1])

    @property
    def is_composite(self) -> bool:
        return (len(self.parts) == 2 and self.parts[0] != self.parts[1]) or self.notch != "none"

    def phrase(self) -> str:
        """The words a caption uses: ``"red striped star"`` (plain is not said) for a single-part
        object; for a composite only its colours and shape, ``"orange and teal ring"``, so that
        no caption names a composite exactly."""
        if self.is_composite:
            first, second = (part.colour for part in self.halves)
            colours = first if first == second else f"{first} and {second}"
            return f"{colours} {self.shape}"
        part = self.parts[0]
        words = [part.colour, *([] if part.pattern == "plain" else [part.pattern]), self.shape]
        return " ".join(words)

    def resembles(self, other: WorldObject) -> bool:
        """Same shape and the same colours in either order: what a caption cannot tell apart."""
        return self.shape == other.shape and sorted(p.colour for p in self.halves) == sorted(
            p.colour for p in other.halves
        )


@dataclass(frozen=True)
class Pose:
    """Where an object is drawn: centre (pixels, y down), radius (pixels), angle (degrees, counter-clockwise)."""

    x: float
    y: float
    radius: float
    angle: float = 0.0


@dataclass(frozen=True)
class Scene:
    """Everything that determines one picture; :func:`render` is a pure function of it."""

    background: str
    main: WorldObject
    main_pose: Pose
    extra: WorldObject | None = None
    extra_pose: Pose | None = None
    texture_seed: int = 0
    template: int = 0

    def __post_init__(self) -> None:
        _check("scene", self.background, SCENES)
        if (self.extra is None) != (self.extra_pose is None):
            raise ValueError("a second object needs both an object and a pose")

    def caption(self, subject: str | None = None) -> str:
        """The caption; ``subject`` (e.g. ``"*"``) replaces the main object's words."""
        main = subject if subject is not None else with_article(self.main.phrase())
        if self.extra is not None:
            main = f"{main} and a small {self.extra.phrase()}"
        return CAPTION_TEMPLATES[self.template].format(object=main, scene=SCENES[self.background])


@dataclass
class Rendering:
    """A rendered scene: ``image`` uint8 ``[H, W, 3]``, ``mask`` bool ``[H, W]`` of the main
    object (coverage >= 0.5, after anything drawn over it), and the caption."""

    image: Array
    mask: Array
    caption: str
    coverage: Array = field(repr=False)


def with_article(phrase: str) -> str:
    """``"an orange ring"``, ``"a red star"``: the phrase with its indefinite article."""
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _check(kind: str, value: str, allowed: Sequence[str] | Mapping[str, Any]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; choose one of {', '.join(allowed)}")


# ------------------------------------------------------------------- geometry
def _polygon_inside(u: Array, v: Array, vertices: Sequence[tuple[float, float]]) -> Array:
    """Points inside a polygon (even-odd rule), vectorised over the grid."""
    inside = np.zeros(u.shape, dtype=bool)
    count = len(vertices)
    for i in range(count):
        x0, y0 = vertices[i]
        x1, y1 = vertices[(i + 1) % count]
        crosses = (y0 > v) != (y1 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (u < x_at)
    return inside


def _regular(count: int, radius: float, phase: float) -> list[tuple[float, float]]:
    angles = phase + 2 * np.pi * np.arange(count) / count
    return [(radius * np.cos(a), radius * np.sin(a)) for a in angles]


def _star_vertices() -> list[tuple[float, float]]:
    outer = _regular(5, 1.0, np.pi / 2)
    inner = _regular(5, 0.45, np.pi / 2 + np.pi / 5)
    return [p for pair in zip(outer, inner) for p in pair]


_TRIANGLE = _regular(3, 1.0, np.pi / 2)
_TRIANGLE = [(x, y - 0.15) for x, y in _TRIANGLE]  # centre the area, not the circumcircle
_STAR = _star_vertices()
_HEXAGON = _regular(6, 0.95, 0.0)


def shape_inside(shape: str, u: Array, v: Array) -> Array:
    """Whether object coordinates ``(u, v)`` lie inside ``shape`` (radius 1)."""
    r2 = u * u + v * v
    if shape == "circle":
        return r2 <= 0.9**2
    if shape == "ring":
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.75
    if shape == "triangle":
        return _polygon_inside(u, v, _TRIANGLE)
    if shape == "star":
        return _polygon_inside(u, v, _STAR)
    if shape == "hexagon":
        return _polygon_inside(u, v, _HEXAGON)
    if shape == "cross":
        arm, length = 0.32, 0.95
        return ((np.abs(u) <= arm) & (np.abs(v) <= length)) | ((np.abs(v) <= arm) & (np.abs(u) <= length))
    if shape == "heart":
        x, y = u * 1.25, v * 1.25 + 0.15
        return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0
    raise ValueError(f"unknown shape {shape!r}")


def notch_inside(notch: str, u: Array, v: Array) -> Array:
    """The wedge a notch removes: a triangle cut from one side towards the centre."""
    if notch == "none":
        return np.zeros(u.shape, dtype=bool)
    along, across = {"top": (v, u), "bottom": (-v, u), "right": (u, v), "left": (-u, v)}[notch]
    return along >= 0.25 + 1.6 * np.abs(across)


def pattern_ink(pattern: str, u: Array, v: Array) -> Array:
    """Where a pattern puts its darker ink, in object coordinates."""
    if pattern == "plain":
        return np.zeros(u.shape, dtype=bool)
    if pattern == "striped":
        return np.floor((u + 1.0) / 0.33) % 2 == 1
    if pattern == "dotted":
        cell = 0.5
        du = (u + 1.0) % cell - cell / 2
        dv = (v + 1.0) % cell - cell / 2
        return du * du + dv * dv <= 0.13**2
    if pattern == "checkered":
        return (np.floor((u + 1.0) / 0.4) + np.floor((v + 1.0) / 0.4)) % 2 == 1
    raise ValueError(f"unknown pattern {pattern!r}")


def ink_colour(colour: str) -> Array:
    """The pattern colour that goes with an object colour: a darker shade (grey on black)."""
    rgb = np.array(COLOURS[colour])
    return np.array([0.5, 0.5, 0.5]) if colour == "black" else rgb * 0.4


def _object_coordinates(pose: Pose, xs: Array, ys: Array) -> tuple[Array, Array]:
    """Image coordinates (pixels, y down) -> object coordinates (radius 1, v up, unrotated)."""
    dx, dy = (xs - pose.x) / pose.radius, -(ys - pose.y) / pose.radius
    angle = np.deg2rad(pose.angle)
    cos, sin = np.cos(angle), np.sin(angle)
    return cos * dx + sin * dy, -sin * dx + cos * dy


def draw_object(canvas: Array, obj: WorldObject, pose: Pose, xs: Array, ys: Array) -> Array:
    """Paint ``obj`` onto ``canvas`` ``[H, W, 3]`` (in place); returns its coverage ``[H, W]``."""
    u, v = _object_coordinates(pose, xs, ys)
    inside = shape_inside(obj.shape, u, v) & ~notch_inside(obj.notch, u, v)
    first_half = (u < 0) if obj.split == "vertical" else (v >= 0)
    for half, part in zip((first_half, ~first_half), obj.halves):
        region = inside & half
        ink = pattern_ink(part.pattern, u, v)
        canvas[region & ~ink] = COLOURS[part.colour]
        canvas[region & ink] = ink_colour(part.colour)
    return inside


# ---------------------------------------------------------------- backgrounds
def _noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> Array:
    return rng.normal(0.0, scale, shape)[..., None]


def _vertical_gradient(ys: Array, top: Sequence[float], bottom: Sequence[float], y0: float, y1: float) -> Array:
    t = np.clip((ys - y0) / max(y1 - y0, 1e-6), 0, 1)[..., None]
    return (1 - t) * np.array(top) + t * np.array(bottom)


def draw_background(scene: str, xs: Array, ys: Array, size: int, rng: np.random.Generator) -> Array:
    """A ``[H, W, 3]`` float picture of a named place; ``rng`` varies horizon, colours, texture."""
    h, w = xs.shape
    canvas = np.empty((h, w, 3), dtype=np.float32)
    jitter = rng.uniform(-0.04, 0.04, 3)
    if scene == "beach":
        horizon = size * rng.uniform(0.28, 0.4)
        shore = horizon + size * rng.uniform(0.15, 0.22) + 1.5 * np.sin(xs / size * 6 + rng.uniform(0, 6))
        canvas[:] = _vertical_gradient(ys, (0.55, 0.78, 0.98), (0.78, 0.9, 1.0), 0, horizon)
        sea = (ys >= horizon) & (ys < shore)
        canvas[sea] = np.array((0.1, 0.45, 0.8)) + jitter
        sand = ys >= shore
        canvas[sand] = np.array((0.93, 0.84, 0.6)) + jitter + _noise(rng, (h, w), 0.03)[sand]
    elif scene == "grass":
        horizon = size * rng.uniform(0.2, 0.35)
        canvas[:] = _vertical_gradient(ys, (0.5, 0.75, 0.97), (0.75, 0.88, 1.0), 0, horizon)
        field_ = ys >= horizon
        blades = (np.sin(xs * 2.1 + rng.uniform(0, 6)) * np.sin(ys * 0.7) > 0.6)[..., None]
        grass = np.array((0.25, 0.6, 0.2)) + jitter - 0.12 * blades + _noise(rng, (h, w), 0.04)
        canvas[field_] = grass[field_]
    elif scene == "snow":
        horizon = size * rng.uniform(0.25, 0.4)
        canvas[:] = _vertical_gradient(ys, (0.72, 0.76, 0.82), (0.85, 0.88, 0.92), 0, horizon)
        ground = ys >= horizon
        shade = 0.06 * np.sin(xs / size * 5 + rng.uniform(0, 6))[..., None]
        snow = np.array((0.95, 0.97, 1.0)) - np.abs(shade) * np.array((1.0, 0.6, 0.0))
        canvas[ground] = snow[ground]
        flakes = rng.random((h, w)) < 0.012
        canvas[flakes & ~ground] = 1.0
    elif scene == "night":
        canvas[:] = _vertical_gradient(ys, (0.02, 0.03, 0.12), (0.08, 0.1, 0.28), 0, size)
        stars = rng.random((h, w)) < 0.015
        canvas[stars] = rng.uniform(0.75, 1.0, (int(stars.sum()), 1))
    elif scene == "brick":
        row_height, brick_width = size / 8, size / 4
        row = np.floor(ys / row_height)
        offset = (row % 2) * brick_width / 2 + rng.uniform(0, brick_width)
        mortar = ((ys % row_height) < size / 64 * 1.2) | (((xs + offset) % brick_width) < size / 64 * 1.2)
        brick_id = row * 16 + np.floor((xs + offset) / brick_width)
        shade = (np.sin(brick_id * 12.9898 + rng.uniform(0, 6)) * 0.06)[..., None]
        canvas[:] = np.array((0.66, 0.27, 0.18)) + jitter + shade
        canvas[mortar] = (0.78, 0.76, 0.72)
    elif scene == "water":
        phase = rng.uniform(0, 2 * np.pi)
        waves = np.sin(xs / size * 2 * np.pi * 1.5 + phase + 0.35 * np.sin(ys)) * np.sin(ys / size * 2 * np.pi * 5)
        canvas[:] = np.array((0.05, 0.35, 0.7)) + jitter
        canvas[waves > 0.55] = (0.55, 0.78, 0.95)
    elif scene == "desert":
        horizon = size * rng.uniform(0.3, 0.45) + 3 * np.sin(xs / size * 4 + rng.uniform(0, 6))
        canvas[:] = _vertical_gradient(ys, (0.98, 0.72, 0.35), (1.0, 0.88, 0.6), 0, size * 0.4)
        dunes = ys >= horizon
        ridge = 0.06 * np.sin(xs / size * 9 + ys / size * 4)[..., None]
        sand = np.array((0.85, 0.62, 0.32)) + jitter + ridge
        canvas[dunes] = sand[dunes]
    elif scene == "studio":
        grey = rng.uniform(0.78, 0.9)
        r2 = ((xs - size / 2) ** 2 + (ys - size / 2) ** 2) / (size / 2) ** 2
        canvas[:] = (grey - 0.08 * r2)[..., None] * np.ones(3)
    else:
        raise ValueError(f"unknown scene {scene!r}")
    return canvas


# ------------------------------------------------------------------ rendering
def render(scene: Scene, size: int = IMAGE_SIZE, supersample: int = 2, subject: str | None = None) -> Rendering:
    """Draw a scene: background, then the main object, then the second object on top.

    Args:
        scene: what to draw.
        size: output side in pixels.
        supersample: drawing resolution factor (anti-aliasing by box filtering).
        subject: replaces the main object's words in the caption (e.g. ``"*"``).
    """
    high = size * supersample
    coords = ((np.arange(high) + 0.5) / supersample).astype(np.float32)
    xs, ys = np.meshgrid(coords, coords)
    rng = np.random.default_rng(scene.texture_seed)
    canvas = draw_background(scene.background, xs, ys, size, rng)
    covered = draw_object(canvas, scene.main, scene.main_pose, xs, ys)
    if scene.extra is not None:
        covered &= ~draw_object(canvas, scene.extra, scene.extra_pose, xs, ys)
    image = canvas.clip(0, 1).reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
    coverage = covered.reshape(size, supersample, size, supersample).mean(axis=(1, 3))
    return Rendering((image * 255).round().astype(np.uint8), coverage >= 0.5, scene.caption(subject), coverage)


# ------------------------------------------------------------- random scenes
def random_pose(rng: np.random.Generator, size: int, radius: tuple[float, float], max_angle: float) -> Pose:
    r = rng.uniform(*radius) * size / IMAGE_SIZE
    margin = r + size * 0.03
    return Pose(
        x=rng.uniform(margin, size - margin) if margin < size / 2 else size / 2,
        y=rng.uniform(margin, size - margin) if margin < size / 2 else size / 2,
        radius=r,
        angle=rng.uniform(-max_angle, max_angle),
    )


def random_part(rng: np.random.Generator) -> Part:
    return Part(str(rng.choice(list(COLOURS))), str(rng.choice(PATTERNS)))


def random_single_object(rng: np.random.Generator) -> WorldObject:
    part = random_part(rng)
    return WorldObject(str(rng.choice(SHAPES)), (part,))


def random_world_object(rng: np.random.Generator, composite_probability: float) -> WorldObject:
    """A single-part object, or (with ``composite_probability``) two random halves, a random split and notch."""
    shape = str(rng.choice(SHAPES))
    if rng.random() >= composite_probability:
        return WorldObject(shape, (random_part(rng),))
    parts = (random_part(rng), random_part(rng))
    return WorldObject(shape, parts, str(rng.choice(SPLITS)), str(rng.choice(NOTCHES)))


@dataclass(frozen=True)
class WorldSampler:
    """Random pretraining scenes: one main object, sometimes a small single-part second one.

    Attributes:
        composite_probability: how often the main object is a composite (else single-part).
        reserved: composites never drawn: none that :meth:`WorldObject.resembles` one of these
            (the personalisation concepts) is, so no caption of the world names a concept's
            shape and colours together.
        main_radius: range of the main object's radius in pixels (at 64 px).
        extra_radius: range of the second object's radius.
        extra_probability: how often a second object is drawn.
        max_angle: rotations are uniform in ``[-max_angle, max_angle]`` degrees.
    """

    main_radius: tuple[float, float] = (12.0, 22.0)
    extra_radius: tuple[float, float] = (6.0, 8.5)
    extra_probability: float = 0.25
    max_angle: float = 30.0
    size: int = IMAGE_SIZE
    composite_probability: float = 0.0
    reserved: tuple[WorldObject, ...] = ()

    def scene(self, seed: int, main: WorldObject | None = None, background: str | None = None) -> Scene:
        """The scene of ``seed``; ``main`` and ``background`` fix those choices."""
        rng = np.random.default_rng(seed)
        main = main if main is not None else self._random_main(rng)
        background = background if background is not None else str(rng.choice(list(SCENES)))
        main_pose = random_pose(rng, self.size, self.main_radius, self.max_angle)
        extra = extra_pose = None
        if rng.random() < self.extra_probability:
            extra = random_single_object(rng)
            extra_pose = self._away_from(rng, main_pose)
        return Scene(
            background=background,
            main=main,
            main_pose=main_pose,
            extra=extra,
            extra_pose=extra_pose,
            texture_seed=int(rng.integers(2**31)),
            template=int(rng.integers(len(CAPTION_TEMPLATES))),
        )

    def _random_main(self, rng: np.random.Generator) -> WorldObject:
        if self.composite_probability == 0.0:
            return random_single_object(rng)
        while True:
            main = random_world_object(rng, self.composite_probability)
            if not (main.is_composite and any(main.resembles(r) for r in self.reserved)):
                return main

    def _away_from(self, rng: np.random.Generator, main: Pose) -> Pose:
        """A small pose whose centre lies outside the main object (best of a few tries)."""
        best, best_distance = None, -np.inf
        for _ in range(8):
            pose = random_pose(rng, self.size, self.extra_radius, self.max_angle)
            distance = np.hypot(pose.x - main.x, pose.y - main.y) - main.radius - pose.radius
            if distance > best_distance:
                best, best_distance = pose, distance
            if distance > 0:
                break
        return best


# ------------------------------------------------------------------- concepts
@dataclass(frozen=True)
class ConceptSpec:
    """A personalisation concept: a composite object no caption can name, read from YAML.

    Example (``configs/miniworld/concepts/sunset_ring.yaml``)::

        name: sunset_ring
        init_word: ring          # one CLIP token: S* starts from it
        shape: ring
        split: vertical          # parts are (left, right); horizontal: (top, bottom)
        parts:
          - {colour: orange, pattern: checkered}
          - {colour: teal, pattern: dotted}
        notch: top               # none, top, bottom, left or right
    """

    name: str
    init_word: str
    object: WorldObject

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "concept") -> ConceptSpec:
        """Check every field's presence and type, then build; each mistake is a one-line ``ValueError``."""
        known = {"name", "init_word", "shape", "split", "parts", "notch"}
        unknown = sorted(str(key) for key in set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown field {unknown[0]!r}; fields are {', '.join(sorted(known))}")
        for required in ("name", "shape", "parts"):
            if required not in data:
                raise ValueError(f"{source}: missing field {required!r}")
        for name in ("name", "init_word", "shape", "split", "notch"):
            if name in data and not isinstance(data[name], str):
                raise ValueError(f"{source}: {name} must be a word, got {data[name]!r}")
        if not CONCEPT_NAME.match(data["name"]):
            raise ValueError(f"{source}: name {data['name']!r} must be letters, digits, '_' or '-' (it names folders)")
        init_word = data.get("init_word", data["shape"])
        if not init_word or len(init_word.split()) != 1:
            raise ValueError(f"{source}: init_word must be one word, got {init_word!r}")
        parts_data = data["parts"]
        if not isinstance(parts_data, Sequence) or isinstance(parts_data, str) or len(parts_data) != 2:
            raise ValueError(f"{source}: 'parts' must list two parts, e.g. [{{colour: red, pattern: dotted}}, ...]")
        for part in parts_data:
            if not isinstance(part, Mapping) or "colour" not in part or set(part) - {"colour", "pattern"}:
                raise ValueError(f"{source}: each part is {{colour: ..., pattern: ...}} (pattern optional), got {part!r}")
            for name, value in part.items():
                if not isinstance(value, str):
                    raise ValueError(f"{source}: a part's {name} must be a word, got {value!r}")
        try:
            parts = tuple(Part(p["colour"], p.get("pattern", "plain")) for p in parts_data)
            obj = WorldObject(data["shape"], parts, data.get("split", "vertical"), data.get("notch", "none"))
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None
        if not obj.is_composite:
            raise ValueError(f"{source}: a concept must not be nameable: give its parts different looks or a notch")
        return cls(data["name"], init_word, obj)

    @classmethod
    def load(cls, path: str | Path) -> ConceptSpec:
        """A spec file, or the ``concept.yaml`` of a concept folder (a folder may be given),
        whose provenance fields (``photos``, ``seed``: how make-concept drew the photos) are
        not part of the spec."""
        path = Path(path)
        if path.is_dir():
            path = path / "concept.yaml"
        if not path.is_file():
            raise ValueError(f"concept spec not found: {path}")
        try:
            data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}:" if mark else ""
            raise ValueError(f"{path}:{where} not valid YAML ({getattr(err, 'problem', None) or type(err).__name__})") from None
        except (OmegaConfBaseException, UnicodeDecodeError, OSError) as err:
            raise ValueError(f"{path}: cannot read the spec ({' '.join(str(err).split()[:12])})") from None
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: a concept spec is a mapping of fields (name, shape, parts, ...)")
        spec = {key: value for key, value in data.items() if key not in CONCEPT_FOLDER_FIELDS}
        return cls.from_mapping(spec, str(path))

    def to_mapping(self) -> dict[str, Any]:
        obj = self.object
        return {
            "name": self.name,
            "init_word": self.init_word,
            "shape": obj.shape,
            "split": obj.split,
            "parts": [{"colour": p.colour, "pattern": p.pattern} for p in obj.parts],
            "notch": obj.notch,
        }


#: Fields make-concept adds to a folder's concept.yaml besides the spec: how its photos were drawn.
CONCEPT_FOLDER_FIELDS = ("photos", "seed")
#: A concept's name names folders (its photos, its evaluation).
CONCEPT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
#: Concept photos are drawn with less rotation than pretraining scenes, so that "left half"
#: stays a left half in the picture, and always alone (no second object).
CONCEPT_SAMPLER = WorldSampler(main_radius=(15.0, 22.0), extra_probability=0.0, max_angle=20.0)


def concept_scene(spec: ConceptSpec, seed: int, background: str | None = None) -> Scene:
    """The concept in the pose and scene of ``seed`` (``background`` fixes the scene)."""
    return CONCEPT_SAMPLER.scene(seed, main=spec.object, background=background)


def concept_seeds(spec: ConceptSpec, count: int, seed: int = 0) -> list[int]:
    """Scene seeds of a concept folder: distinct per concept name, independent of the world's seeds."""
    key = np.random.SeedSequence([seed, *map(ord, spec.name)])
    return [int(s) for s in key.generate_state(count)]


def render_many(scenes: Sequence[Scene], progress: Callable[[int], None] | None = None) -> tuple[Array, Array]:
    """Render scenes into ``uint8 [N, H, W, 3]`` images and ``bool [N, H, W]`` masks."""
    images = np.empty((len(scenes), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    masks = np.empty((len(scenes), IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for i, scene in enumerate(scenes):
        rendering = render(scene)
        images[i], masks[i] = rendering.image, rendering.mask
        if progress is not None:
            progress(1)
    return images, masks
