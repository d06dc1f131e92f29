"""Fault drills on a Ray cluster of a head and two worker nodes (``ray.cluster_utils.Cluster``).

* The embedding job runs as its own driver process; a worker node is removed once the first shard
  is in the store, and a fresh node joins. That run finishes or fails with the stall error (it must
  not hang); a rerun then stores every good key exactly once and encodes only the shards the first
  run did not complete.
* Elastic training: the prior trains with ``scaling.num_workers: 1..2``, one worker on each worker
  node; after its first checkpoint one of those nodes is lost for good: the run goes on with one
  worker at the same global batch, its loss curve continuous; a node added once it has
  checkpointed on one worker is taken in, and the run finishes on two.

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
from drills.node_loss_driver import TRAIN_STEPS


def test_node_loss_during_embedding_and_elastic_training(tmp_path) -> None:
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
    # The elastic training lost a node after its first checkpoint and went on with one worker,
    # restarting from a checkpoint (not from zero); it took the node added later, and finished.
    assert train["node_removed"] and train["node_added"], result
    steps = TRAIN_STEPS
    assert train["driver"] == f'DRIVER finished {{"step": {steps}}}', result
    assert [w for _, w in train["workers"]] == [2, 1, 2], result
    assert train["state_step"] == steps and train["resumes"] >= 2, result
    assert train["samples"] == steps * 32, result  # the global batch on one worker as on two
    assert train["alive_nodes"] == 3, result
    # One loss curve: every logged step once, no jump where the worker count changed, falling.
    history = train["history"]
    assert [s for s, _ in history] == list(range(5, steps + 1, 5)), result
    loss = dict(history)
    for changed, _ in train["workers"][1:]:  # one logged loss is noisy: windows of three
        before = [loss[s] for s in range(changed - 10, changed + 1, 5) if s in loss]
        after = [loss[s] for s in range(changed + 5, changed + 16, 5) if s in loss]
        window = (changed, before, after, train["workers"])
        assert sum(after) / len(after) < 1.5 * sum(before) / len(before), window
    assert loss[steps] < loss[5], result
