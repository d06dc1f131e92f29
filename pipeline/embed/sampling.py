"""A seeded sample of an embedding store's rows, read one store file at a time.

The autoregressive prior fits its PCA quantizer (and the dot-product buckets) on a sample of the
store's image and text embeddings. Reading the whole store to draw it (``EmbeddingStore.read_all``)
holds the dataset in the driver: at LAION size (200k store files of ~10k rows, 1024-d) that is
terabytes. :func:`sample_rows` reads at most a bounded number of store files (one column set, a few
files at a time), keeps a seeded random subset of each, and drops the rest, so the driver holds the
sample plus one store file per read thread, and reads a number of bytes that does not grow with the
store. :func:`sample_arrays` gives the same rows of the embedding columns as float32 arrays, filled
in place file by file (what ``prepare_prior`` uses: no float16 table of the sample beside them).

How the rows are chosen (:func:`plan_sample`; ``S`` files, ``R`` rows in all, ``n`` wanted):

* Few files (at most ``max(max_shards, ⌈2·n·S/R⌉)``): every file is read, and each gives its share
  of the sample in proportion to its rows (largest remainders, ties broken by the seed). This is a
  stratified sample: every row is drawn with probability ``n/R`` (up to one row per file of
  rounding), and the per-file means are represented exactly, so it is no worse than a simple random
  sample of ``n`` rows.
* Many files: ``k = max(max_shards, ⌈2·n·S/R⌉)`` files are chosen with probability proportional
  to their rows (systematic sampling: the files laid end to end in a seeded random order, ``k``
  points ``R/k`` rows apart from a seeded random start; a file is read when a point falls in it,
  and gets one share of ``n/k`` rows per point). A file of ``r`` rows is thus read with probability
  ``k·r/R`` and gives ``n/k`` of its rows, so every row is drawn with probability ``n/R``: the
  sample is self-weighting, not biased towards large or small files. The factor 2 makes the chosen
  files hold about twice the sample, so no file has to give all its rows.

The bias, and what it costs: a file with fewer rows than its share gives all of them and the
remainder goes to the other chosen files (in proportion to their shares), so the rows of files
smaller than ``n/k`` rows are slightly under-represented; if the chosen files hold fewer than ``n``
rows in all, further files are taken in the seeded order until they do. When files are sampled,
the rows of one file are correlated (a source shard is a slice of the URL list: one crawl, often
one site), so the sample is as informative as ``k`` files' worth of clusters, not as ``n``
independent rows: the files' means vary between draws more than a simple random sample's would.
With ``k`` = 256 this is well inside what a PCA of the embeddings needs; raise ``max_shards`` for
a store whose shards differ a lot, at the cost of reading more bytes.

The same seed and the same completed files give the same rows in the same order: the plan is a
pure function of the seed and the files' row counts, each file's rows are chosen by a generator
seeded by (seed, file name), and the result is put together in file-name order whatever order the
reads finish in.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.embed.store import EmbeddingStore, column_array
from pipeline.errors import UserFacingError

MAX_SHARDS = 256  # store files read for a sample, unless fewer cannot hold it (see plan_sample)
OVERSAMPLE = 2  # the chosen files hold about this many times the sample
READ_THREADS = 4  # store files read at once: the driver holds one file per thread


def plan_sample(
    rows: Mapping[str, int], n: int, seed: int, max_shards: int = MAX_SHARDS
) -> dict[str, int]:
    """Which store files a sample of ``n`` rows reads, and how many rows each gives.

    ``rows`` is each file's row count (its completion record's ``rows``). The result, by file
    name, sums to ``min(n, total rows)``; every count is at most the file's rows. See the module
    docstring for the design and its bias.
    """
    names = sorted(name for name, count in rows.items() if count > 0)
    sizes = np.array([rows[name] for name in names], dtype=np.int64)
    total = int(sizes.sum())
    n = min(int(n), total)
    if n <= 0:
        return {}
    rng = np.random.default_rng(_seed(seed))
    k = max(int(max_shards), math.ceil(OVERSAMPLE * n * len(names) / total))
    if k >= len(names):  # every file, a share in proportion to its rows
        chosen, weights = np.arange(len(names)), sizes
    else:  # k systematic points over the files laid end to end in a seeded order
        order = rng.permutation(len(names))
        ends = np.cumsum(sizes[order])
        points = (rng.random() + np.arange(k)) * (total / k)
        hit = np.minimum(np.searchsorted(ends, points, side="right"), len(names) - 1)
        hits = np.bincount(hit, minlength=len(names))
        taken = hits > 0
        held = int(sizes[order[taken]].sum())
        for position in np.flatnonzero(~taken):  # rare: the chosen files hold too few rows
            if held >= n:
                break
            taken[position] = True
            hits[position] = 1
            held += int(sizes[order[position]])
        chosen, weights = order[taken], hits[taken]
    quotas = _apportion(n, weights.astype(np.int64), sizes[chosen], rng)
    plan = {names[i]: int(q) for i, q in zip(chosen, quotas, strict=True) if q > 0}
    return dict(sorted(plan.items()))


def sample_rows(
    store: EmbeddingStore,
    columns: Sequence[str],
    n: int,
    seed: int,
    *,
    records: Mapping[str, Mapping[str, Any]] | None = None,
    max_shards: int = MAX_SHARDS,
    threads: int = READ_THREADS,
    shard_column: str | None = None,
) -> pa.Table:
    """A seeded sample of at most ``n`` rows of ``columns`` from the store's completed files.

    Reads the files :func:`plan_sample` names, ``threads`` at a time, each with only ``columns``,
    and keeps its planned number of rows, chosen without replacement by a generator seeded by
    (``seed``, file name): no row twice, the same rows for the same seed and store. Peak memory is
    the sample plus ``threads`` store files' columns, whatever the store's size. ``records`` are
    the completion records (``store.completed()``, read here when not given). Rows come in file
    name order, then in their order within the file; the table has a chunk per file read.
    ``shard_column``, when given, names an added string column holding each row's store file
    (source shard) name: what a reader needs to find the row's image in its source tar
    (:func:`pipeline.embed.store.iter_shard_with_embeddings`), as ``unclip eval`` does.
    """
    plan = _plan(store, records, n, seed, max_shards)
    if not plan:
        return _with_shard(_empty(store, records, columns), "", shard_column)
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(plan)))) as pool:
        parts = list(
            pool.map(
                lambda item: _with_shard(_take(store, *item, columns, seed), item[0], shard_column),
                plan.items(),
            )
        )
    return pa.concat_tables(parts)


def sample_arrays(
    store: EmbeddingStore,
    columns: Sequence[str],
    n: int,
    seed: int,
    *,
    dtype: Any = np.float32,
    records: Mapping[str, Mapping[str, Any]] | None = None,
    max_shards: int = MAX_SHARDS,
    threads: int = READ_THREADS,
) -> dict[str, np.ndarray]:
    """:func:`sample_rows`' rows of fixed-width columns (the embeddings) as ``(rows, width)``
    arrays of ``dtype``, by column: the same rows in the same order.

    Each file's rows are written straight into arrays allocated once for the whole sample, so the
    driver's peak is the arrays plus ``threads`` store files: no table of the sample, and no float16
    copy beside the float32 one (at 100k rows of 1024-d image and text embeddings, 800 MB instead
    of about 1.4 GB).
    """
    plan = _plan(store, records, n, seed, max_shards)
    if not plan:
        empty = _empty(store, records, columns)
        return {c: column_array(empty, c).astype(dtype) for c in columns}
    items = list(plan.items())
    offsets = np.concatenate([[0], np.cumsum([count for _, count in items])])
    first = _take(store, *items[0], columns, seed)
    for c in columns:
        if not pa.types.is_fixed_size_list(first.schema.field(c).type):
            raise ValueError(f"{c} is not a fixed-width column of the store: use sample_rows")
    out = {
        c: np.empty((int(offsets[-1]), first.schema.field(c).type.list_size), dtype)
        for c in columns
    }
    filled = np.zeros(len(items), dtype=np.int64)

    def put(i: int, table: pa.Table) -> None:
        for c in columns:
            out[c][offsets[i] : offsets[i] + table.num_rows] = column_array(table, c)
        filled[i] = table.num_rows

    put(0, first)
    del first
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(items) - 1))) as pool:
        list(
            pool.map(lambda i: put(i, _take(store, *items[i], columns, seed)), range(1, len(items)))
        )
    if filled.sum() < offsets[-1]:  # a file held fewer rows than its record counts: no gaps
        keep = np.concatenate(
            [np.arange(o, o + f) for o, f in zip(offsets[:-1], filled, strict=True)]
        )
        out = {c: values[keep] for c, values in out.items()}
    return out


def _plan(
    store: EmbeddingStore,
    records: Mapping[str, Mapping[str, Any]] | None,
    n: int,
    seed: int,
    max_shards: int,
) -> dict[str, int]:
    records = store.completed() if records is None else records
    if not records:
        raise UserFacingError(f"the embedding store at {store.url} has no completed shards")
    rows = {name: int(record["rows"]) for name, record in records.items()}
    return plan_sample(rows, n, seed, max_shards)


def _take(
    store: EmbeddingStore, name: str, count: int, columns: Sequence[str], seed: int
) -> pa.Table:
    """``count`` rows of one store file, chosen by a generator seeded by (seed, file name)."""
    table = store.read_shard(name, columns)
    rng = np.random.default_rng([_seed(seed), zlib.crc32(name.encode())])
    keep = np.sort(rng.choice(table.num_rows, size=min(count, table.num_rows), replace=False))
    return table.take(pa.array(keep))  # a copy: the file's buffers are freed with ``table``


def _with_shard(table: pa.Table, name: str, shard_column: str | None) -> pa.Table:
    """``table`` with a column ``shard_column`` of ``name`` on every row (unchanged when None)."""
    if shard_column is None:
        return table
    return table.append_column(shard_column, pa.array([name] * table.num_rows, pa.string()))


def _empty(
    store: EmbeddingStore,
    records: Mapping[str, Mapping[str, Any]] | None,
    columns: Sequence[str],
) -> pa.Table:
    """No rows, in the store's schema (a store whose files are all empty)."""
    names = sorted(store.completed() if records is None else records)
    return store.read_shard(names[0], columns).slice(0, 0)


def _apportion(
    n: int, weights: np.ndarray, caps: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """``n`` split in proportion to ``weights`` (largest remainders, ties by ``rng``), no part above
    its cap: what a capped part cannot take goes to the others, again in proportion."""
    quota = np.zeros(len(weights), dtype=np.int64)
    remaining = n
    while remaining > 0:
        active = quota < caps
        w = np.where(active, weights, 0)
        total = int(w.sum())
        if total == 0:  # every part is full: the caps hold fewer than n
            break
        base = remaining * w // total
        remainder = np.where(active, remaining * w % total, -1)
        extra = remaining - int(base.sum())
        bonus = np.zeros_like(base)
        bonus[np.lexsort((rng.random(len(w)), -remainder))[:extra]] = 1
        add = np.minimum(base + bonus, caps - quota)
        quota += add
        remaining -= int(add.sum())
    return quota


def _seed(seed: int) -> int:
    """A config seed as numpy's seeding wants it (non-negative)."""
    return int(seed) % 2**63
