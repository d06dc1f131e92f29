"""Which source shards a ``shards`` config value names, and when each one counts as complete.

The value is a folder or a pattern:

* a folder (``s3://bucket/laion``, ``/data/shards``): the ``.tar`` files directly in it;
* a pattern: brace ranges and lists as webdataset writes them (``laion/{00000..41455}.tar``,
  ``{train,extra}/part-{0..9}.tar``), shell globs (``laion/*.tar``, ``laion/part-*/0000?.tar``:
  ``*``, ``?`` and ``[...]`` stay within one folder name, ``**`` crosses folders), or both.

Either way the folder before the first pattern character is listed once (recursively only when
the pattern spans folders), never one request per shard, so naming 200k shards costs one paginated
listing, and each tar's size and version (ETag) come with it.

**When a listed tar counts as complete** (the rule every job applies):

* *img2dataset's layout.* In a folder that holds any ``NNNNN_stats.json``, a tar is complete
  exactly when its own ``_stats.json`` exists: img2dataset, ``unclip ingest`` and ``unclip synth``
  write it last, so a tar without one is being written or its writer died. Such tars are left
  out, and counted in the log.
* *Plain webdataset tars* (any other tool). In a folder without stats files, every listed ``.tar``
  is complete. Object storage makes an object visible only once its upload has finished, and a
  writer that writes a temporary name and renames is safe on any filesystem. A writer that
  appends to the final name in place can be seen mid-write: the reader then meets the cut and
  counts it as a ``truncated tar``, and since each shard's completion record keeps the tar's size
  and version, the next ``unclip embed`` sees that the tar changed and encodes it again (and the
  training stages refuse a store whose sources changed since).

A brace pattern names its shards; names it lists that are not there are left out and counted in
the log (img2dataset leaves gaps where a shard failed). A pattern or folder that names no complete
tar is an error naming it.

**Names.** A shard is named by its path below the listed folder without ``.tar``, with ``/``
written as ``__`` (``part-3/00012.tar`` → ``part-3__00012``). Store files, completion records and
training pieces use the name; :class:`TarLocator` turns it back into the tar's URL. Two tars with
one name are refused, naming both.
"""

from __future__ import annotations

import logging
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pipeline.data.shards import STATS_SUFFIX, tar_groups
from pipeline.errors import UserFacingError
from pipeline.storage import Storage, StorageError, join

log = logging.getLogger(__name__)

PATTERN_CHARS = "{*?["
NESTED = "__"  # stands for "/" in the name of a shard below a subfolder
STATS_THREADS = 32  # parallel GETs of img2dataset's stats files
COUNT_TARS_PER_TASK = 16  # plain tars counted per Ray task


def is_pattern(spec: str) -> bool:
    return any(c in spec for c in PATTERN_CHARS)


def expand_braces(pattern: str) -> list[str]:
    """Every string a brace pattern names, in order, as a shell expands it: ``{a,b}`` lists and
    ``{0..9}`` numeric ranges (zero-padded to the wider bound when either bound has a leading
    zero, as webdataset's ``{000..099}``), nested or several in one pattern. A group without a
    comma or range (``{x}``) is literal text."""
    start = pattern.find("{")
    while start != -1:
        depth, parts, begin = 0, [], start + 1
        for end in range(start, len(pattern)):
            c = pattern[end]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    break
            elif c == "," and depth == 1:
                parts.append(pattern[begin:end])
                begin = end + 1
        else:
            return [pattern]  # unbalanced: literal text
        parts.append(pattern[begin:end])
        head, tail = pattern[:start], pattern[end + 1 :]
        ranged = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", parts[0]) if len(parts) == 1 else None
        if ranged:
            lo, hi = ranged.group(1), ranged.group(2)
            width = max(len(lo), len(hi)) if lo.startswith("0") or hi.startswith("0") else 0
            step = 1 if int(hi) >= int(lo) else -1
            parts = [f"{i:0{width}d}" for i in range(int(lo), int(hi) + step, step)]
        if len(parts) > 1 or ranged:
            return [
                first + rest
                for option in parts
                for first in expand_braces(head + option)
                for rest in expand_braces(tail)
            ]
        start = pattern.find("{", start + 1)  # "{x}": literal, look further on
    return [pattern]


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob over ``/``-separated names: ``**`` any depth, ``*`` and ``?`` within one name."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def split_spec(spec: str) -> tuple[str, str]:
    """The folder to list and the pattern below it (empty for a plain folder)."""
    if not is_pattern(spec):
        return spec.rstrip("/"), ""
    first = min(spec.index(c) for c in PATTERN_CHARS if c in spec)
    cut = spec.rfind("/", 0, first)
    if cut == -1:
        return ".", spec
    return spec[:cut], spec[cut + 1 :]


