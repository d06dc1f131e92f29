"""``unclip eval`` / ``python -m jobs.eval``: the decoder's conditionings compared (DALL-E 2
section 5.1, figure 7): caption only, the CLIP text embedding without a prior, and the prior(s).

    unclip eval num_prompts=64 inception_weights=/data/inception_v3_google-0cc3c7bd.pth

Writes ``report.json``, ``report.md``, ``metrics.png`` and one ``grid_<conditioning>.png`` per
conditioning under ``<root>/<output>/``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jobs.entry import Stage, run_stage
from pipeline.stage_config import EvalConfig


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def run(cfg: EvalConfig) -> int:
    from pipeline import evaluate

    summary = evaluate.run_eval(cfg)
    for name, numbers in summary["metrics"].items():
        print(
            f"  {name:<15} CLIP score {_number(numbers['clip_score'])}, "
            f"FD (CLIP) {_number(numbers['fd_clip'])}, FID {_number(numbers['fid'])}, "
            f"shape {_number(numbers['shape'], 2)}, held-out shape "
            f"{_number(numbers['heldout_shape'], 2)}"
        )
    print(f"eval: report at {summary['markdown']} (numbers: {summary['report']})")
    return 0


STAGE = Stage(
    "eval",
    "compare the decoder's conditionings (caption, text embedding, prior): CLIP score, FD, FID, "
    "attribute accuracy; report.json, report.md, a plot and sample grids",
    EvalConfig,
    "eval/tiny.yaml",
    run,
)


def main(argv: Sequence[str] | None = None, prog: str = "python -m jobs.eval") -> int:
    return run_stage(STAGE, argv, prog=prog)


if __name__ == "__main__":
    sys.exit(main())
