"""A stall watchdog for the Ray Data pipelines a driver consumes (embedding, batch generation).

A job that hangs is worse than a job that fails. When a worker node is lost and nothing replaces
it (no autoscaler, or no capacity), the restarted encoder actors can take every CPU the remaining
nodes have, leaving none for the read tasks that feed them: nothing moves, and Ray Data waits for
ever. This project's fault drill saw exactly that while its replacement node failed to start;
ray-project/ray#62746 reports a pool that stops for another reason. The jobs that use this are
resumable: everything they finished is kept in storage and a rerun does only the rest. So when
no output has arrived for ``timeout_s``, the driver stops waiting and fails with an error that says
what was kept and that a rerun resumes (or the job's retry policy reruns it: ``backoffLimit`` in
the KubeRay RayJobs).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from pipeline.errors import UserFacingError

T = TypeVar("T")

_END = object()


class PipelineStalled(UserFacingError):
    """No output for longer than the stall timeout."""


def iter_until_stalled(
    items: Iterable[T],
    timeout_s: float | None,
    describe: Callable[[float], str],
) -> Iterator[T]:
    """Yield ``items`` (consumed in a helper thread) and raise :class:`PipelineStalled` with
    ``describe(seconds_waited)`` when the next one takes longer than ``timeout_s`` to arrive.

    ``None`` or 0 waits forever (plain iteration, no thread). The wait counts from the first
    request, so it includes actor start-up and model loading: size it above that. Errors of the
    source are raised here unchanged. On a stall the helper thread stays blocked inside Ray
    Data, and the abandoned execution keeps its actors until the process ends: the job
    entrypoints end it with the error; a caller that retries in-process needs ``ray.shutdown()``
    first.
    """
    if not timeout_s:
        yield from items
        return
    handoff: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def pump() -> None:
        source = iter(items)
        try:
            for item in source:
                while not stop.is_set():
                    try:
                        handoff.put((item, None), timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    break
        except BaseException as exc:
            handoff.put((_END, exc))
            return
        finally:
            close = getattr(source, "close", None)
            if stop.is_set() and close is not None:
                close()
        handoff.put((_END, None))

    thread = threading.Thread(target=pump, name="pipeline-watchdog", daemon=True)
    thread.start()
    try:
        while True:
            started = time.monotonic()
            try:
                item, error = handoff.get(timeout=timeout_s)
            except queue.Empty:
                raise PipelineStalled(describe(time.monotonic() - started)) from None
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        stop.set()
