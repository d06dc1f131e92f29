"""Preflight: refuse an actor pool the cluster can never start, before a job asks Ray for it.

Ray Data waits for ever for actors that do not fit: an embedding job with ``concurrency=4`` and
``cpus_per_actor=2`` on a 2-CPU cluster, or ``gpus_per_actor=1`` on a cluster without GPUs, sits
at "0 actors running" without an error. And a pool that takes every CPU leaves none for the read
tasks that feed it, which hangs the same way (see :mod:`pipeline.cluster.watchdog`). So the jobs
that run actor pools (``unclip embed``, ``unclip generate``) check the pool against the cluster
first, and fail at once with the config keys to change.

:func:`check_actor_pool` is the check itself (plain numbers in, no Ray); :func:`check_cluster_fits`
reads the cluster's resources from Ray and calls it. On an autoscaling cluster the check is made
against the most it can grow to when Ray knows that (a cluster config reported to Ray); when an
autoscaler runs whose limits are unknown here (KubeRay's and the cluster launcher's, whose idle
clusters may have no worker at all), the check is skipped with a log line rather than refuse a
pool the autoscaler would start nodes for.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pipeline.errors import UserFacingError

log = logging.getLogger(__name__)

_EPS = 1e-6  # Ray's resources are floats (fractional GPUs): compare with a little slack


def _n(value: float) -> str:
    return f"{value:g}"


def _plural(count: float, unit: str) -> str:
    return f"{_n(count)} {unit}" if count == 1 else f"{_n(count)} {unit}s"


@dataclass(frozen=True)
class ActorPool:
    """What an actor pool asks of the cluster, as its config keys set it.

    ``read_cpus``: the CPUs the tasks that feed the pool need beside it (Ray Data read tasks
    take 1 CPU each; 0 when the rows are already in memory). ``gpus_key``: how the GPU setting
    reads in messages (default ``gpus_per_actor=<value>``), for a job that chose it itself.
    """

    concurrency: int
    cpus_per_actor: float
    gpus_per_actor: float
    read_cpus: float = 1.0
    gpus_key: str | None = None


def pool_problems(
    pool: ActorPool,
    resources: Mapping[str, float],
    nodes: Sequence[Mapping[str, float]] | None = None,
    grows: bool = False,
) -> list[str]:
    """Why ``pool`` cannot run on a cluster of ``resources`` (``ray.cluster_resources()``'s
    ``CPU`` and ``GPU``), one sentence each naming the config keys; empty when it can.

    ``nodes``: the resources of each node (or node type), when known: an actor must fit on one.
    ``grows``: ``resources`` is the most an autoscaling cluster can grow to (said so).
    """
    has = "can grow to at most" if grows else "has"
    cluster_cpus = float(resources.get("CPU", 0))
    cluster_gpus = float(resources.get("GPU", 0))
    problems = []

    cpus = pool.concurrency * pool.cpus_per_actor
    if cpus + pool.read_cpus > cluster_cpus + _EPS:
        reading = f" + {_n(pool.read_cpus)} for reading" if pool.read_cpus else ""
        problems.append(
            f"concurrency={pool.concurrency} × cpus_per_actor={_n(pool.cpus_per_actor)} = "
            f"{_plural(cpus, 'CPU')}{reading}, but the cluster {has} "
            f"{_plural(cluster_cpus, 'CPU')}: lower concurrency or cpus_per_actor"
        )

    gpus = pool.concurrency * pool.gpus_per_actor
    shown = pool.gpus_key or f"gpus_per_actor={_n(pool.gpus_per_actor)}"
    if gpus > 0 and cluster_gpus <= 0:
        problems.append(
            f"concurrency={pool.concurrency} × {shown} = {_plural(gpus, 'GPU')}, but the "
            f"cluster {'can have' if grows else 'has'} no GPUs: set gpus_per_actor=0 to run on "
            "CPU, or use a cluster with GPUs"
        )
    elif gpus > cluster_gpus + _EPS:
        problems.append(
            f"concurrency={pool.concurrency} × {shown} = {_plural(gpus, 'GPU')}, but the "
            f"cluster {has} {_plural(cluster_gpus, 'GPU')}: lower concurrency or gpus_per_actor"
        )

    if nodes and not problems and not any(_fits(pool, node) for node in nodes):
        cpu = max(float(n.get("CPU", 0)) for n in nodes)
        gpu = max(float(n.get("GPU", 0)) for n in nodes)
        problems.append(
            f"one actor needs cpus_per_actor={_n(pool.cpus_per_actor)} and {shown} on one "
            f"node, but no node has that much (the largest have {_plural(cpu, 'CPU')} and "
            f"{_plural(gpu, 'GPU')}): lower cpus_per_actor or gpus_per_actor"
        )
    return problems


def _fits(pool: ActorPool, node: Mapping[str, float]) -> bool:
    return (
        float(node.get("CPU", 0)) + _EPS >= pool.cpus_per_actor
        and float(node.get("GPU", 0)) + _EPS >= pool.gpus_per_actor
    )


def check_actor_pool(
    job: str,
    actors: str,
    pool: ActorPool,
    resources: Mapping[str, float],
    nodes: Sequence[Mapping[str, float]] | None = None,
    grows: bool = False,
) -> None:
    """Raise :class:`UserFacingError` when :func:`pool_problems` finds that ``pool`` cannot
    start; ``job`` and ``actors`` name the job and its actors in the message (``"embed"``,
    ``"encoder actors"``)."""
    problems = pool_problems(pool, resources, nodes, grows)
    if problems:
        raise UserFacingError(
            f"{job}: the {actors} cannot start on this cluster: " + "; and ".join(problems)
        )


def autoscaler_limits() -> tuple[dict[str, float], list[dict[str, float]]] | None:
    """The most an autoscaling cluster can grow to (total resources, and each node type's
    resources) from the cluster config that KubeRay's and the launcher's autoscaler report to
    Ray; None when none was reported (no autoscaler, or one that does not report it)."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # a private API of Ray: absent or changed, the check goes on without it
        return None
    if config is None or not config.node_group_configs:
        return None
    totals: dict[str, float] = {}
    shapes = []
    for group in config.node_group_configs:
        shape = {k: float(v) for k, v in group.resources.items()}
        shapes.append(shape)
        count = group.max_count if group.max_count >= 0 else 10**6  # -1: unlimited
        for key, value in shape.items():
            totals[key] = totals.get(key, 0.0) + value * count
    for key, limit in config.max_resources.items():
        if key in totals:
            totals[key] = min(totals[key], float(limit))
    return totals, shapes


