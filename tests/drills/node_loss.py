"""The node-loss drills on a Ray cluster of a head and two worker nodes
(``ray.cluster_utils.Cluster``), run by ``tests/test_multinode.py``; prints one ``RESULT {...}``
line of JSON that the test reads.

    python -m drills.node_loss ROOT       (RAY_TMPDIR: a short folder of this run's own)

1. The embedding job, as a driver of its own (``drills.node_loss_driver``), loses a worker node once
   its first shard is in the store, and a fresh node joins. A rerun then encodes only what the
   interrupted run did not complete.
2. An elastic prior training (``num_workers: 1..2``, one worker per worker node) loses a node after
   its first checkpoint and goes on with one worker; a node added then is taken in.
3. An embedding run with a stall timeout shorter than the encoders' start-up must fail with the
   stall error.

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
WORKER_NODES = 2


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
        self.workers = [self.cluster.add_node(**NODE) for _ in range(WORKER_NODES)]
        ray.init(address=self.cluster.address, log_to_driver=False)

    def lose_node(self) -> None:
        """SIGKILL a worker node's processes, as when a machine dies."""
        self.cluster.remove_node(self.workers.pop(0), allow_graceful=False)

    def add_node(self) -> None:
        """Start a fresh worker node (from the main thread: ``Cluster.add_node`` installs signal
        handlers)."""
        self.workers.append(self.cluster.add_node(**NODE))
        self.cluster.wait_for_nodes()

    def run_losing_a_node(self, args: list[str], ready: Callable[[], bool]) -> tuple[str, bool]:
        """Run a driver; once ``ready()``, lose a worker node and start a fresh one. Returns the
        driver's outcome line and whether the node went while the driver ran."""

        def replace() -> None:
            self.lose_node()
            time.sleep(2)
            self.add_node()

        outcome, done = self.run_with(args, [(ready, replace)])
        return outcome, done[0]

    def run_with(
        self,
        args: list[str],
        plan: list[tuple[Callable[[], bool], Callable[[], None]]],
        poll_s: float = 0.05,
        **env: str,
    ) -> tuple[str, list[bool]]:
        """Run a driver and, in turn, each ``(ready, action)`` of ``plan``: the action once its
        ``ready()`` holds, while the driver runs. Returns the driver's outcome line and, per
        action, whether it ran while the driver did."""
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "drills.node_loss_driver",
                self.cluster.address,
                self.root,
                *args,
            ],
            env=environment(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        done = []
        for ready, action in plan:
            deadline = time.time() + 300
            while child.poll() is None and not ready() and time.time() < deadline:
                time.sleep(poll_s)
            done.append(child.poll() is None)
            if done[-1]:
                action()
        out, err = child.communicate(timeout=400)
        lines = [line for line in out.splitlines() if line.startswith("DRIVER ")]
        return (lines[-1] if lines else out[-2000:] + err[-4000:]), done

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


def _alive_workers() -> list[str]:
    """The ids of the live nodes with CPUs (the head has none)."""
    return sorted(
        n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0
    )


def wait_for_settled_coordinator(timeout_s: float = 200) -> list[str]:
    """Wait until the autoscaling coordinator (Ray Data's and Ray Train's shared detached actor)
    sees the live worker nodes as they are and holds no earlier job's reservation; return what
    it held at first.

    An elastic training starts with the workers the coordinator reserves for it, from its own view
    of the nodes, which it refreshes every 20 s: started right after the embedding drill lost a
    node and added one, the training got one worker (a lost node still in the view, the new one
    not yet). A Ray Data pipeline's request, cancelled fire-and-forget when it ends, can also
    linger until it expires (180 s). What the drill asserts is the loss of a node and the arrival
    of one, so it starts from a settled cluster.
    """
    deadline = time.time() + timeout_s
    while len(_alive_workers()) != WORKER_NODES and time.time() < deadline:
        time.sleep(1)  # the GCS marks a killed node dead only after its health checks fail
    try:
        actor = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    except ValueError:  # none yet: the training creates it, with a fresh view
        return []

    def state(self) -> tuple[list[str], list[str]]:
        now = time.time()
        requests = [
            f"{requester}: {request.requested_resources} for {request.expiration_time - now:.0f} s"
            for requester, request in self._ongoing_reqs.items()
            if request.expiration_time >= now
        ]
        nodes = sorted(n for group in self._cluster_node_resources.values() for n in group)
        return requests, nodes

    def settled() -> tuple[bool, list[str]]:
        requests, seen = ray.get(actor.__ray_call__.remote(state))
        return not requests and seen == _alive_workers(), requests

    _, first = settled()
    while not settled()[0] and time.time() < deadline:
        time.sleep(2)
    return first


def train_drill(drill: Drill, storage: Storage) -> dict[str, Any]:
    """An elastic prior training (``num_workers: 1..2``, one worker per worker node: each takes
    the node's one trainer_slot) loses a node after its first checkpoint and gets none back; once
    it has checkpointed on the one worker left, a node joins."""
    run_url = join(drill.root, "checkpoints", "prior")

    def latest_state() -> dict[str, Any]:
        try:
            return storage.read_json(join(latest_checkpoint(storage, run_url), "state.json"))
        except Exception:
            return {}

    def on_one_worker() -> bool:
        workers = latest_state().get("workers", [])
        return bool(workers) and workers[-1][1] == 1

    started = time.time()
    reserved_before = wait_for_settled_coordinator()
    trained, done = drill.run_with(
        ["train"],
        [(lambda: bool(latest_state()), drill.lose_node), (on_one_worker, drill.add_node)],
        poll_s=0.5,
        # a restart that still counts the lost node's slot gives up its placement after 15 s
        # (Ray Train's default: 60 s) and is rescheduled on what the cluster has
        RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="15",
    )
    state = latest_state()
    return {
        "driver": trained,
        "node_removed": done[0],
        "node_added": done[1],
        "seconds": round(time.time() - started),
        "state_step": state["step"],
        "samples": state["samples"],
        "resumes": state["resumes"],
        "workers": state["workers"],
        "history": state["history"],
        "alive_nodes": len([n for n in ray.nodes() if n["Alive"]]),
        "reserved_before": reserved_before,
    }


def main() -> None:
    storage = Storage()
    drill = Drill(sys.argv[1])
    result: dict[str, Any] = {}
    result["embed"] = embed_drill(drill, storage)
    print("EMBED " + json.dumps(result["embed"]), flush=True)
    result["train"] = train_drill(drill, storage)
    print("TRAIN " + json.dumps(result["train"]), flush=True)
    # the stall watchdog, last: a timeout shorter than the encoders' start-up fails the run. (Run
    # first, the resources its pool asked Ray Data's autoscaling coordinator for stayed reserved
    # after its driver ended, and the next run got no encoders for over 90 s.)
    result["stalled_run"], _ = drill.run_with(
        ["embed", os.path.join(drill.root, "clip.safetensors"), "0.001", "stalls"], []
    )
    print("RESULT " + json.dumps(result), flush=True)
    drill.shutdown()


if __name__ == "__main__":
    main()
