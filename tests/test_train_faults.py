"""Checkpoint uploads under storage faults (a proxy in front of the S3 endpoint, :mod:`faults`):
a reset upload is retried and the run goes on; an upload that keeps failing fails the run cleanly,
the cut-short checkpoint is never picked up, and a rerun continues from the last whole one."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import Root
from faults import Fault
from helpers import embed_cfg, stage_cfg, tiny_clip_checkpoint, write_synth

from pipeline.embed.job import run_embedding
from pipeline.errors import UserFacingError
from pipeline.stage_config import PriorConfig
from pipeline.storage import Storage, StorageOptions, join
from pipeline.train import checkpoints
from pipeline.train.driver import run_training

pytestmark = pytest.mark.usefixtures("ray_local")

MODEL_UPLOAD = r"/checkpoint_[^/]+/model\.safetensors"


def test_checkpoint_uploads_survive_resets_and_fail_cleanly(
    tmp_path, s3_bucket, s3_endpoint, faulty_s3
) -> None:
    direct = Root("s3", f"{s3_bucket}/root", Storage(StorageOptions(endpoint_url=s3_endpoint)))
    clip = tiny_clip_checkpoint(str(tmp_path / "clip.safetensors"), 0)
    write_synth(direct, 64, 32)
    run_embedding(embed_cfg(direct, clip), direct.storage)
    options = StorageOptions(
        endpoint_url=faulty_s3.url, retries=3, retry_backoff_s=0.05, max_attempts=2
    )
    proxied = Root("s3", direct.url, Storage(options))

    def cfg(run: str) -> PriorConfig:
        c = stage_cfg(
            PriorConfig,
            "prior",
            proxied,
            f"run={run}",
            "train.steps=20",
            "checkpoint.every_steps=10",
            "train.max_failures=0",
        )
        return dataclasses.replace(c, storage=options)

    # The step-10 checkpoint's model upload is reset once and retried by the storage layer; every
    # upload of the step-20 one fails (the retried step-10 upload is let through first): the run
    # fails, naming the stage and run, with step 10 as its last whole checkpoint.
    reset = faulty_s3.add(Fault("PUT", MODEL_UPLOAD, "reset_request", times=1))
    broken = faulty_s3.add(Fault("PUT", MODEL_UPLOAD, "reset_request", times=None, after=1))
    first = cfg("broken")
    with pytest.raises(UserFacingError, match=r"train-prior run .*/broken failed"):
        run_training("train-prior", first, proxied.storage)
    assert reset.hits == 1 and broken.passed == 1 and broken.hits >= 3
    found = checkpoints.list_checkpoints(direct.storage, first.run_url())
    assert [step for step, _ in found] == [10]  # what was cut short is never picked up
    cut_short = [  # the step-20 folder: its other files are there, its marker never written
        u
        for u in direct.storage.list(first.run_url())
        if "/checkpoint_2" in u and not direct.storage.exists(join(u, checkpoints.MARKER))
    ]
    assert len(cut_short) == 1 and direct.storage.exists(join(cut_short[0], "ema.safetensors"))

    faulty_s3.clear()  # storage heals: the rerun continues from step 10
    summary = run_training("train-prior", cfg("broken"), proxied.storage)
    assert summary["step"] == 20
    state = direct.storage.read_json(join(summary["checkpoint"], "state.json"))
    assert state["resumes"] == 1 and state["samples"] == 20 * first.train.batch_size
