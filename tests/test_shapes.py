"""The captioned-shapes dataset and its checker: determinism, held-out pairs, true captions, and a
checker that reads the dataset's own JPEGs back at 64, 256 and 1024 px."""

from __future__ import annotations

import io
import json
import random
import re

import numpy as np
import pytest
from PIL import Image, ImageFilter

from pipeline.data.shape_checker import ObjectCheck, check_image, classify_pixels, shape_of
from pipeline.data.shapes import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    all_pairs,
    parse_caption,
    render,
    sample_scene,
)

HOLDOUT = frozenset({("red", "star"), ("blue", "triangle"), ("green", "cross")})
RELATIONS = ("above", "below", "to the left of", "to the right of")


def jpeg(image: np.ndarray, quality: int = 90) -> np.ndarray:
    """Encode and decode as the dataset stores images (Pillow's defaults: 4:2:0 chroma)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def pairs_of(scene: Scene) -> list[tuple[str, str]]:
    return [(o.color, o.shape) for o in scene.objects]


def boxes(scene: Scene, size: int = 128) -> dict[str, tuple[int, int, int, int]]:
    """Each object's pixel box ``(x0, y0, x1, y1)`` in the rendered image, found by its colour."""
    labels = classify_pixels(render(scene, size))
    out = {}
    for obj in scene.objects:
        ys, xs = np.nonzero(labels == list(COLORS).index(obj.color))
        out[obj.color] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return out


# ---------------------------------------------------------------------------------------------
# Vocabulary and sampling


def test_vocabulary() -> None:
    assert list(COLORS) == ["red", "orange", "yellow", "green", "blue", "purple"]
    assert SHAPES == ("circle", "square", "triangle", "star", "cross")
    assert set(SIZES) == {"small", "large"} and SIZES["small"] < SIZES["large"]
    assert all(0 < x < 1 and 0 < y < 1 for x, y in POSITIONS.values())
    assert len(all_pairs()) == 30 and len(set(all_pairs())) == 30
    for name, rgb in BACKGROUNDS.items():
        assert max(rgb) - min(rgb) <= 40, name  # neutral
        assert not set(name.split()) & (set(COLORS) | set(SHAPES)), name
        assert parse_caption(f"a {name} background") == []


def test_sampling_is_deterministic_and_independent_of_global_state() -> None:
    random.seed(1)
    first = [sample_scene(3, i) for i in range(50)]
    random.seed(2)
    np.random.seed(2)
    again = [sample_scene(3, i) for i in reversed(range(50))][::-1]
    assert first == again
    for i in range(5):
        assert render(first[i], 64).tobytes() == render(sample_scene(3, i), 64).tobytes()


def test_different_indices_and_seeds_give_different_scenes() -> None:
    scenes = [sample_scene(0, i) for i in range(300)]
    distinct = {json.dumps(s.to_json(), sort_keys=True) for s in scenes}
    assert len(distinct) >= 290
    images = {render(s, 32).tobytes() for s in scenes[:100]}
    assert len(images) >= 98
    assert [sample_scene(1, i) for i in range(20)] != scenes[:20]
    counts = [len(s.objects) for s in scenes]
    assert 0.35 < counts.count(2) / len(counts) < 0.65
    two_tone = sum(len(s.background) == 2 for s in scenes) / len(scenes)
    assert 0.2 < two_tone < 0.4
    assert all(len(s.objects) == 1 for s in (sample_scene(0, i, max_objects=1) for i in range(50)))
    assert all(
        len(s.background) == 1 and s.split == ""
        for s in (sample_scene(0, i, two_tone_prob=0.0) for i in range(50))
    )


def test_positions_and_sizes_narrow_the_vocabulary() -> None:
    narrow = [
        sample_scene(0, i, max_objects=1, positions=["center"], sizes=["large"]) for i in range(60)
    ]
    assert all(o.position == "center" and o.size == "large" for s in narrow for o in s.objects)
    assert len({(o.color, o.shape) for s in narrow for o in s.objects}) >= 20
    # Naming the whole vocabulary (in any order) draws exactly the default scenes.
    every = {"positions": list(reversed(POSITIONS)), "sizes": list(SIZES)}
    assert [sample_scene(2, i, **every) for i in range(40)] == [
        sample_scene(2, i) for i in range(40)
    ]
    # Two objects use only the layouts inside the allowed positions.
    sides = [sample_scene(4, i, positions=["left", "right"]) for i in range(40)]
    assert {o.position for s in sides for o in s.objects} == {"left", "right"}
    with pytest.raises(ValueError, match="pair layout"):
        sample_scene(0, 0, max_objects=2, positions=["center"])
    with pytest.raises(ValueError, match="unknown position 'middle'"):
        sample_scene(0, 0, positions=["middle"])
    with pytest.raises(ValueError, match="at least one size"):
        sample_scene(0, 0, sizes=[])


