"""The embedding store: CLIP image and text embeddings of a dataset, one file per source shard.

Layout under ``<store root>/<clip-id>/``::

    manifest.json          the CLIP's identity, embedding dim, dtype, normalisation, tokenizer context,
                           the source shards' URL and, per completed source shard, rows and skips
    shards/NNNNN.parquet   one file per source shard NNNNN.tar: key, caption, image_emb, text_emb
                           (float16, L2-normalised), text_tokens (int32, the CLIP tokenizer's ids)
    done/NNNNN.json        the shard's completion record, written after its parquet
    done-index.parquet     the records compacted at the end of each run (name, version, record):
                           what lets a stage start read 200k records in seconds
    writers/<id>.json      one marker per process writing records, removed once an index covers
                           them: with none there, the index alone is every record (writers.py)

A source shard is in the store exactly when its ``done`` record exists: the parquet is written first
(atomically), the record last, so a shard is absent or complete, never half there, and rewriting an
incomplete one replaces the same file (no key twice). Every stage reads the completed shards: the prior
as a Ray Dataset of columns (:meth:`EmbeddingStore.dataset`), the image stages by streaming each source
tar beside its store file, matched by key (:func:`image_dataset`), with no join over the dataset.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.reader import Skips, read_samples
from pipeline.data.shard_set import ShardSet, TarLocator, list_shards
from pipeline.embed import writers
from pipeline.errors import UserFacingError
from pipeline.storage import Storage, basename, is_local, join

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "done-index.parquet"  # the completion records compacted (see EmbeddingStore.completed)
# written under the writer markers' rule (pipeline/embed/writers.py): an index without it (an older
# store's) is never read alone
INDEX_RULE = {b"unclip.index": b"writers-1"}
READ_THREADS = 32  # completion records read at once when the index lacks them
EMBEDDING_COLUMNS = ("key", "caption", "image_emb", "text_emb", "text_tokens")


def store_schema(embed_dim: int, context_length: int) -> pa.Schema:
    return pa.schema(
        [
            ("key", pa.string()),
            ("caption", pa.string()),
            ("image_emb", pa.list_(pa.float16(), embed_dim)),
            ("text_emb", pa.list_(pa.float16(), embed_dim)),
            ("text_tokens", pa.list_(pa.int32(), context_length)),
        ]
    )


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def to_table(
    keys: Sequence[str],
    captions: Sequence[str],
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    text_tokens: np.ndarray,
) -> pa.Table:
    """Rows in the store's schema; embeddings are L2-normalised here and stored as float16."""
    dim = image_emb.shape[1]
    context = text_tokens.shape[1]

    def fixed(values: np.ndarray, dtype: pa.DataType, width: int) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), dtype), width)

    return pa.Table.from_arrays(
        [
            pa.array(list(keys), pa.string()),
            pa.array(list(captions), pa.string()),
            fixed(l2_normalize(image_emb).astype(np.float16), pa.float16(), dim),
            fixed(l2_normalize(text_emb).astype(np.float16), pa.float16(), dim),
            fixed(text_tokens.astype(np.int32), pa.int32(), context),
        ],
        schema=store_schema(dim, context),
    )


def column_array(table: pa.Table, name: str) -> np.ndarray:
    """A fixed-size-list column as an (N, width) numpy array."""
    column = table.column(name).combine_chunks()
    width = column.type.list_size
    return column.values.to_numpy(zero_copy_only=False).reshape(-1, width)


