"""The data order (``pipeline.train.order``), on slot indices alone: every slot once per epoch,
epochs shuffled differently, a stream resumed at a position continues exactly, the shuffle buffer
holds no more than its size, and the step's rows do not depend on the number of workers."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pipeline.train.order import (
    Order,
    Piece,
    Position,
    stream_slots,
    streams_of,
    within_piece,
)


def _order(streams: int = 2, window: int = 2, buffer: int = 7, seed: int = 3) -> Order:
    pieces = tuple(Piece(f"{i:05d}", slots) for i, slots in enumerate([5, 9, 4, 12, 7, 3, 8]))
    return Order(pieces, streams=streams, seed=seed, window=window, buffer=buffer)


def test_each_epoch_draws_every_slot_once_across_the_streams() -> None:
    order = _order()
    for epoch in (0, 1):
        drawn = Counter()
        for stream in range(order.streams):
            n = order.epoch_slots(stream, epoch)
            slots = stream_slots(order, stream, Position(epoch, 0), n)
            drawn.update((s.piece, s.slot) for s in slots)
            assert slots[-1].after == Position(epoch, n)
        expected = {(p, k) for p, piece in enumerate(order.pieces) for k in range(piece.slots)}
        assert set(drawn) == expected and set(drawn.values()) == {1}


def test_epochs_are_shuffled_differently() -> None:
    order = _order(streams=1)
    n = order.epoch_slots(0, 0)
    first = [(s.piece, s.slot) for s in stream_slots(order, 0, Position(0, 0), n)]
    second = [(s.piece, s.slot) for s in stream_slots(order, 0, Position(1, 0), n)]
    assert sorted(first) == sorted(second) and first != second
    assert order.epoch_pieces(0, 0) != order.epoch_pieces(0, 1)
    # the same seed gives the same order; another seed another
    assert first == [(s.piece, s.slot) for s in stream_slots(_order(streams=1), 0, Position(), n)]
    other = [(s.piece, s.slot) for s in stream_slots(_order(streams=1, seed=4), 0, Position(), n)]
    assert other != first


@pytest.mark.parametrize("start", [0, 1, 6, 13, 29])
def test_a_resumed_stream_continues_exactly(start: int) -> None:
    order = _order()
    straight = stream_slots(order, 1, Position(), 80)  # over two epochs of stream 1
    resumed = stream_slots(order, 1, straight[start - 1].after if start else Position(), 80 - start)
    assert resumed == straight[start:]


def test_a_position_at_an_epochs_end_rolls_over() -> None:
    order = _order()
    n = order.epoch_slots(0, 0)
    assert order.normalize(0, Position(0, n)) == Position(1, 0)
    assert order.normalize(0, Position(0, n + 3)) == Position(1, 3)


def test_the_shuffle_buffer_holds_no_more_than_its_size() -> None:
    order = Order((Piece("a", 200), Piece("b", 150)), streams=1, seed=0, window=2, buffer=16)
    draws = order.group_order(0, 0, 0)
    assert sorted(map(tuple, draws.tolist())) == sorted(
        [(0, k) for k in range(200)] + [(1, k) for k in range(150)]
    )
    # each piece's slots enter in order, so slot k of a piece is at merged position >= k; an item
    # fed at merged position m cannot come out before m - 16
    for piece in (0, 1):
        where = np.flatnonzero(draws[:, 0] == piece)
        slots = draws[where, 1]
        assert (where >= slots - 16).all()
    # and the buffer mixes: the output is not the merged order
    assert (np.diff(draws[draws[:, 0] == 0][:, 1]) < 0).any()


def test_workers_serve_streams_so_the_step_does_not_depend_on_the_world() -> None:
    for world in (1, 2, 4):
        served = sorted(s for rank in range(world) for s in streams_of(rank, world, 4))
        assert served == [0, 1, 2, 3]
    assert streams_of(1, 3, 8) == [1, 4, 7]


def test_fewer_shards_than_streams_is_refused() -> None:
    with pytest.raises(ValueError, match="2 data shards cannot feed 3 data streams"):
        Order((Piece("a", 1), Piece("b", 1)), streams=3, seed=0)


def test_within_piece_permutations_are_seeded_by_epoch() -> None:
    a, b = within_piece(0, 0, 3, 50), within_piece(0, 1, 3, 50)
    assert sorted(a) == list(range(50)) and (a != b).any()
    assert (a == within_piece(0, 0, 3, 50)).all()
