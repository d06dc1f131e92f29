"""What the four training entrypoints share: a Stage whose run is ``pipeline.trainer``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jobs.entry import Stage, run_stage


def training_stage(name: str, summary: str, config_cls: type, default_config: str) -> Stage:
    def run(cfg) -> int:
        from pipeline import trainer

        print(trainer.summary_line(trainer.run_training(name, cfg)))
        return 0

    return Stage(name, summary, config_cls, default_config, run)


def main_for(stage: Stage, argv: Sequence[str] | None, prog: str) -> int:
    return run_stage(stage, argv, prog=prog)


def run_module(stage: Stage, module: str) -> None:
    sys.exit(run_stage(stage, None, prog=f"python -m {module}"))
