"""Stage trainings on Ray Train with 2 CPU workers: the loss falls for each stage, on local disk and
the S3 endpoint; a stopped run resumes at its step and reaches the uninterrupted run's weights (the
same rows and noise, on S3); an incompatible config is refused; an interrupted checkpoint is never
picked up. And, without Ray
Train, the loop's fp16 step: overflowing steps skipped, clipping after unscaling, the loss scale
resumed from a checkpoint."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch
from conftest import Root
from helpers import embed_cfg, stage_cfg, tiny_clip_checkpoint, write_synth

from pipeline import config as configlib
from pipeline.embed.job import run_embedding
from pipeline.errors import UserFacingError
from pipeline.stage_config import (
    DecoderConfig,
    OptimOptions,
    PriorConfig,
    TrainClipConfig,
    TrainOptions,
    UpsamplerConfig,
)
from pipeline.storage import join
from pipeline.train import checkpoints, loop
from pipeline.train.driver import run_training
from unclip.ema import EMA

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    return tiny_clip_checkpoint(str(tmp_path_factory.mktemp("clip") / "tiny.safetensors"), 0)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, s3_endpoint, ray_local, tiny_clip) -> dict[str, Root]:
    """One synthetic dataset (128 images at 64 px) and its embedding store per backend, made once
    for the module: every test trains its own run names under the same root."""
    import uuid

    import boto3

    from pipeline.storage import Storage, StorageOptions

    bucket = f"unclip-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    roots = {
        "local": Root("local", str(tmp_path_factory.mktemp("train") / "root"), Storage()),
        "s3": Root("s3", f"s3://{bucket}/root", Storage(StorageOptions(endpoint_url=s3_endpoint))),
    }
    for root in roots.values():
        write_synth(root, 128, 32)
        run_embedding(embed_cfg(root, tiny_clip), root.storage)
    return roots


@pytest.fixture(params=["local", "s3"])
def trained_root(request, datasets) -> Root:
    """The module's dataset on local disk and on the S3 endpoint."""
    return datasets[request.param]


@pytest.fixture
def s3_root(datasets) -> Root:
    return datasets["s3"]


_cfg = stage_cfg


def _history(root: Root, run_url: str) -> tuple[list[list[float]], str]:
    latest = checkpoints.latest_checkpoint(root.storage, run_url)
    return root.storage.read_json(join(latest, "state.json"))["history"], latest


def _assert_falls(history: list[list[float]], fraction: float) -> None:
    first, last = history[0][1], history[-1][1]
    assert last < fraction * first, f"loss went {first:.4f} → {last:.4f} ({history})"


# At 32 px the UNet runs at full resolution (the tiny configs' patch_size 2 is for 64 px and up):
# 40 steps of a 16 px UNet did not learn enough for the loss test
DECODER_OVERRIDES = [
    "model.image_size=32",
    "model.patch_size=1",
    "model.channels=16",
    "model.channel_mult=[1,2,2]",
    "diffusion.objective=eps",  # ε's loss falls steadily from its start (v's is noisier)
    "model.attention_resolutions=[8]",
    "model.head_channels=16",
    "train.steps=40",
    "train.batch_size=16",
    "optim.lr=1e-3",
]
UPSAMPLER_OVERRIDES = [
    "model.patch_size=1",
    "model.low_res=16",
    "model.high_res=32",
    "model.crop_fraction=0.5",
    # the image-predicting ε upsampler's loss falls clearly from its start; the tiny config's
    # residual x₀ one starts near its floor (its learning is tested in test_decoder_upsampler)
    "model.residual=false",
    "diffusion.objective=eps",
    "train.steps=40",
    "train.batch_size=16",
    "optim.lr=1e-3",
]


