"""``unclip ingest`` / ``python -m jobs.ingest``: an image-text URL list into webdataset shards."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jobs.entry import Stage, run_stage
from pipeline.stage_config import IngestConfig
from pipeline.storage import Storage


def run(cfg: IngestConfig) -> int:
    from pipeline import ingest

    storage = Storage(cfg.storage)
    storage.check(cfg.url(cfg.output), write=True)
    if cfg.retry_failed:
        summary = ingest.retry_failed(cfg, storage)
        print(f"retry: {summary['retried']} samples tried again")
    else:
        summary = ingest.ingest(cfg, storage)
    print(ingest.format_summary(summary))
    return 0


STAGE = Stage(
    "ingest",
    "download an image-text URL list into webdataset shards (img2dataset)",
    IngestConfig,
    "ingest/tiny.yaml",
    run,
    flags=(
        (
            "--retry-failed",
            "retry_failed=true",
            "try again only the samples that failed with a transient error (timeouts, 5xx)",
        ),
    ),
)


def main(argv: Sequence[str] | None = None, prog: str = "python -m jobs.ingest") -> int:
    return run_stage(STAGE, argv, prog=prog)


if __name__ == "__main__":
    sys.exit(main())