class EmbeddingStore:
    """One store: ``<store root>/<clip-id>``."""

    def __init__(self, storage: Storage, url: str) -> None:
        self.storage = storage
        self.url = url
        self._marker: writers.Marker | None = None  # this process's, while it writes records
        self._marker_lock = threading.Lock()
        # the records this process wrote since its last index: that index needs no GET of them
        self._written: dict[str, dict[str, Any]] = {}

    def __getstate__(self) -> dict[str, Any]:  # a copy elsewhere writes under its own marker
        return {"storage": self.storage, "url": self.url}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["storage"], state["url"])

    def __repr__(self) -> str:
        return f"EmbeddingStore({self.url!r})"

    # -- locating ------------------------------------------------------------------------------

    @classmethod
    def locate(
        cls, storage: Storage, store_root: str, clip_id: str | None = None
    ) -> EmbeddingStore:
        """The store under ``store_root`` named ``clip_id``, or the only one there."""
        if clip_id:
            store = cls(storage, join(store_root, clip_id))
            if not storage.exists(join(store.url, MANIFEST)):
                raise UserFacingError(f"no embedding store at {store.url} (run `unclip embed`)")
            return store
        found = [u for u in storage.list(store_root) if storage.exists(join(u, MANIFEST))]
        if not found:
            raise UserFacingError(f"no embedding store under {store_root} (run `unclip embed`)")
        if len(found) > 1:
            names = ", ".join(basename(u) for u in found)
            raise UserFacingError(
                f"several embedding stores under {store_root} ({names}): set clip_id"
            )
        return cls(storage, found[0])

    # -- manifest ------------------------------------------------------------------------------

    def manifest(self) -> dict[str, Any]:
        return self.storage.read_json(join(self.url, MANIFEST))

    def exists(self) -> bool:
        return self.storage.exists(join(self.url, MANIFEST))

    def open_for_writing(self, header: dict[str, Any]) -> None:
        """Create the store, or check that an existing one was made by the same CLIP.

        ``header`` holds the identity fields (clip, embed_dim, dtype, normalization, tokenizer).
        A store made by another CLIP, or with other dims or tokenizer, is refused, not mixed; so
        is a store made from other source shards (``source``): keys repeat across datasets
        (img2dataset numbers every dataset's samples from 0), so the image stages would pair one
        dataset's images with another's embeddings.
        """
        if self.exists():
            current = self.manifest()
            if current.get("source") and not same_place(current["source"], header["source"]):
                raise UserFacingError(
                    f"the embedding store at {self.url} holds the source shards at "
                    f"{current['source']}, not {header['source']} (config key: shards): a store "
                    "is bound to one source; write to another store (store= or clip_id=)"
                )
            for field in ("clip", "embed_dim", "dtype", "normalization", "tokenizer"):
                if current.get(field) != header.get(field):
                    raise UserFacingError(
                        f"the embedding store at {self.url} was made with another CLIP: its "
                        f"{field} is {current.get(field)!r}, this run's is {header.get(field)!r}; "
                        "write to another store (store= or clip_id=) instead of mixing them"
                    )
            return
        self.storage.write_json(
            join(self.url, MANIFEST), {"format_version": FORMAT_VERSION, **header, "shards": {}}
        )

    def finalize_manifest(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Rewrite the manifest's shard list from the completion records (one write per run)."""
        manifest = self.manifest()
        shards = self.write_index()
        manifest["shards"] = {
            name: {k: rec[k] for k in ("rows", "skipped", "source") if k in rec}
            for name, rec in sorted(shards.items())
        }
        manifest["rows"] = sum(rec["rows"] for rec in shards.values())
        manifest["skipped"] = sum(sum(rec["skipped"].values()) for rec in shards.values())
        manifest.update(extra or {})
        self.storage.write_json(join(self.url, MANIFEST), manifest)
        return manifest

    # -- shards --------------------------------------------------------------------------------

    def shard_file(self, name: str) -> str:
        return join(self.url, "shards", f"{name}.parquet")

    def completed(self) -> dict[str, dict[str, Any]]:
        """Completion records of the shards in the store, by source shard name.

        The usual case, between runs: ``writers/`` is empty, so the compacted index
        (``done-index.parquet``, rewritten with the manifest at the end of each run) holds every
        record, and two requests read them all, whatever the store's size
        (:mod:`pipeline.embed.writers` says why). Otherwise (a run writing, or one that died before
        its index, or an index older than that rule), one listing of ``done/`` says which shards
        are complete (the records are the truth); their contents come from the index where a
        record's version (ETag, or mtime and size) is the one indexed, and otherwise from the
        record itself, read in parallel. At 200k shards a GET each, one after another, took about
        an hour; the listing is ~200 pages.
        """
        index = None
        if not writers.open_writers(self.storage, self.url):
            index, rule = self._read_index()
            if rule:
                return {name: record for name, (_, record) in index.items()}
        return {name: record for name, (_, record) in self._records(index).items()}

    def _records(
        self, index: dict[str, tuple[str, dict[str, Any]]] | None = None
    ) -> dict[str, tuple[str | None, dict[str, Any]]]:
        """Every completion record with its version: ``{name: (version, record)}`` (``index``:
        the compacted index when the caller has read it already)."""
        listing = self.storage.list_details(join(self.url, "done"))
        if index is None:
            index, _ = self._read_index()
        out: dict[str, tuple[str | None, dict[str, Any]]] = {}
        unread: list[tuple[str, str, str | None]] = []
        for url, details in listing.items():
            if not url.endswith(".json"):
                continue
            name, version = basename(url)[: -len(".json")], details.get("version")
            indexed = index.get(name)
            if version is not None and indexed is not None and indexed[0] == version:
                out[name] = indexed
            elif name in self._written:
                out[name] = (version, self._written[name])
            else:
                unread.append((name, url, version))
        if unread:
            with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(unread))) as pool:
                records = pool.map(lambda item: self.storage.read_json(item[1]), unread)
                for (name, _, version), record in zip(unread, records, strict=True):
                    out[name] = (version, record)
        return out

    def _read_index(self) -> tuple[dict[str, tuple[str, dict[str, Any]]], bool]:
        """The compacted index of the completion records, and whether it was written under the
        writer markers' rule (empty and False when absent or unreadable: the records themselves
        are then read)."""
        url = join(self.url, INDEX)
        try:
            with self.storage.open(url) as handle:
                table = pq.read_table(handle)
        except Exception:  # absent (a new store), or damaged: the records are the truth
            return {}, False
        names, versions, records = (table.column(c).to_pylist() for c in table.column_names)
        rule = (table.schema.metadata or {}).get(b"unclip.index") == INDEX_RULE[b"unclip.index"]
        index = {n: (v, json.loads(r)) for n, v, r in zip(names, versions, records, strict=True)}
        return index, rule

    def write_index(self) -> dict[str, dict[str, Any]]:
        """Rewrite the compacted index from the records (one listing, and reads of the records
        written since the last index); returns the records. Then this process's writer marker
        goes, and any marker of a writer dead throughout the listing (their records are in)."""
        listing_began = time.time()
        records = self._records()
        names = sorted(n for n, (version, _) in records.items() if version is not None)
        table = pa.table(
            {
                "name": pa.array(names, pa.string()),
                "version": pa.array([records[n][0] for n in names], pa.string()),
                "record": pa.array([json.dumps(records[n][1]) for n in names], pa.string()),
            }
        )
        sink = pa.BufferOutputStream()
        pq.write_table(table.replace_schema_metadata(INDEX_RULE), sink, compression="zstd")
        self.storage.write_bytes(join(self.url, INDEX), sink.getvalue().to_pybytes())
        with self._marker_lock:
            marker, self._marker = self._marker, None
            self._written = {}
        if marker is not None:
            marker.close()
        writers.remove_stale(self.storage, self.url, listing_began)
        return {name: record for name, (_, record) in records.items()}

    def check_source(
        self, shards_url: str, records: dict[str, dict[str, Any]] | None = None
    ) -> ShardSet:
        """The source shards at ``shards_url`` (a folder or pattern), refusing to pair this store
        with shards it was not made from, or that changed since (the size and version each
        completion record keeps of its tar; one listing). ``records``: :meth:`completed`, read
        here when not given."""
        source = self.manifest().get("source")
        if source and not same_place(source, shards_url):
            raise UserFacingError(
                f"the embedding store at {self.url} was made from the source shards at {source}, "
                f"not {shards_url} (config key: shards): use that folder, or embed this one into "
                "its own store"
            )
        shards = list_shards(self.storage, shards_url)
        changed = changed_sources(self.completed() if records is None else records, shards.versions)
        if changed:
            raise UserFacingError(
                f"{len(changed)} source shards under {shards_url} changed since they were "
                f"embedded into {self.url} ({', '.join(changed[:10])}): rerun `unclip embed`, "
                "which encodes them again"
            )
        return shards

    def write_shard(self, name: str, table: pa.Table, record: dict[str, Any]) -> None:
        """Publish one source shard: its parquet, then its completion record."""
        self.write_table(name, table)
        self.write_record(name, {**record, "rows": table.num_rows})

    def write_table(self, name: str, table: pa.Table) -> None:
        """Write one source shard's store file (atomically; it counts only once its record is
        written, :meth:`write_record`)."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        self.storage.write_bytes(self.shard_file(name), sink.getvalue().to_pybytes())

    def write_record(self, name: str, record: dict[str, Any]) -> None:
        """Write a shard's completion record (with its ``rows``), after its store file; the
        first one puts this process's writer marker in place (until :meth:`write_index`)."""
        with self._marker_lock:
            if self._marker is None:
                self._marker = writers.Marker(self.storage, self.url)
        self.storage.write_json(join(self.url, "done", f"{name}.json"), record)
        self._written[name] = record

    def read_shard(self, name: str, columns: Sequence[str] | None = None) -> pa.Table:
        with self.storage.open(self.shard_file(name)) as handle:
            return pq.read_table(handle, columns=list(columns) if columns else None)

    def read_all(self, columns: Sequence[str] | None = None) -> pa.Table:
        """Every completed shard in one table (small stores and tests only: its memory grows with
        the store; samples come from :mod:`pipeline.embed.sampling`)."""
        names = sorted(self.completed())
        if not names:
            raise UserFacingError(f"the embedding store at {self.url} has no completed shards")
        return pa.concat_tables(self.read_shard(n, columns) for n in names)

    def dataset(self, columns: Sequence[str] | None = None):
        """The completed shards as a Ray Dataset (streamed; columns selectable)."""
        import ray

        names = sorted(self.completed())
        if not names:
            raise UserFacingError(f"the embedding store at {self.url} has no completed shards")
        filesystem, _ = self.storage.arrow_filesystem(self.url)
        paths = [self.storage.arrow_filesystem(self.shard_file(n))[1] for n in names]
        dataset = ray.data.read_parquet(paths, filesystem=filesystem)
        return dataset.select_columns(list(columns)) if columns else dataset


