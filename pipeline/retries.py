"""Transient storage errors, told apart from real ones, and retried with backoff.

Object storage drops connections, stalls and throttles; at hundreds of thousands of requests per
job some of that always happens. The SDKs retry a request that fails before its answer starts
(botocore's ``max_attempts``, the AWS C++ SDK's retry strategy), but not a body cut off halfway, and
s3fs runs with its own loop off. Every storage operation of this project therefore runs under
:func:`retrying`: an error that :func:`is_transient` recognises (a reset or closed connection, a
timeout, a cut-off body, HTTP 5xx, throttling) is retried with exponential backoff and jitter;
anything else (no such key, access denied, a malformed file) is raised at once, because retrying it
cannot help. When the attempts run out the last error is raised: the caller fails the unit of work
(a shard, a checkpoint) by name and never records it as done.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# Exception class names (anywhere in the MRO or the cause chain) that mean "try again": raised by
# the standard library, aiohttp (s3fs), botocore/urllib3 and http.client. Matched by name so that
# none of those packages is imported here.
TRANSIENT_TYPES = frozenset(
    {
        "ConnectionResetError",
        "ConnectionAbortedError",
        "BrokenPipeError",
        "TimeoutError",
        "IncompleteRead",
        "RemoteDisconnected",
        "ClientPayloadError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
        "ClientOSError",
        "SocketTimeoutError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "ConnectionClosedError",
        "ResponseStreamingError",
        "IncompleteReadError",
        "ProtocolError",
    }
)
# Text of errors that arrive as a plain OSError or ClientError (pyarrow's S3 filesystem, s3fs'
# translation of a 5xx): throttling, server errors, the C++ SDK's network failures.
TRANSIENT_TEXT = (
    "SlowDown",
    "Throttl",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500 Internal",
    "502",
    "504",
    "NETWORK_CONNECTION",
    "Connection reset",
    "connection reset",
    "Connection was reset",
    "Timeout was reached",
    "timed out",
    "curlCode: 28",
    "curlCode: 52",
    "curlCode: 55",
    "curlCode: 56",
    "Server disconnected",
    "Response payload is not completed",
)
# Never transient, whatever the text says: retrying cannot make a missing key appear.
PERMANENT_TYPES = frozenset(
    {"FileNotFoundError", "PermissionError", "IsADirectoryError", "NotADirectoryError"}
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error in its cause chain) is one a retry may cure."""
    for err in _chain(exc):
        names = {cls.__name__ for cls in type(err).__mro__}
        if getattr(err, "transient", None) is not None:
            return bool(err.transient)  # our own StorageError says which it is
        if names & PERMANENT_TYPES:
            return False
        if names & TRANSIENT_TYPES:
            return True
        text = str(err)
        if any(marker in text for marker in TRANSIENT_TEXT):
            return True
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a transient error is retried (``storage.retries`` and
    ``storage.retry_backoff_s``): waits of backoff, 2×, 4× ... capped at ``max_backoff_s``, each
    with up to 50% jitter so that many workers do not retry in step."""

    attempts: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 20.0

    def delays(self) -> Iterator[float]:
        for attempt in range(self.attempts - 1):
            delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
            yield delay * (1 + 0.5 * random.random())


def retrying(
    fn: Callable[[], T],
    policy: RetryPolicy,
    what: str,
    scrub: Callable[[str], str] = str,
) -> T:
    """``fn()``, retried under ``policy`` while it raises transient errors; ``what`` names the
    operation in the log (``read s3://b/x.tar``) and ``scrub`` cleans the error's text of
    credentials before it is logged."""
    delays = policy.delays()
    attempt = 1
    while True:
        try:
            return fn()
        except Exception as exc:
            delay = next(delays, None) if is_transient(exc) else None
            if delay is None:
                raise
            log.warning(
                "%s: transient error (attempt %d of %d, retrying in %.1f s): %s: %s",
                what,
                attempt,
                policy.attempts,
                delay,
                type(exc).__name__,
                scrub(str(exc))[:200],
            )
            time.sleep(delay)
            attempt += 1
