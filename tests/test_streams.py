"""A worker's stream reader (``pipeline.train.streams``) over an in-memory source: rows come in the
order's sequence, a reader resumed at a position gives exactly the rest without decoding what it
skips, a bad row is an empty slot, and a failed read reaches the consumer."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import Memory

from pipeline.storage import StorageOptions
from pipeline.train.order import Order, Piece, Position, stream_slots
from pipeline.train.streams import StreamReader

SIZES = [6, 9, 4, 11, 7]


def _setup(**kw) -> tuple[Memory, Order]:
    pieces = tuple(Piece(str(i), n) for i, n in enumerate(SIZES))
    return Memory(pieces, StorageOptions(), **kw), Order(
        pieces, streams=2, seed=5, window=2, buffer=4
    )


@pytest.fixture
def pool():
    with ThreadPoolExecutor(2) as executor:
        yield executor


def test_rows_follow_the_order_across_epochs(pool) -> None:
    source, order = _setup()
    reader = StreamReader(source, order, 1, Position(), pool)
    expected = [f"{s.piece}/{s.slot}" for s in stream_slots(order, 1, Position(), 40)]
    assert [r["key"] for r in reader.take(25) + reader.take(15)] == expected
    assert reader.position == stream_slots(order, 1, Position(), 40)[-1].after
    reader.close()


def test_a_resumed_reader_continues_exactly_without_decoding_what_it_skips(pool) -> None:
    source, order = _setup()
    first = StreamReader(source, order, 0, Position(), pool)
    straight = [r["key"] for r in first.take(30)]
    first.close()
    source, order = _setup()
    a = StreamReader(source, order, 0, Position(), pool)
    head = [r["key"] for r in a.take(13)]
    a.close()
    source.decoded.clear()
    with ThreadPoolExecutor(1) as one:  # decodes in order
        b = StreamReader(source, order, 0, a.position, one)
        assert head + [r["key"] for r in b.take(17)] == straight
        b.close()
    # the resumed reader's first decode is the first row it gives: what it skipped was not decoded
    assert source.decoded[:17] == straight[13:]


def test_a_bad_row_is_an_empty_slot(pool) -> None:
    order_slots = stream_slots(_setup()[1], 0, Position(), 12)
    bad = order_slots[3]
    source, order = _setup(bad=frozenset({(bad.piece, bad.slot)}))
    reader = StreamReader(source, order, 0, Position(), pool)
    rows = [r["key"] for r in reader.take(11)]
    assert rows == [f"{s.piece}/{s.slot}" for s in order_slots if s != bad]
    assert reader.position == order_slots[-1].after  # 12 slots drawn for 11 rows
    reader.close()


def test_a_failed_read_reaches_the_consumer(pool) -> None:
    source, order = _setup()
    first_piece = order.epoch_pieces(0, 0)[0]
    source.fail_piece = first_piece
    reader = StreamReader(source, order, 0, Position(), pool)
    with pytest.raises(OSError, match=f"cannot read piece {first_piece}"):
        reader.take(5)
