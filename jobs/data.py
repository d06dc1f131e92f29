"""What runs the data commands: ``synth``, ``ingest`` and ``embed`` (see :mod:`jobs.commands`)."""

from __future__ import annotations

from typing import Any

from pipeline.cluster.connect import connect
from pipeline.storage import Storage


def _writable(cfg: Any, folder: str) -> Storage:
    """The command's storage, once ``folder`` (under its root) is known to be writable: an
    unreachable endpoint or a missing bucket fails here, before Ray starts."""
    storage = Storage(cfg.storage)
    storage.check(cfg.url(folder), write=True)
    return storage


def synth(name: str, cfg: Any) -> int:
    """Write the captioned-shapes dataset's missing shards, on Ray Data."""
    from pipeline.data import synth

    storage = _writable(cfg, cfg.output)
    connect(cfg.ray)
    summary = synth.generate(cfg, storage)
    rate = summary["images_per_second"]
    print(
        f"synth: {summary['samples']} images in {summary['shards']} shards at {summary['output']} "
        f"({summary['written_now']} written now" + (f", {rate} images/s" if rate else "") + ")"
    )
    return 0


def ingest(name: str, cfg: Any) -> int:
    """Download a URL list into shards (or retry the transient failures), with a summary."""
    from pipeline.data import ingest

    storage = _writable(cfg, cfg.output)
    if cfg.retry_failed:
        summary = ingest.retry_failed(cfg, storage)
        print(f"retry: {summary['retried']} samples tried again")
    else:
        summary = ingest.ingest(cfg, storage)
    print(ingest.format_summary(summary))
    return 0


def embed(name: str, cfg: Any) -> int:
    """Encode the shards into the embedding store, or import a clip-retrieval folder into it."""
    from pipeline.embed import job

    storage = _writable(cfg, cfg.store)
    if cfg.import_clip_retrieval:
        from pipeline.embed import clip_retrieval

        summary = clip_retrieval.import_folder(cfg, storage)
        print(
            f"import: {summary['rows']} rows from {cfg.import_clip_retrieval} "
            f"({summary['skipped']} skipped) into {summary['store']}"
        )
        return 0
    connect(cfg.ray)
    print(job.embed_summary_line(job.run_embedding(cfg, storage)))
    return 0
