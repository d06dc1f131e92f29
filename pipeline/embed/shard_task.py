"""One source shard through the embedding job, in a reader actor: read, encode, write its store file.

::

    source tar ──stream, decode, resize+crop, tokenize (a reader, CPU)──▶ batches of batch_size
        ──its encoder actor (GPU when present, :mod:`pipeline.embed.encoder`)──▶ unit embeddings
        ──the reader: the shard's rows sorted by key──▶ shards/NNNNN.parquet (atomic)
        ──returns its counts (rows, skipped by reason with keys) to the driver, which writes
          the completion record

Readers are actors, not tasks, so a process that imported torch and open_clip serves shard after
shard (as tasks, each shard landed in a fresh worker that paid ~10 s of imports: 4 tiny shards
took 50 s).

The shard's rows meet in the reader that read them, so a shard is whole without any gathering, and
the driver sees only counts: the encoded rows never travel through one process. While the encoder
works on one batch the reader decodes the next (``ahead`` batches sent and not yet back).

Bad samples (undecodable image, missing or empty caption, a member cut off by a truncated tar, a
file that is not a tar, NaN/inf/zero embeddings) are skipped and counted with their keys
(:mod:`pipeline.data.reader`). A tar that cannot be read, or a store file that cannot be written,
after the storage retries is returned as ``failed`` with the reason: the driver writes no record
for it, and a rerun encodes it again. Writing the same shard twice (a call retried on a reader
restarted after its node was lost) replaces the file whole with the same rows.
"""

from __future__ import annotations

import io
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.data.reader import Skips, read_samples
from pipeline.embed import clip_model
from pipeline.embed.store import EmbeddingStore, to_table
from pipeline.stage_config import ClipSource
from pipeline.storage import Storage, StorageError

log = logging.getLogger(__name__)


@dataclass
class ShardSpec:
    """What a reader needs besides its tar and its encoder (picklable, shared by all)."""

    storage: Storage
    store_url: str
    clip: ClipSource
    image_transform: Any
    embed_dim: int
    context_length: int
    batch_size: int
    ahead: int = 1  # batches left with the encoder while the task decodes the next


class _Rows:
    """The shard's encoded rows as they come back from the encoder, and the bad ones."""

    def __init__(self, spec: ShardSpec) -> None:
        self.spec = spec
        self.keys: list[str] = []
        self.captions: list[str] = []
        self.tokens: list[np.ndarray] = []
        self.image_emb: list[np.ndarray] = []
        self.text_emb: list[np.ndarray] = []
        self.bad: list[tuple[str, str]] = []

    def add(self, batch: dict[str, list], encoded: tuple[np.ndarray, np.ndarray, list[str]]):
        image_emb, text_emb, problems = encoded
        for i, problem in enumerate(problems):
            if problem:
                self.bad.append((batch["key"][i], problem))
                continue
            self.keys.append(batch["key"][i])
            self.captions.append(batch["caption"][i])
            self.tokens.append(batch["tokens"][i])
            self.image_emb.append(image_emb[i])
            self.text_emb.append(text_emb[i])

    def table(self):
        """The rows in the store's schema, sorted by key."""
        order = sorted(range(len(self.keys)), key=self.keys.__getitem__)
        dim, context = self.spec.embed_dim, self.spec.context_length

        def stacked(values: list[np.ndarray], width: int, dtype) -> np.ndarray:
            if not values:
                return np.zeros((0, width), dtype)
            return np.stack([values[i] for i in order])

        return to_table(
            [self.keys[i] for i in order],
            [self.captions[i] for i in order],
            stacked(self.image_emb, dim, np.float16),
            stacked(self.text_emb, dim, np.float16),
            stacked(self.tokens, context, np.int32),
        )


def encode_shard(spec: ShardSpec, name: str, tar_url: str, encoder: Any) -> dict[str, Any]:
    """Read, encode and write one source shard; returns ``{"name", "rows", "skipped",
    "skipped_keys"}`` once its store file is written, or ``{"name", "failed": reason}``.

    ``encoder`` is a handle to a :class:`pipeline.embed.encoder.ClipEncoder` actor. An error the
    encoder raises (not a storage fault: a bug, an out-of-memory) fails the task, which the
    driver reports by shard.
    """
    import ray
    from PIL import Image

    tokenizer = clip_model.tokenizer(spec.clip)
    skips = Skips()
    rows = _Rows(spec)
    sent: deque[tuple[dict[str, list], Any]] = deque()
    batch: dict[str, list] = {"key": [], "caption": [], "pixels": [], "tokens": []}

    def send() -> None:
        nonlocal batch
        pixels, tokens = np.stack(batch["pixels"]), np.stack(batch["tokens"])
        sent.append((batch, encoder.encode.remote(pixels, tokens)))
        batch = {"key": [], "caption": [], "pixels": [], "tokens": []}

    def receive(keep: int) -> None:
        while len(sent) > keep:
            done, ref = sent.popleft()
            rows.add(done, ray.get(ref))

    try:
        for sample in read_samples(spec.storage, tar_url, skips):
            try:
                image = Image.open(io.BytesIO(sample.image))
                image.load()
                pixels = clip_model.prepare_image(spec.image_transform, image)
            except Exception:
                skips.add(sample.key, "undecodable image", tar_url)
                continue
            batch["key"].append(sample.key)
            batch["caption"].append(sample.caption)
            batch["pixels"].append(pixels)
            batch["tokens"].append(tokenizer([sample.caption])[0].numpy().astype(np.int32))
            if len(batch["key"]) == spec.batch_size:
                send()
                receive(spec.ahead)
    except StorageError as exc:
        log.error("embed: shard %s failed: %s", name, exc)
        return {"name": name, "failed": str(exc)}
    if batch["key"]:
        send()
    receive(0)
    for key, problem in sorted(rows.bad):
        skips.add(key, problem, name)
    store = EmbeddingStore(spec.storage, spec.store_url)
    table = rows.table()
    try:
        store.write_table(name, table)
    except StorageError as exc:
        log.error("embed: shard %s could not be written: %s", name, exc)
        return {"name": name, "failed": f"writing it failed: {exc}"}
    return {"name": name, "rows": table.num_rows, **skips.to_json()}


class ShardReader:
    """The reader actor: encodes the shards the driver hands it, one at a time, with one encoder
    (one CPU; restarted, and its call retried, when its node is lost)."""

    def __init__(self, spec: ShardSpec, encoder_name: str) -> None:
        import ray

        self.spec = spec
        self.encoder = ray.get_actor(encoder_name)  # a restarted encoder keeps its name

    def encode(self, name: str, tar_url: str) -> dict[str, Any]:
        """:func:`encode_shard` of the shard ``name`` at ``tar_url``."""
        return encode_shard(self.spec, name, tar_url, self.encoder)
