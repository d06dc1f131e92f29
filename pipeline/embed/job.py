"""The embedding job: open_clip image and text embeddings of webdataset shards, on Ray.

The driver coordinates; the rows never pass through it::

    driver: plan the source shards the store lacks, start the encoder actors and
            readers_per_encoder reader actors per encoder, hand each idle reader a shard
    reader (CPU, :mod:`pipeline.embed.shard_task`), per shard: stream the tar, decode,
            resize+crop, tokenize ──batches──▶ its encoder actor (GPU when present,
            :mod:`pipeline.embed.encoder`) ──unit embeddings──▶ the reader writes the shard's
            store file and returns its counts
    driver: the shard's completion record (rows, skipped by reason with keys, the source tar's
            size and version), then, once all are back, the manifest

So the driver's memory and traffic grow with the number of shards (a few numbers each), not with
the rows; the store files are written on the nodes that hold the rows. A shard is in the store
exactly when its record exists: its file is written first, the record only after the reader came
back whole (:mod:`pipeline.embed.store`).

Faults: storage errors are retried (:mod:`pipeline.retries`); a shard that still cannot be read
or written gets no record, the other shards go on, and the run ends with an error naming it, so a
rerun does exactly the missing shards. A reader or encoder whose node is lost is restarted by Ray
and its call retried (a shard written again replaces the same file). When nothing is encoded for
``stall_timeout_s`` (a lost node not replaced, encoders that cannot start), the run fails saying
what is kept. A rerun skips the source shards the store already has and never writes a key twice;
it encodes again a source tar whose size or ETag changed since. A store made by another CLIP, or
from other source shards, is refused (``EmbeddingStore.open_for_writing``). Before any actor starts,
the pool is checked against the cluster (:mod:`pipeline.cluster.preflight`); a CLIP checkpoint on
object storage reaches the actors as a reference pinned by its sha256, which each node fetches into
its own cache.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections import deque
from typing import Any

from pipeline.cluster.preflight import ActorPool, check_cluster_fits
from pipeline.cluster.watchdog import PipelineStalled
from pipeline.data.shard_set import list_shards
from pipeline.embed import clip_model
from pipeline.embed.encoder import STATUS_GROUP, ClipEncoder, describe_clip
from pipeline.embed.shard_task import ShardReader, ShardSpec
from pipeline.embed.store import EmbeddingStore, changed_sources
from pipeline.errors import UserFacingError
from pipeline.progress import Progress
from pipeline.stage_config import EmbedConfig
from pipeline.storage import Storage, StorageError, join

log = logging.getLogger(__name__)


def store_header(ident: clip_model.ClipIdentity, embed_dim: int, context: int, model: str) -> dict:
    return {
        "clip": ident.to_json(),
        "embed_dim": embed_dim,
        "dtype": "float16",
        "normalization": "l2",
        "tokenizer": {"kind": "open_clip", "model": model, "context_length": context},
    }


def run_embedding(cfg: EmbedConfig, storage: Storage | None = None) -> dict[str, Any]:
    """Encode every source shard the store lacks; returns the run's summary.

    Raises :class:`UserFacingError` naming the shards that failed (storage errors that outlasted
    the retries) after every other shard is in the store: a rerun encodes just those.
    """
    import ray

    storage = storage or Storage(cfg.storage)
    source_url = cfg.url(cfg.shards)
    shards = list_shards(storage, source_url)  # one listing: names, sizes and ETags
    check_cluster_fits(
        "embed",
        "encoder actors",
        ActorPool(cfg.concurrency, cfg.cpus_per_actor, cfg.gpus_per_actor, read_cpus=1),
    )
    checkpoint = clip_model.resolve_checkpoint(cfg.clip, storage, cfg.root)
    ident = clip_model.identity(cfg.clip, checkpoint)
    transform, mean, std, _, context, embed_dim = describe_clip(cfg.clip, checkpoint)
    store = EmbeddingStore(
        storage, join(cfg.url(cfg.store), cfg.clip_id or clip_model.safe_id(ident.id))
    )
    header = store_header(ident, embed_dim, context, cfg.clip.model)
    header["clip_source"] = clip_model.located(cfg.clip, storage, cfg.root)
    store.open_for_writing({**header, "source": source_url})

    done = store.completed()
    changed = [n for n in changed_sources(done, shards.versions) if n in shards.tars]
    if changed:
        log.warning(
            "embed: %d source shards changed since they were encoded (%s); encoding them again",
            len(changed),
            ", ".join(changed[:10]),
        )
    redo = set(changed)
    todo = [(n, url) for n, url in shards.tars.items() if n not in done or n in redo]
    log.info(
        "embed: %d of %d source shards to encode with %s into %s",
        len(todo),
        len(shards),
        ident.id,
        store.url,
    )
    started = time.time()
    run = ShardRun(store, shards.versions, len(todo), len(shards))
    if todo:
        spec = ShardSpec(
            storage, store.url, cfg.clip, transform, embed_dim, context, cfg.batch_size
        )
        encoders = start_encoders(cfg, checkpoint, storage, mean, std)
        try:
            run.drive(
                todo,
                spec,
                encoders,
                cfg.readers_per_encoder,
                cfg.cpus_per_actor,
                cfg.stall_timeout_s,
            )
        except Exception:
            # index what was recorded before the failure, so readers need not list the records
            # (pipeline/embed/writers.py); if storage is what failed, the marker stays and
            # they do
            with contextlib.suppress(Exception):
                store.finalize_manifest()
            raise
        finally:
            for encoder in encoders.values():
                ray.kill(encoder)
    elapsed = time.time() - started
    manifest = store.finalize_manifest()
    if run.failed:
        failed = sorted(run.failed.items())
        raise UserFacingError(
            f"embed: {len(failed)} of {len(todo)} source shards failed and were not recorded "
            f"(the other {len(todo) - len(failed)} are in {store.url}); rerun `unclip embed` to "
            "encode them: "
            + "; ".join(f"{name}: {reason}" for name, reason in failed[:20])
            + (f"; and {len(failed) - 20} more" if len(failed) > 20 else "")
        )
    return {
        "store": store.url,
        "clip": ident.id,
        "shards": len(manifest["shards"]),
        "shards_encoded_now": len(todo),
        "rows": manifest["rows"],
        "rows_encoded_now": run.rows_written,
        "skipped": manifest["skipped"],
        "skipped_now": run.skipped,
        "seconds": round(elapsed, 2),
        "samples_per_second": round(run.rows_written / elapsed, 1)
        if run.rows_written and elapsed
        else None,
    }


def start_encoders(
    cfg: EmbedConfig,
    checkpoint: clip_model.Checkpoint | None,
    storage: Storage,
    mean: tuple,
    std: tuple,
) -> dict[str, Any]:
    """``cfg.concurrency`` encoder actors by name (unique to this run: the readers find them by
    it), each restarted (and its calls retried) when its node is lost."""
    import ray

    actor = ray.remote(concurrency_groups={STATUS_GROUP: 1})(ClipEncoder)
    run = uuid.uuid4().hex[:12]
    args = (cfg.clip, checkpoint, storage, cfg.precision, cfg.threads_per_actor, mean, std)
    return {
        name: actor.options(
            name=name,
            num_cpus=cfg.cpus_per_actor,
            num_gpus=cfg.gpus_per_actor,
            max_restarts=-1,
            max_task_retries=-1,
        ).remote(*args)
        for name in (f"unclip-embed-encoder-{run}-{i}" for i in range(cfg.concurrency))
    }


def readers_count(per_encoder: int, encoders: int, cpus_per_encoder: float) -> int:
    """How many readers to start: ``per_encoder`` for each encoder, but no more than the CPUs
    the encoders leave (at least one: the preflight keeps a CPU for reading). A reader that can
    never be placed would hold the shard it was handed for ever."""
    import ray

    spare = ray.cluster_resources().get("CPU", 0) - encoders * cpus_per_encoder
    return max(1, min(per_encoder * encoders, int(spare + 1e-6)))


class ShardRun:
    """The driver's side of a run: shard tasks handed out and taken back, completion records
    written, progress shown, stalls detected. Holds a few numbers per shard, never rows."""

    POLL_S = 1.0  # how often the driver looks at the encoders' counts when nothing finishes

    def __init__(
        self,
        store: EmbeddingStore,
        versions: dict[str, dict[str, Any]],
        todo: int,
        shards: int,
    ) -> None:
        self.store = store
        self.shards = shards
        self.versions = versions
        self.failed: dict[str, str] = {}
        self.rows_written = 0
        self.skipped = 0
        self.done = 0
        self.progress = Progress("embed", todo, "shards")

    def drive(
        self,
        tars: list[tuple[str, str]],
        spec: ShardSpec,
        encoders: dict[str, Any],
        readers_per_encoder: int,
        cpus_per_encoder: float,
        stall_timeout_s: float | None,
    ) -> None:
        """Encode every (name, tar) with ``readers_per_encoder`` reader actors per encoder (``encoders``:
        actor name → handle), a shard at a time each, and record each shard as it comes back. Raises :class:`PipelineStalled` when no row is encoded and no
        shard finishes for ``stall_timeout_s``."""
        import ray

        reader = ray.remote(ShardReader).options(num_cpus=1, max_restarts=-1, max_task_retries=-1)
        # The spec by value (a few kB, inlined in the call) and the encoder by name: an actor
        # handle or a ray.put object among a restartable actor's arguments lives in the object
        # store, and Ray core warns on every run that a restarted reader might not find it.
        names = list(encoders)
        idle = [
            reader.remote(spec, names[r % len(names)])
            for r in range(readers_count(readers_per_encoder, len(names), cpus_per_encoder))
        ]
        readers = list(idle)
        queue = deque(tars)
        running: dict[Any, tuple[tuple[str, str], Any]] = {}
        counts = Counts(list(encoders.values()))
        last_progress = time.time()
        poll = min(self.POLL_S, stall_timeout_s or self.POLL_S)
        try:
            while queue or running:
                while queue and idle:
                    shard, free = queue.popleft(), idle.pop()
                    running[free.encode.remote(*shard)] = (shard, free)
                ready, _ = ray.wait(list(running), num_returns=1, timeout=poll)
                for ref in ready:
                    shard, free = running.pop(ref)
                    idle.append(free)
                    self.finish(*shard, ref)
                    last_progress = time.time()
                if counts.moved():
                    last_progress = time.time()
                self.progress.update(self.done, f"{self.rows_written} rows")
                stalled_for = time.time() - last_progress
                if stall_timeout_s is not None and stalled_for > stall_timeout_s:
                    raise PipelineStalled(self.stalled(stalled_for))
        finally:
            counts.settle()
            for actor in readers:
                ray.kill(actor)

    def stalled(self, seconds: float) -> str:
        return (
            f"embedding stalled: no encoded rows for {seconds:.0f} s (config key: "
            f"stall_timeout_s). {len(self.store.completed())} of {self.shards} shards "
            f"are complete and kept in {self.store.url}; rerun the job to encode the rest. After "
            "a lost node, the encoder actors (concurrency × cpus_per_actor, gpus_per_actor) may "
            "not fit on the nodes left, or leave no CPU for the readers."
        )

    def finish(self, name: str, tar: str, ref: Any) -> None:
        """Take a reader's result: write the shard's completion record, or note why it failed."""
        import ray

        self.done += 1
        try:
            result = ray.get(ref)
        except Exception as exc:  # the reader raised (the encoder failed), or Ray gave up on it
            log.error("embed: shard %s failed: %s", name, exc)
            self.failed[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
            return
        if "failed" in result:
            self.failed[name] = result["failed"]
            return
        version = self.versions.get(name, {})
        record = {
            "source": tar,
            "source_size": version.get("size"),
            "source_version": version.get("version"),
            "skipped": result["skipped"],
            "skipped_keys": result["skipped_keys"],
            "rows": result["rows"],
            "written_at": time.time(),
        }
        try:
            self.store.write_record(name, record)
        except StorageError as exc:
            log.error("embed: the record of shard %s could not be written: %s", name, exc)
            self.failed[name] = f"writing its record failed: {exc}"
            return
        skipped = sum(result["skipped"].values())
        log.debug("embed: shard %s: %d rows, %d skipped", name, result["rows"], skipped)
        self.rows_written += result["rows"]
        self.skipped += skipped


SETTLE_S = 2.0  # how long the end of a run waits for the encoders' last status answers


class Counts:
    """The rows the encoders have encoded, asked of them on their status group without waiting:
    each question is sent once and its answer taken when it has come (a dead or restarting
    encoder does not answer, and holds nothing up)."""

    def __init__(self, encoders: list[Any]) -> None:
        self.encoders = encoders
        self.last: list[int] = [0] * len(encoders)
        self.asked: dict[Any, int] = {}

    def moved(self) -> bool:
        """Whether an answer that came since the last call shows rows encoded since the one
        before it."""
        import ray

        asked_of = set(self.asked.values())
        for i, encoder in enumerate(self.encoders):
            if i not in asked_of:
                self.asked[encoder.encoded.options(concurrency_group=STATUS_GROUP).remote()] = i
        ready, _ = ray.wait(list(self.asked), num_returns=len(self.asked), timeout=0)
        moved = False
        for ref in ready:
            i = self.asked.pop(ref)
            try:
                rows = ray.get(ref)
            except Exception:  # the actor died or is restarting: ask again next time
                continue
            moved = moved or rows != self.last[i]
            self.last[i] = rows
        return moved

    def settle(self, timeout_s: float = SETTLE_S) -> None:
        """Wait (at most ``timeout_s``) for the questions still out: an encoder killed while it
        answers one makes Ray print that the call failed and will be retried."""
        import ray

        if self.asked:
            ray.wait(list(self.asked), num_returns=len(self.asked), timeout=timeout_s)
        self.asked.clear()


def embed_summary_line(summary: dict[str, Any]) -> str:
    rate = summary["samples_per_second"]
    return (
        f"embed: {summary['rows_encoded_now']} samples encoded now "
        f"({summary['shards_encoded_now']} shards, {summary['skipped_now']} skipped"
        + (f", {rate} samples/s" if rate else "")
        + f"); the store has {summary['rows']} rows in {summary['shards']} shards "
        f"({summary['skipped']} skipped) at {summary['store']}"
    )
