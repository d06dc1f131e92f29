"""A driver of its own on the drill's cluster, as a submitted job would be: the embedding job or a
prior training. It prints one ``DRIVER finished ...`` or ``DRIVER failed ...`` line.

    python -m drills.node_loss_driver ADDRESS ROOT embed CHECKPOINT STALL_TIMEOUT_S CLIP_ID
    python -m drills.node_loss_driver ADDRESS ROOT train

A stalled execution keeps its actors until its process ends, as the job's does.
"""

import json
import os
import sys

import ray
from conftest import Root
from helpers import embed_cfg

from drills import PROJECT
from pipeline import config as configlib
from pipeline.errors import UserFacingError
from pipeline.stage_config import PriorConfig
from pipeline.storage import Storage

TRAIN_STEPS = 400  # long enough to lose a node, go on with one worker, and take a new one in


def embed(root: str, checkpoint: str, stall_timeout_s: float, clip_id: str) -> None:
    from pipeline.embed.job import run_embedding

    cfg = embed_cfg(
        Root("local", root, Storage()),
        checkpoint,
        batch_size=4,
        concurrency=2,
        stall_timeout_s=stall_timeout_s,
        clip_id=clip_id,
    )
    try:
        summary = run_embedding(cfg, Storage())
        print("DRIVER finished", summary["shards_encoded_now"], flush=True)
    except UserFacingError as exc:
        print("DRIVER failed", exc, flush=True)


def train(root: str) -> None:
    from pipeline.train.driver import run_training

    cfg = configlib.load(
        PriorConfig,
        os.path.join(PROJECT, "configs", "prior", "tiny.yaml"),
        [
            f"root={root}",
            "clip_id=drill",
            f"train.steps={TRAIN_STEPS}",
            "train.batch_size=32",
            "checkpoint.every_steps=10",
            "train.log_every=5",
            "train.max_failures=2",
            "scaling.num_workers=1..2",
            "scaling.resize_interval_s=5",
            "scaling.cpus_per_worker=0.5",
            "scaling.resources_per_worker={trainer_slot: 1}",
        ],
    )
    summary = run_training("train-prior", cfg, Storage())
    print("DRIVER finished", json.dumps({"step": summary["step"]}), flush=True)


def main() -> None:
    address, root, what = sys.argv[1:4]
    ray.init(address=address, log_to_driver=False)
    if what == "embed":
        embed(root, sys.argv[4], float(sys.argv[5]), sys.argv[6])
    else:
        train(root)


if __name__ == "__main__":
    main()
