"""``unclip submit``: configs are checked before the cluster is contacted, credentials stay off the
job API, and stages really run as Ray jobs on a head started with ``ray start --head`` (token
authentication on), reading and writing the moto S3 endpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FAKE_KEY_ID, FAKE_SECRET
from helpers import free_port, tiny_clip_checkpoint

from jobs import submit as submit_cli
from pipeline.cluster import submit as jobs_api
from pipeline.errors import UserFacingError

PROJECT = Path(__file__).resolve().parents[1]


def test_bad_config_fails_before_any_cluster_is_contacted(capsys) -> None:
    # port 9 (discard) on localhost: nothing answers; the config error must come first
    code = submit_cli.main(
        ["train-prior", "--address", "http://127.0.0.1:9", "optim.lrr=1"], prog="unclip submit"
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "optim.lrr: unknown key (did you mean 'optim.lr'?)" in err


def test_dry_run_shows_the_job_without_credentials(capsys, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)  # the S3 fixture may have set them
    code = submit_cli.main(
        [
            "train-prior",
            "--dry-run",
            "--env",
            "WANDB_MODE",
            "--env",
            "EXTRA=1",
            "--config",
            str(PROJECT / "configs" / "prior" / "tiny.yaml"),
            "root=s3://bucket/unclip",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert (
        "entrypoint: python -m jobs.train_prior --config configs/prior/tiny.yaml "
        "root=s3://bucket/unclip" in out
    )
    assert '"env_vars": ["AWS_ENDPOINT_URL", "EXTRA", "WANDB_MODE"]' in out
    assert f'"working_dir": "{PROJECT}"' in out and '".venv"' in out
    assert FAKE_SECRET not in out and FAKE_KEY_ID not in out
    sub = jobs_api.build_submission(
        "train-prior",
        "jobs.train_prior",
        "configs/prior/tiny.yaml",
        [],
        project=PROJECT,
        working_dir=PROJECT,
        env=jobs_api.environment([]),
    )
    assert set(sub.runtime_env["env_vars"]) == {"AWS_ENDPOINT_URL"}  # never the credentials


def test_config_outside_the_working_dir_is_refused(tmp_path) -> None:
    config = tmp_path / "prior.yaml"
    config.write_text("train: {steps: 5}\n")
    with pytest.raises(UserFacingError, match="outside the working directory"):
        jobs_api.job_config_path(str(config), PROJECT, PROJECT)
    # installed: the path is the cluster's, passed as written
    assert jobs_api.job_config_path(str(config), PROJECT, None) == str(config)
    assert (
        jobs_api.job_config_path(str(PROJECT / "configs/prior/paper.yaml"), PROJECT, None)
        == "configs/prior/paper.yaml"
    )


def test_token_comes_from_a_file_or_the_environment(tmp_path) -> None:
    token = tmp_path / "token"
    token.write_text("abc123\n")
    assert jobs_api.auth_headers(str(token), {}) == {"Authorization": "Bearer abc123"}
    assert jobs_api.auth_headers(None, {"RAY_AUTH_TOKEN": "xyz"}) == {"Authorization": "Bearer xyz"}
    assert jobs_api.auth_headers(None, {"RAY_AUTH_TOKEN_PATH": str(token)}) == {
        "Authorization": "Bearer abc123"
    }
    assert jobs_api.auth_headers(None, {}) == {}
    (tmp_path / "empty").write_text("")
    with pytest.raises(UserFacingError, match="is empty"):
        jobs_api.auth_headers(str(tmp_path / "empty"), {})
    with pytest.raises(UserFacingError, match="missing"):
        jobs_api.auth_headers(str(tmp_path / "missing"), {})


def test_unreachable_head_is_one_clear_error(capsys) -> None:
    port = free_port()  # nothing listens there
    code = submit_cli.main(["train-prior", "--address", f"http://127.0.0.1:{port}"])
    assert code == 1
    err = capsys.readouterr().err
    assert f"cannot reach the Ray dashboard at http://127.0.0.1:{port}" in err


# ----------------------------------------------------------------------------------------------
# A real head


def test_a_wrong_token_is_refused(ray_head, tmp_path, capsys) -> None:
    address = ray_head.dashboard
    wrong = tmp_path / "token"
    wrong.write_text("not-the-token")
    code = submit_cli.main(
        ["train-prior", "--address", address, "--token-file", str(wrong), "--no-wait"]
    )
    assert code == 1 and "the token was refused" in capsys.readouterr().err


def test_embed_then_prior_run_as_ray_jobs_on_s3(ray_head, s3_bucket, tmp_path, monkeypatch, capsys):
    from pipeline.data import synth
    from pipeline.embed.store import EmbeddingStore
    from pipeline.stage_config import SynthConfig
    from pipeline.storage import Storage, join
    from pipeline.train.checkpoints import latest_checkpoint

    address, token = ray_head.dashboard, ray_head.token
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    storage = Storage()
    root = f"{s3_bucket}/unclip"
    cfg = SynthConfig(root=root, num_samples=48, samples_per_shard=24, image_size=64)
    for shard in range(2):  # written here, without Ray: the jobs are what is under test
        synth.write_shard(storage, cfg.url(cfg.output), shard, cfg)
    clip = tiny_clip_checkpoint(str(tmp_path / "clip.safetensors"), 0)

    common = ["--address", address, f"root={root}"]
    code = submit_cli.main(
        ["embed", *common, f"clip.pretrained={clip}", "batch_size=8", "concurrency=1"]
    )
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "job unclip-embed-" in out and ": SUCCEEDED" in out
    assert "the store has 48 rows" in out  # the job's own summary line, streamed back

    code = submit_cli.main(
        [
            "train-prior",
            *common,
            "train.steps=10",
            "train.batch_size=16",
            "checkpoint.every_steps=10",
            "train.log_every=5",
            "scaling.num_workers=1",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "step 10" in out

    store = EmbeddingStore.locate(storage, join(root, "embeddings"), None)
    assert sum(r["rows"] for r in store.completed().values()) == 48
    checkpoint = latest_checkpoint(storage, join(root, "checkpoints", "prior"))
    assert checkpoint is not None
    assert storage.read_json(join(checkpoint, "state.json"))["step"] == 10
    assert token not in out
