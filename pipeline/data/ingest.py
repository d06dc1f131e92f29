"""Ingestion: an image-text URL list becomes webdataset shards, through img2dataset.

:func:`ingest` runs img2dataset in its incremental mode, so a rerun after an interruption completes
the missing shards and redoes none. :func:`retry_failed` reads the shards' parquet status, picks the
samples that failed with a transient error (timeouts, connection errors, HTTP 5xx, never 404 or an
undecodable image) and have not succeeded since, and downloads them again into new shards after the
existing ones (img2dataset's ``extend`` mode): completed shards are never touched, and as each new
shard's keys start from its own shard id, no key is ever written twice.

Both end with :func:`summarize`: samples tried, written, failed, and the most frequent errors, printed
and saved as ``<output>/_summary/ingest.json`` (a subfolder: img2dataset reads every top-level
``*.json`` as a shard's stats).

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
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.shards import completed_shards, read_parquet_rows
from pipeline.errors import UserFacingError
from pipeline.stage_config import IngestConfig
from pipeline.storage import Storage, StorageOptions, basename, join, patched_environ

log = logging.getLogger(__name__)

_FORMATS = ("tsv.gz", "csv", "tsv", "parquet", "txt", "jsonl", "json")

# Errors worth another try later: the server or the network, not the image.
_TRANSIENT = re.compile(
    r"timed out|timeout|HTTP Error 5\d\d|HTTP Error 429|Connection (refused|reset|aborted)|"
    r"Remote end closed|Temporary failure in name resolution|IncompleteRead|EOF occurred|"
    r"Network is unreachable|Errno 10[14]|Errno 11[013]",
    re.IGNORECASE,
)


def is_transient(error_message: str | None) -> bool:
    """Whether a download error may succeed on a later try (5xx, 429, timeouts, connections)."""
    return bool(error_message) and bool(_TRANSIENT.search(error_message))


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


def retry_candidates(storage: Storage, folder: str) -> pa.Table:
    """The samples whose latest try failed transiently and that never succeeded: url and caption."""
    rows = read_parquet_rows(storage, folder, completed_shards(storage, folder))
    if rows.num_rows == 0:
        return pa.table({"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())})
    data = rows.select(["url", "caption", "status", "error_message"]).to_pylist()
    succeeded = {_sample(r) for r in data if r["status"] == "success"}
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for row in data:  # shards are read in order, so a later try replaces an earlier one
        if _sample(row) not in succeeded:
            latest[_sample(row)] = row
    retry = [r for r in latest.values() if is_transient(r["error_message"])]
    return pa.table(
        {
            "url": pa.array([r["url"] for r in retry], pa.string()),
            "caption": pa.array([r["caption"] for r in retry], pa.string()),
        }
    )


def retry_failed(cfg: IngestConfig, storage: Storage | None = None) -> dict[str, Any]:
    """Try again the transient failures of earlier runs, into new shards; returns the summary."""
    storage = storage or Storage(cfg.storage)
    folder = cfg.url(cfg.output)
    if not completed_shards(storage, folder):
        raise UserFacingError(f"no shards at {folder} to retry: run `unclip ingest` first")
    candidates = retry_candidates(storage, folder)
    log.info("retry: %d samples failed with a transient error", candidates.num_rows)
    started = time.time()
    if candidates.num_rows:
        with tempfile.TemporaryDirectory(prefix="unclip-retry-") as tmp:
            url_list = os.path.join(tmp, "retry.parquet")
            pq.write_table(
                candidates.rename_columns([cfg.url_col, cfg.caption_col or "caption"]), url_list
            )
            _download(cfg, storage, url_list, "parquet", "extend")
    summary = {
        **summarize(storage, folder, seconds=time.time() - started),
        "retried": candidates.num_rows,
    }
    storage.write_json(join(folder, "_summary", "ingest.json"), summary)
    return summary


def _sample(row: dict[str, Any]) -> tuple[str, str]:
    """What identifies a sample across tries: its URL and caption."""
    return row["url"], row.get("caption") or ""


def summarize(storage: Storage, folder: str, *, seconds: float | None = None) -> dict[str, Any]:
    """Counts over every complete shard of ``folder``.

    A sample is its URL and caption; one retried successfully counts once as written and no
    longer as failed.
    """
    shard_ids = completed_shards(storage, folder)
    rows = read_parquet_rows(storage, folder, shard_ids)
    columns = ["url", "caption", "status", "error_message"]
    data = rows.select(columns).to_pylist() if rows.num_rows else []
    succeeded = {_sample(r) for r in data if r["status"] == "success"}
    failures: dict[tuple[str, str], str] = {}
    for row in data:
        if _sample(row) not in succeeded and row["status"] != "success":
            failures[_sample(row)] = row["error_message"] or row["status"]
    errors = Counter(failures.values())
    summary = {
        "output": folder,
        "shards": len(shard_ids),
        "tried": len(succeeded) + len(failures),
        "written": sum(1 for r in data if r["status"] == "success"),
        "failed": len(failures),
        "failed_transient": sum(1 for e in failures.values() if is_transient(e)),
        "top_errors": [{"error": e, "count": n} for e, n in errors.most_common(10)],
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
