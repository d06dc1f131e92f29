"""img2dataset ingestion against a local HTTP server with good, missing, corrupt, slow and flaky URLs,
on local disk and on the S3 endpoint: good images land, bad ones are counted with their error, a rerun
is incremental, and --retry-failed lands a once-failed URL exactly once. With the Ray distributor,
the tasks get the config's storage settings, which the workers' environment does not hold.

The summary and the retry candidates come from a spilling hash aggregation (pipeline/data/status.py):
on synthetic status parquets with retries, duplicates and transient and permanent errors, it gives
what the plain in-memory count gives, in one bucket and in many (with spills and splits), and a
damaged status parquet is an error naming it."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import Root
from helpers import free_port
from PIL import Image

from jobs import ingest as ingest_job
from pipeline.data import ingest, status
from pipeline.data.shards import completed_shards, iter_tar_samples, read_parquet_rows, shard_urls
from pipeline.errors import UserFacingError
from pipeline.stage_config import IngestConfig
from pipeline.storage import Secret, Storage, StorageError, StorageOptions

GOOD, MISSING, CORRUPT = 12, 3, 3


def _jpeg(i: int) -> bytes:
    rng = np.random.default_rng(i)
    image = rng.integers(0, 255, size=(40, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG")
    return buffer.getvalue()


class ImageServer(ThreadingHTTPServer):
    """/good/N.jpg, /missing/N.jpg (404), /corrupt/N.jpg (garbage), /slow.jpg (past the timeout),
    /flaky.jpg (503 on the first request, an image afterwards). Counts requests per path."""

    daemon_threads = True

    def __init__(self) -> None:
        self.hits: Counter = Counter()
        self.release = threading.Event()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: ImageServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, ctype: str = "image/jpeg") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path
        self.server.hits[path] += 1
        if path.startswith("/good/"):
            self._send(200, _jpeg(int(path.split("/")[-1].split(".")[0])))
        elif path.startswith("/corrupt/"):
            self._send(200, b"\xff\xd8\xff this is not a jpeg " * 20)
        elif path == "/slow.jpg":
            self.server.release.wait(timeout=4)  # longer than the client's timeout
            self._send(200, _jpeg(999))
        elif path == "/flaky.jpg" and self.server.hits[path] == 1:
            self._send(503, b"busy", "text/plain")
        elif path == "/flaky.jpg":
            self._send(200, _jpeg(777))
        else:
            self._send(404, b"not found", "text/plain")


@pytest.fixture
def image_server() -> Iterator[ImageServer]:
    server = ImageServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()


def _url_list(tmp_path, base: str) -> str:
    """A folder of two csv files, as users hand over URL lists."""
    rows = [(f"{base}/good/{i}.jpg", f"good image {i}") for i in range(GOOD)]
    rows += [(f"{base}/missing/{i}.jpg", f"missing {i}") for i in range(MISSING)]
    rows += [(f"{base}/corrupt/{i}.jpg", f"corrupt {i}") for i in range(CORRUPT)]
    rows += [(f"{base}/slow.jpg", "slow"), (f"{base}/flaky.jpg", "flaky")]
    folder = tmp_path / "urls"
    folder.mkdir()
    for part, chunk in enumerate((rows[:10], rows[10:])):
        lines = ["url,caption", *(f"{url},{caption}" for url, caption in chunk)]
        (folder / f"part-{part}.csv").write_text("\n".join(lines) + "\n")
    return str(folder)


def _all_samples(root: Root, folder: str) -> list[dict]:
    out = []
    for shard in completed_shards(root.storage, folder):
        out.extend(iter_tar_samples(root.storage, shard_urls(folder, shard)["tar"]))
    return out


def test_ingest_counts_failures_reruns_incrementally_and_retries(
    storage_root: Root, image_server: ImageServer, tmp_path, capsys
) -> None:
    base = image_server.base
    cfg = IngestConfig(
        root=storage_root.url,
        storage=storage_root.storage.options,
        input=_url_list(tmp_path, base),
        output="shards",
        image_size=32,
        samples_per_shard=8,
        processes=1,
        threads=4,
        timeout_s=1.5,
        distributor="multiprocessing",
    )
    folder = cfg.url("shards")
    summary = ingest.ingest(cfg, storage_root.storage)

    total = GOOD + MISSING + CORRUPT + 2
    assert (summary["tried"], summary["written"], summary["failed"]) == (total, GOOD, total - GOOD)
    assert summary["failed_transient"] == 2  # the slow one (timeout) and the flaky one (503)
    errors = {e["error"]: e["count"] for e in summary["top_errors"]}
    assert errors.get("HTTP Error 404: Not Found") == MISSING
    assert any("503" in e for e in errors)
    assert any("timed out" in e.lower() for e in errors)
    assert sum(errors.values()) == total - GOOD
    saved = storage_root.storage.read_json(f"{folder}/_summary/ingest.json")
    assert saved["written"] == GOOD

    samples = _all_samples(storage_root, folder)
    assert sorted(s["txt"].decode() for s in samples) == sorted(
        f"good image {i}" for i in range(GOOD)
    )
    assert len({s["__key__"] for s in samples}) == GOOD
    for sample in samples:
        assert Image.open(io.BytesIO(sample["jpg"])).size == (32, 32)

    # A rerun finds every shard complete and downloads nothing.
    hits = sum(image_server.hits.values())
    assert ingest.ingest(cfg, storage_root.storage)["written"] == GOOD
    assert sum(image_server.hits.values()) == hits

    # Interrupted in shard 1 (its stats never written): the rerun redoes that shard alone.
    shard_1 = read_parquet_rows(storage_root.storage, folder, [1]).column("url").to_pylist()
    storage_root.storage.remove(shard_urls(folder, 1)["stats"])
    assert ingest.ingest(cfg, storage_root.storage)["written"] == GOOD
    assert sum(image_server.hits.values()) == hits + len(shard_1)  # that shard's URLs only
    assert {s["__key__"] for s in _all_samples(storage_root, folder)} == {
        s["__key__"] for s in samples
    }

    before = {
        i: storage_root.storage.read_bytes(shard_urls(folder, i)["tar"])
        for i in completed_shards(storage_root.storage, folder)
    }

    # --retry-failed asks again for the two transient failures only; the flaky one now lands.
    image_server.release.clear()
    assert ingest_job.main([f"root={cfg.root}", *_overrides(cfg), "--retry-failed"]) == 0
    assert "retry: 2 samples tried again" in capsys.readouterr().out
    assert image_server.hits["/flaky.jpg"] == 2 and image_server.hits["/slow.jpg"] == 2
    assert all(image_server.hits[f"/missing/{i}.jpg"] == 1 for i in range(MISSING))
    samples = _all_samples(storage_root, folder)
    captions = Counter(s["txt"].decode() for s in samples)
    assert captions["flaky"] == 1 and "slow" not in captions
    assert len({s["__key__"] for s in samples}) == len(samples) == GOOD + 1
    for shard_id, data in before.items():  # completed shards are never touched
        assert storage_root.storage.read_bytes(shard_urls(folder, shard_id)["tar"]) == data

    # Retrying again: the flaky URL has succeeded and is not asked for; it stays exactly once.
    summary = ingest.retry_failed(cfg, storage_root.storage)
    assert summary["retried"] == 1 and image_server.hits["/flaky.jpg"] == 2
    assert (summary["written"], summary["failed"], summary["failed_transient"]) == (GOOD + 1, 7, 1)
    assert Counter(s["txt"].decode() for s in _all_samples(storage_root, folder))["flaky"] == 1


def _overrides(cfg: IngestConfig) -> list[str]:
    out = [
        f"input={cfg.input}",
        "image_size=32",
        "samples_per_shard=8",
        "processes=1",
        "threads=4",
        "timeout_s=1.5",
        "distributor=multiprocessing",
    ]
    if cfg.storage.endpoint_url:
        out.append(f"storage.endpoint_url={cfg.storage.endpoint_url}")
    return out


def test_ray_distributor_on_the_local_cluster(ray_local, image_server, tmp_path) -> None:
    """On a Ray cluster the downloads run as Ray tasks (img2dataset's ray distributor)."""
    rows = [(f"{image_server.base}/good/{i}.jpg", f"good image {i}") for i in range(6)]
    rows.append((f"{image_server.base}/missing/0.jpg", "missing"))
    url_list = str(tmp_path / "urls.parquet")
    pq.write_table(
        pa.table({"url": [r[0] for r in rows], "caption": [r[1] for r in rows]}), url_list
    )
    cfg = IngestConfig(
        root=str(tmp_path / "root"),
        input=url_list,
        image_size=32,
        samples_per_shard=4,
        threads=4,
        timeout_s=2,
        distributor="ray",
    )
    summary = ingest.ingest(cfg)
    assert (summary["shards"], summary["written"], summary["failed"]) == (2, 6, 1)


def test_ray_task_sets_the_configs_storage_settings_for_its_download(monkeypatch) -> None:
    """What a Ray worker's download sees: the config's endpoint, region, profile and keys as the
    AWS variables img2dataset's fsspec reads, over whatever the worker's environment holds, and
    that environment back afterwards."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://the-workers-own:9000")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    options = StorageOptions(
        endpoint_url="http://from-the-config:9000",
        region="eu-west-3",
        profile="ingest",
        access_key_id=Secret("AKIACONFIGKEY"),
        secret_access_key=Secret("config-secret"),
    )
    names = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_ACCESS_KEY_ID")
    seen = {}

    def downloader(shard):
        seen.update({name: os.environ.get(name) for name in (*names, "AWS_SECRET_ACCESS_KEY")})
        return True, shard

    assert ingest.download_shard(downloader, (0, "shard.feather"), options) == (
        True,
        (0, "shard.feather"),
    )
    assert seen == {
        "AWS_ENDPOINT_URL": "http://from-the-config:9000",
        "AWS_DEFAULT_REGION": "eu-west-3",
        "AWS_PROFILE": "ingest",
        "AWS_ACCESS_KEY_ID": "AKIACONFIGKEY",
        "AWS_SECRET_ACCESS_KEY": "config-secret",
    }
    assert os.environ["AWS_ENDPOINT_URL"] == "http://the-workers-own:9000"
    assert "AWS_PROFILE" not in os.environ


def _moto_server() -> tuple[subprocess.Popen, str]:
    """Another S3 endpoint (moto on a free port), which no Ray worker's environment names."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("the second moto server did not start") from None
            time.sleep(0.1)


def test_ray_distributor_reaches_an_endpoint_given_only_in_the_config(
    ray_local, image_server, tmp_path
) -> None:
    """The session's Ray workers were started with AWS_ENDPOINT_URL naming the session's S3
    endpoint; the config names another one, holding the bucket. The shards land there."""
    import boto3

    proc, endpoint = _moto_server()
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="only-in-the-config")
        assert os.environ.get("AWS_ENDPOINT_URL") != endpoint
        rows = [(f"{image_server.base}/good/{i}.jpg", f"good image {i}") for i in range(5)]
        url_list = str(tmp_path / "urls.parquet")
        pq.write_table(
            pa.table({"url": [r[0] for r in rows], "caption": [r[1] for r in rows]}), url_list
        )
        storage = Storage(StorageOptions(endpoint_url=endpoint))
        cfg = IngestConfig(
            root="s3://only-in-the-config/root",
            storage=storage.options,
            input=url_list,
            image_size=32,
            samples_per_shard=4,
            threads=4,
            timeout_s=2,
            distributor="ray",
        )
        summary = ingest.ingest(cfg, storage)
        assert (summary["shards"], summary["written"], summary["failed"]) == (2, 5, 0)
        assert len(_all_samples(Root("s3", cfg.root, storage), cfg.url("shards"))) == 5
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_url_list_formats(tmp_path) -> None:
    (tmp_path / "a.tsv").write_text("url\tcaption\n")
    assert ingest.detect_format(Storage(), str(tmp_path / "a.tsv")) == "tsv"
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x.parquet").write_bytes(b"")
    assert ingest.detect_format(Storage(), str(tmp_path / "dir")) == "parquet"
    (tmp_path / "urls.xlsx").write_bytes(b"")
    with pytest.raises(UserFacingError, match=r"urls\.xlsx: expected files ending in"):
        ingest.detect_format(Storage(), str(tmp_path / "urls.xlsx"))


