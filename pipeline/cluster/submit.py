"""Submitting a stage to a Ray cluster as a Ray job: ``unclip submit <stage> --address URL ...``.

The stage's config is loaded and checked here, on the submitting machine, before the cluster is
contacted: a typo fails in a second instead of after a job was scheduled. What runs on the cluster is
the same module the README's plain form runs (``ray job submit -- python -m jobs.<module> ...``), with
the same arguments, so the two are interchangeable.

Runtime environment, two ways:

* ``working_dir`` (default): this checkout (``jobs/``, ``pipeline/``, ``unclip/``, ``configs/``) is
  zipped and uploaded by Ray; the cluster's image supplies the dependencies. Ray honours
  ``.gitignore``; run folders, virtual environments and ``.git`` are excluded as well.
* ``installed``: nothing is uploaded; the image has the package installed (``infra/Dockerfile``) and
  config paths are those of its checkout.

Storage settings reach the job as environment variables: the endpoint and region of this machine's
environment are forwarded (they are not secrets); credentials are not, because a job's runtime
environment is readable by anyone with the dashboard. The cluster gets those from its own identity
(an instance role, a Kubernetes secret: see ``infra/``) unless a variable is forwarded by name with
``--env`` on purpose.

Token authentication (Ray >= 2.52): a token from ``--token-file``, ``RAY_AUTH_TOKEN`` or
``RAY_AUTH_TOKEN_PATH`` is sent as ``Authorization: Bearer``. It is never printed.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pipeline.errors import UserFacingError

# Forwarded from the submitting environment when set: where storage is, not who may use it.
FORWARDED_ENV: tuple[str, ...] = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)

# Never uploaded with the working directory, whatever .gitignore says.
EXCLUDES: tuple[str, ...] = (
    ".git",
    ".venv",
    "runs",
    "**/__pycache__",
    "*.safetensors",
    "*.pt",
    "*.pth",
    ".pytest_cache",
    ".ruff_cache",
)

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Submission:
    """What is sent to the cluster: one Ray job running one stage module."""

    stage: str
    module: str
    args: tuple[str, ...]
    runtime_env: dict[str, Any]
    submission_id: str
    metadata: dict[str, str] = field(default_factory=dict)
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None

    @property
    def entrypoint(self) -> str:
        import shlex

        return shlex.join(["python", "-m", self.module, *self.args])


def job_config_path(config: str, project: Path, working_dir: Path | None) -> str:
    """The config path as the job sees it.

    With a working directory the job runs inside the uploaded copy, so the config must be inside the
    working directory and is given relative to it. Installed, the job resolves paths against the
    image's checkout of the project, so a path inside this project is given relative to it; any
    other path is passed as written (it must exist on the cluster).
    """
    path = Path(config).resolve()
    base = working_dir.resolve() if working_dir is not None else project.resolve()
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        if working_dir is not None:
            raise UserFacingError(
                f"config {config} is outside the working directory {working_dir}: the job would not "
                "see it; move it under the working directory, or pass --working-dir a folder "
                "that holds both the project and the config"
            ) from None
        return config


def environment(
    requested: Sequence[str], environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The job's environment variables: storage location from ``environ``, plus ``requested``
    (``NAME=value``, or ``NAME`` to copy this machine's value)."""
    environ = os.environ if environ is None else environ
    env = {name: environ[name] for name in FORWARDED_ENV if environ.get(name)}
    for item in requested:
        name, sep, value = item.partition("=")
        if not _ENV_NAME.match(name):
            raise UserFacingError(f"--env {item!r}: expected NAME or NAME=value")
        if not sep:
            if name not in environ:
                raise UserFacingError(f"--env {name}: not set in this environment")
            value = environ[name]
        env[name] = value
    return env


