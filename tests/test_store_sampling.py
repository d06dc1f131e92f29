"""A seeded sample of the embedding store read a bounded number of files at a time
(``pipeline.embed.sampling``), which the autoregressive prior's PCA is fitted on: the plan's sizes
and bounds at LAION size, its rows drawn with equal probability, the sample's size, determinism, no
repeated row, its means against the store's on a store whose files differ, the files it reads, and
``prepare_prior`` drawing it without reading the whole store."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tiny_cascade import prior_cfg

from pipeline.embed import sampling
from pipeline.embed.sampling import plan_sample, sample_arrays, sample_rows
from pipeline.embed.store import EmbeddingStore, column_array, to_table
from pipeline.storage import Storage, join
from pipeline.train import stages

D = 8  # embedding dim of the test store
FILES = 200


def _sizes(count: int, low: int, high: int, seed: int = 0) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    return {f"{i:06d}": int(r) for i, r in enumerate(rng.integers(low, high, count))}


# ----------------------------------------------------------------------------------------------
# The plan (pure)


def test_few_files_are_all_read_each_in_proportion_to_its_rows() -> None:
    rows = {**_sizes(50, 10, 400), "empty": 0}
    total = sum(rows.values())
    plan = plan_sample(rows, 1000, seed=3)
    assert set(plan) == set(rows) - {"empty"} and sum(plan.values()) == 1000
    for name, count in plan.items():
        assert abs(count - 1000 * rows[name] / total) < 1
    assert plan == plan_sample(rows, 1000, seed=3)
    assert plan_sample(rows, 10 * total, seed=3) == {k: v for k, v in rows.items() if v}
    assert plan_sample({"a": 0}, 10, seed=0) == {}


@pytest.mark.parametrize(
    "files, low, high, expect_files",
    [
        (200_000, 9_000, 11_000, 256),  # LAION: 200k store files of ~10k rows
        (20_000, 90, 110, 2_000),  # small files: enough of them to hold twice the sample
        (2_000, 90, 110, 2_000),  # fewer rows than twice the sample: every file
    ],
)
def test_the_files_read_are_bounded_whatever_the_store_size(files, low, high, expect_files):
    rows = _sizes(files, low, high)
    total = sum(rows.values())
    plan = plan_sample(rows, 100_000, seed=0)
    assert sum(plan.values()) == min(100_000, total)
    assert all(0 < count <= rows[name] for name, count in plan.items())
    bound = max(sampling.MAX_SHARDS, math.ceil(2 * 100_000 * files / total))
    assert len(plan) <= bound and len(plan) >= 0.95 * expect_files
    assert plan == plan_sample(rows, 100_000, seed=0)
    assert plan != plan_sample(rows, 100_000, seed=1)


def test_every_row_is_drawn_with_the_same_probability() -> None:
    """Files chosen in proportion to their rows, the same rows from each: over many seeds, the rows
    a file gives average ``n·rows/R`` for small files and large alike (a plan that chose files
    with equal probability would give the smallest quarter about half its share)."""
    rows = _sizes(1000, 100, 500, seed=1)
    names = sorted(rows)
    sizes = np.array([rows[n] for n in names])
    n, seeds = 3000, 500
    drawn = np.zeros(len(names))
    for seed in range(seeds):
        plan = plan_sample(rows, n, seed, max_shards=40)
        assert len(plan) == 40 and sum(plan.values()) == n
        drawn += [plan.get(name, 0) for name in names]
    expected = seeds * n * sizes / sizes.sum()
    quarter = np.argsort(sizes).reshape(4, -1)
    ratios = [drawn[q].sum() / expected[q].sum() for q in quarter]
    assert all(abs(r - 1) < 0.06 for r in ratios), ratios


# ----------------------------------------------------------------------------------------------
# Sampling a store


@pytest.fixture(scope="module")
def offset_store(tmp_path_factory) -> dict:
    """A store of ``FILES`` files of 20-160 rows whose means differ: along dim 0 by the file's size
    (large files +, small ones -), along dim 1 by its place in name order, and at random in the
    others; each row is its file's offset plus noise (L2-normalised, float16, as the store keeps)."""
    storage = Storage()
    url = join(str(tmp_path_factory.mktemp("store")), "embeddings", "tiny")
    store = EmbeddingStore(storage, url)
    store.open_for_writing(
        {
            "clip": {"id": "tiny"},
            "embed_dim": D,
            "dtype": "float16",
            "normalization": "l2",
            "tokenizer": {"kind": "open_clip", "model": "tiny", "context_length": 8},
            "source": "synthetic",
        }
    )
    rng = np.random.default_rng(0)
    sizes = rng.integers(20, 160, FILES)
    for i, size in enumerate(sizes):
        offset = rng.normal(0, 0.5, D)
        offset[0] = 1.0 if size > np.median(sizes) else -1.0
        offset[1] = 1.0 if i < FILES // 2 else -1.0
        image = offset + 0.5 * rng.normal(size=(size, D))
        text = -offset + 0.5 * rng.normal(size=(size, D))
        keys = [f"{i:05d}/{j}" for j in range(size)]
        tokens = np.ones((size, 8), np.int32)
        store.write_shard(
            f"{i:05d}", to_table(keys, ["c"] * size, image, text, tokens), {"skipped": {}}
        )
    store.finalize_manifest()
    everything = store.read_all(["image_emb", "text_emb"])
    image = column_array(everything, "image_emb").astype(np.float32)
    per_file = [
        column_array(store.read_shard(f"{i:05d}", ["image_emb"]), "image_emb")
        .astype(np.float32)
        .mean(0)
        for i in range(FILES)
    ]
    return {
        "store": store,
        "root": url.rsplit("/embeddings/", 1)[0],
        "rows": int(sizes.sum()),
        "image_mean": image.mean(0),
        "text_mean": column_array(everything, "text_emb").astype(np.float32).mean(0),
        # what a sampler taking the same rows from files chosen with equal probability would find
        "per_file_mean": np.mean(per_file, axis=0),
    }


