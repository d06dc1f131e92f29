"""Does an image show the coloured shapes its caption asks for? A geometric checker, no network.

The evaluator asks this of generated images (64 px, blurry) for prompts parsed with
:func:`pipeline.data.shapes.parse_caption`; the tests ask it of the dataset's own JPEGs. For each asked
``(color, shape)``:

1. **Colour.** Every pixel gets a palette colour or "background" (:func:`classify_pixels`): its hue
   picks the nearest palette hue, and it counts only if its chroma (max - min of RGB) is at least
   ``_CHROMA_FRACTION`` of that palette colour's chroma. Blending an object colour with a neutral
   background scales its chroma by the coverage, so this keeps the pixels about half covered or
   more, on any background brightness. The largest 8-connected region of the colour (holes filled)
   must cover ``_MIN_AREA_FRACTION`` of the image: ``color_ok``.
2. **Outline.** JPEG stores chroma at half resolution (4:2:0), so a chroma-only outline of a small
   star is a blob. The region is refined with the full-resolution luma: around it, the background
   is estimated from the neutral pixels and propagated inwards, and each pixel's coverage is its
   least-squares position between that background and the object's colour in YCbCr (luma weighted
   above chroma; where an object and its background have the same luma, chroma decides alone).
   The refined outline is the pixels at least half covered.
3. **Shape.** The outline is compared (intersection over union) with each shape's template fitted to
   its bounding box, the shapes exactly as :mod:`pipeline.data.shapes` draws them (:func:`shape_of`).
   Each template also comes blurred by ``_BLUR_SIGMAS`` (those small next to the region) and
   re-thresholded at one half, which is what blur does to an outline (a star's points shrink, a
   square's corners round); a shape scores its best match, and the best shape wins.

Why templates rather than thresholds on solidity (area over convex hull) and fill ratio (area over
enclosing rectangle): on the dataset's own 64 px JPEGs those features put small stars among crosses
and circles (about 92% shape accuracy before the refinement of step 2, 98% after), and a 1 px
Gaussian blur moves a small star's solidity and fill onto a cross's. The blurred templates separate
all five shapes on the same images (100% on 1000 JPEGs at 64 px, blurred or not; see the tests).
Templates assume the dataset's upright, axis-aligned shapes, which is what a model trained on it
draws. Images larger than 256 px are box-downsampled to 256 px first: outlines are exact there, and
a 1024 px check stays fast. Pure numpy and Pillow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# shape_polygons: the renderer's own outlines, so the templates match the dataset exactly.
from pipeline.data.shapes import COLORS, SHAPES, shape_polygons

_MIN_AREA_FRACTION = 0.015  # a colour counts as present from 1.5% of the image (a small star: ~3%)
_CHROMA_FRACTION = 0.45  # pixel chroma over its palette colour's chroma to count as that colour
_MIN_CHROMA = 40.0  # and never below this (0..255): JPEG and noise on neutral backgrounds stay out
_CHECK_SIDE = 256  # larger images are downsampled to this side before the region analysis
_CHROMA_WEIGHT = 0.03  # weight of Cb and Cr against Y in the coverage fit (JPEG chroma is blurry)
_RING = 3  # the background around a region is estimated in a ring this wide (pixels)
_TINT_FRACTION = 0.15  # a background-labelled pixel needs this much of the object's chroma to join
_REACH = 2  # the refined outline stays within this many pixels of the colour region
_BLUR_SIGMAS = (0.0, 0.7, 1.2, 1.7)  # template blurs (Gaussian sigma, pixels of the checked image)
_MAX_BLUR_FRACTION = 0.12  # and only those up to this fraction of the region's smaller side


@dataclass(frozen=True)
class ObjectCheck:
    """The verdict for one asked ``(color, shape)``.

    ``color_ok``: a region of that colour covering at least ``_MIN_AREA_FRACTION`` of the image is
    present. ``shape_ok``: that holds and the largest such region is classified as ``shape``.
    ``found_shape``: the class of the largest region of that colour (``None`` when there is none).
    """

    color: str
    shape: str
    color_ok: bool
    shape_ok: bool
    found_shape: str | None


# ---------------------------------------------------------------------------------------------
# Pixel colours


def _hue_chroma(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360) and chroma (max - min, 0..255) of float RGB in 0..255."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx = np.maximum(np.maximum(r, g), b)
    chroma = mx - np.minimum(np.minimum(r, g), b)
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(
        mx == r,
        ((g - b) / safe) % 6.0,
        np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    return (hue * 60.0) % 360.0, chroma


_PALETTE_HUE, _PALETTE_CHROMA = _hue_chroma(np.array(list(COLORS.values()), dtype=np.float64))


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """HxW int: the index into ``list(COLORS)`` of each pixel's colour, or -1 for background.

    A pixel takes the palette colour nearest in hue (red wraps around 0 degrees) and is background
    when its chroma is below ``_CHROMA_FRACTION`` of that colour's chroma: neutral, too dark or too
    bright, or less than about half covered by an object.
    """
    rgb = np.asarray(image)[..., :3].astype(np.float64)
    hue, chroma = _hue_chroma(rgb)
    distance = np.abs(hue[..., None] - _PALETTE_HUE)
    distance = np.minimum(distance, 360.0 - distance)
    index = distance.argmin(axis=-1)
    threshold = np.maximum(_CHROMA_FRACTION * _PALETTE_CHROMA[index], _MIN_CHROMA)
    return np.where(chroma >= threshold, index, -1)


# ---------------------------------------------------------------------------------------------
# Connected components over row runs: a union-find on runs, so the Python work is per run, not per
# pixel (a compact object is one or two runs per row).


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows, starts and (exclusive) ends of the horizontal runs of ``True``, row-major."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)
    rows, starts = np.nonzero(step == 1)
    _, ends = np.nonzero(step == -1)
    return rows, starts, ends


def _label_runs(
    rows: np.ndarray, starts: np.ndarray, ends: np.ndarray, *, diagonal: bool
) -> np.ndarray:
    """A component label per run (the index of its root run); 8-connected when ``diagonal``."""
    n = len(rows)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    rows_l, starts_l, ends_l = rows.tolist(), starts.tolist(), ends.tolist()
    reach = 1 if diagonal else 0
    prev_lo = prev_hi = 0  # the runs of the previous row are [prev_lo, prev_hi)
    i = 0
    while i < n:
        row = rows_l[i]
        j = i
        while j < n and rows_l[j] == row:
            j += 1
        if prev_hi > prev_lo and rows_l[prev_lo] == row - 1:
            k = prev_lo
            for m in range(i, j):
                while k < prev_hi and ends_l[k] + reach <= starts_l[m]:
                    k += 1  # ends before run m can touch it, and before every later run too
                q = k
                while q < prev_hi and starts_l[q] < ends_l[m] + reach:
                    a, b = find(m), find(q)
                    if a != b:
                        parent[max(a, b)] = min(a, b)
                    q += 1
        prev_lo, prev_hi = i, j
        i = j
    return np.array([find(i) for i in range(n)], dtype=np.int64)


def _paint(
    shape: tuple[int, ...], rows: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    for r, s, e in zip(rows.tolist(), starts.tolist(), ends.tolist(), strict=True):
        out[r, s:e] = True
    return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a boolean mask, holes filled (all False when empty)."""
    rows, starts, ends = _runs(mask)
    if len(rows) == 0:
        return np.zeros(mask.shape, dtype=bool)
    labels = _label_runs(rows, starts, ends, diagonal=True)
    areas = np.bincount(labels, weights=(ends - starts).astype(np.float64))
    keep = labels == int(areas.argmax())
    return _fill_holes(_paint(mask.shape, rows[keep], starts[keep], ends[keep]))


