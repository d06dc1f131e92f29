"""Generation from trained checkpoints: the cascade found, checked and loaded (EMA weights,
safetensors) from run folders on local disk and S3, and the commands sample, variations,
interpolate and textdiff writing their images, grids and index, the same bytes for the same seed.

The checkpoints are made here, in seconds, without Ray Train: tiny random stage models built by the
stages' own build functions, written by the checkpoint writer the training loop uses, with the
``info`` the training driver gives (``pipeline.train.stages.store_info`` of a store in the embedding
job's format, made by the tests' tiny CLIP)."""

from __future__ import annotations

import io
import json
import logging
import os

import numpy as np
import pytest
import torch
from helpers import TINY_CLIP_CONFIG, tiny_clip_checkpoint
from PIL import Image
from tiny_cascade import (
    HIGH,
    SIZE,
    STEPS,
    build_model,
    cascade_overrides,
    decoder_cfg,
    make_cascade_root,
    prior_cfg,
    upsampler_cfg,
    write_checkpoint,
)

from jobs import interpolate as interpolate_job
from jobs import sample as sample_job
from jobs import textdiff as textdiff_job
from jobs import variations as variations_job
from pipeline import config as configlib
from pipeline import pictures
from pipeline.cascade_config import SampleConfig
from pipeline.embed.store import EmbeddingStore
from pipeline.errors import UserFacingError
from pipeline.generate import sampling
from pipeline.generate.cascade import load_cascade, load_stage_model, plan_cascade
from pipeline.stage_config import ClipSource
from pipeline.storage import Storage, join


