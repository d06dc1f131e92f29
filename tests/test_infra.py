"""The deployment files in infra/ are real: they parse, the cluster-launcher config passes Ray's own
schema validation, every RayJob runs a real job module with a config that loads, its GPU worker
group holds what that config asks for, and the committed manifests are what render.py writes."""

from __future__ import annotations

import copy
import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from jobs.commands import by_module
from jobs.entry import load_stage_config

PROJECT = Path(__file__).resolve().parents[1]
INFRA = PROJECT / "infra"
sys.path.insert(0, str(INFRA / "kuberay"))
import render  # noqa: E402


def _manifests() -> dict[str, dict]:
    return {
        p.name: yaml.safe_load(p.read_text()) for p in sorted((INFRA / "kuberay").glob("*.yaml"))
    }


def _validate_launcher(cfg: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_cluster_launcher_config_passes_rays_schema() -> None:
    cfg = yaml.safe_load((INFRA / "cluster-launcher" / "aws.yaml").read_text())
    _validate_launcher(cfg)
    types = cfg["available_node_types"]
    assert any(t["resources"].get("GPU") for t in types.values())
    assert any(
        t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        for t in types.values()
    )
    # the validator is not a rubber stamp: a misspelt node-type key is refused
    broken = copy.deepcopy(cfg)
    broken["available_node_types"]["gpu_spot"]["max_worker"] = 4
    with pytest.raises(Exception, match="max_worker"):
        _validate_launcher(broken)


def test_committed_manifests_are_what_render_writes() -> None:
    rendered = render.render()
    on_disk = {p.name: p.read_text() for p in (INFRA / "kuberay").glob("*.yaml")}
    assert on_disk == rendered, "run: python infra/kuberay/render.py"


def _containers(cluster_spec: dict) -> list[dict]:
    pods = [cluster_spec["headGroupSpec"]["template"]]
    pods += [g["template"] for g in cluster_spec["workerGroupSpecs"]]
    return [c for pod in pods for c in pod["spec"]["containers"]]


def _resources_of(cluster_spec: dict) -> tuple[int, float]:
    """Total GPUs and CPUs of the worker groups at their fixed size."""
    gpus = cpus = 0.0
    for group in cluster_spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus += group["replicas"] * int(limits.get("nvidia.com/gpu", 0))
        cpus += group["replicas"] * float(limits["cpu"])
    return int(gpus), cpus


def _needs(cfg) -> tuple[float, float]:
    """GPUs and CPUs a stage's config asks Ray for."""
    scaling = getattr(cfg, "scaling", None)
    if scaling is not None:  # a training: at least its (fewest) workers
        least = scaling.worker_range[0]
        return least * (1 if scaling.use_gpu else 0), least * scaling.cpus_per_worker
    gpus = (getattr(cfg, "gpus_per_actor", 0) or 0) * getattr(cfg, "concurrency", 1)
    cpus = (getattr(cfg, "cpus_per_actor", 0) or 0) * getattr(cfg, "concurrency", 1)
    return gpus, cpus


@pytest.mark.parametrize("name", [f"rayjob-{s.name}.yaml" for s in render.STAGES])
def test_each_rayjob_runs_a_real_module_and_config_that_fits_its_workers(name: str) -> None:
    job = _manifests()[name]
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs.")
    importlib.import_module(argv[2])  # a real module
    stage = by_module(argv[2])  # of a real command
    rest = argv[3:]
    assert rest[0] == "--config" and (PROJECT / rest[1]).is_file(), rest[1]
    cfg = load_stage_config(stage, rest[1], rest[2:])  # the config and overrides load and check
    assert cfg.root == render.DEFAULT_ROOT

    spec = job["spec"]["rayClusterSpec"]
    gpus, cpus = _resources_of(spec)
    need_gpus, need_cpus = _needs(cfg)
    assert need_gpus <= gpus and need_cpus <= cpus, (name, need_gpus, gpus, need_cpus, cpus)
    if need_gpus:  # sized to the stage: not more GPUs than it uses
        assert gpus == need_gpus, (name, need_gpus, gpus)
    assert spec["rayVersion"] == render.RAY_VERSION
    assert spec["authOptions"] == {"mode": "token", "secretName": render.TOKEN_SECRET}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for container in _containers(spec):
        assert {"secretRef": {"name": render.STORAGE_SECRET}} in container["envFrom"]
        assert not any("SECRET" in e["name"] or "KEY" in e["name"] for e in container["env"])


def test_every_rendered_cluster_uses_token_auth_as_its_pods_hold_the_storage_secret() -> None:
    # issue 16: only the RayCluster had authOptions, while every RayJob's pods got the credentials
    docs = [yaml.safe_load(t) for t in render.render("my/unclip:1", "s3://b/u").values()]
    jobs = [d for d in docs if d["kind"] == "RayJob"]
    assert len(jobs) == len(render.STAGES) and len(docs) == len(jobs) + 1
    for doc in docs:
        spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        assert spec["authOptions"] == {"mode": "token", "secretName": render.TOKEN_SECRET}, doc
        assert any(
            {"secretRef": {"name": render.STORAGE_SECRET}} in c["envFrom"]
            for c in _containers(spec)
        )


def test_raycluster_autoscales_cpu_and_gpu_groups_with_token_auth() -> None:
    cluster = _manifests()["raycluster.yaml"]
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"] == {"mode": "token", "secretName": render.TOKEN_SECRET}
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"} and groups["gpu"]["maxReplicas"] > 0
    for container in _containers(spec):
        assert {"secretRef": {"name": render.STORAGE_SECRET}} in container["envFrom"]


def test_dockerfile_builds_on_the_ray_image_the_manifests_name() -> None:
    import ray

    text = (INFRA / "Dockerfile").read_text()
    version = re.search(r"^ARG RAY_VERSION=(\S+)$", text, re.M).group(1)
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-gpu$", text, re.M)
    assert version == render.RAY_VERSION == ray.__version__  # the Ray the tests run on
    pyproject = (PROJECT / "pyproject.toml").read_text()
    assert f'"ray[data,train,default]=={version}"' in pyproject  # and the one users install
    for source in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for path in source.split():
            assert (PROJECT / path).exists(), f"Dockerfile copies a missing {path}"
