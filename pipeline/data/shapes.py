"""The captioned-shapes dataset: scenes of one or two coloured shapes, their captions and pixels.

A tiny text-to-image cascade has to learn something in minutes on a CPU, and an evaluator has to
tell whether a generated image follows its prompt without a second neural network. Both ask for the
same data: a handful of saturated colours, five shapes whose outlines differ in simple geometric
features (:mod:`pipeline.data.shape_checker` reads them back), neutral backgrounds that never look like an
object colour, and captions that always name every object's colour and shape and are true of the
pixels whenever they say more (sizes, positions, relations, backgrounds).

Everything is a pure function: :func:`sample_scene` of ``(seed, index)`` alone, :func:`render` of the
scene and the image size alone (the small position jitter is derived from the scene's content), so a
dataset is reproducible byte for byte whatever the parallelism that wrote it. No I/O, no torch.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# Saturated object colours, far apart in hue (about 0, 33, 55, 127, 224 and 282 degrees) so that a
# blurry or JPEG-shifted pixel still lands on the right name.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (240, 220, 20),
    "green": (20, 180, 40),
    "blue": (30, 80, 230),
    "purple": (150, 40, 210),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

# Object side as a fraction of the image side: a small star still covers ~3% of a 64 px image, and
# two large objects half an image apart still leave a gap of ~4 px at 64 px.
SIZES: dict[str, float] = {"small": 0.28, "large": 0.44}

# Named object centres, (x, y) in [0, 1]^2 with y pointing down.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top": (0.5, 0.25),
    "top right": (0.75, 0.25),
    "left": (0.25, 0.5),
    "center": (0.5, 0.5),
    "right": (0.75, 0.5),
    "bottom left": (0.25, 0.75),
    "bottom": (0.5, 0.75),
    "bottom right": (0.75, 0.75),
}

# Neutral backgrounds (chroma <= 30 of 255): the checker treats them as "no object" at any brightness.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "light gray": (200, 200, 200),
    "gray": (128, 128, 128),
    "dark gray": (64, 64, 64),
    "black": (0, 0, 0),
    "beige": (238, 228, 208),
}

_SPLITS: tuple[str, ...] = ("vertical", "horizontal", "diagonal")

# Two-object layouts: (first position, second position); the first is above and/or left of the second,
# half an image apart along the axis (or axes) that separate them.
_PAIR_LAYOUTS: tuple[tuple[str, str], ...] = (
    ("left", "right"),
    ("top left", "top right"),
    ("bottom left", "bottom right"),
    ("top", "bottom"),
    ("top left", "bottom left"),
    ("top right", "bottom right"),
    ("top left", "bottom right"),
    ("top right", "bottom left"),
)

_JITTER = 0.03  # largest position offset, as a fraction of the side
_MARGIN = 0.02  # every object keeps this far from the image border
_MIN_GAP = 0.05  # two objects keep at least this gap along the axis that separates them

_POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left corner", "at the top left", "in the upper left corner"),
    "top right": ("in the top right corner", "at the top right", "in the upper right corner"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left corner"),
    "bottom right": (
        "in the bottom right corner",
        "at the bottom right",
        "in the lower right corner",
    ),
    "center": ("in the center", "in the middle"),
    "top": ("at the top", "at the top of the image"),
    "bottom": ("at the bottom", "at the bottom of the image"),
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
}


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene; every field is a name from the vocabulary dicts above."""

    shape: str
    color: str
    size: str
    position: str

    def __post_init__(self) -> None:
        _check_name("shape", self.shape, SHAPES)
        _check_name("color", self.color, COLORS)
        _check_name("size", self.size, SIZES)
        _check_name("position", self.position, POSITIONS)