def test_scene_json_round_trip() -> None:
    for i in range(100):
        scene = sample_scene(5, i)
        data = json.loads(json.dumps(scene.to_json()))
        back = Scene.from_json(data)
        assert back == scene
        assert back.to_json() == scene.to_json()
    assert render(back, 48).tobytes() == render(scene, 48).tobytes()


def test_invalid_names_are_refused() -> None:
    with pytest.raises(ValueError, match="color"):
        ShapeObject(shape="circle", color="pink", size="small", position="center")
    with pytest.raises(ValueError, match="shape"):
        sample_scene(0, 0, exclude_pairs=frozenset({("red", "hexagon")}))
    with pytest.raises(ValueError, match="share a colour"):
        obj = ShapeObject(shape="circle", color="red", size="small", position="left")
        Scene(objects=(obj, obj), background=("white",), split="", caption="")
    with pytest.raises(ValueError):
        render(sample_scene(0, 0), 8)


def test_exclude_pairs_never_appear() -> None:
    seen = set()
    for i in range(2000):
        scene = sample_scene(11, i, exclude_pairs=HOLDOUT)
        pairs = set(pairs_of(scene))
        assert not pairs & HOLDOUT, (i, scene)
        seen |= pairs
    assert seen == set(all_pairs()) - HOLDOUT  # everything else does


def test_require_pairs_always_appear() -> None:
    seen = set()
    for i in range(2000):
        scene = sample_scene(11, i, require_pairs=HOLDOUT)
        pairs = set(pairs_of(scene))
        assert pairs & HOLDOUT, (i, scene)
        seen |= pairs & HOLDOUT
    assert seen == HOLDOUT
    with pytest.raises(ValueError):
        sample_scene(0, 0, exclude_pairs=HOLDOUT, require_pairs=HOLDOUT)


# ---------------------------------------------------------------------------------------------
# Captions


def test_captions_name_every_object() -> None:
    for i in range(2000):
        scene = sample_scene(13, i)
        assert sorted(parse_caption(scene.caption)) == sorted(pairs_of(scene)), scene


def test_parse_caption_on_free_prompts() -> None:
    assert parse_caption("A Red circle.") == [("red", "circle")]
    assert parse_caption("an orange triangle above a small purple cross") == [
        ("orange", "triangle"),
        ("purple", "cross"),
    ]
    assert parse_caption("two blue stars and a yellow large square") == [
        ("blue", "star"),
        ("yellow", "square"),
    ]
    assert parse_caption("a circle on a light gray background") == []
    assert parse_caption("a red and blue circle") == [("blue", "circle")]
    assert parse_caption("") == []


def _template(caption: str) -> str:
    """The caption with its vocabulary, position phrases and background phrases replaced by
    placeholders: what is left is the template."""
    text = caption
    for name in sorted(BACKGROUNDS, key=len, reverse=True):
        text = re.sub(rf"\b{name}\b", "BG", text)
    words = "|".join(list(SIZES) + list(COLORS) + list(SHAPES))
    text = re.sub(rf"\ban? (?:{words})(?: (?:{words}))*\b", "OBJ", text)
    text = re.sub(r"\b(?:above|below|to the left of|to the right of)\b", "REL", text)
    text = re.sub(
        r"on a background (?:that is BG (?:on the left|at the top) and BG (?:on the right|at the "
        r"bottom)|split diagonally into BG and BG)",
        "BACKDROP",
        text,
    )
    text = re.sub(r"(?:on|against) a BG (?:and BG )?background", "BACKDROP", text)
    text = re.sub(r"a BG (?:and BG )?background", "BACKDROP", text)
    return re.sub(
        r"\b(?:in|at|on) the (?:top|bottom|upper|lower|left|right|center|middle)"
        r"(?: left| right)?(?: corner| side| of the image)?\b",
        "WHERE",
        text,
    )


