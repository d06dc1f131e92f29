"""``unclip train-clip`` / ``python -m jobs.train_clip``: train (or fine-tune) an open_clip model contrastively on the shards."""

from __future__ import annotations

from collections.abc import Sequence

from jobs.training import main_for, run_module, training_stage
from pipeline.stage_config import TrainClipConfig

STAGE = training_stage(
    "train-clip",
    "train (or fine-tune) an open_clip model contrastively on the shards",
    TrainClipConfig,
    "clip/tiny.yaml",
)


def main(argv: Sequence[str] | None = None, prog: str = "python -m jobs.train_clip") -> int:
    return main_for(STAGE, argv, prog)


if __name__ == "__main__":
    run_module(STAGE, "jobs.train_clip")
