"""Where a command's output goes: a quiet terminal, and everything in the run's log file.

A command run from the command line (:func:`jobs.entry.run_stage`) is quiet by default:

- the terminal shows the project's progress lines (:mod:`pipeline.progress`, drawn by
  :func:`status`), warnings and errors, and the command's summary. It leaves out what is only
  detail: INFO records, Ray's own loggers below ERROR, open_clip's records on the root logger
  (it logs through the ``logging`` module itself) and Python warnings raised inside installed
  packages;
- everything at INFO and above goes to the run's log file, ``<root>/logs/<command>-<UTC
  stamp>.log`` (:func:`open_run_log`): our records, the driver's Ray and Ray Data loggers
  (:func:`route_ray_loggers`), open_clip's lines and the warnings. For an ``s3://`` root the file is
  written locally and uploaded by :func:`close`. The file is created by its first record, so a
  command that logs nothing leaves none.

``--verbose`` gives the terminal of before (every record at DEBUG, Ray's loggers and the workers'
output as Ray prints them) and writes the file too. A library caller that never calls
:func:`setup` gets neither: logging stays as it configured it, and :func:`quiet` is False.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import cache
from typing import Any, TextIO

from pipeline.storage import Storage, StorageError, is_local, join

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# the terminal's format is today's; the file's stamps carry the date (a run may span midnight)
CONSOLE_DATEFMT = "%H:%M:%S"
FILE_DATEFMT = "%Y-%m-%d %H:%M:%S"
NOISY = ("botocore", "s3fs", "aiobotocore", "urllib3", "fsspec")
"""Loggers held at WARNING in every mode: their INFO and DEBUG lines are per request."""
RAY_LOGGERS = ("ray", "ray.data")
"""The driver's Ray loggers with handlers of their own (``propagate=False``): ``import ray`` gives
``ray`` a stderr handler, ``import ray.data`` gives ``ray.data`` one (and a file in Ray's session
folder). ``ray.train``, ``ray.tune`` and the rest propagate to ``ray``."""
PACKAGE_FOLDERS = ("site-packages", "dist-packages")


@dataclass
class RunLog:
    """One command's log file: written at ``local``, found at ``url`` once :func:`close` ran."""

    url: str
    local: str
    handler: logging.Handler
    storage: Storage | None = None  # set for an object-storage root: upload at close
    named: bool = False  # a summary named it: the command line prints no ``log:`` line


@dataclass
class _State:
    configured: bool = False  # setup() ran and no close() since
    verbose: bool = False
    console: logging.Handler | None = None
    run_log: RunLog | None = None
    # (logger, handlers taken off it, handlers put on it) for each routed Ray logger
    routed: list[tuple[logging.Logger, list[logging.Handler], list[logging.Handler]]] = field(
        default_factory=list
    )
    partial: bool = False  # a progress line is on the terminal without its newline


_state = _State()
_lock = threading.RLock()


# ----------------------------------------------------------------------------------------------
# The terminal


def _stderr() -> TextIO:
    return sys.stderr  # looked up at each write: pytest's capture replaces it per test


def interactive() -> bool:
    """Whether the terminal (stderr) is a TTY, where a progress line is redrawn in place."""
    try:
        return _stderr().isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False


def status(text: str, *, final: bool) -> None:
    """Show a progress line on the terminal: on a TTY it replaces the line drawn before it (cut to
    the terminal's width, so it never wraps) and ends with a newline only when ``final``;
    elsewhere it is a line of its own."""
    with _lock:
        stream = _stderr()
        if interactive():
            width = max(20, shutil.get_terminal_size().columns - 1)
            stream.write("\r\x1b[K" + text[:width] + ("\n" if final else ""))
            _state.partial = not final
        else:
            stream.write(text + "\n")
        stream.flush()


def end_status() -> None:
    """End a progress line left without its newline, so whatever comes next starts a line."""
    with _lock:
        if _state.partial:
            _stderr().write("\n")
            _stderr().flush()
            _state.partial = False


class ConsoleHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at each record (as ``logging.lastResort`` does), after
    ending a progress line."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        return _stderr()

    def emit(self, record: logging.LogRecord) -> None:
        end_status()
        super().emit(record)