def _means(table) -> np.ndarray:
    return column_array(table, "image_emb").astype(np.float32).mean(0)


def test_a_sample_is_seeded_sized_and_never_repeats_a_row(offset_store) -> None:
    store = offset_store["store"]
    columns = ["key", "image_emb"]
    one = sample_rows(store, columns, 500, seed=7, max_shards=32)
    keys = one.column("key").to_pylist()
    assert one.num_rows == 500 and len(set(keys)) == 500
    assert one.column_names == columns
    assert len({k.split("/")[0] for k in keys}) == 32  # no file exceeds R/32 rows: 32 files
    assert one.equals(sample_rows(store, columns, 500, seed=7, max_shards=32, threads=1))
    other = sample_rows(store, columns, 500, seed=8, max_shards=32)
    assert set(keys) != set(other.column("key").to_pylist())
    arrays = sample_arrays(store, ["image_emb"], 500, seed=7, max_shards=32)
    assert arrays["image_emb"].dtype == np.float32
    np.testing.assert_array_equal(arrays["image_emb"], column_array(one, "image_emb"))
    with pytest.raises(ValueError, match="key is not a fixed-width column"):
        sample_arrays(store, ["key"], 10, seed=0)
    everything = sample_rows(store, ["key"], 10**6, seed=0)
    assert sorted(everything.column("key").to_pylist()) == sorted(
        store.read_all(["key"]).column("key").to_pylist()
    )


def test_the_sample_means_are_the_stores(offset_store) -> None:
    """Means of samples of 32 files against the store's, by a z-test over seeds (their spread
    across seeds is the standard error): the files' offsets make a sampler biased towards small
    files, or towards the first ones by name, miss by many standard errors. 600 rows from 32 files
    is under 20 a file, the smallest file's rows: no file is capped."""
    store, truth = offset_store["store"], offset_store["image_mean"]
    errors = np.array(
        [
            _means(sample_rows(store, ["image_emb"], 600, s, max_shards=32)) - truth
            for s in range(20)
        ]
    )
    standard_error = errors.std(0, ddof=1) / math.sqrt(len(errors))
    assert (np.abs(errors.mean(0)) < 4 * standard_error + 1e-3).all(), (
        errors.mean(0),
        standard_error,
    )
    assert (np.abs(errors.mean(0)) < 0.05).all()
    # the test has power: a sampler taking files with equal probability misses dim 0 by far more
    assert abs(offset_store["per_file_mean"][0] - truth[0]) > 4 * standard_error[0]
    assert abs(offset_store["per_file_mean"][0] - truth[0]) > 0.1

    # every file read (few files): a stratified sample, close on its own
    whole = sample_rows(store, ["image_emb", "text_emb"], 2000, seed=1)
    assert whole.column("image_emb").num_chunks == FILES  # every file read
    assert np.abs(_means(whole) - truth).max() < 0.02
    text = column_array(whole, "text_emb").astype(np.float32).mean(0)
    assert np.abs(text - offset_store["text_mean"]).max() < 0.02