# ----------------------------------------------------------------------------------------------
# Images from the source shards with their embeddings, matched by key


def iter_shard_with_embeddings(
    storage: Storage,
    tars: TarLocator,
    store: EmbeddingStore,
    name: str,
    columns: Sequence[str] = ("image_emb", "text_tokens", "caption"),
) -> Iterator[dict[str, Any]]:
    """Stream one source tar, yielding each sample the store has: the encoded image bytes beside
    the store's columns for its key. Samples the store skipped (bad images, no caption) are left out;
    the tar is read by the one reader (:func:`pipeline.data.reader.read_samples`), so a tar that
    cannot be read fails the task after the storage retries instead of training on less."""
    table = store.read_shard(name, ["key", *columns])
    index = {key: i for i, key in enumerate(table.column("key").to_pylist())}
    arrays = {
        c: column_array(table, c)
        if pa.types.is_fixed_size_list(table.schema.field(c).type)
        else None
        for c in columns
    }
    values = {c: table.column(c).to_pylist() for c in columns if arrays[c] is None}
    tar = tars(name)
    skips = Skips()
    for sample in read_samples(storage, tar, skips, need_caption=False):
        i = index.get(sample.key)
        if i is None:
            continue
        row = {"key": sample.key, "image_bytes": sample.image}
        for c in columns:
            row[c] = arrays[c][i] if arrays[c] is not None else values[c][i]
        yield row


