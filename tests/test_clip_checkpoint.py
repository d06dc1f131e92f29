"""A CLIP checkpoint on S3 reaches processes on other nodes: the driver pins it by sha256 while
streaming it (no local copy), a process with a temp dir of its own (a Ray task whose ``TMPDIR``
differs, as on another node) fetches and loads it, a second fetch there reuses the node's cache,
actors starting together on one node download it once, and an object that changed since the
driver pinned it is refused, naming its URL."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
import threading

import pytest
import torch
from helpers import tiny_clip_checkpoint, tiny_clip_source
from safetensors.torch import load_file

from pipeline.embed import clip_model
from pipeline.embed.clip_model import CheckpointRef
from pipeline.errors import UserFacingError
from pipeline.storage import Storage


def _sha256(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


@pytest.fixture
def remote_clip(s3_bucket: str, tmp_path) -> dict:
    """The tiny CLIP on S3, alone and as a train-clip run's latest checkpoint."""
    storage = Storage()
    local = tiny_clip_checkpoint(str(tmp_path / "clip.safetensors"), 0)
    url = f"{s3_bucket}/clips/clip.safetensors"
    storage.copy_from_local(local, url)
    size = os.path.getsize(local)
    run = f"{s3_bucket}/checkpoints/clip"
    for step in (1, 2):
        folder = f"{run}/checkpoint_{step:06d}"
        storage.copy_from_local(local, f"{folder}/clip.safetensors")
        marker = {"step": step, "files": {"clip.safetensors": size}}
        storage.write_text(f"{folder}/checkpoint.json", json.dumps(marker))
    return {"root": s3_bucket, "url": url, "run": run, "local": local, "size": size}


@pytest.fixture
def driver_tmp(tmp_path, monkeypatch) -> str:
    """This process's temp dir, empty, and no cache dir from the environment."""
    path = tmp_path / "driver-tmp"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    monkeypatch.delenv(clip_model.CACHE_ENV, raising=False)
    return str(path)


def test_the_driver_pins_a_remote_checkpoint_without_a_local_copy(
    remote_clip: dict, driver_tmp: str
) -> None:
    storage = Storage()
    sha = _sha256(remote_clip["local"])
    expected = CheckpointRef(remote_clip["url"], sha, remote_clip["size"])
    # relative to the root, as a config gives it
    source = tiny_clip_source("clips/clip.safetensors")
    ref = clip_model.resolve_checkpoint(source, storage, remote_clip["root"])
    assert ref == expected
    assert pickle.loads(pickle.dumps(ref)) == ref  # what Ray ships to the actors
    # a train-clip run folder: its latest whole checkpoint's weights
    run_ref = clip_model.resolve_checkpoint(tiny_clip_source(remote_clip["run"]), storage, "")
    assert run_ref == CheckpointRef(
        f"{remote_clip['run']}/checkpoint_000002/clip.safetensors", sha, remote_clip["size"]
    )
    # the identity comes from the ref's hash: the same CLIP as the local file's
    ident = clip_model.identity(source, ref)
    assert ident.checkpoint_sha256 == sha
    assert ident == clip_model.identity(
        tiny_clip_source(remote_clip["local"]), remote_clip["local"]
    )
    assert os.listdir(driver_tmp) == []  # nothing downloaded, no cache made
    # a local checkpoint stays a path, loaded where it lies
    local = clip_model.resolve_checkpoint(tiny_clip_source(remote_clip["local"]), storage, "")
    assert local == remote_clip["local"]
    assert clip_model.fetch_checkpoint(local) == local
    assert clip_model.fetch_checkpoint("file://" + local) == local


def _files(cache: str) -> list[str]:
    """The cache's files, without the lock files the fetches take turns with."""
    return sorted(name for name in os.listdir(cache) if not name.endswith(".lock"))


def _remote(fn, tmpdir: str):
    import ray

    env = {"TMPDIR": tmpdir, clip_model.CACHE_ENV: ""}  # the cache under TMPDIR, as by default
    return ray.remote(fn).options(num_cpus=0, runtime_env={"env_vars": env})


