"""``unclip train-prior`` / ``python -m jobs.train_prior``: train the prior (text → CLIP image embedding) on the embedding store."""

from __future__ import annotations

from collections.abc import Sequence

from jobs.training import main_for, run_module, training_stage
from pipeline.stage_config import PriorConfig

STAGE = training_stage(
    "train-prior",
    "train the prior (text → CLIP image embedding) on the embedding store",
    PriorConfig,
    "prior/tiny.yaml",
)


def main(argv: Sequence[str] | None = None, prog: str = "python -m jobs.train_prior") -> int:
    return main_for(STAGE, argv, prog)


if __name__ == "__main__":
    run_module(STAGE, "jobs.train_prior")
