"""Connecting to Ray: the cluster a job was submitted to, a named address, or a private local Ray.

Stages call :func:`connect` after their config is checked, never before: a bad config must fail
without asking a cluster for anything.

Which Ray a command uses depends only on ``ray.address`` and ``RAY_ADDRESS``, never on what an
earlier Ray left on the machine: Ray's own ``ray.init()`` would also join the cluster named in
``/tmp/ray/ray_current_cluster`` (written by ``ray start`` or a test cluster, possibly long dead).

Where Ray's own output goes follows the command's logging (:mod:`pipeline.logs`): a quiet command
sends the driver's Ray and Ray Data loggers to its run log, turns Ray Data's progress bars off (a
TTY's bars bypass logging; elsewhere they are a block of lines every few seconds) and leaves the
workers' output in Ray's session logs (``log_to_driver=False``; the run log names the folder), while
``--verbose`` shows all of it as Ray prints it. Errors the raylet reports (a worker killed for
memory, a dead node) still reach the terminal.
"""

from __future__ import annotations

import logging
import os

from pipeline import logs
from pipeline.stage_config import RayOptions

log = logging.getLogger(__name__)

PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
"""Ray Train's watcher of draining nodes (an actor with ``max_restarts=-1``, which Ray core warns
about on every run). A private local Ray has no node to drain: it is off there unless the
environment says otherwise; on a cluster it stays on."""


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
    Ray's output is routed as the module's doc says, on every call (Ray may have been started by
    someone else).
    """
    import ray

    quiet = logs.quiet()
    if logs.configured():
        import ray.data  # configures its logger once, at import: routed after it

        logs.route_ray_loggers()
        if quiet:
            ray.data.DataContext.get_current().enable_progress_bars = False
    joining = joins_cluster(options)
    if not joining:
        os.environ.setdefault(PREEMPTION_WATCHER, "0")
    if not ray.is_initialized():
        if joining:
            ray.init(address=options.address or os.environ["RAY_ADDRESS"], log_to_driver=not quiet)
        else:
            ignored = os.environ.pop("RAY_ADDRESS", None)
            if ignored:
                log.info("ray.address is local: not joining RAY_ADDRESS=%s", ignored)
            ray.init(
                address="local",
                num_cpus=options.num_cpus,
                include_dashboard=False,
                log_to_driver=not quiet,
            )
        log.info("Ray %s: %s", "joined" if joining else "started locally", ray.cluster_resources())
    session_logs = logs.ray_session_logs()
    if session_logs:
        log.info("Ray's own logs on this node (workers' output, raylet, GCS): %s", session_logs)
    return dict(ray.cluster_resources())
