"""``unclip eval`` on tiny checkpoints made in seconds (``test_sample``'s helpers): a store whose rows
are a real synthetic shard's images, a diffusion and an autoregressive prior. The report's files
exist and parse, every conditioning is in them with finite numbers in range, FID is there exactly
when Inception weights are given, held-out prompts name a held-out pair, and the same seed gives
the same numbers. The prompts and real images are a seeded sample of a bounded number of store
files (a store of many files is never read whole), and the report says how many samples each
figure rests on."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from helpers import tiny_clip_checkpoint
from PIL import Image
from tiny_cascade import (
    HIGH,
    STEPS,
    build_model,
    cascade_overrides,
    make_cascade_root,
    prior_cfg,
    write_checkpoint,
)

from jobs import cli
from jobs.entry import CONFIG_DIR
from pipeline import config as configlib
from pipeline.cascade_config import EvalConfig
from pipeline.data import synth
from pipeline.data.shapes import parse_caption
from pipeline.data.shards import iter_tar_samples, shard_name, shard_urls
from pipeline.embed.store import MANIFEST, EmbeddingStore, to_table
from pipeline.errors import UserFacingError
from pipeline.eval.run import draw_store_rows, run_eval
from pipeline.stage_config import SynthConfig
from pipeline.storage import Storage, join

HELDOUT = ["red star", "blue triangle"]
ALL = ["caption", "text_embedding", "prior", "ar_prior"]
STORE_ROWS = 8  # rows of eval_root's store: fewer than tiny.yaml's num_real
MANY, PER_SHARD = 30, 4  # the many-files store: source shards (store files), samples in each


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory, ray_local) -> dict:
    """``make_cascade_root``'s checkpoints, its store rewritten as the embeddings of a synthetic
    shard (so real images can be read beside it), an autoregressive prior, Inception weights."""
    base = tmp_path_factory.mktemp("eval")
    storage = Storage()
    clip_path = tiny_clip_checkpoint(str(base / "clip.safetensors"), 0)
    root = str(base / "root")
    made = make_cascade_root(storage, root, clip_path)

    shards = join(root, "shards")
    synth_cfg = SynthConfig(root=root, num_samples=8, samples_per_shard=8, image_size=HIGH)
    synth.write_shard(storage, shards, 0, synth_cfg)
    samples = list(iter_tar_samples(storage, shard_urls(shards, 0)["tar"]))
    keys = [s["__key__"] for s in samples]
    captions = [s["txt"].decode() for s in samples]
    rng = np.random.default_rng(1)
    image_emb, text_emb = (rng.normal(size=(len(keys), 64)).astype(np.float32) for _ in range(2))
    store = EmbeddingStore(storage, made["info"]["store"])
    tokens = np.ones((len(keys), 32), np.int32)
    store.write_shard(
        "00000", to_table(keys, captions, image_emb, text_emb, tokens), {"skipped": {}}
    )
    store.finalize_manifest({"source": shards})

    ar_cfg = prior_cfg(root, "autoregressive")
    g = torch.Generator().manual_seed(0)
    fit = {
        name: torch.nn.functional.normalize(torch.randn(64, 64, generator=g), dim=-1).numpy()
        for name in ("fit_image_emb", "fit_text_emb")
    }
    info = {**made["info"], **fit}
    ar = build_model("train-prior", ar_cfg, info, 5)
    write_checkpoint(
        storage, join(root, "checkpoints", "prior-ar"), "train-prior", ar_cfg, ar, info
    )
    return {**made, "root": root, "clip_path": clip_path, "captions": captions, "base": base}


@pytest.fixture(scope="module")
def inception_file(eval_root) -> str:
    from safetensors.torch import save_file
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    model = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
    path = str(eval_root["base"] / "inception.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def _cfg(c: dict, *extra: str) -> EvalConfig:
    """The shipped tiny config pointed at the test's cascade: 2 store prompts and 2 held-out ones,
    one image each, every stage sampled with a few steps."""
    return configlib.load(
        EvalConfig,
        str(CONFIG_DIR / "eval" / "tiny.yaml"),
        cascade_overrides(
            c,
            "prior=checkpoints/prior",
            "ar_prior=checkpoints/prior-ar",
            f"prior_steps={STEPS}",
            "num_prompts=2",
            f"heldout_pairs={json.dumps(HELDOUT)}",
            "num_heldout=2",
            "samples_per_prompt=1",
            "batch_size=4",
            *extra,
        ),
    )


def _numbers(report: dict) -> dict:
    """Every metric of a report (not the timings)."""
    return {k: report[k] for k in ("conditionings", "real", "prompts")}


@pytest.fixture(scope="module")
def without_fid(eval_root) -> dict:
    summary = run_eval(_cfg(eval_root, "output=eval/a"))
    with open(summary["report"]) as handle:
        return {"summary": summary, "report": json.load(handle)}


def test_report_files_and_numbers(eval_root, without_fid) -> None:
    summary, report = without_fid["summary"], without_fid["report"]
    output = os.path.join(eval_root["root"], "eval", "a")
    assert summary["output"] == output
    assert report["order"] == ALL == list(summary["metrics"]) == list(summary["grids"])
    assert report["resolutions"] == [16, HIGH]
    steps = report["checkpoints"]
    assert steps["decoder"]["step"] == 10 and steps["prior"]["step"] == 10
    assert steps["ar_prior"]["url"].endswith("checkpoint_000010") and steps["upsamplers"]
    labels = {name: entry["label"] for name, entry in report["conditionings"].items()}
    assert labels["prior"] == "diffusion prior" and labels["ar_prior"].startswith("AR prior")

    for name, entry in [*report["conditionings"].items(), ("real", report["real"])]:
        sets = entry["sets"]
        assert set(sets) == ({"train"} if name == "real" else {"train", "heldout"})
        for prompt_set in sets.values():
            assert 0 <= prompt_set["clip_score"] <= 100
            attributes = [prompt_set["attributes"]]
            if name != "real":
                attributes.append(prompt_set["attributes_decoder"])
            for attr in attributes:
                assert attr["images"] == (STORE_ROWS if name == "real" else 2)
                assert attr["unparsed"] == 0
                for key in ("color", "shape", "all"):
                    assert 0 <= attr[key] <= 1
                assert attr["shape"] <= attr["color"]
        if name != "real":
            assert math.isfinite(entry["fd_clip"]) and entry["fd_clip"] >= 0
            assert entry["fid"] is None
            assert summary["metrics"][name]["clip_score"] == sets["train"]["clip_score"]
    # Real images: tiny.yaml's num_real (64), independent of the prompts, capped by the store
    assert report["config"]["num_real"] == 64
    assert report["real"]["images"] == STORE_ROWS == report["real"]["sets"]["train"]["images"]
    assert any("FID skipped" in note for note in report["notes"])
    assert any(f"holds {STORE_ROWS} captioned rows" in note for note in report["notes"])
    assert report["samples"] == {
        "per_prompt": 1,
        "sets": {"train": {"prompts": 2, "images": 2}, "heldout": {"prompts": 2, "images": 2}},
        "fd_clip": {"generated": 2, "real": STORE_ROWS},
        "fid": None,
        "real": STORE_ROWS,
        "real_images_decoded": STORE_ROWS,
        "store_files": 1,
    }

    # Prompts: two store captions, two held-out ones each naming a held-out pair
    pairs = {tuple(p.split()) for p in HELDOUT}
    assert set(report["prompts"]["train"]) <= set(eval_root["captions"])
    assert len(report["prompts"]["heldout"]) == 2
    for prompt in report["prompts"]["heldout"]:
        assert pairs & set(parse_caption(prompt)), prompt

    # The Markdown table, the plot and the grids
    with open(summary["markdown"]) as handle:
        markdown = handle.read()
    header = next(line for line in markdown.splitlines() if line.startswith("| conditioning"))
    assert "FID" in header and "held-out shape" in header
    assert (
        "Samples: each conditioning's CLIP score and attribute accuracy rest on 2 prompts × 1 = "
        "2 images (held-out: 2 prompts × 1 = 2 images); FD (CLIP) compares 2 generated images "
        f"with {STORE_ROWS} real images, FID not computed; the real row rests on {STORE_ROWS} "
        "real images, drawn from 1 store file(s)."
    ) in markdown
    for entry in [*report["conditionings"].values(), report["real"]]:
        assert f"| {entry['label']} |" in markdown
    assert "](metrics.png)" in markdown and "](grid_ar_prior.png)" in markdown
    assert Image.open(summary["plot"]).size[0] > 0
    for name, url in summary["grids"].items():
        grid = Image.open(url)
        assert url == os.path.join(output, f"grid_{name}.png")
        assert grid.size == (256, 4 * (256 + 16))  # 4 prompts: 32px samples shown at 256px


def test_fid_with_inception_weights_and_determinism(eval_root, without_fid, inception_file) -> None:
    cfg = _cfg(
        eval_root,
        "output=eval/b",
        f"inception_weights={inception_file}",
        "conditionings=[caption, prior]",
        "grid_prompts=1",
    )
    summary = run_eval(cfg)
    with open(summary["report"]) as handle:
        report = json.load(handle)
    assert report["order"] == ["caption", "prior"] == list(report["conditionings"])
    assert not any("FID skipped" in note for note in report["notes"])
    first = without_fid["report"]["conditionings"]
    for name, entry in report["conditionings"].items():
        assert math.isfinite(entry["fid"]) and entry["fid"] >= 0
        assert summary["metrics"][name]["fid"] == entry["fid"]
        # The same seed gives the same numbers (another run, other conditionings beside it)
        assert {**entry, "fid": None, "grid": None} == {**first[name], "grid": None}
    assert report["real"]["sets"] == without_fid["report"]["real"]["sets"]
    assert report["samples"]["fid"] == {"generated": 2, "real": STORE_ROWS}
    with open(summary["markdown"]) as handle:
        assert f"FID 2 generated with {STORE_ROWS} real images" in handle.read()


def test_the_numbers_do_not_depend_on_the_number_of_actors(eval_root, without_fid) -> None:
    """Each row draws its noise from its own seed, whichever actor makes it: two actors sharing
    the rows and the real images give the one actor's numbers."""
    summary = run_eval(_cfg(eval_root, "output=eval/two-actors", "concurrency=2"))
    with open(summary["report"]) as handle:
        report = json.load(handle)
    assert _numbers(report) == _numbers(without_fid["report"])
    assert report["samples"] == without_fid["report"]["samples"]


