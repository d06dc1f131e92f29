"""Ingestion: an image-text URL list becomes webdataset shards, through img2dataset.

:func:`ingest` runs img2dataset in its incremental mode, so a rerun after an interruption completes
the missing shards and redoes none. :func:`retry_failed` reads the shards' parquet status, picks the
samples that failed with a transient error (timeouts, connection errors, HTTP 5xx, never 404 or an
undecodable image) and have not succeeded since, and downloads them again into new shards after the
existing ones (img2dataset's ``extend`` mode): completed shards are never touched, and as each new
shard's keys start from its own shard id, no key is ever written twice.

Both end with :func:`summarize`: samples tried, written, failed, and the most frequent errors, printed
and saved as ``<output>/_summary/ingest.json`` (a subfolder: img2dataset reads every top-level
``*.json`` as a shard's stats). The summary and the retry's URL list come from
:mod:`pipeline.data.status`, a hash aggregation of the shards' status parquets that spills to a
temporary folder, so that a LAION-size ingest (hundreds of millions of rows) is summed up in memory
that does not grow with the number of URLs; :func:`is_transient` (the transient errors) lives there.

img2dataset reaches storage through plain fsspec, which reads only the standard AWS environment
variables: the storage settings of the config (endpoint, region, profile, keys) are set as those
variables around the download in this process and the processes it starts, and, with the Ray
distributor, inside each Ray task (:func:`download_shard`), whose worker has the cluster's
environment, not this one's.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from pipeline.data.shards import completed_shards
from pipeline.data.status import BUCKET_ROWS, scan_status
from pipeline.data.status import is_transient as is_transient  # ingest's public name too
from pipeline.errors import UserFacingError
from pipeline.stage_config import IngestConfig
from pipeline.storage import Storage, StorageOptions, basename, join, patched_environ

log = logging.getLogger(__name__)

_FORMATS = ("tsv.gz", "csv", "tsv", "parquet", "txt", "jsonl", "json")


def detect_format(storage: Storage, url: str) -> str:
    """img2dataset's input format for a URL list file, or for the files of a folder."""
    names = [basename(u) for u in storage.list(url)] if storage.isdir(url) else [basename(url)]
    for fmt in _FORMATS:
        if any(name.endswith("." + fmt) for name in names):
            return fmt
    raise UserFacingError(
        f"cannot tell the format of the URL list {url}: expected files ending in "
        f"{', '.join('.' + f for f in _FORMATS)}, or set input_format"
    )


def _distributor(cfg: IngestConfig) -> str:
    if cfg.distributor != "auto":
        return cfg.distributor
    from pipeline.cluster.connect import joins_cluster

    return "ray" if joins_cluster(cfg.ray) else "multiprocessing"


def download_shard(downloader: Callable[[Any], Any], shard: Any, options: StorageOptions) -> Any:
    """Download one img2dataset shard (``downloader(shard)``, its ``(status, row)``) with the
    storage settings of ``options`` as AWS environment variables for the call. This is the body of
    the Ray distributor's task: a Ray worker has the cluster's environment, so an endpoint or keys
    given only in the config would otherwise never reach it. The settings travel pickled in the
    task's arguments (a :class:`Secret` pickles its value) rather than in a runtime_env, which Ray
    shows in its dashboard and state API; nothing here prints them."""
    import s3fs

    # fsspec caches filesystems by their arguments: one made in this worker under another
    # environment (an earlier task, another endpoint) would be handed back unchanged.
    s3fs.S3FileSystem.clear_instance_cache()
    with patched_environ(Storage(options).aws_environment()):
        return downloader(shard)


def ray_distributor(
    processes_count: int,
    downloader: Callable[[Any], Any],
    reader: Iterable[Any],
    subjob_size: int,
    max_shard_retry: int,
    *,
    options: StorageOptions,
) -> None:
    """img2dataset's Ray distributor (one task per shard, all awaited; the same signature), whose
    tasks run :func:`download_shard` with the storage settings."""
    import ray

    task = ray.remote(download_shard)
    ray.get([task.remote(downloader, shard, options) for shard in reader])


@contextlib.contextmanager
def _ray_tasks_with(options: StorageOptions) -> Iterator[None]:
    """Within the block, ``img2dataset.download(distributor="ray")`` distributes with
    :func:`ray_distributor` and ``options`` (img2dataset looks its distributor up by name when
    called, and takes no other one)."""
    # the module itself: the package's ``main`` attribute is its command-line function
    img2dataset_main = importlib.import_module("img2dataset.main")
    original = img2dataset_main.ray_distributor
    img2dataset_main.ray_distributor = functools.partial(ray_distributor, options=options)
    try:
        yield
    finally:
        img2dataset_main.ray_distributor = original