def autoscaler_running() -> bool:
    """Whether an autoscaler can add nodes to this cluster: Ray's autoscaler v2, or a v1 monitor
    that manages node types (a cluster without an autoscaler runs a read-only monitor, which names
    each node's type after its id)."""
    try:
        from ray._private import ray_constants
        from ray.autoscaler._private.util import format_readonly_node_type
        from ray.autoscaler.v2.utils import is_autoscaler_v2
        from ray.experimental.internal_kv import _internal_kv_get

        if is_autoscaler_v2(fetch_from_server=True):
            return True
        status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        if status is None:
            return False
        report = json.loads(status).get("autoscaler_report") or {}
        types = report.get("node_type_mapping") or {}
        return any(kind != format_readonly_node_type(node) for node, kind in types.items())
    except Exception:  # private APIs of Ray: absent or changed, the cluster is taken as it is
        log.debug("preflight: cannot tell whether the cluster autoscales", exc_info=True)
        return False


def check_cluster_fits(job: str, actors: str, pool: ActorPool) -> None:
    """:func:`check_actor_pool` against the connected Ray cluster: its resources now
    (``ray.cluster_resources()``, and each alive node's), or the most it can grow to when it
    autoscales. Call it after connecting and before the pool is asked for."""
    import ray

    resources = {k: float(v) for k, v in ray.cluster_resources().items()}
    nodes = [
        {k: float(v) for k, v in n.get("Resources", {}).items()} for n in ray.nodes() if n["Alive"]
    ]
    grows = False
    limits = autoscaler_limits()
    if limits is not None:
        totals, shapes = limits
        keys = {*resources, *totals}
        resources = {k: max(resources.get(k, 0.0), totals.get(k, 0.0)) for k in keys}
        nodes += shapes
        grows = True
    elif autoscaler_running():
        log.info(
            "%s: the cluster autoscales to limits Ray does not report here: the %s are not "
            "checked against its resources",
            job,
            actors,
        )
        return
    check_actor_pool(job, actors, pool, resources, nodes, grows)