# One run per stage, each on one backend (a Ray Train run costs ~30 s on 2 cores): the decoder on
# the S3 endpoint (source tars beside the store, read by key; checkpoints and event files
# uploaded), the others on local disk; the prior below on S3, on local disk in the node-loss
# drill, and as a Ray job on S3 in test_submit.
@pytest.mark.parametrize(
    ("trained_root", "stage", "cls", "folder", "overrides", "fraction"),
    [
        ("s3", "train-decoder", DecoderConfig, "decoder", DECODER_OVERRIDES, 0.7),
        ("local", "train-upsampler", UpsamplerConfig, "upsampler", UPSAMPLER_OVERRIDES, 0.7),
        (
            "local",
            "train-clip",
            TrainClipConfig,
            "clip",
            ["train.steps=30", "train.batch_size=32"],
            0.9,
        ),
    ],
    indirect=["trained_root"],
)
def test_image_stages_train(trained_root: Root, stage, cls, folder, overrides, fraction) -> None:
    root = trained_root
    cfg = _cfg(cls, folder, root, "checkpoint.every_steps=100", "optim.warmup_steps=5", *overrides)
    summary = run_training(stage, cfg, root.storage)
    history, latest = _history(root, cfg.run_url())
    _assert_falls(history, fraction)
    files = set(root.storage.read_json(join(latest, "checkpoint.json"))["files"])
    common = {"model.safetensors", "optimizer.pt", "state.json", "config.yaml", "loss.png"}
    assert common <= files, files
    assert root.storage.list(join(cfg.run_url(), "tensorboard"))
    if stage != "train-clip":
        assert "samples.png" in files
    else:
        assert "clip.safetensors" in files
    assert summary["step"] == cfg.train.steps


def _weights(root: Root, run_url: str, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    latest = checkpoints.latest_checkpoint(root.storage, run_url)
    return load(root.storage.read_bytes(join(latest, name)))


# The resume tests' prior runs: 30 steps, checkpoints at 10, 20 and 30, 2 data streams.
RESUMED = [
    "train.steps=30",
    "checkpoint.every_steps=10",
    "train.batch_size=32",
    "optim.warmup_steps=5",
    "train.data_streams=2",
]


@pytest.fixture(scope="module")
def straight_prior(datasets) -> tuple[Any, str]:
    """An uninterrupted prior run on the S3 endpoint (DDP, 2 workers, 2 data streams): trained to
    step 30, its loss fell; (config, latest checkpoint). The DDP and the FSDP resume tests both
    compare with it: one fit fewer, and FSDP checked against DDP's weights."""
    root = datasets["s3"]
    cfg = _cfg(PriorConfig, "prior", root, "run=straight", *RESUMED)
    assert run_training("train-prior", cfg, root.storage)["step"] == 30
    history, latest = _history(root, cfg.run_url())
    _assert_falls(history, 0.5)
    return cfg, latest


def _assert_resumed_equals_straight(root: Root, straight: Any, resumed: Any, *names: str) -> None:
    """The resumed run logged the uninterrupted run's losses, counted one resume and the same
    samples, and its checkpoint's ``names`` hold the same weights (float tolerance)."""
    a, _ = _history(root, straight.run_url())
    b, _ = _history(root, resumed.run_url())
    assert [s for s, _ in a] == [s for s, _ in b] == [5, 10, 15, 20, 25, 30]
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert abs(x - y) <= 1e-4 * max(abs(x), abs(y)), (a, b)
    for name in names:
        want, got = (
            _weights(root, straight.run_url(), name),
            _weights(root, resumed.run_url(), name),
        )
        assert want.keys() == got.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=key)
    state = root.storage.read_json(
        join(checkpoints.latest_checkpoint(root.storage, resumed.run_url()), "state.json")
    )
    assert state["step"] == 30 and state["samples"] == 30 * 32 and state["resumes"] == 1


