"""The captioned-shapes dataset as webdataset shards, generated in parallel on Ray.

Each shard is a Ray Data task, counted in the stage's progress line (:mod:`pipeline.progress`) as
its row comes back to the driver, each image a deterministic function
of the seed and its index (``pipeline.data.shapes``), so the same config gives the same bytes whatever the
parallelism. A rerun skips complete shards; a rerun with a different config is refused rather than
mixed into the same folder.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from typing import Any

import numpy as np
from PIL import Image

from pipeline.data.shapes import render, sample_scene
from pipeline.data.shards import ShardWriter, completed_shards, sample_key
from pipeline.errors import UserFacingError
from pipeline.progress import Progress
from pipeline.stage_config import SynthConfig
from pipeline.storage import Storage, join

log = logging.getLogger(__name__)

# The fields that decide the dataset's content; the summary records them to refuse mixing.
_CONTENT_FIELDS = (
    "num_samples",
    "samples_per_shard",
    "image_size",
    "seed",
    "split",
    "holdout",
    "max_objects",
    "positions",
    "sizes",
    "two_tone_prob",
    "jpeg_quality",
)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def num_shards(cfg: SynthConfig) -> int:
    return -(-cfg.num_samples // cfg.samples_per_shard)


def write_shard(storage: Storage, folder: str, shard_id: int, cfg: SynthConfig) -> dict[str, Any]:
    """Render and publish one shard; returns its stats."""
    holdout = cfg.holdout_pairs()
    exclude = holdout if cfg.split == "train" else frozenset()
    require = holdout if cfg.split == "heldout" else frozenset()
    writer = ShardWriter(storage, folder, shard_id)
    try:
        first = shard_id * cfg.samples_per_shard
        for offset in range(min(cfg.samples_per_shard, cfg.num_samples - first)):
            scene = sample_scene(
                cfg.seed,
                first + offset,
                max_objects=cfg.max_objects,
                two_tone_prob=cfg.two_tone_prob,
                exclude_pairs=exclude,
                require_pairs=require,
                positions=cfg.positions,
                sizes=cfg.sizes,
            )
            jpeg = encode_jpeg(render(scene, cfg.image_size), cfg.jpeg_quality)
            size = cfg.image_size
            meta = {
                "width": size,
                "height": size,
                "original_width": size,
                "original_height": size,
                "sha256": hashlib.sha256(jpeg).hexdigest(),
                "scene": scene.to_json(),
            }
            writer.write(
                sample_key(shard_id, offset, cfg.samples_per_shard), jpeg, scene.caption, meta
            )
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def _content(cfg: SynthConfig) -> dict[str, Any]:
    return {name: getattr(cfg, name) for name in _CONTENT_FIELDS}


def scene_options(storage: Storage, shards_url: str) -> dict[str, Any]:
    """The :func:`pipeline.data.shapes.sample_scene` options a synthetic dataset at ``shards_url`` was
    drawn with (objects per image, backgrounds, positions, sizes), read from its summary; empty when
    the folder holds no synthetic dataset. Evaluation draws its held-out prompts with these, so they
    speak the training captions' language."""
    summary_url = join(shards_url, "_summary", "synth.json")
    if not storage.exists(summary_url):
        return {}
    config = storage.read_json(summary_url).get("config", {})
    names = ("max_objects", "two_tone_prob", "positions", "sizes")
    return {name: config[name] for name in names if config.get(name) is not None}


def generate(cfg: SynthConfig, storage: Storage | None = None) -> dict[str, Any]:
    """Write every missing shard of the dataset; returns a summary (also saved beside the shards)."""
    import ray

    storage = storage or Storage(cfg.storage)
    folder = cfg.url(cfg.output)
    summary_url = join(folder, "_summary", "synth.json")
    if storage.exists(summary_url):
        previous = storage.read_json(summary_url).get("config", {})
        # field by field: a summary written before a field existed holds its default (None)
        changed = sorted(k for k in _CONTENT_FIELDS if previous.get(k) != getattr(cfg, k))
        if changed:
            raise UserFacingError(
                f"{folder} holds a synthetic dataset made with other settings "
                f"({', '.join(f'{k}: {previous.get(k)!r} now {getattr(cfg, k)!r}' for k in changed)});"
                " use another output folder or remove it"
            )
    else:
        storage.write_json(summary_url, {"config": _content(cfg), "complete": False})

    started = time.time()
    done = set(completed_shards(storage, folder))
    todo = [i for i in range(num_shards(cfg)) if i not in done]
    log.info(
        "synth: %d shards of %d images at %d px into %s (%d already complete)",
        len(todo),
        cfg.samples_per_shard,
        cfg.image_size,
        folder,
        len(done),
    )
    if todo:

        def make(row: dict[str, Any]) -> dict[str, Any]:
            stats = write_shard(storage, folder, int(row["id"]), cfg)
            return {"id": row["id"], "count": stats["count"]}

        shards = ray.data.from_items([{"id": i} for i in todo], override_num_blocks=len(todo))
        progress = Progress("synth", len(todo), "shards")
        progress.update(0)
        images = 0
        try:
            for done, row in enumerate(shards.map(make, num_cpus=1).iter_rows(), 1):
                images += int(row["count"])
                progress.update(done, f"{images} images")
        finally:
            progress.close()
    elapsed = time.time() - started
    made = sum(
        min(cfg.samples_per_shard, cfg.num_samples - i * cfg.samples_per_shard) for i in todo
    )
    summary = {
        "config": _content(cfg),
        "complete": True,
        "shards": num_shards(cfg),
        "samples": cfg.num_samples,
        "written_now": made,
        "seconds": round(elapsed, 2),
        "images_per_second": round(made / elapsed, 1) if made and elapsed > 0 else None,
    }
    storage.write_json(summary_url, summary)
    return {**summary, "output": folder}
