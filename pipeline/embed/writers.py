"""Who is writing completion records into an embedding store: one marker per writing process.

Why: a stage start needs the store's completion records. The records are the truth, and listing
them costs a page per 1000 (at 200k shards, 200 pages, and on some S3-compatible servers far more);
the compacted index (``done-index.parquet``) holds them all in one read, but only as of the last
run's end. The index alone is the whole truth exactly when no record was written after it, and
that is what these markers say:

* a process's first completion record puts ``<store>/writers/<id>.json`` there (:class:`Marker`);
  it is rewritten every ``HEARTBEAT_S`` seconds while the process writes;
* the index is rewritten from a full listing of the records at the end of every run, and only then
  is the run's marker removed;
* so, with ``writers/`` empty, every record is in the index: a reader lists that (nearly always
  empty) folder and reads the index, two requests, whatever the store's size. With a marker there
  (a run in progress, or one that died before its index), readers list the records as before;
* a marker whose heartbeat stopped ``STALE_S`` seconds before an index's listing began belongs to a
  writer that was dead through that listing: its records are in that index, and the marker is
  removed with it (:func:`remove_stale`), so one crashed run costs the slow path only until the
  next run ends.

A reader that sees an empty ``writers/`` and then reads an index written since sees a newer
complete state; one that reads the older index sees the state of its listing's time: never a record
whose store file is not there.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from pipeline.storage import Storage, StorageError, join

log = logging.getLogger(__name__)

WRITERS = "writers"
HEARTBEAT_S = 60.0
STALE_S = 600.0  # ten missed heartbeats: the writer is gone


def open_writers(storage: Storage, store_url: str) -> dict[str, dict]:
    """The markers in ``<store>/writers/`` (one listing; usually empty): {url: listing details}."""
    return {
        url: details
        for url, details in storage.list_details(join(store_url, WRITERS)).items()
        if url.endswith(".json")
    }


class Marker:
    """This process's marker in a store's ``writers/``, with a heartbeat thread, from
    construction until :meth:`close`."""

    def __init__(self, storage: Storage, store_url: str) -> None:
        self.storage = storage
        self.url = join(store_url, WRITERS, f"{uuid.uuid4().hex}.json")
        self.started = time.time()
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        self.storage.write_json(
            self.url,
            {
                "started": self.started,
                "heartbeat": time.time(),
                "host": socket.gethostname(),
                "pid": os.getpid(),
            },
        )

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._beat()
            except StorageError as exc:  # the next beat tries again; STALE_S allows ten misses
                log.warning("store writer marker %s: heartbeat not written: %s", self.url, exc)

    def close(self) -> None:
        """Stop the heartbeat and remove the marker: call once an index covers this process's
        records."""
        self._stop.set()
        self._thread.join()
        self.storage.remove(self.url)


def remove_stale(storage: Storage, store_url: str, listing_began: float) -> list[str]:
    """Remove the markers whose writers were dead throughout a records listing that began at
    ``listing_began`` (last heartbeat ``STALE_S`` before it): the index written from that listing
    holds their records. Returns the markers removed."""
    removed = []
    for url in open_writers(storage, store_url):
        try:
            beat = float(storage.read_json(url)["heartbeat"])
        except (StorageError, KeyError, TypeError, ValueError):
            continue  # removed meanwhile, or unreadable: leave it (readers take the slow path)
        if beat < listing_began - STALE_S:
            storage.remove(url)
            removed.append(url)
    if removed:
        log.info("store %s: removed %d stale writer markers", store_url, len(removed))
    return removed
