"""The embedding job under real faults and bad input: storage that drops connections (a proxy in
front of the S3 endpoint, :mod:`faults`), a store asked to mix sources, files that are not tars,
a CLIP that gives NaN for some captions."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from conftest import Root
from faults import Fault
from helpers import embed_cfg, tiny_clip_checkpoint, tiny_clip_source, write_synth
from PIL import Image

from pipeline.data.shards import ShardWriter, completed_shards, sample_key, shard_urls
from pipeline.embed import clip_model
from pipeline.embed.encoder import embedding_problems
from pipeline.embed.job import run_embedding
from pipeline.embed.store import EmbeddingStore, image_dataset
from pipeline.errors import UserFacingError
from pipeline.storage import Storage, StorageOptions, join

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory) -> str:
    return tiny_clip_checkpoint(str(tmp_path_factory.mktemp("clip") / "tiny.safetensors"), 0)


@pytest.fixture
def roots(s3_bucket: str, s3_endpoint: str, faulty_s3) -> tuple[Root, Root]:
    """The same S3 root twice: straight to the endpoint (to set up and check) and through the
    fault-injecting proxy (what the job under test uses, its Ray workers included)."""
    url = f"{s3_bucket}/root"
    direct = Root("s3", url, Storage(StorageOptions(endpoint_url=s3_endpoint)))
    proxied = Root(
        "s3",
        url,
        Storage(StorageOptions(endpoint_url=faulty_s3.url, retries=3, retry_backoff_s=0.05)),
    )
    return direct, proxied


def _keys(store: EmbeddingStore) -> list[str]:
    return store.read_all(["key"]).column("key").to_pylist()


def test_a_dropped_connection_is_retried_and_every_key_lands_once(
    roots, faulty_s3, clip_checkpoint
) -> None:
    direct, proxied = roots
    write_synth(direct, 32, 8)
    fault = faulty_s3.add(Fault("GET", r"shards/00002\.tar", "reset", times=1))
    summary = run_embedding(embed_cfg(proxied, clip_checkpoint), proxied.storage)
    assert fault.hits == 1
    assert (summary["shards"], summary["rows"], summary["skipped"]) == (4, 32, 0)
    keys = _keys(EmbeddingStore(direct.storage, summary["store"]))
    assert len(keys) == len(set(keys)) == 32  # no row lost, none twice, nothing "truncated"


def test_a_shard_that_keeps_failing_is_named_and_left_for_the_rerun(
    roots, faulty_s3, clip_checkpoint
) -> None:
    direct, proxied = roots
    write_synth(direct, 32, 8)
    fault = faulty_s3.add(Fault("GET", r"shards/00001\.tar", "reset", times=None))
    with pytest.raises(UserFacingError, match=r"1 of 4 source shards failed.*00001: cannot read"):
        run_embedding(embed_cfg(proxied, clip_checkpoint), proxied.storage)
    assert fault.hits >= 3  # every try
    store = EmbeddingStore.locate(direct.storage, join(direct.url, "embeddings"))
    assert sorted(store.completed()) == ["00000", "00002", "00003"]  # no record for 00001

    faulty_s3.clear()  # the storage heals; the rerun does just that shard
    summary = run_embedding(embed_cfg(proxied, clip_checkpoint), proxied.storage)
    assert (summary["shards_encoded_now"], summary["shards"], summary["rows"]) == (1, 4, 32)
    keys = _keys(store)
    assert len(keys) == len(set(keys)) == 32


def _jpeg(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def _write(root: Root, folder: str, shard: int, captions: list[str], seed: int = 0) -> None:
    writer = ShardWriter(root.storage, join(root.url, folder), shard)
    for i, caption in enumerate(captions):
        writer.write(sample_key(shard, i, 100), _jpeg((seed * 40, 20 * i, 90)), caption, {})
    writer.close()


def test_a_store_is_bound_to_its_source_shards(tmp_path, clip_checkpoint) -> None:
    root = Root("local", str(tmp_path / "root"), Storage())
    for folder, seed in (("shards", 0), ("other", 1)):  # the same keys, other images
        for shard in range(2):
            _write(root, folder, shard, [f"a red square {i}" for i in range(4)], seed)
    cfg = embed_cfg(root, clip_checkpoint, clip_id="shared")
    summary = run_embedding(cfg, root.storage)
    record = EmbeddingStore(root.storage, summary["store"]).completed()["00000"]
    tar = shard_urls(join(root.url, "shards"), 0)["tar"]
    assert record["source_size"] == os.path.getsize(tar) and record["source_version"]

    with pytest.raises(
        UserFacingError, match=r"holds the source shards at .*/shards, not .*/other"
    ):
        run_embedding(embed_cfg(root, clip_checkpoint, clip_id="shared", shards="other"))
    store = EmbeddingStore(root.storage, summary["store"])
    with pytest.raises(UserFacingError, match=r"was made from the source shards at .*/shards"):
        image_dataset(root.storage, join(root.url, "other"), store, image_size=64)

    # A source tar rewritten after it was embedded: readers refuse it, the rerun encodes it again.
    _write(root, "shards", 1, [f"a blue circle {i}" for i in range(4)], 2)
    with pytest.raises(UserFacingError, match=r"1 source shards .* changed .*\(00001\)"):
        image_dataset(root.storage, join(root.url, "shards"), store, image_size=64)
    again = run_embedding(cfg, root.storage)
    assert again["shards_encoded_now"] == 1 and again["rows"] == 8
    captions = store.read_shard("00001", ["caption"]).column("caption").to_pylist()
    assert captions == [f"a blue circle {i}" for i in range(4)]
    image_dataset(root.storage, join(root.url, "shards"), store, image_size=64)  # consistent now


def test_a_file_that_is_not_a_tar_says_so(tmp_path, clip_checkpoint) -> None:
    root = Root("local", str(tmp_path / "root"), Storage())
    _write(root, "shards", 0, ["a red square", "a blue circle"])
    _write(root, "shards", 1, ["a green star"])
    with open(shard_urls(join(root.url, "shards"), 1)["tar"], "wb") as handle:
        handle.write(b"<html>an error page saved as a tar</html>" * 40)
    assert completed_shards(root.storage, join(root.url, "shards")) == [0, 1]
    summary = run_embedding(embed_cfg(root, clip_checkpoint), root.storage)
    records = EmbeddingStore(root.storage, summary["store"]).completed()
    assert records["00001"]["skipped"] == {"not a tar": 1} and records["00001"]["rows"] == 0
    assert records["00000"]["rows"] == 2 and summary["skipped"] == 1


def test_non_finite_embeddings_are_skipped_and_counted(tmp_path) -> None:
    """A CLIP whose token embedding for "zebra" is NaN: every caption with that word encodes to
    NaN; those rows are skipped with their keys, the others kept."""
    from safetensors.torch import load_file, save_file

    path = tiny_clip_checkpoint(str(tmp_path / "nan.safetensors"), 0)
    weights = load_file(path)
    zebra = int(clip_model.tokenizer(tiny_clip_source(path))(["zebra"])[0][1])
    weights["token_embedding.weight"][zebra] = float("nan")
    save_file(weights, path)

    root = Root("local", str(tmp_path / "root"), Storage())
    _write(root, "shards", 0, ["a red square", "a zebra", "a blue circle", "two zebra stripes"])
    summary = run_embedding(embed_cfg(root, path), root.storage)
    record = EmbeddingStore(root.storage, summary["store"]).completed()["00000"]
    assert record["rows"] == 2 and record["skipped"] == {"non-finite embedding": 2}
    assert record["skipped_keys"]["non-finite embedding"] == [
        sample_key(0, 1, 100),
        sample_key(0, 3, 100),
    ]
    table = EmbeddingStore(root.storage, summary["store"]).read_shard("00000")
    assert np.isfinite(np.stack(table.column("image_emb").to_numpy(zero_copy_only=False))).all()


def test_embedding_problems_names_each_bad_row() -> None:
    good = np.ones((1, 4), np.float32)
    image = np.concatenate([good, np.zeros((1, 4)), good, good])
    text = np.concatenate([good, good, np.full((1, 4), np.inf), good])
    assert embedding_problems(image, text) == ["", "zero embedding", "non-finite embedding", ""]
