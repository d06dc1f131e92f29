"""``unclip textdiff`` / ``python -m jobs.textdiff``: edit images with a text diff (section 3.3).

    unclip textdiff cat.png --from "a photo of a cat" --to "a photo of a dog" max_theta=0.5

Rotates each image's CLIP image embedding towards normalize(z_t − z_t0) of the two captions and
decodes from its DDIM-inverted latent; writes the sweep, a grid (the input first in each row) and
``index.json`` under ``<output>``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jobs.entry import Inputs, Stage, run_stage
from pipeline.stage_config import TextDiffConfig


def run(cfg: TextDiffConfig) -> int:
    from pipeline import sampling

    summary = sampling.run_textdiff(cfg)
    print(
        f"textdiff: {summary['images']} images under {summary['output']}; grid: {summary['grid']}"
    )
    return 0


STAGE = Stage(
    "textdiff",
    "language-guided image edits by CLIP text diffs (DALL-E 2 section 3.3)",
    TextDiffConfig,
    "textdiff/tiny.yaml",
    run,
    flags=(
        ("--from", "from_caption={text}", "a caption of the input image (config: from_caption)"),
        ("--to", "to_caption={text}", "the caption to move towards (config: to_caption)"),
    ),
    inputs=Inputs("images", "IMAGE", "input image files", paths=True),
)


def main(argv: Sequence[str] | None = None, prog: str = "python -m jobs.textdiff") -> int:
    return run_stage(STAGE, argv, prog=prog)


if __name__ == "__main__":
    sys.exit(main())
