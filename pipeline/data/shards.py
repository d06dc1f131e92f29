"""Webdataset shards in the layout img2dataset writes, read and written the same way by every stage.

A shard ``NNNNN`` of a dataset folder is three files::

    NNNNN.tar          {key}.jpg, {key}.txt (caption), {key}.json (metadata) for each good sample
    NNNNN.parquet      one row per sample tried, good or not: url, caption, key, status, error_message, ...
    NNNNN_stats.json   counts for the shard, written last

As in img2dataset's incremental mode, a shard is complete exactly when its ``_stats.json`` exists:
:func:`completed_shards` is what readers list, so a shard whose writer died is never read, and a
rerun rewrites it. Keys are the shard id followed by the sample's index in the shard, so they are
unique across the dataset.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UserFacingError
from pipeline.storage import Storage, basename, join

SHARD_DIGITS = 5  # img2dataset's oom_shard_count
STATS_SUFFIX = "_stats.json"
_STATS_RE = re.compile(r"^(\d+)_stats\.json$")

# The columns of img2dataset's per-shard parquet (with a caption column and sha256 hashes).
PARQUET_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("caption", pa.string()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("exif", pa.string()),
        ("sha256", pa.string()),
    ]
)


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{SHARD_DIGITS}d}"


def sample_key(shard_id: int, index: int, samples_per_shard: int) -> str:
    """img2dataset's key: the shard id then the index, zero-padded to fixed widths."""
    digits = max(1, math.ceil(math.log10(samples_per_shard)))
    return f"{shard_id:0{SHARD_DIGITS}d}{index:0{digits}d}"


def completed_shards(storage: Storage, folder: str) -> list[int]:
    """The ids of the complete shards under ``folder`` (those with a ``_stats.json``), sorted."""
    ids = []
    for url in storage.list(folder):
        match = _STATS_RE.match(basename(url))
        if match:
            ids.append(int(match.group(1)))
    return sorted(ids)


def shard_urls(folder: str, shard_id: int) -> dict[str, str]:
    """The tar, parquet and stats URLs of one shard."""
    name = join(folder, shard_name(shard_id))
    return {"tar": f"{name}.tar", "parquet": f"{name}.parquet", "stats": f"{name}{STATS_SUFFIX}"}


@dataclass
class ShardWriter:
    """Writes one shard: samples go to a local temporary tar, then all three files are published.

    The tar and parquet are uploaded first and ``_stats.json`` last, each atomically, so a reader
    that lists :func:`completed_shards` never sees a partial shard.
    """

    storage: Storage
    folder: str
    shard_id: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    status: Counter = field(default_factory=Counter)
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self._tmp = tempfile.NamedTemporaryFile(suffix=".tar", delete=False)  # noqa: SIM115
        self._tar = tarfile.open(fileobj=self._tmp, mode="w")  # noqa: SIM115 (closed in close/abort)

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0  # same samples, same bytes
        info.mode = 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def write(
        self,
        key: str,
        image: bytes,
        caption: str,
        meta: dict[str, Any],
        *,
        ext: str = "jpg",
    ) -> None:
        """Add a good sample: its image bytes, caption and metadata (width, height, sha256, ...)."""
        row = {name: meta.get(name) for name in PARQUET_SCHEMA.names}
        row.update(key=key, caption=caption, status="success", error_message=None)
        self._add(f"{key}.{ext}", image)
        self._add(f"{key}.txt", caption.encode("utf-8"))
        self._add(f"{key}.json", json.dumps({**meta, **row}, sort_keys=True).encode("utf-8"))
        self.rows.append(row)
        self.status["success"] += 1

    def close(self) -> dict[str, Any]:
        """Publish the shard; returns its stats."""
        self._tar.close()
        self._tmp.close()
        urls = shard_urls(self.folder, self.shard_id)
        try:
            with open(self._tmp.name, "rb") as src, self.storage.open_atomic(urls["tar"]) as dst:
                while chunk := src.read(8 << 20):
                    dst.write(chunk)
        finally:
            os.unlink(self._tmp.name)
        table = pa.Table.from_pylist(self.rows, schema=PARQUET_SCHEMA)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.storage.write_bytes(urls["parquet"], sink.getvalue().to_pybytes())
        successes = self.status["success"]
        ended = time.time()
        stats = {
            "count": len(self.rows),
            "successes": successes,
            "failed_to_download": 0,
            "failed_to_resize": len(self.rows) - successes,
            "duration": ended - self.started,
            "start_time": self.started,
            "end_time": ended,
            "status_dict": dict(self.status),
        }
        self.storage.write_json(urls["stats"], stats)
        return stats

    def abort(self) -> None:
        """Drop the shard: nothing was published."""
        self._tar.close()
        self._tmp.close()
        os.unlink(self._tmp.name)


def iter_tar_samples(storage: Storage, url: str) -> Iterator[dict[str, Any]]:
    """The samples of one tar as ``{"__key__": key, "jpg": bytes, "txt": bytes, ...}`` dicts, with
    no bad-input policy (errors propagate): readers of training data use
    :func:`pipeline.data.reader.read_samples`, which skips and counts."""
    with storage.open(url) as handle:
        yield from tar_groups(handle)


def tar_groups(handle: IO[bytes]) -> Iterator[dict[str, Any]]:
    """Stream a tar from a file object and group its members by key, as webdataset does (the key
    is the name up to the first dot of the basename)."""
    with tarfile.open(fileobj=handle, mode="r|") as tar:
        current: dict[str, Any] | None = None
        for member in tar:
            if not member.isfile():
                continue
            name = os.path.basename(member.name)
            key, _, ext = name.partition(".")
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current  # before reading on: a truncated next member loses only itself
                current = {"__key__": key}
            current[ext] = tar.extractfile(member).read()
        if current is not None:
            yield current


def read_parquet_rows(storage: Storage, folder: str, shard_ids: list[int]) -> pa.Table:
    """The per-sample status rows of the given shards, concatenated."""
    tables = []
    for shard_id in shard_ids:
        url = shard_urls(folder, shard_id)["parquet"]
        with storage.open(url) as handle:
            tables.append(pq.read_table(handle))
    if not tables:
        return PARQUET_SCHEMA.empty_table()
    table = pa.concat_tables(tables, promote_options="permissive")
    for name in PARQUET_SCHEMA.names:  # e.g. no caption column when ingested without captions
        if name not in table.column_names:
            table = table.append_column(
                name, pa.nulls(table.num_rows, PARQUET_SCHEMA.field(name).type)
            )
    return table


def read_ray_dataset(storage: Storage, folder: str, shard_ids: list[int] | None = None, **kwargs):
    """The complete shards of ``folder`` as a Ray Dataset (columns ``__key__``, ``jpg``, ``txt``,
    ``json``, ``__url__``), streamed; incomplete shards are never read.

    ``kwargs`` go to ``ray.data.read_webdataset`` (e.g. ``decoder``, ``override_num_blocks``).
    """
    import ray

    ids = completed_shards(storage, folder) if shard_ids is None else shard_ids
    if not ids:
        raise UserFacingError(
            f"no complete shards under {folder} (run `unclip synth` or `unclip ingest`)"
        )
    filesystem, _ = storage.arrow_filesystem(folder)
    paths = [storage.arrow_filesystem(shard_urls(folder, i)["tar"])[1] for i in ids]
    return ray.data.read_webdataset(paths, filesystem=filesystem, file_extensions=["tar"], **kwargs)