def test_a_process_elsewhere_fetches_caches_and_refuses_a_changed_checkpoint(
    remote_clip: dict, driver_tmp: str, tmp_path, ray_local
) -> None:
    import ray

    storage = Storage()
    ref = clip_model.resolve_checkpoint(
        tiny_clip_source(remote_clip["url"]), storage, remote_clip["root"]
    )
    assert isinstance(ref, CheckpointRef)
    node_a = str(tmp_path / "node-a")
    os.makedirs(node_a)

    # a process with another temp dir (as an actor on another node) fetches and loads it
    path = ray.get(_remote(clip_model.fetch_checkpoint, node_a).remote(ref, storage))
    cache = os.path.join(node_a, "unclip-checkpoints")
    assert path == os.path.join(cache, ref.sha256 + ".safetensors")
    assert _files(cache) == [os.path.basename(path)]  # no temporary file left
    assert _sha256(path) == ref.sha256
    source = tiny_clip_source(remote_clip["url"])
    loaded = ray.get(_remote(clip_model.load_clip, node_a).remote(source, ref, "cpu", storage))
    weights = load_file(remote_clip["local"])
    state = loaded.model.state_dict()
    assert all(torch.equal(state[k], weights[k]) for k in weights)
    assert loaded.embed_dim == clip_model.load_clip(source, remote_clip["local"]).embed_dim
    assert os.listdir(driver_tmp) == []  # the driver never held a copy

    # the object changes under the job (same size, other weights)
    other = tiny_clip_checkpoint(str(tmp_path / "other.safetensors"), 1)
    assert os.path.getsize(other) == ref.size
    storage.copy_from_local(other, remote_clip["url"])

    # a second fetch on node A reuses its verified copy: it does not read the object again
    before = os.stat(path).st_mtime_ns
    again = ray.get(_remote(clip_model.fetch_checkpoint, node_a).remote(ref, storage))
    assert again == path and os.stat(path).st_mtime_ns == before

    # a node without the copy refuses the changed object, and keeps no partial copy
    node_b = str(tmp_path / "node-b")
    os.makedirs(node_b)
    with pytest.raises(UserFacingError) as refused:
        ray.get(_remote(clip_model.fetch_checkpoint, node_b).remote(ref, storage))
    message = str(refused.value)
    assert f"the CLIP checkpoint {remote_clip['url']} changed since the job started" in message
    assert "config key: clip.pretrained" in message
    assert _files(os.path.join(node_b, "unclip-checkpoints")) == []


def test_a_changed_size_or_a_missing_object_is_refused_before_downloading(
    remote_clip: dict, driver_tmp: str, monkeypatch, tmp_path
) -> None:
    storage = Storage()
    ref = clip_model.resolve_checkpoint(tiny_clip_source(remote_clip["url"]), storage, "")
    monkeypatch.setenv(clip_model.CACHE_ENV, str(tmp_path / "cache"))
    storage.write_bytes(remote_clip["url"], b"not the weights")
    with pytest.raises(UserFacingError, match=r"changed since the job started: it is now 15 byt"):
        clip_model.fetch_checkpoint(ref, storage)
    storage.remove(remote_clip["url"])
    with pytest.raises(UserFacingError, match=r"clip\.safetensors changed .*: it is gone"):
        clip_model.fetch_checkpoint(ref, storage)
    assert not os.path.exists(tmp_path / "cache" / (ref.sha256 + ".safetensors"))


class _CountingStorage:
    """A storage whose reads are counted and slow, so that concurrent fetches overlap."""

    def __init__(self) -> None:
        self.inner, self.opened = Storage(), 0

    def exists(self, url: str) -> bool:
        return self.inner.exists(url)

    def size(self, url: str) -> int:
        return self.inner.size(url)

    def open(self, url: str):
        self.opened += 1
        threading.Event().wait(0.3)
        return self.inner.open(url)


def test_actors_starting_together_on_one_node_download_once(
    remote_clip: dict, monkeypatch, tmp_path
) -> None:
    ref = clip_model.resolve_checkpoint(tiny_clip_source(remote_clip["url"]), Storage(), "")
    monkeypatch.setenv(clip_model.CACHE_ENV, str(tmp_path / "cache"))
    storage = _CountingStorage()
    paths: list[str] = []
    threads = [
        threading.Thread(target=lambda: paths.append(clip_model.fetch_checkpoint(ref, storage)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(paths) == 4 and len(set(paths)) == 1 and _sha256(paths[0]) == ref.sha256
    assert storage.opened == 1
    assert _files(str(tmp_path / "cache")) == [os.path.basename(paths[0])]


def test_embed_with_a_clip_on_s3_loads_it_on_the_actors(
    remote_clip: dict, driver_tmp: str, ray_local
) -> None:
    """The embed job with ``clip.pretrained`` on S3: the driver keeps no copy, the encoder actors
    fetch the pinned checkpoint into their node's cache, and the store is named by its sha256."""
    from conftest import Root
    from helpers import embed_cfg, write_synth

    from pipeline.embed.job import run_embedding

    root = Root("s3", f"{remote_clip['root']}/root", Storage())
    write_synth(root, 8, 8)
    summary = run_embedding(embed_cfg(root, remote_clip["url"]), root.storage)
    sha = _sha256(remote_clip["local"])
    assert summary["rows"] == 8 and summary["clip"] == f"tiny-clip--ckpt-{sha[:12]}"
    assert os.listdir(driver_tmp) == []  # nothing downloaded by the driver
    cache = os.path.join(os.environ["RAY_TMPDIR"], "checkpoints")  # the actors' (tests/conftest.py)
    assert f"{sha}.safetensors" in os.listdir(cache)