def test_caption_variety() -> None:
    captions = [sample_scene(17, i).caption for i in range(2000)]
    assert len(set(captions)) > 1000
    templates = {_template(c) for c in captions}
    assert len(templates) >= 12, templates
    assert all(set(re.findall(r"[a-z]+", t)) <= _GLUE for t in templates), templates
    assert {"OBJ", "OBJ REL OBJ", "OBJ and OBJ", "OBJ WHERE BACKDROP"} <= templates


# The words a template may keep: everything else must be vocabulary or a phrase from above.
_GLUE = {"a", "and", "picture", "of", "there", "is", "two", "shapes", "simple", "drawing", "with"}


def _relation_of(caption: str) -> tuple[str, str, str] | None:
    """``(first colour, relation, second colour)`` when the caption relates its two objects."""
    colors = "|".join(COLORS)
    relations = "|".join(RELATIONS)
    match = re.search(rf"\b({colors}) \w+ ({relations}) an? (?:\w+ )?({colors})\b", caption)
    return match.groups() if match else None


def test_relations_are_true_of_the_pixels() -> None:
    checked = set()
    for i in range(400):
        scene = sample_scene(19, i, two_tone_prob=0.0)
        relation = _relation_of(scene.caption)
        if relation is None:
            continue
        a, word, b = relation
        box = boxes(scene)
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = box[a], box[b]
        holds = {
            "above": ay1 < by0,
            "below": by1 < ay0,
            "to the left of": ax1 < bx0,
            "to the right of": bx1 < ax0,
        }
        assert holds[word], (scene, box)
        checked.add(word)
    assert checked == set(RELATIONS)


def test_two_objects_never_touch() -> None:
    for i in range(300):
        scene = sample_scene(23, i, two_tone_prob=0.0)
        if len(scene.objects) < 2:
            continue
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes(scene, 64).values()
        gap = max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)
        assert gap >= 2, scene  # pixels between the boxes at 64 px (about 3 px by geometry)


def test_position_and_size_words_are_true() -> None:
    corner, side, middle = (lambda v: v < 0.4), (lambda v: v > 0.6), (lambda v: 0.44 < v < 0.56)
    phrases = {  # a phrase of a caption (plain backgrounds) and what it says of the centre (x, y)
        r"(top|upper) left": lambda x, y: corner(x) and corner(y),
        r"(top|upper) right": lambda x, y: side(x) and corner(y),
        r"(bottom|lower) left": lambda x, y: corner(x) and side(y),
        r"(bottom|lower) right": lambda x, y: side(x) and side(y),
        r"in the (center|middle)": lambda x, y: middle(x) and middle(y),
        r"at the top(?! left| right)": lambda x, y: middle(x) and corner(y),
        r"at the bottom(?! left| right)": lambda x, y: middle(x) and side(y),
        r"on the left": lambda x, y: corner(x) and middle(y),
        r"on the right": lambda x, y: side(x) and middle(y),
    }
    seen = set()
    for i in range(600):
        scene = sample_scene(29, i, max_objects=1, two_tone_prob=0.0)
        (obj,) = scene.objects
        x0, y0, x1, y1 = boxes(scene)[obj.color]
        cx, cy, extent = (x0 + x1) / 256, (y0 + y1) / 256, max(x1 - x0, y1 - y0) / 128
        assert abs(extent - SIZES[obj.size]) < 0.03, (scene, extent)
        for phrase, holds in phrases.items():
            if re.search(rf"\b{phrase}\b", scene.caption):
                assert holds(cx, cy), (scene, cx, cy)
                seen.add(phrase)
        for size in SIZES:
            if re.search(rf"\b{size}\b", scene.caption):
                assert obj.size == size, scene
    assert seen == set(phrases)


def test_two_tone_backgrounds_render_their_split() -> None:
    for i in range(200):
        scene = sample_scene(31, i, two_tone_prob=1.0)
        image = render(scene, 64).astype(int)
        first, second = (np.array(BACKGROUNDS[name]) for name in scene.background)
        # Edge pixels: objects keep a margin of more than a pixel at 64 px.
        a, b = {
            "vertical": ((0, 32), (63, 32)),
            "horizontal": ((32, 0), (32, 63)),
            "diagonal": ((0, 0), (63, 63)),
        }[scene.split]
        for (x, y), expected in ((a, first), (b, second)):
            assert np.abs(image[y, x] - expected).max() <= 1, scene


