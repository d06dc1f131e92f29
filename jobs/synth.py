"""``unclip synth`` / ``python -m jobs.synth``: write the captioned-shapes dataset as shards."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jobs.entry import Stage, run_stage
from pipeline import cluster
from pipeline.stage_config import SynthConfig
from pipeline.storage import Storage


def run(cfg: SynthConfig) -> int:
    from pipeline import synth

    storage = Storage(cfg.storage)
    storage.check(cfg.url(cfg.output), write=True)
    cluster.connect(cfg.ray)
    summary = synth.generate(cfg, storage)
    rate = summary["images_per_second"]
    print(
        f"synth: {summary['samples']} images in {summary['shards']} shards at {summary['output']} "
        f"({summary['written_now']} written now" + (f", {rate} images/s" if rate else "") + ")"
    )
    return 0


STAGE = Stage(
    "synth",
    "write the synthetic captioned-shapes dataset as webdataset shards",
    SynthConfig,
    "synth/tiny.yaml",
    run,
)


def main(argv: Sequence[str] | None = None, prog: str = "python -m jobs.synth") -> int:
    return run_stage(STAGE, argv, prog=prog)


if __name__ == "__main__":
    sys.exit(main())