def name_of(relative: str) -> str:
    """A shard's name from its tar's path below the listed folder (see the module)."""
    stem = relative[: -len(".tar")] if relative.endswith(".tar") else relative
    return stem.replace("/", NESTED)


@dataclass(frozen=True)
class TarLocator:
    """A shard's name back to its tar's URL: ``root/<name>.tar`` unless listed in ``nested``
    (the few shards below a subfolder); small enough to ship to every worker."""

    root: str
    nested: dict[str, str] = field(default_factory=dict)

    def __call__(self, name: str) -> str:
        return self.nested.get(name) or join(self.root, f"{name}.tar")

    @classmethod
    def of(cls, root: str, tars: dict[str, str]) -> TarLocator:
        return cls(root, {n: u for n, u in tars.items() if u != join(root, f"{n}.tar")})


@dataclass(frozen=True)
class ShardSet:
    """The complete source shards a ``shards`` value names (see the module).

    ``tars``: name → tar URL, sorted by name; ``versions``: name → the tar's ``size`` and
    ``version`` from the listing; ``stats``: name → its ``_stats.json`` URL, for the shards in
    img2dataset's layout (the others are plain tars)."""

    spec: str
    root: str
    tars: dict[str, str]
    versions: dict[str, dict[str, Any]]
    stats: dict[str, str]

    @property
    def names(self) -> list[str]:
        return list(self.tars)

    def locator(self) -> TarLocator:
        return TarLocator.of(self.root, self.tars)

    def __len__(self) -> int:
        return len(self.tars)


def list_shards(storage: Storage, spec: str, *, key: str = "shards") -> ShardSet:
    """The complete shards ``spec`` names, from one listing; raises :class:`UserFacingError`
    naming ``spec`` (and the config ``key``) when there are none."""
    root, pattern = split_spec(spec)
    deep = "/" in pattern or "**" in pattern
    listing = storage.find_details(root) if deep else storage.list_details(root)
    files = {url[len(root) :].lstrip("/"): details for url, details in listing.items()}
    files = {rel: d for rel, d in files.items() if d.get("size") is not None}

    literal: set[str] = set()
    globs: list[re.Pattern[str]] = []
    for option in expand_braces(pattern) if pattern else []:
        if any(c in option for c in "*?["):
            globs.append(_glob_regex(option))
        else:
            literal.add(option)

    def named(rel: str) -> bool:
        if not pattern:
            return "/" not in rel
        return rel in literal or any(g.match(rel) for g in globs)

    stats_folders = {rel.rpartition("/")[0] for rel in files if rel.endswith(STATS_SUFFIX)}
    tars: dict[str, str] = {}
    versions: dict[str, dict[str, Any]] = {}
    stats: dict[str, str] = {}
    unfinished: list[str] = []
    for rel in sorted(files):
        if not rel.endswith(".tar") or not named(rel):
            continue
        folder = rel.rpartition("/")[0]
        if folder in stats_folders:
            stats_rel = rel[: -len(".tar")] + STATS_SUFFIX
            if stats_rel not in files:
                unfinished.append(rel)
                continue
        name = name_of(rel)
        if name in tars:
            raise UserFacingError(
                f"two source tars are both named {name!r} under {root} ({tars[name]} and "
                f"{join(root, rel)}; config key: {key}): rename one, or name fewer with the pattern"
            )
        tars[name] = join(root, rel)
        versions[name] = files[rel]
        if folder in stats_folders:
            stats[name] = join(root, rel[: -len(".tar")] + STATS_SUFFIX)
    if unfinished:
        log.info(
            "%d tars under %s have no _stats.json yet (being written, or their writer died): left "
            "out (%s)",
            len(unfinished),
            root,
            ", ".join(unfinished[:5]),
        )
    absent = sorted(lit for lit in literal if lit.endswith(".tar") and lit not in files)
    if absent:
        log.warning(
            "%d of the %d shards %s names are not there: left out (%s)",
            len(absent),
            len(literal),
            spec,
            ", ".join(absent[:5]),
        )
    if not tars:
        what = f"matching {pattern!r} " if pattern else ""
        raise UserFacingError(
            f"no complete shards {what}at {root} (config key: {key}): a folder of webdataset "
            ".tar files, a glob or a brace pattern; run `unclip synth` or `unclip ingest` to make "
            "some"
        )
    return ShardSet(spec, root, tars, versions, stats)


