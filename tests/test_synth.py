"""The synthetic dataset as shards: readable by webdataset and by Ray Data, deterministic by seed,
resumable, held-out pairs kept out, and the attribute checker right on the stored images."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from conftest import Root
from PIL import Image

from jobs import synth as synth_job
from pipeline.data import synth
from pipeline.data.shape_checker import check_image
from pipeline.data.shapes import Scene, parse_caption
from pipeline.data.shards import (
    completed_shards,
    iter_tar_samples,
    read_ray_dataset,
    shard_urls,
)
from pipeline.errors import UserFacingError
from pipeline.stage_config import SynthConfig
from pipeline.storage import Storage


def _cfg(root: Root | str, **changes) -> SynthConfig:
    url = root.url if isinstance(root, Root) else root
    options = {"root": url, "num_samples": 30, "samples_per_shard": 8, "image_size": 64}
    if isinstance(root, Root):
        options["storage"] = root.storage.options
    return SynthConfig(**{**options, **changes})


def test_shards_read_back_with_ray_data(storage_root: Root, ray_local) -> None:
    cfg = _cfg(storage_root)
    summary = synth.generate(cfg, storage_root.storage)
    folder = cfg.url("shards")
    assert summary["shards"] == 4 and summary["written_now"] == 30
    assert completed_shards(storage_root.storage, folder) == [0, 1, 2, 3]

    rows = read_ray_dataset(storage_root.storage, folder).take_all()
    assert len(rows) == 30 and len({r["__key__"] for r in rows}) == 30
    for row in rows:
        assert row["jpg"].shape == (64, 64, 3)
        assert row["json"]["caption"] == row["txt"]
        scene = Scene.from_json(row["json"]["scene"])
        assert scene.caption == row["txt"]
        assert sorted(parse_caption(row["txt"])) == sorted(
            (o.color, o.shape) for o in scene.objects
        )

    # the parquet and stats beside each tar say the same as img2dataset's would
    stats = storage_root.storage.read_json(shard_urls(folder, 3)["stats"])
    assert (stats["count"], stats["successes"]) == (6, 6)
    with storage_root.storage.open(shard_urls(folder, 0)["parquet"]) as handle:
        table = pq.read_table(handle)
    assert table.column("status").to_pylist() == ["success"] * 8
    assert table.column("key").to_pylist() == [f"00000{i}" for i in range(8)]  # img2dataset keys


def test_shards_read_back_with_webdataset(tmp_path, ray_local) -> None:
    cfg = _cfg(str(tmp_path), num_samples=10, samples_per_shard=5)
    synth.generate(cfg)
    tars = [shard_urls(cfg.url("shards"), i)["tar"] for i in range(2)]
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("rgb8"))
    assert len(samples) == 10
    assert all(s["jpg"].shape == (64, 64, 3) and isinstance(s["txt"], str) for s in samples)
    assert json.loads(json.dumps(samples[0]["json"]))["key"] == samples[0]["__key__"]


def test_same_seed_same_bytes_and_resume(tmp_path, ray_local) -> None:
    a, b, c = (str(tmp_path / name) for name in "abc")
    synth.generate(_cfg(a))
    synth.generate(_cfg(b))
    synth.generate(_cfg(c, seed=1))
    storage = Storage()
    tar = lambda root, i: storage.read_bytes(shard_urls(f"{root}/shards", i)["tar"])  # noqa: E731
    assert all(tar(a, i) == tar(b, i) for i in range(4))
    assert tar(a, 0) != tar(c, 0)

    # A shard whose writer died (no _stats.json) is rewritten; complete ones are not.
    storage.remove(shard_urls(f"{a}/shards", 2)["stats"])
    summary = synth.generate(_cfg(a))
    assert summary["written_now"] == 8
    assert tar(a, 2) == tar(b, 2)

    with pytest.raises(UserFacingError, match=r"other settings \(seed: 0 now 1\)"):
        synth.generate(_cfg(a, seed=1))


def test_heldout_pairs_stay_out_of_training(tmp_path, ray_local) -> None:
    holdout = ["red star", "blue cross"]
    pairs = {("red", "star"), ("blue", "cross")}
    for split in ("train", "heldout"):
        cfg = _cfg(
            str(tmp_path / split),
            num_samples=120,
            samples_per_shard=60,
            holdout=holdout,
            split=split,
        )
        synth.generate(cfg)
        seen = []
        for i in (0, 1):
            for s in iter_tar_samples(Storage(), shard_urls(cfg.url("shards"), i)["tar"]):
                scene = Scene.from_json(json.loads(s["json"])["scene"])
                seen.append({(o.color, o.shape) for o in scene.objects} & pairs)
        assert len(seen) == 120
        if split == "train":
            assert not any(seen)
        else:
            assert all(seen)


def test_checker_reads_the_stored_images(tmp_path, ray_local) -> None:
    cfg = _cfg(str(tmp_path), num_samples=300, samples_per_shard=100)
    synth.generate(cfg)
    color = shape = total = 0
    for i in range(3):
        for s in iter_tar_samples(Storage(), shard_urls(cfg.url("shards"), i)["tar"]):
            image = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))
            for check in check_image(image, parse_caption(s["txt"].decode())):
                total += 1
                color += check.color_ok
                shape += check.shape_ok
    assert total >= 300
    assert color / total >= 0.99 and shape / total >= 0.99, (color / total, shape / total)


def test_synth_command_refuses_a_bad_holdout(capsys) -> None:
    assert synth_job.main(["holdout=[pink star]"]) == 2
    assert "holdout[0]: expected 'colour shape'" in capsys.readouterr().err
    assert synth_job.main(["positions=[center, middle]"]) == 2
    assert "positions[1]: expected one of top left" in capsys.readouterr().err
    assert synth_job.main(["positions=[center]", "max_objects=2"]) == 2
    assert "positions: two objects need a pair layout" in capsys.readouterr().err


def test_a_narrowed_dataset_records_its_vocabulary(tmp_path, ray_local) -> None:
    narrow = {"max_objects": 1, "positions": ["center"], "sizes": ["large"], "two_tone_prob": 0.0}
    cfg = _cfg(str(tmp_path), num_samples=16, **narrow)
    synth.generate(cfg)
    for s in iter_tar_samples(Storage(), shard_urls(cfg.url("shards"), 0)["tar"]):
        (obj,) = Scene.from_json(json.loads(s["json"])["scene"]).objects
        assert (obj.position, obj.size) == ("center", "large")
    # Evaluation's held-out prompts are drawn with the same options.
    assert synth.scene_options(Storage(), cfg.url("shards")) == narrow
    assert synth.scene_options(Storage(), str(tmp_path / "elsewhere")) == {}
    with pytest.raises(UserFacingError, match=r"positions: \['center'\] now None"):
        synth.generate(_cfg(str(tmp_path), num_samples=16, **{**narrow, "positions": None}))
