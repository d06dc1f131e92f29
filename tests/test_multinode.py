"""The prior trains across a Ray cluster of a head and two worker nodes (``ray.cluster_utils``),
one training worker per worker node. Runs in a subprocess: it needs a Ray of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from pipeline.checkpoints import latest_checkpoint
from pipeline.storage import Storage

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    """
    import dataclasses, json, os, sys, tempfile
    sys.path.insert(0, os.path.join(PROJECT, "tests"))
    import ray
    from ray.cluster_utils import Cluster

    root = sys.argv[1]
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "temp_dir": tempfile.mkdtemp(prefix="ray-", dir="/tmp")},
    )
    for _ in range(2):
        cluster.add_node(num_cpus=1, resources={"trainer_slot": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    assert len([n for n in ray.nodes() if n["Alive"]]) == 3

    from conftest import Root
    from test_embed import _embed_cfg, _synth, _tiny_clip_checkpoint
    from pipeline import config as configlib
    from pipeline.embed import run_embedding
    from pipeline.stage_config import PriorConfig
    from pipeline.storage import Storage
    from pipeline.trainer import run_training

    storage = Storage()
    where = Root("local", root, storage)
    _synth(where, 128, 32)
    run_embedding(_embed_cfg(where, _tiny_clip_checkpoint(os.path.join(root, "clip.safetensors"), 0)), storage)
    cfg = configlib.load(PriorConfig, os.path.join(PROJECT, "configs", "prior", "tiny.yaml"), [
        f"root={root}", "train.steps=20", "train.batch_size=32", "checkpoint.every_steps=10",
        "train.log_every=5", "scaling.cpus_per_worker=0.25", "scaling.resources_per_worker={trainer_slot: 1}",
    ])
    summary = run_training("train-prior", cfg, storage)
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("trainer_slot")}
    print("RESULT " + json.dumps({"step": summary["step"], "loss": summary["loss"], "trainer_nodes": len(nodes)}))
    ray.shutdown()
    cluster.shutdown()
    """
).replace("PROJECT", repr(PROJECT))


def test_prior_trains_across_three_nodes(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["step"] == 20 and result["trainer_nodes"] == 2
    latest = latest_checkpoint(Storage(), os.path.join(tmp_path, "checkpoints", "prior"))
    history = Storage().read_json(os.path.join(latest, "state.json"))["history"]
    assert history[-1][1] < history[0][1]
