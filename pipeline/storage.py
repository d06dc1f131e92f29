"""Storage: one way for every stage to reach a URL, on local disk or on S3-compatible object storage.

Every stage reads and writes through :class:`Storage`, so a run works the same under ``runs/x``,
``file:///data/x`` or ``s3://bucket/x``. It gives an fsspec filesystem (s3fs for ``s3://``) for
ordinary file work and a pyarrow filesystem for Ray Data, both configured from one
:class:`StorageOptions`: endpoint, region and credentials come from the options when set, otherwise
from the standard AWS environment variables (``AWS_ENDPOINT_URL[_S3]``, ``AWS_REGION`` /
``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``).

Publishing is atomic, so a reader never sees half of anything:

* a single file (:meth:`Storage.open_atomic`, :meth:`Storage.write_bytes`) is written under a hidden
  temporary name and renamed into place on local disk; on S3 an object becomes visible only when its
  upload completes, so an interrupted upload leaves nothing.
* a folder of files (a checkpoint, a store shard and its record) is published by a marker written
  last; readers ask for the marker and never pick up a folder whose writer died.

Transient errors (a dropped connection, a stalled or cut-off response, 5xx, throttling) are retried
with backoff in every operation (:mod:`pipeline.retries`, ``storage.retries``); a read that loses its
connection halfway through an object reopens it at the same offset, checking that the object is
still the same version (:class:`ResumableReader`). What still fails raises :class:`StorageError`,
whose ``transient`` flag says whether a later rerun may succeed.

Errors name the URL and what went wrong (missing bucket, unreachable endpoint, access denied) and
never contain a credential: :class:`Secret` hides them from ``repr``, logs and saved configs.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import posixpath
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import fsspec

from pipeline.retries import RetryPolicy, is_transient, retrying
from unclip.fields import param

# botocore's DEBUG records print request headers, whose signature names the access key id. Pin the
# SDK's loggers at WARNING so that no log level set elsewhere (root at DEBUG) puts one in a log.
for _name in ("botocore", "aiobotocore", "boto3", "s3transfer", "s3fs"):
    _logger = logging.getLogger(_name)
    if _logger.level == logging.NOTSET or _logger.level < logging.WARNING:
        _logger.setLevel(logging.WARNING)
_TMP_TAG = ".tmp-"
T = TypeVar("T")


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URL and the cause, never a credential.

    ``transient`` says whether the cause was a transient one (connection, timeout, 5xx) that
    outlasted the retries, so a rerun may succeed, as opposed to a missing key or no access."""

    transient: bool = False


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The URL names nothing (no such file or directory; the bucket exists)."""


class Secret:
    """A credential that never prints itself: ``repr``, ``str`` and saved configs show ``***``."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = str(value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self):  # pickled for Ray workers, which need the value; never logged
        return (Secret, (self._value,))


@dataclass
class StorageOptions:
    """How to reach object storage. Unset fields fall back to the standard AWS environment variables."""

    endpoint_url: str | None = param(
        None, "S3-compatible endpoint, e.g. http://minio:9000; default AWS_ENDPOINT_URL"
    )
    region: str | None = param(None, "S3 region; default AWS_REGION / AWS_DEFAULT_REGION")
    profile: str | None = param(None, "named AWS profile from ~/.aws; default AWS_PROFILE")
    access_key_id: Secret | None = param(
        None, "access key id; prefer AWS_ACCESS_KEY_ID (never saved)", secret=True
    )
    secret_access_key: Secret | None = param(
        None, "secret key; prefer AWS_SECRET_ACCESS_KEY (never saved)", secret=True
    )
    anonymous: bool = param(False, "unsigned requests (public buckets)")
    connect_timeout_s: float = param(10.0, "seconds to wait for a connection", gt=0)
    read_timeout_s: float = param(
        60.0, "seconds a request may wait for data before it counts as stalled and is retried", gt=0
    )
    max_attempts: int = param(4, "SDK attempts per HTTP request before giving up", ge=1)
    retries: int = param(
        5,
        "attempts of a whole read, write or listing that meets a transient error (reset, stall, "
        "cut-off body, 5xx, throttling), with exponential backoff",
        ge=1,
    )
    retry_backoff_s: float = param(0.5, "first wait before a retry; doubles each attempt", ge=0)

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(attempts=self.retries, backoff_s=self.retry_backoff_s)

    def resolved_endpoint(self) -> str | None:
        return (
            self.endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )

    def resolved_region(self) -> str | None:
        region = self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region is None and self.resolved_endpoint():
            region = "us-east-1"  # S3-compatible servers (moto, MinIO) accept any region
        return region