def test_prior_trains_and_a_resumed_run_reaches_the_uninterrupted_weights(
    s3_root: Root, straight_prior: tuple[Any, str]
) -> None:
    """On the S3 endpoint, with 2 workers: the prior learns, writing whole checkpoints and its
    events; a run stopped at step 10 and rerun draws the uninterrupted run's data and noise and
    reaches its weights; on the way, a half-written newer checkpoint is never picked and an
    incompatible config (another model, another batch size) is refused."""
    root = s3_root
    common = RESUMED
    straight, latest = straight_prior
    marker = root.storage.read_json(join(latest, "checkpoint.json"))
    assert {
        "model.safetensors",
        "ema.safetensors",
        "optimizer.pt",
        "state.json",
        "config.yaml",
        "loss.png",
    } <= set(marker["files"])
    assert len(checkpoints.list_checkpoints(root.storage, straight.run_url())) == 2  # keep: 2
    assert root.storage.list(join(straight.run_url(), "tensorboard"))
    saved = configlib.from_dict(
        PriorConfig,
        configlib.read_yaml_text(root.storage.read_text(join(straight.run_url(), "config.yaml"))),
        source="saved",
    )
    assert saved.model == straight.model and saved.train == straight.train

    stopped = _cfg(PriorConfig, "prior", root, "run=stopped", "train.stop_at_step=10", *common)
    assert run_training("train-prior", stopped, root.storage)["step"] == 10
    good = checkpoints.latest_checkpoint(root.storage, stopped.run_url())
    state = root.storage.read_json(join(good, "state.json"))
    assert set(state["streams"]) == {"0", "1"}  # both data streams' positions

    # A checkpoint whose upload was cut short: newer name, files but no or a wrong marker.
    partial = join(stopped.run_url(), "checkpoint_2099-01-01_00-00-00.000000")
    root.storage.write_bytes(join(partial, "model.safetensors"), b"truncated")
    root.storage.write_text(
        join(partial, "checkpoint.json"),
        json.dumps({"step": 99, "files": {"model.safetensors": 10**6}}),
    )
    assert checkpoints.latest_checkpoint(root.storage, stopped.run_url()) == good

    for change, keys in (
        (["model.width=64", "model.heads=2"], r"\(model: "),
        (["train.batch_size=16"], r"\(train.batch_size: 32 in the run, 16 now"),
    ):
        other = _cfg(PriorConfig, "prior", root, "run=stopped", *common, *change)
        with pytest.raises(
            UserFacingError, match=r"was trained to step 10 with another config " + keys
        ):
            run_training("train-prior", other, root.storage)

    resumed = _cfg(PriorConfig, "prior", root, "run=stopped", *common)
    assert run_training("train-prior", resumed, root.storage)["step"] == 30
    _assert_resumed_equals_straight(root, straight, resumed, "model.safetensors", "ema.safetensors")


def test_fsdp_prior_learns_and_a_run_resumed_on_one_worker_reaches_the_uninterrupted_weights(
    s3_root: Root, straight_prior: tuple[Any, str]
) -> None:
    """FSDP2 on the S3 endpoint: the prior learns on 2 workers, writing sharded checkpoints (every
    rank's part, no single model file) with a consolidated EMA; a run stopped at step 10 and
    resumed on one worker (the checkpoint resharded 2 → 1, the same 2 data streams) reaches the
    uninterrupted DDP run's weights and EMA (the same math sharded: float tolerance); the exported
    EMA loads for sampling; a switch to DDP is refused."""
    from pipeline.generate.cascade import find_checkpoint, load_stage_model

    root = s3_root
    straight, _ = straight_prior
    common = [*RESUMED, "scaling.strategy=fsdp"]
    stopped = _cfg(PriorConfig, "prior", root, "run=fsdp-stopped", "train.stop_at_step=10", *common)
    assert run_training("train-prior", stopped, root.storage)["step"] == 10
    latest = checkpoints.latest_checkpoint(root.storage, stopped.run_url())
    files = set(root.storage.read_json(join(latest, "checkpoint.json"))["files"])
    assert {
        "parts/.metadata",
        "parts/__0_0.distcp",
        "parts/__1_0.distcp",
        "ema.safetensors",
        "state.json",
        "config.yaml",
        "loss.png",
    } <= files, files
    assert not {"model.safetensors", "optimizer.pt"} & files

    ddp = _cfg(PriorConfig, "prior", root, "run=fsdp-stopped", *common, "scaling.strategy=ddp")
    with pytest.raises(UserFacingError, match=r"scaling.strategy: 'fsdp' in the run, 'ddp' now"):
        run_training("train-prior", ddp, root.storage)
    resumed = _cfg(PriorConfig, "prior", root, "run=fsdp-stopped", *common, "scaling.num_workers=1")
    assert run_training("train-prior", resumed, root.storage)["step"] == 30
    _assert_falls(_history(root, resumed.run_url())[0], 0.5)
    _assert_resumed_equals_straight(root, straight, resumed, "ema.safetensors")
    want = _weights(root, straight.run_url(), "ema.safetensors")

    checkpoint = find_checkpoint(root.storage, resumed.run_url(), "train-prior", "prior")
    model = load_stage_model(root.storage, checkpoint)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=1e-4, atol=1e-6, msg=key)
    tokens = torch.zeros(2, 77, dtype=torch.long)
    drawn = model.sample_candidates(torch.randn(2, 64), tokens, steps=2, num_candidates=1)
    assert drawn.shape == (2, 1, 64) and torch.isfinite(drawn).all()


