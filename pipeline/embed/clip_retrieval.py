"""Importing clip-retrieval's output into the embedding store, so existing embeddings (LAION's
published ones, or your own ``clip-retrieval inference`` runs) train the prior without recomputing.

clip-retrieval writes, for each part ``i``: ``img_emb/img_emb_{i}.npy`` and ``text_emb/text_emb_{i}.npy``
(N × D, float16, L2-normalised) and ``metadata/metadata_{i}.parquet`` (N rows, with a ``caption``
column and usually ``key``/``url``/``image_path``). Each part becomes one store shard named
``clip-retrieval-{i:05d}``, with the same schema, manifest and completion records as ``unclip
embed`` writes: rows without a caption or with a non-finite or zero embedding are skipped and counted.
The CLIP's identity comes from the config (``clip.model`` and ``clip.pretrained``), which must be the
CLIP that made the embeddings: the store cannot check it, so it records it.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.embed import clip_model
from pipeline.embed.job import MAX_KEYS_PER_REASON, store_header
from pipeline.embed.store import EmbeddingStore, to_table
from pipeline.errors import UserFacingError
from pipeline.stage_config import EmbedConfig
from pipeline.storage import Storage, basename, join

_PART = re.compile(r"_(\d+)\.(npy|parquet)$")


def _parts(storage: Storage, folder: str, ext: str) -> dict[int, str]:
    found = {}
    for url in storage.list(folder):
        match = _PART.search(basename(url))
        if match and match.group(2) == ext:
            found[int(match.group(1))] = url
    return found


def _load_npy(storage: Storage, url: str) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False)
    except ValueError as exc:
        raise UserFacingError(f"{url}: not a numpy array file ({exc})") from None
    if array.ndim != 2:
        raise UserFacingError(f"{url}: expected an N × D embedding matrix, got shape {array.shape}")
    return array


def import_folder(cfg: EmbedConfig, storage: Storage | None = None) -> dict[str, Any]:
    """Import ``cfg.import_clip_retrieval`` into the store; returns a summary. Reruns skip parts
    already imported."""
    import open_clip

    storage = storage or Storage(cfg.storage)
    folder = cfg.url(cfg.import_clip_retrieval or "")
    images = _parts(storage, join(folder, "img_emb"), "npy")
    texts = _parts(storage, join(folder, "text_emb"), "npy")
    metas = _parts(storage, join(folder, "metadata"), "parquet")
    if not images:
        raise UserFacingError(f"no img_emb/img_emb_N.npy files under {folder}")
    missing = sorted(set(images) - set(texts)) or sorted(set(images) - set(metas))
    if missing:
        raise UserFacingError(
            f"{folder}: part {missing[0]} has img_emb but no text_emb_{missing[0]}.npy or "
            f"metadata_{missing[0]}.parquet (the prior needs text embeddings and captions)"
        )
    tokenizer = clip_model.tokenizer(cfg.clip)
    context = int(tokenizer.context_length)
    expected_dim = None
    if cfg.clip.model in open_clip.list_models():
        expected_dim = int(open_clip.get_model_config(cfg.clip.model)["embed_dim"])
    ident = clip_model.identity(cfg.clip, None)
    store = EmbeddingStore(
        storage, join(cfg.url(cfg.store), cfg.clip_id or clip_model.safe_id(ident.id))
    )

    done = store.completed()
    header_written = False
    rows = skipped_total = 0
    for part in sorted(images):
        name = f"clip-retrieval-{part:05d}"
        if name in done:
            continue
        image_emb = _load_npy(storage, images[part])
        text_emb = _load_npy(storage, texts[part])
        with storage.open(metas[part]) as handle:
            meta = pq.read_table(handle)
        dim = image_emb.shape[1]
        if expected_dim is not None and dim != expected_dim:
            raise UserFacingError(
                f"{images[part]}: embeddings have {dim} dimensions but {cfg.clip.model} makes "
                f"{expected_dim}: is clip.model the CLIP that made them?"
            )
        for url, array in ((texts[part], text_emb),):
            if array.shape != image_emb.shape:
                raise UserFacingError(
                    f"{url}: shape {array.shape} does not match {images[part]} {image_emb.shape}"
                )
        if meta.num_rows != image_emb.shape[0]:
            raise UserFacingError(
                f"{metas[part]}: {meta.num_rows} rows for {image_emb.shape[0]} embeddings"
            )
        if "caption" not in meta.column_names:
            raise UserFacingError(
                f"{metas[part]}: no caption column (columns: {meta.column_names})"
            )
        if not header_written:
            store.open_for_writing(
                {**store_header(ident, dim, context, cfg.clip.model), "source": folder}
            )
            header_written = True
        captions = meta.column("caption").to_pylist()
        keys = (
            [str(k) for k in meta.column("key").to_pylist()]
            if "key" in meta.column_names
            else [f"cr{part:05d}-{i:07d}" for i in range(meta.num_rows)]
        )
        skipped: Counter = Counter()
        skipped_keys: dict[str, list[str]] = {}
        keep = []
        for i, (key, caption) in enumerate(zip(keys, captions, strict=True)):
            reason = None
            if not caption or not str(caption).strip():
                reason = "missing caption"
            elif not (
                np.isfinite(image_emb[i]).all()
                and np.isfinite(text_emb[i]).all()
                and np.abs(image_emb[i]).sum() > 0
                and np.abs(text_emb[i]).sum() > 0
            ):
                reason = "invalid embedding"
            if reason:
                skipped[reason] += 1
                keys_for = skipped_keys.setdefault(reason, [])
                if len(keys_for) < MAX_KEYS_PER_REASON:
                    keys_for.append(key)
            else:
                keep.append(i)
        kept_captions = [str(captions[i]).strip() for i in keep]
        tokens = (
            tokenizer(kept_captions).numpy() if keep else np.zeros((0, context), dtype=np.int64)
        )
        table = to_table(
            [keys[i] for i in keep], kept_captions, image_emb[keep], text_emb[keep], tokens
        )
        store.write_shard(
            name,
            table,
            {"source": images[part], "skipped": dict(skipped), "skipped_keys": skipped_keys},
        )
        rows += table.num_rows
        skipped_total += sum(skipped.values())
    if not header_written and not store.exists():
        raise UserFacingError(f"nothing imported from {folder}")
    manifest = store.finalize_manifest()
    return {
        "store": store.url,
        "rows": manifest["rows"],
        "rows_imported_now": rows,
        "skipped": manifest["skipped"],
        "skipped_now": skipped_total,
    }
