"""Importing clip-retrieval's output into the embedding store, so existing embeddings (LAION's
published ones, or your own ``clip-retrieval inference`` runs) train the prior without recomputing.

clip-retrieval writes, for each part ``i``: ``img_emb/img_emb_{i}.npy`` and ``text_emb/text_emb_{i}.npy``
(N × D, float16, L2-normalised) and ``metadata/metadata_{i}.parquet`` (N rows, with a ``caption``
column and usually ``key``/``url``/``image_path``). Each part becomes one store shard named
``clip-retrieval-{i:05d}``, with the same schema, manifest and completion records as ``unclip
embed`` writes: rows without a caption or with a non-finite or zero embedding are skipped and counted.
The CLIP's identity comes from the config (``clip.model`` and ``clip.pretrained``), which must be the
CLIP that made the embeddings: the store cannot check it, so it records it.

Before anything is written, every part is checked from its files' headers (the ``.npy`` headers and
the parquet footers, not the data): all three files present, float N × D embeddings, the same shape
for images and texts, one dimension across every part, a metadata row per embedding and a caption
column. A folder that fails is refused with one line naming the file, and the store is left as it
was.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.reader import MAX_KEYS_PER_REASON
from pipeline.embed import clip_model
from pipeline.embed.job import store_header
from pipeline.embed.store import EmbeddingStore, to_table
from pipeline.errors import UserFacingError
from pipeline.stage_config import EmbedConfig
from pipeline.storage import Storage, StorageError, basename, join

_PART = re.compile(r"_(\d+)\.(npy|parquet)$")


# each part's three files: <kind>/<kind>_<N>.<ext>
_KINDS = (("img_emb", "npy"), ("text_emb", "npy"), ("metadata", "parquet"))


@dataclass(frozen=True)
class Part:
    """One clip-retrieval part, checked: its three files, its rows and embedding dimension."""

    number: int
    image: str
    text: str
    metadata: str
    rows: int
    dim: int


def _parts(storage: Storage, folder: str, ext: str) -> dict[int, str]:
    """The files ``*_<N>.<ext>`` directly in ``folder``, by part number N."""
    found: dict[int, str] = {}
    for url in storage.list(folder):
        match = _PART.search(basename(url))
        if match and match.group(2) == ext:
            number = int(match.group(1))
            if number in found:
                raise UserFacingError(f"{url}: part {number} again (also {found[number]})")
            found[number] = url
    return found


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _npy_shape(storage: Storage, url: str) -> tuple[int, ...]:
    """The array shape in a ``.npy`` file's header, checked to be a float N × D matrix whose data
    the file holds in full (its size is compared; the data is not read)."""
    try:
        with storage.open(url) as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
            offset = handle.tell()
    except StorageError:
        raise
    except (ValueError, EOFError, OSError, SyntaxError) as exc:
        raise UserFacingError(f"{url}: not a numpy array file ({_first_line(exc)})") from None
    if len(shape) != 2:
        raise UserFacingError(f"{url}: expected an N × D embedding matrix, got shape {shape}")
    if dtype.kind != "f":
        raise UserFacingError(f"{url}: expected float embeddings, got dtype {dtype}")
    needed = int(np.prod(shape)) * dtype.itemsize
    held = storage.size(url) - offset
    if held < needed:
        raise UserFacingError(
            f"{url}: cut short: {held} bytes of data for its {shape} {dtype} array ({needed})"
        )
    return tuple(int(n) for n in shape)


def _load_npy(storage: Storage, url: str) -> np.ndarray:
    """A whole ``.npy`` embedding matrix; a file cut short is named, not a traceback."""
    try:
        array = np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False)
    except (ValueError, EOFError) as exc:
        raise UserFacingError(f"{url}: not a numpy array file ({_first_line(exc)})") from None
    if array.ndim != 2:
        raise UserFacingError(f"{url}: expected an N × D embedding matrix, got shape {array.shape}")
    return array


def _parquet_error(url: str, exc: BaseException) -> UserFacingError:
    return UserFacingError(f"{url}: cannot be read as parquet ({_first_line(exc)})")


def _metadata_layout(storage: Storage, url: str) -> tuple[int, list[str]]:
    """Rows and column names from a metadata file's parquet footer (the data is not read)."""
    try:
        with storage.open(url) as handle:
            parquet = pq.ParquetFile(handle)
            return parquet.metadata.num_rows, list(parquet.schema_arrow.names)
    except StorageError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise _parquet_error(url, exc) from None


