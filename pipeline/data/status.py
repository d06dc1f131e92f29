"""img2dataset's per-shard status parquets, counted in memory that does not grow with the URLs.

Every shard img2dataset writes has a ``NNNNN.parquet`` with one row per sample tried: url, caption,
status, error_message, ... A sample is its URL and caption (a missing caption is the empty one).
``unclip ingest --retry-failed`` writes new shards after the old ones, so a sample may have rows in
several shards: it succeeded if any of its rows is a success, and otherwise its *latest* try (its
last row in shard order, then row order) says why it failed. :func:`scan_status` gives, over the
complete shards of a dataset of any size:

* ``tried``: distinct samples; ``written``: success rows; ``failed``: samples that never succeeded,
  ``failed_transient`` those whose latest error :func:`is_transient` says a later try may fix;
* ``top_errors``: the ten most frequent latest errors of the failed samples, with their counts
  (ties: the error whose first failed sample came first, as ``Counter.most_common`` orders them);
* with ``candidates``: the samples to try again (latest try failed transiently, never succeeded),
  url and caption in the order of their first try, written to a parquet file as they are found.

At LAION's size (hundreds of millions of rows in hundreds of thousands of shards) neither the rows
nor the set of distinct samples fit in one process, so the work is a hash aggregation that spills:

1. The shards are read one at a time (a few ahead, in threads: on S3 each is a round trip), only
   the four status columns, through :class:`~pipeline.storage.Storage` and its retries. Each row
   gets its position, ``shard ordinal << 32 | row``, which orders tries as the shards do.
2. Rows are hash-partitioned by URL into B buckets: all the tries of a sample share its URL, hence
   its bucket. B is a power of two chosen for about ``bucket_rows`` rows a bucket, from the first
   shard's rows times the number of shards (img2dataset writes every shard but a run's last with
   the same number of samples; retry shards are smaller), but at most ``FANOUT`` (256). Rows are
   buffered in memory and appended (Arrow IPC, lz4) to one file a bucket in a private temporary
   folder only once the buffer passes half of ``bucket_rows``: a small dataset never touches the
   disk.
3. Each bucket is aggregated alone with pyarrow's hash aggregation (group by url and caption: any
   success, first and latest failed try). A bucket over ``bucket_rows`` rows (the fan-out was
   capped, or the estimate low) is first split again on further bits of the hash, streamed from
   its file one piece at a time into buckets of its own: it is never whole in memory.
4. Each bucket's counts per latest error go to a second spill, partitioned by the error's hash
   (an error message may name a host or an object address, so there can be as many distinct
   errors as failures), which is reduced one partition at a time keeping the top ten. The retry
   candidates go to a third, partitioned by the position of their first try in ranges of about
   ``bucket_rows`` rows; each range is sorted and appended to the output file in turn.

Peak memory is that of about ``bucket_rows`` rows (the buffer partitioned, or the bucket being
aggregated with pyarrow's hash tables, a few times the rows' bytes) plus the shards being read,
whatever the dataset's size; the disk holds one compressed copy of the four columns at most (two
while a bucket is split), plus the (smaller) error and candidate spills. Capping the fan-out keeps
the number of appended pieces linear in the rows: each flush writes at most 256 pieces, about
2·rows·256 / ``bucket_rows`` in all, and the splits half as many again (about 15 million pieces of
about 200 rows for LAION-2B at the default 100k rows, on the temporary disk).

:func:`write_synthetic_status` writes status parquets of any size with retries, duplicates and
transient and permanent errors, for the tests and the scale benchmark.
"""

from __future__ import annotations

import os
import re
import struct
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.data.shards import shard_name, shard_urls
from pipeline.errors import UserFacingError
from pipeline.storage import Storage, StorageError, basename

# Rows a bucket holds (the aggregation's unit of memory): ~250 bytes a row at LAION's URL and
# caption lengths, a few hundred MB with the aggregation's hash tables.
BUCKET_ROWS = 100_000
FANOUT = 256  # partitions a flush writes to at most; larger buckets are split again when read
READ_AHEAD = 8  # status parquets read ahead of the one being partitioned

