"""Storage on local disk and on a real S3 endpoint (moto): round trips, listing, atomic publishing,
and errors that name the URL without leaking a credential."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pyarrow.fs as pafs
import pytest
from conftest import FAKE_KEY_ID, FAKE_SECRET, Root
from drills import environment
from faults import Fault
from helpers import free_port

from pipeline.storage import (
    ResumableReader,
    Secret,
    Storage,
    StorageError,
    StorageNotFoundError,
    StorageOptions,
    join,
    redact_url,
    resolve,
)


def test_round_trip(storage_root: Root) -> None:
    s, root = storage_root.storage, storage_root.url
    s.write_bytes(join(root, "a/b.bin"), b"\x00\x01payload")
    s.write_json(join(root, "a/meta.json"), {"rows": 3, "name": "shard-0"})
    s.write_text(join(root, "c.txt"), "héllo")
    assert s.read_bytes(join(root, "a/b.bin")) == b"\x00\x01payload"
    assert s.read_json(join(root, "a/meta.json")) == {"rows": 3, "name": "shard-0"}
    assert s.read_text(join(root, "c.txt")) == "héllo"
    assert s.size(join(root, "a/b.bin")) == 9
    with s.open(join(root, "a/b.bin")) as handle:
        assert handle.read(2) == b"\x00\x01"
    # overwriting replaces the whole file
    s.write_bytes(join(root, "a/b.bin"), b"new")
    assert s.read_bytes(join(root, "a/b.bin")) == b"new"


def test_missing_file_names_the_url(storage_root: Root) -> None:
    url = join(storage_root.url, "nothing/here.json")
    assert not storage_root.storage.exists(url)
    with pytest.raises(StorageNotFoundError) as info:
        storage_root.storage.read_json(url)
    assert url in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_listing(storage_root: Root) -> None:
    s, root = storage_root.storage, storage_root.url
    for name in ("b.tar", "a.tar", "sub/c.tar", "sub/deeper/d.tar", "a.parquet"):
        s.write_bytes(join(root, name), b"x")
    assert s.list(root) == [join(root, n) for n in ("a.parquet", "a.tar", "b.tar", "sub")]
    assert s.list(join(root, "does-not-exist")) == []
    assert s.glob(join(root, "*.tar")) == [join(root, "a.tar"), join(root, "b.tar")]
    assert s.glob(join(root, "**/*.tar"))[-1] == join(root, "sub/deeper/d.tar")
    assert len(s.glob(join(root, "**/*.tar"))) == 4
    assert s.isdir(join(root, "sub")) and not s.isdir(join(root, "a.tar"))
    s.remove(join(root, "sub"), recursive=True)
    assert not s.exists(join(root, "sub/c.tar"))


def test_arrow_filesystem_sees_what_fsspec_wrote(storage_root: Root) -> None:
    s, root = storage_root.storage, storage_root.url
    s.write_bytes(join(root, "x/data.bin"), b"12345")
    fs, path = s.arrow_filesystem(join(root, "x/data.bin"))
    with fs.open_input_stream(path) as stream:
        assert stream.read() == b"12345"
    dir_fs, dir_path = s.arrow_filesystem(join(root, "x"))
    infos = dir_fs.get_file_info(pafs.FileSelector(dir_path))
    assert [i.base_name for i in infos] == ["data.bin"]


def test_failed_write_leaves_nothing(storage_root: Root) -> None:
    s, url = storage_root.storage, join(storage_root.url, "out/file.bin")
    with pytest.raises(RuntimeError, match="boom"), s.open_atomic(url) as handle:
        handle.write(b"x" * 1000)
        raise RuntimeError("boom")
    assert not s.exists(url)
    assert s.list(join(storage_root.url, "out")) == []


def _run_killed_writer(root: Root, url: str) -> None:
    env = environment(TEST_ENDPOINT=root.storage.options.endpoint_url or "")
    proc = subprocess.run(
        [sys.executable, "-m", "drills.killed_writer", url],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr.decode()


def test_writer_killed_before_commit_leaves_no_file(storage_root: Root) -> None:
    s, folder = storage_root.storage, join(storage_root.url, "shards")
    s.write_bytes(join(folder, "done.bin"), b"complete")
    _run_killed_writer(storage_root, join(folder, "partial.bin"))
    assert not s.exists(join(folder, "partial.bin"))
    assert s.list(folder) == [join(folder, "done.bin")]


def _assert_no_credentials(text: str) -> None:
    assert FAKE_SECRET not in text
    assert FAKE_KEY_ID not in text


def test_missing_bucket_is_a_clear_error(s3_endpoint: str, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    storage = Storage(
        StorageOptions(
            endpoint_url=s3_endpoint,
            access_key_id=Secret(FAKE_KEY_ID),
            secret_access_key=Secret(FAKE_SECRET),
        )
    )
    url = "s3://no-such-bucket-unclip/embeddings/manifest.json"
    for op in (
        lambda: storage.check(url),
        lambda: storage.read_json(url),
        lambda: storage.write_bytes(url, b"x"),
        lambda: storage.list("s3://no-such-bucket-unclip/x"),
    ):
        with pytest.raises(StorageError) as info:
            op()
        message = str(info.value)
        assert "bucket 'no-such-bucket-unclip' does not exist" in message
        assert "s3://no-such-bucket-unclip/" in message and s3_endpoint in message
        _assert_no_credentials(message)
    _assert_no_credentials(caplog.text)
    _assert_no_credentials(repr(storage) + repr(storage.options))


def test_unreachable_endpoint_is_a_clear_error(caplog) -> None:
    caplog.set_level(logging.DEBUG)
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    storage = Storage(
        StorageOptions(
            endpoint_url=endpoint,
            access_key_id=Secret(FAKE_KEY_ID),
            secret_access_key=Secret(FAKE_SECRET),
            max_attempts=1,
            retries=1,
            connect_timeout_s=2,
        )
    )
    url = "s3://bucket-x/runs/quickstart"
    for op in (lambda: storage.check(url, write=True), lambda: storage.read_bytes(url + "/a")):
        with pytest.raises(StorageError) as info:
            op()
        message = str(info.value)
        assert message.startswith("cannot ")
        assert "s3://bucket-x/runs/quickstart" in message
        assert f"storage endpoint {endpoint} is unreachable" in message
        _assert_no_credentials(message)
    _assert_no_credentials(caplog.text)


def test_check_passes_on_a_usable_root(storage_root: Root) -> None:
    storage_root.storage.check(storage_root.url, write=True)
    assert storage_root.storage.list(storage_root.url) == []  # the write probe is removed


def test_fresh_bucket_per_test(s3_bucket: str) -> None:
    storage = Storage()
    assert storage.list(s3_bucket) == []
    storage.write_bytes(join(s3_bucket, "marker"), b"1")  # the next test's bucket is a new one


def test_file_urls_and_paths_are_the_same_place(tmp_path) -> None:
    storage = Storage()
    storage.write_text(f"file://{tmp_path}/x/y.txt", "same")
    assert storage.read_text(str(tmp_path / "x" / "y.txt")) == "same"
    assert storage.list(f"file://{tmp_path}/x") == [f"file://{tmp_path}/x/y.txt"]


def test_url_helpers() -> None:
    assert join("s3://b/root/", "a", "/b/") == "s3://b/root/a/b"
    assert resolve("s3://b/root", "shards") == "s3://b/root/shards"
    assert resolve("s3://b/root", "s3://other/x") == "s3://other/x"
    assert resolve("runs/q", "/abs/path") == "/abs/path"
    assert redact_url("http://user:pw@minio:9000/x") == "http://minio:9000/x"
    assert "pw" not in repr(Secret("pw")) and Secret("pw").reveal() == "pw"
    with pytest.raises(StorageError, match="unsupported URL scheme 'gs'"):
        Storage().exists("gs://bucket/x")


# ----------------------------------------------------------------------------------------------
# Transient faults, injected by a proxy in front of the S3 endpoint


def _through(proxy, **options) -> Storage:
    return Storage(
        StorageOptions(endpoint_url=proxy.url, retry_backoff_s=0.01, read_timeout_s=2, **options)
    )


@pytest.fixture
def small_blocks(monkeypatch) -> int:
    """Ranged GETs of 256 KiB, so that a few MB are many requests."""
    monkeypatch.setattr(ResumableReader, "BLOCK", 1 << 18)
    return 1 << 18


def test_a_read_reset_halfway_resumes_where_it_stopped(faulty_s3, s3_bucket, small_blocks) -> None:
    storage = _through(faulty_s3)
    url = join(s3_bucket, "big.bin")
    data = os.urandom(3 << 20)
    storage.write_bytes(url, data)
    key = url.split("/", 3)[3]
    fault = faulty_s3.add(Fault("GET", key, "reset", times=2))
    with storage.open(url) as handle:
        assert handle.read() == data
    assert fault.hits == 2
    gets = [t for m, t in faulty_s3.requests if m == "GET" and key in t]
    # each block read once, the two cut off read again: not the whole object again
    assert len(gets) <= len(data) // small_blocks + 2 + 1, len(gets)
    faulty_s3.add(Fault("GET", key, "stall", times=1, stall_s=5))
    assert storage.read_bytes(url) == data  # a stall past read_timeout_s is retried too


def test_writes_listings_and_reads_are_retried(faulty_s3, s3_bucket) -> None:
    storage = _through(faulty_s3, max_attempts=1)  # no SDK retries: these are the project's own
    url = join(s3_bucket, "dir", "x.json")
    put = faulty_s3.add(Fault("PUT", "x.json", "reset_request", times=2))
    storage.write_json(url, {"a": 1})
    listed = faulty_s3.add(Fault("GET", r"list-type=2", "reset", times=2))
    assert storage.list(join(s3_bucket, "dir")) == [url]
    got = faulty_s3.add(Fault("GET", "x.json", "reset", times=2))
    assert storage.read_json(url) == {"a": 1}
    assert (put.hits, listed.hits, got.hits) == (2, 2, 2)


def test_a_fault_that_outlasts_the_retries_fails_naming_the_url(faulty_s3, s3_bucket) -> None:
    storage = _through(faulty_s3, retries=3, max_attempts=1)
    url = join(s3_bucket, "y.bin")
    storage.write_bytes(url, b"y" * 1000)
    fault = faulty_s3.add(Fault("GET", "y.bin", "reset", times=None))
    with pytest.raises(StorageError, match=r"cannot read s3://.*/y\.bin") as info:
        storage.read_bytes(url)
    assert info.value.transient and fault.hits == 3
    assert FAKE_SECRET not in str(info.value)
    fault.times = 0  # healed
    missing = join(s3_bucket, "nothing-here")
    with pytest.raises(StorageNotFoundError) as info:
        storage.read_bytes(missing)  # not transient: no retries, no wait
    assert not info.value.transient


def test_an_object_replaced_mid_read_is_refused_not_spliced(
    faulty_s3, s3_bucket, small_blocks
) -> None:
    storage = _through(faulty_s3)
    url = join(s3_bucket, "v.bin")
    storage.write_bytes(url, b"a" * (2 << 20))
    with storage.open(url) as handle:
        handle.read(1000)
        Storage().write_bytes(url, b"b" * (2 << 20))  # a new version, straight to the endpoint
        faulty_s3.add(Fault("GET", "v.bin", "reset", times=1))
        with pytest.raises(StorageError, match="changed while it was read"):
            handle.read()


def test_a_profile_reaches_pyarrow_as_well_as_s3fs(tmp_path, monkeypatch, s3_bucket) -> None:
    """pyarrow's S3 filesystem (Ray Data reads, checkpoint uploads) takes no profile name: the
    profile's credentials are handed to it, so both clients sign as the same identity."""
    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"[unclip-test]\naws_access_key_id = {FAKE_KEY_ID}\naws_secret_access_key = {FAKE_SECRET}\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    storage = Storage(StorageOptions(profile="unclip-test"))
    url = join(s3_bucket, "p.txt")
    storage.write_text(url, "via s3fs")
    filesystem, path = storage.arrow_filesystem(url)
    options = filesystem.__reduce__()[1][0]
    assert (options["access_key"], options["secret_key"]) == (FAKE_KEY_ID, FAKE_SECRET)
    with filesystem.open_input_stream(path) as handle:
        assert handle.read() == b"via s3fs"
    with pytest.raises(StorageError, match=r"storage\.profile 'nobody'"):
        Storage(StorageOptions(profile="nobody")).arrow_filesystem(url)


def test_check_lists_the_prefix_not_the_bucket(faulty_s3, s3_bucket) -> None:
    """IAM policies often allow a prefix only, and buckets are large: the preflight check lists
    the root's prefix. Every listing of the bucket's top is refused here, as such a policy would."""
    faulty_s3.add(Fault("GET", r"list-type=2(?!.*prefix=root)", "reset_request", times=None))
    storage = _through(faulty_s3, max_attempts=1, retries=1)
    url = join(s3_bucket, "root", "runs")
    storage.check(url, write=True)
    listings = [t for m, t in faulty_s3.requests if m == "GET" and "list-type=2" in t]
    assert listings and all("prefix=root" in t for t in listings)
