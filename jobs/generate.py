"""``unclip generate`` / ``python -m jobs.generate``: batch generation on Ray Data.

    unclip generate captions.txt samples_per_caption=4 concurrency=2
    ray job submit -- python -m jobs.generate --config configs/generate/tiny.yaml root=s3://b/unclip

Reads a caption file (one caption per line), generates every row with an actor pool holding the
cascade (a GPU per actor when the cluster has GPUs), and writes ``<output>/images/<key>.png`` and
``<output>/index.parquet`` (key, caption, seed, path).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jobs.entry import Inputs, Stage, run_stage
from pipeline.stage_config import GenerateConfig


def run(cfg: GenerateConfig) -> int:
    from pipeline import generate_job

    print(generate_job.summary_line(generate_job.run_generate(cfg)))
    return 0


STAGE = Stage(
    "generate",
    "batch text → image on Ray Data: a caption file to PNGs and a parquet index",
    GenerateConfig,
    "generate/tiny.yaml",
    run,
    inputs=Inputs(
        "captions", "CAPTION_FILE", "caption file, one caption per line", paths=True, single=True
    ),
)


def main(argv: Sequence[str] | None = None, prog: str = "python -m jobs.generate") -> int:
    return run_stage(STAGE, argv, prog=prog)


if __name__ == "__main__":
    sys.exit(main())