# ----------------------------------------------------------------------------------------------
# URLs


def scheme_of(url: str) -> str:
    """``"s3"`` for ``s3://``, ``"file"`` for local paths and ``file://`` URLs."""
    if "://" not in url:
        return "file"
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("s3", "s3a"):
        return "s3"
    if scheme == "file":
        return "file"
    raise StorageError(
        f"{url}: unsupported URL scheme {scheme!r} (use a local path, file:// or s3://)"
    )


def is_local(url: str) -> bool:
    return scheme_of(url) == "file"


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL with ``/`` (a local path stays a local path)."""
    out = url.rstrip("/") if url not in ("/", "") else url
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = f"{out}/{part}" if out else part
    return out


def resolve(root: str, path: str) -> str:
    """``path`` if it is absolute (a URL or ``/abs``), else ``path`` under ``root``."""
    if "://" in path or path.startswith("/"):
        return path
    return join(root, path)


def basename(url: str) -> str:
    return posixpath.basename(url.rstrip("/"))


def parent(url: str) -> str:
    stripped = url.rstrip("/")
    head, _, _ = stripped.rpartition("/")
    if "://" in stripped and head.endswith(":/"):
        return stripped  # the bucket itself
    return head or "."


def redact_url(url: str | None) -> str:
    """A URL with any ``user:password@`` part removed, safe to print."""
    if not url:
        return str(url)
    parts = urlsplit(url)
    if parts.username or parts.password:
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return url


def _local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or _TMP_TAG in name


@contextlib.contextmanager
def patched_environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block (and processes it starts), then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ----------------------------------------------------------------------------------------------
# Errors


def _bucket(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0]


def _chain_text(exc: BaseException) -> str:
    seen, texts = set(), []
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        texts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return " | ".join(texts)


_UNREACHABLE = (
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ClientConnectorError",
    "ConnectionRefused",
    "Connection refused",
    "Could not connect",
    "Cannot connect",
    "Name or service not known",
    "ServerDisconnected",
)


class Storage:
    """Filesystems and atomic file helpers for local paths and ``s3://`` URLs.

    Cheap to build and picklable (filesystems are created lazily in each process), so it can be
    passed to Ray tasks and actors.
    """

    def __init__(self, options: StorageOptions | None = None) -> None:
        self.options = options or StorageOptions()
        self._fs_cache: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"options": self.options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.options = state["options"]
        self._fs_cache = {}

    def __repr__(self) -> str:
        return f"Storage(endpoint={redact_url(self.options.resolved_endpoint())!r})"

    # -- filesystems ---------------------------------------------------------------------------

    def _s3_credentials(self) -> tuple[str | None, str | None]:
        o = self.options
        key = o.access_key_id.reveal() if o.access_key_id else None
        secret = o.secret_access_key.reveal() if o.secret_access_key else None
        return key, secret

    def filesystem(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """An fsspec filesystem for ``url`` and the path to give it."""
        scheme = scheme_of(url)
        if scheme not in self._fs_cache:
            if scheme == "file":
                self._fs_cache[scheme] = fsspec.filesystem("file")
            else:
                import s3fs

                o = self.options
                key, secret = self._s3_credentials()
                client_kwargs: dict[str, Any] = {}
                if o.resolved_endpoint():
                    client_kwargs["endpoint_url"] = o.resolved_endpoint()
                if o.resolved_region():
                    client_kwargs["region_name"] = o.resolved_region()
                self._fs_cache[scheme] = s3fs.S3FileSystem(
                    key=key,
                    secret=secret,
                    anon=o.anonymous,
                    profile=o.profile,
                    client_kwargs=client_kwargs,
                    config_kwargs={
                        "connect_timeout": o.connect_timeout_s,
                        "read_timeout": o.read_timeout_s,
                        "retries": {"max_attempts": o.max_attempts, "mode": "standard"},
                    },
                    use_listings_cache=False,  # other processes write here: never list stale
                    skip_instance_cache=True,
                )
                # botocore retries each request (max_attempts) and Storage the whole operation;
                # s3fs' own loop would multiply them
                self._fs_cache[scheme].retries = 1
        fs = self._fs_cache[scheme]
        path = _local_path(url) if scheme == "file" else url.split("://", 1)[1]
        return fs, path

    def arrow_filesystem(self, url: str):
        """A pyarrow filesystem for ``url`` and the path to give it (for Ray Data and pyarrow)."""
        import pyarrow.fs as pafs

        if is_local(url):
            return pafs.LocalFileSystem(), os.path.abspath(_local_path(url))
        o = self.options
        key, secret = self._s3_credentials()
        kwargs: dict[str, Any] = {
            "region": o.resolved_region(),
            "connect_timeout": o.connect_timeout_s,
            "request_timeout": o.read_timeout_s,
            "anonymous": o.anonymous,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=o.max_attempts),
        }
        if key and secret:
            kwargs.update(access_key=key, secret_key=secret)
        elif o.profile and not o.anonymous:
            kwargs.update(self._profile_credentials(url))
        endpoint = o.resolved_endpoint()
        if endpoint:
            parts = urlsplit(endpoint)
            kwargs["endpoint_override"] = parts.netloc + parts.path.rstrip("/")
            kwargs["scheme"] = parts.scheme or "https"
        return pafs.S3FileSystem(**{k: v for k, v in kwargs.items() if v is not None}), url.split(
            "://", 1
        )[1]

    def _profile_credentials(self, url: str) -> dict[str, str]:
        """The credentials of ``storage.profile``, for pyarrow's S3 filesystem, which cannot be
        given a profile name (s3fs can). Temporary credentials are taken as they are now; a job
        longer than their lifetime should use an instance role or keys instead."""
        import botocore.session

        profile = self.options.profile
        try:
            found = botocore.session.Session(profile=profile).get_credentials()
        except Exception as exc:
            raise StorageError(
                f"cannot reach {redact_url(url)}: storage.profile {profile!r}: "
                f"{type(exc).__name__}: {self._scrub(str(exc))[:200]}"
            ) from None
        if found is None:
            raise StorageError(
                f"cannot reach {redact_url(url)}: storage.profile {profile!r} holds no credentials"
            )
        frozen = found.get_frozen_credentials()
        out = {"access_key": frozen.access_key, "secret_key": frozen.secret_key}
        if frozen.token:
            out["session_token"] = frozen.token
        return out

    def aws_environment(self) -> dict[str, str]:
        """The configured endpoint, region and credentials as standard AWS environment variables,
        for third-party clients (img2dataset, Ray workers) that read only those. Only values set in
        the options are included; pass them to processes, never to a log."""
        o = self.options
        key, secret = self._s3_credentials()
        values = {
            "AWS_ENDPOINT_URL": o.endpoint_url,
            "AWS_DEFAULT_REGION": o.region,
            "AWS_PROFILE": o.profile,
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret,
        }
        return {k: v for k, v in values.items() if v}

    # -- error translation ---------------------------------------------------------------------

    def _where(self, url: str) -> str:
        if is_local(url):
            return ""
        endpoint = self.options.resolved_endpoint()
        return f" at endpoint {redact_url(endpoint)}" if endpoint else ""

    def _translate(self, exc: BaseException, op: str, url: str) -> StorageError:
        if isinstance(exc, StorageError):
            return exc
        error = self._describe(exc, op, url)
        error.transient = is_transient(exc)
        return error

    def _describe(self, exc: BaseException, op: str, url: str) -> StorageError:
        text = _chain_text(exc)
        shown = redact_url(url)
        if not is_local(url):
            if "NoSuchBucket" in text or "bucket does not exist" in text:
                return StorageError(
                    f"cannot {op} {shown}: bucket {_bucket(url)!r} does not exist{self._where(url)}"
                )
            if any(marker in text for marker in _UNREACHABLE) or isinstance(exc, ConnectionError):
                return StorageError(
                    f"cannot {op} {shown}: storage endpoint "
                    f"{redact_url(self.options.resolved_endpoint()) or 'AWS S3'} is unreachable"
                )
            if "NoCredentials" in text or "Unable to locate credentials" in text:
                return StorageError(
                    f"cannot {op} {shown}: no S3 credentials found (set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or storage.anonymous=true)"
                )
            if isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
                return StorageError(
                    f"cannot {op} {shown}: access denied{self._where(url)} (check the credentials)"
                )
        if isinstance(exc, FileNotFoundError):
            return StorageNotFoundError(f"cannot {op} {shown}: no such file or directory")
        if isinstance(exc, IsADirectoryError):
            return StorageError(f"cannot {op} {shown}: it is a directory")
        if isinstance(exc, PermissionError):
            return StorageError(f"cannot {op} {shown}: permission denied")
        detail = self._scrub(str(exc))[:300]
        return StorageError(
            f"cannot {op} {shown}{self._where(url)}: {type(exc).__name__}: {detail}"
        )

    def _scrub(self, text: str) -> str:
        """``text`` with every credential this process knows replaced by ``***``."""
        key, secret = self._s3_credentials()
        env = (os.environ.get(n) for n in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"))
        for value in (key, secret, os.environ.get("AWS_ACCESS_KEY_ID"), *env):
            if value and len(value) >= 4:
                text = text.replace(value, "***")
        return text

    @contextlib.contextmanager
    def _errors(self, op: str, url: str) -> Iterator[None]:
        try:
            yield
        except StorageError:
            raise
        except Exception as exc:
            raise self._translate(exc, op, url) from None

    def _retry(self, op: str, url: str, fn: Callable[[], T]) -> T:
        """``fn()`` with its errors translated, retried while they are transient."""

        def once() -> T:
            with self._errors(op, url):
                return fn()

        return retrying(once, self.options.retry_policy(), f"{op} {redact_url(url)}", self._scrub)

    # -- queries -------------------------------------------------------------------------------

    def check(self, url: str, *, write: bool = False) -> None:
        """Fail early, with a clear error, when ``url`` cannot be used (before any cluster work).

        Checks that the endpoint answers and the bucket exists; with ``write`` also that an object
        can be written and removed under ``url``.
        """
        fs, path = self.filesystem(url)
        if is_local(url):
            if write:
                with self._errors("write to", url):
                    os.makedirs(path, exist_ok=True)
            return
        # The prefix, not the bucket root: policies may allow only a prefix, and buckets are large.
        # One attempt (the SDK still retries the request): a preflight should fail fast.
        with self._errors("reach", url):
            _listing(fs, path, url)
        if write:
            probe = join(url, f".unclip-write-probe-{uuid.uuid4().hex}")
            self.write_bytes(probe, b"")
            self.remove(probe)

    def exists(self, url: str) -> bool:
        fs, path = self.filesystem(url)
        return self._retry("look up", url, lambda: bool(fs.exists(path)))

    def isdir(self, url: str) -> bool:
        fs, path = self.filesystem(url)
        return self._retry("look up", url, lambda: bool(fs.isdir(path)))

    def list(self, url: str, *, include_hidden: bool = False) -> list[str]:
        """The URLs directly under ``url``, sorted; hidden and temporary names are left out.

        A missing directory lists as empty.
        """
        details = self.list_details(url, include_hidden=include_hidden)
        return sorted(details)

    def list_details(self, url: str, *, include_hidden: bool = False) -> dict[str, dict[str, Any]]:
        """The files directly under ``url`` with their ``size`` and ``version`` (the ETag on S3,
        modification time and size on local disk), from one listing; folders have size None."""
        fs, path = self.filesystem(url)
        out: dict[str, dict[str, Any]] = {}
        for entry in self._retry("list", url, lambda: _listing(fs, path, url)):
            name = posixpath.basename(entry["name"].rstrip("/"))
            if include_hidden or not _is_hidden(name):
                out[join(url, name)] = _details(entry)
        return out

    def find_details(self, url: str) -> dict[str, dict[str, Any]]:
        """Every file below ``url`` at any depth, with its ``size`` and ``version`` (see
        :meth:`list_details`), from one recursive listing (on S3, a paginated listing without a
        delimiter); names with a hidden or temporary part are left out. A missing folder is
        empty."""
        fs, path = self.filesystem(url)
        root = fs._strip_protocol(path).rstrip("/")  # as fs.find names what it finds

        def find() -> dict[str, dict[str, Any]]:
            try:
                return fs.find(root, detail=True)
            except FileNotFoundError as exc:
                text = _chain_text(exc)
                if not is_local(url) and (
                    "NoSuchBucket" in text or "bucket does not exist" in text
                ):
                    raise
                return {}

        out: dict[str, dict[str, Any]] = {}
        for name, entry in self._retry("list", url, find).items():
            relative = name[len(root) :].strip("/") if name.startswith(root) else basename(name)
            if entry.get("type") == "directory" or not relative:
                continue
            if any(_is_hidden(part) for part in relative.split("/")):
                continue
            out[join(url, relative)] = _details(entry)
        return out

    def stat(self, url: str) -> dict[str, Any]:
        """``size`` and ``version`` of one file (see :meth:`list_details`)."""
        fs, path = self.filesystem(url)
        return _details(self._retry("stat", url, lambda: fs.info(path)))

    def glob(self, pattern: str) -> list[str]:
        """URLs matching a glob pattern (``*``, ``**``, ``?``, ``[..]``), sorted."""
        fs, path = self.filesystem(pattern)
        matches = self._retry("list", pattern, lambda: fs.glob(path))
        prefix = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
        if prefix == "file://":
            prefix = "file://"
        return sorted(prefix + m if prefix else m for m in matches if not _is_hidden(basename(m)))

    def size(self, url: str) -> int:
        fs, path = self.filesystem(url)
        return self._retry("stat", url, lambda: int(fs.size(path)))

    # -- reading -------------------------------------------------------------------------------

    def open(self, url: str, mode: str = "rb") -> IO:
        """Open for reading (binary; text through ``io.TextIOWrapper``). On object storage the
        file survives dropped connections (:class:`ResumableReader`). Writing goes through
        :meth:`open_atomic`."""
        if "r" not in mode:
            raise ValueError("Storage.open is for reading; use open_atomic to write")
        fs, path = self.filesystem(url)
        if is_local(url):
            with self._errors("read", url):
                return fs.open(path, mode)
        raw = io.BufferedReader(ResumableReader(self, url, fs, path), buffer_size=1 << 20)
        return raw if "b" in mode else io.TextIOWrapper(raw, encoding="utf-8")

    def read_bytes(self, url: str) -> bytes:
        fs, path = self.filesystem(url)
        return self._retry("read", url, lambda: fs.cat_file(path))

    def read_text(self, url: str) -> str:
        return self.read_bytes(url).decode("utf-8")

    def read_json(self, url: str) -> Any:
        data = self.read_bytes(url)
        try:
            return json.loads(data)
        except json.JSONDecodeError as exc:
            raise StorageError(f"{redact_url(url)}: not valid JSON ({exc})") from None

    # -- writing -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def open_atomic(self, url: str, mode: str = "wb") -> Iterator[IO]:
        """Write a file that appears at ``url`` whole, or not at all.

        On local disk the data goes to a hidden temporary file in the same directory, which is
        fsynced and renamed over ``url`` when the block exits cleanly. On S3 an object is visible
        only once its upload completes on close; if the block raises, the upload is aborted.
        """
        if "w" not in mode:
            raise ValueError("open_atomic writes; mode must contain 'w'")
        fs, path = self.filesystem(url)
        if is_local(url):
            directory = os.path.dirname(os.path.abspath(path))
            tmp = os.path.join(directory, f".{os.path.basename(path)}{_TMP_TAG}{uuid.uuid4().hex}")
            with self._errors("write", url):
                os.makedirs(directory, exist_ok=True)
                handle = open(tmp, mode)  # noqa: SIM115 (closed below, on both paths)
            try:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()
                with self._errors("write", url):
                    os.replace(tmp, path)
            except BaseException:
                handle.close()
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
                raise
            return
        with self._errors("write", url):
            handle = fs.open(path, mode)
        try:
            yield handle
        except BaseException:
            with contextlib.suppress(Exception):
                handle.discard()  # aborts the multipart upload: nothing becomes visible
            handle.closed = True  # or its finaliser would upload what was buffered
            raise
        with self._errors("write", url):
            handle.close()

    def write_bytes(self, url: str, data: bytes) -> None:
        """Write ``data`` to ``url`` atomically, retried whole on a transient error."""

        def write() -> None:
            with self.open_atomic(url) as handle:
                handle.write(data)

        retrying(write, self.options.retry_policy(), f"write {redact_url(url)}", self._scrub)

    def upload_file(self, local_path: str, url: str) -> None:
        """Copy a local file to ``url`` atomically, retried whole on a transient error."""

        def upload() -> None:
            with open(local_path, "rb") as src, self.open_atomic(url) as dst:
                shutil.copyfileobj(src, dst, 8 << 20)

        retrying(upload, self.options.retry_policy(), f"write {redact_url(url)}", self._scrub)

    def write_text(self, url: str, text: str) -> None:
        self.write_bytes(url, text.encode("utf-8"))

    def write_json(self, url: str, obj: Any) -> None:
        self.write_bytes(url, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))

    def makedirs(self, url: str) -> None:
        """Create a local directory (object storage has no directories; nothing to do there)."""
        if is_local(url):
            with self._errors("create", url):
                os.makedirs(_local_path(url), exist_ok=True)

    def remove(self, url: str, *, recursive: bool = False) -> None:
        """Remove a file, or with ``recursive`` a directory tree. Missing URLs are fine."""
        fs, path = self.filesystem(url)

        def remove() -> None:
            if is_local(url):
                if os.path.isdir(path):
                    if not recursive:
                        raise IsADirectoryError(path)
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
                return
            if fs.exists(path):
                fs.rm(path, recursive=recursive)

        self._retry("remove", url, remove)

    def copy_from_local(self, local_path: str, url: str) -> None:
        """Upload a local file or folder tree to ``url``, file by file (each atomic and retried;
        a folder is whole only once its own marker says so)."""
        if not os.path.isdir(local_path):
            self.upload_file(local_path, url)
            return
        for dirpath, _, files in os.walk(local_path):
            rel = os.path.relpath(dirpath, local_path)
            for name in files:
                self.upload_file(
                    os.path.join(dirpath, name), join(url, rel if rel != "." else "", name)
                )


def _listing(fs: Any, path: str, url: str) -> list[dict[str, Any]]:
    """``fs.ls(path, detail=True)``; a missing folder lists as empty, a missing bucket raises."""
    try:
        return fs.ls(path, detail=True)
    except FileNotFoundError as exc:
        text = _chain_text(exc)
        if not is_local(url) and ("NoSuchBucket" in text or "bucket does not exist" in text):
            raise
        return []


def _details(entry: dict[str, Any]) -> dict[str, Any]:
    """Size and version of an fsspec listing entry (version: the ETag, else mtime and size)."""
    if entry.get("type") == "directory":
        return {"size": None, "version": None}
    size = int(entry.get("size") or 0)
    etag = entry.get("ETag") or entry.get("etag")
    if etag:
        return {"size": size, "version": str(etag).strip('"')}
    mtime = entry.get("mtime") or entry.get("LastModified") or entry.get("created")
    return {"size": size, "version": f"{mtime}-{size}"}


class ResumableReader(io.RawIOBase):
    """A read-only object on object storage that survives dropped connections.

    A transient error while reading (a reset, a stall past ``read_timeout_s``, a body cut off) is
    retried (:mod:`pipeline.retries`): the object is opened again and read on from the same offset
    with a ranged GET, after checking its ETag, so a retried read never splices two versions of an
    object. A tar streamed through this reader is thus read to its real end or fails with a
    :class:`StorageError`, never a silent short read.
    """

    BLOCK = 8 << 20  # bytes per ranged GET: a retry re-reads at most this much

    def __init__(self, storage: Storage, url: str, fs: Any, path: str) -> None:
        super().__init__()
        self._storage, self._url, self._fs, self._path = storage, url, fs, path
        self._file: Any = None
        self._etag: str | None = None
        self._pos = 0
        self._storage._retry("read", url, self._reopen)

    def _reopen(self) -> None:
        self._drop()
        handle = self._fs.open(self._path, "rb", block_size=self.BLOCK)
        etag = ((getattr(handle, "details", None) or {}).get("ETag") or "").strip('"') or None
        if self._etag and etag and etag != self._etag:
            handle.close()
            error = StorageError(
                f"cannot read {redact_url(self._url)}: the object changed while it was read "
                f"(ETag {self._etag} became {etag})"
            )
            raise error
        self._etag = self._etag or etag
        if self._pos:
            handle.seek(self._pos)
        self._file = handle

    def _drop(self) -> None:
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._file.close()
            self._file = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        def once() -> int:
            if self._file is None:
                self._reopen()
            try:
                return self._file.readinto(buffer)
            except BaseException:
                self._drop()  # reopened at self._pos by the next attempt
                raise

        count = self._storage._retry("read", self._url, once)
        self._pos += count
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence == io.SEEK_END:
            offset += self._storage._retry("stat", self._url, lambda: self._fs.size(self._path))
        self._pos = offset
        if self._file is not None:
            self._file.seek(offset)
        return offset

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._drop()
        super().close()
