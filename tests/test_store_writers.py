"""The embedding store's completion records between runs come from the index alone (two requests),
and from a listing whenever a writer is open or died before its index (pipeline/embed/writers.py).
On local disk and on the S3 endpoint; no Ray."""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.embed import writers
from pipeline.embed.store import INDEX, EmbeddingStore
from pipeline.storage import join
from tests.conftest import Root


def _store(root: Root, n: int) -> EmbeddingStore:
    store = EmbeddingStore(root.storage, join(root.url, "embeddings", "w"))
    for i in range(n):
        store.write_record(f"{i:05d}", {"rows": i, "skipped": {}})
    return store


def test_between_runs_the_records_come_from_the_index_without_listing_them(
    storage_root: Root, listings: list[str]
) -> None:
    store = _store(storage_root, 6)
    assert len(writers.open_writers(storage_root.storage, store.url)) == 1  # while it writes
    store.write_index()
    assert writers.open_writers(storage_root.storage, store.url) == {}  # gone with the index
    listings.clear()
    fresh = EmbeddingStore(storage_root.storage, store.url)  # another process's view
    records = fresh.completed()
    assert {n: r["rows"] for n, r in records.items()} == {f"{i:05d}": i for i in range(6)}
    assert listings == ["writers"]  # no listing of done/


def test_the_index_at_a_runs_end_reads_none_of_the_records_the_run_wrote(
    storage_root: Root, json_reads: list[str]
) -> None:
    """The run's own records come from its memory, their versions from the one listing: at 100k
    shards a GET each would cost minutes."""
    store = _store(storage_root, 5)
    json_reads.clear()
    assert {n: r["rows"] for n, r in store.write_index().items()} == {
        f"{i:05d}": i for i in range(5)
    }
    assert [url for url in json_reads if "/done/" in url] == []
    assert len(EmbeddingStore(storage_root.storage, store.url).completed()) == 5


def test_an_open_writer_makes_readers_list_the_records(
    storage_root: Root, listings: list[str]
) -> None:
    store = _store(storage_root, 3)
    store.write_index()
    writer = EmbeddingStore(storage_root.storage, store.url)  # a second run, still writing
    writer.write_record("00007", {"rows": 7, "skipped": {}})
    listings.clear()
    reader = EmbeddingStore(storage_root.storage, store.url)
    assert sorted(reader.completed()) == ["00000", "00001", "00002", "00007"]
    assert listings == ["writers", "done"]
    writer.write_index()
    listings.clear()
    assert sorted(reader.completed()) == ["00000", "00001", "00002", "00007"]
    assert listings == ["writers"]


def test_a_crashed_writers_marker_is_removed_by_the_next_index_once_stale(
    storage_root: Root, listings: list[str]
) -> None:
    """A run that died before its index leaves its marker: readers list the records (the index
    lacks its shards) until a later index's listing began ``STALE_S`` after its last heartbeat;
    a live writer's marker (fresh heartbeat) stays."""
    storage = storage_root.storage
    store = _store(storage_root, 2)
    store.write_index()
    # what a writer that died leaves: its record, and its marker with its last heartbeat
    old = time.time() - writers.STALE_S - 5
    crashed = join(store.url, writers.WRITERS, "crashed.json")
    storage.write_json(crashed, {"started": old, "heartbeat": old, "host": "h", "pid": 1})
    storage.write_json(join(store.url, "done", "00005.json"), {"rows": 5, "skipped": {}})
    live = EmbeddingStore(storage, store.url)
    live.write_record("00006", {"rows": 6, "skipped": {}})
    live_marker = set(writers.open_writers(storage, store.url)) - {crashed}
    assert len(live_marker) == 1

    reader = EmbeddingStore(storage, store.url)
    assert sorted(reader.completed()) == ["00000", "00001", "00005", "00006"]
    rerun = EmbeddingStore(storage, store.url)
    rerun.write_record("00001", {"rows": 10, "skipped": {}})
    rerun.write_index()
    # the crashed one removed, the live one kept
    assert set(writers.open_writers(storage, store.url)) == live_marker
    live.write_index()
    listings.clear()
    records = reader.completed()
    assert {n: r["rows"] for n, r in records.items()} == {
        "00000": 0,
        "00001": 10,
        "00005": 5,
        "00006": 6,
    }
    assert listings == ["writers"]


def test_an_index_from_before_the_writer_rule_is_not_read_alone(
    storage_root: Root, listings: list[str]
) -> None:
    store = _store(storage_root, 3)
    store.write_index()
    url = join(store.url, INDEX)
    with storage_root.storage.open(url) as handle:
        table = pq.read_table(handle)
    sink = pa.BufferOutputStream()
    pq.write_table(table.replace_schema_metadata(None), sink)  # as an older version wrote it
    storage_root.storage.write_bytes(url, sink.getvalue().to_pybytes())
    listings.clear()
    assert sorted(store.completed()) == ["00000", "00001", "00002"]
    assert listings == ["writers", "done"]
