"""Write the KubeRay manifests of this folder: one RayCluster for interactive use and one RayJob per
stage, each with a GPU worker group sized for that stage's config.

    python infra/kuberay/render.py --root s3://my-bucket/unclip --image my-registry/unclip:0.1.0

The committed YAML files are this script's output with its defaults; rerender with your bucket and
image rather than editing seven files by hand (tests/test_infra.py checks the two stay in step).

What every manifest shares:

* the image of ``infra/Dockerfile`` (unclip installed, its configs at /home/ray/unclip/configs);
* storage credentials from the Secret ``unclip-storage`` (``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY`` and, for MinIO/R2, ``AWS_ENDPOINT_URL``) as environment variables of
  every Ray container, never in a manifest or an entrypoint;
* Ray's token authentication (``authOptions``, KubeRay >= 1.5.1) with the token of the Secret
  ``unclip-ray-token``: every pod holds the storage credentials, so no cluster, the RayJobs' own
  included, lets in whoever reaches its dashboard or GCS port without the token (the operator gives
  it to the RayJob's submitter);
* the storage root, one ``root=`` override on every entrypoint: all stages share it (shards,
  embedding store, checkpoints beside it);
* a head that takes no work (``num-cpus: 0``) and a shared-memory volume on every pod (NCCL and
  the object store need more than Docker's 64 MB ``/dev/shm``).

A RayJob brings up its own cluster, runs its stage and tears the cluster down. A failed job is
retried ``backoffLimit`` times, each on a fresh cluster; a training retry resumes from the run's
latest checkpoint on storage (the same ``run`` name), and ingestion/embedding retries skip finished
shards.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # this checkout's jobs/ (the command table)

from jobs.commands import COMMANDS  # noqa: E402

RAY_VERSION = "2.60.0"
DEFAULT_IMAGE = "REGISTRY/unclip:0.1.0"
DEFAULT_ROOT = "s3://BUCKET/unclip"
STORAGE_SECRET = "unclip-storage"
TOKEN_SECRET = "unclip-ray-token"


@dataclass(frozen=True)
class NodeShape:
    """One Kubernetes worker pod = one Ray node."""

    cpu: int
    memory: str
    gpu: int = 0
    shm: str = "64Gi"


# An 8-GPU node (p4d/p5, a2/a3): 8 training workers of 8 CPUs each, the rest for Ray Data.
GPU8 = NodeShape(cpu=90, memory="1000Gi", gpu=8, shm="200Gi")
CPU32 = NodeShape(cpu=32, memory="120Gi", shm="32Gi")
HEAD = NodeShape(cpu=8, memory="32Gi", shm="8Gi")


@dataclass(frozen=True)
class StageJob:
    """A stage's RayJob: the command it runs (``jobs.commands``), with which config, and the
    workers it needs."""

    name: str
    command: str
    config: str
    nodes: int
    shape: NodeShape
    overrides: tuple[str, ...] = ()
    note: str = ""

    def entrypoint(self, root: str) -> str:
        module = COMMANDS[self.command].module
        args = ["python", "-m", f"jobs.{module}", "--config", self.config, f"root={root}"]
        return shlex.join([*args, *self.overrides])


# Sized to the configs they run: scaling.num_workers GPUs for a training (8 per node), one encoder
# actor per GPU for the embedding, img2dataset's Ray distributor over CPU nodes for ingestion.
STAGES: tuple[StageJob, ...] = (
    StageJob(
        "ingest",
        "ingest",
        "configs/ingest/cluster.yaml",
        8,
        CPU32,
        ("input=s3://BUCKET/laion-subset/",),
        "img2dataset on Ray: 8 CPU nodes",
    ),
    StageJob(
        "embed", "embed", "configs/embed/paper.yaml", 1, GPU8, (), "one encoder actor per GPU"
    ),
    StageJob("train-prior", "train-prior", "configs/prior/paper.yaml", 1, GPU8, (), "8 GPUs"),
    StageJob(
        "train-decoder", "train-decoder", "configs/decoder/paper.yaml", 8, GPU8, (), "64 GPUs"
    ),
    StageJob(
        "train-upsampler-256",
        "train-upsampler",
        "configs/upsampler/paper-256.yaml",
        4,
        GPU8,
        (),
        "32 GPUs",
    ),
    StageJob(
        "train-upsampler-1024",
        "train-upsampler",
        "configs/upsampler/paper-1024.yaml",
        4,
        GPU8,
        (),
        "32 GPUs",
    ),
    StageJob(
        "generate",
        "generate",
        "configs/generate/paper.yaml",
        1,
        GPU8,
        (),
        "one generation actor per GPU",
    ),
)


def _container(image: str, shape: NodeShape, *, head: bool) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": str(shape.cpu), "memory": shape.memory}
    if shape.gpu:
        limits["nvidia.com/gpu"] = str(shape.gpu)
    container: dict[str, Any] = {
        "name": "ray-head" if head else "ray-worker",
        "image": image,
        "resources": {"limits": limits, "requests": dict(limits)},
        "env": [{"name": "AWS_DEFAULT_REGION", "value": "us-east-1"}],
        "envFrom": [{"secretRef": {"name": STORAGE_SECRET}}],
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if head:
        container["ports"] = [
            {"containerPort": 6379, "name": "gcs"},
            {"containerPort": 8265, "name": "dashboard"},
        ]
    return container


def _pod(image: str, shape: NodeShape, *, head: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [_container(image, shape, head=head)],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shape.shm}}],
    }
    if shape.gpu:
        spec["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    return {"spec": spec}


def auth_options() -> dict[str, str]:
    """Ray token authentication with the token of the Secret ``TOKEN_SECRET``, for every cluster:
    a RayJob's cluster runs the same jobs, with the same storage credentials, as the RayCluster."""
    return {"mode": "token", "secretName": TOKEN_SECRET}