def test_explicit_prompts_real_count_and_another_seed(eval_root, without_fid) -> None:
    prompts = ["a red circle", "a blue square", "hello"]
    cfg = _cfg(
        eval_root,
        "output=eval/c",
        f"prompts={json.dumps(prompts)}",
        "heldout_pairs=[]",
        "conditionings=[text_embedding]",
        "num_real=4",
        "seed=1",
    )
    with open(run_eval(cfg)["report"]) as handle:
        report = json.load(handle)
    assert report["prompts"] == {"train": prompts}
    entry = report["conditionings"]["text_embedding"]
    assert set(entry["sets"]) == {"train"} and entry["sets"]["train"]["images"] == 3
    assert entry["sets"]["train"]["attributes"]["unparsed"] == 1  # "hello" names no shape
    assert report["real"]["images"] == 4 == report["samples"]["fd_clip"]["real"]
    assert report["samples"]["sets"] == {"train": {"prompts": 3, "images": 3}}
    assert report["real"]["keys"] != without_fid["report"]["real"]["keys"][:4]


@pytest.fixture(scope="module")
def many_files(eval_root) -> dict:
    """A second store of the cascade's CLIP over :data:`MANY` synthetic source shards of
    :data:`PER_SHARD` samples: one store file each, so a draw that listed every key or caption
    would read them all."""
    storage = Storage()
    root = eval_root["root"]
    shards, url = join(root, "shards-many"), join(root, "embeddings-many", "store")
    manifest = EmbeddingStore(storage, eval_root["info"]["store"]).manifest()
    storage.write_json(join(url, MANIFEST), {**manifest, "shards": {}})
    store = EmbeddingStore(storage, url)
    synth_cfg = SynthConfig(
        root=root, num_samples=MANY * PER_SHARD, samples_per_shard=PER_SHARD, image_size=HIGH
    )
    rng = np.random.default_rng(2)
    captions: dict[str, str] = {}
    for i in range(MANY):
        synth.write_shard(storage, shards, i, synth_cfg)
        samples = list(iter_tar_samples(storage, shard_urls(shards, i)["tar"]))
        keys = [s["__key__"] for s in samples]
        texts = [s["txt"].decode() for s in samples]
        captions.update(zip(keys, texts, strict=True))
        emb = [rng.normal(size=(len(keys), 64)).astype(np.float32) for _ in range(2)]
        table = to_table(keys, texts, *emb, np.ones((len(keys), 32), np.int32))
        store.write_shard(shard_name(i), table, {"skipped": {}})
    store.finalize_manifest({"source": shards})
    return {"store": store, "captions": captions}