# Errors worth another try later: the server or the network, not the image.
_TRANSIENT = re.compile(
    r"timed out|timeout|HTTP Error 5\d\d|HTTP Error 429|Connection (refused|reset|aborted)|"
    r"Remote end closed|Temporary failure in name resolution|IncompleteRead|EOF occurred|"
    r"Network is unreachable|Errno 10[14]|Errno 11[013]",
    re.IGNORECASE,
)

# What is read of each status parquet; url and status must be there, a missing caption or
# error_message column (ingested without captions) reads as nulls.
STATUS_COLUMNS = ("url", "caption", "status", "error_message")
_REQUIRED = ("url", "status")
_ROWS = pa.schema([*((name, pa.string()) for name in STATUS_COLUMNS), ("pos", pa.int64())])
_ERRORS = pa.schema([("error", pa.string()), ("count", pa.int64()), ("first", pa.int64())])
_CANDIDATES = pa.schema([("first", pa.int64()), ("url", pa.string()), ("caption", pa.string())])
_TOP = 10


def is_transient(error_message: str | None) -> bool:
    """Whether a download error may succeed on a later try (5xx, 429, timeouts, connections)."""
    return bool(error_message) and bool(_TRANSIENT.search(error_message))


@dataclass
class StatusCounts:
    """What :func:`scan_status` found. ``buckets`` (aggregated, after splits) and ``spilled``
    (whether any rows went to disk) say how the work was done, for tests and benchmarks."""

    tried: int = 0
    written: int = 0
    failed: int = 0
    failed_transient: int = 0
    top_errors: list[dict[str, Any]] = field(default_factory=list)
    candidates: int = 0
    buckets: int = 0
    spilled: bool = False