def _read_metadata(storage: Storage, url: str) -> pa.Table:
    """A whole metadata parquet file; one that cannot be read is named, not a traceback."""
    try:
        with storage.open(url) as handle:
            return pq.read_table(handle)
    except StorageError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise _parquet_error(url, exc) from None


def check_parts(storage: Storage, folder: str) -> list[Part]:
    """Every part of the clip-retrieval folder ``folder``, by number, checked from its files'
    headers before anything is imported (see the module's doc); raises a one-line
    :class:`UserFacingError` naming the first file that is missing or does not fit."""
    found = {kind: _parts(storage, join(folder, kind), ext) for kind, ext in _KINDS}
    if not found["img_emb"]:
        raise UserFacingError(f"no img_emb/img_emb_N.npy files under {folder}")
    numbers = sorted(set().union(*(set(urls) for urls in found.values())))
    for number in numbers:
        present = next(found[kind][number] for kind, _ in _KINDS if number in found[kind])
        for kind, ext in _KINDS:
            if number not in found[kind]:
                raise UserFacingError(
                    f"{join(folder, kind, f'{kind}_{number}.{ext}')} is missing (part {number} "
                    f"has {basename(present)}; the prior needs image and text embeddings and "
                    "captions)"
                )
    parts: list[Part] = []
    for number in numbers:
        image, text, metadata = (found[kind][number] for kind, _ in _KINDS)
        shape = _npy_shape(storage, image)
        if parts and shape[1] != parts[0].dim:
            raise UserFacingError(
                f"{image}: embeddings have {shape[1]} dimensions but {parts[0].image} has "
                f"{parts[0].dim}: every part must come from the same CLIP"
            )
        text_shape = _npy_shape(storage, text)
        if text_shape != shape:
            raise UserFacingError(f"{text}: shape {text_shape} does not match {image} {shape}")
        rows, columns = _metadata_layout(storage, metadata)
        if rows != shape[0]:
            raise UserFacingError(f"{metadata}: {rows} rows for {shape[0]} embeddings in {image}")
        if "caption" not in columns:
            raise UserFacingError(f"{metadata}: no caption column (columns: {columns})")
        parts.append(Part(number, image, text, metadata, rows=shape[0], dim=shape[1]))
    return parts


def import_folder(cfg: EmbedConfig, storage: Storage | None = None) -> dict[str, Any]:
    """Import ``cfg.import_clip_retrieval`` into the store; returns a summary. Reruns skip parts
    already imported."""
    import open_clip

    storage = storage or Storage(cfg.storage)
    folder = cfg.url(cfg.import_clip_retrieval or "")
    parts = check_parts(storage, folder)
    tokenizer = clip_model.tokenizer(cfg.clip)
    context = int(tokenizer.context_length)
    if cfg.clip.model in open_clip.list_models():
        expected_dim = int(open_clip.get_model_config(cfg.clip.model)["embed_dim"])
        if parts[0].dim != expected_dim:
            raise UserFacingError(
                f"{parts[0].image}: embeddings have {parts[0].dim} dimensions but "
                f"{cfg.clip.model} makes {expected_dim}: is clip.model the CLIP that made them?"
            )
    ident = clip_model.identity(cfg.clip, None)
    store = EmbeddingStore(
        storage, join(cfg.url(cfg.store), cfg.clip_id or clip_model.safe_id(ident.id))
    )

    done = store.completed()
    header_written = False
    rows = skipped_total = 0
    for part in parts:
        name = f"clip-retrieval-{part.number:05d}"
        if name in done:
            continue
        image_emb = _load_npy(storage, part.image)
        text_emb = _load_npy(storage, part.text)
        meta = _read_metadata(storage, part.metadata)
        if not header_written:
            store.open_for_writing(
                {**store_header(ident, part.dim, context, cfg.clip.model), "source": folder}
            )
            header_written = True
        captions = meta.column("caption").to_pylist()
        keys = (
            [str(k) for k in meta.column("key").to_pylist()]
            if "key" in meta.column_names
            else [f"cr{part.number:05d}-{i:07d}" for i in range(meta.num_rows)]
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
            {"source": part.image, "skipped": dict(skipped), "skipped_keys": skipped_keys},
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