def _count_reads(monkeypatch) -> list[str]:
    """The store files ``EmbeddingStore.read_shard`` opens from now on, one entry per read."""
    reads: list[str] = []
    original = EmbeddingStore.read_shard

    def counted(self, name, columns=None):
        reads.append(name)
        return original(self, name, columns)

    monkeypatch.setattr(EmbeddingStore, "read_shard", counted)
    return reads


def test_rows_are_drawn_from_a_bounded_number_of_files(many_files, monkeypatch) -> None:
    store = many_files["store"]
    reads = _count_reads(monkeypatch)
    rows = draw_store_rows(store, 6, seed=0, max_files=3)
    assert len(rows) == 6 == len(set(rows.keys)) and rows.image_emb.shape == (6, 64)
    assert len(set(reads)) <= 3 < MANY and len(reads) == len(set(reads))
    for shard, key, caption in zip(rows.shards, rows.keys, rows.captions, strict=True):
        assert key.startswith(shard) and shard in reads  # each row knows its source shard
        assert caption == many_files["captions"][key]
    again = draw_store_rows(store, 6, seed=0, max_files=3)
    assert again.keys == rows.keys and np.array_equal(again.image_emb, rows.image_emb)
    assert draw_store_rows(store, 6, seed=1, max_files=3).keys != rows.keys