def scan_status(
    storage: Storage,
    folder: str,
    shard_ids: list[int],
    *,
    candidates: str | None = None,
    candidate_columns: tuple[str, str] = ("url", "caption"),
    bucket_rows: int = BUCKET_ROWS,
    spill_dir: str | None = None,
) -> StatusCounts:
    """Count the samples of the status parquets of ``shard_ids`` (in that order) under
    ``folder``, in memory bounded by ``bucket_rows`` rows (see the module's doc).

    With ``candidates`` (a local path), the samples whose latest try failed transiently and that
    never succeeded are written there as a parquet file of two string columns named
    ``candidate_columns`` (url, caption), in the order of their first try. Spilled rows go to a
    private folder under ``spill_dir`` (default: the system's temporary folder, ``TMPDIR``),
    removed on return. A status parquet that is missing or unreadable stops the scan with an
    error naming it.
    """
    if bucket_rows < 1:
        raise ValueError(f"bucket_rows must be positive, got {bucket_rows}")
    counts = StatusCounts()
    shard_rows = np.zeros(len(shard_ids), dtype=np.int64)
    with tempfile.TemporaryDirectory(prefix="unclip-status-", dir=spill_dir) as tmp:
        rows: _Spill | None = None
        for ordinal, table in _read_shards(storage, folder, shard_ids):
            if rows is None:  # B from the first shard's size
                estimate = table.num_rows * len(shard_ids)
                rows = _Spill(
                    os.path.join(tmp, "rows"), _buckets(estimate, bucket_rows), bucket_rows
                )
            shard_rows[ordinal] = table.num_rows
            counts.written += int(pc.sum(pc.equal(table["status"], "success")).as_py() or 0)
            pos = (ordinal << 32) + np.arange(table.num_rows, dtype=np.int64)
            rows.add(table.append_column("pos", pa.array(pos)), key="url")
        if rows is None:
            rows = _Spill(os.path.join(tmp, "rows"), 1, bucket_rows)
        rows.finish()

        total = int(shard_rows.sum())
        # first row of each shard ordinal, for the candidates' ranges of about bucket_rows rows
        shard_start = np.concatenate(([0], np.cumsum(shard_rows)[:-1])).astype(np.int64)
        # while a bucket is aggregated, the error counts and candidates buffer a quarter of
        # bucket_rows each: the peak stays near one bucket's rows and its aggregation
        quarter = bucket_rows // 4
        errors = _Spill(os.path.join(tmp, "errors"), rows.parts, bucket_rows, flush=quarter)
        retry = _Spill(
            os.path.join(tmp, "candidates"),
            total // bucket_rows + 1,
            bucket_rows,
            flush=quarter,
            split=False,
        )
        for bucket in rows.tables():
            _release()
            counts.buckets += 1
            tried, failed = _aggregate(bucket)
            counts.tried += tried
            counts.failed += failed.num_rows
            if not failed.num_rows:
                continue
            transient = _flags(failed["error"], is_transient)
            counts.failed_transient += int(pc.sum(transient).as_py() or 0)
            groups = failed.group_by("error").aggregate([("first", "min"), ("first", "count")])
            errors.add(
                pa.table(
                    [groups["error"], groups["first_count"], groups["first_min"]], schema=_ERRORS
                ),
                key="error",
            )
            if candidates is not None:
                found = failed.filter(_flags(failed["error_message"], is_transient))
                first = found["first"].to_numpy()
                ranges = shard_start[first >> 32] // bucket_rows
                retry.add(found.select(_CANDIDATES.names).cast(_CANDIDATES), ids=ranges)
        errors.finish()
        top = _ERRORS.empty_table()
        for part in errors.tables():
            part = part.group_by("error").aggregate([("count", "sum"), ("first", "min")])
            part = pa.table([part["error"], part["count_sum"], part["first_min"]], schema=_ERRORS)
            top = _top(pa.concat_tables([top, _top(part)]))
        counts.top_errors = [
            {"error": e, "count": n}
            for e, n in zip(top["error"].to_pylist(), top["count"].to_pylist(), strict=True)
        ]
        if candidates is not None:
            retry.finish()
            schema = pa.schema([(name, pa.string()) for name in candidate_columns])
            with pq.ParquetWriter(candidates, schema) as writer:
                for part in retry.tables():
                    part = part.sort_by("first")
                    writer.write_table(pa.table([part["url"], part["caption"]], schema=schema))
                    counts.candidates += part.num_rows
        counts.spilled = rows.spilled or errors.spilled or retry.spilled
    return counts


def _release() -> None:
    """Hand the memory Arrow freed back to the system between buffers and buckets: its default
    allocator (mimalloc) keeps freed pages in per-thread heaps, so the peak grew with the number
    of buffers and buckets passed through (at 100× the quickstart's size, +165 MiB against +115
    MiB with this; the system allocator for the whole process gives +70 MiB)."""
    pa.default_memory_pool().release_unused()