# ----------------------------------------------------------------------------------------------
# Sample counts (the training stages that read tars alone need each shard's size up front)


def count_tar_samples(storage: Storage, url: str) -> int:
    """The samples (groups of members sharing a key) of one tar, as the reader numbers them; a
    truncated tar counts what is before the cut."""
    seen = 0
    with storage.open(url) as handle:
        try:
            for _ in tar_groups(handle):
                seen += 1
        except (tarfile.TarError, EOFError):
            pass
    return seen


def _count_many(storage: Storage, urls: list[str]) -> list[int]:
    return [count_tar_samples(storage, url) for url in urls]


def sample_counts(
    storage: Storage, shards: ShardSet, cache_url: str | None = None
) -> dict[str, int]:
    """Each shard's sample count: img2dataset's from its ``_stats.json`` (``successes``, read with
    parallel GETs); a plain tar's by reading it once in a Ray task (:func:`count_tar_samples`,
    ``COUNT_TARS_PER_TASK`` tars a task, so no tar passes through this process).

    Plain tars' counts are kept in ``cache_url`` (a parquet of name, version, samples) when given,
    and only tars whose version differs are counted again on the next start."""
    counts: dict[str, int] = {}
    if shards.stats:
        with ThreadPoolExecutor(STATS_THREADS) as pool:
            names = list(shards.stats)
            stats = pool.map(storage.read_json, (shards.stats[n] for n in names))
            counts.update(
                {n: int(s.get("successes", 0)) for n, s in zip(names, stats, strict=True)}
            )
    plain = [n for n in shards.tars if n not in shards.stats]
    if not plain:
        return counts
    cached = _read_counts(storage, cache_url) if cache_url else {}
    todo = []
    for name in plain:
        version = shards.versions[name].get("version")
        hit = cached.get(name)
        if hit and version and hit[0] == version:
            counts[name] = hit[1]
        else:
            todo.append(name)
    if todo:
        counts.update(count_on_ray(storage, [(n, shards.tars[n]) for n in todo]))
        if cache_url:
            _write_counts(
                storage,
                cache_url,
                {n: (shards.versions[n].get("version"), counts[n]) for n in plain},
            )
    return counts


def count_on_ray(storage: Storage, named: list[tuple[str, str]]) -> dict[str, int]:
    import ray

    log.info("counting the samples of %d plain webdataset tars (once; kept for reruns)", len(named))
    task = ray.remote(num_cpus=1, max_retries=3)(_count_many)
    chunks = [named[i : i + COUNT_TARS_PER_TASK] for i in range(0, len(named), COUNT_TARS_PER_TASK)]
    refs = [task.remote(storage, [url for _, url in chunk]) for chunk in chunks]
    out: dict[str, int] = {}
    for chunk, ref in zip(chunks, refs, strict=True):
        try:
            found = ray.get(ref)
        except Exception as exc:
            raise StorageError(
                f"counting the samples of {chunk[0][1]} (and {len(chunk) - 1} more) failed: {exc}"
            ) from exc
        out.update({name: n for (name, _), n in zip(chunk, found, strict=True)})
    return out


def _read_counts(storage: Storage, url: str) -> dict[str, tuple[str, int]]:
    import pyarrow.parquet as pq

    if not storage.exists(url):
        return {}
    with storage.open(url) as handle:
        table = pq.read_table(handle)
    return {
        n: (v, int(c))
        for n, v, c in zip(
            *(table.column(k).to_pylist() for k in ("name", "version", "samples")), strict=True
        )
    }


def _write_counts(storage: Storage, url: str, counts: dict[str, tuple[Any, int]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = sorted(counts)
    versions = [None if counts[n][0] is None else str(counts[n][0]) for n in names]
    table = pa.table(
        {
            "name": pa.array(names, pa.string()),
            "version": pa.array(versions, pa.string()),
            "samples": pa.array([counts[n][1] for n in names], pa.int64()),
        }
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(url, sink.getvalue().to_pybytes())