def test_transient_errors() -> None:
    for message in (
        "HTTP Error 503: Service Unavailable",
        "<urlopen error timed out>",
        "The read operation timed out",
        "<urlopen error [Errno 111] Connection refused>",
        "Remote end closed connection without response",
        "HTTP Error 429: Too Many Requests",
    ):
        assert ingest.is_transient(message), message
    for message in (
        "HTTP Error 404: Not Found",
        "HTTP Error 403: Forbidden",
        "Image decoding error",
        None,
    ):
        assert not ingest.is_transient(message), message


def test_missing_url_list_is_a_clear_error(tmp_path, capsys) -> None:
    code = ingest_job.main([f"root={tmp_path}", "input=nowhere/urls.csv"])
    assert code == 1
    assert f"URL list {tmp_path}/nowhere/urls.csv does not exist" in capsys.readouterr().err


# -- the summary and the retry candidates at any size (pipeline/data/status.py) -------------------


def _simple_count(storage: Storage, folder: str) -> tuple[dict, list[tuple]]:
    """The summary and the retry candidates the plain way (every row in Python, as the ingest
    counted before its aggregation streamed): the oracle for the streaming one."""
    shard_ids = completed_shards(storage, folder)
    rows = read_parquet_rows(storage, folder, shard_ids)
    data = rows.select(["url", "caption", "status", "error_message"]).to_pylist()

    def sample(row):
        return row["url"], row.get("caption") or ""

    succeeded = {sample(r) for r in data if r["status"] == "success"}
    failures, latest = {}, {}
    for row in data:
        if sample(row) not in succeeded:
            failures[sample(row)] = row["error_message"] or row["status"]
            latest[sample(row)] = row
    errors = Counter(failures.values())
    summary = {
        "output": folder,
        "shards": len(shard_ids),
        "tried": len(succeeded) + len(failures),
        "written": sum(1 for r in data if r["status"] == "success"),
        "failed": len(failures),
        "failed_transient": sum(1 for e in failures.values() if ingest.is_transient(e)),
        "top_errors": [{"error": e, "count": n} for e, n in errors.most_common(10)],
        "seconds": None,
    }
    retry = [
        (r["url"], r["caption"]) for r in latest.values() if ingest.is_transient(r["error_message"])
    ]
    return summary, retry