def test_sampling_reads_a_bounded_number_of_files(offset_store, monkeypatch) -> None:
    store = offset_store["store"]
    reads = []
    read_shard = EmbeddingStore.read_shard

    def counted(self, name, columns=None):
        reads.append((name, tuple(columns)))
        return read_shard(self, name, columns)

    monkeypatch.setattr(EmbeddingStore, "read_shard", counted)
    bound = max(16, math.ceil(2 * 300 * FILES / offset_store["rows"]))
    table = sample_rows(store, ["image_emb"], 300, seed=0, max_shards=16)
    assert table.num_rows == 300
    assert len(reads) <= bound and len({name for name, _ in reads}) == len(reads)
    assert {columns for _, columns in reads} == {("image_emb",)}
    reads.clear()
    arrays = sample_arrays(store, ["image_emb", "text_emb"], 300, seed=0, max_shards=16)
    assert arrays["image_emb"].shape == arrays["text_emb"].shape == (300, D)
    assert len(reads) <= bound and len({name for name, _ in reads}) == len(reads)
    assert {columns for _, columns in reads} == {("image_emb", "text_emb")}


def test_the_autoregressive_prior_fits_on_a_sample_without_reading_the_store(
    offset_store, monkeypatch
) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("prepare_prior read the whole store")

    monkeypatch.setattr(EmbeddingStore, "read_all", refuse)
    cfg = prior_cfg(offset_store["root"], "autoregressive")
    _, info = stages.prepare_prior(cfg, Storage())
    rows = offset_store["rows"]  # fewer than FIT_ROWS: all of them
    for name, mean in (("fit_image_emb", "image_mean"), ("fit_text_emb", "text_mean")):
        assert info[name].dtype == np.float32 and info[name].shape == (rows, D)
        np.testing.assert_allclose(info[name].mean(0), offset_store[mean], atol=1e-5)
    assert stages.build_prior(cfg, info).fitted

    monkeypatch.setattr(stages, "FIT_ROWS", 100)
    _, again = stages.prepare_prior(cfg, Storage())
    assert again["fit_image_emb"].shape == again["fit_text_emb"].shape == (100, D)
    assert (
        "fit_image_emb" not in stages.prepare_prior(prior_cfg(offset_store["root"]), Storage())[1]
    )


def test_a_file_shorter_than_its_record_leaves_no_gap(tmp_path) -> None:
    """The plan trusts the records' row counts; a file holding fewer rows gives what it has, and
    the arrays close up instead of keeping uninitialised rows."""
    store = EmbeddingStore(Storage(), str(tmp_path / "store"))
    rng = np.random.default_rng(0)
    for name, size, claimed in (("a", 30, 30), ("b", 10, 50), ("c", 30, 30)):
        emb = rng.normal(size=(size, D))
        keys = [f"{name}{i}" for i in range(size)]
        store.write_table(
            name, to_table(keys, ["c"] * size, emb, emb, np.ones((size, 8), np.int32))
        )
        store.write_record(name, {"rows": claimed, "skipped": {}})
    arrays = sample_arrays(store, ["image_emb"], 1000, seed=0)
    table = sample_rows(store, ["image_emb"], 1000, seed=0)
    assert table.num_rows == arrays["image_emb"].shape[0] == 70
    np.testing.assert_array_equal(arrays["image_emb"], column_array(table, "image_emb"))
