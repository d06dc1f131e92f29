"""The order in which a training run sees its data: seeded, different in every epoch, and a pure
function of the seed, the stream, the epoch and the position, so a resumed run draws exactly the
rows an uninterrupted one would have, on any number of workers.

Terms:

* **piece**: one shard of training rows (a store file, a source tar) with its number of **slots**,
  the rows it was recorded with. A slot is a row's place in its piece whether or not the row turns
  out readable; a bad row is an empty slot (skipped, counted), so positions never depend on what a
  read found.
* **stream**: the data is dealt to ``streams`` independent streams, and every training step takes
  ``batch_size / streams`` rows from each. Worker ``rank`` of ``world`` serves the streams
  ``s ≡ rank (mod world)``: the step's global batch is the same whatever the number of workers,
  and the data position is kept per stream.
* **epoch** ``e`` of stream ``s``: every piece, in a seeded order drawn for ``e`` (the same for
  all streams), dealt round-robin to the streams; taken ``window`` pieces at a time (a **group**).
  A group's slots are merged in a seeded random order (each next slot from a piece chosen with
  probability proportional to its slots left: a uniformly random interleaving that reads each
  piece front to back), then passed through a shuffle buffer of ``buffer`` slots, drained at the
  group's end.

Everything here works on slot indices, never on data: a reader follows the order holding at most
about ``buffer`` rows, and a resumed stream finds its group by the pieces' slot counts, skipping
whole pieces unread and, inside its group, the slots before its position without decoding them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = ["Order", "Piece", "Position", "Slot"]


@dataclass(frozen=True)
class Piece:
    """A shard of training rows: its name (as its reader knows it) and its number of slots."""

    name: str
    slots: int


@dataclass(frozen=True)
class Position:
    """Where a stream is: its epoch and the number of slots of that epoch already drawn."""

    epoch: int = 0
    drawn: int = 0


@dataclass(frozen=True)
class Slot:
    """One draw of a stream: which slot of which piece, and the position after it."""

    piece: int  # index into the run's pieces
    slot: int
    after: Position


@dataclass(frozen=True)
class Order:
    """The data order of a run (see the module): ``pieces`` dealt to ``streams`` streams, merged
    ``window`` pieces at a time through a shuffle buffer of ``buffer`` slots, seeded by ``seed``."""

    pieces: tuple[Piece, ...]
    streams: int
    seed: int
    window: int = 4
    buffer: int = 1000

    def __post_init__(self) -> None:
        if self.streams < 1 or self.window < 1 or self.buffer < 1:
            raise ValueError("streams, window and buffer must be at least 1")
        if len(self.pieces) < self.streams:
            raise ValueError(
                f"{len(self.pieces)} data shards cannot feed {self.streams} data streams: "
                "each stream needs a shard of its own"
            )

    # -- which pieces, in which groups ---------------------------------------------------------

    def epoch_pieces(self, stream: int, epoch: int) -> list[int]:
        """The pieces stream ``stream`` reads in ``epoch``, in order (indices into ``pieces``)."""
        return _epoch_pieces(len(self.pieces), self.streams, self.seed, stream, epoch)

    def groups(self, stream: int, epoch: int) -> list[list[int]]:
        """The epoch's pieces taken ``window`` at a time."""
        pieces = self.epoch_pieces(stream, epoch)
        return [pieces[i : i + self.window] for i in range(0, len(pieces), self.window)]

    def epoch_slots(self, stream: int, epoch: int) -> int:
        return sum(self.pieces[p].slots for p in self.epoch_pieces(stream, epoch))

    # -- the order inside a group --------------------------------------------------------------

    def group_order(self, stream: int, epoch: int, group: int) -> np.ndarray:
        """The group's draws in order: an (n, 2) array of (piece index, slot), every slot of the
        group's pieces exactly once, each piece's slots entering in their own order."""
        pieces = self.groups(stream, epoch)[group]
        counts = np.array([self.pieces[p].slots for p in pieces], dtype=np.int64)
        rng = np.random.default_rng([self.seed, stream, epoch, group, 1])
        labels = rng.permutation(np.repeat(np.arange(len(pieces)), counts))
        # each label's k-th occurrence is that piece's slot k
        slot = np.empty(len(labels), dtype=np.int64)
        for j in range(len(pieces)):
            where = np.flatnonzero(labels == j)
            slot[where] = np.arange(len(where))
        merged = np.stack([np.asarray(pieces, dtype=np.int64)[labels], slot], axis=1)
        return merged[_buffered(len(merged), self.buffer, rng)]

    # -- walking a stream ----------------------------------------------------------------------

    def locate(self, stream: int, position: Position) -> tuple[int, int]:
        """(group, offset in that group's order) of ``position`` in its epoch."""
        drawn = position.drawn
        for g, pieces in enumerate(self.groups(stream, position.epoch)):
            size = sum(self.pieces[p].slots for p in pieces)
            if drawn < size:
                return g, drawn
            drawn -= size
        raise ValueError(f"position {position} is past the end of its epoch")

    def normalize(self, stream: int, position: Position) -> Position:
        """The same place, rolled over to the next epoch when ``position`` ends its epoch."""
        epoch, drawn = position.epoch, position.drawn
        while drawn >= (total := self.epoch_slots(stream, epoch)):
            if total == 0:
                raise ValueError(f"stream {stream} has no slots")
            epoch, drawn = epoch + 1, drawn - total
        return Position(epoch, drawn)

    def groups_from(
        self, stream: int, start: Position
    ) -> Iterator[tuple[int, int, list[tuple[int, int]]]]:
        """The draws of ``stream`` from ``start`` on, a group at a time, epoch after epoch,
        forever: ``(epoch, drawn before the group's first, [(piece, slot), ...])``, the first
        group cut at ``start``."""
        position = self.normalize(stream, start)
        epoch, drawn = position.epoch, position.drawn
        group, offset = self.locate(stream, position)
        while True:
            groups = self.groups(stream, epoch)
            while group < len(groups):
                draws = self.group_order(stream, epoch, group)[offset:].tolist()
                yield epoch, drawn, draws
                drawn += len(draws)
                group, offset = group + 1, 0
            epoch, drawn, group = epoch + 1, 0, 0

    def walk(self, stream: int, start: Position) -> Iterator[Slot]:
        """Every draw of ``stream`` from ``start`` on, epoch after epoch, forever."""
        for epoch, drawn, draws in self.groups_from(stream, start):
            for count, (piece, slot) in enumerate(draws, drawn + 1):
                yield Slot(piece, slot, Position(epoch, count))


