"""The node-loss drills on a Ray cluster of a head and two worker nodes
(``ray.cluster_utils.Cluster``), run by ``tests/test_multinode.py``; prints one ``RESULT {...}``
line of JSON that the test reads.

    python -m drills.node_loss ROOT       (RAY_TMPDIR: a short folder of this run's own)

1. The embedding job, as a driver of its own (``drills.node_loss_driver``), loses a worker node once
   its first shard is in the store, and a fresh node joins. A run with a stall timeout shorter than
   the encoders' start-up comes first: it must fail with the stall error. A rerun then encodes only
   what the interrupted run did not complete.
2. A prior training (one worker per worker node) loses a node after its first checkpoint: it must
   restart from that checkpoint on the nodes it has and finish.

Nodes are removed with ``allow_graceful=False``: their processes are SIGKILLed, as when a machine
dies. The head has no CPUs, so all work lands on the worker nodes.
"""

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pyarrow.parquet as pq
import ray
from conftest import Root
from helpers import embed_cfg, tiny_clip_checkpoint
from ray.cluster_utils import Cluster

from drills import environment
from pipeline.data import synth
from pipeline.embed.job import run_embedding
from pipeline.embed.store import EmbeddingStore
from pipeline.stage_config import SynthConfig
from pipeline.storage import Storage, join
from pipeline.train.checkpoints import latest_checkpoint

NODE = {"num_cpus": 2, "resources": {"trainer_slot": 1}, "object_store_memory": 300 * 2**20}
SHARDS = 16


class Drill:
    """A cluster of a CPU-less head and two worker nodes, and a way to lose one under a driver."""

    def __init__(self, root: str) -> None:
        self.root = root
        # Cluster.add_node writes the head's address to $RAY_TMPDIR/ray/ray_current_cluster
        # (the test gives this process a RAY_TMPDIR of its own) and fails if the folder is missing
        ray_tmp = os.path.join(os.environ["RAY_TMPDIR"], "ray")
        os.makedirs(ray_tmp, exist_ok=True)
        self.cluster = Cluster(
            initialize_head=True, head_node_args={"num_cpus": 0, "temp_dir": ray_tmp}
        )
        self.workers = [self.cluster.add_node(**NODE) for _ in range(2)]
        ray.init(address=self.cluster.address, log_to_driver=False)

    def run_losing_a_node(self, args: list[str], ready: Callable[[], bool]) -> tuple[str, bool]:
        """Run a driver; once ``ready()``, SIGKILL a worker node and start a fresh one (from this,
        the main thread: ``Cluster.add_node`` installs signal handlers). Returns the driver's
        outcome line and whether the node went while the driver ran."""
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "drills.node_loss_driver",
                self.cluster.address,
                self.root,
                *args,
            ],
            env=environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 300
        while child.poll() is None and not ready() and time.time() < deadline:
            time.sleep(0.05)
        removed = child.poll() is None
        if removed:
            self.cluster.remove_node(self.workers.pop(0), allow_graceful=False)
            time.sleep(2)
            self.workers.append(self.cluster.add_node(**NODE))
            self.cluster.wait_for_nodes()
        out, err = child.communicate(timeout=400)
        lines = [line for line in out.splitlines() if line.startswith("DRIVER ")]
        return (lines[-1] if lines else out[-2000:] + err[-4000:]), removed

    def shutdown(self) -> None:
        ray.shutdown()
        self.cluster.shutdown()


def embed_drill(drill: Drill, storage: Storage) -> dict[str, Any]:
    root = drill.root
    cfg = SynthConfig(root=root, num_samples=10 * SHARDS, samples_per_shard=10, image_size=64)
    for shard in range(SHARDS):
        synth.write_shard(storage, cfg.url(cfg.output), shard, cfg)
    checkpoint = tiny_clip_checkpoint(os.path.join(root, "clip.safetensors"), 0)
    store_root = join(root, "embeddings")

    def stored() -> dict[str, Any]:
        try:
            return EmbeddingStore.locate(storage, store_root, "drill").completed()
        except Exception:
            return {}

    at_removal: dict[str, Any] = {}

    def first_shard_done() -> bool:
        at_removal.update(stored())
        return bool(at_removal)

    # the stall watchdog, first: a timeout shorter than the encoders' start-up fails the run
    stalled, _ = drill.run_losing_a_node(["embed", checkpoint, "0.001", "stalls"], lambda: False)
    # 90 s: the encoders' start-up counts against the stall timeout, and beside the suite's other
    # tests it took over 40 s (the run stalled before its first shard and no node was removed)
    first_run, removed = drill.run_losing_a_node(
        ["embed", checkpoint, "90", "drill"], first_shard_done
    )
    print("FIRST", first_run, flush=True)
    before = stored()
    rerun_cfg = embed_cfg(
        Root("local", root, storage),
        checkpoint,
        batch_size=4,
        concurrency=2,
        stall_timeout_s=120,
        clip_id="drill",
    )
    rerun = run_embedding(rerun_cfg, storage)
    after = stored()
    store = EmbeddingStore.locate(storage, store_root, "drill")
    keys = []
    for name in sorted(after):
        keys += pq.read_table(store.shard_file(name), columns=["key"]).column("key").to_pylist()
    return {
        "stalled_run": stalled,
        "first_run": first_run,
        "node_removed": removed,
        "shards": SHARDS,
        "done_at_removal": len(at_removal),
        "done_before_rerun": len(before),
        "encoded_by_rerun": rerun["shards_encoded_now"],
        "kept_records": all(after[n] == before[n] for n in before),
        "keys": len(keys),
        "unique_keys": len(set(keys)),
    }


def train_drill(drill: Drill, storage: Storage) -> dict[str, Any]:
    # one worker per node (each takes the node's one trainer_slot): a removal hits a worker
    run_url = join(drill.root, "checkpoints", "prior")

    def checkpointed() -> bool:
        try:
            snapshot = storage.read_json(join(run_url, "checkpoint_manager_snapshot.json"))
            return bool(snapshot.get("checkpoint_results"))
        except Exception:
            return False

    trained, removed = drill.run_losing_a_node(["train"], checkpointed)
    state = storage.read_json(join(latest_checkpoint(storage, run_url), "state.json"))
    return {
        "driver": trained,
        "node_removed": removed,
        "state_step": state["step"],
        "resumes": state["resumes"],
        "first_loss": state["history"][0][1],
        "last_loss": state["history"][-1][1],
        "alive_nodes": len([n for n in ray.nodes() if n["Alive"]]),
    }


def main() -> None:
    storage = Storage()
    drill = Drill(sys.argv[1])
    result: dict[str, Any] = {}
    result["embed"] = embed_drill(drill, storage)
    result["stalled_run"] = result["embed"].pop("stalled_run")
    print("EMBED " + json.dumps(result["embed"]), flush=True)
    result["train"] = train_drill(drill, storage)
    print("RESULT " + json.dumps(result), flush=True)
    drill.shutdown()


if __name__ == "__main__":
    main()
