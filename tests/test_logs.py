"""A quiet terminal and the run's log file (:mod:`pipeline.logs`), the progress line
(:mod:`pipeline.progress`), and training's progress file, without Ray: what the terminal shows and
what the file keeps, Ray's loggers moved to the file and given back, a log on object storage
uploaded at the end, the command line naming the log, and the driver reading ``progress.json``."""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from jobs.commands import Command
from jobs.entry import run_stage
from pipeline import logs
from pipeline.errors import UserFacingError
from pipeline.progress import Progress, bar
from pipeline.stage_config import StageConfig
from pipeline.storage import Storage, StorageError

OPEN_CLIP_FILE = os.path.join(logs.open_clip_folder() or "/x/open_clip", "factory.py")
SITE_FILE = "/venv/lib/python3.11/site-packages/somepkg/mod.py"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Each test configures logging as a command would; put the process's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    ray_loggers = {name: list(logging.getLogger(name).handlers) for name in logs.RAY_LOGGERS}
    propagate = {name: logging.getLogger(name).propagate for name in logs.RAY_LOGGERS}
    try:
        yield
    finally:
        logs.close()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        for name, kept in ray_loggers.items():
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            for handler in kept:
                logger.addHandler(handler)
            logger.propagate = propagate[name]


def _read(path: str) -> str:
    with open(path) as handle:
        return handle.read()


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def _record(name: str, level: int, msg: str = "m", pathname: str = __file__) -> logging.LogRecord:
    return logging.LogRecord(name, level, pathname, 1, msg, None, None)


@pytest.mark.parametrize(
    ("record", "shown"),
    [
        (_record("pipeline.embed.job", logging.WARNING), True),
        (_record("pipeline.embed.job", logging.INFO), False),
        (_record("unclip.progress", logging.INFO), False),  # drawn by Progress itself
        (_record("root", logging.INFO, pathname=OPEN_CLIP_FILE), False),
        (_record("root", logging.WARNING, pathname=OPEN_CLIP_FILE), False),
        (_record("root", logging.ERROR, pathname=OPEN_CLIP_FILE), True),
        (_record("root", logging.WARNING), True),  # anyone else's root warning
        (_record("ray", logging.WARNING), False),
        (_record("ray.data._internal.util", logging.WARNING), False),
        (_record("ray.data", logging.ERROR), True),
        (_record("raytracer", logging.WARNING), True),  # not one of Ray's loggers
        (_record("py.warnings", logging.WARNING, f"{SITE_FILE}:3: FutureWarning: x\n"), False),
        (_record("py.warnings", logging.WARNING, f"{__file__}:3: UserWarning: x\n"), True),
    ],
)
def test_the_quiet_terminal_shows_warnings_that_matter(record, shown) -> None:
    assert logs.QuietFilter().filter(record) is shown


def test_a_record_ray_data_hides_stays_off_the_terminal() -> None:
    record = _record("pipeline.x", logging.ERROR)
    record.hide = True
    assert not logs.QuietFilter().filter(record)


def test_quiet_run_log_keeps_what_the_terminal_leaves_out(tmp_path, capsys) -> None:
    logs.setup(verbose=False)
    assert logs.quiet() and not logs.verbose()
    run_log = logs.open_run_log(StageConfig(root=str(tmp_path)), "synth")
    assert run_log is not None and not os.path.exists(tmp_path / "logs")  # made by a record
    logging.getLogger("pipeline.data.synth").info("synth: 4 shards")
    logging.getLogger("pipeline.data.synth").warning("a shard was slow")
    logging.getLogger("pipeline.x").debug("not even in the file")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("ours", UserWarning, stacklevel=1)
    where = logs.close()
    assert where == run_log.url
    assert os.path.dirname(where) == str(tmp_path / "logs")
    assert os.path.basename(where).startswith("synth-") and where.endswith("Z.log")
    text = _read(where)
    assert "INFO pipeline.data.synth: synth: 4 shards" in text
    assert "WARNING pipeline.data.synth: a shard was slow" in text
    assert "UserWarning: ours" in text and "not even" not in text
    err = capsys.readouterr().err
    assert "a shard was slow" in err and "UserWarning: ours" in err
    assert "synth: 4 shards" not in err
    assert not logs.configured()  # closed: a library caller's logging is its own again
    logging.getLogger("pipeline.x").warning("after the run")
    assert "after the run" not in _read(where)


