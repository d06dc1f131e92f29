"""Pictures for people who would rather look than read: loss curves as PNG (Pillow only)."""

from __future__ import annotations

import io
import math

from PIL import Image, ImageDraw


def loss_curve_png(
    points: list[list[float]], title: str, size: tuple[int, int] = (640, 360)
) -> bytes:
    """A line plot of (step, loss) points on a log-scaled loss axis, with axis labels."""
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
            draw.line(xy, fill=(31, 119, 180), width=2)
        for x, y in xy[-1:]:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(31, 119, 180))
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