@dataclass(frozen=True)
class Scene:
    """What an image shows and its caption: everything :func:`render` needs."""

    objects: tuple[ShapeObject, ...]
    background: tuple[str, ...]
    split: str
    caption: str

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a scene has 1 or 2 objects, got {len(self.objects)}")
        if len({o.color for o in self.objects}) != len(self.objects):
            raise ValueError("two objects of a scene never share a colour")
        if len(self.background) not in (1, 2):
            raise ValueError(f"background is 1 or 2 names, got {self.background!r}")
        for name in self.background:
            _check_name("background", name, BACKGROUNDS)
        if len(self.background) == 1 and self.split:
            raise ValueError(f"a plain background has no split, got {self.split!r}")
        if len(self.background) == 2:
            _check_name("split", self.split, _SPLITS)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict; :meth:`from_json` gives the same scene back."""
        return {
            "objects": [
                {"shape": o.shape, "color": o.color, "size": o.size, "position": o.position}
                for o in self.objects
            ],
            "background": list(self.background),
            "split": self.split,
            "caption": self.caption,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> Scene:
        return Scene(
            objects=tuple(
                ShapeObject(
                    shape=o["shape"], color=o["color"], size=o["size"], position=o["position"]
                )
                for o in d["objects"]
            ),
            background=tuple(d["background"]),
            split=d["split"],
            caption=d["caption"],
        )


def _check_name(kind: str, name: str, names: Any) -> None:
    if name not in names:
        raise ValueError(f"unknown {kind} {name!r}; expected one of {', '.join(names)}")


def all_pairs() -> list[tuple[str, str]]:
    """Every ``(color, shape)`` combination, colour-major."""
    return [(color, shape) for color in COLORS for shape in SHAPES]


# ---------------------------------------------------------------------------------------------
# Sampling


def sample_scene(
    seed: int,
    index: int,
    *,
    max_objects: int = 2,
    two_tone_prob: float = 0.3,
    exclude_pairs: frozenset[tuple[str, str]] = frozenset(),
    require_pairs: frozenset[tuple[str, str]] = frozenset(),
    positions: Sequence[str] | None = None,
    sizes: Sequence[str] | None = None,
) -> Scene:
    """The ``index``-th scene of the dataset with this ``seed``: a function of its arguments alone.

    ``exclude_pairs`` are ``(color, shape)`` combinations no object may have (the training split
    leaves the held-out ones out); when ``require_pairs`` is non-empty at least one object has one of
    them (the held-out split). A required pair that is also excluded is never used.

    ``positions`` and ``sizes`` narrow the vocabulary (None: all of :data:`POSITIONS` and
    :data:`SIZES`): one centred large object is what a CPU-sized decoder learns in minutes. Two-object
    scenes use only the pair layouts whose both positions are allowed. With the full vocabulary the
    scene is the same as without these arguments.
    """
    if max_objects not in (1, 2):
        raise ValueError(f"max_objects is 1 or 2, got {max_objects}")
    if not 0.0 <= two_tone_prob <= 1.0:
        raise ValueError(f"two_tone_prob is a probability, got {two_tone_prob}")
    exclude = frozenset(tuple(p) for p in exclude_pairs)
    require = frozenset(tuple(p) for p in require_pairs)
    for color, shape in exclude | require:
        _check_name("color", color, COLORS)
        _check_name("shape", shape, SHAPES)
    allowed = [p for p in all_pairs() if p not in exclude]
    required = sorted(require - exclude)
    if not allowed:
        raise ValueError("exclude_pairs leaves no (color, shape) pair")
    if require and not required:
        raise ValueError("every pair of require_pairs is also in exclude_pairs")
    position_names = _vocabulary("position", positions, POSITIONS)
    size_names = _vocabulary("size", sizes, SIZES)
    layouts = [lay for lay in _PAIR_LAYOUTS if set(lay) <= set(position_names)]
    if max_objects == 2 and not layouts:
        raise ValueError(
            f"two objects need a pair layout within positions {list(position_names)}; "
            f"the layouts are {[list(lay) for lay in _PAIR_LAYOUTS]}"
        )

    rng = random.Random(f"unclip-shapes:{seed}:{index}")
    n_objects = rng.randint(1, max_objects)
    first = rng.choice(required) if required else rng.choice(allowed)
    pairs = [first]
    others = [p for p in allowed if p[0] != first[0]]
    if n_objects == 2 and others:
        pairs.append(rng.choice(others))
        rng.shuffle(pairs)

    placed = [rng.choice(position_names)] if len(pairs) == 1 else list(rng.choice(layouts))
    objects = tuple(
        ShapeObject(shape=shape, color=color, size=rng.choice(size_names), position=position)
        for (color, shape), position in zip(pairs, placed, strict=True)
    )
    if len(objects) == 2 and rng.random() < 0.5:
        objects = objects[::-1]  # caption order need not be reading order

    if rng.random() < two_tone_prob:
        background = tuple(rng.sample(list(BACKGROUNDS), 2))
        split = rng.choice(_SPLITS)
    else:
        background = (rng.choice(list(BACKGROUNDS)),)
        split = ""
    caption = _caption(rng, objects, background, split)
    return Scene(objects=objects, background=background, split=split, caption=caption)


def _vocabulary(kind: str, names: Sequence[str] | None, known: dict[str, Any]) -> list[str]:
    """``names`` checked against ``known`` and put in its order (so a subset's draws do not depend
    on how the caller ordered it); all of ``known`` when None."""
    if names is None:
        return list(known)
    if not names:
        raise ValueError(f"{kind}s: at least one {kind} is needed")
    for name in names:
        _check_name(kind, name, known)
    return [name for name in known if name in set(names)]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(rng: random.Random, obj: ShapeObject, *, size_prob: float = 0.5) -> str:
    """``a [size] color shape``; the colour word always sits right before the shape word."""
    words = [obj.color, obj.shape]
    if rng.random() < size_prob:
        words.insert(0, obj.size)
    return f"{_article(words[0])} {' '.join(words)}"


def _background_phrase(rng: random.Random, background: tuple[str, ...], split: str) -> str:
    """``on a ... background`` (or ``against``), true of the rendered background."""
    preposition = rng.choice(("on", "against"))
    if len(background) == 1:
        return f"{preposition} {_article(background[0])} {background[0]} background"
    a, b = background
    options = [f"{preposition} {_article(a)} {a} and {b} background"]
    if split == "vertical":
        options.append(f"on a background that is {a} on the left and {b} on the right")
    elif split == "horizontal":
        options.append(f"on a background that is {a} at the top and {b} at the bottom")
    else:
        options.append(f"on a background split diagonally into {a} and {b}")
    return rng.choice(options)


def _relation(rng: random.Random, a: ShapeObject, b: ShapeObject) -> str:
    """A relation word true of ``a`` with respect to ``b`` (their boxes are apart along that axis)."""
    (ax, ay), (bx, by) = POSITIONS[a.position], POSITIONS[b.position]
    options = []
    if ay < by:
        options.append("above")
    if ay > by:
        options.append("below")
    if ax < bx:
        options.append("to the left of")
    if ax > bx:
        options.append("to the right of")
    return rng.choice(options)


def _caption(
    rng: random.Random, objects: tuple[ShapeObject, ...], background: tuple[str, ...], split: str
) -> str:
    """One of several caption templates, filled so that everything it says is true."""
    bg = _background_phrase(rng, background, split)
    if len(objects) == 1:
        (obj,) = objects
        np_ = _noun_phrase(rng, obj)
        where = rng.choice(_POSITION_PHRASES[obj.position])
        template = rng.randrange(8)
        if template == 0:
            return np_
        if template == 1:
            return f"{np_} {where}"
        if template == 2:
            return f"{np_} {bg}"
        if template == 3:
            return f"{np_} {where} {bg}"
        if template == 4:
            plain = (
                background[0] if len(background) == 1 else f"{background[0]} and {background[1]}"
            )
            return f"{_article(plain)} {plain} background with {np_} {where}"
        if template == 5:
            return f"a picture of {np_}"
        if template == 6:
            return f"there is {np_} {where}"
        return f"a simple drawing of {np_} {bg}"
    first, second = objects
    np1, np2 = _noun_phrase(rng, first), _noun_phrase(rng, second)
    template = rng.randrange(7)
    if template == 0:
        return f"{np1} and {np2}"
    if template == 1:
        return f"{np1} {_relation(rng, first, second)} {np2}"
    if template == 2:
        where1 = rng.choice(_POSITION_PHRASES[first.position])
        where2 = rng.choice(_POSITION_PHRASES[second.position])
        return f"{np1} {where1} and {np2} {where2}"
    if template == 3:
        return f"{np1} {_relation(rng, first, second)} {np2} {bg}"
    if template == 4:
        return f"two shapes: {np1} and {np2}"
    if template == 5:
        return f"{np1} and {np2} {bg}"
    return f"a picture of {np1} {_relation(rng, first, second)} {np2}"


# ---------------------------------------------------------------------------------------------
# Captions back to (color, shape)

_WORD = re.compile(r"[a-z]+")
_PLURALS = {
    "circles": "circle",
    "squares": "square",
    "triangles": "triangle",
    "stars": "star",
    "crosses": "cross",
}


def parse_caption(caption: str) -> list[tuple[str, str]]:
    """Every ``(color, shape)`` a caption asks for, in caption order.

    A colour word counts when the next word is a shape (singular or plural), or a size word and then
    a shape ("red circle", "red small circle"; a size word before the colour is simply skipped).
    Every other word is ignored, so arbitrary prompts work: "two red circles" gives ``[("red",
    "circle")]``.
    """
    words = _WORD.findall(caption.lower())
    found: list[tuple[str, str]] = []
    for i, word in enumerate(words):
        if word not in COLORS:
            continue
        j = i + 1
        if j < len(words) and words[j] in SIZES:
            j += 1
        if j < len(words):
            shape = _PLURALS.get(words[j], words[j])
            if shape in SHAPES:
                found.append((word, shape))
    return found


# ---------------------------------------------------------------------------------------------
# Rendering


def _scene_offsets(scene: Scene) -> list[tuple[float, float]]:
    """Each object's centre offset: a few % of the side, a deterministic function of the scene.

    Offsets keep every object inside the image with a margin, and two objects apart by at least
    ``_MIN_GAP`` along each axis on which their named positions differ, so relation and corner words
    stay true. Seeded from the scene's content (not its caption), never from ``hash()``.
    """
    key = "|".join(
        [f"{o.shape},{o.color},{o.size},{o.position}" for o in scene.objects]
        + list(scene.background)
        + [scene.split]
    )
    rng = random.Random(f"unclip-shapes-jitter:{key}")
    for _ in range(32):
        offsets = [
            (rng.uniform(-_JITTER, _JITTER), rng.uniform(-_JITTER, _JITTER)) for _ in scene.objects
        ]
        if _layout_ok(scene.objects, offsets):
            return offsets
    return [(0.0, 0.0)] * len(scene.objects)


def _box(obj: ShapeObject, offset: tuple[float, float]) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` of the object's square box, in fractions of the side."""
    cx, cy = POSITIONS[obj.position]
    cx, cy = cx + offset[0], cy + offset[1]
    half = SIZES[obj.size] / 2
    return (cx - half, cy - half, cx + half, cy + half)