# ----------------------------------------------------------------------------------------------
# fp16: the loop's step pieces on CPU, without Ray Train (milliseconds)

FP16_CLIP = 0.1


def _fp16_run(seed: int = 0) -> dict:
    """What a worker holds for a tiny fp16 run on the CPU: a bias-free linear layer (its bias's
    gradient, summed over the batch, would overflow before the weight's), AdamW, the schedule, the
    loss scaler, the EMA and the loop's counters."""
    cfg = PriorConfig(
        train=TrainOptions(precision="fp16", steps=10, batch_size=4),
        optim=OptimOptions(lr=1e-2, grad_clip=FP16_CLIP),
    )
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 4, bias=False)
    optimizer = loop.make_optimizer(model, cfg)
    return {
        "cfg": cfg,
        "model": model,
        "optimizer": optimizer,
        "schedule": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: loop.lr_factor(s, cfg)),
        "scaler": loop.grad_scaler(cfg, torch.device("cpu")),
        "ema": EMA(model, 0.5),
        "state": {"step": 0, "epoch": 0, "batch_in_epoch": 0, "samples": 0, "history": []},
    }


def _fp16_step(run: dict):
    """One step as the loop takes it. The loss's gradient is 1.5 per output, which times the initial
    scale 2^16 overflows fp16 (max 65504) and times 2^15 does not: the first step is skipped and
    the scale halved, later ones step at 2^15."""
    cfg, model, optimizer = run["cfg"], run["model"], run["optimizer"]
    g = torch.Generator().manual_seed(run["state"]["step"])
    x = torch.rand(4, 8, generator=g) * 0.2 - 0.1
    optimizer.zero_grad(set_to_none=True)
    with loop.autocast(cfg, torch.device("cpu")):
        y = model(x)
    assert y.dtype == torch.float16  # fp16 autocast runs on the CPU
    loop.backward((y.float() * 1.5).sum(), 1, run["scaler"])
    grad_norm = loop.finish_step(
        model=model,
        optimizer=optimizer,
        scaler=run["scaler"],
        schedule=run["schedule"],
        ema=run["ema"],
        state=run["state"],
        grad_clip=cfg.optim.grad_clip,
        batch_size=cfg.train.batch_size,
    )
    return x, grad_norm


