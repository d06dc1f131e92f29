"""What runs the generation commands: ``sample``, ``variations``, ``interpolate``, ``textdiff``
(one runner: :mod:`pipeline.generate.sampling` has a ``run_<name>`` for each), ``generate`` and
``eval`` (see :mod:`jobs.commands`)."""

from __future__ import annotations

from typing import Any


def run(name: str, cfg: Any) -> int:
    """``sampling.run_<name>(cfg)``; prints where the images and the grid are."""
    from pipeline.generate import sampling

    summary = getattr(sampling, f"run_{name}")(cfg)
    print(f"{name}: {summary['images']} images under {summary['output']}; grid: {summary['grid']}")
    return 0


def generate(name: str, cfg: Any) -> int:
    """Batch generation of a caption file on Ray Data."""
    from pipeline.generate import batch

    print(batch.summary_line(batch.run_generate(cfg)))
    return 0


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def evaluate(name: str, cfg: Any) -> int:
    """The evaluation; prints each conditioning's headline numbers and where the report is."""
    from pipeline.eval.run import run_eval

    summary = run_eval(cfg)
    for conditioning, numbers in summary["metrics"].items():
        print(
            f"  {conditioning:<15} CLIP score {_number(numbers['clip_score'])}, "
            f"FD (CLIP) {_number(numbers['fd_clip'])}, FID {_number(numbers['fid'])}, "
            f"shape {_number(numbers['shape'], 2)}, held-out shape "
            f"{_number(numbers['heldout_shape'], 2)}"
        )
    print(f"eval: report at {summary['markdown']} (numbers: {summary['report']})")
    return 0
