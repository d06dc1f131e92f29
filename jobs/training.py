"""What runs the four training commands: the stage driver (:mod:`pipeline.train.driver`)."""

from __future__ import annotations

from typing import Any


def run(name: str, cfg: Any) -> int:
    """Train stage ``name`` (``train-prior``, ...) on Ray Train; prints its final line."""
    from pipeline.train import driver

    print(driver.summary_line(driver.run_training(name, cfg)))
    return 0