def test_fp16_scaler_skips_overflowing_steps_and_clips_unscaled_gradients() -> None:
    cpu = torch.device("cpu")
    for precision, enabled in (("fp16", True), ("bf16", False), ("fp32", False), ("auto", False)):
        cfg = PriorConfig(train=TrainOptions(precision=precision))
        assert loop.grad_scaler(cfg, cpu).is_enabled() is enabled, precision

    run = _fp16_run()
    before = run["model"].weight.detach().clone()
    _, grad_norm = _fp16_step(run)  # 1.5 × 2^16 overflows: skipped
    assert not torch.isfinite(grad_norm)
    assert torch.equal(run["model"].weight, before) and not run["optimizer"].state
    assert run["scaler"].get_scale() == 2.0**15
    counters = {k: run["state"][k] for k in ("step", "samples", "skipped_steps")}
    assert counters == {"step": 1, "samples": 4, "skipped_steps": 1}  # the batch still counts
    assert run["schedule"].last_epoch == 0 and run["ema"].step == -1  # neither advanced

    x, grad_norm = _fp16_step(run)  # 1.5 × 2^15 fits: steps
    # the norm of the true gradient (dL/dW = 1.5 · Σ_b x_b per output row), not of the scaled one
    expected = torch.linalg.vector_norm(1.5 * x.sum(0).expand(4, 8))
    assert float(grad_norm) == pytest.approx(float(expected), rel=2e-3)
    # clipped after unscaling: the gradient the optimizer used has norm grad_clip (clipping the
    # scaled gradient, then unscaling, would leave grad_clip / 2^15)
    assert float(torch.linalg.vector_norm(run["model"].weight.grad)) == pytest.approx(
        FP16_CLIP, rel=1e-3
    )
    assert not torch.equal(run["model"].weight, before)
    assert run["state"]["skipped_steps"] == 1 and run["state"]["step"] == 2
    assert run["schedule"].last_epoch == 1 and run["ema"].step == 2
    assert run["scaler"].get_scale() == 2.0**15


def test_fp16_resume_restores_the_loss_scale(tmp_path) -> None:
    """A run checkpointed after its skipped first step and resumed takes the same steps as an
    uninterrupted one: the checkpoint carries the backed-off scale (a fresh scaler would start at
    2^16 and skip the next step again)."""
    straight = _fp16_run()
    for _ in range(4):
        _fp16_step(straight)

    def resumed(with_scale: bool) -> dict:
        first = _fp16_run()
        for _ in range(2):
            _fp16_step(first)
        folder = str(tmp_path / f"checkpoint-{with_scale}")
        state = loop.checkpoint_state(
            first["state"], first["schedule"], first["ema"], first["scaler"]
        )
        if not with_scale:
            state.pop("grad_scaler")
        checkpoints.write_local(
            folder,
            model_state=first["model"].state_dict(),
            ema_state=first["ema"].averaged_state_dict(),
            optimizer_state=first["optimizer"].state_dict(),
            state=state,
            config_yaml="",
        )
        again = _fp16_run(seed=1)  # other initial weights: everything must come from the checkpoint
        parts = {k: again[k] for k in ("model", "optimizer", "schedule", "scaler", "ema", "state")}
        loop.restore(checkpoints.read_local(folder), **parts)
        for _ in range(2):
            _fp16_step(again)
        return again

    run = resumed(with_scale=True)
    saved = json.loads((tmp_path / "checkpoint-True" / "state.json").read_text())
    assert saved["grad_scaler"]["scale"] == 2.0**15 and saved["skipped_steps"] == 1
    assert torch.equal(run["model"].weight, straight["model"].weight)
    assert torch.equal(run["ema"].shadow["weight"], straight["ema"].shadow["weight"])
    assert run["scaler"].state_dict() == straight["scaler"].state_dict()
    assert run["schedule"].state_dict() == straight["schedule"].state_dict()
    assert run["state"]["skipped_steps"] == straight["state"]["skipped_steps"] == 1
    assert run["state"]["step"] == 4 and run["state"]["resumes"] == 1

    unscaled = resumed(with_scale=False)  # the control: without the saved scale it diverges
    assert unscaled["state"]["skipped_steps"] == 2
    assert not torch.equal(unscaled["model"].weight, straight["model"].weight)
