"""The one reader of source tars, with one bad-input policy for every stage that reads them.

Bad input is skipped, counted by reason and named by key; it never stops a job and is never
silently dropped:

* ``missing image`` / ``missing caption``: a sample without an image, or with an empty caption;
* ``undecodable image``: the caller's decode failed (:meth:`Skips.add` from the caller);
* ``truncated tar``: the tar was read to its real end and ends inside a member (what is before
  the cut is kept);
* ``not a tar``: the file is not a tar archive at all (no ``ustar`` header).

Storage failures are not bad input: a transient error is retried inside :class:`Storage` (a read
that drops its connection resumes at its offset), and what still fails raises
:class:`~pipeline.storage.StorageError` to the caller, which fails the shard by name and never
records it as done. So "truncated" means the bytes really end there, not that a connection did.
"""

from __future__ import annotations

import logging
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from pipeline.data.shards import tar_groups
from pipeline.storage import Storage, basename

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "png", "webp", "jpeg")
MAX_KEYS_PER_REASON = 100  # keys kept per reason in a shard's record


@dataclass
class Skips:
    """Skipped samples of one source shard: counts by reason, and the first keys of each."""

    counts: Counter = field(default_factory=Counter)
    keys: dict[str, list[str]] = field(default_factory=dict)

    def add(self, key: str, reason: str, url: str) -> None:
        self.counts[reason] += 1
        kept = self.keys.setdefault(reason, [])
        if len(kept) < MAX_KEYS_PER_REASON:
            kept.append(key)
        log.warning("skipping %s in %s: %s", key, url, reason)

    def total(self) -> int:
        return sum(self.counts.values())

    def to_json(self) -> dict[str, Any]:
        return {"skipped": dict(self.counts), "skipped_keys": dict(self.keys)}


@dataclass
class Sample:
    key: str
    image: bytes
    caption: str
    index: int = 0  # the sample's place in its tar, counting bad samples too


class _Peek:
    """A file object that keeps its first 512 bytes, to tell a truncated tar from no tar."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        self.head = b""

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        if len(self.head) < 512:
            self.head += data[: 512 - len(self.head)]
        return data

    def is_tar(self) -> bool:
        return len(self.head) >= 262 and self.head[257:262] == b"ustar"


def read_samples(
    storage: Storage, url: str, skips: Skips, *, need_caption: bool = True
) -> Iterator[Sample]:
    """The good samples of the tar at ``url``; bad ones are added to ``skips`` (see the module).
    Raises :class:`~pipeline.storage.StorageError` when the tar cannot be read."""
    name = basename(url)
    seen = 0
    with storage.open(url) as handle:
        peek = _Peek(handle)
        try:
            for group in tar_groups(peek):
                seen += 1
                key = group["__key__"]
                image = next((group[e] for e in IMAGE_EXTENSIONS if group.get(e)), None)
                caption = (group.get("txt") or b"").decode("utf-8", errors="replace").strip()
                if image is None:
                    skips.add(key, "missing image", url)
                elif need_caption and not caption:
                    skips.add(key, "missing caption", url)
                else:
                    yield Sample(key, image, caption, seen - 1)
        except (tarfile.TarError, EOFError) as exc:
            if seen or peek.is_tar():
                skips.add(f"{name}:<end>", "truncated tar", url)
                log.warning("%s ends inside a member after %d samples (%s)", url, seen, exc)
            else:
                skips.add(f"{name}:<file>", "not a tar", url)
                log.warning("%s is not a tar archive (%s)", url, exc)
