"""Connecting to Ray: the cluster a job was submitted to, a named address, or a local Ray.

Stages call :func:`connect` after their config is checked, never before: a bad config must fail
without asking a cluster for anything.
"""

from __future__ import annotations

import logging
import os

from pipeline.stage_config import RayOptions

log = logging.getLogger(__name__)


def connect(options: RayOptions) -> dict[str, float]:
    """Initialise Ray once per process and return the cluster's total resources.

    ``address: null`` joins the cluster a job was submitted to (or ``RAY_ADDRESS``) and otherwise
    starts a local Ray with ``num_cpus``; ``local`` always starts one; anything else is passed to
    ``ray.init(address=...)``.
    """
    import ray

    if not ray.is_initialized():
        address = options.address
        joining = address not in (None, "local") or (
            address is None and bool(os.environ.get("RAY_ADDRESS"))
        )
        if joining:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(num_cpus=options.num_cpus, include_dashboard=False, log_to_driver=True)
        log.info("Ray %s: %s", "joined" if joining else "started locally", ray.cluster_resources())
    return dict(ray.cluster_resources())
