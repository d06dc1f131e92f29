"""The command line every stage shares: ``--config FILE``, ``key.sub=value`` overrides, ``--check``.

A stage module (``jobs/<stage>.py``) declares a :class:`Stage` and calls :func:`run_stage` from its
``main``, so ``unclip <stage> ...`` and ``python -m jobs.<stage> ...`` (what ``ray job submit`` runs)
behave the same. The config is loaded and checked before the stage asks Ray for anything; a bad
config is one ``error:`` line and exit status 2.

A stage may also take positional inputs (:class:`Inputs`: ``unclip sample "a red circle"``,
``unclip interpolate a.png b.png``): every positional argument that is not a ``key=value``
override is one, and together they set one config key, as an override would.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import config as configlib
from pipeline.errors import UserFacingError
from pipeline.storage import StorageError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "configs"


OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")
"""A positional argument of this shape is a ``key.sub=value`` override, anything else an input."""


@dataclass(frozen=True)
class Inputs:
    """Positional command-line inputs of a stage: they set the config key ``key`` (a list, or one
    string with ``single``). With ``paths``, local paths are taken relative to the working
    directory (made absolute), where config files' paths are relative to the storage root."""

    key: str
    metavar: str
    help: str
    paths: bool = False
    single: bool = False

    def override(self, values: Sequence[str]) -> str:
        """The ``key=value`` override that sets the inputs (the values as JSON, which is YAML)."""
        if self.paths:
            values = [v if "://" in v else os.path.abspath(v) for v in values]
        value: Any = list(values)
        if self.single:
            if len(values) != 1:
                raise configlib.ConfigError(
                    f"expected one {self.metavar}, got {len(values)}: {' '.join(values)}"
                )
            value = values[0]
        return f"{self.key}={json.dumps(value, ensure_ascii=False)}"


@dataclass(frozen=True)
class Stage:
    """A stage the CLI can run: its config class, its default config file and what runs it."""

    name: str
    summary: str
    config_cls: type
    default_config: str | None  # relative to configs/
    run: Callable[[Any], Any] | None = None
    # command-line flags that stand for an override: (flag, override, help); an override with "{}"
    # takes the flag's value, e.g. ("--import-clip-retrieval", "import_clip_retrieval={}", "..."),
    # read as YAML; one with "{text}" takes it as a string, verbatim (captions)
    flags: tuple[tuple[str, str, str], ...] = ()
    inputs: Inputs | None = None

    def default_config_path(self) -> str | None:
        if self.default_config is None:
            return None
        path = CONFIG_DIR / self.default_config
        return str(path) if path.exists() else None


def build_parser(stage: Stage, prog: str) -> argparse.ArgumentParser:
    default = stage.default_config_path()
    parser = argparse.ArgumentParser(
        prog=prog,
        description=stage.summary,
        epilog="Overrides are key.sub=value pairs, e.g. optim.lr=3e-4 root=s3://bucket/unclip. "
        "--help-config lists every key.",
    )
    parser.add_argument(
        "--config",
        default=default,
        help=f"YAML config file (default: {default or 'built-in defaults'})",
    )
    if stage.inputs is None:
        parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    else:
        parser.add_argument(
            "overrides",
            nargs="*",
            metavar=f"{stage.inputs.metavar} | key=value",
            help=f"{stage.inputs.help} (config key: {stage.inputs.key}), and config overrides",
        )
    parser.add_argument(
        "--check", action="store_true", help="check the config, print it resolved, and exit"
    )
    parser.add_argument(
        "--help-config", action="store_true", help="list every config key with its default"
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    for flag, override, text in stage.flags:
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


def load_stage_config(stage: Stage, path: str | None, overrides: Sequence[str]) -> Any:
    return configlib.load(stage.config_cls, resolve_config_path(path), overrides)


def stage_overrides(stage: Stage, args: argparse.Namespace) -> list[str]:
    """Every override a parsed command line makes: positional ones, inputs, then flags."""
    return [*split_inputs(stage, args.overrides), *(getattr(args, "flag_overrides", None) or [])]


def split_inputs(stage: Stage, positional: Sequence[str]) -> list[str]:
    """The overrides among the positional arguments, with the stage's inputs as one more."""
    if stage.inputs is None:
        return list(positional)
    overrides = [p for p in positional if OVERRIDE.match(p)]
    inputs = [p for p in positional if not OVERRIDE.match(p)]
    return [*overrides, stage.inputs.override(inputs)] if inputs else overrides


def describe_config(config_cls: type) -> str:
    rows = configlib.describe(config_cls)
    width = max(len(key) for key, *_ in rows)
    return "\n".join(
        f"  {key:<{width}}  {doc}  [{type_name}; default: {default!r}]"
        for key, type_name, default, doc in rows
    )


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for noisy in ("botocore", "s3fs", "aiobotocore", "urllib3", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_stage(stage: Stage, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Parse the command line, load and check the config, then run the stage. Returns an exit code."""
    prog = prog or f"unclip {stage.name}"
    args = build_parser(stage, prog).parse_intermixed_args(argv)
    if args.help_config:
        print(f"{prog}: config keys\n{describe_config(stage.config_cls)}")
        return 0
    setup_logging(args.verbose)
    try:
        cfg = load_stage_config(stage, args.config, stage_overrides(stage, args))
    except configlib.ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.check or stage.run is None:
        print(configlib.dumps(cfg), end="")
        return 0
    try:
        result = stage.run(cfg)
    except configlib.ConfigError as exc:  # a config the stage reads in turn (quickstart)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except (UserFacingError, StorageError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    return int(result or 0)
