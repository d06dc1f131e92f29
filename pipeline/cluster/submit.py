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
environment are forwarded (they are not secrets; an endpoint's ``user:password@`` part is dropped);
credentials are not, because a job's entrypoint and runtime environment are readable by anyone with
the dashboard. The cluster gets those from its own identity (an instance role, a Kubernetes secret:
see ``infra/``) unless a variable is forwarded by name with ``--env`` on purpose. For the same
reason a config field declared secret (``param(..., secret=True)``, e.g.
``storage.secret_access_key``) is refused as an override, and in a config file that would be
uploaded with the working directory: :func:`refuse_secrets`.

Token authentication (Ray >= 2.52): a token from ``--token-file``, ``RAY_AUTH_TOKEN`` or
``RAY_AUTH_TOKEN_PATH`` is sent as ``Authorization: Bearer``. It is never printed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import sys
import time
import types
import typing
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pipeline.config import ConfigError, parse_override
from pipeline.errors import UserFacingError
from pipeline.storage import Secret, redact_url

# Forwarded from the submitting environment when set: where storage is, not who may use it.
FORWARDED_ENV: tuple[str, ...] = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)
# Of those, the URLs: forwarded without any ``user:password@`` part.
FORWARDED_URLS: frozenset[str] = frozenset({"AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"})

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
    """The job's environment variables: storage location from ``environ`` (endpoint URLs without
    credentials in them), plus ``requested`` (``NAME=value``, or ``NAME`` to copy this machine's
    value: what is named is sent as it is, on purpose)."""
    environ = os.environ if environ is None else environ
    env = {
        name: forwarded_value(name, environ[name]) for name in FORWARDED_ENV if environ.get(name)
    }
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


def forwarded_value(name: str, value: str) -> str:
    """The value of forwarded variable ``name`` as the job gets it: a URL loses its
    ``user:password@`` part, which would otherwise sit in the job's info on the dashboard."""
    return redact_url(value) if name in FORWARDED_URLS else value


# ----------------------------------------------------------------------------------------------
# Secret config fields stay on this machine


def secret_keys(config_cls: type, prefix: str = "") -> frozenset[str]:
    """The dotted key of every secret field of ``config_cls`` and of its sections: a field declared
    ``param(..., secret=True)`` or typed :class:`~pipeline.storage.Secret`, found from the dataclass
    fields themselves so that a secret added anywhere is covered without a list to keep."""
    hints = typing.get_type_hints(config_cls)
    keys: set[str] = set()
    for f in dataclasses.fields(config_cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        kinds = _types_in(hints[f.name])
        if f.metadata.get("secret") or Secret in kinds:
            keys.add(key)
        for section in kinds:
            if dataclasses.is_dataclass(section):
                keys |= secret_keys(section, key)
    return frozenset(keys)


def _types_in(hint: Any) -> tuple[Any, ...]:
    """``hint`` itself, or the members of a union (``StorageOptions | None``, ``Secret | None``)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _leaves(key: str, value: Any) -> Iterator[tuple[str, Any]]:
    """Every dotted key a ``key: value`` setting reaches (a mapping value sets its keys below)."""
    if isinstance(value, Mapping):
        for sub, inner in value.items():
            yield from _leaves(f"{key}.{sub}", inner)
    else:
        yield key, value


def secrets_given(secrets: frozenset[str], key: str, value: Any) -> list[str]:
    """The secret keys among ``secrets`` that setting ``key`` to ``value`` gives a value (null or an
    empty string gives none)."""
    found = []
    for leaf, inner in _leaves(key, value):
        if inner is None or inner == "":
            continue
        found += [s for s in secrets if leaf == s or leaf.startswith(s + ".")]
    return sorted(set(found))


_HOW = (
    "a credential is never sent with a job (its entrypoint and runtime environment are readable by "
    "anyone with the dashboard): let the cluster use its own identity (an instance role, or the "
    "Kubernetes Secret of infra/GUIDE.md), or forward a variable of this shell by name on purpose "
    "with --env NAME"
)


def refuse_secrets(
    config_cls: type,
    overrides: Sequence[str],
    config_data: Mapping[str, Any] | None = None,
    config_path: str | None = None,
) -> None:
    """Raise a one-line :class:`ConfigError` naming the first secret key that ``overrides`` (which
    would be the job's entrypoint) or ``config_data`` (a config file that would be uploaded with the
    working directory, read from ``config_path``) gives a value. The message never holds the value.
    Overrides that do not parse are left to the config loader."""
    secrets = secret_keys(config_cls)
    for text in overrides:
        try:
            key, value = parse_override(text)
        except ConfigError:
            continue
        found = secrets_given(secrets, key, value)
        if found:
            raise ConfigError(f"override {found[0]}=...: {found[0]} is a secret; {_HOW}")
    for key, value in (config_data or {}).items():
        found = secrets_given(secrets, str(key), value)
        if found:
            raise ConfigError(
                f"{config_path}: {found[0]} is set, and the file would be uploaded with the "
                f"working directory; {_HOW} (or pass --installed to use the cluster's own copy)"
            )


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