def test_verbose_terminal_shows_everything_and_the_file_too(tmp_path, capsys) -> None:
    logs.setup(verbose=True)
    assert logs.verbose() and not logs.quiet()
    logs.open_run_log(StageConfig(root=str(tmp_path)), "train-prior")
    logging.getLogger("pipeline.x").debug("a debug line")
    where = logs.close()
    assert "a debug line" in capsys.readouterr().err
    assert "a debug line" in _read(where)


def test_nothing_logged_leaves_no_file(tmp_path) -> None:
    logs.setup(verbose=False)
    logs.open_run_log(StageConfig(root=str(tmp_path)), "embed")
    assert logs.close() is None
    assert not os.path.exists(tmp_path / "logs")


def test_ray_loggers_go_to_the_file_and_come_back(tmp_path, capsys) -> None:
    ray_logger, data_logger = logging.getLogger("ray"), logging.getLogger("ray.data")
    theirs = logging.StreamHandler(sys.stderr)  # what import ray / ray.data give them
    session_file = logging.FileHandler(tmp_path / "ray-data.log", delay=True)
    for logger in (ray_logger, data_logger):
        logger.addHandler(theirs)
    data_logger.addHandler(session_file)
    data_logger.propagate = ray_logger.propagate = False
    logs.setup(verbose=False)
    logs.open_run_log(StageConfig(root=str(tmp_path / "root")), "quickstart")
    logs.route_ray_loggers()
    logs.route_ray_loggers()  # every connect() routes again: nothing twice
    assert theirs not in ray_logger.handlers and theirs not in data_logger.handlers
    assert session_file in data_logger.handlers  # Ray Data's own file stays
    assert data_logger.handlers.count(logs.current().handler) == 1
    data_logger.info("Starting execution of Dataset")
    data_logger.warning("The argument ``concurrency`` is deprecated")
    ray_logger.error("a raylet error")
    where = logs.close()
    text = _read(where)
    assert "Starting execution of Dataset" in text and "deprecated" in text
    err = capsys.readouterr().err
    assert "a raylet error" in err and "deprecated" not in err and "Starting" not in err
    assert theirs in ray_logger.handlers and theirs in data_logger.handlers
    assert logs.current() is None and all(
        not isinstance(h, logs.RunFileHandler) for h in data_logger.handlers
    )
    session_file.close()


def test_ray_loggers_are_left_alone_without_a_command(tmp_path) -> None:
    handlers = list(logging.getLogger("ray").handlers)
    logs.route_ray_loggers()  # a library caller (a test, a drill): its logging is its own
    assert logging.getLogger("ray").handlers == handlers


@dataclass
class FakeStorage:
    """Storage's upload, recorded (or failing)."""

    fail: bool = False
    uploaded: tuple[str, str] | None = None
    text: str = ""

    def copy_from_local(self, local: str, url: str) -> None:
        if self.fail:
            raise StorageError(f"{url}: unreachable")
        self.uploaded, self.text = (local, url), _read(local)