@pytest.fixture(scope="module")
def cascade_root(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("cascade")
    clip_path = tiny_clip_checkpoint(str(base / "clip.safetensors"), 0)
    root = str(base / "root")
    made = make_cascade_root(Storage(), root, clip_path)
    inputs = []
    for i, color in enumerate(((230, 30, 30), (30, 80, 230))):
        path = str(base / f"input{i}.png")
        Image.new("RGB", (40, 30), color).save(path)
        inputs.append(path)
    return {**made, "root": root, "clip_path": clip_path, "inputs": inputs}


def _sample_cfg(c: dict, **changes) -> SampleConfig:
    return configlib.load(
        SampleConfig,
        None,
        cascade_overrides(c, "prior=checkpoints/prior", f"prior_steps={STEPS}", "batch_size=4")
        + [f"{k}={json.dumps(v)}" for k, v in changes.items()],
    )


def _png(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def _json(path: str):
    return json.loads(read(path))


# ----------------------------------------------------------------------------------------------
# Finding, checking and loading checkpoints


def test_plan_finds_latest_checkpoints_and_loads_ema(cascade_root) -> None:
    c, storage = cascade_root, Storage()
    plan = plan_cascade(
        storage,
        c["root"],
        decoder="checkpoints/decoder",
        prior="checkpoints/prior",
        upsamplers=["checkpoints/upsampler"],
        clip=c["source"],
    )
    assert plan.decoder.step == 10 and plan.decoder.url.endswith("checkpoint_000010")
    assert plan.resolutions == [SIZE, HIGH]
    assert plan.clip_id == c["info"]["clip"] and plan.clip.pretrained == c["clip_path"]
    described = plan.describe()
    assert (
        described["upsamplers"][0]["step"] == 10 and described["prior"]["run"] == "prior-diffusion"
    )
    # a checkpoint folder is taken as it is: the older decoder checkpoint
    older = plan_cascade(
        storage,
        c["root"],
        decoder=join(c["runs"]["decoder"], "checkpoint_000005"),
        clip=c["source"],
    )
    assert older.decoder.step == 5

    cascade = load_cascade(plan, storage, "cpu")
    expected = c["decoder_ema"].state_dict()
    for key, value in cascade.decoder.state_dict().items():
        torch.testing.assert_close(value, expected[key])  # the EMA weights, not the training ones
    assert not cascade.decoder.training and not cascade.prior.training
    assert all(not p.requires_grad for p in cascade.decoder.parameters())

    text_emb, tokens = cascade.encode_text(["a red circle", "a blue square"])
    assert text_emb.shape == (2, 64) and tokens.shape == (2, 32) and tokens.dtype == torch.long
    torch.testing.assert_close(text_emb.norm(dim=-1), torch.ones(2))
    image = Image.new("RGB", (50, 40), (230, 30, 30))
    image_emb = cascade.encode_images([image])
    assert image_emb.shape == (1, 64)
    # the embedding job's preprocessing: open_clip's own transform, then the model
    import open_clip

    _, _, preprocess = open_clip.create_model_and_transforms("tiny-clip", pretrained=c["clip_path"])
    with torch.no_grad():
        bare = cascade.clip.model.encode_image(preprocess(image)[None])
    torch.testing.assert_close(image_emb, torch.nn.functional.normalize(bare, dim=-1))
    pixels = cascade.decoder_images([image])
    assert pixels.shape == (1, 3, SIZE, SIZE) and pixels.min() >= -1 and pixels.max() <= 1


def test_without_ema_the_training_weights_load_with_a_log_line(
    cascade_root, tmp_path, caplog
) -> None:
    c, storage = cascade_root, Storage()
    cfg = decoder_cfg(c["root"])
    model = build_model("train-decoder", cfg, c["info"], 7)
    url = write_checkpoint(
        storage, str(tmp_path / "decoder"), "train-decoder", cfg, model, c["info"], ema=False
    )
    plan = plan_cascade(storage, c["root"], decoder=url, clip=c["source"])
    with caplog.at_level(logging.WARNING, logger="pipeline.generate.cascade"):
        loaded = load_stage_model(storage, plan.decoder)
    assert "has no EMA weights" in caplog.text and url in caplog.text
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())


def test_autoregressive_prior_loads_its_fitted_quantizer_without_fit_data(
    cascade_root, tmp_path
) -> None:
    c, storage = cascade_root, Storage()
    cfg = prior_cfg(c["root"], "autoregressive")
    g = torch.Generator().manual_seed(0)
    fit = {
        "fit_image_emb": torch.nn.functional.normalize(torch.randn(64, 64, generator=g), dim=-1),
        "fit_text_emb": torch.nn.functional.normalize(torch.randn(64, 64, generator=g), dim=-1),
    }
    info = {**c["info"], **{k: v.numpy() for k, v in fit.items()}}
    model = build_model("train-prior", cfg, info, 5)
    assert model.fitted
    url = write_checkpoint(storage, str(tmp_path / "ar"), "train-prior", cfg, model, info)
    plan = plan_cascade(
        storage, c["root"], decoder="checkpoints/decoder", prior=url, clip=c["source"]
    )
    assert "fit_image_emb" not in plan.prior.info
    cascade = load_cascade(plan, storage, "cpu")
    assert cascade.prior.fitted
    torch.testing.assert_close(cascade.prior.state_dict(), model.state_dict())
    text_emb, tokens = cascade.encode_text(["a red circle"])
    emb = cascade.prior.sample(text_emb, tokens, generator=torch.Generator().manual_seed(0))
    assert emb.shape == (1, 64) and torch.isfinite(emb).all()


def test_bad_cascades_are_refused_with_the_url(cascade_root, tmp_path) -> None:
    c, storage = cascade_root, Storage()
    root, source = c["root"], c["source"]

    def refused(**kw) -> str:
        kw.setdefault("decoder", "checkpoints/decoder")
        kw.setdefault("clip", source)
        with pytest.raises(UserFacingError) as info:
            plan_cascade(storage, root, **kw)
        return str(info.value)

    missing = refused(decoder="checkpoints/nothing-here")
    assert "no complete checkpoint" in missing and f"{root}/checkpoints/nothing-here" in missing
    wrong = refused(prior="checkpoints/decoder")
    assert "is a train-decoder checkpoint, not a train-prior one" in wrong
    assert f"{root}/checkpoints/decoder/checkpoint_000010" in wrong and "prior" in wrong
    assert "not a train-decoder one" in refused(decoder="checkpoints/upsampler")

    # a prior trained on the store of another CLIP
    other_cfg = prior_cfg(root)
    other_info = {**c["info"], "clip": "tiny-clip--ckpt-0123456789ab"}
    other = write_checkpoint(
        storage,
        str(tmp_path / "prior-other"),
        "train-prior",
        other_cfg,
        build_model("train-prior", other_cfg, other_info, 1),
        other_info,
    )
    message = refused(prior=other)
    assert "different CLIPs" in message and other in message and "tiny-clip--ckpt-0123" in message

    # upsamplers that do not chain on from the decoder's 16px
    up_cfg = upsampler_cfg(root, HIGH, 64)
    up = write_checkpoint(
        storage,
        str(tmp_path / "upsampler-64"),
        "train-upsampler",
        up_cfg,
        build_model("train-upsampler", up_cfg, {}, 4),
        {},
    )
    message = refused(upsamplers=[up])
    assert f"takes {HIGH}px images but the decoder" in message and "makes 16px" in message
    plan = plan_cascade(
        storage,
        root,
        decoder="checkpoints/decoder",
        upsamplers=["checkpoints/upsampler", up],
        clip=source,
    )
    assert plan.resolutions == [SIZE, HIGH, 64]

    # a CLIP other than the store's
    other_clip = tiny_clip_checkpoint(str(tmp_path / "other-clip.safetensors"), 1)
    message = refused(clip=ClipSource("tiny-clip", other_clip, TINY_CLIP_CONFIG))
    assert "was trained on embeddings of" in message and c["info"]["clip"] in message
    # no CLIP given: the store's manifest names a checkpoint by hash only
    message = refused(clip=None)
    assert "clip.pretrained" in message and c["info"]["clip"] in message

    # an interrupted checkpoint is never picked up: the latest whole one is
    broken = join(c["runs"]["upsampler"], "checkpoint_000020")
    storage.copy_from_local(os.path.join(c["runs"]["upsampler"], "checkpoint_000010"), broken)
    os.remove(os.path.join(broken, "model.safetensors"))
    try:
        plan = plan_cascade(
            storage,
            root,
            decoder="checkpoints/decoder",
            upsamplers=["checkpoints/upsampler"],
            clip=source,
        )
        assert plan.upsamplers[0].step == 10
        assert "incomplete" in refused(upsamplers=[broken])
    finally:
        storage.remove(broken, recursive=True)


def test_the_store_manifest_can_name_the_clip(cascade_root) -> None:
    c, storage = cascade_root, Storage()
    store = EmbeddingStore(storage, c["info"]["store"])
    manifest = store.manifest()
    recorded = {
        "model": "tiny-clip",
        "pretrained": c["clip_path"],
        "model_config": TINY_CLIP_CONFIG,
    }
    storage.write_json(join(store.url, "manifest.json"), {**manifest, "clip_source": recorded})
    try:
        plan = plan_cascade(storage, c["root"], decoder="checkpoints/decoder", clip=None)
        assert plan.clip == ClipSource(**recorded)
    finally:
        storage.write_json(join(store.url, "manifest.json"), manifest)


# ----------------------------------------------------------------------------------------------
# The commands


def test_sample_writes_images_grid_and_index(cascade_root, capsys) -> None:
    c = cascade_root
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "sample", "tiny.yaml")
    argv = [
        "a red circle",
        "--config",
        config,
        "a blue square!",
        *cascade_overrides(c, "prior=checkpoints/prior", f"prior_steps={STEPS}"),
        "samples_per_prompt=2",
        "output=out/sample",
    ]
    assert sample_job.main(argv) == 0
    out = os.path.join(c["root"], "out", "sample")
    assert f"grid: {out}/grid.png" in capsys.readouterr().out
    names = [
        "000_a-red-circle.png",
        "001_a-red-circle.png",
        "002_a-blue-square.png",
        "003_a-blue-square.png",
    ]
    assert sorted(os.listdir(out)) == sorted([*names, "grid.png", "index.json"])
    for name in names:
        image = Image.open(os.path.join(out, name))
        assert image.size == (HIGH, HIGH) and image.mode == "RGB"
    cell = max(pictures.MIN_CELL, HIGH)
    grid = Image.open(os.path.join(out, "grid.png"))
    assert grid.size == (2 * cell, 2 * (pictures.CAPTION_HEIGHT + cell))
    caption_band = np.asarray(grid)[: pictures.CAPTION_HEIGHT]
    assert (caption_band != 255).any()  # the caption is drawn
    index = _json(os.path.join(out, "index.json"))
    assert [r["file"] for r in index["images"]] == names
    assert [r["prompt"] for r in index["images"]] == ["a red circle"] * 2 + ["a blue square!"] * 2
    assert index["seed"] == 0 and index["resolution"] == HIGH
    assert index["checkpoints"]["decoder"]["url"].endswith("decoder/checkpoint_000010")
    assert index["checkpoints"]["prior"]["step"] == 10
    assert index["checkpoints"]["upsamplers"][0]["url"].endswith("upsampler/checkpoint_000010")


