"""Pictures the generation commands write: single images as PNG, and captioned grids.

A grid is rows of equally sized cells, each row under a one-line caption drawn with PIL's default
font (cut with "..." to the row's width; the font has Latin glyphs only, so captions written here
spell out "theta" and "eta"). Cells are shown at the largest image side in the grid, but
never below :data:`MIN_CELL` pixels so that 16-64px samples stay visible; smaller images are
enlarged with nearest-neighbour (generated pixels are shown as they are, not smoothed).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch

MIN_CELL = 64
CAPTION_HEIGHT = 16
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)


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


def cell_size(rows: Sequence[Sequence[np.ndarray]]) -> int:
    """The side of a grid's cells: its largest image side, at least :data:`MIN_CELL`."""
    return max(MIN_CELL, *(max(c.shape[0], c.shape[1]) for row in rows for c in row))


def _fit(text: str, font, width: int) -> str:
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
