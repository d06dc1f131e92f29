"""The one reader of source tars (pipeline/data/reader.py), as every stage uses it: bad samples
skipped and counted by reason; a truncated tar told from a file that is not a tar; storage
failures raised, never taken for the end of a tar; the image stages' reader the same."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from conftest import Root
from faults import Fault
from PIL import Image

from pipeline.data.reader import Skips, read_samples
from pipeline.data.shard_set import TarLocator
from pipeline.data.shards import ShardWriter, sample_key, shard_urls
from pipeline.embed.store import EmbeddingStore, iter_shard_with_embeddings, to_table
from pipeline.storage import Storage, StorageError, StorageOptions, join


def _jpeg(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (value, 0, 0)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _shard(root: Root, n: int = 6) -> str:
    writer = ShardWriter(root.storage, join(root.url, "shards"), 0)
    for i in range(n):
        writer.write(sample_key(0, i, 100), _jpeg(i * 10), f"caption {i}", {})
    writer.write(sample_key(0, n, 100), _jpeg(1), "", {})  # an empty caption
    writer._add(f"{sample_key(0, n + 1, 100)}.txt", b"a caption with no image")
    writer.close()
    return shard_urls(join(root.url, "shards"), 0)["tar"]


@pytest.fixture
def local(tmp_path) -> Root:
    return Root("local", str(tmp_path / "root"), Storage())


def test_bad_samples_are_skipped_and_counted_by_reason(local: Root) -> None:
    skips = Skips()
    samples = list(read_samples(local.storage, _shard(local), skips))
    assert [s.caption for s in samples] == [f"caption {i}" for i in range(6)]
    assert skips.counts == {"missing caption": 1, "missing image": 1}
    assert skips.keys["missing image"] == [sample_key(0, 7, 100)]


def test_a_truncated_tar_keeps_what_is_before_the_cut(local: Root) -> None:
    url = _shard(local)
    data = local.storage.read_bytes(url)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        third = [m for m in archive.getmembers() if m.name.endswith(".jpg")][2]
    local.storage.write_bytes(url, data[: third.offset_data + 50])
    skips = Skips()
    samples = list(read_samples(local.storage, url, skips))
    assert [s.key for s in samples] == [sample_key(0, i, 100) for i in range(2)]
    assert skips.counts == {"truncated tar": 1}


def test_a_file_that_is_not_a_tar_is_named_as_such(local: Root) -> None:
    url = join(local.url, "shards", "00001.tar")
    local.storage.write_bytes(url, b"<html>503 Service Unavailable</html>" * 30)
    skips = Skips()
    assert list(read_samples(local.storage, url, skips)) == []
    assert skips.counts == {"not a tar": 1} and skips.keys["not a tar"] == ["00001.tar:<file>"]


def test_storage_failures_are_raised_not_taken_for_a_short_tar(
    s3_bucket, s3_endpoint, faulty_s3
) -> None:
    direct = Root("s3", f"{s3_bucket}/root", Storage(StorageOptions(endpoint_url=s3_endpoint)))
    url = _shard(direct)
    proxied = Storage(
        StorageOptions(endpoint_url=faulty_s3.url, retries=3, retry_backoff_s=0.01, max_attempts=1)
    )
    faulty_s3.add(Fault("GET", r"/shards/00000\.tar", "reset", times=1))
    skips = Skips()
    assert len(list(read_samples(proxied, url, skips))) == 6 and skips.total() == 2  # retried
    faulty_s3.add(Fault("GET", r"/shards/00000\.tar", "reset", times=None))
    skips = Skips()
    with pytest.raises(StorageError, match=r"cannot read s3://.*00000\.tar") as info:
        list(read_samples(proxied, url, skips))
    assert info.value.transient and "truncated tar" not in skips.counts


def test_the_image_stages_reader_fails_loudly_on_a_missing_tar(local: Root) -> None:
    """The decoder's and upsampler's reader used to swallow every error with a warning (an S3
    error or a missing tar meant silently training on less)."""
    url = _shard(local)
    store = EmbeddingStore(local.storage, join(local.url, "embeddings", "x"))
    store.open_for_writing(
        {"embed_dim": 4, "tokenizer": {"context_length": 3}, "source": join(local.url, "shards")}
    )
    keys = [sample_key(0, i, 100) for i in range(6)]
    vectors = np.ones((6, 4), np.float32)
    table = to_table(keys, ["c"] * 6, vectors, vectors, np.zeros((6, 3), np.int32))
    store.write_shard("00000", table, {"source": url, "skipped": {}, "skipped_keys": {}})
    rows = list(
        iter_shard_with_embeddings(
            local.storage, TarLocator(join(local.url, "shards")), store, "00000"
        )
    )
    assert [r["key"] for r in rows] == keys
    local.storage.remove(url)
    with pytest.raises(StorageError, match=r"00000\.tar: no such file"):
        list(
            iter_shard_with_embeddings(
                local.storage, TarLocator(join(local.url, "shards")), store, "00000"
            )
        )


def test_a_source_smaller_than_the_stage_is_refused_naming_shard_and_key() -> None:
    """An image stage never upscales: a 64 px source for a 256 px stage fails naming the shard
    and the key; a larger one is downscaled; a broken one is still skipped and counted."""
    from pipeline.embed.store import SourceTooSmall
    from pipeline.train.sources import TarImages

    def png(side: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (side, side), (200, 10, 10)).save(buffer, format="PNG")
        return buffer.getvalue()

    source = TarImages(pieces=(), storage=StorageOptions(), image_size=256)
    with pytest.raises(
        SourceTooSmall, match=r"000030007 of shard 00003 is 64×64 px, smaller than the 256"
    ):
        source.decode(("000030007", png(64), "", "00003"))
    assert source.decode(("000030008", png(512), "", "00003"))["image"].shape == (256, 256, 3)
    assert source.decode(("000030009", b"not an image", "", "00003")) is None
    assert source.skips.counts == {"undecodable image": 1}