def test_an_object_storage_log_is_uploaded_at_close(monkeypatch, tmp_path, capsys) -> None:
    fake = FakeStorage()
    monkeypatch.setattr(logs, "Storage", lambda options: fake)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    logs.setup(verbose=False)
    run_log = logs.open_run_log(StageConfig(root="s3://bucket/unclip"), "embed")
    assert run_log.url.startswith("s3://bucket/unclip/logs/embed-")
    logging.getLogger("pipeline.embed.job").info("embed: 2 shards")
    assert logs.close() == run_log.url
    assert fake.uploaded == (run_log.local, run_log.url) and "embed: 2 shards" in fake.text
    assert not os.path.exists(run_log.local)  # the local copy is gone

    fake.fail = True
    logs.setup(verbose=False)
    run_log = logs.open_run_log(StageConfig(root="s3://bucket/unclip"), "embed")
    logging.getLogger("pipeline.embed.job").info("embed: 2 shards")
    assert logs.close() == run_log.local  # named where it lies
    assert f"the run log stays at {run_log.local}" in capsys.readouterr().err
    os.remove(run_log.local)


# ----------------------------------------------------------------------------------------------
# The command line


def ok_runner(name: str, cfg: StageConfig) -> int:
    logging.getLogger("pipeline.x").info("detail for the file")
    print(f"{name}: done")
    return 0


def named_runner(name: str, cfg: StageConfig) -> int:
    logging.getLogger("pipeline.x").info("detail for the file")
    print(f"summary, log {logs.announce()}")
    return 0


def failing_runner(name: str, cfg: StageConfig) -> int:
    logging.getLogger("pipeline.x").info("what led to it")
    raise UserFacingError("the shards are missing")


def silent_failing_runner(name: str, cfg: StageConfig) -> int:
    raise UserFacingError("the shards are missing")


def _command(runner: str) -> Command:
    return Command(
        "logtest", "logtest", "a test", config="pipeline.stage_config:StageConfig", run=runner
    )


def test_the_command_line_names_the_log(tmp_path, capsys) -> None:
    root = f"root={tmp_path}"
    assert run_stage(_command(f"{__name__}:ok_runner"), [root], prog="unclip logtest") == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == "logtest: done" and lines[1].startswith(f"log: {tmp_path}/logs/logtest-")
    assert "detail for the file" in _read(lines[1][len("log: ") :])
    assert err == ""

    assert run_stage(_command(f"{__name__}:named_runner"), [root]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"summary, log {tmp_path}/logs/logtest-") and "\nlog: " not in out

    assert run_stage(_command(f"{__name__}:failing_runner"), [root], prog="unclip logtest") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("unclip logtest: error: the shards are missing (full log: ")
    assert "what led to it" in _read(err.split("(full log: ")[1].rstrip(")"))

    # nothing in the log: the error line is as it always was
    assert run_stage(_command(f"{__name__}:silent_failing_runner"), [root], prog="u") == 1
    assert capsys.readouterr().err.splitlines() == ["u: error: the shards are missing"]


# ----------------------------------------------------------------------------------------------
# The progress line


def test_progress_on_a_pipe_shows_each_quarter(monkeypatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    logs.setup(verbose=False)
    progress = Progress("synth", 8, "shards")
    for done in range(9):
        progress.update(done, f"{done * 4} images")
    progress.update(8)  # done twice: no second line
    lines = stream.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "synth: 0/8 shards (0%)",
        "synth: 2/8 shards (25%)",
        "synth: 4/8 shards (50%)",
        "synth: 6/8 shards (75%)",
        "synth: 8/8 shards (100%)",
    ]
    assert "ETA" in lines[1] and "shards/s" in lines[1]


def test_progress_on_a_tty_is_one_line_redrawn(monkeypatch) -> None:
    stream = TTY()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr("pipeline.progress.REDRAW_S", 0.0)
    logs.setup(verbose=False)
    progress = Progress("train-prior", 100, "steps", start=40)
    progress.update(40, "starting workers")
    progress.update(70, "loss 0.1234", eta_s=65)
    logging.getLogger("pipeline.x").warning("a warning in between")
    progress.update(100, "loss 0.1000", eta_s=0)
    text = stream.getvalue()
    assert text.count("\n") == 3  # the line broken by the warning, the warning, the final line
    draws = text.split("\r\x1b[K")[1:]
    assert draws[0] == f"train-prior: {bar(0.4)}  40% 40/100 steps, starting workers"
    assert draws[1].startswith(
        f"train-prior: {bar(0.7)}  70% 70/100 steps, loss 0.1234; ETA 0:01:05"
    )
    assert "WARNING pipeline.x: a warning in between" in draws[1]
    assert draws[2].startswith(f"train-prior: {bar(1.0)} 100% 100/100 steps, loss 0.1000; ")
    assert draws[2].endswith("\n")