@cache
def open_clip_folder() -> str | None:
    """open_clip's package folder, found without importing it (an import takes seconds)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.realpath(next(iter(spec.submodule_search_locations)))


def _inside(path: str, folder: str | None) -> bool:
    if not folder or not path:
        return False
    return os.path.realpath(path).startswith(folder + os.sep)


def _in_installed_package(path: str) -> bool:
    return any(part in PACKAGE_FOLDERS for part in path.replace("\\", "/").split("/"))


class QuietFilter(logging.Filter):
    """What a quiet terminal shows of the log: warnings and errors, except

    - Ray's own loggers below ERROR (deprecations, autoscaler and progress notes: the file has
      them);
    - open_clip's records below ERROR: it logs on the root logger (``logging.info``), so no logger
      name can silence it; its records are told by the file that made them. The expected "No
      pretrained weights loaded" of our random-init CLIPs is one;
    - Python warnings raised inside an installed package (``logging.captureWarnings``: the record's
      message starts with the file that warned); a warning raised by our own code is shown;
    - a record Ray Data marked ``hide`` (its own console does the same).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "hide", False):
            return False
        if record.name == "ray" or record.name.startswith("ray."):
            return record.levelno >= logging.ERROR
        if record.levelno >= logging.ERROR:
            return True
        if record.levelno < logging.WARNING:
            return False
        if record.name == "root" and _inside(record.pathname, open_clip_folder()):
            return False
        if record.name == "py.warnings":
            return not _in_installed_package(record.getMessage().split(":", 1)[0])
        return True


# ----------------------------------------------------------------------------------------------
# The modes


def setup(verbose: bool = False) -> None:
    """Configure this process's logging for one command: the root logger's handlers are replaced
    by one terminal handler (as ``logging.basicConfig(force=True)`` would), quiet unless
    ``verbose`` (see the module's doc)."""
    close()
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        with contextlib.suppress(Exception):
            handler.close()
    console = ConsoleHandler()
    console.setFormatter(logging.Formatter(FORMAT, CONSOLE_DATEFMT))
    if not verbose:
        console.addFilter(QuietFilter())
    root.addHandler(console)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with _lock:
        _state.configured, _state.verbose, _state.console = True, verbose, console


def configured() -> bool:
    """Whether a command configured the logging (:func:`setup`) and has not closed it."""
    return _state.configured


def verbose() -> bool:
    """Whether the running command asked for ``--verbose``."""
    return _state.configured and _state.verbose


def quiet() -> bool:
    """Whether the running command keeps the terminal quiet (the default of the command line)."""
    return _state.configured and not _state.verbose


# ----------------------------------------------------------------------------------------------
# The run's log file


class RunFileHandler(logging.FileHandler):
    """A log file created (with its folder) by its first record, and silent once closed, so a
    thread's late record never reopens it."""

    def __init__(self, path: str, level: int) -> None:
        super().__init__(path, mode="a", encoding="utf-8", delay=True)
        self.setLevel(level)
        self.setFormatter(logging.Formatter(FORMAT, FILE_DATEFMT))
        self.finished = False
        self.wrote = False  # an object-storage run's temp file exists before any record

    def _open(self):  # logging.FileHandler's hook: the folder first
        os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
        return super()._open()

    def emit(self, record: logging.LogRecord) -> None:
        if not self.finished:
            super().emit(record)
            self.wrote = True

    def close(self) -> None:
        self.finished = True
        super().close()


def log_name(command: str, now: float | None = None) -> str:
    """``<command>-<UTC stamp>.log``, e.g. ``quickstart-20250102T030405Z.log``."""
    return f"{command}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now))}.log"


