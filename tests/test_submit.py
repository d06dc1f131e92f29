"""``unclip submit``: configs are checked before the cluster is contacted, credentials stay off the
job API, and stages really run as Ray jobs on a head started with ``ray start --head`` (token
authentication on), reading and writing the moto S3 endpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import FAKE_KEY_ID, FAKE_SECRET
from helpers import free_port, tiny_clip_checkpoint

from jobs import submit as submit_cli
from pipeline.cluster import submit as jobs_api
from pipeline.errors import UserFacingError
from pipeline.storage import Secret, StorageOptions
from unclip.fields import param

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


# ----------------------------------------------------------------------------------------------
# Secrets stay on this machine (issue 16)

SECRET = "XYZ-unclip-override-secret-7Qm"


class _NoCluster:
    """Stands in for the cluster API: any contact fails the test."""

    def __init__(self, monkeypatch) -> None:
        monkeypatch.setattr(jobs_api, "connect", self._contact)
        monkeypatch.setattr(jobs_api, "submit", self._contact)

    @staticmethod
    def _contact(*args, **kwargs):
        raise AssertionError("the cluster was contacted")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        (f"storage.secret_access_key={SECRET}", "storage.secret_access_key"),
        (f"storage.access_key_id={SECRET}", "storage.access_key_id"),
        (f"storage={{secret_access_key: {SECRET}}}", "storage.secret_access_key"),
    ],
    ids=["secret_access_key", "access_key_id", "section"],
)
@pytest.mark.parametrize("mode", ["--dry-run", "submit"])
def test_a_secret_override_is_refused_before_the_cluster_naming_only_its_key(
    override: str, key: str, mode: str, capsys, monkeypatch
) -> None:
    _NoCluster(monkeypatch)
    where = ["--dry-run"] if mode == "--dry-run" else ["--address", "http://127.0.0.1:9"]
    code = submit_cli.main(["train-prior", *where, override], prog="unclip submit")
    out, err = capsys.readouterr()
    assert code == 2
    assert f"override {key}=...: {key} is a secret" in err and "--env NAME" in err
    assert len(err.strip().splitlines()) == 1
    assert SECRET not in out + err


@dataclass
class _Inner:
    token: str | None = param(None, "declared secret", secret=True)
    password: Secret | None = param(None, "typed secret")
    name: str = param("x", "not secret")


@dataclass
class _Outer:
    inner: _Inner | None = param(None, "an optional section")
    store: StorageOptions = param(factory=StorageOptions, doc="nested")


def test_secret_keys_are_found_from_the_fields_themselves() -> None:
    from pipeline.stage_config import PriorConfig

    assert jobs_api.secret_keys(PriorConfig) == {
        "storage.access_key_id",
        "storage.secret_access_key",
    }
    assert jobs_api.secret_keys(_Outer) == {
        "inner.token",
        "inner.password",
        "store.access_key_id",
        "store.secret_access_key",
    }


def test_a_secret_set_to_null_gives_nothing_away_and_is_let_through(capsys, monkeypatch) -> None:
    _NoCluster(monkeypatch)
    code = submit_cli.main(["train-prior", "--dry-run", "storage.secret_access_key=null"])
    assert code == 0, capsys.readouterr().err


def test_a_secret_in_an_uploaded_config_file_is_refused(tmp_path, capsys, monkeypatch) -> None:
    _NoCluster(monkeypatch)
    config = tmp_path / "prior.yaml"
    config.write_text(f"storage:\n  secret_access_key: {SECRET}\n")
    code = submit_cli.main(
        ["train-prior", "--dry-run", "--working-dir", str(tmp_path), "--config", str(config)]
    )
    out, err = capsys.readouterr()
    assert code == 2
    assert f"{config}: storage.secret_access_key is set" in err
    assert SECRET not in out + err
    # installed, the file is not sent: the job reads the cluster's own copy of the path
    code = submit_cli.main(["train-prior", "--dry-run", "--installed", "--config", str(config)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert SECRET not in out + err


def test_the_endpoint_is_forwarded_without_its_credentials(capsys, monkeypatch) -> None:
    environ = {
        "AWS_ENDPOINT_URL": f"http://minio-user:{SECRET}@minio:9000/path",
        "AWS_ENDPOINT_URL_S3": f"https://{SECRET}@s3.example:443",
        "AWS_REGION": "eu-west-1",
    }
    assert jobs_api.environment([], environ) == {
        "AWS_ENDPOINT_URL": "http://minio:9000/path",
        "AWS_ENDPOINT_URL_S3": "https://s3.example:443",
        "AWS_REGION": "eu-west-1",
    }
    assert jobs_api.environment([], {"AWS_ENDPOINT_URL": "http://minio:9000"}) == {
        "AWS_ENDPOINT_URL": "http://minio:9000"
    }

    # the whole command: what is submitted and what is printed
    for name in ("AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    sent = []
    monkeypatch.setattr(jobs_api, "connect", lambda address, headers: object())
    monkeypatch.setattr(jobs_api, "submit", lambda client, sub: sent.append(sub) or "job-1")
    code = submit_cli.main(["train-prior", "--address", "http://head:8265", "--no-wait"])
    out, err = capsys.readouterr()
    assert code == 0, err
    (sub,) = sent
    assert sub.runtime_env["env_vars"]["AWS_ENDPOINT_URL"] == "http://minio:9000/path"
    assert sub.runtime_env["env_vars"]["AWS_ENDPOINT_URL_S3"] == "https://s3.example:443"
    assert SECRET not in repr(sub) and SECRET not in out + err
    assert "submitted job-1 to http://head:8265" in out
