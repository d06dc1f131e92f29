"""The data plane as the dataset grows: the driver's peak memory and the listing times at 1×, 10×
and 100× the quickstart's size, on a local S3 endpoint (moto's server, started here).

The quickstart has 4000 samples; here they come in shards of ``--rows`` samples of tiny images
(the point is counts: shards, records, status rows, not pixels). Each measurement runs in a fresh
driver process, which reports its own peak RSS (``ru_maxrss``; Ray's workers are other processes)::

    embed     unclip embed over 8 × size shards of --embed-rows samples (tiny CLIP): driver
              peak, samples/s (what the driver holds grows with shards, not rows)
    prior     the autoregressive prior's preparation (its PCA sample) on a store of that size
    ingest    the ingest summary over img2dataset status parquets of that size
    records   --records completion records (100k by default) written as a run writes them, the
              index written at the run's end (one listing), then read back by a stage start in
              a fresh process: between runs (the index alone), and while a writer is open (one
              listing of done/ plus the index)

    .venv/bin/python bench/scale.py                          # everything, 1×, 10×, 100×
    .venv/bin/python bench/scale.py --parts embed --sizes 1,10

Targets (issue 18): the driver's peak at 100× at most 1.2× its peak at 1× (embed, ingest summary,
prior preparation); 100k completion records read in seconds.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QUICKSTART_SAMPLES = 4000
QUICKSTART_SHARDS = 8  # of 500 samples
TINY_CLIP = os.path.join(os.path.dirname(__file__), "..", "configs", "clip", "tiny-clip.json")
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench-key",
    "AWS_SECRET_ACCESS_KEY": "bench-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def peak_rss_mib() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def start_moto() -> tuple[subprocess.Popen, str]:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
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
            if time.time() > deadline:
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.1)


def make_bucket(name: str) -> str:
    import boto3

    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


def _jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_shards(storage, folder: str, shards: int, rows: int) -> None:
    """``shards`` img2dataset-layout shards of ``rows`` tiny captioned images (threads)."""
    from pipeline.data.shards import ShardWriter, sample_key

    image = _jpeg()

    def one(shard: int) -> None:
        writer = ShardWriter(storage, folder, shard)
        for i in range(rows):
            writer.write(sample_key(shard, i, rows), image, f"a red square {i}", {})
        writer.close()

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(shards)))


def write_store(storage, url: str, shards: int, rows: int, dim: int = 64) -> None:
    """An embedding store of ``shards`` files of ``rows`` random unit rows (threads)."""
    import numpy as np

    from pipeline.embed.store import EmbeddingStore, to_table

    store = EmbeddingStore(storage, url)
    store.open_for_writing(
        {
            "clip": {"id": "bench"},
            "embed_dim": dim,
            "dtype": "float16",
            "normalization": "l2",
            "tokenizer": {"kind": "open_clip", "model": "tiny-clip", "context_length": 32},
            "source": "bench",
        }
    )

    def one(shard: int) -> None:
        rng = np.random.default_rng(shard)
        keys = [f"{shard:05d}{i:04d}" for i in range(rows)]
        table = to_table(
            keys,
            ["a caption"] * rows,
            rng.standard_normal((rows, dim)).astype(np.float32),
            rng.standard_normal((rows, dim)).astype(np.float32),
            np.zeros((rows, 32), np.int32),
        )
        store.write_shard(f"{shard:05d}", table, {"skipped": {}, "skipped_keys": {}})

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(shards)))
    store.finalize_manifest()


# -- what each fresh driver runs ----------------------------------------------------------------


def child_embed(root: str) -> dict:
    import ray

    from pipeline.embed.job import run_embedding
    from pipeline.stage_config import ClipSource, EmbedConfig
    from pipeline.storage import Storage

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    cfg = EmbedConfig(
        root=root,
        clip=ClipSource(model="tiny-clip", model_config=TINY_CLIP),
        batch_size=256,
        stall_timeout_s=600,
    )
    started = time.perf_counter()
    summary = run_embedding(cfg, Storage())
    elapsed = time.perf_counter() - started
    return {"rows": summary["rows"], "samples_per_s": round(summary["rows"] / elapsed, 1)}


def child_records(store_url: str) -> dict:
    from pipeline.embed import writers
    from pipeline.embed.store import EmbeddingStore
    from pipeline.storage import Storage

    storage = Storage()
    started = time.perf_counter()
    n = len(EmbeddingStore(storage, store_url).completed())
    between_runs = time.perf_counter() - started
    marker = writers.Marker(storage, store_url)  # a run writing: readers list the records
    try:
        started = time.perf_counter()
        assert len(EmbeddingStore(storage, store_url).completed()) == n
        writer_open = time.perf_counter() - started
    finally:
        marker.close()
    return {
        "records": n,
        "between_runs_s": round(between_runs, 2),
        "writer_open_s": round(writer_open, 2),
    }


def child_prior(root: str) -> dict:
    from pipeline import config as configlib
    from pipeline.stage_config import PriorConfig
    from pipeline.storage import Storage
    from pipeline.train import stages

    cfg = configlib.load(
        PriorConfig, None, [f"root={root}", "model.kind=autoregressive", "clip_id=bench"]
    )
    started = time.perf_counter()
    _, info = stages.prepare_prior(cfg, Storage())
    return {
        "fit_rows": len(info["fit_image_emb"]),
        "seconds": round(time.perf_counter() - started, 2),
    }


def child_ingest(folder: str) -> dict:
    from pipeline.data.ingest import summarize
    from pipeline.storage import Storage

    started = time.perf_counter()
    summary = summarize(Storage(), folder)
    return {"tried": summary["tried"], "seconds": round(time.perf_counter() - started, 2)}


def child(part: str, target: str) -> None:
    result = {
        "child_embed": child_embed,
        "child_records": child_records,
        "child_prior": child_prior,
        "child_ingest": child_ingest,
    }[part](target)
    result["driver_peak_mib"] = round(peak_rss_mib(), 1)
    print("RESULT " + json.dumps(result), flush=True)


def run_child(part: str, target: str, env: dict[str, str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", part, target],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(
            f"{part} on {target} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
        )
    return json.loads(lines[-1][len("RESULT ") :])


def write_record_files(storage, url: str, n: int) -> float:
    """``n`` completion records written as a run's driver writes them, then the run's index;
    returns the seconds the index took (one listing)."""
    from pipeline.embed.store import EmbeddingStore

    store = EmbeddingStore(storage, url)

    def one(i: int) -> None:
        store.write_record(f"{i:06d}", {"rows": 10000, "skipped": {"not a tar": 0}, "source": "x"})

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(one, range(n)))
    started = time.perf_counter()
    store.write_index()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1,10,100", help="multiples of the quickstart's size")
    parser.add_argument("--parts", default="embed,prior,ingest,records")
    parser.add_argument("--rows", type=int, default=100, help="samples per shard")
    parser.add_argument(
        "--embed-rows",
        type=int,
        default=20,
        help="samples per shard for embed, whose shards are the quickstart's count (8) × size: "
        "its driver holds a few numbers per shard and none per row, and 2 cores encode ~150 "
        "samples/s, too slow for 400k",
    )
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    from pipeline.storage import Storage, join

    sizes = [int(s) for s in args.sizes.split(",")]
    parts = args.parts.split(",")
    moto, endpoint = start_moto()
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
    os.environ.update(env)
    storage = Storage()
    peaks: dict[str, dict[int, float]] = {}

    def measure(part: str, size: int, write, target: str, what: str, describe) -> None:
        """Write a part's data, run its fresh driver on it, print a line, keep its peak."""
        started = time.perf_counter()
        write()
        made = time.perf_counter() - started
        result = run_child(f"child_{part}", target, env)
        peaks.setdefault(part, {})[size] = result["driver_peak_mib"]
        print(
            f"{part:<7} {size:>3}×: {what}, {describe(result)} (data written in {made:.0f} s) | "
            f"driver peak {result['driver_peak_mib']:7.1f} MiB",
            flush=True,
        )

    try:
        for size in sizes:
            shards = size * QUICKSTART_SAMPLES // args.rows
            root = make_bucket(f"scale-{size}")
            if "embed" in parts:
                embed_shards = size * QUICKSTART_SHARDS
                measure(
                    "embed",
                    size,
                    partial(
                        write_shards, storage, join(root, "shards"), embed_shards, args.embed_rows
                    ),
                    root,
                    f"{embed_shards:>6} shards",
                    lambda r: f"{r['rows']:>8} samples, {r['samples_per_s']:.1f} samples/s",
                )
            if "prior" in parts:
                store_url = join(root, "embeddings", "bench")
                measure(
                    "prior",
                    size,
                    partial(write_store, storage, store_url, shards, args.rows),
                    root,
                    f"{shards:>6} store files",
                    lambda r: f"PCA sample of {r['fit_rows']} rows in {r['seconds']} s",
                )
            if "ingest" in parts:
                from pipeline.data.status import write_synthetic_status

                folder = join(root, "ingested")
                measure(
                    "ingest",
                    size,
                    partial(write_synthetic_status, storage, folder, shards, args.rows),
                    folder,
                    f"{shards:>6} status parquets",
                    lambda r: f"{r['tried']} samples summarised in {r['seconds']} s",
                )
        if "records" in parts:
            url = join(make_bucket("scale-records"), "embeddings", "bench")
            started = time.perf_counter()
            indexed = write_record_files(storage, url, args.records)
            made = time.perf_counter() - started
            result = run_child("child_records", url, env)
            print(
                f"records: {result['records']} completion records (written in {made:.0f} s, "
                f"the run's index {indexed:.1f} s of it) read by a stage start: between runs "
                f"{result['between_runs_s']} s | while a writer is open (listing + index) "
                f"{result['writer_open_s']} s | driver peak {result['driver_peak_mib']} MiB",
                flush=True,
            )
    finally:
        moto.terminate()
    for part, by_size in peaks.items():
        if len(by_size) > 1:
            low, high = min(by_size), max(by_size)
            ratio = by_size[high] / by_size[low]
            print(f"{part}: driver peak at {high}× / at {low}× = {ratio:.2f} (target ≤ 1.2)")


if __name__ == "__main__":
    main()