def _layout_ok(objects: tuple[ShapeObject, ...], offsets: list[tuple[float, float]]) -> bool:
    boxes = [_box(o, off) for o, off in zip(objects, offsets, strict=True)]
    for x0, y0, x1, y1 in boxes:
        if min(x0, y0) < _MARGIN or max(x1, y1) > 1 - _MARGIN:
            return False
    if len(boxes) == 2:
        (a, b), (pa, pb) = boxes, (POSITIONS[objects[0].position], POSITIONS[objects[1].position])
        for axis in (0, 1):
            if pa[axis] == pb[axis]:
                continue
            lo, hi = (a, b) if pa[axis] < pb[axis] else (b, a)
            if hi[axis] - lo[axis + 2] < _MIN_GAP:
                return False
    return True


def shape_polygons(
    shape: str, cx: float, cy: float, side: float
) -> list[list[tuple[float, float]]]:
    """Polygons (pixel coordinates) whose union is the shape; a circle is a 96-gon."""
    h = side / 2
    if shape == "circle":
        n = 96
        return [
            [
                (cx + h * math.cos(2 * math.pi * k / n), cy + h * math.sin(2 * math.pi * k / n))
                for k in range(n)
            ]
        ]
    if shape == "square":
        return [[(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]]
    if shape == "triangle":
        return [[(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]]
    if shape == "cross":
        a = side / 6
        return [
            [(cx - h, cy - a), (cx + h, cy - a), (cx + h, cy + a), (cx - h, cy + a)],
            [(cx - a, cy - h), (cx + a, cy - h), (cx + a, cy + h), (cx - a, cy + h)],
        ]
    if shape == "star":
        # Outer radius so the star is exactly `side` wide; its box is then 0.951 side tall, centred.
        outer = h / math.sin(math.radians(72))
        inner = 0.45 * outer
        height = outer * (1 + math.cos(math.radians(36)))
        top = cy - height / 2
        sx, sy = cx, top + outer
        points = []
        for k in range(10):
            r = outer if k % 2 == 0 else inner
            angle = math.radians(-90 + 36 * k)
            points.append((sx + r * math.cos(angle), sy + r * math.sin(angle)))
        return [points]
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, size: int) -> np.ndarray:
    """The scene as a ``size`` x ``size`` x 3 uint8 image, anti-aliased.

    Drawn at 2-8x the size (at most 2048 px) and box-downsampled, so edges are smooth and the work at
    1024 px stays at one 2048 px canvas.
    """
    if not 16 <= size <= 1024:
        raise ValueError(f"size must be in [16, 1024], got {size}")
    scale = max(2, min(8, 2048 // size))
    big = size * scale
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background[0]])
    draw = ImageDraw.Draw(image)
    if len(scene.background) == 2:
        other = BACKGROUNDS[scene.background[1]]
        if scene.split == "vertical":
            region = [(big / 2, 0), (big, 0), (big, big), (big / 2, big)]
        elif scene.split == "horizontal":
            region = [(0, big / 2), (big, big / 2), (big, big), (0, big)]
        else:  # diagonal: the second colour below the line from top right to bottom left
            region = [(big, 0), (big, big), (0, big)]
        draw.polygon(region, fill=other)
    for obj, offset in zip(scene.objects, _scene_offsets(scene), strict=True):
        cx, cy = POSITIONS[obj.position]
        # PIL fills pixel (i, j) when its centre (i + 0.5, j + 0.5) is inside: shift by half a pixel.
        px, py = (cx + offset[0]) * big - 0.5, (cy + offset[1]) * big - 0.5
        for polygon in shape_polygons(obj.shape, px, py, SIZES[obj.size] * big):
            draw.polygon(polygon, fill=COLORS[obj.color])
    return np.asarray(image.reduce(scale))