def _download(cfg: IngestConfig, storage: Storage, url_list: str, fmt: str, mode: str) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import img2dataset
    import s3fs

    # img2dataset lists done shards through fsspec's cached s3fs instance, whose listings may predate
    # changes made since in this process (a removed partial shard): give it a fresh one.
    s3fs.S3FileSystem.clear_instance_cache()

    distributor = _distributor(cfg)
    tasks: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if distributor == "ray":
        from pipeline.cluster.connect import connect

        connect(cfg.ray)
        tasks = _ray_tasks_with(storage.options)
    # img2dataset opens storage with plain fsspec, which reads the standard AWS variables: here,
    # in the processes the multiprocessing distributor starts, and in the Ray tasks (above)
    with patched_environ(storage.aws_environment()), tasks:
        img2dataset.download(
            url_list=url_list,
            input_format=fmt,
            url_col=cfg.url_col,
            caption_col=cfg.caption_col,
            output_folder=cfg.url(cfg.output),
            output_format="webdataset",
            image_size=cfg.image_size,
            resize_mode=cfg.resize_mode,
            encode_format=cfg.encode_format,
            encode_quality=cfg.encode_quality,
            number_sample_per_shard=cfg.samples_per_shard,
            processes_count=cfg.processes,
            thread_count=cfg.threads,
            timeout=cfg.timeout_s,
            retries=cfg.retries,
            distributor=distributor,
            incremental_mode=mode,
            enable_wandb=False,
            compute_hash="sha256",
        )


def ingest(cfg: IngestConfig, storage: Storage | None = None) -> dict[str, Any]:
    """Download the URL list into shards, completing an interrupted run; returns the summary."""
    storage = storage or Storage(cfg.storage)
    source = cfg.url(cfg.input)
    if not storage.exists(source):
        raise UserFacingError(f"URL list {source} does not exist (config key: input)")
    fmt = detect_format(storage, source) if cfg.input_format == "auto" else cfg.input_format
    started = time.time()
    _download(cfg, storage, source, fmt, "incremental")
    summary = summarize(storage, cfg.url(cfg.output), seconds=time.time() - started)
    storage.write_json(join(cfg.url(cfg.output), "_summary", "ingest.json"), summary)
    return summary


def retry_candidates(
    storage: Storage,
    folder: str,
    path: str,
    *,
    columns: tuple[str, str] = ("url", "caption"),
    bucket_rows: int = BUCKET_ROWS,
) -> int:
    """Write the samples whose latest try failed transiently and that never succeeded to the
    local parquet file ``path`` (url and caption, named ``columns``, in the order of their first
    try) as they are found, in memory that does not grow with their number or the shards'
    (:func:`~pipeline.data.status.scan_status`); returns how many there are. This file is the
    URL list ``--retry-failed`` hands to img2dataset."""
    shard_ids = completed_shards(storage, folder)
    counts = scan_status(
        storage,
        folder,
        shard_ids,
        candidates=path,
        candidate_columns=columns,
        bucket_rows=bucket_rows,
    )
    return counts.candidates


def retry_failed(cfg: IngestConfig, storage: Storage | None = None) -> dict[str, Any]:
    """Try again the transient failures of earlier runs, into new shards; returns the summary."""
    storage = storage or Storage(cfg.storage)
    folder = cfg.url(cfg.output)
    if not completed_shards(storage, folder):
        raise UserFacingError(f"no shards at {folder} to retry: run `unclip ingest` first")
    with tempfile.TemporaryDirectory(prefix="unclip-retry-") as tmp:
        # img2dataset's URL list: the config's column names (the caption column is read only
        # when caption_col is set)
        url_list = os.path.join(tmp, "retry.parquet")
        columns = (cfg.url_col, cfg.caption_col or "caption")
        retried = retry_candidates(storage, folder, url_list, columns=columns)
        log.info("retry: %d samples failed with a transient error", retried)
        started = time.time()
        if retried:
            _download(cfg, storage, url_list, "parquet", "extend")
    summary = {**summarize(storage, folder, seconds=time.time() - started), "retried": retried}
    storage.write_json(join(folder, "_summary", "ingest.json"), summary)
    return summary


def summarize(
    storage: Storage,
    folder: str,
    *,
    seconds: float | None = None,
    bucket_rows: int = BUCKET_ROWS,
) -> dict[str, Any]:
    """Counts over every complete shard of ``folder``, saved as ``_summary/ingest.json``.

    A sample is its URL and caption; one retried successfully counts once as written and no
    longer as failed. ``tried`` counts distinct samples, ``written`` the rows written, ``failed``
    the samples that never succeeded (``failed_transient``: their latest error is transient) and
    ``top_errors`` their ten most frequent latest errors. The status parquets are aggregated in
    memory bounded by ``bucket_rows`` rows, whatever their size
    (:func:`~pipeline.data.status.scan_status`).
    """
    shard_ids = completed_shards(storage, folder)
    counts = scan_status(storage, folder, shard_ids, bucket_rows=bucket_rows)
    summary = {
        "output": folder,
        "shards": len(shard_ids),
        "tried": counts.tried,
        "written": counts.written,
        "failed": counts.failed,
        "failed_transient": counts.failed_transient,
        "top_errors": counts.top_errors,
        "seconds": round(seconds, 2) if seconds is not None else None,
    }
    storage.write_json(join(folder, "_summary", "ingest.json"), summary)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"ingest: {summary['written']} of {summary['tried']} samples written to {summary['output']} "
        f"in {summary['shards']} shards; {summary['failed']} failed "
        f"({summary['failed_transient']} transient: `unclip ingest --retry-failed` tries them again)"
    ]
    lines += [f"  {e['count']:>6} × {e['error']}" for e in summary["top_errors"][:5]]
    return "\n".join(lines)