def cluster_spec(
    image: str, groups: list[tuple[str, int, int, NodeShape]], *, autoscale: bool
) -> dict[str, Any]:
    """A RayCluster spec: a head without work and ``groups`` of (name, min, max, shape), with
    token authentication."""
    spec: dict[str, Any] = {
        "rayVersion": RAY_VERSION,
        "authOptions": auth_options(),
        "enableInTreeAutoscaling": autoscale,
        "headGroupSpec": {
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": _pod(image, HEAD, head=True),
        },
        "workerGroupSpecs": [
            {
                "groupName": name,
                "replicas": low,
                "minReplicas": low,
                "maxReplicas": high,
                "rayStartParams": {},
                "template": _pod(image, shape, head=False),
            }
            for name, low, high, shape in groups
        ],
    }
    if autoscale:
        spec["autoscalerOptions"] = {"idleTimeoutSeconds": 600, "upscalingMode": "Default"}
    return spec


def rayjob(stage: StageJob, image: str, root: str) -> dict[str, Any]:
    group = "gpu" if stage.shape.gpu else "cpu"
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": f"unclip-{stage.name}", "labels": {"app": "unclip"}},
        "spec": {
            "entrypoint": stage.entrypoint(root),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "backoffLimit": 2,
            "rayClusterSpec": cluster_spec(
                image, [(group, stage.nodes, stage.nodes, stage.shape)], autoscale=False
            ),
        },
    }


def raycluster(image: str) -> dict[str, Any]:
    spec = cluster_spec(image, [("cpu", 0, 16, CPU32), ("gpu", 0, 8, GPU8)], autoscale=True)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": "unclip", "labels": {"app": "unclip"}},
        "spec": spec,
    }


def _dump(header: str, doc: dict[str, Any]) -> str:
    lines = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines())
    return lines + yaml.safe_dump(doc, sort_keys=False, width=100)


def render(image: str = DEFAULT_IMAGE, root: str = DEFAULT_ROOT) -> dict[str, str]:
    """Every manifest: file name → YAML text."""
    out = {
        "raycluster.yaml": _dump(
            "A long-lived, autoscaling unclip cluster for `unclip submit` (see infra/GUIDE.md).\n"
            "Token authentication with the Secret unclip-ray-token (KubeRay >= 1.5.1).\n"
            "Generated by infra/kuberay/render.py: rerender rather than edit.",
            raycluster(image),
        )
    }
    for stage in STAGES:
        out[f"rayjob-{stage.name}.yaml"] = _dump(
            f"unclip {stage.name} as a RayJob on a cluster of its own: {stage.note}.\n"
            "Token authentication with the Secret unclip-ray-token (KubeRay >= 1.5.1).\n"
            "Generated by infra/kuberay/render.py: rerender rather than edit.",
            rayjob(stage, image, root),
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default=DEFAULT_IMAGE, help="the image of infra/Dockerfile")
    parser.add_argument("--root", default=DEFAULT_ROOT, help="the storage root every stage shares")
    parser.add_argument("--out", type=Path, default=HERE, help="where to write the manifests")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in render(args.image, args.root).items():
        (args.out / name).write_text(text)
        print(args.out / name)


if __name__ == "__main__":
    main()