def build_submission(
    stage: str,
    module: str,
    config: str | None,
    overrides: Sequence[str],
    *,
    project: Path,
    working_dir: Path | None,
    env: Mapping[str, str],
    runtime_env: Mapping[str, Any] | None = None,
    submission_id: str | None = None,
    entrypoint_num_cpus: float | None = None,
    entrypoint_num_gpus: float | None = None,
) -> Submission:
    """The Ray job for ``stage``; ``config`` and ``overrides`` are assumed checked already."""
    args: list[str] = []
    if config is not None:
        args += ["--config", job_config_path(config, project, working_dir)]
    args += list(overrides)
    renv: dict[str, Any] = dict(runtime_env or {})
    if working_dir is not None:
        if not working_dir.is_dir():
            raise UserFacingError(f"--working-dir {working_dir}: not a directory")
        renv["working_dir"] = str(working_dir.resolve())
        renv["excludes"] = [*renv.get("excludes", []), *EXCLUDES]
    if env:
        renv["env_vars"] = {**renv.get("env_vars", {}), **env}
    sid = submission_id or f"unclip-{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    metadata = {"unclip_stage": stage}
    if config is not None:
        metadata["unclip_config"] = args[1]
    return Submission(
        stage=stage,
        module=module,
        args=tuple(args),
        runtime_env=renv,
        submission_id=sid,
        metadata=metadata,
        entrypoint_num_cpus=entrypoint_num_cpus,
        entrypoint_num_gpus=entrypoint_num_gpus,
    )


def auth_headers(
    token_file: str | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``Authorization: Bearer <token>`` from the first of ``token_file``, ``RAY_AUTH_TOKEN`` and
    ``RAY_AUTH_TOKEN_PATH``; empty when none is given (Ray's own client then sends ``~/.ray``'s
    token when ``RAY_AUTH_MODE=token``)."""
    environ = os.environ if environ is None else environ
    token = None
    path = token_file or (
        None if environ.get("RAY_AUTH_TOKEN") else environ.get("RAY_AUTH_TOKEN_PATH")
    )
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise UserFacingError(f"token file {path}: {exc.strerror or exc}") from None
        if not token:
            raise UserFacingError(f"token file {path} is empty")
    elif environ.get("RAY_AUTH_TOKEN"):
        token = environ["RAY_AUTH_TOKEN"].strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def connect(address: str, headers: Mapping[str, str]):
    """A ``JobSubmissionClient`` for the dashboard at ``address``, with errors that say what to do."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=dict(headers) or None)
    except Exception as exc:  # ConnectionError, requests' HTTPError, RuntimeError
        text = str(exc)
        if "401" in text or "403" in text or "nauthorized" in text or "orbidden" in text:
            hint = (
                "the token was refused"
                if headers
                else "the cluster asks for a token: set RAY_AUTH_TOKEN or pass --token-file"
            )
            raise UserFacingError(f"Ray dashboard at {address}: {hint}") from None
        raise UserFacingError(
            f"cannot reach the Ray dashboard at {address} ({type(exc).__name__}: "
            f"{_first_line(exc)}); is the head up and its dashboard port (8265) reachable?"
        ) from None


def _first_line(exc: BaseException | None) -> str:
    return str(exc).strip().splitlines()[0][:300] if exc and str(exc).strip() else ""


def submit(client: Any, sub: Submission, *, attempts: int = 10, delay: float = 1.0) -> str:
    """Submit ``sub``; retries while the head's job agent is still starting (HTTP 500 'No
    available agent'), which a freshly started head answers for its first seconds."""
    for attempt in range(attempts):
        try:
            return client.submit_job(
                entrypoint=sub.entrypoint,
                submission_id=sub.submission_id,
                runtime_env=sub.runtime_env or None,
                metadata=sub.metadata,
                entrypoint_num_cpus=sub.entrypoint_num_cpus,
                entrypoint_num_gpus=sub.entrypoint_num_gpus,
            )
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or attempt + 1 == attempts:
                raise UserFacingError(f"submitting {sub.stage}: {_first_line(exc)}") from None
            time.sleep(delay)
    raise AssertionError("unreachable")


def follow(client: Any, submission_id: str, out: TextIO | None = None) -> None:
    """Stream the job's logs to ``out`` (stdout) until the job ends."""
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())


def wait(
    client: Any,
    submission_id: str,
    *,
    timeout: float | None = None,
    poll: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
) -> Any:
    """The job's final ``JobStatus`` (SUCCEEDED, FAILED or STOPPED); raises on ``timeout``."""
    deadline = None if timeout is None else clock() + timeout
    while True:
        status = client.get_job_status(submission_id)
        if status.is_terminal():
            return status
        if deadline is not None and clock() > deadline:
            raise UserFacingError(
                f"job {submission_id} still {status.value} after {timeout:.0f} s "
                f"(it keeps running: `ray job stop {submission_id}` to stop it)"
            )
        time.sleep(poll)
