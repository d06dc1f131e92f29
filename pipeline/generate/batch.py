"""Batch generation on Ray Data: a caption file → images and a parquet index on storage.

::

    caption file (one caption per line) ──driver: rows (key, caption, seed)──▶ Ray Dataset
        ──CascadeGenerator actor pool (one GPU each when the cluster has GPUs, else CPU):
          the whole cascade loaded once per actor (section 2: prior → decoder → upsamplers),
          each row generated and written as <output>/images/<key>.png──▶ (key, caption, seed, path)
        ──driver: <output>/index.parquet, written last

Every row draws its random numbers from its own generator, seeded by :func:`row_seed` of the job's
seed and the row's index, and is generated on its own (text encoding included), so an image depends
only on its caption, its row and the checkpoints: not on the batch size, the number of actors or
which actor drew the row. The same row through ``unclip sample`` (``seed=<row seed>``, one sample)
gives the same image. The checkpoints are found and checked once on the driver (``plan_cascade``),
before any Ray resource is asked for, and every actor loads those same checkpoints. Files are
written atomically (``Storage.write_bytes``): a rerun replaces them whole, and the index appears
only once every image is there.

Before the actor pool is asked for, it is checked against the cluster (``concurrency`` ×
``cpus_per_actor`` and × GPUs per actor, :mod:`pipeline.cluster.preflight`): a pool that cannot
start fails at once instead of waiting for ever. While it runs, a stall watchdog
(``stall_timeout_s``, :mod:`pipeline.cluster.watchdog`) fails the job when no generated rows
arrive for that long, e.g. when a lost node leaves the pool without room.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from pipeline.cascade_config import GenerateConfig
from pipeline.cluster.preflight import ActorPool, check_cluster_fits
from pipeline.cluster.watchdog import iter_until_stalled
from pipeline.errors import UserFacingError
from pipeline.generate.cascade import CascadePlan, load_cascade, plan_cascade
from pipeline.storage import Storage, join

log = logging.getLogger(__name__)

INDEX = "index.parquet"


def row_seed(seed: int, row: int) -> int:
    """The seed of row ``row`` of a job seeded ``seed``: a hash of both, in [0, 2^63)."""
    digest = hashlib.sha256(f"unclip-generate:{seed}:{row}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def read_captions(storage: Storage, url: str) -> list[str]:
    """The non-empty lines of a caption file, stripped."""
    if not storage.exists(url):
        raise UserFacingError(
            f"no caption file at {url} (config key: captions): one caption per line"
        )
    text = storage.read_text(url)
    captions = [line.strip() for line in text.splitlines() if line.strip()]
    if not captions:
        raise UserFacingError(f"the caption file {url} has no captions")
    return captions


def job_rows(captions: list[str], samples_per_caption: int, seed: int) -> list[dict[str, Any]]:
    """One row per image: ``key`` (the row index, zero-padded), ``caption``, ``seed``."""
    rows = []
    for c, caption in enumerate(captions):
        for j in range(samples_per_caption):
            row = c * samples_per_caption + j
            rows.append({"key": f"{row:08d}", "caption": caption, "seed": row_seed(seed, row)})
    return rows


class CascadeGenerator:
    """The generator actor: loads the cascade once, then generates and writes rows one by one."""

    def __init__(
        self, plan: CascadePlan, storage: Storage, cfg: GenerateConfig, threads: int | None
    ) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.storage = storage
        self.cfg = cfg
        self.images = join(cfg.url(cfg.output), "images")
        self.cascade = load_cascade(plan, storage, cfg.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipeline import pictures
        from pipeline.generate.sampling import generate_images

        paths = []
        for key, caption, seed in zip(batch["key"], batch["caption"], batch["seed"], strict=True):
            image = generate_images(self.cascade, self.cfg, [str(caption)], int(seed))
            url = join(self.images, f"{key}.png")
            self.storage.write_bytes(url, pictures.png_bytes(pictures.to_uint8(image)[0]))
            paths.append(url)
        return {
            "key": batch["key"],
            "caption": batch["caption"],
            "seed": batch["seed"],
            "path": np.asarray(paths, dtype=object),
        }


def _gpus(cfg: GenerateConfig) -> float:
    import ray

    if cfg.gpus_per_actor is not None:
        return cfg.gpus_per_actor
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def actor_pool(cfg: GenerateConfig, gpus: float) -> ActorPool:
    """What the generator pool asks of the cluster, ``gpus`` per actor (:func:`_gpus`). No CPU
    is kept for reading: the rows are in memory (``from_items``), with no read tasks to feed
    the pool."""
    auto = cfg.gpus_per_actor is None
    shown = f"gpus_per_actor=null ({gpus:g} each on this cluster)" if auto else None
    return ActorPool(cfg.concurrency, cfg.cpus_per_actor, gpus, read_cpus=0, gpus_key=shown)


def gather(batches: Iterable[Any], total: int, images: str, timeout_s: float | None) -> list[Any]:
    """The generated rows' tables as the pool returns them; raises ``PipelineStalled`` when
    none arrives for ``timeout_s`` (None: wait forever), saying what is written and what to do."""
    tables: list[Any] = []
    done = 0

    def stalled(seconds: float) -> str:
        return (
            f"generate stalled: no generated images for {seconds:.0f} s (config key: "
            f"stall_timeout_s). At least {done} of {total} images are written under {images}; "
            "the index is written only once every image is there, so rerun the job (it "
            "generates every row again, the same images). After a lost node, the generator "
            "actors (concurrency × cpus_per_actor, gpus_per_actor) may not fit on the nodes left."
        )

    for table in iter_until_stalled(batches, timeout_s, stalled):
        tables.append(table)
        done += table.num_rows
    return tables


def run_generate(cfg: GenerateConfig, storage: Storage | None = None) -> dict[str, Any]:
    """Generate every row of the caption file; returns the run's summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from pipeline.cluster.connect import connect
    from pipeline.generate.sampling import prior_url

    storage = storage or Storage(cfg.storage)
    output = cfg.url(cfg.output)
    captions = read_captions(storage, cfg.url(cfg.captions))
    plan = plan_cascade(
        storage,
        cfg.root,
        decoder=cfg.decoder,
        prior=prior_url(cfg),
        upsamplers=cfg.upsamplers,
        clip=cfg.clip,
    ).with_samplers(cfg.decoder_sampler, cfg.upsampler_sampler)
    storage.check(output, write=True)
    rows = job_rows(captions, cfg.samples_per_caption, cfg.seed)
    connect(cfg.ray)
    gpus = _gpus(cfg)
    check_cluster_fits("generate", "generator actors", actor_pool(cfg, gpus))
    log.info(
        "generate: %d images of %d captions with %d actor(s) (%g GPU each) into %s",
        len(rows),
        len(captions),
        cfg.concurrency,
        gpus,
        output,
    )
    started = time.time()
    blocks = max(1, min(len(rows), math.ceil(len(rows) / cfg.batch_size)))
    generated = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
        CascadeGenerator,
        fn_constructor_kwargs={
            "plan": plan,
            "storage": storage,
            "cfg": cfg,
            "threads": cfg.threads_per_actor,
        },
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
        num_gpus=gpus,
        num_cpus=cfg.cpus_per_actor,
    )
    batches = generated.iter_batches(batch_size=None, batch_format="pyarrow")
    tables = gather(batches, len(rows), join(output, "images"), cfg.stall_timeout_s)
    index = pa.concat_tables(tables).select(["key", "caption", "seed", "path"])
    index = index.sort_by("key")
    if index.num_rows != len(rows):
        raise UserFacingError(f"generate: {index.num_rows} images written for {len(rows)} rows")
    index = index.cast(
        pa.schema(
            [
                ("key", pa.string()),
                ("caption", pa.string()),
                ("seed", pa.int64()),
                ("path", pa.string()),
            ]
        )
    )
    sink = io.BytesIO()
    pq.write_table(index, sink)
    storage.write_bytes(join(output, INDEX), sink.getvalue())
    elapsed = time.time() - started
    return {
        "images": index.num_rows,
        "captions": len(captions),
        "output": output,
        "index": join(output, INDEX),
        "checkpoints": plan.describe(),
        "seconds": round(elapsed, 1),
        "images_per_second": round(index.num_rows / elapsed, 2) if elapsed else None,
    }


def summary_line(summary: dict[str, Any]) -> str:
    return (
        f"generate: {summary['images']} images of {summary['captions']} captions under "
        f"{summary['output']}/images, index {summary['index']} ({summary['seconds']} s, "
        f"{summary['images_per_second']} images/s)"
    )
