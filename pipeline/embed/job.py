"""The embedding job: open_clip image and text embeddings of webdataset shards, on Ray Data.

The pipeline streams, so memory does not grow with the dataset::

    source shards ──read tasks (CPU): stream each tar, decode, resize+crop, tokenize──▶ rows
        ──ClipEncoder actor pool (GPU when present): normalise, encode, L2-normalise──▶ embeddings
        ──driver: gather each source shard's rows, write its store file and completion record

Each read task handles one source shard and ends it with a marker row carrying the shard's counts
(good rows, skipped samples by reason, with their keys), so the driver knows when a shard is whole
whatever order the actor pool returns batches in. Bad samples (undecodable image, missing or empty
caption, a member cut off by a truncated tar) are logged with their key, counted, and skipped.

A rerun skips the source shards the store already has and never writes a key twice; a store made
by another CLIP is refused (``EmbeddingStore.open_for_writing``).
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.cluster.watchdog import iter_until_stalled
from pipeline.data.shards import completed_shards, iter_tar_samples, shard_urls
from pipeline.embed import clip_model
from pipeline.embed.store import EmbeddingStore, source_name, to_table
from pipeline.errors import UserFacingError
from pipeline.stage_config import ClipSource, EmbedConfig
from pipeline.storage import Storage, join

log = logging.getLogger(__name__)

MAX_KEYS_PER_REASON = 100  # skipped keys kept in each shard's record


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
    """Rows of model inputs for one source tar, then its end marker with the counts."""
    from PIL import Image

    name = source_name(tar_url)
    tokenizer = clip_model.tokenizer(spec.clip)
    skipped: Counter = Counter()
    skipped_keys: dict[str, list[str]] = defaultdict(list)
    good = 0

    def skip(key: str, reason: str) -> None:
        skipped[reason] += 1
        if len(skipped_keys[reason]) < MAX_KEYS_PER_REASON:
            skipped_keys[reason].append(key)
        log.warning("embed: skipping %s in %s: %s", key, tar_url, reason)

    samples = iter_tar_samples(spec.storage, tar_url)
    while True:
        try:
            sample = next(samples)
        except StopIteration:
            break
        except (tarfile.TarError, EOFError, OSError) as exc:
            skip(f"{name}:<end>", "truncated tar")
            log.warning("embed: %s is truncated after %d samples (%s)", tar_url, good, exc)
            break
        key = sample["__key__"]
        data = sample.get("jpg") or sample.get("png") or sample.get("webp") or sample.get("jpeg")
        caption = (sample.get("txt") or b"").decode("utf-8", errors="replace").strip()
        if data is None:
            skip(key, "missing image")
            continue
        if not caption:
            skip(key, "missing caption")
            continue
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
            pixels = clip_model.prepare_image(spec.image_transform, image)
        except Exception:
            skip(key, "undecodable image")
            continue
        tokens = tokenizer([caption])[0].numpy().astype(np.int32)
        good += 1
        yield {
            "shard": name,
            "key": key,
            "caption": caption,
            "image": pixels,
            "tokens": tokens,
            "end": False,
            "report": "",
        }
    yield _end_row(
        spec, name, {"good": good, "skipped": dict(skipped), "skipped_keys": dict(skipped_keys)}
    )


class ClipEncoder:
    """The encoder actor: loads the CLIP once, then encodes batches of rows.

    On a GPU: pinned host batches copied asynchronously, autocast in half precision (fp16 by
    default, bf16 if configured). On CPU the same code runs in float32.
    """

    def __init__(
        self,
        source: ClipSource,
        checkpoint: str | None,
        precision: str,
        threads: int | None,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.clip = clip_model.load_clip(source, checkpoint, self.device)
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
            img = torch.nn.functional.normalize(img, dim=-1)
            txt = torch.nn.functional.normalize(txt, dim=-1)
            image_emb[good] = img.cpu().numpy().astype(np.float16)
            text_emb[good] = txt.cpu().numpy().astype(np.float16)
        return {
            "shard": batch["shard"],
            "key": batch["key"],
            "caption": batch["caption"],
            "tokens": batch["tokens"],
            "end": batch["end"],
            "report": batch["report"],
            "image_emb": image_emb,
            "text_emb": text_emb,
        }


def describe_clip(
    source: ClipSource, checkpoint: str | None
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
    """Encode every source shard the store lacks; returns the run's summary."""
    import ray

    storage = storage or Storage(cfg.storage)
    source_url = cfg.url(cfg.shards)
    shard_ids = completed_shards(storage, source_url)
    if not shard_ids:
        raise UserFacingError(
            f"no complete shards at {source_url} (config key: shards): run `unclip synth` or "
            "`unclip ingest` first"
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

    done = store.completed()
    tars = [shard_urls(source_url, i)["tar"] for i in shard_ids]
    todo = [t for t in tars if source_name(t) not in done]
    log.info(
        "embed: %d of %d source shards to encode with %s into %s",
        len(todo),
        len(tars),
        ident.id,
        store.url,
    )
    started = time.time()
    rows_written = skipped_now = 0
    if todo:
        spec = ReadSpec(storage, cfg.clip, transform, image_size, context)
        inputs = ray.data.from_items([{"tar": t} for t in todo], override_num_blocks=len(todo))
        rows = inputs.flat_map(lambda item: read_shard(spec, item["tar"]))
        encoded = rows.map_batches(
            ClipEncoder,
            fn_constructor_kwargs={
                "source": cfg.clip,
                "checkpoint": checkpoint,
                "precision": cfg.precision,
                "threads": cfg.threads_per_actor,
                "mean": mean,
                "std": std,
            },
            batch_size=cfg.batch_size,
            concurrency=cfg.concurrency,
            num_gpus=cfg.gpus_per_actor,
            num_cpus=cfg.cpus_per_actor,
        )
        gatherer = ShardGatherer(store, source_url)

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
            for written, skipped in gatherer.add(batch):
                rows_written += written
                skipped_now += skipped
        if gatherer.pending:
            raise UserFacingError(
                f"embedding ended with incomplete shards: {sorted(gatherer.pending)}"
            )
    elapsed = time.time() - started
    manifest = store.finalize_manifest()
    return {
        "store": store.url,
        "clip": ident.id,
        "shards": len(manifest["shards"]),
        "shards_encoded_now": len(todo),
        "rows": manifest["rows"],
        "rows_encoded_now": rows_written,
        "skipped": manifest["skipped"],
        "skipped_now": skipped_now,
        "seconds": round(elapsed, 2),
        "samples_per_second": round(rows_written / elapsed, 1)
        if rows_written and elapsed
        else None,
    }


class ShardGatherer:
    """Collects encoded rows per source shard and publishes each shard once it is whole."""

    def __init__(self, store: EmbeddingStore, source_url: str) -> None:
        self.store = store
        self.source_url = source_url
        self.pending: dict[str, dict[str, Any]] = {}

    def add(self, batch: dict[str, np.ndarray]) -> Iterator[tuple[int, int]]:
        """Take a batch; yields (rows, skipped) for each shard it completes."""
        for i in range(len(batch["key"])):
            name = str(batch["shard"][i])
            entry = self.pending.setdefault(name, {"rows": [], "report": None})
            if bool(batch["end"][i]):
                entry["report"] = json.loads(batch["report"][i])
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
            if report is not None and len(entry["rows"]) == report["good"]:
                yield self._publish(name, entry)

    def _publish(self, name: str, entry: dict[str, Any]) -> tuple[int, int]:
        del self.pending[name]
        rows = sorted(entry["rows"], key=lambda r: r[0])
        dim = self.store_dim(rows)
        keys = [r[0] for r in rows]
        table = to_table(
            keys,
            [r[1] for r in rows],
            np.stack([r[2] for r in rows]) if rows else np.zeros((0, dim), np.float16),
            np.stack([r[3] for r in rows]) if rows else np.zeros((0, dim), np.float16),
            np.stack([r[4] for r in rows]) if rows else np.zeros((0, self.context()), np.int32),
        )
        report = entry["report"]
        record = {
            "source": shard_urls(self.source_url, int(name))["tar"] if name.isdigit() else name,
            "skipped": report["skipped"],
            "skipped_keys": report["skipped_keys"],
            "written_at": time.time(),
        }
        self.store.write_shard(name, table, record)
        skipped = sum(report["skipped"].values())
        log.info("embed: shard %s: %d rows, %d skipped", name, len(rows), skipped)
        return len(rows), skipped

    def store_dim(self, rows: list) -> int:
        return len(rows[0][2]) if rows else int(self.store.manifest()["embed_dim"])

    def context(self) -> int:
        return int(self.store.manifest()["tokenizer"]["context_length"])


def embed_summary_line(summary: dict[str, Any]) -> str:
    rate = summary["samples_per_second"]
    return (
        f"embed: {summary['rows_encoded_now']} samples encoded now "
        f"({summary['shards_encoded_now']} shards, {summary['skipped_now']} skipped"
        + (f", {rate} samples/s" if rate else "")
        + f"); the store has {summary['rows']} rows in {summary['shards']} shards "
        f"({summary['skipped']} skipped) at {summary['store']}"
    )
