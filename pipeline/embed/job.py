"""The embedding job: open_clip image and text embeddings of webdataset shards, on Ray Data.

The pipeline streams, so memory does not grow with the dataset::

    source shards ──read tasks (CPU): stream each tar, decode, resize+crop, tokenize──▶ rows
        ──ClipEncoder actor pool (GPU when present): normalise, encode, L2-normalise──▶ embeddings
        ──driver: gather each source shard's rows, write its store file and completion record

Each read task handles one source shard and ends it with a marker row carrying the shard's counts
(good rows, skipped samples by reason, with their keys), so the driver knows when a shard is whole
whatever order the actor pool returns batches in. Bad samples (undecodable image, missing or empty
caption, a member cut off by a truncated tar, a file that is not a tar, NaN/inf/zero embeddings)
are logged with their key, counted, and skipped (:mod:`pipeline.data.reader`).

Storage faults are retried (:mod:`pipeline.retries`); a shard that still cannot be read or written
gets no completion record, the other shards go on, and the run ends with an error naming it, so a
rerun does exactly the missing shards. A rerun skips the source shards the store already has and
never writes a key twice; it encodes again a source tar whose size or ETag changed since. A store
made by another CLIP, or from other source shards, is refused (``EmbeddingStore.open_for_writing``).
Before any actor starts, the pool is checked against the cluster (:mod:`pipeline.cluster.preflight`);
a CLIP checkpoint on object storage reaches the actors as a reference pinned by its sha256, which
each node fetches into its own cache.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.cluster.preflight import ActorPool, check_cluster_fits
from pipeline.cluster.watchdog import iter_until_stalled
from pipeline.data.reader import Skips, read_samples
from pipeline.data.shards import completed_shards, shard_urls
from pipeline.embed import clip_model
from pipeline.embed.store import EmbeddingStore, changed_sources, source_name, to_table
from pipeline.errors import UserFacingError
from pipeline.stage_config import ClipSource, EmbedConfig
from pipeline.storage import Storage, StorageError, join

log = logging.getLogger(__name__)


@dataclass
class ReadSpec:
    """What a read task needs to turn a source shard into model inputs (picklable)."""

    storage: Storage
    clip: ClipSource
    image_transform: Any
    image_size: int
    context_length: int


def _end_row(spec: ReadSpec, name: str, report: dict[str, Any]) -> dict[str, Any]:
    return {
        "shard": name,
        "key": "",
        "caption": "",
        "image": np.zeros((spec.image_size, spec.image_size, 3), np.uint8),
        "tokens": np.zeros(spec.context_length, np.int32),
        "end": True,
        "report": json.dumps(report),
    }


def read_shard(spec: ReadSpec, tar_url: str) -> Iterator[dict[str, Any]]:
    """Rows of model inputs for one source tar, then its end marker with the counts.

    Bad samples are skipped and counted (:mod:`pipeline.data.reader`). A tar that cannot be read
    after the storage retries ends with a marker that says so (``failed``): the driver then drops
    the rows it got, writes no completion record, and goes on with the other shards.
    """
    from PIL import Image

    name = source_name(tar_url)
    tokenizer = clip_model.tokenizer(spec.clip)
    skips = Skips()
    good = 0
    try:
        for sample in read_samples(spec.storage, tar_url, skips):
            try:
                image = Image.open(io.BytesIO(sample.image))
                image.load()
                pixels = clip_model.prepare_image(spec.image_transform, image)
            except Exception:
                skips.add(sample.key, "undecodable image", tar_url)
                continue
            tokens = tokenizer([sample.caption])[0].numpy().astype(np.int32)
            good += 1
            yield {
                "shard": name,
                "key": sample.key,
                "caption": sample.caption,
                "image": pixels,
                "tokens": tokens,
                "end": False,
                "report": "",
            }
    except StorageError as exc:
        log.error("embed: shard %s failed: %s", name, exc)
        yield _end_row(spec, name, {"failed": str(exc)})
        return
    yield _end_row(spec, name, {"good": good, **skips.to_json()})


def embedding_problems(image_emb: np.ndarray, text_emb: np.ndarray) -> list[str]:
    """Per row, why its embeddings are unusable ("" when they are fine): a NaN or inf anywhere
    (an fp16 overflow, a broken checkpoint), or a zero vector, which has no direction to
    normalise (the store holds unit vectors)."""
    out = []
    for img, txt in zip(image_emb, text_emb, strict=True):
        if not (np.isfinite(img).all() and np.isfinite(txt).all()):
            out.append("non-finite embedding")
        elif min(np.linalg.norm(img), np.linalg.norm(txt)) < 1e-6:
            out.append("zero embedding")
        else:
            out.append("")
    return out


class ClipEncoder:
    """The encoder actor: loads the CLIP once, then encodes batches of rows.

    On a GPU: pinned host batches copied asynchronously, autocast in half precision (fp16 by
    default, bf16 if configured). On CPU the same code runs in float32.
    """

    def __init__(
        self,
        source: ClipSource,
        checkpoint: clip_model.Checkpoint | None,
        storage: Storage,
        precision: str,
        threads: int | None,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.clip = clip_model.load_clip(source, checkpoint, self.device, storage)
        if precision == "auto":
            precision = "fp16" if self.device == "cuda" else "fp32"
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
            precision
        ]
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        end = np.asarray(batch["end"], dtype=bool)
        good = np.flatnonzero(~end)
        n, dim = len(end), self.clip.embed_dim
        image_emb = np.zeros((n, dim), np.float16)
        text_emb = np.zeros((n, dim), np.float16)
        problems = np.full(n, "", dtype=object)
        if len(good):
            pixels = torch.from_numpy(np.ascontiguousarray(batch["image"][good]))
            tokens = torch.from_numpy(np.ascontiguousarray(batch["tokens"][good])).long()
            if self.device == "cuda":
                pixels, tokens = pixels.pin_memory(), tokens.pin_memory()
            pixels = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float() / 255
            tokens = tokens.to(self.device, non_blocking=True)
            pixels = (pixels - self.mean) / self.std
            with (
                torch.no_grad(),
                torch.autocast(self.device, self.dtype, enabled=self.dtype != torch.float32),
            ):
                img = self.clip.model.encode_image(pixels).float()
                txt = self.clip.model.encode_text(tokens).float()
            img, txt = img.cpu().numpy(), txt.cpu().numpy()
            problems[good] = embedding_problems(img, txt)
            img = img / np.maximum(np.linalg.norm(img, axis=-1, keepdims=True), 1e-12)
            txt = txt / np.maximum(np.linalg.norm(txt, axis=-1, keepdims=True), 1e-12)
            image_emb[good] = np.nan_to_num(img).astype(np.float16)
            text_emb[good] = np.nan_to_num(txt).astype(np.float16)
        return {
            "shard": batch["shard"],
            "key": batch["key"],
            "caption": batch["caption"],
            "tokens": batch["tokens"],
            "end": batch["end"],
            "report": batch["report"],
            "image_emb": image_emb,
            "text_emb": text_emb,
            "problem": problems.astype(str),
        }


def describe_clip(
    source: ClipSource, checkpoint: clip_model.Checkpoint | None
) -> tuple[Any, tuple, tuple, int, int, int]:
    """The CLIP's preprocessing and sizes, without loading its weights: (image transform, mean,
    std, image size, context length, embedding dim)."""
    import open_clip

    clip_model.require_model(source)
    config = open_clip.get_model_config(source.model)
    tag = None if checkpoint else source.pretrained
    _, _, preprocess = open_clip.create_model_and_transforms(
        source.model, pretrained=tag, load_weights=False
    )
    transform, mean, std = clip_model.split_preprocess(preprocess, source.model)
    return (
        transform,
        mean,
        std,
        clip_model.image_size_of(config),
        int(config.get("text_cfg", {}).get("context_length", 77)),
        int(config["embed_dim"]),
    )


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
    shard_ids = completed_shards(storage, source_url)
    if not shard_ids:
        raise UserFacingError(
            f"no complete shards at {source_url} (config key: shards): run `unclip synth` or "
            "`unclip ingest` first"
        )
    check_cluster_fits(
        "embed",
        "encoder actors",
        ActorPool(cfg.concurrency, cfg.cpus_per_actor, cfg.gpus_per_actor, read_cpus=1),
    )
    checkpoint = clip_model.resolve_checkpoint(cfg.clip, storage, cfg.root)
    ident = clip_model.identity(cfg.clip, checkpoint)
    transform, mean, std, image_size, context, embed_dim = describe_clip(cfg.clip, checkpoint)
    store = EmbeddingStore(
        storage, join(cfg.url(cfg.store), cfg.clip_id or clip_model.safe_id(ident.id))
    )
    header = store_header(ident, embed_dim, context, cfg.clip.model)
    header["clip_source"] = clip_model.located(cfg.clip, storage, cfg.root)
    store.open_for_writing({**header, "source": source_url})

    versions = storage.list_details(source_url)  # one listing: every source tar's size and ETag
    tars = [shard_urls(source_url, i)["tar"] for i in shard_ids]
    done = store.completed()
    changed = changed_sources(done, versions)
    if changed:
        log.warning(
            "embed: %d source shards changed since they were encoded (%s); encoding them again",
            len(changed),
            ", ".join(sorted(changed)[:10]),
        )
    todo = [t for t in tars if source_name(t) not in done or source_name(t) in changed]
    log.info(
        "embed: %d of %d source shards to encode with %s into %s",
        len(todo),
        len(tars),
        ident.id,
        store.url,
    )
    started = time.time()
    gatherer = ShardGatherer(store, source_url, versions)
    if todo:
        spec = ReadSpec(storage, cfg.clip, transform, image_size, context)
        inputs = ray.data.from_items([{"tar": t} for t in todo], override_num_blocks=len(todo))
        rows = inputs.flat_map(lambda item: read_shard(spec, item["tar"]))
        encoded = rows.map_batches(
            ClipEncoder,
            fn_constructor_kwargs={
                "source": cfg.clip,
                "checkpoint": checkpoint,
                "storage": storage,
                "precision": cfg.precision,
                "threads": cfg.threads_per_actor,
                "mean": mean,
                "std": std,
            },
            batch_size=cfg.batch_size,
            compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
            num_gpus=cfg.gpus_per_actor,
            num_cpus=cfg.cpus_per_actor,
        )

        def stalled(seconds: float) -> str:
            return (
                f"embedding stalled: no encoded rows for {seconds:.0f} s (config key: "
                f"stall_timeout_s). {len(store.completed())} of {len(tars)} shards are complete "
                f"and kept in {store.url}; rerun the job to encode the rest. After a lost node, "
                "the encoder actors (concurrency × cpus_per_actor) can hold every CPU left, so "
                "no shard is read."
            )

        batches = encoded.iter_batches(batch_size=None, batch_format="numpy")
        for batch in iter_until_stalled(batches, cfg.stall_timeout_s, stalled):
            gatherer.add(batch)
        for name in sorted(gatherer.pending):  # rows with no end marker: never silently kept
            gatherer.failed[name] = "its read ended without its end marker"
    elapsed = time.time() - started
    manifest = store.finalize_manifest()
    if gatherer.failed:
        failed = sorted(gatherer.failed.items())
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
        "rows_encoded_now": gatherer.rows_written,
        "skipped": manifest["skipped"],
        "skipped_now": gatherer.skipped,
        "seconds": round(elapsed, 2),
        "samples_per_second": round(gatherer.rows_written / elapsed, 1)
        if gatherer.rows_written and elapsed
        else None,
    }


class ShardGatherer:
    """Collects encoded rows per source shard and publishes each shard once it is whole.

    A shard is whole when its end marker has arrived and as many rows as it counted; its store
    file and completion record are then written (with the source tar's size and version, which
    bind the record to the bytes it was made from). A shard whose read failed, or whose write
    fails after the retries, is put in ``failed`` with the reason and gets no record.
    """

    def __init__(
        self, store: EmbeddingStore, source_url: str, versions: dict[str, dict[str, Any]]
    ) -> None:
        self.store = store
        self.source_url = source_url
        self.versions = versions
        self.pending: dict[str, dict[str, Any]] = {}
        self.failed: dict[str, str] = {}
        self.rows_written = 0
        self.skipped = 0

    def add(self, batch: dict[str, np.ndarray]) -> None:
        """Take a batch of encoded rows; publishes the shards it completes."""
        for i in range(len(batch["key"])):
            name = str(batch["shard"][i])
            entry = self.pending.setdefault(name, {"rows": [], "bad": [], "report": None})
            if bool(batch["end"][i]):
                entry["report"] = json.loads(batch["report"][i])
            elif batch["problem"][i]:
                entry["bad"].append((str(batch["key"][i]), str(batch["problem"][i])))
            else:
                entry["rows"].append(
                    (
                        str(batch["key"][i]),
                        str(batch["caption"][i]),
                        batch["image_emb"][i],
                        batch["text_emb"][i],
                        batch["tokens"][i],
                    )
                )
            report = entry["report"]
            if report is not None and "failed" in report:
                del self.pending[name]
                self.failed[name] = report["failed"]
            elif report is not None and len(entry["rows"]) + len(entry["bad"]) == report["good"]:
                self._publish(name, entry)

    def _publish(self, name: str, entry: dict[str, Any]) -> None:
        del self.pending[name]
        rows = sorted(entry["rows"], key=lambda r: r[0])
        manifest = self.store.manifest()
        dim, context = int(manifest["embed_dim"]), int(manifest["tokenizer"]["context_length"])
        table = to_table(
            [r[0] for r in rows],
            [r[1] for r in rows],
            np.stack([r[2] for r in rows]) if rows else np.zeros((0, dim), np.float16),
            np.stack([r[3] for r in rows]) if rows else np.zeros((0, dim), np.float16),
            np.stack([r[4] for r in rows]) if rows else np.zeros((0, context), np.int32),
        )
        report = entry["report"]
        skips = Skips(Counter(report["skipped"]), dict(report["skipped_keys"]))
        for key, problem in sorted(entry["bad"]):
            skips.add(key, problem, name)
        source = shard_urls(self.source_url, int(name))["tar"] if name.isdigit() else name
        version = self.versions.get(source, {})
        record = {
            "source": source,
            "source_size": version.get("size"),
            "source_version": version.get("version"),
            **skips.to_json(),
            "written_at": time.time(),
        }
        try:
            self.store.write_shard(name, table, record)
        except StorageError as exc:
            log.error("embed: shard %s could not be written: %s", name, exc)
            self.failed[name] = f"writing it failed: {exc}"
            return
        log.info("embed: shard %s: %d rows, %d skipped", name, len(rows), skips.total())
        self.rows_written += len(rows)
        self.skipped += skips.total()


def embed_summary_line(summary: dict[str, Any]) -> str:
    rate = summary["samples_per_second"]
    return (
        f"embed: {summary['rows_encoded_now']} samples encoded now "
        f"({summary['shards_encoded_now']} shards, {summary['skipped_now']} skipped"
        + (f", {rate} samples/s" if rate else "")
        + f"); the store has {summary['rows']} rows in {summary['shards']} shards "
        f"({summary['skipped']} skipped) at {summary['store']}"
    )