@lru_cache(maxsize=64)
def _epoch_pieces(n: int, streams: int, seed: int, stream: int, epoch: int) -> list[int]:
    order = np.random.default_rng([seed, epoch, 0]).permutation(n)
    return order[stream::streams].tolist()


def _buffered(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a shuffle buffer of ``size`` emits items 0..n-1 fed in order: full, it
    swaps each new item for a random one it holds and emits that; at the end it empties in a random
    order. With ``size >= n`` this is a uniform random permutation."""
    if size >= n:
        return rng.permutation(n)
    held = list(range(size))
    picks = rng.integers(0, size, size=n - size)
    out = np.empty(n, dtype=np.int64)
    for i, j in enumerate(picks.tolist()):
        out[i] = held[j]
        held[j] = size + i
    out[n - size :] = np.asarray(held, dtype=np.int64)[rng.permutation(size)]
    return out


def stream_slots(order: Order, stream: int, start: Position, count: int) -> list[Slot]:
    """The next ``count`` draws of ``stream`` from ``start`` (for tests and tools)."""
    walker = order.walk(stream, start)
    return [next(walker) for _ in range(count)]


def streams_of(rank: int, world: int, streams: int) -> list[int]:
    """The streams worker ``rank`` of ``world`` serves."""
    return list(range(rank, streams, world))


def per_stream(batch_size: int, streams: int) -> int:
    """Rows each stream gives a step."""
    if batch_size % streams:
        raise ValueError(f"batch_size {batch_size} is not a multiple of {streams} data streams")
    return batch_size // streams


def positions_from(saved: dict[str, Sequence[int]] | None, streams: int) -> list[Position]:
    """Every stream's position from a checkpoint's ``{"<stream>": [epoch, drawn]}`` (a fresh run:
    every stream at its start)."""
    saved = saved or {}
    return [Position(*saved[str(s)]) if str(s) in saved else Position() for s in range(streams)]


def within_piece(seed: int, epoch: int, piece: int, slots: int) -> np.ndarray:
    """A seeded permutation of a piece's rows for ``epoch``, for pieces read whole (a store file):
    slot ``k`` is row ``within_piece(...)[k]``, so their rows are shuffled inside the piece too."""
    return np.random.default_rng([seed, epoch, piece, 2]).permutation(slots)
