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
* a directory of files (:meth:`Storage.commit_dir`, used for checkpoints) is published by a marker file
  written last (``_COMMITTED``, listing the files and their sizes). On local disk the directory is also
  built under a hidden name and renamed into place. Readers ask :meth:`Storage.is_committed` or
  :meth:`Storage.committed_children` and never pick up a directory whose writer died.

Errors name the URL and what went wrong (missing bucket, unreachable endpoint, access denied) and
never contain a credential: :class:`Secret` hides them from ``repr``, logs and saved configs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import fsspec

from unclip.fields import param

# botocore's DEBUG records print request headers, whose signature names the access key id. Pin the
# SDK's loggers at WARNING so that no log level set elsewhere (root at DEBUG) puts one in a log.
for _name in ("botocore", "aiobotocore", "boto3", "s3transfer", "s3fs"):
    _logger = logging.getLogger(_name)
    if _logger.level == logging.NOTSET or _logger.level < logging.WARNING:
        _logger.setLevel(logging.WARNING)
_TMP_TAG = ".tmp-"


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URL and the cause, never a credential."""


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
    max_attempts: int = param(4, "attempts per request before giving up", ge=1)

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
                        "retries": {"max_attempts": o.max_attempts, "mode": "standard"},
                    },
                    use_listings_cache=False,  # other processes write here: never list stale
                    skip_instance_cache=True,
                )
                # botocore retries already (max_attempts); s3fs' own loop would multiply them
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
            "anonymous": o.anonymous,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=o.max_attempts),
        }
        if key and secret:
            kwargs.update(access_key=key, secret_key=secret)
        endpoint = o.resolved_endpoint()
        if endpoint:
            parts = urlsplit(endpoint)
            kwargs["endpoint_override"] = parts.netloc + parts.path.rstrip("/")
            kwargs["scheme"] = parts.scheme or "https"
        return pafs.S3FileSystem(**{k: v for k, v in kwargs.items() if v is not None}), url.split(
            "://", 1
        )[1]

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
        with self._errors("reach", url):
            fs.ls(_bucket(url), detail=False)
        if write:
            probe = join(url, f".unclip-write-probe-{uuid.uuid4().hex}")
            self.write_bytes(probe, b"")
            self.remove(probe)

    def exists(self, url: str) -> bool:
        fs, path = self.filesystem(url)
        with self._errors("look up", url):
            return bool(fs.exists(path))

    def isdir(self, url: str) -> bool:
        fs, path = self.filesystem(url)
        with self._errors("look up", url):
            return bool(fs.isdir(path))

    def list(self, url: str, *, include_hidden: bool = False) -> list[str]:
        """The URLs directly under ``url``, sorted; hidden and temporary names are left out.

        A missing directory lists as empty.
        """
        fs, path = self.filesystem(url)
        with self._errors("list", url):
            try:
                entries = fs.ls(path, detail=False)
            except FileNotFoundError as exc:
                if not is_local(url) and "bucket" in _chain_text(exc).lower():
                    raise
                return []
        names = sorted({posixpath.basename(e.rstrip("/")) for e in entries})
        return [join(url, n) for n in names if include_hidden or not _is_hidden(n)]

    def glob(self, pattern: str) -> list[str]:
        """URLs matching a glob pattern (``*``, ``**``, ``?``, ``[..]``), sorted."""
        fs, path = self.filesystem(pattern)
        with self._errors("list", pattern):
            matches = fs.glob(path)
        prefix = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
        if prefix == "file://":
            prefix = "file://"
        return sorted(prefix + m if prefix else m for m in matches if not _is_hidden(basename(m)))

    def size(self, url: str) -> int:
        fs, path = self.filesystem(url)
        with self._errors("stat", url):
            return int(fs.size(path))

    # -- reading -------------------------------------------------------------------------------

    def open(self, url: str, mode: str = "rb") -> IO:
        """Open for reading. Writing goes through :meth:`open_atomic`."""
        if "r" not in mode:
            raise ValueError("Storage.open is for reading; use open_atomic to write")
        fs, path = self.filesystem(url)
        with self._errors("read", url):
            return fs.open(path, mode)

    def read_bytes(self, url: str) -> bytes:
        fs, path = self.filesystem(url)
        with self._errors("read", url):
            return fs.cat_file(path)

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
        with self.open_atomic(url) as handle:
            handle.write(data)

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
        with self._errors("remove", url):
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

    def copy_from_local(self, local_path: str, url: str) -> None:
        """Upload a local file or directory tree to ``url`` (not atomic by itself; see commit_dir)."""
        fs, path = self.filesystem(url)
        with self._errors("write", url):
            if os.path.isdir(local_path):
                for dirpath, _, files in os.walk(local_path):
                    rel = os.path.relpath(dirpath, local_path)
                    for name in files:
                        target = join(url, rel if rel != "." else "", name)
                        tfs, tpath = self.filesystem(target)
                        if is_local(target):
                            os.makedirs(os.path.dirname(tpath), exist_ok=True)
                        tfs.put_file(os.path.join(dirpath, name), tpath)
            else:
                if is_local(url):
                    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                fs.put_file(local_path, path)
