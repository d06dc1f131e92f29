"""The data each training step sees (``pipeline.train.feed``), compared by sample key over an
in-memory source: epochs are shuffled differently, a resumed run's batches are an uninterrupted
run's, on the same or another number of workers, and uneven worker counts run padded steps whose
weights still make the gradient the global batch's mean."""

from __future__ import annotations

from collections import Counter

from helpers import Memory

from pipeline.stage_config import OptimOptions, PriorConfig, ScalingOptions, TrainOptions
from pipeline.storage import StorageOptions
from pipeline.train.feed import Feed
from pipeline.train.order import Piece

SIZES = [12, 9, 16, 11, 14, 10, 13, 15]


def _source() -> Memory:
    return Memory(tuple(Piece(str(i), n) for i, n in enumerate(SIZES)), StorageOptions())


def _cfg(workers: int = 2, streams: int | None = None, accum: int = 1, batch: int = 8):
    return PriorConfig(
        train=TrainOptions(batch_size=batch, seed=7, data_streams=streams, shuffle_buffer=6),
        optim=OptimOptions(grad_accum=accum),
        scaling=ScalingOptions(num_workers=workers),
    )


def _steps(cfg, world: int, steps: int, positions=None) -> tuple[list[list[str]], dict]:
    """The keys of each step's global batch (every worker's real micro-batches), and the streams'
    positions after the last step."""
    feeds = [Feed(_source(), cfg, rank, world, positions) for rank in range(world)]
    batches = []
    for _ in range(steps):
        keys: list[str] = []
        for feed in feeds:
            keys += [k for part in feed.step() if part.weight for k in part.columns["key"]]
        batches.append(sorted(keys))
    after: dict = {}
    for feed in feeds:
        after.update(
            {str(s): [r.position.epoch, r.position.drawn] for s, r in feed.readers.items()}
        )
        feed.close()
    return batches, after


def test_shuffled_epochs_present_the_data_in_different_orders() -> None:
    cfg = _cfg(workers=1, batch=4)
    total = sum(SIZES)
    batches, _ = _steps(cfg, 1, 2 * total // 4)
    first = [k for b in batches[: total // 4] for k in b]
    second = [k for b in batches[total // 4 :] for k in b]
    assert Counter(first) == Counter(second) and len(set(first)) == total  # each key once a epoch
    assert first != second


def test_a_resumed_run_draws_the_uninterrupted_runs_batches() -> None:
    cfg = _cfg()
    straight, _ = _steps(cfg, 2, 30)
    head, positions = _steps(cfg, 2, 11)
    tail, _ = _steps(cfg, 2, 19, positions)
    assert head + tail == straight


def test_a_run_resumed_on_fewer_or_more_workers_draws_the_same_batches() -> None:
    straight, _ = _steps(_cfg(workers=4, streams=4), 4, 24)
    head, positions = _steps(_cfg(workers=4, streams=4), 4, 9)
    shrunk, positions = _steps(_cfg(workers=2, streams=4, accum=2), 2, 7, positions)
    grown, _ = _steps(_cfg(workers=4, streams=4), 4, 8, positions)
    assert head + shrunk + grown == straight


def test_uneven_workers_pad_with_weightless_micro_batches() -> None:
    cfg = _cfg(workers=3, streams=4, batch=8)
    feeds = [Feed(_source(), cfg, rank, 3, None) for rank in range(3)]
    parts = [list(feed.step()) for feed in feeds]
    assert [len(p) for p in parts] == [2, 2, 2]  # the same passes on every worker
    assert [sum(x.weight > 0 for x in p) for p in parts] == [2, 1, 1]
    # the weights sum to the world size (DDP divides by it): the gradient is the batch's mean
    assert sum(x.weight * len(x.columns["key"]) for p in parts for x in p if x.weight) == 3 * 2
    assert sum(x.weight for p in parts for x in p) == 3
    for feed in feeds:
        feed.close()