class SourceTooSmall(UserFacingError):
    """A source image smaller than the resolution a stage trains at."""


def decode_image(data: bytes, size: int, where: str = "") -> np.ndarray:
    """JPEG/PNG bytes → (size, size, 3) uint8, downscaled (area) when larger.

    A source smaller than ``size`` raises :class:`SourceTooSmall` naming ``where`` (the shard and
    key): upscaled, it would teach an upsampler to produce blur, silently (the 256→1024 RayJob
    pointed at the 256 px shards did exactly that).
    """
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    if min(image.size) < size:
        raise SourceTooSmall(
            f"the source image {where or '(bytes)'} is {image.size[0]}×{image.size[1]} px, "
            f"smaller than the {size} px this stage trains at: images are never upscaled; point "
            "the stage's shards at images of at least that size (img2dataset's image_size)"
        )
    if image.size != (size, size):
        image = image.resize((size, size), Image.BOX)
    return np.asarray(image, dtype=np.uint8)


def image_dataset(
    storage: Storage,
    shards_url: str,
    store: EmbeddingStore,
    *,
    image_size: int,
    columns: Sequence[str] = ("image_emb", "text_tokens"),
):
    """A Ray Dataset of ``image`` (image_size², uint8) with the store's columns, streamed shard by
    shard: each read task opens one source tar and its store file, so no join over the dataset."""
    import ray

    names = sorted(store.completed())
    if not names:
        raise UserFacingError(f"the embedding store at {store.url} has no completed shards")
    tars = store.check_source(shards_url).locator()

    def read(item: dict[str, Any]) -> Iterator[dict[str, Any]]:
        skips = Skips()
        for row in iter_shard_with_embeddings(storage, tars, store, item["name"], columns):
            try:
                where = f"{row['key']} of shard {item['name']}"
                image = decode_image(row.pop("image_bytes"), image_size, where)
            except SourceTooSmall:
                raise
            except Exception:
                skips.add(row["key"], "undecodable image", item["name"])
                continue
            yield {"image": image, **row}

    return ray.data.from_items(
        [{"name": n} for n in names], override_num_blocks=len(names)
    ).flat_map(read)


def changed_sources(
    records: dict[str, dict[str, Any]], versions: dict[str, dict[str, Any]]
) -> list[str]:
    """The shards whose completion record names another version of its source tar than
    ``versions`` (a :class:`~pipeline.data.shard_set.ShardSet`'s, by shard name) shows, or whose
    tar is gone (records without a version are trusted)."""
    return sorted(
        name
        for name, record in records.items()
        if record.get("source_version")
        and versions.get(name, {}).get("version") != record["source_version"]
    )


def same_place(a: str, b: str) -> bool:
    """Whether two URLs name the same folder (local paths compared absolute)."""
    if is_local(a) and is_local(b):
        strip = lambda u: u[len("file://") :] if u.startswith("file://") else u  # noqa: E731
        return os.path.abspath(strip(a)) == os.path.abspath(strip(b))
    return a.rstrip("/") == b.rstrip("/")
