"""``unclip eval`` on tiny checkpoints made in seconds (``test_sample``'s helpers): a store whose rows
are a real synthetic shard's images, a diffusion and an autoregressive prior. The report's files
exist and parse, every conditioning is in them with finite numbers in range, FID is there exactly
when Inception weights are given, held-out prompts name a held-out pair, and the same seed gives
the same numbers."""

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
from pipeline.data.shards import iter_tar_samples, shard_urls
from pipeline.embed.store import EmbeddingStore, to_table
from pipeline.errors import UserFacingError
from pipeline.eval.run import run_eval
from pipeline.stage_config import SynthConfig
from pipeline.storage import Storage, join

HELDOUT = ["red star", "blue triangle"]
ALL = ["caption", "text_embedding", "prior", "ar_prior"]


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory) -> dict:
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
    every stage sampled with a few steps."""
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
                assert attr["images"] == 2 and attr["unparsed"] == 0
                for key in ("color", "shape", "all"):
                    assert 0 <= attr[key] <= 1
                assert attr["shape"] <= attr["color"]
        if name != "real":
            assert math.isfinite(entry["fd_clip"]) and entry["fd_clip"] >= 0
            assert entry["fid"] is None
            assert summary["metrics"][name]["clip_score"] == sets["train"]["clip_score"]
    assert report["real"]["images"] == 2 and report["real"]["sets"]["train"]["images"] == 2
    assert any("FID skipped" in note for note in report["notes"])

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
    assert report["real"]["images"] == 4
    assert report["real"]["keys"] != without_fid["report"]["real"]["keys"][:4]


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
    synth_cfg = configlib.load(SynthConfig, str(CONFIG_DIR / "synth" / "tiny.yaml"))
    assert cfg.holdout_pairs() == synth_cfg.holdout_pairs()
    with_ar = configlib.load(EvalConfig, None, ["ar_prior=checkpoints/prior-ar", "prior=null"])
    assert with_ar.selected() == ["caption", "text_embedding", "ar_prior"]