def open_run_log(cfg: Any, command: str) -> RunLog | None:
    """Start the run's log file under ``cfg.root`` (a config without a root gets none) and send
    the root logger's records and Python's warnings to it. Needs :func:`setup` first."""
    root = getattr(cfg, "root", None)
    if not _state.configured or not root:
        return None
    name = log_name(command)
    url = join(root, "logs", name)
    level = logging.DEBUG if _state.verbose else logging.INFO
    storage = None
    try:
        local_root = is_local(url)
    except StorageError:  # a scheme storage refuses: the command says so itself
        return None
    if local_root:
        local = url.removeprefix("file://")
        again = 1
        while os.path.exists(local):  # a command run twice in one second: a file each
            url = join(root, "logs", f"{name.removesuffix('.log')}-{again}.log")
            local, again = url.removeprefix("file://"), again + 1
    else:
        handle, local = tempfile.mkstemp(prefix=f"unclip-{command}-", suffix=".log")
        os.close(handle)
        storage = Storage(cfg.storage)
    run_log = RunLog(url, local, RunFileHandler(local, level), storage)
    with _lock:
        _state.run_log = run_log
        logging.getLogger().addHandler(run_log.handler)
        for logger, _, added in _state.routed:  # routed before the file was opened
            logger.addHandler(run_log.handler)
            added.append(run_log.handler)
    logging.captureWarnings(True)
    return run_log


def current() -> RunLog | None:
    """The open run log, if any."""
    return _state.run_log


def announce() -> str | None:
    """The run log's URL, for a command's own summary: the command line then prints no ``log:``
    line of its own."""
    run_log = _state.run_log
    if run_log is None:
        return None
    run_log.named = True
    return run_log.url


def route_ray_loggers() -> None:
    """Send the driver's Ray loggers (:data:`RAY_LOGGERS`) to the run's log file as well; a quiet
    command also takes their own terminal handlers off and gives them ours, which shows their
    errors only. Call it after ``import ray.data`` (which configures its logger once, at import)
    and before ``ray.init`` (whose own lines are then in the file). Idempotent; undone by
    :func:`close`."""
    with _lock:
        if not _state.configured:
            return
        done = {logger.name for logger, _, _ in _state.routed}
        for name in RAY_LOGGERS:
            if name in done:
                continue
            logger = logging.getLogger(name)
            removed, added = [], []
            if not _state.verbose:
                for handler in list(logger.handlers):
                    if isinstance(handler, logging.StreamHandler) and not isinstance(
                        handler, logging.FileHandler
                    ):
                        logger.removeHandler(handler)
                        removed.append(handler)
                if _state.console is not None:
                    added.append(_state.console)
            if _state.run_log is not None:
                added.append(_state.run_log.handler)
            for handler in added:
                logger.addHandler(handler)
            _state.routed.append((logger, removed, added))


def close() -> str | None:
    """End the run log: detach it from every logger, give Ray's loggers their handlers back, stop
    capturing warnings, and upload the file for an object-storage root. Returns where the log is,
    or None when there is none (nothing was logged, or no run log was opened). A failed upload
    is a warning on the terminal, never the command's error: the log is then named where it lies
    on this machine."""
    with _lock:
        end_status()
        run_log, _state.run_log = _state.run_log, None
        for logger, removed, added in _state.routed:
            for handler in added:
                logger.removeHandler(handler)
            for handler in removed:
                logger.addHandler(handler)
        _state.routed.clear()
        _state.configured = False
        if run_log is None:
            return None
        logging.captureWarnings(False)
        logging.getLogger().removeHandler(run_log.handler)
        run_log.handler.close()
    if not run_log.handler.wrote:
        if run_log.storage is not None:
            with contextlib.suppress(OSError):
                os.remove(run_log.local)
        return None
    if run_log.storage is None:
        return run_log.url
    try:
        run_log.storage.copy_from_local(run_log.local, run_log.url)
    except StorageError as exc:
        print(f"warning: the run log stays at {run_log.local}: {exc}", file=_stderr())
        return run_log.local
    with contextlib.suppress(OSError):
        os.remove(run_log.local)
    return run_log.url


def ray_session_logs() -> str | None:
    """The ``logs`` folder of this node's Ray session (workers' output, raylet, GCS, Ray Data and
    Ray Train files), or None when Ray is not initialised here. Ray has no public call for it, so
    its private node object is read, guarded."""
    try:
        from ray._private import worker

        node = getattr(worker, "_global_node", None)
        return os.path.join(node.get_session_dir_path(), "logs") if node is not None else None
    except Exception:
        return None
