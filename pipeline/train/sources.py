"""What a training worker reads: each stage's data as pieces (:class:`pipeline.train.order.Piece`)
that the worker opens itself, in the order :mod:`pipeline.train.order` gives, so every run draws a
reproducible sequence of rows and no process but the worker touches them.

A :class:`Source` is built on the driver from listings and completion records (no data is read
there) and shipped to the workers. Its ``rows(piece, epoch, wanted)`` yields ``(slot, raw)`` for a
piece's wanted slots in slot order (``raw`` still encoded: image bytes), passing over the others
without decoding them; ``decode(raw)`` (on the worker's decode threads) gives the row's arrays, or
``None`` for a bad row, which is skipped and counted by the one reader policy
(:mod:`pipeline.data.reader`).

* :class:`StoreRows` (the prior): store files read whole, slots shuffled inside each piece;
* :class:`StoreImages` (the decoder): a source tar streamed beside its store file, matched by key;
  slot ``k`` is the store file's row ``k``;
* :class:`TarImages` (the upsamplers, CLIP): source tars alone; slot ``k`` is the tar's ``k``-th
  sample, the piece's slots its sample count
  (:func:`pipeline.data.shard_set.sample_counts`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.data.reader import Skips, read_samples
from pipeline.data.shard_set import TarLocator
from pipeline.storage import Storage, StorageOptions
from pipeline.train.order import Piece, within_piece

log = logging.getLogger(__name__)

Raw = Any


@dataclass
class Source:
    """The pieces of a stage's data and how a worker reads them (see the module)."""

    pieces: tuple[Piece, ...]
    storage: StorageOptions
    seed: int = 0

    def rows(self, piece: int, epoch: int, wanted: set[int]) -> Iterator[tuple[int, Raw]]:
        raise NotImplementedError

    def decode(self, raw: Raw) -> dict[str, Any] | None:
        return raw

    def _storage(self) -> Storage:
        if getattr(self, "_cached_storage", None) is None:
            self._cached_storage = Storage(self.storage)
        return self._cached_storage

    def __getstate__(self) -> dict[str, Any]:  # a Storage holds clients: rebuilt where unpickled
        return {k: v for k, v in self.__dict__.items() if k != "_cached_storage"}


def _store_file(
    storage: Storage, store: str, name: str, columns: Sequence[str]
) -> tuple[int, dict]:
    """The rows of the store's file ``name``: its row count and ``key`` plus ``columns``, fixed-size
    columns as arrays, the others as lists."""
    import pyarrow as pa

    from pipeline.embed.store import EmbeddingStore, column_array

    table = EmbeddingStore(storage, store).read_shard(name, ["key", *columns])
    columns = ["key", *columns]
    out: dict[str, np.ndarray | list] = {}
    for c in columns:
        if pa.types.is_fixed_size_list(table.schema.field(c).type):
            out[c] = column_array(table, c)
        else:
            out[c] = table.column(c).to_pylist()
    return table.num_rows, out


@dataclass
class StoreRows(Source):
    """Rows of the embedding store's files (the prior's data)."""

    store: str = ""
    columns: tuple[str, ...] = ()

    def rows(self, piece: int, epoch: int, wanted: set[int]) -> Iterator[tuple[int, Raw]]:
        count, values = _store_file(
            self._storage(), self.store, self.pieces[piece].name, self.columns
        )
        rows = within_piece(self.seed, epoch, piece, self.pieces[piece].slots)
        for slot in sorted(wanted):
            row = int(rows[slot]) if slot < len(rows) else count
            if row >= count:
                yield slot, None
                continue
            yield slot, {c: values[c][row] for c in ("key", *self.columns)}


@dataclass
class StoreImages(Source):
    """Images from the source tars beside the store's columns, matched by key (the decoder)."""

    store: str = ""
    tars: TarLocator = field(default_factory=lambda: TarLocator(""))
    image_size: int = 64
    columns: tuple[str, ...] = ()
    skips: Skips = field(default_factory=Skips)

    def rows(self, piece: int, epoch: int, wanted: set[int]) -> Iterator[tuple[int, Raw]]:
        name = self.pieces[piece].name
        storage = self._storage()
        _, values = _store_file(storage, self.store, name, self.columns)
        slot_of = {key: i for i, key in enumerate(values["key"])}
        tar = self.tars(name)
        left = set(wanted)
        for sample in read_samples(storage, tar, self.skips, need_caption=False):
            slot = slot_of.get(sample.key)
            if slot is None or slot not in left:
                continue
            left.discard(slot)
            yield slot, (sample.key, sample.image, {c: values[c][slot] for c in self.columns}, name)
            if not left:
                return
        for slot in sorted(left):  # in the store but not in the tar: empty slots
            yield slot, None

    def decode(self, raw: Raw) -> dict[str, Any] | None:
        key, data, values, name = raw
        image = _image(key, data, self.image_size, self.skips, name)
        return None if image is None else {"key": key, "image": image, **values}


@dataclass
class TarImages(Source):
    """Images (and captions) of the source tars alone (the upsamplers, CLIP)."""

    tars: TarLocator = field(default_factory=lambda: TarLocator(""))
    image_size: int = 64
    captions: bool = False
    skips: Skips = field(default_factory=Skips)

    def rows(self, piece: int, epoch: int, wanted: set[int]) -> Iterator[tuple[int, Raw]]:
        name = self.pieces[piece].name
        tar = self.tars(name)
        left = set(wanted)
        for sample in read_samples(self._storage(), tar, self.skips, need_caption=self.captions):
            if sample.index in left:
                left.discard(sample.index)
                yield sample.index, (sample.key, sample.image, sample.caption, name)
                if not left:
                    return
        for slot in sorted(left):  # bad samples, or fewer than the stats file counted
            yield slot, None

    def decode(self, raw: Raw) -> dict[str, Any] | None:
        key, data, caption, name = raw
        image = _image(key, data, self.image_size, self.skips, name)
        if image is None:
            return None
        return {"key": key, "image": image, **({"caption": caption} if self.captions else {})}


def _image(key: str, data: bytes, size: int, skips: Skips, shard: str) -> np.ndarray | None:
    """The decoded image, or None (skipped and counted) when its bytes do not decode. A source
    smaller than ``size`` fails the run, naming it (:class:`SourceTooSmall`)."""
    from pipeline.embed.store import SourceTooSmall, decode_image

    try:
        return decode_image(data, size, f"{key} of shard {shard}")
    except SourceTooSmall:
        raise
    except Exception:
        skips.add(key, "undecodable image", key)
        return None


def stack(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Rows → columns: arrays stacked, strings kept as lists."""
    out: dict[str, Any] = {}
    for name in rows[0]:
        values = [row[name] for row in rows]
        out[name] = values if isinstance(values[0], str) else np.stack(values)
    return out
