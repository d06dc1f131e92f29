"""Fixtures shared by every test: a local S3 endpoint (moto), a local Ray, and storage roots.

* ``s3_endpoint`` (session): moto's S3 server on 127.0.0.1 in a subprocess, with the AWS environment
  variables pointing every client at it (boto3, s3fs, pyarrow, and Ray workers started afterwards).
* ``s3_bucket``: a fresh, empty bucket for each test.
* ``faulty_s3``: a loopback proxy in front of the S3 endpoint that resets or stalls chosen requests.
* ``ray_local`` (session): a local Ray with 2 CPUs and its own temp dir, started after the S3
  endpoint so its workers inherit the endpoint's environment.
* ``storage_root``: parametrised over ``local`` and ``s3``; a test that takes it runs on both.
* ``ray_head`` (per module): ``ray start --head`` with token auth, as a user's cluster would be.

The suite depends on nothing a Ray run leaves on the machine: it removes ``RAY_ADDRESS`` from its
environment and points ``RAY_TMPDIR`` at a private directory (removed at exit) before anything
starts Ray, so no test reads or writes ``/tmp/ray`` (its ``ray_current_cluster`` names whatever
Ray last ran there) and every Ray a test starts, in this process or a child, is its own.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from faults import FaultProxy
from helpers import free_port, free_ports

from pipeline.storage import Storage, StorageOptions, patched_environ


def pytest_configure(config: pytest.Config) -> None:
    """Before any test: no ``RAY_ADDRESS``, and a private ``RAY_TMPDIR`` (see the module's doc)."""
    os.environ.pop("RAY_ADDRESS", None)
    # short: Ray's socket paths are limited
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ut-", dir="/tmp")
    # Ray Train's controller polls its workers every 2 s, which adds seconds to each of the
    # suite's few-step trainings; their results are the same at any interval
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # CLIP checkpoints fetched by actors are cached per node; the suite's cache is its own
    os.environ["UNCLIP_CHECKPOINT_CACHE"] = os.path.join(os.environ["RAY_TMPDIR"], "checkpoints")
    # Torch on one intra-op thread in the test processes: the suite runs two at a time on two
    # cores (pytest-xdist), its models are tiny, and oversubscribed OpenMP threads spin against
    # each other (a module of tiny trainings ran 4x slower beside another test than alone).
    # Ray's workers get one thread per CPU they hold from Ray itself.
    import torch

    torch.set_num_threads(1)


def pytest_unconfigure(config: pytest.Config) -> None:
    temp_dir = os.environ.pop("RAY_TMPDIR", None)
    if temp_dir:
        shutil.rmtree(temp_dir, ignore_errors=True)


# Dummy credentials for moto; tests assert that these never appear in messages or logs.
FAKE_KEY_ID = "AKIAUNCLIPTESTKEYID0"
FAKE_SECRET = "unclip-test-secret-Zq8vP2mX"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"moto server did not start; see {log.name}") from None
            time.sleep(0.1)
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    try:
        with patched_environ(env):
            yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh bucket (``s3://name``) for this test."""
    import boto3

    name = f"unclip-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture
def faulty_s3(s3_endpoint: str) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the S3 endpoint (:mod:`faults`). Point a client at it
    with ``storage.endpoint_url=<proxy.url>`` (it travels to Ray workers with the config); add
    faults with ``proxy.add(Fault(...))``."""
    proxy = FaultProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture(scope="session")
def ray_local(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A local Ray (2 CPUs) for the whole session, in a temp dir of its own."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths are limited
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=temp_dir,
        log_to_driver=False,
    )
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass
class Root:
    """A storage root for a test: where to write (``url``) and how (``storage``)."""

    kind: str
    url: str
    storage: Storage


def _calls(monkeypatch, method: str, last_part: bool) -> list[str]:
    """Every URL (or its last path part) given to ``Storage.<method>`` during the test."""
    seen: list[str] = []
    original = getattr(Storage, method)

    def counted(self, url, *args, **kwargs):
        seen.append(url.rstrip("/").rsplit("/", 1)[-1] if last_part else url)
        return original(self, url, *args, **kwargs)

    monkeypatch.setattr(Storage, method, counted)
    return seen


@pytest.fixture
def listings(monkeypatch) -> list[str]:
    """The folders listed through ``Storage.list_details`` (last path part), in order."""
    return _calls(monkeypatch, "list_details", last_part=True)


@pytest.fixture
def json_reads(monkeypatch) -> list[str]:
    """The URLs read through ``Storage.read_json``, in order."""
    return _calls(monkeypatch, "read_json", last_part=False)


@pytest.fixture(params=["local", "s3"])
def storage_root(request: pytest.FixtureRequest, tmp_path) -> Root:
    """The same test on local disk and on the S3 endpoint."""
    if request.param == "local":
        return Root("local", str(tmp_path / "root"), Storage())
    bucket = request.getfixturevalue("s3_bucket")
    endpoint = request.getfixturevalue("s3_endpoint")
    return Root("s3", f"{bucket}/root", Storage(StorageOptions(endpoint_url=endpoint)))


@dataclass
class RayHead:
    """A running ``ray start --head``: its dashboard (the job API), its GCS address (what
    ``RAY_ADDRESS`` names for a driver) and the token its clients must send."""

    dashboard: str
    gcs: str
    token: str
    temp_dir: str = ""  # head.log (``ray start``'s output) and the session's logs

    def logs(self, tail: int = 2000) -> str:
        """The ends of the head's output and its dashboard's logs, for a failing test to show."""
        out = []
        for name in (
            "head.log",
            "session_latest/logs/dashboard.log",
            "session_latest/logs/dashboard.err",
        ):
            path = Path(self.temp_dir, name)
            if path.exists():
                out.append(f"--- {name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)


@pytest.fixture(scope="module")
def ray_head(s3_endpoint: str) -> Iterator[RayHead]:
    """``ray start --head --block`` on 127.0.0.1 with token auth, in its own process group (``ray
    stop`` would kill every Ray on the machine, the test session's own included). Ray gives its
    raylet a fixed 30 s to register (ray/_private/node.py); on two loaded cores (the node-loss
    drill beside it) that can run out, so a start that timed out is tried once more."""
    head = _start_head() or _start_head()
    if head is None:
        raise RuntimeError("ray head did not start, twice (Ray's 30 s registration wait)")
    proc, log, started = head
    try:
        yield started
    finally:
        _stop_head(proc, log, started.temp_dir)


def _stop_head(proc: subprocess.Popen, log: Any, temp_dir: str) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            break
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue
    log.close()
    shutil.rmtree(temp_dir, ignore_errors=True)


def _start_head() -> tuple[subprocess.Popen, Any, RayHead] | None:
    """A started head (its ``ray start`` said "Ray runtime started." and its job API answers),
    or None when ``ray start`` gave up waiting for its raylet (cleaned up)."""
    from pipeline.cluster import submit as jobs_api
    from pipeline.errors import UserFacingError

    token = secrets.token_hex(16)
    temp_dir = tempfile.mkdtemp(prefix="rh-", dir="/tmp")  # Ray's socket paths must stay short
    gcs, dashboard, agent, agent_grpc, runtime_env, client, metrics = free_ports(7)
    # `python` in a job's entrypoint is the head's: this environment's, as in a cluster's image
    path = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    ports = {
        "--port": gcs,
        "--dashboard-port": dashboard,
        "--dashboard-agent-listen-port": agent,
        "--dashboard-agent-grpc-port": agent_grpc,
        "--runtime-env-agent-port": runtime_env,
        "--ray-client-server-port": client,
        "--metrics-export-port": metrics,
    }
    log = open(os.path.join(temp_dir, "head.log"), "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            os.path.join(os.path.dirname(sys.executable), "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            "--num-cpus=2",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
            *(f"{flag}={port}" for flag, port in ports.items()),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    headers = {"Authorization": f"Bearer {token}"}
    deadline = time.time() + 120
    try:
        while True:
            log.flush()
            text = Path(log.name).read_text()
            if proc.poll() is not None:
                if "timed out during startup" in text:
                    _stop_head(proc, log, temp_dir)
                    return None
                raise RuntimeError("ray head did not start: " + text[-3000:])
            if "Ray runtime started." in text:
                try:
                    jobs_api.connect(address, headers)
                    break
                except UserFacingError:
                    pass
            if time.time() > deadline:
                raise RuntimeError("ray head did not start: " + text[-3000:])
            time.sleep(1)
    except BaseException:
        _stop_head(proc, log, temp_dir)
        raise
    return proc, log, RayHead(address, f"127.0.0.1:{gcs}", token, temp_dir)
