"""Every picture the project draws, with Pillow only: images and captioned grids of generated
samples, the training stages' sample grids, loss curves and the evaluation's bar charts.

Grids are rows of equally sized cells, each row under a one-line caption drawn with PIL's default
font (cut with "..." to the row's width; the font has Latin glyphs only, so captions written here
spell out "theta" and "eta"). Cells are shown at the largest image side in the grid, but
never below :data:`MIN_CELL` pixels so that 16-64px samples stay visible; smaller images are
enlarged with nearest-neighbour (generated pixels are shown as they are, not smoothed). Every PNG
is written without a timestamp: equal pixels give equal bytes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

MIN_CELL = 64
CAPTION_HEIGHT = 16
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
SERIES_COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))


# ----------------------------------------------------------------------------------------------
# Images and grids


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) images in [-1, 1] → (B, H, W, 3) uint8."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def png_bytes(pixels: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 image as PNG bytes (no timestamp: equal pixels give equal bytes)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def tensor_rows_png(rows: list[torch.Tensor]) -> bytes:
    """Rows of (N, 3, H, W) images in [-1, 1], each enlarged (nearest) to the largest side, as one
    PNG without captions: the training stages' sample grids (data, then the EMA's samples)."""
    side = max(r.shape[-1] for r in rows)
    rows = [torch.nn.functional.interpolate(r.float(), size=side, mode="nearest") for r in rows]
    pixels = [np.concatenate(list(to_uint8(r)), axis=1) for r in rows]  # (H, N·W, 3) each
    return png_bytes(np.concatenate(pixels, axis=0))


def cell_size(rows: Sequence[Sequence[np.ndarray]]) -> int:
    """The side of a grid's cells: its largest image side, at least :data:`MIN_CELL`."""
    return max(MIN_CELL, *(max(c.shape[0], c.shape[1]) for row in rows for c in row))


def _fit(text: str, font: Any, width: int) -> str:
    """``text`` cut (with "...") to fit ``width`` pixels in ``font``."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def captioned_grid(rows: Sequence[Sequence[np.ndarray]], captions: Sequence[str]) -> bytes:
    """Rows of (H, W, 3) uint8 images as one PNG: each row under its caption, every cell
    :func:`cell_size` square. Its size is (columns × cell) × (rows × (CAPTION_HEIGHT + cell))."""
    from PIL import Image, ImageDraw, ImageFont

    if len(rows) != len(captions):
        raise ValueError(f"{len(rows)} rows but {len(captions)} captions")
    side = cell_size(rows)
    columns = max(len(row) for row in rows)
    grid = Image.new("RGB", (columns * side, len(rows) * (CAPTION_HEIGHT + side)), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for r, (row, caption) in enumerate(zip(rows, captions, strict=True)):
        top = r * (CAPTION_HEIGHT + side)
        draw.text((2, top + 2), _fit(caption, font, columns * side - 4), fill=TEXT, font=font)
        for c, pixels in enumerate(row):
            cell = Image.fromarray(pixels)
            if cell.size != (side, side):
                cell = cell.resize((side, side), Image.NEAREST)
            grid.paste(cell, (c * side, top + CAPTION_HEIGHT))
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# Charts


def loss_curve_png(
    points: list[list[float]], title: str, size: tuple[int, int] = (640, 360)
) -> bytes:
    """A line plot of (step, loss) points on a log-scaled loss axis, with axis labels."""
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 70, width - 20, 30, height - 40
    draw.text((left, 8), title, fill="black")
    draw.rectangle([left, top, right, bottom], outline="black")
    finite = [(s, v) for s, v in points if v is not None and math.isfinite(v) and v > 0]
    if len(finite) >= 1:
        steps = [s for s, _ in finite]
        logs = [math.log10(v) for _, v in finite]
        s0, s1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1
        l0, l1 = min(logs), max(logs) if max(logs) > min(logs) else min(logs) + 1
        xy = [
            (
                left + (s - s0) / (s1 - s0) * (right - left),
                bottom - (v - l0) / (l1 - l0) * (bottom - top),
            )
            for s, v in zip(steps, logs, strict=True)
        ]
        if len(xy) > 1:
            draw.line(xy, fill=SERIES_COLORS[0], width=2)
        for x, y in xy[-1:]:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=SERIES_COLORS[0])
        for frac in (0.0, 0.5, 1.0):
            value = 10 ** (l0 + frac * (l1 - l0))
            y = bottom - frac * (bottom - top)
            draw.text((4, y - 6), f"{value:.3g}", fill="black")
        draw.text((left, bottom + 8), f"step {s0:g}", fill="black")
        draw.text((right - 90, bottom + 8), f"step {s1:g}", fill="black")
        draw.text((right - 170, top + 6), f"last loss {finite[-1][1]:.4g}", fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def bar_chart_png(
    groups: Sequence[str],
    panels: Sequence[tuple[str, Sequence[tuple[str, Sequence[float | None]]], float]],
    panel_size: tuple[int, int] = (520, 360),
) -> bytes:
    """Grouped bar charts side by side, the evaluation's metrics: each panel ``(title, [(series name, one value per group)], axis maximum)``; missing
    (None or NaN) values are left as gaps marked "-"."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    width, height = panel_size
    image = Image.new("RGB", (width * len(panels), height), "white")
    draw = ImageDraw.Draw(image)
    for p, (title, series, top_value) in enumerate(panels):
        x0 = p * width
        left, right, top, bottom = x0 + 50, x0 + width - 15, 50, height - 40
        draw.text((left, 8), title, fill="black")
        x = left
        for s, (name, _) in enumerate(series):
            color = SERIES_COLORS[s % len(SERIES_COLORS)]
            draw.rectangle([x, 27, x + 10, 37], fill=color)
            draw.text((x + 14, 26), name, fill="black")
            x += 14 + int(draw.textlength(name)) + 14
        for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
            y = bottom - frac * (bottom - top)
            draw.line([(left, y), (right, y)], fill=(225, 225, 225))
            draw.text((x0 + 6, y - 6), f"{top_value * frac:.3g}", fill="black")
        draw.rectangle([left, top, right, bottom], outline="black")
        group_width = (right - left) / max(len(groups), 1)
        bar = group_width * 0.8 / max(len(series), 1)
        for g, group in enumerate(groups):
            gx = left + g * group_width + group_width * 0.1
            for s, (_, values) in enumerate(series):
                value, bx = values[g], gx + s * bar
                if value is None or not math.isfinite(value):
                    draw.text((bx + bar / 2 - 3, bottom - 14), "-", fill="gray")
                    continue
                y = bottom - min(max(value / top_value, 0.0), 1.0) * (bottom - top)
                draw.rectangle(
                    [bx, y, bx + bar - 2, bottom], fill=SERIES_COLORS[s % len(SERIES_COLORS)]
                )
            label = _fit(group, font, int(group_width) - 4)
            draw.text((left + g * group_width + 2, bottom + 8), label, fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
