"""A worker's share of every training step: the rows of the data streams it serves, cut into
micro-batches with the weights that make the gradient the global batch's mean.

Every step takes ``batch_size / streams`` rows from each data stream (:mod:`pipeline.train.order`),
in ``grad_accum`` micro-batches per stream. Worker ``rank`` of ``world`` serves the streams
``s ≡ rank (mod world)``; when ``world`` does not divide ``streams``, the workers with fewer streams
run padding micro-batches of weight 0, so every worker runs the same number of forward and backward
passes (DDP and FSDP need that). A micro-batch of ``n`` rows gets the loss weight ``n · world /
batch_size``: DDP averages gradients over the workers, so the step's gradient is the mean over the
global batch, whatever the number of workers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pipeline.train.order import Order, Position, positions_from, streams_of
from pipeline.train.sources import Source, stack
from pipeline.train.streams import StreamReader


@dataclass
class MicroBatch:
    stream: int  # the data stream it came from; padding: streams + its index
    micro: int  # its index among the stream's micro-batches of the step
    columns: dict[str, Any]  # stacked rows (arrays; strings as lists)
    weight: float  # the loss weight (0 for padding)


def data_streams(cfg: Any) -> int:
    """The run's number of data streams: ``train.data_streams``, or the (most) workers."""
    return cfg.train.data_streams or cfg.scaling.max_workers


class Feed:
    """Micro-batches of a worker's streams, step after step (see the module)."""

    def __init__(
        self,
        source: Source,
        cfg: Any,
        rank: int,
        world: int,
        saved_positions: dict[str, list[int]] | None,
        *,
        decode_threads: int = 2,
    ) -> None:
        self.streams = data_streams(cfg)
        self.order = Order(
            tuple(source.pieces),
            streams=self.streams,
            seed=cfg.train.seed,
            window=cfg.train.shuffle_shards,
            buffer=cfg.train.shuffle_buffer,
        )
        self.world, self.batch_size = world, cfg.train.batch_size
        self.accum = cfg.optim.grad_accum
        self.rows = cfg.train.batch_size // (self.streams * self.accum)
        self.mine = streams_of(rank, world, self.streams)
        self.slots = math.ceil(self.streams / world)  # streams per worker, padded
        positions = positions_from(saved_positions, self.streams)
        self._pool = ThreadPoolExecutor(max(1, decode_threads), thread_name_prefix="decode")
        self.readers = {
            s: StreamReader(source, self.order, s, positions[s], self._pool) for s in self.mine
        }

    def step(self) -> Iterator[MicroBatch]:
        """This worker's micro-batches of the next step, padding last."""
        first: dict[str, Any] | None = None
        for s in self.mine:
            for micro in range(self.accum):
                columns = stack(self.readers[s].take(self.rows))
                first = first or columns
                yield MicroBatch(s, micro, columns, self.rows * self.world / self.batch_size)
        for pad in range((self.slots - len(self.mine)) * self.accum):
            yield MicroBatch(self.streams + pad, 0, first, 0.0)

    def micro_batches(self) -> int:
        return self.slots * self.accum

    def positions(self) -> dict[str, list[int]]:
        """Every stream's position, gathered from all workers (a collective: call on every rank)."""
        mine = {str(s): [r.position.epoch, r.position.drawn] for s, r in self.readers.items()}
        import torch.distributed as dist

        if self.world == 1 or not (dist.is_available() and dist.is_initialized()):
            return mine
        gathered: list[dict[str, list[int]] | None] = [None] * self.world
        dist.all_gather_object(gathered, mine)
        return {k: v for part in gathered for k, v in (part or {}).items()}

    def epochs(self) -> float:
        """Epochs drawn so far, averaged over this worker's streams."""
        done = [
            r.position.epoch
            + r.position.drawn / max(1, self.order.epoch_slots(s, r.position.epoch))
            for s, r in self.readers.items()
        ]
        return sum(done) / max(1, len(done))

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()
        self._pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["Feed", "MicroBatch", "Position", "data_streams"]
