"""One progress line per stage: how far, how fast, and when it ends.

A job calls :meth:`Progress.update` as often as it likes. The line reaches two readers:

- the log (the run's log file; the terminal too under ``--verbose``, or whatever logging a
  library caller set up): a line on the ``unclip.progress`` logger at most every ``every_s``
  seconds, and once more when the work is done::

      embed: 12/40 shards (30%), 1200 rows; 0.8 shards/s, ETA 0:00:35

- the terminal of a quiet command (:func:`pipeline.logs.quiet`), which shows no INFO records: on a
  TTY one line redrawn in place, with a bar, ended by a newline when the work is done::

      embed: [######..............] 30% 12/40 shards, 1200 rows; ETA 0:00:35

  and elsewhere (a pipe, a job's log) the plain line when the work starts and as it passes 25, 50,
  75 and 100%: at most five lines a stage.

A stage resumed part-way says where it resumed (``start``), so its rate and ETA count only the
work done in this run.
"""

from __future__ import annotations

import logging
import time

from pipeline import logs

log = logging.getLogger("unclip.progress")

BAR_WIDTH = 20
REDRAW_S = 0.5  # a TTY line is redrawn at most this often (and always when the work is done)


def clock(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """``[####......]``: ``fraction`` (clamped to 0..1) of ``width`` cells filled."""
    filled = round(width * min(1.0, max(0.0, fraction)))
    return "[" + "#" * filled + "." * (width - filled) + "]"


class Progress:
    """Counts ``done`` of ``total`` ``unit`` for the job ``label``, from ``start`` (the count a
    resumed job already had)."""

    def __init__(
        self, label: str, total: int, unit: str, every_s: float = 10.0, start: int = 0
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.every_s = every_s
        self.start = start
        self.started = time.monotonic()
        self.shown_at = self.started
        self.shown_done = -1
        self.drawn_at = float("-inf")  # the terminal's line (quiet commands only)
        self.drawn_quarter = -1
        self.ended = False

    def eta(self, done: int, eta_s: float | None = None) -> float | None:
        """Seconds left: ``eta_s`` when the job knows better (training's step time), else from
        this run's rate; None before any work of this run is done."""
        if eta_s is not None:
            return eta_s
        elapsed = time.monotonic() - self.started
        if done <= self.start or elapsed <= 0:
            return None
        return (self.total - done) / ((done - self.start) / elapsed)

    def line(self, done: int, detail: str = "", eta_s: float | None = None) -> str:
        """The progress line for ``done`` units (rate and ETA once this run did some)."""
        elapsed = time.monotonic() - self.started
        percent = f" ({100 * done / self.total:.0f}%)" if self.total else ""
        text = f"{self.label}: {done}/{self.total} {self.unit}{percent}"
        if detail:
            text += f", {detail}"
        left = self.eta(done, eta_s)
        if done > self.start and elapsed > 0:
            rate = (done - self.start) / elapsed
            text += f"; {rate:.3g} {self.unit}/s, ETA {clock(left or 0)}"
        elif left is not None:
            text += f"; ETA {clock(left)}"
        return text

    def bar_line(self, done: int, detail: str = "", eta_s: float | None = None) -> str:
        """The line a TTY shows: bar, percentage, count, detail and ETA."""
        fraction = done / self.total if self.total else 1.0
        text = (
            f"{self.label}: {bar(fraction)} {100 * fraction:3.0f}% {done}/{self.total} {self.unit}"
        )
        if detail:
            text += f", {detail}"
        left = self.eta(done, eta_s)
        if left is not None and done < self.total:
            text += f"; ETA {clock(left)}"
        elif done >= self.total:
            text += f"; {clock(time.monotonic() - self.started)}"
        return text

    def update(self, done: int, detail: str = "", eta_s: float | None = None) -> None:
        """Log the line if ``every_s`` passed since the last one, or the work is done; on a quiet
        command's terminal, draw it as the module's doc says."""
        now = time.monotonic()
        finished = done >= self.total and done != self.shown_done
        if finished or (now - self.shown_at >= self.every_s and done != self.shown_done):
            log.info(self.line(done, detail, eta_s))
            self.shown_at, self.shown_done = now, done
        if logs.quiet():
            self.draw(done, detail, eta_s, now)

    def draw(self, done: int, detail: str, eta_s: float | None, now: float) -> None:
        """The terminal's line: redrawn in place on a TTY, at each quarter elsewhere."""
        if self.ended:
            return
        finished = done >= self.total
        if logs.interactive():
            if not finished and now - self.drawn_at < REDRAW_S:
                return
            logs.status(self.bar_line(done, detail, eta_s), final=finished)
            self.drawn_at = now
        else:
            quarter = 4 if finished else (4 * done // self.total if self.total else 0)
            if quarter <= self.drawn_quarter:
                return
            logs.status(self.line(done, detail, eta_s), final=True)
            self.drawn_quarter = quarter
        self.ended = finished

    def close(self) -> None:
        """No more updates (the work stopped short, or is done): a TTY line left open is ended."""
        if not self.ended and logs.quiet():
            logs.end_status()
        self.ended = True