def _buckets(rows: int, bucket_rows: int) -> int:
    """The power of two of buckets that puts at most ``bucket_rows`` of ``rows`` in each, but
    no more than :data:`FANOUT`: beyond that a bucket is split again when it is read (streamed,
    :meth:`_Spill.tables`), so each flush writes at most ``FANOUT`` pieces."""
    need = max(1, -(-rows // bucket_rows))
    return min(FANOUT, 1 << (need - 1).bit_length())


def _top(errors: pa.Table) -> pa.Table:
    """The ``_TOP`` most frequent errors, ties broken by the first failed sample (whose position
    is unique to one error, so the order is total)."""
    return errors.sort_by([("count", "descending"), ("first", "ascending")]).slice(0, _TOP)


def _aggregate(bucket: pa.Table) -> tuple[int, pa.Table]:
    """One bucket's distinct samples, and its failed samples (those with no success) with their
    latest try's caption (as written), error_message and error (the message, else the status),
    and the position of their first try."""
    success = pc.fill_null(pc.equal(bucket["status"], "success"), False)
    samples = pa.table(
        {
            "url": bucket["url"],
            "caption": pc.fill_null(bucket["caption"], ""),
            "success": success,
            "fpos": pc.if_else(success, pa.scalar(None, pa.int64()), bucket["pos"]),
        }
    )
    agg = samples.group_by(["url", "caption"]).aggregate(
        [("success", "any"), ("fpos", "min"), ("fpos", "max")]
    )
    failed = agg.filter(pc.invert(agg["success_any"]))
    # a bucket's rows are in position order (added shard by shard, kept in order by every
    # partitioning), so the latest try's row is found by bisection
    pos = bucket["pos"].to_numpy()
    latest = failed["fpos_max"].to_numpy()
    index = np.searchsorted(pos, latest)
    if len(index) and not np.array_equal(pos[np.minimum(index, len(pos) - 1)], latest):
        raise AssertionError("status rows out of order in a bucket")
    tries = bucket.select(["caption", "status", "error_message"]).take(pa.array(index))
    message = tries["error_message"]
    has_message = pc.fill_null(pc.not_equal(message, ""), False)
    return agg.num_rows, pa.table(
        {
            "url": failed["url"],
            "caption": tries["caption"],
            "error_message": message,
            "error": pc.if_else(has_message, message, tries["status"]),
            "first": failed["fpos_min"],
        }
    )


def _flags(values: pa.ChunkedArray, test: Callable[[Any], bool]) -> pa.Array:
    """``test`` of each value, evaluated once per distinct value (nulls included)."""
    distinct = pc.unique(values)
    flags = pa.array([test(v) for v in distinct.to_pylist()], pa.bool_())
    return pc.take(flags, pc.index_in(values, value_set=distinct))


# -- reading ---------------------------------------------------------------------------------


def read_status(storage: Storage, folder: str, shard_id: int) -> pa.Table:
    """One shard's status rows: the :data:`STATUS_COLUMNS` as strings (a missing caption or
    error_message column as nulls). A parquet that cannot be parsed, or lacks url or status, is
    a :class:`UserFacingError` naming it; storage errors (missing file, transient failures past
    the retries) are the storage's, which name it too."""
    url = shard_urls(folder, shard_id)["parquet"]
    try:
        with storage.open(url) as handle:
            source = pq.ParquetFile(handle)
            names = source.schema_arrow.names
            missing = [name for name in _REQUIRED if name not in names]
            if missing:
                raise UserFacingError(
                    f"{url}: not an img2dataset status parquet (no {' or '.join(missing)} column)"
                )
            table = source.read(columns=[name for name in STATUS_COLUMNS if name in names])
    except (StorageError, UserFacingError):
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        stats = basename(shard_urls(folder, shard_id)["stats"])
        raise UserFacingError(
            f"{url}: not a readable status parquet ({type(exc).__name__}: {exc}); shard "
            f"{shard_name(shard_id)} is damaged: remove its {stats} to leave it out "
            "(`unclip ingest` then downloads an input shard again)"
        ) from None
    columns = [
        table[name].cast(pa.string()) if name in names else pa.nulls(table.num_rows, pa.string())
        for name in STATUS_COLUMNS
    ]
    return pa.table(columns, names=list(STATUS_COLUMNS))


def _read_shards(
    storage: Storage, folder: str, shard_ids: list[int], ahead: int = READ_AHEAD
) -> Iterator[tuple[int, pa.Table]]:
    """``(ordinal, rows)`` of each shard in order, ``ahead`` reads in flight in threads."""
    if not shard_ids:
        return
    pending: deque[Future] = deque()
    upcoming = iter(shard_ids)
    with ThreadPoolExecutor(min(ahead, len(shard_ids)), thread_name_prefix="status") as pool:
        try:
            for shard_id in upcoming:
                pending.append(pool.submit(read_status, storage, folder, shard_id))
                if len(pending) >= ahead:
                    break
            ordinal = 0
            while pending:
                table = pending.popleft().result()
                for shard_id in upcoming:
                    pending.append(pool.submit(read_status, storage, folder, shard_id))
                    break
                yield ordinal, table
                ordinal += 1
        finally:
            for future in pending:
                future.cancel()


# -- spilling --------------------------------------------------------------------------------

_COMPRESSION = "lz4" if pa.Codec.is_available("lz4") else None


class _Spill:
    """Rows partitioned into ``parts`` partitions, kept in memory while they fit in a buffer of
    ``flush`` rows (default half of ``limit``), else appended to one file per partition under
    ``folder`` at each ``flush`` rows.

    Partitions are by the hash of a key column (bits ``shift`` and up of :func:`hash_strings`)
    or by ids the caller gives. Rows keep the order they were added in within a partition.
    :meth:`tables` yields the partitions in order, each read whole and its file removed; with
    ``split``, one over ``limit`` rows is first partitioned again on the next bits of the hash.
    A file is a sequence of length-prefixed Arrow IPC streams (one per flush), so it is appended
    to by opening it, never held open: there may be thousands of partitions.
    """

    def __init__(
        self,
        folder: str,
        parts: int,
        limit: int,
        *,
        flush: int | None = None,
        shift: int = 0,
        split: bool = True,
    ) -> None:
        self.folder, self.parts, self.limit, self.shift, self.split = (
            folder,
            parts,
            limit,
            shift,
            split,
        )
        # a flush holds the buffer twice (partitioned copy): half the limit keeps it at the limit
        self.flush = max(1, flush if flush is not None else limit // 2)
        self.key: str | None = None
        self.spilled = False
        self._buffer: list[tuple[pa.Table, np.ndarray]] = []
        self._buffered = 0
        self._memory: dict[int, pa.Table] = {}
        self._rows: dict[int, int] = {}  # rows written to each partition's file
        self._options = pa.ipc.IpcWriteOptions(compression=_COMPRESSION)

    def add(
        self, table: pa.Table, *, key: str | None = None, ids: np.ndarray | None = None
    ) -> None:
        """Add rows to the partition of each row's ``key`` hash, or of ``ids``."""
        if not table.num_rows:
            return
        if ids is None:
            self.key = key
            ids = self._ids(table[key])
        self._buffer.append((table, ids))
        self._buffered += table.num_rows
        if self._buffered >= self.flush:
            self._flush(to_disk=True)

    def _ids(self, values: pa.ChunkedArray | pa.Array) -> np.ndarray:
        if self.parts == 1:
            return np.zeros(len(values), dtype=np.int64)
        hashes = hash_strings(values) >> np.uint64(self.shift)
        return (hashes & np.uint64(self.parts - 1)).astype(np.int64)

    def finish(self) -> None:
        """No more rows: what is buffered goes to disk if anything went already, else stays."""
        self._flush(to_disk=self.spilled)

    def _flush(self, *, to_disk: bool) -> None:
        if not self._buffer:
            return
        _release()
        table = pa.concat_tables([t for t, _ in self._buffer])
        ids = np.concatenate([i for _, i in self._buffer])
        self._buffer, self._buffered = [], 0
        order = np.argsort(ids, kind="stable")  # stable: rows stay in order in a partition
        table = table.take(pa.array(order))
        bounds = np.searchsorted(ids[order], np.arange(self.parts + 1))
        if to_disk and not self.spilled:
            os.makedirs(self.folder, exist_ok=True)
            self.spilled = True
            memory, self._memory = self._memory, {}
            for part, rows in memory.items():
                self._write(part, rows)
        for part in np.flatnonzero(bounds[1:] > bounds[:-1]):
            rows = table.slice(bounds[part], bounds[part + 1] - bounds[part])
            if to_disk:
                self._write(int(part), rows)
            else:
                self._memory[int(part)] = rows

    def _path(self, part: int) -> str:
        return os.path.join(self.folder, f"{part}.arrows")

    def _write(self, part: int, rows: pa.Table) -> None:
        self._rows[part] = self._rows.get(part, 0) + rows.num_rows
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, rows.schema, options=self._options) as writer:
            writer.write_table(rows)
        data = sink.getvalue()
        with open(self._path(part), "ab") as handle:
            handle.write(struct.pack("<Q", data.size))
            handle.write(data)

    def _pieces(self, part: int) -> Iterator[pa.Table]:
        """The pieces of a partition's file, one flush at a time, then the file removed."""
        path = self._path(part)
        if not os.path.exists(path):
            return
        offset = 0
        with pa.memory_map(path) as source:
            data = source.read_buffer()
            while offset < data.size:
                (size,) = struct.unpack_from("<Q", data, offset)
                yield pa.ipc.open_stream(data.slice(offset + 8, size)).read_all()
                offset += 8 + size
        os.remove(path)

    def _read(self, part: int) -> pa.Table | None:
        if not self.spilled:
            return self._memory.pop(part, None)
        tables = list(self._pieces(part))
        if not tables:
            return None
        # one chunk a column: a bucket comes back from one small chunk per flush, hundreds of
        # them, which group slower and leave the heap fragmented into small blocks
        return pa.concat_tables(tables).combine_chunks()

    def tables(self) -> Iterator[pa.Table]:
        """Every non-empty partition, in order. One over the limit (the fan-out was capped, or
        the estimate low) is first partitioned again on the next bits of the hash, streamed
        from its file a piece at a time into a spill of its own, so it is never whole in
        memory."""
        for part in range(self.parts):
            over = self._rows.get(part, 0) > self.limit
            if self.spilled and over and self.split and self.key and self.shift < 56:
                yield from self._split(part).tables()
                continue
            table = self._read(part)
            if table is not None and table.num_rows:
                yield table

    def _split(self, part: int) -> _Spill:
        """Partition ``part`` partitioned again on the next bits of the hash (past the 56th bit,
        as when one URL was tried more than ``limit`` times, it is read whole)."""
        bits = self.parts.bit_length() - 1
        sub = _Spill(
            os.path.join(self.folder, f"{part}.split"),
            _buckets(self._rows[part], self.limit),
            self.limit,
            shift=self.shift + max(bits, 1),
        )
        sub.key = self.key
        for piece in self._pieces(part):
            sub.add(piece, ids=sub._ids(piece[self.key]))
        sub.finish()
        return sub


# -- hashing ---------------------------------------------------------------------------------


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash_strings(values: pa.ChunkedArray | pa.Array, chunk: int = 1 << 16) -> np.ndarray:
    """A 64-bit hash of each string (nulls all alike), from its bytes, vectorised with numpy:
    the same in every process and run, and well mixed in every bit, so any bits of it pick a
    partition. It needs about 8 bytes of memory per byte hashed, so it works ``chunk`` strings at
    a time."""
    if isinstance(values, pa.ChunkedArray):
        parts = [hash_strings(c, chunk) for c in values.chunks]
        return np.concatenate(parts) if parts else np.zeros(0, np.uint64)
    if len(values) > chunk:
        return np.concatenate(
            [hash_strings(values.slice(i, chunk), chunk) for i in range(0, len(values), chunk)]
        )
    values = values.cast(pa.large_string())
    count = len(values)
    if not count:
        return np.zeros(0, np.uint64)
    _, offsets_buffer, data_buffer = values.buffers()
    offsets = np.frombuffer(offsets_buffer, np.int64, count + 1, values.offset * 8)
    start = int(offsets[0])
    size = int(offsets[-1]) - start
    data = (
        np.frombuffer(data_buffer, np.uint8, size, start)
        if data_buffer is not None and size
        else np.zeros(0, np.uint8)
    )
    bounds = offsets - start
    lengths = np.diff(bounds)
    # each (position in the string, byte) pair mixed into 64 random-looking bits, summed per string
    within = np.arange(size, dtype=np.int64) - np.repeat(bounds[:-1], lengths)
    pairs = (within.astype(np.uint64) << np.uint64(8)) | data.astype(np.uint64)
    sums = np.concatenate((np.zeros(1, np.uint64), np.cumsum(_mix(pairs), dtype=np.uint64)))
    hashes = _mix((sums[bounds[1:]] - sums[bounds[:-1]]) ^ _mix(lengths.astype(np.uint64)))
    if values.null_count:
        hashes[~values.is_valid().to_numpy(zero_copy_only=False)] = np.uint64(0x6E756C6C)
    return hashes


# -- synthetic status parquets ---------------------------------------------------------------

SYNTHETIC_ERRORS = (
    "HTTP Error 404: Not Found",  # permanent
    "<urlopen error timed out>",  # transient
    "HTTP Error 503: Service Unavailable",  # transient
    "Image decoding error",  # permanent
    "cannot identify image file <_io.BytesIO object at 0x",  # + an address: one of a kind
)


def write_synthetic_status(
    storage: Storage,
    folder: str,
    shards: int,
    rows: int,
    *,
    first_shard: int = 0,
    seed: int = 0,
    success: float = 0.8,
    retries: float = 0.1,
) -> int:
    """Write ``shards`` shards of ``rows`` status rows each under ``folder`` (``NNNNN.parquet``
    with img2dataset's status columns url, caption, key, status, error_message, and the
    ``_stats.json`` that makes the shard complete; no tars), from shard ``first_shard`` on.
    Returns the number of rows written.

    Shaped like a real ingest's, at any size, deterministic in ``seed``: a fraction ``success`` of
    the rows are successes; the failures are spread over :data:`SYNTHETIC_ERRORS` (transient and
    permanent errors, and one whose message names an object address, so that there are as many
    distinct errors as such failures); a fraction ``retries`` of each shard's rows try again a
    sample of an earlier shard (same URL and caption), and a sample in 50 has no caption, stored
    as null in some rows and as the empty string in others.
    """
    digits = len(str(max(rows - 1, 1)))
    for shard in range(first_shard, first_shard + shards):
        rng = np.random.default_rng([seed, shard])
        ids = shard * rows + np.arange(rows, dtype=np.int64)
        if shard:  # some rows try again samples of the shards before
            again = rng.random(rows) < retries
            ids = np.where(again, rng.integers(0, max(shard * rows, 1), rows), ids)
        ok = rng.random(rows) < success
        kind = rng.integers(0, len(SYNTHETIC_ERRORS), rows)
        id_text = pc.cast(pa.array(ids), pa.string())
        url = pc.binary_join_element_wise(
            "https://img",
            pc.cast(pa.array(ids % 97), pa.string()),
            ".example.com/",
            id_text,
            ".jpg",
            "",
        )
        no_caption = ids % 50 == 0
        caption = pc.binary_join_element_wise("a picture of thing ", id_text, "")
        caption = pc.if_else(pa.array(no_caption), pa.scalar(None, pa.string()), caption)
        empty = pa.array(no_caption & (rng.random(rows) < 0.5))
        caption = pc.if_else(empty, pa.scalar("", pa.string()), caption)
        address = pc.cast(pa.array(rng.integers(1 << 40, 1 << 44, rows)), pa.string())
        message = pc.take(pa.array(SYNTHETIC_ERRORS), pa.array(kind))
        unique = pc.binary_join_element_wise(message, address, ">", "")
        message = pc.if_else(pa.array(kind == len(SYNTHETIC_ERRORS) - 1), unique, message)
        index = pc.utf8_lpad(pc.cast(pa.array(np.arange(rows)), pa.string()), digits, "0")
        table = pa.table(
            {
                "url": url,
                "caption": caption,
                "key": pc.binary_join_element_wise(shard_name(shard), index, ""),
                "status": pc.if_else(
                    pa.array(ok), pa.scalar("success"), pa.scalar("failed_to_download")
                ),
                "error_message": pc.if_else(pa.array(ok), pa.scalar(None, pa.string()), message),
            }
        )
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        urls = shard_urls(folder, shard)
        storage.write_bytes(urls["parquet"], sink.getvalue().to_pybytes())
        successes = int(ok.sum())
        storage.write_json(
            urls["stats"],
            {
                "count": rows,
                "successes": successes,
                "failed_to_download": rows - successes,
                "failed_to_resize": 0,
                "status_dict": {"success": successes, "failed_to_download": rows - successes},
            },
        )
    return shards * rows
