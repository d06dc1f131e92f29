"""A worker's reader of one data stream: rows in the order :mod:`pipeline.train.order` gives, read
ahead on a thread and decoded on a small pool, with the stream's position after every row.

The reading thread walks the stream's groups: for each group it opens the group's pieces lazily
(:meth:`Source.rows`, asking only for the slots still to draw, so a resumed stream skips the drawn
ones without decoding them), takes each draw's row from its piece, holding the rows a piece gave
before their turn (about the shuffle buffer's worth), and hands the raw row to the decode pool.
The consumer (:meth:`StreamReader.take`) gets decoded rows in order; a bad row is an empty slot:
it moves the position and gives no row. A read that fails (after the storage retries) fails the
consumer's ``take`` with that error, naming the file.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from pipeline.train.order import Order, Position
from pipeline.train.sources import Raw, Source

_END = object()


class StreamReader:
    """Rows of ``stream`` from ``start`` on (see the module); ``position`` is where the stream
    stands after the rows taken so far."""

    def __init__(
        self,
        source: Source,
        order: Order,
        stream: int,
        start: Position,
        pool: ThreadPoolExecutor,
        *,
        prefetch: int = 256,
    ) -> None:
        self.source, self.order, self.stream, self.pool = source, order, stream, pool
        self.position = order.normalize(stream, start)
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name=f"stream-{stream}", daemon=True)
        self._thread.start()

    def take(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` good rows."""
        rows: list[dict[str, Any]] = []
        while len(rows) < n:
            item = self._queue.get()
            if isinstance(item, BaseException):
                self.close()
                raise item
            after, future = item
            row = future.result() if future is not None else None
            self.position = after
            if row is not None:
                rows.append(row)
        return rows

    def close(self) -> None:
        """Stop reading ahead (the reading thread ends at its next row)."""
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):  # unblock a producer waiting on a full queue
                self._queue.get(timeout=0.1)

    # -- the reading thread --------------------------------------------------------------------

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for after, raw in self._draws():
                future: Future | None = None
                if raw is not None:
                    future = self.pool.submit(self.source.decode, raw)
                if not self._put((after, future)):
                    return
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put(exc)

    def _draws(self) -> Iterator[tuple[Position, Raw]]:
        for epoch, drawn, draws in self.order.groups_from(self.stream, self.position):
            wanted: dict[int, set[int]] = {}
            for piece, slot in draws:
                wanted.setdefault(piece, set()).add(slot)
            readers = {p: self.source.rows(p, epoch, wanted[p]) for p in wanted}
            held: dict[int, dict[int, Raw]] = {p: {} for p in wanted}
            try:
                for count, (piece, slot) in enumerate(draws, drawn + 1):
                    yield Position(epoch, count), _fetch(readers[piece], held[piece], slot)
                    if self._stop.is_set():
                        return
            finally:
                for reader in readers.values():
                    reader.close()


def _fetch(reader: Iterator[tuple[int, Raw]], held: dict[int, Raw], slot: int) -> Raw:
    """The raw row of ``slot`` from a piece's reader, keeping the rows it gives before."""
    if slot in held:
        return held.pop(slot)
    for got, raw in reader:
        if got == slot:
            return raw
        held[got] = raw
    return None  # the piece ended without it: an empty slot
