"""``unclip interpolate`` / ``python -m jobs.interpolate``: between two images (section 3.2).

    unclip interpolate a.png b.png num=7 latent=inverted

Decodes slerps of the two images' CLIP image embeddings; writes each step, a grid (the two
inputs at its ends) and ``index.json`` under ``<output>``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jobs.entry import Inputs, Stage, run_stage
from pipeline.stage_config import InterpolateConfig


def run(cfg: InterpolateConfig) -> int:
    from pipeline import sampling

    summary = sampling.run_interpolate(cfg)
    print(
        f"interpolate: {summary['images']} images under {summary['output']}; "
        f"grid: {summary['grid']}"
    )
    return 0


STAGE = Stage(
    "interpolate",
    "interpolations between two images' CLIP image embeddings (DALL-E 2 section 3.2)",
    InterpolateConfig,
    "interpolate/tiny.yaml",
    run,
    inputs=Inputs("images", "IMAGE", "the two input image files", paths=True),
)


def main(argv: Sequence[str] | None = None, prog: str = "python -m jobs.interpolate") -> int:
    return run_stage(STAGE, argv, prog=prog)


if __name__ == "__main__":
    sys.exit(main())