def _write_status(storage: Storage, folder: str, shard_id: int, columns: dict) -> None:
    """One hand-made shard's status parquet and stats file."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink)
    urls = shard_urls(folder, shard_id)
    storage.write_bytes(urls["parquet"], sink.getvalue().to_pybytes())
    storage.write_json(urls["stats"], {"count": len(next(iter(columns.values())))})


def _status_dataset(storage: Storage, folder: str) -> None:
    """12 synthetic shards (a third of the rows retry earlier samples) and three hand-made retry
    shards: one written without a caption column, a URL that is null, failures with no message
    or an empty one (their status is their error, among the top ten), a sample that fails then succeeds with its
    caption null the first time and empty the next, and duplicates within a shard."""
    status.write_synthetic_status(storage, folder, 12, 150, seed=3, retries=0.3)
    failed = "failed_to_download"
    _write_status(
        storage,
        folder,
        12,
        {
            "url": ["https://x/a.jpg", "https://x/b.jpg", None, "https://x/d.jpg", "f", "g"],
            "status": [failed, "success", failed, failed, failed, failed],
            "error_message": [
                "HTTP Error 503: busy",
                None,
                "<urlopen error timed out>",
                "timeout",
                None,
                None,
            ],
        },
    )
    _write_status(
        storage,
        folder,
        13,
        {
            "url": [
                "https://x/a.jpg",
                "https://x/c.jpg",
                "https://x/c.jpg",
                None,
                "https://x/e.jpg",
            ],
            "caption": ["", "", None, None, "e"],
            "status": ["success", failed, failed, failed, failed],
            "error_message": [None, None, "", "HTTP Error 404: Not Found", "HTTP Error 502: x"],
        },
    )
    _write_status(
        storage,
        folder,
        14,
        {
            "url": ["https://x/e.jpg", "https://x/e.jpg", "https://x/d.jpg"],
            "caption": ["e", "e", None],
            "status": [failed, failed, failed],
            "error_message": ["HTTP Error 502: x", "HTTP Error 502: x", "Connection reset by peer"],
        },
    )


def test_streamed_summary_and_retries_equal_the_plain_count(storage_root: Root, tmp_path) -> None:
    """In one bucket in memory, in 8 buckets spilled to disk, and in hundreds of buckets of a few
    rows (most of them split again): the same summary and the same candidates, in the same order,
    as every row counted in Python."""
    storage = storage_root.storage
    folder = f"{storage_root.url}/shards"
    _status_dataset(storage, folder)
    expected, expected_retry = _simple_count(storage, folder)
    # the data has what the aggregation must get right
    assert expected["shards"] == 15
    # a sample written twice (a duplicate in the URL list) counts twice as written, once as tried
    assert expected["written"] > expected["tried"] - expected["failed"]
    assert 0 < expected["failed_transient"] < expected["failed"] < expected["tried"]
    assert expected["top_errors"][-1]["count"] == 1  # ties, broken by the first try
    assert {"error": "failed_to_download", "count": 3} in expected["top_errors"]
    assert ("https://x/e.jpg", "e") in expected_retry  # failed transiently three times
    assert ("https://x/a.jpg", None) not in expected_retry  # succeeded on its second try
    assert ("https://x/d.jpg", None) in expected_retry  # a 503, then a reset, no caption column
    rows = read_parquet_rows(storage, folder, list(range(15)))
    samples = {
        (u, c or "")
        for u, c in zip(rows["url"].to_pylist(), rows["caption"].to_pylist(), strict=True)
    }
    assert rows.num_rows > len(samples) == expected["tried"]  # tries of the same samples

    ids = completed_shards(storage, folder)
    # (bucket_rows, at least so many buckets aggregated, spilled): with 9, more than the 256
    # buckets: some were split again
    sizes = [(10**6, 1, False), (300, 8, True), (9, 257, True)]
    if storage_root.kind == "s3":  # the reads through S3; the sizes are the same on local disk
        sizes = sizes[1:2]
    for bucket_rows, buckets, spilled in sizes:
        path = str(tmp_path / f"retry-{bucket_rows}.parquet")
        spill = tmp_path / f"spill-{bucket_rows}"
        spill.mkdir()
        counts = status.scan_status(
            storage,
            folder,
            ids,
            candidates=path,
            candidate_columns=("URL", "TEXT"),
            bucket_rows=bucket_rows,
            spill_dir=str(spill),
        )
        found = {name: getattr(counts, name) for name in ("tried", "written", "failed")}
        found.update(failed_transient=counts.failed_transient, top_errors=counts.top_errors)
        assert found == {k: v for k, v in expected.items() if k in found}, bucket_rows
        retry = pq.read_table(path)
        assert retry.column_names == ["URL", "TEXT"]
        found = zip(retry["URL"].to_pylist(), retry["TEXT"].to_pylist(), strict=True)
        assert list(found) == expected_retry, bucket_rows
        assert counts.candidates == len(expected_retry)
        assert counts.buckets >= buckets and counts.spilled == spilled, bucket_rows
        assert not list(spill.iterdir())  # the spill folder is gone

    # what the command runs: the summary saved, the URL list for img2dataset
    assert ingest.summarize(storage, folder, bucket_rows=300) == expected
    assert storage.read_json(f"{folder}/_summary/ingest.json") == expected
    path = str(tmp_path / "retry.parquet")
    assert ingest.retry_candidates(storage, folder, path, bucket_rows=300) == len(expected_retry)
    retry = pq.read_table(path)
    assert retry.column_names == ["url", "caption"]
    assert list(zip(*retry.to_pydict().values(), strict=True)) == expected_retry


def test_a_damaged_status_parquet_is_named(tmp_path) -> None:
    storage = Storage()
    folder = str(tmp_path / "shards")
    status.write_synthetic_status(storage, folder, 4, 20)
    spill = tmp_path / "spill"
    spill.mkdir()
    urls = shard_urls(folder, 2)

    with open(urls["parquet"], "r+b") as handle:  # cut short: no footer
        data = handle.read()
        handle.seek(0)
        handle.truncate()
        handle.write(data[: len(data) // 2])
    with pytest.raises(UserFacingError, match=r"00002\.parquet: not a readable status parquet"):
        status.scan_status(storage, folder, [0, 1, 2, 3], bucket_rows=10, spill_dir=str(spill))
    assert not list(spill.iterdir())
    with pytest.raises(UserFacingError, match=r"remove its 00002_stats\.json to leave it out"):
        ingest.summarize(storage, folder)

    _write_status(storage, folder, 2, {"link": ["https://x/a.jpg"], "status": ["success"]})
    with pytest.raises(UserFacingError, match=r"00002\.parquet: not an img2dataset status .*url"):
        ingest.summarize(storage, folder)

    storage.remove(urls["parquet"])  # its stats file still says it is complete
    with pytest.raises(StorageError, match=r"00002\.parquet: no such file"):
        ingest.summarize(storage, folder)
    storage.remove(urls["stats"])
    assert ingest.summarize(storage, folder)["shards"] == 3


def test_synthetic_status_parquets(tmp_path) -> None:
    """Complete shards with img2dataset's status columns and keys, retries of earlier samples and
    every kind of error; written in two calls (``first_shard``) they are the same as in one."""
    storage = Storage()
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    assert status.write_synthetic_status(storage, whole, 5, 40, seed=1) == 200
    status.write_synthetic_status(storage, parts, 2, 40, seed=1)
    status.write_synthetic_status(storage, parts, 3, 40, first_shard=2, seed=1)
    assert completed_shards(storage, whole) == completed_shards(storage, parts) == [0, 1, 2, 3, 4]
    rows = read_parquet_rows(storage, whole, [0, 1, 2, 3, 4])
    assert read_parquet_rows(storage, parts, [0, 1, 2, 3, 4]).equals(rows)
    assert rows["key"].to_pylist()[40:42] == ["0000100", "0000101"]
    summary, retry = _simple_count(storage, whole)
    assert summary["tried"] < 200 and summary["written"] > 100 and retry
    assert 0 < summary["failed_transient"] < summary["failed"] < summary["tried"]
    errors = {e["error"] for e in summary["top_errors"]}
    assert set(status.SYNTHETIC_ERRORS[:4]) <= errors
    assert any(e.startswith(status.SYNTHETIC_ERRORS[4]) for e in errors)


def test_string_hash_is_stable_and_spreads_over_every_bit() -> None:
    urls = [f"https://img{i % 7}.example.com/{i}.jpg" for i in range(20000)]
    whole = status.hash_strings(pa.array(urls))
    # the same whatever the chunks, slices and string type
    chunked = pa.chunked_array([pa.array(urls[:5]), pa.array(urls[5:])], pa.string())
    assert (status.hash_strings(chunked) == whole).all()
    assert (
        status.hash_strings(pa.array(urls, pa.large_string()).slice(3), chunk=100) == whole[3:]
    ).all()
    assert len(set(whole.tolist())) == len(urls)
    with_nulls = status.hash_strings(pa.array(["", None, "a", None]))
    assert with_nulls[1] == with_nulls[3] and len(set(with_nulls.tolist())) == 3
    for shift in (0, 8, 29, 60):  # 16 buckets from any 4 bits: each within 15% of the mean
        buckets = np.bincount(((whole >> np.uint64(shift)) & np.uint64(15)).astype(np.int64))
        assert buckets.min() > 0.85 * len(urls) / 16 and buckets.max() < 1.15 * len(urls) / 16
