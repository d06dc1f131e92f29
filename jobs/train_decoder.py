"""``unclip train-decoder`` / ``python -m jobs.train_decoder``: train the 64px decoder (CLIP image embedding → image)."""

from __future__ import annotations

from collections.abc import Sequence

from jobs.training import main_for, run_module, training_stage
from pipeline.stage_config import DecoderConfig

STAGE = training_stage(
    "train-decoder",
    "train the 64px decoder (CLIP image embedding → image)",
    DecoderConfig,
    "decoder/tiny.yaml",
)


def main(argv: Sequence[str] | None = None, prog: str = "python -m jobs.train_decoder") -> int:
    return main_for(STAGE, argv, prog)


if __name__ == "__main__":
    run_module(STAGE, "jobs.train_decoder")
