"""Fault drills on a Ray cluster of a head and two worker nodes (``ray.cluster_utils.Cluster``).

* The embedding job runs as its own driver process; a worker node is removed once the first shard
  is in the store, and a fresh node joins. That run finishes or fails with the stall error (it must
  not hang); a rerun then stores every good key exactly once and encodes only the shards the first
  run did not complete.
* The prior trains with one worker on each worker node; after the first checkpoint one of those
  nodes is removed and a fresh node joins: the run restarts from that checkpoint on the nodes it
  has and finishes, with a falling loss.

Nodes are removed with ``allow_graceful=False`` (their processes are SIGKILLed, as when a machine
dies). The head has no CPUs, so all work lands on the worker nodes. Runs in a subprocess of its own
process group: it needs a Ray of its own, and a timeout must take every Ray process with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The interrupted runs: each a driver of its own, as a submitted job would be. argv: the cluster's
# address, the root, then "embed CHECKPOINT STALL_TIMEOUT_S CLIP_ID" or "train". A stalled
# execution keeps its actors until its process ends, as the job's does.
DRIVER = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, os.path.join(PROJECT, "tests"))
    import ray
    from conftest import Root
    from pipeline.errors import UserFacingError
    from pipeline.storage import Storage

    address, root, what = sys.argv[1:4]
    ray.init(address=address, log_to_driver=False)
    if what == "embed":
        from test_embed import _embed_cfg
        from pipeline.embed import run_embedding

        checkpoint, stall_timeout_s, clip_id = sys.argv[4], float(sys.argv[5]), sys.argv[6]
        cfg = _embed_cfg(Root("local", root, Storage()), checkpoint, batch_size=4,
                         concurrency=2, stall_timeout_s=stall_timeout_s, clip_id=clip_id)
        try:
            summary = run_embedding(cfg, Storage())
            print("DRIVER finished", summary["shards_encoded_now"], flush=True)
        except UserFacingError as exc:
            print("DRIVER failed", exc, flush=True)
    else:
        from pipeline import config as configlib
        from pipeline.stage_config import PriorConfig
        from pipeline.trainer import run_training

        cfg = configlib.load(PriorConfig, os.path.join(PROJECT, "configs", "prior", "tiny.yaml"), [
            f"root={root}", "clip_id=drill", "train.steps=40", "train.batch_size=32", "checkpoint.every_steps=10",
            "train.log_every=5", "train.max_failures=2", "scaling.num_workers=2",
            "scaling.cpus_per_worker=0.5", "scaling.resources_per_worker={trainer_slot: 1}",
        ])
        summary = run_training("train-prior", cfg, Storage())
        print("DRIVER finished", json.dumps({"step": summary["step"]}), flush=True)
    """
).replace("PROJECT", repr(PROJECT))