def _fill_holes(region: np.ndarray) -> np.ndarray:
    """Fill the 4-connected pockets of background that do not reach the outside."""
    ys, xs = np.nonzero(region)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    outside = np.ones((y1 - y0 + 2, x1 - x0 + 2), dtype=bool)
    outside[1:-1, 1:-1] = ~region[y0:y1, x0:x1]
    rows, starts, ends = _runs(outside)
    labels = _label_runs(rows, starts, ends, diagonal=False)
    holes = labels != labels[0]  # run 0 starts at the padded top-left corner: the outside
    if not holes.any():
        return region
    filled = region.copy()
    filled[y0:y1, x0:x1] |= _paint(outside.shape, rows[holes], starts[holes], ends[holes])[
        1:-1, 1:-1
    ]
    return filled


# ---------------------------------------------------------------------------------------------
# Outline refinement with the full-resolution luma

_RGB_TO_YCC = np.array(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]
)


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """8-connected dilation by ``steps`` pixels."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= grown[:, :-1].copy()
        grown[:, :-1] |= grown[:, 1:].copy()
        out = grown
    return out


def _propagate(values: np.ndarray, known: np.ndarray, rings: int) -> np.ndarray:
    """Fill unknown pixels ring by ring with the mean of their known 4-neighbours, for ``rings``
    rings; what is left (deep inside an object, where the estimate does not matter because the pixel
    is the object's colour) gets the mean of the known pixels."""
    values = np.where(known[..., None], values, 0.0)
    fallback = values[known].mean(axis=0)
    known = known.copy()
    shifts = (
        ((slice(1, None),), (slice(None, -1),)),
        ((slice(None, -1),), (slice(1, None),)),
        ((slice(None), slice(1, None)), (slice(None), slice(None, -1))),
        ((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
    )
    for _ in range(rings):
        total = np.zeros_like(values)
        count = np.zeros(known.shape)
        for dst, src in shifts:
            total[dst] += values[src] * known[src][..., None]
            count[dst] += known[src]
        new = ~known & (count > 0)
        if not new.any():
            break
        values[new] = total[new] / count[new][:, None]
        known |= new
    values[~known] = fallback
    return values


def _refine(
    image: np.ndarray, labels: np.ndarray, region: np.ndarray, color_index: int
) -> np.ndarray:
    """The region's outline from per-pixel coverage against the local background (module doc, 2)."""
    ys, xs = np.nonzero(region)
    h, w = region.shape
    y0, y1 = max(0, ys.min() - _RING), min(h, ys.max() + 1 + _RING)
    x0, x1 = max(0, xs.min() - _RING), min(w, xs.max() + 1 + _RING)
    rgb = image[y0:y1, x0:x1].astype(np.float64)
    lab = labels[y0:y1, x0:x1]
    reg = region[y0:y1, x0:x1]
    near = _dilate(reg, _REACH)
    known = ~near & (lab == -1)
    if not known.any():
        return region
    ycc = rgb @ _RGB_TO_YCC.T
    background = _propagate(ycc, known, 2 * _REACH + 2)
    _, chroma = _hue_chroma(rgb)
    core = reg & (chroma >= 0.75 * chroma[reg].max())
    color = np.median(ycc[core], axis=0)
    weight = np.array([1.0, _CHROMA_WEIGHT, _CHROMA_WEIGHT])
    towards = color - background
    coverage = ((ycc - background) * towards * weight).sum(-1) / np.maximum(
        (towards * towards * weight).sum(-1), 1e-6
    )
    # A pixel joins only with some of the object's chroma, so a background edge (the split of a
    # two-tone background, whose estimate is a guess near the object) never does.
    tinted = (lab == -1) & (chroma >= _TINT_FRACTION * chroma[core].mean())
    outline = (coverage >= 0.5) & near & ((lab == color_index) | tinted)
    if outline.sum() < 0.5 * reg.sum():
        return region  # the fit failed (e.g. no contrast at all): keep the colour region
    refined = np.zeros_like(region)
    refined[y0:y1, x0:x1] = outline
    return _largest_component(refined)


# ---------------------------------------------------------------------------------------------
# Shapes


@lru_cache(maxsize=2048)  # at most ~128 MB at 256 px, usually a few MB
def _template(shape: str, width: int, height: int, sigma: float) -> np.ndarray:
    """``shape`` as drawn by the renderer, blurred by ``sigma`` px, thresholded at one half, and
    scaled so that the thresholded outline fills a ``width`` x ``height`` box (as a region does)."""
    scale = max(1, min(8, 256 // max(width, height)))
    polygons = shape_polygons(shape, 0.5, 0.5, 1.0)
    points = np.concatenate([np.asarray(p) for p in polygons])
    lo, hi = points.min(axis=0), points.max(axis=0)
    pad = int(np.ceil(3 * sigma * scale)) + 2
    box = np.array([width * scale, height * scale])
    canvas = Image.new("L", (int(box[0]) + 2 * pad, int(box[1]) + 2 * pad), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        xy = (np.asarray(polygon) - lo) / (hi - lo) * box + pad - 0.5
        draw.polygon([tuple(p) for p in xy.tolist()], fill=255)
    if sigma > 0:
        canvas = canvas.filter(ImageFilter.GaussianBlur(sigma * scale))
    inside = np.asarray(canvas) >= 128
    if not inside.any():  # a few pixels blurred away: nothing left to compare
        template = np.ones((height, width), dtype=bool)
        template.flags.writeable = False
        return template
    ys, xs = np.nonzero(inside)
    crop = inside[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    resized = Image.fromarray(crop.astype(np.uint8) * 255).resize((width, height), Image.BOX)
    template = np.asarray(resized) >= 128
    template.flags.writeable = False  # shared through the cache
    return template


def _shape_scores(mask: np.ndarray) -> dict[str, float]:
    """Each shape's best intersection over union with the region, over the template blurs."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        raise ValueError("shape_of needs a non-empty region")
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    region = mask[y0:y1, x0:x1]
    scores = {}
    for shape in SHAPES:
        best = 0.0
        for sigma in _BLUR_SIGMAS:
            if sigma > _MAX_BLUR_FRACTION * min(x1 - x0, y1 - y0):
                break
            template = _template(shape, int(x1 - x0), int(y1 - y0), sigma)
            best = max(best, (region & template).sum() / (region | template).sum())
        scores[shape] = float(best)
    return scores


def shape_of(mask: np.ndarray) -> str:
    """Classify one binary region into ``SHAPES``: the template that overlaps it best (module doc)."""
    scores = _shape_scores(np.asarray(mask, dtype=bool))
    return max(scores, key=scores.__getitem__)


# ---------------------------------------------------------------------------------------------
# Images


def _prepare(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] < 3:
        raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
    image = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
    h, w = image.shape[:2]
    if max(h, w) > _CHECK_SIDE:
        scale = _CHECK_SIDE / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.BOX))
    return image


def check_image(image: np.ndarray, objects: Sequence[tuple[str, str]]) -> list[ObjectCheck]:
    """Check each asked ``(color, shape)`` against an HxWx3 uint8 image (32 to 1024 px a side)."""
    for color, shape in objects:
        if color not in COLORS:
            raise ValueError(f"unknown color {color!r}")
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}")
    image = _prepare(image)
    labels = classify_pixels(image)
    names = list(COLORS)
    found: dict[str, tuple[bool, str | None]] = {}
    results = []
    for color, shape in objects:
        if color not in found:
            index = names.index(color)
            region = _largest_component(labels == index)
            area = int(region.sum())
            if area == 0:
                found[color] = (False, None)
            else:
                outline = _refine(image, labels, region, index)
                found[color] = (area >= _MIN_AREA_FRACTION * labels.size, shape_of(outline))
        color_ok, found_shape = found[color]
        results.append(
            ObjectCheck(
                color=color,
                shape=shape,
                color_ok=color_ok,
                shape_ok=color_ok and found_shape == shape,
                found_shape=found_shape,
            )
        )
    return results
