"""Preflight: an actor pool the cluster cannot start is refused at once, with the config keys to
change (CPUs with the read tasks' share, GPUs, an actor bigger than any node), against the cluster
as it is or, when it autoscales, the most it can grow to."""

from __future__ import annotations

import pytest

from pipeline.cluster import preflight
from pipeline.cluster.preflight import ActorPool, check_actor_pool, pool_problems
from pipeline.errors import UserFacingError

TWO_CPUS = {"CPU": 2.0, "memory": 1e9}


def test_a_pool_that_fits_has_no_problems() -> None:
    assert pool_problems(ActorPool(1, 1.0, 0.0), TWO_CPUS) == []
    # no read tasks (rows in memory): the pool may take every CPU
    assert pool_problems(ActorPool(2, 1.0, 0.0, read_cpus=0), TWO_CPUS) == []
    # fractional GPUs add up
    assert pool_problems(ActorPool(4, 0.5, 0.5), {"CPU": 4.0, "GPU": 2.0}) == []


def test_too_many_cpus_names_the_keys() -> None:
    assert pool_problems(ActorPool(4, 2.0, 0.0), TWO_CPUS) == [
        "concurrency=4 × cpus_per_actor=2 = 8 CPUs + 1 for reading, but the cluster has 2 CPUs: "
        "lower concurrency or cpus_per_actor"
    ]
    # the read tasks' CPU is what tips it: the pool alone would fit, and then nothing reads
    assert pool_problems(ActorPool(2, 1.0, 0.0), TWO_CPUS) == [
        "concurrency=2 × cpus_per_actor=1 = 2 CPUs + 1 for reading, but the cluster has 2 CPUs: "
        "lower concurrency or cpus_per_actor"
    ]
    assert pool_problems(ActorPool(3, 1.0, 0.0, read_cpus=0), TWO_CPUS) == [
        "concurrency=3 × cpus_per_actor=1 = 3 CPUs, but the cluster has 2 CPUs: "
        "lower concurrency or cpus_per_actor"
    ]


def test_gpus_on_a_cluster_without_or_with_too_few() -> None:
    assert pool_problems(ActorPool(1, 1.0, 1.0), TWO_CPUS) == [
        "concurrency=1 × gpus_per_actor=1 = 1 GPU, but the cluster has no GPUs: set "
        "gpus_per_actor=0 to run on CPU, or use a cluster with GPUs"
    ]
    assert pool_problems(ActorPool(4, 1.0, 1.0), {"CPU": 16.0, "GPU": 2.0}) == [
        "concurrency=4 × gpus_per_actor=1 = 4 GPUs, but the cluster has 2 GPUs: lower "
        "concurrency or gpus_per_actor"
    ]
    auto = ActorPool(4, 1.0, 1.0, read_cpus=0, gpus_key="gpus_per_actor=null (1 each)")
    assert pool_problems(auto, {"CPU": 16.0, "GPU": 2.0}) == [
        "concurrency=4 × gpus_per_actor=null (1 each) = 4 GPUs, but the cluster has 2 GPUs: "
        "lower concurrency or gpus_per_actor"
    ]


def test_an_actor_bigger_than_every_node() -> None:
    nodes = [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}]
    pool = ActorPool(1, 1.0, 2.0)  # two GPUs an actor, one a node: 2 in all, never on one node
    assert pool_problems(pool, {"CPU": 4.0, "GPU": 2.0}, nodes) == [
        "one actor needs cpus_per_actor=1 and gpus_per_actor=2 on one node, but no node has that "
        "much (the largest have 2 CPUs and 1 GPU): lower cpus_per_actor or gpus_per_actor"
    ]
    assert pool_problems(ActorPool(1, 2.0, 1.0), {"CPU": 4.0, "GPU": 2.0}, nodes) == []


