"""Fixtures shared by every test: a local S3 endpoint (moto), a local Ray, and storage roots.

* ``s3_endpoint`` (session): moto's S3 server on 127.0.0.1 in a subprocess, with the AWS environment
  variables pointing every client at it (boto3, s3fs, pyarrow, and Ray workers started afterwards).
* ``s3_bucket``: a fresh, empty bucket for each test.
* ``ray_local`` (session): a local Ray with 2 CPUs and its own temp dir, started after the S3
  endpoint so its workers inherit the endpoint's environment.
* ``storage_root``: parametrised over ``local`` and ``s3``; a test that takes it runs on both.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from pipeline.storage import Storage, StorageOptions, patched_environ

# Dummy credentials for moto; tests assert that these never appear in messages or logs.
FAKE_KEY_ID = "AKIAUNCLIPTESTKEYID0"
FAKE_SECRET = "unclip-test-secret-Zq8vP2mX"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


@pytest.fixture(scope="session")
def ray_local(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A local Ray (2 CPUs) for the whole session, in a temp dir of its own."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths are limited
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
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


@pytest.fixture(params=["local", "s3"])
def storage_root(request: pytest.FixtureRequest, tmp_path) -> Root:
    """The same test on local disk and on the S3 endpoint."""
    if request.param == "local":
        return Root("local", str(tmp_path / "root"), Storage())
    bucket = request.getfixturevalue("s3_bucket")
    endpoint = request.getfixturevalue("s3_endpoint")
    return Root("s3", f"{bucket}/root", Storage(StorageOptions(endpoint_url=endpoint)))
