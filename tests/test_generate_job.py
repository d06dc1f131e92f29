"""Batch generation on Ray Data (the local Ray): a caption file → one PNG per row and a parquet
index, every image the same whatever the batch size or the number of actors, and the same as
``unclip sample`` gives for that row's caption and seed."""

from __future__ import annotations

import os
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import tiny_clip_checkpoint
from PIL import Image
from test_sample import read
from tiny_cascade import HIGH, STEPS, cascade_overrides, make_cascade_root

from jobs import generate as generate_job
from jobs.entry import CONFIG_DIR
from pipeline import config as configlib
from pipeline.cascade_config import GenerateConfig, SampleConfig
from pipeline.cluster.watchdog import PipelineStalled
from pipeline.errors import UserFacingError
from pipeline.generate import sampling
from pipeline.generate.batch import gather, job_rows, row_seed, run_generate
from pipeline.storage import Storage

CAPTIONS = ["a red circle", "", "a blue square  ", "a green triangle"]


@pytest.fixture(scope="module")
def cascade_root(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("generate")
    clip_path = tiny_clip_checkpoint(str(base / "clip.safetensors"), 0)
    root = str(base / "root")
    made = make_cascade_root(Storage(), root, clip_path)
    captions = base / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n")
    return {**made, "root": root, "clip_path": clip_path, "captions": str(captions)}


def _cfg(c: dict, *extra: str) -> GenerateConfig:
    """The shipped tiny config (what the command line loads) pointed at the test's cascade."""
    return configlib.load(
        GenerateConfig,
        str(CONFIG_DIR / "generate" / "tiny.yaml"),
        cascade_overrides(
            c,
            "prior=checkpoints/prior",
            f"prior_steps={STEPS}",
            f"captions={c['captions']}",
            "samples_per_caption=2",
            "threads_per_actor=1",
            *extra,
        ),
    )


def test_rows_and_seeds() -> None:
    rows = job_rows(["a", "b"], 2, seed=3)
    assert [r["key"] for r in rows] == ["00000000", "00000001", "00000002", "00000003"]
    assert [r["caption"] for r in rows] == ["a", "a", "b", "b"]
    assert [r["seed"] for r in rows] == [row_seed(3, i) for i in range(4)]
    assert len({r["seed"] for r in rows}) == 4 and row_seed(3, 0) != row_seed(4, 0)
    assert all(0 <= r["seed"] < 2**63 for r in rows)


def test_generate_writes_images_and_index_independent_of_batching(
    cascade_root, ray_local, capsys
) -> None:
    c, storage = cascade_root, Storage()
    argv = [
        c["captions"],
        *cascade_overrides(c, "prior=checkpoints/prior", f"prior_steps={STEPS}"),
        "samples_per_caption=2",
        "batch_size=4",
        "output=gen/a",
        "threads_per_actor=1",
    ]
    assert generate_job.main(argv) == 0
    out = os.path.join(c["root"], "gen", "a")
    assert f"generate: 6 images of 3 captions under {out}/images" in capsys.readouterr().out
    index = pq.read_table(os.path.join(out, "index.parquet"))
    assert index.column_names == ["key", "caption", "seed", "path"]
    assert index.num_rows == 6
    assert index.column("key").to_pylist() == [f"{i:08d}" for i in range(6)]
    assert index.column("caption").to_pylist() == [
        c for c in ("a red circle", "a blue square", "a green triangle") for _ in range(2)
    ]
    assert index.column("seed").to_pylist() == [row_seed(0, i) for i in range(6)]
    paths = index.column("path").to_pylist()
    assert paths == [os.path.join(out, "images", f"{i:08d}.png") for i in range(6)]
    assert sorted(os.listdir(os.path.join(out, "images"))) == [f"{i:08d}.png" for i in range(6)]
    assert all(Image.open(p).size == (HIGH, HIGH) for p in paths)
    first = [read(p) for p in paths]
    assert first[0] != first[1]  # two samples of one caption differ

    # one row per call, two actors: the same images, the same index
    summary = run_generate(_cfg(c, "batch_size=1", "concurrency=2", "output=gen/b"), storage)
    again = pq.read_table(summary["index"])
    assert again.column("seed").equals(index.column("seed"))
    assert [read(p) for p in again.column("path").to_pylist()] == first

    # a row is what `unclip sample` draws for its caption with the row's seed
    sample = configlib.load(
        SampleConfig,
        str(CONFIG_DIR / "sample" / "tiny.yaml"),
        cascade_overrides(
            c,
            "prior=checkpoints/prior",
            f"prior_steps={STEPS}",
            "prompts=[a blue square]",
            "samples_per_prompt=1",
            f"seed={row_seed(0, 3)}",
            "output=gen/sample",
        ),
    )
    sampling.run_sample(sample, storage)
    alone = os.path.join(c["root"], "gen", "sample", "000_a-blue-square.png")
    assert read(alone) == first[3]


def test_generate_refuses_a_missing_caption_file(cascade_root) -> None:
    c = cascade_root
    with pytest.raises(UserFacingError, match=r"no caption file at .*nothing\.txt"):
        run_generate(_cfg(c, "captions=nothing.txt"))


def test_a_pool_the_cluster_cannot_start_is_refused_at_once(cascade_root, ray_local) -> None:
    c = cascade_root
    started = time.monotonic()
    with pytest.raises(UserFacingError) as refused:
        run_generate(_cfg(c, "concurrency=3", "output=gen/toolarge"))
    assert str(refused.value) == (
        "generate: the generator actors cannot start on this cluster: concurrency=3 × "
        "cpus_per_actor=1 = 3 CPUs, but the cluster has 2 CPUs: lower concurrency or "
        "cpus_per_actor"
    )
    assert time.monotonic() - started < 30
    assert not os.path.exists(os.path.join(c["root"], "gen", "toolarge", "images"))


def test_a_stalled_pool_fails_with_what_is_written_and_what_to_do() -> None:
    release = threading.Event()

    def pool():
        yield pa.table({"key": ["00000000", "00000001"]})
        release.wait(30)  # the actors stop returning rows (e.g. a lost node left them no room)
        yield pa.table({"key": ["00000002"]})

    began = time.monotonic()
    with pytest.raises(PipelineStalled) as stalled:
        gather(pool(), 5, "s3://b/generated/images", 0.3)
    assert str(stalled.value) == (
        "generate stalled: no generated images for 0 s (config key: stall_timeout_s). At least 2 "
        "of 5 images are written under s3://b/generated/images; the index is written only once "
        "every image is there, so rerun the job (it generates every row again, the same images). "
        "After a lost node, the generator actors (concurrency × cpus_per_actor, gpus_per_actor) "
        "may not fit on the nodes left."
    )
    assert time.monotonic() - began < 5
    release.set()
    # steady output passes through, in order; null waits for ever
    tables = gather(iter([pa.table({"key": ["a"]}), pa.table({"key": ["b"]})]), 2, "x", None)
    assert [t.column("key").to_pylist() for t in tables] == [["a"], ["b"]]
