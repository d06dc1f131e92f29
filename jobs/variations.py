"""``unclip variations`` / ``python -m jobs.variations``: variations of images (section 3.1).

    unclip variations photo.png num=6 eta=1.0

Keeps each image's CLIP image embedding and decodes it with DDIM η > 0; writes the variations,
a grid (the input first in each row) and ``index.json`` under ``<output>``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jobs.entry import Inputs, Stage, run_stage
from pipeline.stage_config import VariationsConfig


def run(cfg: VariationsConfig) -> int:
    from pipeline import sampling

    summary = sampling.run_variations(cfg)
    print(
        f"variations: {summary['images']} images under {summary['output']}; grid: {summary['grid']}"
    )
    return 0


STAGE = Stage(
    "variations",
    "variations of images that keep their CLIP image embedding (DALL-E 2 section 3.1)",
    VariationsConfig,
    "variations/tiny.yaml",
    run,
    inputs=Inputs("images", "IMAGE", "input image files", paths=True),
)


def main(argv: Sequence[str] | None = None, prog: str = "python -m jobs.variations") -> int:
    return run_stage(STAGE, argv, prog=prog)


if __name__ == "__main__":
    sys.exit(main())
