"""Batch generation on Ray Data: a caption file → images and a parquet index on storage, in real
batches, resumable.

::

    caption file (one caption per line) ──driver: the rows not yet done, cut into batches of
        batch_size consecutive rows (first row, captions)──▶ Ray Dataset
        ──CascadeGenerator actor pool (one GPU each when the cluster has GPUs, else CPU):
          the whole cascade loaded once per actor; each batch generated in ONE cascade call
          (section 2: prior → decoder → upsamplers over its rows at once), its images written as
          <output>/images/<key>.png, then its index part <output>/index/part-<first>-<last>.parquet
        ──driver: counts the rows; once every row has its part, <output>/index.parquet

Layout of ``<output>/``:

* ``job.json``: the job's manifest, written before its first image: the captions (their sha256 and
  count; the file's URL for information), ``seed``, ``samples_per_caption``, the checkpoints and
  CLIP (``CascadePlan.describe``) and every setting that changes an image (conditioning, steps,
  guidance, samplers, candidates, temperature). What does not change an image (batch size,
  concurrency, device, threads) is not in it.
* ``images/<key>.png``: one image per row; the key is the row's index, zero-padded to 8 digits.
* ``index/part-<first key>-<last key>.parquet``: the index rows (key, caption, seed, path) of the
  consecutive rows first..last (inclusive), written atomically after all their images. A row is
  done exactly when a part covers it.
* ``index.parquet``: every row in key order, written last (from the parts) once every row is
  done. The parts stay: ``index/`` read as a dataset (``pyarrow.parquet.read_table``,
  ``ray.data.read_parquet``) is the same table, and it is what a rerun lists.

Resuming. A rerun lists ``index/`` once (the parts' names say which rows they hold: no part is
read) and generates only the rows no part covers, in batches of the rerun's ``batch_size``; a rerun
of a finished job generates nothing and does not start Ray. A batch interrupted before its part is
written is generated again whole, the same images (files are written atomically, so a rerun
replaces them whole). A rerun whose manifest differs (another caption file, seed,
samples_per_caption, checkpoint or sampling setting) is refused naming the config keys, since its
images would be mixed with the earlier job's; the earlier manifest is replaced only when none of
its rows is done yet. Several runs of the same job into one output at once are harmless (they
write the same files; overlapping parts are read once each row when the index is written), but
waste the work.

Every row draws its random numbers from its own generator, seeded by :func:`row_seed` of the job's
seed and the row's index (``unclip.generation``'s per-row generators), so an image depends only on
its caption, its row and the checkpoints, not on the batch size, the other rows of its batch, the
number of actors or which actor drew it, beyond the floating-point differences of batched kernels
(the tests hold them within 1e-4 of the [0, 1] pixel range on CPU). The same row through
``unclip sample`` (``seed=<row seed>``, one sample) gives the same image, within that tolerance.
The checkpoints are found and checked once on the driver (``plan_cascade``), before any Ray
resource is asked for, and every actor loads those same checkpoints.

Before the actor pool is asked for, it is checked against the cluster (``concurrency`` ×
``cpus_per_actor`` and × GPUs per actor, :mod:`pipeline.cluster.preflight`): a pool that cannot
start fails at once instead of waiting for ever. While it runs, a stall watchdog
(``stall_timeout_s``, :mod:`pipeline.cluster.watchdog`) fails the job when no generated rows
arrive for that long, e.g. when a lost node leaves the pool without room.

At scale (millions of rows): the driver holds the job's input (the captions, and the batches
still to do as Ray Data items), lists ``index/`` once when it starts and reads no part then, counts
the rows the pool reports without keeping them, and writes ``index.parquet`` by streaming the
parts (``READ_THREADS`` read at a time, in order, written in row groups of ``ROW_GROUP`` rows
through a local file), in memory bounded by a window of parts and a row group, not the row count.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pipeline.cascade_config import CascadeActors, GenerateConfig
from pipeline.cluster.preflight import ActorPool, check_cluster_fits
from pipeline.cluster.watchdog import iter_until_stalled
from pipeline.errors import UserFacingError
from pipeline.generate.cascade import CascadePlan, load_cascade, plan_cascade
from pipeline.storage import Storage, basename, join

log = logging.getLogger(__name__)

INDEX = "index.parquet"
PARTS = "index"
MANIFEST = "job.json"
FORMAT = 1  # of job.json and the index parts

MAX_BLOCKS = 4096  # Ray Data blocks of batches: enough to spread, few enough to schedule cheaply
READ_THREADS = 16  # parallel part reads when writing index.parquet
ROW_GROUP = 65536  # index.parquet rows per row group

_PART = re.compile(r"^part-(\d+)-(\d+)\.parquet$")

# What changes an image besides the captions, the seed and the checkpoints (job.json)
IMAGE_SETTINGS = (
    "conditioning",
    "prior_steps",
    "prior_guidance",
    "num_candidates",
    "temperature",
    "decoder_steps",
    "decoder_guidance",
    "decoder_sampler",
    "upsampler_steps",
    "upsampler_sampler",
)


def row_seed(seed: int, row: int) -> int:
    """The seed of row ``row`` of a job seeded ``seed``: a hash of both, in [0, 2^63)."""
    digest = hashlib.sha256(f"unclip-generate:{seed}:{row}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def row_key(row: int) -> str:
    """The key of row ``row``: its index, zero-padded to 8 digits (the image's file name)."""
    return f"{row:08d}"


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


def captions_digest(captions: Sequence[str]) -> str:
    """sha256 of the captions as :func:`read_captions` gives them (one per line): what the rows
    are made of, whatever blank lines or spaces around them the file has."""
    return hashlib.sha256("\n".join(captions).encode("utf-8")).hexdigest()


def job_rows(captions: list[str], samples_per_caption: int, seed: int) -> list[dict[str, Any]]:
    """One row per image: ``key`` (the row index, zero-padded), ``caption``, ``seed``."""
    rows = []
    for c, caption in enumerate(captions):
        for j in range(samples_per_caption):
            row = c * samples_per_caption + j
            rows.append({"key": row_key(row), "caption": caption, "seed": row_seed(seed, row)})
    return rows


# ----------------------------------------------------------------------------------------------
# The job's manifest: which job an output folder holds


def job_manifest(cfg: GenerateConfig, captions: Sequence[str], plan: CascadePlan) -> dict[str, Any]:
    """What ``job.json`` records: everything that decides the images (module docstring)."""
    return {
        "format": FORMAT,
        "captions": {
            "sha256": captions_digest(captions),
            "count": len(captions),
            "url": cfg.url(cfg.captions),
        },
        "seed": cfg.seed,
        "samples_per_caption": cfg.samples_per_caption,
        "rows": len(captions) * cfg.samples_per_caption,
        "checkpoints": plan.describe(),
        "settings": {name: getattr(cfg, name) for name in IMAGE_SETTINGS},
    }


def manifest_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between the job an output holds (``old``) and this one, as ``config key:
    there → here`` phrases; empty when they are the same job."""
    found = []
    if old.get("format") != new["format"]:
        found.append(f"job.json format {old.get('format')!r} there, {new['format']} here")
    if (old.get("captions") or {}).get("sha256") != new["captions"]["sha256"]:
        was = old.get("captions") or {}
        found.append(
            f"captions: other captions ({was.get('count')} from {was.get('url')} there, "
            f"{new['captions']['count']} from {new['captions']['url']} here)"
        )
    for key in ("seed", "samples_per_caption"):
        if old.get(key) != new[key]:
            found.append(f"{key}: {old.get(key)!r} there, {new[key]!r} here")
    was, now = old.get("checkpoints") or {}, new["checkpoints"]
    for role in ("prior", "decoder", "clip"):
        if was.get(role) != now[role]:
            found.append(f"{role}: {_shown(was.get(role))} there, {_shown(now[role])} here")
    if was.get("upsamplers") != now["upsamplers"]:
        found.append(
            f"upsamplers: {_shown(was.get('upsamplers'))} there, {_shown(now['upsamplers'])} here"
        )
    settings = old.get("settings") or {}
    for name in IMAGE_SETTINGS:
        if settings.get(name) != new["settings"][name]:
            found.append(f"{name}: {settings.get(name)!r} there, {new['settings'][name]!r} here")
    return found


def _shown(checkpoint: Any) -> str:
    """A checkpoint record (``StageCheckpoint.describe``) or a list of them, briefly."""
    if isinstance(checkpoint, list):
        return "[" + ", ".join(_shown(c) for c in checkpoint) + "]"
    if isinstance(checkpoint, dict):
        return f"{checkpoint.get('url')} (step {checkpoint.get('step')})"
    return repr(checkpoint)


def check_same_job(
    storage: Storage, output: str, manifest: dict[str, Any], parts: int
) -> dict[str, Any] | None:
    """The manifest ``output`` holds (None: none), after refusing to add this job's images to
    another job's: an output holding index parts (``parts`` of them) or an index, under another
    manifest or none, is refused, naming the config keys that differ."""
    url = join(output, MANIFEST)
    old = storage.read_json(url) if storage.exists(url) else None
    started = parts or storage.exists(join(output, INDEX))
    if old is None:
        if started:
            what = f"{parts} index parts" if parts else INDEX
            raise UserFacingError(
                f"generate: {output} holds {what} but no {MANIFEST} to say which job made them "
                "(an earlier unclip's output?): write elsewhere (config key: output)"
            )
        return None
    differences = manifest_differences(old, manifest)
    if differences and started:
        hint = ""
        if any(d.startswith(("prior:", "decoder:", "upsamplers:")) for d in differences):
            hint = (
                " (a run folder stands for its latest checkpoint: give the checkpoint folder "
                "the job started with to finish it)"
            )
        raise UserFacingError(
            f"generate: {output} holds another job's images ({parts} index parts, {url}), "
            "which these would be mixed with; it differs in "
            + "; ".join(differences)
            + ". Rerun with that job's settings to finish it"
            + hint
            + ", or write elsewhere (config key: output)"
        )
    return old


# ----------------------------------------------------------------------------------------------
# Index parts: which rows are done


def part_name(first: int, last: int) -> str:
    """The index part of rows ``first``..``last`` (inclusive)."""
    return f"part-{row_key(first)}-{row_key(last)}.parquet"


def done_ranges(storage: Storage, output: str) -> list[tuple[int, int]]:
    """The (first, last) rows of every index part under ``output``, sorted, from one listing (the
    names say it: no part is read)."""
    ranges = []
    for url in storage.list(join(output, PARTS)):
        match = _PART.match(basename(url))
        if match is not None:
            ranges.append((int(match.group(1)), int(match.group(2))))
    return sorted(ranges)


def check_ranges(ranges: Sequence[tuple[int, int]], rows: int, output: str) -> None:
    """Refuse an index part that is not rows of a job of ``rows`` rows."""
    for first, last in ranges:
        if last < first or last >= rows:
            raise UserFacingError(
                f"generate: the index part {join(output, PARTS, part_name(first, last))} holds "
                f"rows {first}..{last}, not rows of this job's {rows}: write elsewhere (config "
                "key: output)"
            )


def missing_runs(ranges: Sequence[tuple[int, int]], rows: int) -> list[tuple[int, int]]:
    """The runs [start, stop) of rows 0..rows-1 that no range (first, last inclusive, sorted)
    covers."""
    runs, start = [], 0
    for first, last in ranges:
        if first > start:
            runs.append((start, first))
        start = max(start, last + 1)
    if start < rows:
        runs.append((start, rows))
    return runs


def job_batches(
    captions: Sequence[str], samples_per_caption: int, runs: Sequence[tuple[int, int]], size: int
) -> list[dict[str, Any]]:
    """The batches of rows to generate: each run of missing rows cut into consecutive rows, at most
    ``size`` each, as ``{"first": first row, "captions": [one caption per row]}``."""
    batches = []
    for start, stop in runs:
        for first in range(start, stop, size):
            rows = range(first, min(first + size, stop))
            batches.append(
                {"first": first, "captions": [captions[r // samples_per_caption] for r in rows]}
            )
    return batches


def index_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.string()),
            ("caption", pa.string()),
            ("seed", pa.int64()),
            ("path", pa.string()),
        ]
    )


def _read_part(storage: Storage, url: str):
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.read_bytes(url))).cast(index_schema())


def write_index(storage: Storage, output: str, rows: int) -> str:
    """``<output>/index.parquet`` from the index parts (every row in key order, each once), which
    must cover all ``rows``; streamed: parts read ``READ_THREADS`` at a time, in order, written in
    row groups of ``ROW_GROUP`` rows to a local file, then uploaded atomically. Returns its URL."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    parts = join(output, PARTS)
    ranges = done_ranges(storage, output)
    check_ranges(ranges, rows, output)
    missing = missing_runs(ranges, rows)
    if missing:
        start, stop = missing[0]
        raise UserFacingError(
            f"generate: rows {row_key(start)}..{row_key(stop - 1)} have no index part under "
            f"{parts}: rerun the job to generate them"
        )
    urls = [join(parts, part_name(first, last)) for first, last in ranges]
    url = join(output, INDEX)
    written = 0
    with tempfile.TemporaryDirectory(prefix="unclip-index-") as tmp:
        local = os.path.join(tmp, INDEX)
        pending: list[Any] = []
        with (
            pq.ParquetWriter(local, index_schema()) as writer,
            ThreadPoolExecutor(READ_THREADS) as pool,
        ):
            for start in range(0, len(urls), 4 * READ_THREADS):
                window = urls[start : start + 4 * READ_THREADS]
                for table in pool.map(lambda u: _read_part(storage, u), window):
                    # overlapping parts (two runs at once): keep each row once, in key order
                    keep = pc.greater_equal(pc.cast(table.column("key"), pa.int64()), written)
                    table = table.filter(keep)
                    written += table.num_rows
                    pending.append(table)
                    if sum(t.num_rows for t in pending) >= ROW_GROUP:
                        writer.write_table(pa.concat_tables(pending))
                        pending = []
            if pending:
                writer.write_table(pa.concat_tables(pending))
        if written != rows:
            raise UserFacingError(
                f"generate: the index parts under {parts} hold {written} rows, not {rows}"
            )
        storage.upload_file(local, url)
    return url


# ----------------------------------------------------------------------------------------------
# The actors


class CascadeGenerator:
    """The generator actor: loads the cascade once, then generates each batch in one cascade call
    and writes its images, then its index part."""

    def __init__(
        self, plan: CascadePlan, storage: Storage, cfg: GenerateConfig, threads: int | None
    ) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.storage = storage
        self.cfg = cfg
        self.images = join(cfg.url(cfg.output), "images")
        self.parts = join(cfg.url(cfg.output), PARTS)
        self.cascade = load_cascade(plan, storage, cfg.device)
        self.writers = ThreadPoolExecutor(8)  # PNG encoding and uploads, beside the next batch

    def generate(self, first: int, captions: Sequence[str]) -> list[str]:
        """Rows ``first``.. of ``captions`` (one per row): their images and index part written;
        returns their keys."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from pipeline import pictures
        from pipeline.generate.sampling import generate_images

        rows = range(first, first + len(captions))
        keys = [row_key(r) for r in rows]
        seeds = [row_seed(self.cfg.seed, r) for r in rows]
        pixels = pictures.to_uint8(generate_images(self.cascade, self.cfg, captions, seeds))
        paths = [join(self.images, f"{key}.png") for key in keys]

        def write(i: int) -> None:
            self.storage.write_bytes(paths[i], pictures.png_bytes(pixels[i]))

        list(self.writers.map(write, range(len(keys))))  # raises the first write's error
        part = pa.table(
            {"key": keys, "caption": list(captions), "seed": seeds, "path": paths},
            schema=index_schema(),
        )
        sink = io.BytesIO()
        pq.write_table(part, sink)
        self.storage.write_bytes(join(self.parts, part_name(rows[0], rows[-1])), sink.getvalue())
        return keys

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys: list[str] = []
        for first, captions in zip(batch["first"], batch["captions"], strict=True):
            keys += self.generate(int(first), [str(c) for c in captions])
        return {"key": np.asarray(keys, dtype=object)}


def actor_gpus(cfg: CascadeActors) -> float:
    """GPUs per cascade actor: ``gpus_per_actor``, or 1 when the cluster has GPUs, else 0."""
    import ray

    if cfg.gpus_per_actor is not None:
        return cfg.gpus_per_actor
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def actor_pool(cfg: CascadeActors, gpus: float) -> ActorPool:
    """What the generator pool asks of the cluster, ``gpus`` per actor (:func:`actor_gpus`). No CPU
    is kept for reading: the batches are in memory (``from_items``), with no read tasks to feed
    the pool."""
    auto = cfg.gpus_per_actor is None
    shown = f"gpus_per_actor=null ({gpus:g} each on this cluster)" if auto else None
    return ActorPool(cfg.concurrency, cfg.cpus_per_actor, gpus, read_cpus=0, gpus_key=shown)


def gather(batches: Iterable[Any], total: int, images: str, timeout_s: float | None) -> int:
    """The number of rows the pool reports generated (one table row each); raises
    ``PipelineStalled`` when none arrives for ``timeout_s`` (None: wait forever), saying what
    is kept and what to do. Holds no rows: only their count."""
    done = 0

    def stalled(seconds: float) -> str:
        return (
            f"generate stalled: no generated images for {seconds:.0f} s (config key: "
            f"stall_timeout_s). {done} of the {total} images this run generates are written "
            f"under {images}, with their index parts; rerun the job: it generates only the rows "
            "that have none. After a lost node, the generator actors (concurrency × "
            "cpus_per_actor, gpus_per_actor) may not fit on the nodes left."
        )

    step = max(1, total // 10)
    for table in iter_until_stalled(batches, timeout_s, stalled):
        before, done = done, done + table.num_rows
        if done // step > before // step:
            log.info("generate: %d of %d images", done, total)
    return done


# ----------------------------------------------------------------------------------------------
# The job


def run_generate(cfg: GenerateConfig, storage: Storage | None = None) -> dict[str, Any]:
    """Generate every row of the caption file not yet done in ``output``; returns the run's
    summary (``generated``: the images this run made, ``images``: the job's)."""
    import ray

    from pipeline.cluster.connect import connect
    from pipeline.generate.sampling import prior_url

    started = time.time()
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
    total = len(captions) * cfg.samples_per_caption
    manifest = job_manifest(cfg, captions, plan)
    ranges = done_ranges(storage, output)  # one listing
    old = check_same_job(storage, output, manifest, len(ranges))
    check_ranges(ranges, total, output)
    missing = missing_runs(ranges, total)
    todo = sum(stop - start for start, stop in missing)
    summary = {
        "images": total,
        "generated": 0,
        "already_done": total - todo,
        "captions": len(captions),
        "output": output,
        "index": join(output, INDEX),
        "checkpoints": plan.describe(),
    }
    if not todo:
        if not storage.exists(join(output, INDEX)):
            write_index(storage, output, total)
        log.info("generate: all %d images of %s are done: nothing to generate", total, output)
        return {
            **summary,
            "seconds": round(time.time() - started, 1),
            "images_per_second": None,
            "steady_images_per_second": None,
        }

    connect(cfg.ray)
    gpus = actor_gpus(cfg)
    check_cluster_fits("generate", "generator actors", actor_pool(cfg, gpus))
    if old != manifest:  # a new job, or one that never finished a row (module docstring)
        storage.write_json(join(output, MANIFEST), manifest)
    log.info(
        "generate: %d of %d images of %d captions to generate (%d done before) with %d actor(s) "
        "(%g GPU each) into %s",
        todo,
        total,
        len(captions),
        total - todo,
        cfg.concurrency,
        gpus,
        output,
    )
    batches = job_batches(captions, cfg.samples_per_caption, missing, cfg.batch_size)
    began = time.time()
    generated = ray.data.from_items(
        batches, override_num_blocks=min(len(batches), MAX_BLOCKS)
    ).map_batches(
        CascadeGenerator,
        fn_constructor_kwargs={
            "plan": plan,
            "storage": storage,
            "cfg": cfg,
            "threads": cfg.threads_per_actor,
        },
        batch_size=1,  # one batch of rows (one cascade call) per call
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
        num_gpus=gpus,
        num_cpus=cfg.cpus_per_actor,
    )
    first: list[tuple[float, int]] = []  # when the first batch arrived, and its rows

    def timed(stream: Iterable[Any]) -> Iterable[Any]:
        for table in stream:
            if not first:
                first.append((time.time(), table.num_rows))
            yield table

    stream = generated.iter_batches(batch_size=None, batch_format="pyarrow")
    made = gather(timed(stream), todo, join(output, "images"), cfg.stall_timeout_s)
    ended = time.time()
    elapsed = ended - began
    if made != todo:
        raise UserFacingError(f"generate: {made} images written for {todo} rows")
    write_index(storage, output, total)
    return {
        **summary,
        "generated": made,
        "seconds": round(time.time() - started, 1),
        "images_per_second": round(made / elapsed, 2) if elapsed else None,
        # after the first batch: without the actors' start-up and the cascade's loading
        "steady_images_per_second": (
            round((made - first[0][1]) / (ended - first[0][0]), 2)
            if first and made > first[0][1] and ended > first[0][0]
            else None
        ),
    }


def summary_line(summary: dict[str, Any]) -> str:
    where = f"under {summary['output']}/images, index {summary['index']}"
    if not summary["generated"]:
        return (
            f"generate: {summary['images']} images of {summary['captions']} captions {where}: "
            "all were already there, nothing generated"
        )
    before = summary["already_done"]
    resumed = f", {before} already there" if before else ""
    return (
        f"generate: {summary['images']} images of {summary['captions']} captions {where} "
        f"({summary['generated']} generated{resumed}; {summary['seconds']} s, "
        f"{summary['images_per_second']} images/s)"
    )