def test_eval_reads_a_bounded_number_of_files_and_states_counts(
    eval_root, many_files, monkeypatch
) -> None:
    """The whole command on the many-files store: prompts and 6 real images from at most 3 of its
    30 files (the real images read from those files' source tars alone), and the counts said."""
    cfg = _cfg(
        eval_root,
        "store=embeddings-many/store",
        "shards=shards-many",
        "heldout_pairs=[]",
        "conditionings=[caption]",
        "num_real=6",
        "store_files=3",
        "output=eval/many",
    )
    reads = _count_reads(monkeypatch)
    summary = run_eval(cfg)
    assert len(set(reads)) <= 3 < MANY
    with open(summary["report"]) as handle:
        report = json.load(handle)
    assert set(report["prompts"]["train"]) <= set(many_files["captions"].values())
    assert report["real"]["images"] == 6 and len(set(report["real"]["keys"])) == 6
    assert {key[:5] for key in report["real"]["keys"]} <= set(reads)
    assert report["real"]["sets"]["train"]["attributes"]["images"] == 6  # decoded from the tars
    samples = report["samples"]
    assert samples["fd_clip"] == {"generated": 2, "real": 6} and samples["real"] == 6
    assert samples["store_files"] <= 3 and samples["real_images_decoded"] == 6
    with open(summary["markdown"]) as handle:
        markdown = handle.read()
    assert "FD (CLIP) compares 2 generated images with 6 real images" in markdown
    assert not any("captioned rows" in note for note in report["notes"])


def test_command_line_and_errors(eval_root, capsys) -> None:
    c = eval_root
    argv = [
        *cascade_overrides(c, "prior=null", "num_prompts=2", "output=eval/cli", "batch_size=4"),
        "conditionings=[caption]",
    ]
    assert cli.main(["eval", *argv]) == 0
    out = capsys.readouterr().out
    assert "eval: report at" in out and "report.md" in out and "caption" in out

    assert cli.main(["eval", *cascade_overrides(c, "prior=null"), "conditionings=[prior]"]) == 2
    assert 'conditioning "prior" needs a prior run' in capsys.readouterr().err
    assert cli.main(["eval", *cascade_overrides(c), "heldout_pairs=[pink star]"]) == 2
    assert "heldout_pairs[0]" in capsys.readouterr().err

    with pytest.raises(UserFacingError, match="no embedding store"):
        run_eval(_cfg(c, "store=embeddings/nothing", "conditionings=[caption]"))
    broken = str(c["base"] / "broken.pt")
    torch.save({"fc.weight": torch.zeros(2, 2)}, broken)
    with pytest.raises(UserFacingError, match="do not fit torchvision's inception_v3"):
        run_eval(_cfg(c, f"inception_weights={broken}", "conditionings=[caption]"))
    missing = _cfg(c, "inception_weights=nowhere.pt", "conditionings=[caption]", "output=eval/d")
    summary = run_eval(missing)
    assert summary["metrics"]["caption"]["fid"] is None
    assert any("no Inception weights at" in note for note in summary["notes"])


def test_eval_default_config_checks() -> None:
    cfg = configlib.load(EvalConfig, str(CONFIG_DIR / "eval" / "tiny.yaml"))
    assert cfg.selected() == ["caption", "text_embedding", "prior"]
    assert cfg.num_real == 64  # small for the CPU quickstart; the default is in the thousands
    default = configlib.load(EvalConfig, None, [])
    assert default.num_real == 2000 and default.store_files == 64
    synth_cfg = configlib.load(SynthConfig, str(CONFIG_DIR / "synth" / "tiny.yaml"))
    assert cfg.holdout_pairs() == synth_cfg.holdout_pairs()
    with_ar = configlib.load(EvalConfig, None, ["ar_prior=checkpoints/prior-ar", "prior=null"])
    assert with_ar.selected() == ["caption", "text_embedding", "ar_prior"]