def test_progress_stopped_short_ends_its_line(monkeypatch) -> None:
    stream = TTY()
    monkeypatch.setattr(sys, "stderr", stream)
    logs.setup(verbose=False)
    progress = Progress("embed", 10, "shards")
    progress.update(3)
    progress.close()
    progress.update(4)  # a late update (a thread) draws nothing
    text = stream.getvalue()
    assert text.count("\r") == 1 and "3/10 shards" in text and text.endswith("\n")


def test_progress_without_a_command_only_logs(monkeypatch, caplog) -> None:
    stream = TTY()
    monkeypatch.setattr(sys, "stderr", stream)
    caplog.set_level(logging.INFO, logger="unclip.progress")
    progress = Progress("embed", 4, "shards", every_s=0)
    progress.update(2, "20 rows")
    progress.update(4, "40 rows")
    assert stream.getvalue() == ""
    assert [r.getMessage().split(";")[0] for r in caplog.records] == [
        "embed: 2/4 shards (50%), 20 rows",
        "embed: 4/4 shards (100%), 40 rows",
    ]


def test_a_resumed_stage_counts_its_rate_from_where_it_resumed(monkeypatch) -> None:
    clock = iter([100.0, 110.0, 110.0])  # started, line's elapsed, eta's elapsed
    monkeypatch.setattr("pipeline.progress.time.monotonic", lambda: next(clock))
    progress = Progress("train-decoder", 1000, "steps", start=500)
    # 100 steps in 10 s: 10 steps/s, 400 left
    assert progress.line(600) == "train-decoder: 600/1000 steps (60%); 10 steps/s, ETA 0:00:40"


# ----------------------------------------------------------------------------------------------
# Training's progress file


def test_the_driver_reads_this_attempts_progress(tmp_path, monkeypatch) -> None:
    from pipeline.train import driver, loop

    storage, run_url = Storage(), str(tmp_path / "run")
    seen: list[tuple[int, str, float | None]] = []
    progress = Progress("train-prior", 20, "steps")
    monkeypatch.setattr(
        progress, "update", lambda d, detail="", eta_s=None: seen.append((d, detail, eta_s))
    )
    stop = threading.Event()
    thread = threading.Thread(
        target=driver.watch_progress, args=(storage, run_url, "this", progress, stop, 0.01)
    )
    thread.start()
    try:
        loop.write_progress(
            storage,
            run_url,
            {"attempt": "earlier", "step": 5, "steps": 20, "loss": 1.0, "eta_s": 9},
        )
        loop.write_progress(
            storage, run_url, {"attempt": "this", "step": 10, "steps": 20, "loss": 0.5, "eta_s": 3}
        )
        for _ in range(500):
            if seen:
                break
            threading.Event().wait(0.01)
    finally:
        stop.set()
        thread.join()
    assert seen and set(seen) == {(10, "loss 0.5000", 3)}


def test_a_progress_file_that_cannot_be_written_is_only_a_warning(caplog) -> None:
    from pipeline.train import loop

    class Broken:
        def write_json(self, url: str, obj: object) -> None:
            raise StorageError(f"{url}: unreachable")

    with caplog.at_level(logging.WARNING, logger="pipeline.train.loop"):
        loop.write_progress(Broken(), "s3://b/run", {"step": 1})
    assert "progress not written: s3://b/run/progress.json: unreachable" in caplog.text
