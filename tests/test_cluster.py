"""Which Ray a command runs on: ``ray.address`` and ``RAY_ADDRESS`` decide, never what else runs on
the machine or what an earlier Ray left in its temp dir.

A real ``ray start --head`` (token auth on) stands for the user's cluster. Each command is a real
``python -m jobs.synth`` process (it runs its shards on Ray Data); the head's job list, which holds
every driver that ever connected, tells whether a command joined it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.cluster import submit as jobs_api
from pipeline.cluster.connect import joins_cluster
from pipeline.stage_config import RayOptions

PROJECT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("address", "ray_address", "joins"),
    [
        (None, None, False),
        (None, "10.0.0.1:6379", True),
        ("local", "10.0.0.1:6379", False),
        ("auto", None, True),
        ("ray://head:10001", None, True),
    ],
)
def test_joins_cluster(monkeypatch, address, ray_address, joins) -> None:
    if ray_address:
        monkeypatch.setenv("RAY_ADDRESS", ray_address)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert joins_cluster(RayOptions(address=address)) is joins


def _synth(root: Path, env: dict[str, str], *overrides: str) -> str:
    """Run ``python -m jobs.synth`` (8 tiny images in 2 shards); returns its log: the terminal's
    stderr and the run's log file under ``<root>/logs/`` (the quiet terminal leaves INFO to it)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.synth",
            f"root={root}",
            "num_samples=8",
            "samples_per_shard=4",
            "image_size=32",
            *overrides,
        ],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "synth: 8 images in 2 shards" in proc.stdout, proc.stdout
    files = sorted((root / "logs").glob("synth-*.log"))
    assert len(files) == 1 and f"log: {files[0]}" in proc.stdout, proc.stdout
    return proc.stderr + files[0].read_text()


def _drivers(head) -> list[str]:
    """The head's driver jobs. Its dashboard answers slowly while the suite loads both cores, so
    a refused or timed-out request is tried again for up to a minute."""
    deadline = time.time() + 60
    while True:
        try:
            client = jobs_api.connect(head.dashboard, {"Authorization": f"Bearer {head.token}"})
            return [job.job_id for job in client.list_jobs() if job.type == "DRIVER"]
        except Exception as exc:
            if time.time() > deadline:
                raise AssertionError(f"{exc}\n{head.logs()}") from exc
            time.sleep(2)


def test_local_address_never_joins_a_running_head(ray_head, tmp_path) -> None:
    # The user's shell talks to their cluster: RAY_ADDRESS and its token are set.
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_head.gcs,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": ray_head.token,
    }
    assert _drivers(ray_head) == []

    # ray.address: local starts a private Ray (1 CPU, where the head has 2) beside the head.
    log = _synth(tmp_path / "a", env, "ray.address=local", "ray.num_cpus=1")
    assert "not joining RAY_ADDRESS" in log and "Ray started locally: {" in log, log
    assert "'CPU': 1.0" in log, log
    assert _drivers(ray_head) == []

    # With no RAY_ADDRESS, null starts a private Ray too, even where the temp dir's
    # ray_current_cluster names a live cluster (which Ray's own ray.init() would join).
    stale = tempfile.mkdtemp(prefix="st-", dir="/tmp")  # short: Ray's socket paths are limited
    try:
        os.mkdir(os.path.join(stale, "ray"))
        Path(stale, "ray", "ray_current_cluster").write_text(ray_head.gcs)
        no_address = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
        log = _synth(tmp_path / "b", {**no_address, "RAY_TMPDIR": stale}, "ray.num_cpus=1")
    finally:
        shutil.rmtree(stale, ignore_errors=True)
    assert "Ray started locally: {" in log, log
    assert _drivers(ray_head) == []

    # The control: null with RAY_ADDRESS set (as in a submitted job) joins the head, and the
    # head's job list shows it; so the empty lists above mean the head was left alone.
    log = _synth(tmp_path / "c", env)
    assert "Ray joined: {" in log, log
    assert len(_drivers(ray_head)) == 1
