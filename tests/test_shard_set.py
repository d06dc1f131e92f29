"""Source shards from anywhere: a folder of plain webdataset tars (no img2dataset stats), glob and
brace patterns, the completeness rule, names below subfolders, and the jobs that read them (the
embedding job, its rerun after a tar changed, the upsampler's pieces counted on the cluster)."""

from __future__ import annotations

import io
import logging
import tarfile

import numpy as np
import pytest
from conftest import Root
from helpers import embed_cfg, tiny_clip_checkpoint
from PIL import Image

from pipeline.data import shard_set
from pipeline.data.shard_set import expand_braces, list_shards, sample_counts
from pipeline.embed.job import run_embedding
from pipeline.embed.store import EmbeddingStore
from pipeline.errors import UserFacingError
from pipeline.storage import Storage, join


def _png(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def plain_tar(root: Root, rel: str, keys: list[str]) -> str:
    """A webdataset tar as another tool writes it: ``{key}.png`` and ``{key}.txt``, no stats."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for i, key in enumerate(keys):
            for ext, data in (("png", _png(i)), ("txt", f"a picture {key}".encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    url = join(root.url, rel)
    root.storage.write_bytes(url, out.getvalue())
    return url


def test_braces_expand_as_webdataset_writes_them() -> None:
    assert expand_braces("s/{000..003}.tar") == [f"s/{i:03d}.tar" for i in range(4)]
    assert expand_braces("{a,b}/p-{1..2}.tar") == [
        "a/p-1.tar",
        "a/p-2.tar",
        "b/p-1.tar",
        "b/p-2.tar",
    ]
    assert expand_braces("x{a,b{1,2}}") == ["xa", "xb1", "xb2"]
    assert expand_braces("{8..10}") == ["8", "9", "10"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert expand_braces("{x}.tar") == ["{x}.tar"]


def test_a_folder_of_plain_tars_is_complete_as_listed(storage_root: Root) -> None:
    for name in ("b", "a", "c"):
        plain_tar(storage_root, f"wds/{name}.tar", ["k0", "k1"])
    storage_root.storage.write_bytes(join(storage_root.url, "wds", "notes.txt"), b"not a shard")
    shards = list_shards(storage_root.storage, join(storage_root.url, "wds"))
    assert shards.names == ["a", "b", "c"] and not shards.stats
    assert shards.tars["a"] == join(storage_root.url, "wds", "a.tar")
    assert all(v["size"] > 0 and v["version"] for v in shards.versions.values())
    assert shards.locator()("b") == join(storage_root.url, "wds", "b.tar")


def test_img2dataset_layout_counts_a_tar_only_with_its_stats(
    storage_root: Root, ray_local, caplog
) -> None:
    from helpers import write_synth

    write_synth(storage_root, 12, 4)  # shards 00000..00002 with stats
    folder = join(storage_root.url, "shards")
    storage_root.storage.remove(join(folder, "00001_stats.json"))  # its writer died
    with caplog.at_level(logging.INFO, logger="pipeline.data.shard_set"):
        shards = list_shards(storage_root.storage, folder)
    assert shards.names == ["00000", "00002"] and set(shards.stats) == {"00000", "00002"}
    assert "1 tars under" in caplog.text and "00001.tar" in caplog.text
    assert sample_counts(storage_root.storage, shards) == {"00000": 4, "00002": 4}


def test_glob_and_brace_patterns_name_shards_below_subfolders(tmp_path, caplog) -> None:
    root = Root("local", str(tmp_path), Storage())
    for part in ("part-0", "part-1"):
        for i in range(3):
            plain_tar(root, f"laion/{part}/{i:05d}.tar", [f"{part}-{i}-{k}" for k in range(2)])
    plain_tar(root, "laion/other/00000.tar", ["o"])

    deep = list_shards(root.storage, join(root.url, "laion/part-*/*.tar"))
    assert deep.names == [f"part-{p}__{i:05d}" for p in (0, 1) for i in range(3)]
    assert deep.locator()("part-1__00002") == join(root.url, "laion/part-1/00002.tar")
    assert list_shards(root.storage, join(root.url, "laion/**/00000.tar")).names == [
        "other__00000",
        "part-0__00000",
        "part-1__00000",
    ]
    assert list_shards(root.storage, join(root.url, "laion/part-0/0000[02].tar")).names == [
        "00000",
        "00002",
    ]
    with caplog.at_level(logging.WARNING, logger="pipeline.data.shard_set"):
        braced = list_shards(root.storage, join(root.url, "laion/part-{0..1}/{00001..00004}.tar"))
    assert braced.names == ["part-0__00001", "part-0__00002", "part-1__00001", "part-1__00002"]
    assert "4 of the 8 shards" in caplog.text and "part-0/00003.tar" in caplog.text

    with pytest.raises(
        UserFacingError, match=r"no complete shards matching 'nope-\*\.tar'.*shards"
    ):
        list_shards(root.storage, join(root.url, "laion/nope-*.tar"))
    plain_tar(root, "laion/part-0__00000.tar", ["clash"])
    with pytest.raises(UserFacingError, match=r"two source tars are both named 'part-0__00000'"):
        list_shards(root.storage, join(root.url, "laion/**.tar"))


def test_plain_tars_are_counted_on_the_cluster_once(tmp_path, ray_local, monkeypatch) -> None:
    root = Root("local", str(tmp_path), Storage())
    for i, n in enumerate((3, 5, 2)):
        plain_tar(root, f"wds/{i}.tar", [f"s{i}-{k}" for k in range(n)])
    cache = join(root.url, "run", "source-counts.parquet")
    shards = list_shards(root.storage, join(root.url, "wds"))
    assert sample_counts(root.storage, shards, cache) == {"0": 3, "1": 5, "2": 2}

    counted = []
    real = shard_set.count_on_ray
    monkeypatch.setattr(
        shard_set, "count_on_ray", lambda s, named: counted.extend(named) or real(s, named)
    )
    assert sample_counts(root.storage, shards, cache) == {"0": 3, "1": 5, "2": 2}
    assert counted == []  # all from the cache
    plain_tar(root, "wds/1.tar", ["only"])  # rewritten: another version
    shards = list_shards(root.storage, join(root.url, "wds"))
    assert sample_counts(root.storage, shards, cache) == {"0": 3, "1": 1, "2": 2}
    assert [name for name, _ in counted] == ["1"]


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory) -> str:
    return tiny_clip_checkpoint(str(tmp_path_factory.mktemp("clip") / "tiny.safetensors"), 0)


def test_embed_and_upsampler_read_plain_tars_by_pattern(
    storage_root: Root, ray_local, clip_checkpoint
) -> None:
    from pipeline.stage_config import UpsamplerConfig
    from pipeline.train.stages import prepare_upsampler

    sizes = {"a/00000": 3, "a/00001": 4, "b/00000": 2}
    for rel, n in sizes.items():
        plain_tar(
            storage_root, f"wds/{rel}.tar", [f"{rel.replace('/', '-')}-{k}" for k in range(n)]
        )
    pattern = "wds/{a,b}/*.tar"
    summary = run_embedding(embed_cfg(storage_root, clip_checkpoint, shards=pattern))
    assert (summary["shards"], summary["rows"], summary["skipped"]) == (3, 9, 0)
    store = EmbeddingStore(storage_root.storage, summary["store"])
    records = store.completed()
    assert {n: r["rows"] for n, r in records.items()} == {
        "a__00000": 3,
        "a__00001": 4,
        "b__00000": 2,
    }
    assert records["a__00001"]["source"] == join(storage_root.url, "wds/a/00001.tar")
    assert store.manifest()["source"] == join(storage_root.url, pattern)

    again = run_embedding(embed_cfg(storage_root, clip_checkpoint, shards=pattern))
    assert again["rows_encoded_now"] == 0
    plain_tar(storage_root, "wds/b/00000.tar", ["b-00000-0", "b-00000-1", "b-00000-new"])
    third = run_embedding(embed_cfg(storage_root, clip_checkpoint, shards=pattern))
    assert third["rows_encoded_now"] == 3  # only the changed tar, encoded again
    assert store.completed()["b__00000"]["rows"] == 3
    assert store.check_source(join(storage_root.url, pattern)).names == sorted(records)

    cfg = UpsamplerConfig(
        root=storage_root.url, storage=storage_root.storage.options, shards=pattern, run="up"
    )
    cfg.model.low_res, cfg.model.high_res = 16, 32
    source, _ = prepare_upsampler(cfg, storage_root.storage)
    assert [(p.name, p.slots) for p in source.pieces] == [
        ("a__00000", 3),
        ("a__00001", 4),
        ("b__00000", 3),
    ]
    rows = dict(source.rows(1, 0, {0, 3}))
    assert sorted(rows) == [0, 3] and rows[3][0] == "a-00001-3"
    assert source.decode(rows[3])["image"].shape == (32, 32, 3)