def test_sample_is_deterministic_by_seed(cascade_root) -> None:
    c, storage = cascade_root, Storage()

    def run(seed: int, output: str) -> list[bytes]:
        cfg = _sample_cfg(
            c, prompts=["a red circle"], samples_per_prompt=2, seed=seed, output=output
        )
        sampling.run_sample(cfg, storage)
        folder = os.path.join(c["root"], output)
        return [read(os.path.join(folder, n)) for n in sorted(os.listdir(folder))]

    first = run(0, "det/a")
    assert first == run(0, "det/b")  # images, grid and index: the same bytes
    other = run(1, "det/c")
    assert first[0] != other[0] and first[1] != other[1]
    # the decoder can also be conditioned on the text embedding, with no prior at all
    cfg = _sample_cfg(c, prompts=["a red circle"], samples_per_prompt=1, output="det/t")
    cfg.conditioning, cfg.prior = "text_embedding", None
    summary = sampling.run_sample(cfg, storage)
    assert summary["images"] == 1


def test_sample_errors_are_one_line(cascade_root, capsys) -> None:
    c = cascade_root
    code = sample_job.main(["a red circle", *cascade_overrides(c, "prior=checkpoints/decoder")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "error: prior: " in err and "not a train-prior one" in err
    assert sample_job.main([*cascade_overrides(c, "prompts=[]")]) == 1
    assert "no prompts" in capsys.readouterr().err


def test_sample_from_s3(cascade_root, s3_bucket, s3_endpoint) -> None:
    from pipeline.storage import StorageOptions

    c = cascade_root
    storage = Storage(StorageOptions(endpoint_url=s3_endpoint))
    root = f"{s3_bucket}/root"
    clip_url = f"{s3_bucket}/clip/tiny.safetensors"
    storage.copy_from_local(c["clip_path"], clip_url)
    make_cascade_root(storage, root, c["clip_path"])
    cfg = _sample_cfg(c, prompts=["a red circle"], samples_per_prompt=1)
    cfg.root, cfg.storage = root, storage.options
    cfg.clip = ClipSource("tiny-clip", clip_url, TINY_CLIP_CONFIG)
    summary = sampling.run_sample(cfg, storage)
    assert summary["grid"] == f"{root}/samples/grid.png"
    image = _png(storage.read_bytes(f"{root}/samples/000_a-red-circle.png"))
    assert image.size == (HIGH, HIGH)
    index = storage.read_json(f"{root}/samples/index.json")
    assert index["checkpoints"]["decoder"]["url"] == f"{root}/checkpoints/decoder/checkpoint_000010"


def test_variations(cascade_root, capsys) -> None:
    c = cascade_root
    argv = [c["inputs"][0], c["inputs"][1], *cascade_overrides(c, "num=3", "output=out/var")]
    assert variations_job.main(argv) == 0
    out = os.path.join(c["root"], "out", "var")
    assert f"grid: {out}/grid.png" in capsys.readouterr().out
    files = sorted(f for f in os.listdir(out) if f.endswith(".png") and f != "grid.png")
    assert files == [f"{i:03d}_input{i}_{j:02d}.png" for i in range(2) for j in range(3)]
    assert all(Image.open(os.path.join(out, f)).size == (HIGH, HIGH) for f in files)
    cell = max(pictures.MIN_CELL, HIGH)
    grid = Image.open(os.path.join(out, "grid.png"))
    assert grid.size == (4 * cell, 2 * (pictures.CAPTION_HEIGHT + cell))
    # the input is the first cell of its row (a flat colour, shown at the output resolution)
    first = np.asarray(grid)[pictures.CAPTION_HEIGHT : pictures.CAPTION_HEIGHT + cell, :cell]
    assert (first == np.array([230, 30, 30], np.uint8)).all()
    index = _json(os.path.join(out, "index.json"))
    assert index["inputs"] == c["inputs"] and len(index["images"]) == 6
    assert index["latent"] == "inverted" and index["eta"] == 1.0
    # η > 0: the variations of an image differ
    a, b = (read(os.path.join(out, f)) for f in files[:2])
    assert a != b


def test_interpolate(cascade_root, capsys) -> None:
    c = cascade_root
    argv = [*c["inputs"], *cascade_overrides(c, "num=4", "latent=inverted", "output=out/interp")]
    assert interpolate_job.main(argv) == 0
    out = os.path.join(c["root"], "out", "interp")
    index = _json(os.path.join(out, "index.json"))
    thetas = [r["theta"] for r in index["images"]]
    assert thetas == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert [r["file"] for r in index["images"]] == [
        f"{j:03d}_theta-{t:.2f}.png" for j, t in enumerate(thetas)
    ]
    cell = max(pictures.MIN_CELL, HIGH)
    grid = Image.open(os.path.join(out, "grid.png"))
    assert grid.size == ((4 + 2) * cell, pictures.CAPTION_HEIGHT + cell)  # both inputs at the ends
    assert sampling.slug("a Blue  square!") == "a-blue-square"
    assert (
        interpolate_job.main([c["inputs"][0], *cascade_overrides(c)]) == 2
    )  # one image: a bad config
    assert "expected two images, got 1" in capsys.readouterr().err


def test_textdiff(cascade_root, capsys) -> None:
    c = cascade_root
    argv = [
        c["inputs"][0],
        "--from",
        "a red: square",
        "--to",
        "yes",
        *cascade_overrides(c, "num=3", "max_theta=0.4", "output=out/td"),
    ]
    assert textdiff_job.main(argv) == 0
    out = os.path.join(c["root"], "out", "td")
    index = _json(os.path.join(out, "index.json"))
    assert index["from_caption"] == "a red: square" and index["to_caption"] == "yes"
    assert [r["theta"] for r in index["images"]] == pytest.approx([0, 0.2, 0.4])
    assert len([f for f in os.listdir(out) if f.startswith("000_input0_")]) == 3
    cell = max(pictures.MIN_CELL, HIGH)
    assert Image.open(os.path.join(out, "grid.png")).size == (
        4 * cell,
        pictures.CAPTION_HEIGHT + cell,
    )
    assert textdiff_job.main([c["inputs"][0], *cascade_overrides(c)]) == 1
    assert "needs both captions" in capsys.readouterr().err


def test_cli_lists_the_generation_commands(capsys) -> None:
    from jobs import cli

    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("sample", "variations", "interpolate", "textdiff", "generate"):
        assert f"  {command} " in out
    with pytest.raises(SystemExit):
        sample_job.main(["--help"])
    assert "PROMPT | key=value" in capsys.readouterr().out
