"""The command line every command shares: ``--config FILE``, ``key.sub=value`` overrides, ``--check``.

Each command's module (``jobs/<module>.py``) is ``main = main_of("<command>")``: the command's
entry in :data:`jobs.commands.COMMANDS` says everything else, so ``unclip <command> ...`` and
``python -m jobs.<module> ...`` (what ``ray job submit`` runs) behave the same. The config is
loaded and checked before the command asks Ray for anything; a bad config is one ``error:`` line
and exit status 2.

The terminal is quiet unless ``--verbose`` (:mod:`pipeline.logs`): progress lines, warnings, the
command's summary. Everything else goes to the run's log file, ``<root>/logs/<command>-<UTC
stamp>.log``, which the command line names after the run (``log: ...``, unless the command's own
summary named it) and at the end of an error line (``(full log: ...)``).

A command may also take positional inputs (:class:`jobs.commands.Inputs`: ``unclip sample "a red
circle"``, ``unclip interpolate a.png b.png``): every positional argument that is not a
``key=value`` override is one, and together they set one config key, as an override would.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pipeline
from jobs.commands import COMMANDS, Command
from pipeline import config as configlib
from pipeline import logs
from pipeline.errors import UserFacingError
from pipeline.storage import StorageError, is_local

PROJECT_ROOT = Path(pipeline.PROJECT_ROOT)
CONFIG_DIR = PROJECT_ROOT / "configs"


OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")
"""A positional argument of this shape is a ``key.sub=value`` override, anything else an input."""


def default_config_path(command: Command) -> str | None:
    """The command's default YAML file under ``configs/``, if it has one."""
    if command.default_config is None:
        return None
    path = CONFIG_DIR / command.default_config
    return str(path) if path.exists() else None


def build_parser(command: Command, prog: str) -> argparse.ArgumentParser:
    default = default_config_path(command)
    parser = argparse.ArgumentParser(
        prog=prog,
        description=command.help,
        epilog="Overrides are key.sub=value pairs, e.g. optim.lr=3e-4 root=s3://bucket/unclip. "
        "--help-config lists every key.",
    )
    parser.add_argument(
        "--config",
        default=default,
        help=f"YAML config file (default: {default or 'built-in defaults'})",
    )
    if command.inputs is None:
        parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    else:
        parser.add_argument(
            "overrides",
            nargs="*",
            metavar=f"{command.inputs.metavar} | key=value",
            help=f"{command.inputs.help} (config key: {command.inputs.key}), and config overrides",
        )
    parser.add_argument(
        "--check", action="store_true", help="check the config, print it resolved, and exit"
    )
    parser.add_argument(
        "--help-config", action="store_true", help="list every config key with its default"
    )
    parser.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="debug logging, and Ray's own output (its loggers, progress bars and the workers' "
        "output) on the terminal; quiet runs keep them in the run's log file",
    )
    for flag, override, text in command.flags:
        if "{text}" in override:
            parser.add_argument(
                flag,
                type=lambda value, o=override: o.replace(
                    "{text}", json.dumps(value, ensure_ascii=False)
                ),
                action="append",
                dest="flag_overrides",
                metavar="TEXT",
                help=text,
            )
        elif "{}" in override:
            parser.add_argument(
                flag,
                type=override.format,
                action="append",
                dest="flag_overrides",
                metavar="VALUE",
                help=text,
            )
        else:
            parser.add_argument(
                flag, action="append_const", const=override, dest="flag_overrides", help=text
            )
    return parser


def resolve_config_path(path: str | None) -> str | None:
    """A relative config path is looked up in the working directory, then in the project: a job
    submitted without a working directory (an image with unclip installed) runs from anywhere."""
    if path is None or "://" in path or os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = PROJECT_ROOT / path
    return str(candidate) if candidate.exists() else path


def load_stage_config(command: Command, path: str | None, overrides: Sequence[str]) -> Any:
    return configlib.load(command.config_cls, resolve_config_path(path), overrides)


def stage_overrides(command: Command, args: argparse.Namespace) -> list[str]:
    """Every override a parsed command line makes: positional ones, inputs, then flags."""
    return [*split_inputs(command, args.overrides), *(getattr(args, "flag_overrides", None) or [])]


def split_inputs(command: Command, positional: Sequence[str]) -> list[str]:
    """The overrides among the positional arguments, with the command's inputs as one more."""
    if command.inputs is None:
        return list(positional)
    overrides = [p for p in positional if OVERRIDE.match(p)]
    inputs = [p for p in positional if not OVERRIDE.match(p)]
    return [*overrides, command.inputs.override(inputs)] if inputs else overrides


def describe_config(config_cls: type) -> str:
    rows = configlib.describe(config_cls)
    width = max(len(key) for key, *_ in rows)
    return "\n".join(
        f"  {key:<{width}}  {doc}  [{type_name}; default: {default!r}]"
        for key, type_name, default, doc in rows
    )


def setup_logging(verbose: bool = False) -> None:
    """Every record at INFO (DEBUG when ``verbose``) on the terminal: ``unclip submit``'s logging
    (a command run by :func:`run_stage` is set up by :func:`pipeline.logs.setup`)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for noisy in ("botocore", "s3fs", "aiobotocore", "urllib3", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_stage(command: Command, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Parse the command line, load and check the config, then run the command. Returns an exit
    status."""
    prog = prog or f"unclip {command.name}"
    args = build_parser(command, prog).parse_intermixed_args(argv)
    if args.help_config:
        print(f"{prog}: config keys\n{describe_config(command.config_cls)}")
        return 0
    logs.setup(args.verbose)
    try:
        cfg = load_stage_config(command, args.config, stage_overrides(command, args))
    except configlib.ConfigError as exc:
        logs.close()
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.check or command.run is None:
        logs.close()
        print(configlib.dumps(cfg), end="")
        return 0
    cfg = absolute_root(cfg)
    run_log = logs.open_run_log(cfg, command.name)
    error: Exception | None = None
    try:
        status = int(command.runner(command.name, cfg) or 0)
    except configlib.ConfigError as exc:  # a config the command reads in turn (quickstart)
        status, error = 2, exc
    except (UserFacingError, StorageError) as exc:
        status, error = 1, exc
    except BaseException:  # a crash: its traceback follows, and the log is named first
        where = logs.close()
        if where:
            print(f"{prog}: full log: {where}", file=sys.stderr)
        raise
    where = logs.close()
    if error is not None:
        suffix = f" (full log: {where})" if where else ""
        print(f"{prog}: error: {error}{suffix}", file=sys.stderr)
    elif where and not (run_log is not None and run_log.named):
        print(f"log: {where}")
    return status


def absolute_root(cfg: Any) -> Any:
    """``cfg`` with a relative local ``root`` made absolute against this process's working
    directory (the README's ``root: runs/quickstart``): Ray's workers do not run in the driver's
    working directory (Ray Train's change theirs), so a relative path names the user's folder on
    the driver alone. Roots on object storage, and absolute ones, are kept."""
    root = getattr(cfg, "root", None)
    if not isinstance(root, str) or not is_local(root) or "://" in root or os.path.isabs(root):
        return cfg
    return dataclasses.replace(cfg, root=os.path.abspath(root))


def main_of(name: str) -> Callable[..., int]:
    """The ``main(argv=None, prog=...)`` of command ``name``, for its module under ``jobs/``."""
    command = COMMANDS[name]

    def main(
        argv: Sequence[str] | None = None, prog: str = f"python -m jobs.{command.module}"
    ) -> int:
        return run_stage(command, argv, prog=prog)

    main.__doc__ = f"``unclip {name}``: {command.help}."
    return main
