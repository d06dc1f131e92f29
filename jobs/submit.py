"""``unclip submit <command> --address http://HEAD:8265 [the command's arguments]``: run a command
as a Ray job on a cluster, with its logs streamed here and its final status as the exit code.

Everything after the command that ``submit`` does not know is the command's own arguments
(``--config FILE``, ``key=value`` overrides, inputs, flags); they are checked here with the
command's own parser and config before anything is sent. A secret config field
(``storage.secret_access_key=...``) is refused before anything else, as it would be readable in the
job's entrypoint on the dashboard. See :mod:`pipeline.cluster.submit`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from jobs.commands import COMMANDS
from jobs.entry import (
    PROJECT_ROOT,
    build_parser,
    load_stage_config,
    resolve_config_path,
    setup_logging,
    stage_overrides,
)
from pipeline import config as configlib
from pipeline.cluster import submit as jobs_api
from pipeline.errors import UserFacingError


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a command as a Ray job on a cluster: its config is checked here first, "
        "then its logs stream here until it ends (exit status 0 when it succeeded).",
        epilog="Any other argument is the command's own (--config FILE, key=value overrides, "
        "inputs). Example: unclip submit train-prior --address http://head:8265 "
        "--config configs/prior/paper.yaml root=s3://bucket/unclip",
    )
    commands = [name for name, c in COMMANDS.items() if c.submittable]
    parser.add_argument("command", choices=commands, metavar="COMMAND", help=", ".join(commands))
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS") or _http(os.environ.get("RAY_ADDRESS")),
        help="the head's dashboard URL, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, "
        "or RAY_ADDRESS when it is an http URL)",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--working-dir",
        type=Path,
        default=PROJECT_ROOT,
        help=f"upload this folder as the job's working directory (default: {PROJECT_ROOT})",
    )
    where.add_argument(
        "--installed",
        action="store_true",
        help="upload nothing: the cluster's image has unclip installed (infra/Dockerfile)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="an environment variable for the job (NAME alone copies this machine's value); "
        "AWS_ENDPOINT_URL (without any user:password@) and the region are forwarded already, "
        "credentials are not",
    )
    parser.add_argument(
        "--runtime-env", type=Path, help="a YAML/JSON Ray runtime environment to start from"
    )
    parser.add_argument(
        "--token-file",
        help="Ray auth token file (default: RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH when set)",
    )
    parser.add_argument("--submission-id", help="the job's id (default: unclip-<command>-<time>)")
    parser.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the driver")
    parser.add_argument("--entrypoint-num-gpus", type=float, help="GPUs reserved for the driver")
    parser.add_argument(
        "--no-wait", action="store_true", help="print the job id and return once it is submitted"
    )
    parser.add_argument(
        "--timeout", type=float, help="give up waiting after this many seconds (the job runs on)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the job that would be submitted and exit"
    )
    return parser


def _http(address: str | None) -> str | None:
    return address if address and address.startswith(("http://", "https://")) else None


def _without_config(args: Sequence[str]) -> list[str]:
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--config":
            skip = True
        elif not arg.startswith("--config="):
            out.append(arg)
    return out


def _refuse_secrets(
    stage_config_cls: type, config: str | None, overrides: Sequence[str], uploaded: bool
) -> None:
    """Refuse secret config values that would travel with the job: in ``overrides`` (its
    entrypoint), and in the config file when it is ``uploaded`` with the working directory. Runs
    before the config is loaded, so that no loader error can echo a secret override back."""
    path = resolve_config_path(config)
    data = configlib.read_yaml(path) if uploaded and path and "://" not in path else None
    jobs_api.refuse_secrets(stage_config_cls, overrides, data, path)


def main(argv: Sequence[str] | None = None, prog: str = "python -m jobs.submit") -> int:
    parser = _parser(prog)
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    setup_logging(False)
    stage = COMMANDS[args.command]
    module = f"jobs.{stage.module}"
    stage_args = build_parser(stage, f"unclip {args.command}").parse_intermixed_args(rest)
    try:
        # checked here, before the cluster is contacted; secrets first, before any echo of a value
        overrides = stage_overrides(stage, stage_args)
        _refuse_secrets(stage.config_cls, stage_args.config, overrides, not args.installed)
        load_stage_config(stage, stage_args.config, overrides)
        runtime_env = {}
        if args.runtime_env is not None:
            runtime_env = configlib.read_yaml(str(args.runtime_env))
            if not isinstance(runtime_env, dict):
                raise UserFacingError(f"--runtime-env {args.runtime_env}: expected a mapping")
        sub = jobs_api.build_submission(
            args.command,
            module,
            stage_args.config,
            _without_config(rest),
            project=PROJECT_ROOT,
            working_dir=None if args.installed else args.working_dir,
            env=jobs_api.environment(args.env),
            runtime_env=runtime_env,
            submission_id=args.submission_id,
            entrypoint_num_cpus=args.entrypoint_num_cpus,
            entrypoint_num_gpus=args.entrypoint_num_gpus,
        )
        if args.dry_run:
            shown = {**sub.runtime_env}
            if "env_vars" in shown:  # names only: values may be secrets the user chose to send
                shown["env_vars"] = sorted(shown["env_vars"])
            print(f"entrypoint: {sub.entrypoint}")
            print(f"runtime_env: {json.dumps(shown, sort_keys=True)}")
            print(f"submission_id: {sub.submission_id}")
            return 0
        if not args.address:
            raise UserFacingError(
                "no cluster address: pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS"
            )
        client = jobs_api.connect(args.address, jobs_api.auth_headers(args.token_file))
        job_id = jobs_api.submit(client, sub)
        print(f"submitted {job_id} to {args.address}: {sub.entrypoint}", flush=True)
        if args.no_wait:
            print(f"follow it with: ray job logs --follow --address {args.address} {job_id}")
            return 0
        try:
            if args.timeout is None:
                jobs_api.follow(client, job_id)
            status = jobs_api.wait(client, job_id, timeout=args.timeout)
        except KeyboardInterrupt:
            print(f"\nstopped following {job_id}; it keeps running (ray job stop {job_id})")
            return 130
    except configlib.ConfigError as exc:
        print(f"unclip {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except UserFacingError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    info = client.get_job_info(job_id)
    print(f"job {job_id}: {status.value}" + (f" ({info.message})" if info.message else ""))
    return 0 if status.value == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
