"""One progress line for a long job: how far, how fast, and when it ends.

A job calls :meth:`Progress.update` as often as it likes; a line is logged at most every
``every_s`` seconds, and once more when the work is done, so a terminal (or a job's log) gets a
line it can read every few seconds instead of a stream of counters::

    embed: 12/40 shards (30%), 1200 rows; 0.8 shards/s, ETA 0:00:35
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("unclip.progress")


def clock(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts ``done`` of ``total`` ``unit`` for the job ``label``."""

    def __init__(self, label: str, total: int, unit: str, every_s: float = 10.0) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.every_s = every_s
        self.started = time.monotonic()
        self.shown_at = self.started
        self.shown_done = -1

    def line(self, done: int, detail: str = "") -> str:
        """The progress line for ``done`` units (rate and ETA once some are done)."""
        elapsed = time.monotonic() - self.started
        percent = f" ({100 * done / self.total:.0f}%)" if self.total else ""
        text = f"{self.label}: {done}/{self.total} {self.unit}{percent}"
        if detail:
            text += f", {detail}"
        if done and elapsed > 0:
            rate = done / elapsed
            text += f"; {rate:.3g} {self.unit}/s, ETA {clock((self.total - done) / rate)}"
        return text

    def update(self, done: int, detail: str = "") -> None:
        """Log the line if ``every_s`` passed since the last one, or the work is done."""
        now = time.monotonic()
        finished = done >= self.total and done != self.shown_done
        if finished or (now - self.shown_at >= self.every_s and done != self.shown_done):
            log.info(self.line(done, detail))
            self.shown_at, self.shown_done = now, done