def test_an_autoscaling_cluster_is_checked_against_what_it_can_grow_to() -> None:
    assert pool_problems(ActorPool(8, 4.0, 1.0), {"CPU": 32.0, "GPU": 4.0}, grows=True) == [
        "concurrency=8 × cpus_per_actor=4 = 32 CPUs + 1 for reading, but the cluster can grow "
        "to at most 32 CPUs: lower concurrency or cpus_per_actor",
        "concurrency=8 × gpus_per_actor=1 = 8 GPUs, but the cluster can grow to at most 4 GPUs: "
        "lower concurrency or gpus_per_actor",
    ]


def test_check_raises_one_line_with_every_problem() -> None:
    check_actor_pool("embed", "encoder actors", ActorPool(1, 1.0, 0.0), TWO_CPUS)
    with pytest.raises(UserFacingError) as error:
        check_actor_pool("embed", "encoder actors", ActorPool(4, 2.0, 1.0), TWO_CPUS)
    message = str(error.value)
    assert message.startswith(
        "embed: the encoder actors cannot start on this cluster: concurrency=4 × "
        "cpus_per_actor=2 = 8 CPUs + 1 for reading, but the cluster has 2 CPUs"
    )
    assert "; and concurrency=4 × gpus_per_actor=1 = 4 GPUs, but the cluster has no GPUs" in message
    assert "\n" not in message


class _Group:
    def __init__(self, resources: dict[str, int], max_count: int) -> None:
        self.resources, self.max_count = resources, max_count


class _Config:
    def __init__(self, groups: list[_Group], max_resources: dict[str, int]) -> None:
        self.node_group_configs, self.max_resources = groups, max_resources


def test_autoscaler_limits_from_the_reported_cluster_config(monkeypatch) -> None:
    from ray._private.state import state

    head, cpu, gpu = _Group({"CPU": 0}, 1), _Group({"CPU": 32}, 16), _Group({"CPU": 8, "GPU": 1}, 8)
    config = _Config([head, cpu, gpu], {"GPU": 4})  # the config caps GPUs at 4
    monkeypatch.setattr(state, "get_cluster_config", lambda: config)
    totals, shapes = preflight.autoscaler_limits()
    assert totals == {"CPU": 16 * 32 + 8 * 8, "GPU": 4}
    assert shapes == [{"CPU": 0}, {"CPU": 32}, {"CPU": 8, "GPU": 1}]
    monkeypatch.setattr(state, "get_cluster_config", lambda: None)
    assert preflight.autoscaler_limits() is None


def test_the_cluster_check_on_a_local_ray(ray_local, monkeypatch) -> None:
    """The local Ray (2 CPUs, no autoscaler): one actor and the reading fit, two do not; with an
    autoscaler's limits reported, those count; with an autoscaler of unknown limits, no check."""
    assert preflight.autoscaler_limits() is None and not preflight.autoscaler_running()
    preflight.check_cluster_fits("embed", "encoder actors", ActorPool(1, 1.0, 0.0))
    with pytest.raises(UserFacingError, match=r"= 2 CPUs \+ 1 for reading, but the cluster has 2"):
        preflight.check_cluster_fits("embed", "encoder actors", ActorPool(2, 1.0, 0.0))
    grown = ({"CPU": 64.0, "GPU": 8.0}, [{"CPU": 8.0, "GPU": 1.0}])
    monkeypatch.setattr(preflight, "autoscaler_limits", lambda: grown)
    preflight.check_cluster_fits("embed", "encoder actors", ActorPool(8, 4.0, 1.0))
    with pytest.raises(UserFacingError, match=r"16 GPUs, but the cluster can grow to at most 8"):
        preflight.check_cluster_fits("embed", "encoder actors", ActorPool(16, 1.0, 1.0))
    # an autoscaler that does not report its limits: nothing to check against, so no refusal
    monkeypatch.setattr(preflight, "autoscaler_limits", lambda: None)
    monkeypatch.setattr(preflight, "autoscaler_running", lambda: True)
    preflight.check_cluster_fits("embed", "encoder actors", ActorPool(16, 1.0, 1.0))