# ---------------------------------------------------------------------------------------------
# The checker


def test_classify_pixels() -> None:
    names = list(COLORS)
    for index, rgb in enumerate(COLORS.values()):
        for background in BACKGROUNDS.values():
            mostly = np.round(0.7 * np.array(rgb) + 0.3 * np.array(background))
            barely = np.round(0.3 * np.array(rgb) + 0.7 * np.array(background))
            pixels = np.array([[rgb, mostly, barely, background]], dtype=np.uint8)
            assert classify_pixels(pixels).tolist() == [[index, index, -1, -1]], names[index]


def test_shape_of_drawn_masks() -> None:
    yy, xx = np.mgrid[0:80, 0:80]
    disc = (xx - 40) ** 2 + (yy - 40) ** 2 <= 25**2
    square = (abs(xx - 40) <= 20) & (abs(yy - 40) <= 20)
    plus = ((abs(xx - 40) <= 7) & (abs(yy - 40) <= 21)) | (
        (abs(yy - 40) <= 7) & (abs(xx - 40) <= 21)
    )
    triangle = (yy >= 15) & (yy <= 65) & (abs(xx - 40) <= (yy - 15) / 2)
    assert [shape_of(m) for m in (disc, square, plus, triangle)] == [
        "circle",
        "square",
        "cross",
        "triangle",
    ]
    with pytest.raises(ValueError):
        shape_of(np.zeros((10, 10), dtype=bool))


def test_checker_on_an_empty_image() -> None:
    image = np.full((64, 64, 3), 128, dtype=np.uint8)
    assert check_image(image, [("red", "circle")]) == [
        ObjectCheck(color="red", shape="circle", color_ok=False, shape_ok=False, found_shape=None)
    ]
    with pytest.raises(ValueError):
        check_image(image, [("pink", "circle")])


def _accuracy(seed: int, count: int, size: int, degrade) -> dict[str, float]:
    """Colour and shape accuracy on the scenes' own objects, and the negative checks: an absent
    colour must not be found, a wrong shape of a present colour must not pass."""
    hits = {"color": 0, "shape": 0, "absent": 0, "wrong_shape": 0}
    totals = dict.fromkeys(hits, 0)
    for i in range(count):
        scene = sample_scene(seed, i)
        image = degrade(render(scene, size))
        present = pairs_of(scene)
        absent = [(c, "circle") for c in COLORS if c not in dict(present)]
        wrong = [(c, s) for c, shape in present for s in SHAPES if s != shape]
        results = check_image(image, present + absent + wrong)
        own, rest = results[: len(present)], results[len(present) :]
        hits["color"] += sum(r.color_ok for r in own)
        hits["shape"] += sum(r.shape_ok for r in own)
        hits["absent"] += sum(not r.color_ok for r in rest[: len(absent)])
        hits["wrong_shape"] += sum(not r.shape_ok for r in rest[len(absent) :])
        totals["color"] += len(own)
        totals["shape"] += len(own)
        totals["absent"] += len(absent)
        totals["wrong_shape"] += len(wrong)
    return {k: hits[k] / totals[k] for k in hits}


def _assert_accurate(acc: dict[str, float], shape: float = 0.99) -> None:
    assert acc["color"] >= 0.99, acc
    assert acc["shape"] >= shape, acc
    assert acc["absent"] >= 0.99, acc
    assert acc["wrong_shape"] >= 0.95, acc


@pytest.mark.slow
def test_checker_reads_the_dataset_at_64px_jpeg() -> None:
    _assert_accurate(_accuracy(101, 1000, 64, jpeg))


@pytest.mark.slow
def test_checker_reads_the_dataset_at_256px_jpeg() -> None:
    _assert_accurate(_accuracy(103, 200, 256, jpeg))


def test_checker_reads_the_dataset_at_1024px() -> None:
    _assert_accurate(_accuracy(107, 30, 1024, lambda image: image))


def test_checker_is_robust_to_blur_and_noise_at_64px() -> None:
    """What generated images look like: soft edges, a little noise, recompressed."""

    def degrade(image: np.ndarray) -> np.ndarray:
        blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1.0)))
        noise = np.random.default_rng(int(image.sum()) % 1000).normal(0, 6, image.shape)
        return jpeg(np.clip(blurred + noise, 0, 255).astype(np.uint8), quality=75)

    _assert_accurate(_accuracy(109, 300, 64, degrade), shape=0.97)
