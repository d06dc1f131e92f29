"""``unclip sample`` / ``python -m jobs.sample``: text → image with trained checkpoints (section 2).

    unclip sample "a red circle" "a blue square" samples_per_prompt=2 seed=1

Writes each image as ``<output>/<index>_<slug>.png``, a captioned ``grid.png`` and ``index.json``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jobs.entry import Inputs, Stage, run_stage
from pipeline.stage_config import SampleConfig


def run(cfg: SampleConfig) -> int:
    from pipeline import sampling

    summary = sampling.run_sample(cfg)
    print(f"sample: {summary['images']} images under {summary['output']}; grid: {summary['grid']}")
    return 0


STAGE = Stage(
    "sample",
    "text → image with trained prior, decoder and upsamplers: PNGs, a captioned grid, index.json",
    SampleConfig,
    "sample/tiny.yaml",
    run,
    inputs=Inputs("prompts", "PROMPT", "captions to draw (replace the config's prompts)"),
)


def main(argv: Sequence[str] | None = None, prog: str = "python -m jobs.sample") -> int:
    return run_stage(STAGE, argv, prog=prog)


if __name__ == "__main__":
    sys.exit(main())