SCRIPT = textwrap.dedent(
    """
    import json, os, subprocess, sys, time
    sys.path.insert(0, os.path.join(PROJECT, "tests"))
    import pyarrow.parquet as pq
    import ray
    from ray.cluster_utils import Cluster

    from conftest import Root
    from test_embed import _embed_cfg, _tiny_clip_checkpoint
    from pipeline import synth
    from pipeline.checkpoints import latest_checkpoint
    from pipeline.embed import run_embedding
    from pipeline.embed_store import EmbeddingStore
    from pipeline.stage_config import SynthConfig
    from pipeline.storage import Storage, join

    root, driver = sys.argv[1], sys.argv[2]
    result = {}
    NODE = {"num_cpus": 2, "resources": {"trainer_slot": 1}, "object_store_memory": 300 * 2**20}
    # Cluster.add_node writes the head's address to $RAY_TMPDIR/ray/ray_current_cluster (the
    # test gives this process a RAY_TMPDIR of its own) and fails if that folder is missing
    ray_tmp = os.path.join(os.environ["RAY_TMPDIR"], "ray")
    os.makedirs(ray_tmp, exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "temp_dir": ray_tmp})
    workers = [cluster.add_node(**NODE) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    storage = Storage()

    def run_losing_a_node(args, ready):
        # Run a driver; once ready(), SIGKILL a worker node and start a fresh one (from this,
        # the main thread: Cluster.add_node installs signal handlers). Returns the driver's
        # outcome line and whether the node went while the driver ran.
        child = subprocess.Popen([sys.executable, "-c", driver, cluster.address, root, *args],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while child.poll() is None and not ready() and time.time() < deadline:
            time.sleep(0.05)
        removed = child.poll() is None
        if removed:
            cluster.remove_node(workers.pop(0), allow_graceful=False)
            time.sleep(2)
            workers.append(cluster.add_node(**NODE))
            cluster.wait_for_nodes()
        out, err = child.communicate(timeout=400)
        lines = [l for l in out.splitlines() if l.startswith("DRIVER ")]
        return (lines[-1] if lines else out[-2000:] + err[-4000:]), removed

    # -- drill 1: the embedding job loses a node ----------------------------------------------
    cfg = SynthConfig(root=root, num_samples=160, samples_per_shard=10, image_size=64)
    for shard in range(16):
        synth.write_shard(storage, cfg.url(cfg.output), shard, cfg)
    checkpoint = _tiny_clip_checkpoint(os.path.join(root, "clip.safetensors"), 0)
    store_root = join(root, "embeddings")

    def stored():
        try:
            return EmbeddingStore.locate(storage, store_root, "drill").completed()
        except Exception:
            return {}

    at_removal = {}
    def first_shard_done():
        at_removal.update(stored())
        return bool(at_removal)
    # the stall watchdog, first: a timeout shorter than the encoders' start-up fails the run
    stalled, _ = run_losing_a_node(["embed", checkpoint, "0.001", "stalls"], lambda: False)
    result["stalled_run"] = stalled
    first_run, removed = run_losing_a_node(["embed", checkpoint, "40", "drill"], first_shard_done)
    print("FIRST", first_run, flush=True)
    before = stored()
    rerun = run_embedding(_embed_cfg(Root("local", root, storage), checkpoint, batch_size=4,
                                     concurrency=2, stall_timeout_s=120, clip_id="drill"), storage)
    after = stored()
    store = EmbeddingStore.locate(storage, store_root, "drill")
    keys = []
    for name in sorted(after):
        keys += pq.read_table(store.shard_file(name), columns=["key"]).column("key").to_pylist()
    result["embed"] = {
        "first_run": first_run,
        "node_removed": removed,
        "shards": 16,
        "done_at_removal": len(at_removal),
        "done_before_rerun": len(before),
        "encoded_by_rerun": rerun["shards_encoded_now"],
        "kept_records": all(after[n] == before[n] for n in before),
        "keys": len(keys),
        "unique_keys": len(set(keys)),
    }
    print("EMBED " + json.dumps(result["embed"]), flush=True)

    # -- drill 2: a training loses a node -----------------------------------------------------
    # one worker per node (each takes the node's one trainer_slot): a removal hits a worker
    run_url = join(root, "checkpoints", "prior")
    def checkpointed():
        try:
            snapshot = storage.read_json(join(run_url, "checkpoint_manager_snapshot.json"))
            return bool(snapshot.get("checkpoint_results"))
        except Exception:
            return False
    trained, removed = run_losing_a_node(["train"], checkpointed)
    state = storage.read_json(join(latest_checkpoint(storage, run_url), "state.json"))
    result["train"] = {
        "driver": trained, "node_removed": removed,
        "state_step": state["step"], "resumes": state["resumes"],
        "first_loss": state["history"][0][1], "last_loss": state["history"][-1][1],
        "alive_nodes": len([n for n in ray.nodes() if n["Alive"]]),
    }
    print("RESULT " + json.dumps(result), flush=True)
    ray.shutdown()
    cluster.shutdown()
    """
).replace("PROJECT", repr(PROJECT))


def test_node_loss_during_embedding_and_training(tmp_path) -> None:
    ray_tmp = tempfile.mkdtemp(prefix="mn-", dir="/tmp")  # short: Ray's socket paths are limited
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(tmp_path), DRIVER],
        cwd=PROJECT,
        env={**os.environ, "RAY_TMPDIR": ray_tmp},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the cluster shares its process group
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, stdout[-3000:] + stderr[-5000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    embed, train = result["embed"], result["train"]
    # A run that gets no encoded rows within stall_timeout_s fails, saying what it kept.
    assert result["stalled_run"].startswith(
        "DRIVER failed embedding stalled: no encoded rows for 0 s (config key: stall_timeout_s). "
        "0 of 16 shards are complete"
    ), result
    # The node went while shards were still to do, and the first run ended (finished, or failed
    # on the stall watchdog) rather than hanging.
    assert embed["node_removed"] and 1 <= embed["done_at_removal"] < embed["shards"], result
    assert embed["first_run"].startswith(("DRIVER finished", "DRIVER failed embedding stalled")), (
        result
    )
    # The rerun did only what was missing, kept what was there, and stored nothing twice.
    assert embed["encoded_by_rerun"] == embed["shards"] - embed["done_before_rerun"], result
    assert embed["kept_records"], result
    assert embed["keys"] == embed["unique_keys"] == 160, result
    # The training lost a node after its first checkpoint, restarted from a checkpoint (not from
    # zero) on the nodes it had, and finished, learning.
    assert train["node_removed"], result
    assert train["driver"] == 'DRIVER finished {"step": 40}', result
    assert train["state_step"] == 40 and train["resumes"] >= 1, result
    assert train["alive_nodes"] == 3, result
    assert train["last_loss"] < train["first_loss"], result
