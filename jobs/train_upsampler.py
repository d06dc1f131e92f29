"""``unclip train-upsampler`` / ``python -m jobs.train_upsampler``: train an upsampler (64→256 or 256→1024)."""

from __future__ import annotations

from collections.abc import Sequence

from jobs.training import main_for, run_module, training_stage
from pipeline.stage_config import UpsamplerConfig

STAGE = training_stage(
    "train-upsampler",
    "train an upsampler (64→256 or 256→1024)",
    UpsamplerConfig,
    "upsampler/tiny.yaml",
)


def main(argv: Sequence[str] | None = None, prog: str = "python -m jobs.train_upsampler") -> int:
    return main_for(STAGE, argv, prog)


if __name__ == "__main__":
    run_module(STAGE, "jobs.train_upsampler")
