"""What the bench scripts measure with: peak resident memory, model FLOPs, device syncs, MFU.

Imported by the scripts as ``bench.measure`` (each puts the repository root on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import psutil
import torch


class PeakMemory:
    """Samples (every ``interval`` s, on a thread, while in the ``with`` block) the summed RSS of
    this process and, with ``tree``, all its descendants (Ray's processes). With ``worker``, also
    the peak RSS of the one descendant whose command line holds that string (e.g.
    ``"RayTrainWorker"``), alone: ``worker_peak``."""

    def __init__(self, tree: bool = True, interval: float = 0.2, worker: str | None = None) -> None:
        self.tree, self.interval, self.worker = tree, interval, worker
        self.peak, self.worker_peak, self._stop = 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            procs = [me, *me.children(recursive=True)] if self.tree else [me]
            for proc in procs:
                with contextlib.suppress(psutil.Error):  # a process that just exited
                    rss = proc.memory_info().rss
                    total += rss
                    if self.worker and self.worker in " ".join(proc.cmdline()):
                        self.worker_peak = max(self.worker_peak, rss)
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def flops_per_sample(model: torch.nn.Module, forward_backward: Callable[[], None], n: int) -> float:
    """Model FLOPs (``torch.utils.flop_counter``: matmuls, convolutions, attention) of one call of
    ``forward_backward`` (a training loss's forward + backward of ``model`` over ``n`` samples),
    per sample. The gradients it leaves are cleared."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        forward_backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / n


def sync(device: str | torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a wall-clock time covers it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def tflops(samples_per_s: float, flops_per_sample: float) -> float:
    """Model TFLOP/s achieved at ``samples_per_s``."""
    return samples_per_s * flops_per_sample / 1e12


def mfu(samples_per_s: float, flops_per_sample: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak (a fraction)."""
    return tflops(samples_per_s, flops_per_sample) / peak_tflops
