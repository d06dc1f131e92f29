"""Connecting to Ray: the cluster a job was submitted to, a named address, or a private local Ray.

Stages call :func:`connect` after their config is checked, never before: a bad config must fail
without asking a cluster for anything.

Which Ray a command uses depends only on ``ray.address`` and ``RAY_ADDRESS``, never on what an
earlier Ray left on the machine: Ray's own ``ray.init()`` would also join the cluster named in
``/tmp/ray/ray_current_cluster`` (written by ``ray start`` or a test cluster, possibly long dead).
"""

from __future__ import annotations

import logging
import os

from pipeline.stage_config import RayOptions

log = logging.getLogger(__name__)


def joins_cluster(options: RayOptions) -> bool:
    """Whether ``options`` join an existing cluster (else they start a private local Ray).

    ``address: null`` joins ``RAY_ADDRESS`` when it is set (a submitted job has it) and otherwise
    starts a local Ray; ``local`` always starts one, even with ``RAY_ADDRESS`` set; anything else
    (``auto``, ``host:port``, ``ray://...``) joins.
    """
    if options.address is None:
        return bool(os.environ.get("RAY_ADDRESS"))
    return options.address != "local"


def connect(options: RayOptions) -> dict[str, float]:
    """Initialise Ray once per process as :func:`joins_cluster` says; return the cluster's total
    resources. A local Ray is started with ``address="local"`` (so Ray neither reads
    ``RAY_ADDRESS`` nor looks for a running instance) and ``num_cpus``; ``RAY_ADDRESS`` is then
    removed from this process's environment, so nothing it starts later joins the other cluster.
    """
    import ray

    if not ray.is_initialized():
        joining = joins_cluster(options)
        if joining:
            ray.init(address=options.address or os.environ["RAY_ADDRESS"], log_to_driver=True)
        else:
            ignored = os.environ.pop("RAY_ADDRESS", None)
            if ignored:
                log.info("ray.address is local: not joining RAY_ADDRESS=%s", ignored)
            ray.init(
                address="local",
                num_cpus=options.num_cpus,
                include_dashboard=False,
                log_to_driver=True,
            )
        log.info("Ray %s: %s", "joined" if joining else "started locally", ray.cluster_resources())
    return dict(ray.cluster_resources())
