"""Fault drills on a Ray cluster of a head and two worker nodes (``ray.cluster_utils.Cluster``).

* The embedding job runs as its own driver process; a worker node is removed once the first shard
  is in the store, and a fresh node joins. That run finishes or fails with the stall error (it must
  not hang); a rerun then stores every good key exactly once and encodes only the shards the first
  run did not complete.
* The prior trains with one worker on each worker node; after the first checkpoint one of those
  nodes is removed and a fresh node joins: the run restarts from that checkpoint on the nodes it
  has and finishes, with a falling loss.

The drills are ``tests/drills/node_loss.py`` (the cluster) and ``node_loss_driver.py`` (the
interrupted drivers). Nodes are removed with ``allow_graceful=False`` (their processes are
SIGKILLed, as when a machine dies). The head has no CPUs, so all work lands on the worker nodes.
Runs in a subprocess of its own process group: it needs a Ray of its own, and a timeout must take
every Ray process with it.
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

from drills import PROJECT, environment


def test_node_loss_during_embedding_and_training(tmp_path) -> None:
    ray_tmp = tempfile.mkdtemp(prefix="mn-", dir="/tmp")  # short: Ray's socket paths are limited
    proc = subprocess.Popen(
        [sys.executable, "-m", "drills.node_loss", str(tmp_path)],
        cwd=PROJECT,
        env=environment(RAY_TMPDIR=ray_tmp),
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
