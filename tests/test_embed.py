"""The embedding job on Ray with the tiny CLIP, on local disk and on the S3 endpoint: embeddings
equal the bare model's, reruns resume exactly once, bad samples are counted and skipped, a store from
another CLIP is refused, the readers stream rows and images matched by key, clip-retrieval imports."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import Root
from helpers import (
    TINY_CLIP_CONFIG,
    embed_cfg,
    tiny_clip_checkpoint,
    tiny_clip_source,
    write_synth,
)
from PIL import Image

from jobs import embed as embed_job
from pipeline.data.shards import ShardWriter, iter_tar_samples, sample_key, shard_urls
from pipeline.embed import clip_model
from pipeline.embed.clip_retrieval import import_folder
from pipeline.embed.job import run_embedding
from pipeline.embed.store import EmbeddingStore, column_array, image_dataset
from pipeline.errors import UserFacingError
from pipeline.stage_config import EmbedConfig
from pipeline.storage import Storage, basename


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory) -> str:
    return tiny_clip_checkpoint(str(tmp_path_factory.mktemp("clip") / "tiny.safetensors"), 0)


def test_embeddings_equal_the_bare_model(storage_root: Root, ray_local, clip_checkpoint) -> None:
    write_synth(storage_root, 20, 8)
    summary = run_embedding(embed_cfg(storage_root, clip_checkpoint), storage_root.storage)
    assert (summary["shards"], summary["rows"], summary["skipped"]) == (3, 20, 0)
    store = EmbeddingStore(storage_root.storage, summary["store"])
    manifest = store.manifest()
    assert manifest["embed_dim"] == 64 and manifest["dtype"] == "float16"
    assert manifest["tokenizer"]["context_length"] == 32
    assert manifest["clip"]["checkpoint_sha256"] and set(manifest["shards"]) == {
        "00000",
        "00001",
        "00002",
    }
    # Where the CLIP is, so generation and evaluation load it without being told.
    assert manifest["clip_source"] == {
        "model": "tiny-clip",
        "pretrained": os.path.abspath(clip_checkpoint),
        "model_config": os.path.abspath(TINY_CLIP_CONFIG),
    }

    loaded = clip_model.load_clip(tiny_clip_source(clip_checkpoint), clip_checkpoint)
    import open_clip

    _, _, preprocess = open_clip.create_model_and_transforms(
        "tiny-clip", pretrained=clip_checkpoint
    )
    table = store.read_shard("00001")
    by_key = {k: i for i, k in enumerate(table.column("key").to_pylist())}
    image_emb, text_emb = column_array(table, "image_emb"), column_array(table, "text_emb")
    tokens = column_array(table, "text_tokens")
    samples = list(
        iter_tar_samples(storage_root.storage, shard_urls(f"{storage_root.url}/shards", 1)["tar"])
    )
    assert sorted(by_key) == sorted(s["__key__"] for s in samples)
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(io.BytesIO(s["jpg"]))) for s in samples])
        bare_img = torch.nn.functional.normalize(loaded.model.encode_image(pixels), dim=-1)
        bare_tok = loaded.tokenizer([s["txt"].decode() for s in samples])
        bare_txt = torch.nn.functional.normalize(loaded.model.encode_text(bare_tok), dim=-1)
    order = [by_key[s["__key__"]] for s in samples]
    np.testing.assert_allclose(image_emb[order].astype(np.float32), bare_img.numpy(), atol=2e-3)
    np.testing.assert_allclose(text_emb[order].astype(np.float32), bare_txt.numpy(), atol=2e-3)
    assert (tokens[order] == bare_tok.numpy()).all()
    assert np.allclose(np.linalg.norm(image_emb.astype(np.float32), axis=1), 1, atol=2e-3)

    # The prior reads columns as a Ray Dataset; the image stages images beside embeddings, by key.
    rows = store.dataset(columns=["key", "text_emb"]).take_all()
    assert len(rows) == 20 and set(rows[0]) == {"key", "text_emb"}
    images = image_dataset(
        storage_root.storage, f"{storage_root.url}/shards", store, image_size=32
    ).take_all()
    assert len(images) == 20
    for row in images[:5]:
        i = by_key.get(row["key"])
        assert row["image"].shape == (32, 32, 3)
        if i is not None:
            np.testing.assert_array_equal(np.asarray(row["image_emb"]), image_emb[i])


def test_interrupted_run_resumes_exactly_once(
    storage_root: Root, ray_local, clip_checkpoint, monkeypatch
) -> None:
    write_synth(storage_root, 40, 8)
    cfg = embed_cfg(storage_root, clip_checkpoint)
    original = EmbeddingStore.write_record
    published = []

    def dying_record(self, name, record):  # the driver dies after recording two shards
        if len(published) == 2:
            raise KeyboardInterrupt("killed after two shards")
        published.append(name)
        return original(self, name, record)

    monkeypatch.setattr(EmbeddingStore, "write_record", dying_record)
    with pytest.raises(KeyboardInterrupt):
        run_embedding(cfg, storage_root.storage)
    monkeypatch.setattr(EmbeddingStore, "write_record", original)

    store = EmbeddingStore.locate(storage_root.storage, f"{storage_root.url}/embeddings")
    first = store.completed()
    assert sorted(first) == sorted(published) and len(first) == 2
    before = {n: storage_root.storage.read_bytes(store.shard_file(n)) for n in first}

    summary = run_embedding(cfg, storage_root.storage)
    assert summary["shards_encoded_now"] == 3 and summary["rows"] == 40
    for name, data in before.items():  # completed shards are not recomputed
        assert storage_root.storage.read_bytes(store.shard_file(name)) == data
        assert store.completed()[name]["written_at"] == first[name]["written_at"]
    keys = store.read_all(["key"]).column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 40

    again = run_embedding(cfg, storage_root.storage)  # nothing left to do
    assert again["shards_encoded_now"] == 0 and again["rows"] == 40


def _jpeg(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def _bad_shards(root: Root) -> None:
    """Shard 0: 4 good samples, a corrupt image, an empty and a missing caption.
    Shard 1: 6 good samples, truncated in the middle of the last one."""
    folder = f"{root.url}/shards"
    writer = ShardWriter(root.storage, folder, 0)
    for i in range(4):
        writer.write(sample_key(0, i, 100), _jpeg((40 * i, 80, 120)), f"a red square {i}", {})
    writer.write(sample_key(0, 4, 100), b"\xff\xd8\xff not a jpeg at all", "a broken image", {})
    writer.write(sample_key(0, 5, 100), _jpeg((1, 2, 3)), "   ", {})
    writer._add(f"{sample_key(0, 6, 100)}.jpg", _jpeg((9, 9, 9)))  # an image with no caption
    writer.close()
    writer = ShardWriter(root.storage, folder, 1)
    for i in range(6):
        writer.write(sample_key(1, i, 100), _jpeg((10, 20 * i, 30)), f"a blue circle {i}", {})
    writer.close()
    tar = shard_urls(folder, 1)["tar"]
    data = root.storage.read_bytes(tar)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        last_image = [m for m in archive.getmembers() if m.name.endswith(".jpg")][-1]
    root.storage.write_bytes(tar, data[: last_image.offset_data + 100])  # cut into the last image


def test_bad_samples_are_counted_and_skipped(
    storage_root: Root, ray_local, clip_checkpoint
) -> None:
    _bad_shards(storage_root)
    summary = run_embedding(embed_cfg(storage_root, clip_checkpoint), storage_root.storage)
    store = EmbeddingStore(storage_root.storage, summary["store"])
    records = store.completed()
    assert records["00000"]["rows"] == 4
    assert records["00000"]["skipped"] == {
        "undecodable image": 1,
        "missing caption": 2,
    }
    assert records["00000"]["skipped_keys"]["undecodable image"] == [sample_key(0, 4, 100)]
    assert sorted(records["00000"]["skipped_keys"]["missing caption"]) == [
        sample_key(0, 5, 100),
        sample_key(0, 6, 100),
    ]
    assert records["00001"]["skipped"] == {"truncated tar": 1}
    assert records["00001"]["rows"] == 5
    assert store.manifest()["skipped"] == 4
    captions = store.read_all(["caption"]).column("caption").to_pylist()
    assert all(c.startswith(("a red square", "a blue circle")) for c in captions)


def test_a_store_from_another_clip_is_refused(tmp_path, ray_local, clip_checkpoint) -> None:
    root = Root("local", str(tmp_path), Storage())
    write_synth(root, 8, 8)
    run_embedding(embed_cfg(root, clip_checkpoint, clip_id="shared"), root.storage)
    other = tiny_clip_checkpoint(str(tmp_path / "other.safetensors"), 1)
    with pytest.raises(UserFacingError, match="was made with another CLIP: its clip is"):
        run_embedding(embed_cfg(root, other, clip_id="shared"), root.storage)
    # left alone: another CLIP gets its own store by default
    summary = run_embedding(embed_cfg(root, other), root.storage)
    assert summary["store"].endswith(
        "tiny-clip--ckpt-"
        + clip_model.identity(tiny_clip_source(other), other).checkpoint_sha256[:12]
    )


def test_clip_retrieval_import_round_trips(
    storage_root: Root, ray_local, clip_checkpoint, capsys
) -> None:
    write_synth(storage_root, 12, 6)
    summary = run_embedding(embed_cfg(storage_root, clip_checkpoint), storage_root.storage)
    original = EmbeddingStore(storage_root.storage, summary["store"]).read_all()

    # Export the store as clip-retrieval would have written it, with one caption missing.
    export = f"{storage_root.url}/clip-retrieval"
    s = storage_root.storage
    captions = original.column("caption").to_pylist()
    captions[3] = None
    for part, (lo, hi) in enumerate(((0, 7), (7, 12))):
        for column, folder in (("image_emb", "img_emb"), ("text_emb", "text_emb")):
            buffer = io.BytesIO()
            np.save(buffer, column_array(original, column)[lo:hi])
            s.write_bytes(f"{export}/{folder}/{folder}_{part}.npy", buffer.getvalue())
        meta = pa.table(
            {"key": original.column("key").to_pylist()[lo:hi], "caption": captions[lo:hi]}
        )
        sink = pa.BufferOutputStream()
        pq.write_table(meta, sink)
        s.write_bytes(f"{export}/metadata/metadata_{part}.parquet", sink.getvalue().to_pybytes())

    code = embed_job.main(
        [
            f"root={storage_root.url}",
            "store=imported",
            "clip.pretrained=null",
            *([f"storage.endpoint_url={s.options.endpoint_url}"] if s.options.endpoint_url else []),
            "--import-clip-retrieval",
            export,
        ]
    )
    assert code == 0
    assert "import: 11 rows" in capsys.readouterr().out
    imported = EmbeddingStore.locate(s, f"{storage_root.url}/imported")
    assert imported.completed()["clip-retrieval-00000"]["skipped"] == {"missing caption": 1}
    table = imported.read_all()
    keep = [i for i in range(12) if i != 3]
    assert table.column("key").to_pylist() == [original.column("key").to_pylist()[i] for i in keep]
    for column in ("image_emb", "text_emb", "text_tokens"):
        np.testing.assert_array_equal(
            column_array(table, column), column_array(original, column)[keep]
        )
    # A second import finds every part done.
    assert (
        import_folder(
            EmbedConfig(
                root=storage_root.url,
                storage=s.options,
                store="imported",
                clip=tiny_clip_source(None),
                import_clip_retrieval=export,
            ),
            s,
        )["rows_imported_now"]
        == 0
    )


def test_wrong_embedding_dimensions_are_named(tmp_path) -> None:
    s = Storage()
    export = str(tmp_path / "cr")
    for folder in ("img_emb", "text_emb"):
        buffer = io.BytesIO()
        np.save(buffer, np.ones((2, 48), np.float16))
        s.write_bytes(f"{export}/{folder}/{folder}_0.npy", buffer.getvalue())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"caption": ["a", "b"]}), sink)
    s.write_bytes(f"{export}/metadata/metadata_0.parquet", sink.getvalue().to_pybytes())
    cfg = EmbedConfig(root=str(tmp_path), clip=tiny_clip_source(None), import_clip_retrieval=export)
    with pytest.raises(
        UserFacingError,
        match=r"img_emb_0\.npy: embeddings have 48 dimensions but tiny-clip makes 64",
    ):
        import_folder(cfg, s)


def test_embed_without_shards_is_a_clear_error(tmp_path, capsys) -> None:
    assert embed_job.main([f"root={tmp_path}"]) == 1
    assert f"no complete shards at {tmp_path}/shards" in capsys.readouterr().err


def test_completion_records_come_from_the_index_and_what_changed_since(
    storage_root: Root, json_reads: list[str]
) -> None:
    """The compacted index answers for the records it holds at their indexed version; a record
    rewritten or added since is read from storage; a damaged index falls back to the records."""
    store = EmbeddingStore(storage_root.storage, f"{storage_root.url}/embeddings/idx")
    for i in range(5):
        store.write_record(f"{i:05d}", {"rows": i, "skipped": {}})
    assert store.write_index()["00003"] == {"rows": 3, "skipped": {}}
    store.write_record("00002", {"rows": 20, "skipped": {}})  # rewritten since the index
    store.write_record("00009", {"rows": 9, "skipped": {}})  # added since
    json_reads.clear()
    store = EmbeddingStore(storage_root.storage, store.url)  # another process's view
    records = store.completed()
    assert {n: r["rows"] for n, r in records.items()} == {
        "00000": 0,
        "00001": 1,
        "00002": 20,
        "00003": 3,
        "00004": 4,
        "00009": 9,
    }
    assert sorted(basename(url) for url in json_reads) == ["00002.json", "00009.json"]
    storage_root.storage.write_bytes(f"{store.url}/done-index.parquet", b"not a parquet")
    json_reads.clear()
    assert store.completed() == records and len(json_reads) == 6
