"""Loading an open_clip model from a :class:`ClipSource`, and naming it.

A CLIP comes from an open_clip model name with a pretrained tag (``ViT-L-14`` + ``laion2b_s32b_b82k``),
a local or ``s3://`` checkpoint (``.safetensors``, or a ``.pt`` loaded with ``weights_only=True``), or a
model-config JSON that registers a custom architecture (the tests' tiny CLIP, or one that
``unclip train-clip`` trained). Its *identity* names the embedding store: the model and tag, or the
model and the checkpoint's sha256, so embeddings of two different CLIPs never share a store.

A checkpoint on object storage reaches the processes that load it (actors on any node) as a
:class:`CheckpointRef`: the driver hashes the object while streaming it and keeps no copy
(:func:`resolve_checkpoint`); each process fetches it into its node's cache, checked against that
hash (:func:`fetch_checkpoint`), so all of them load exactly the weights the job was planned with.

Image preprocessing is the model's own (open_clip's validation transform), split in two: the resize
and crop run where images are decoded (Ray Data read tasks, on CPU), the tensor conversion and
normalisation where the model runs (the encoder actor, on GPU when present). Together they compute
exactly what open_clip's transform computes.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import PROJECT_ROOT
from pipeline.errors import UserFacingError
from pipeline.stage_config import ClipSource
from pipeline.storage import Storage, is_local


@dataclass(frozen=True)
class ClipIdentity:
    """What the embedding store records about the CLIP that made it."""

    id: str  # the store's folder name
    model: str
    pretrained: str | None  # tag, or None for a checkpoint / random weights
    checkpoint_sha256: str | None
    model_config_sha256: str | None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def is_checkpoint_path(pretrained: str) -> bool:
    """Whether a ``pretrained`` value names a checkpoint file rather than an open_clip tag."""
    return "/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))


def _model_config_path(path: str) -> str | None:
    """A local file for a model-config JSON given as a path (relative to the working directory or,
    as on Ray workers whose working directory differs, to the project root) or an ``s3://`` URL."""
    if "://" in path and not path.startswith("file://"):
        storage = Storage()
        if not storage.exists(path):
            return None
        local = os.path.join(tempfile.mkdtemp(prefix="unclip-clipcfg-"), os.path.basename(path))
        with open(local, "wb") as handle:
            handle.write(storage.read_bytes(path))
        return local
    path = path[len("file://") :] if path.startswith("file://") else path
    candidates = [path]
    if not os.path.isabs(path):
        candidates.append(os.path.join(PROJECT_ROOT, path))
    return next((c for c in candidates if os.path.exists(c)), None)


def register_model_config(source: ClipSource) -> None:
    """Register ``source.model_config`` with open_clip (a JSON file named after the model)."""
    if not source.model_config:
        return
    import open_clip

    path = _model_config_path(source.model_config)
    if path is None:
        raise UserFacingError(
            f"CLIP model config {source.model_config} does not exist (config key: clip.model_config)"
        )
    name = os.path.splitext(os.path.basename(path))[0]
    if name != source.model:
        raise UserFacingError(
            f"clip.model_config {source.model_config} registers the model {name!r}, but clip.model "
            f"is {source.model!r}"
        )
    open_clip.add_model_config(path)


def checkpoint_url(source: ClipSource, storage: Storage, root: str) -> str | None:
    """The URL of the weights file ``source.pretrained`` names, or None when it is an open_clip
    tag or unset. Relative paths are under the stage's root; a checkpoint folder (a train-clip run)
    resolves to its latest committed checkpoint's weights."""
    if not source.pretrained or not is_checkpoint_path(source.pretrained):
        return None
    from pipeline.storage import resolve

    url = resolve(root, source.pretrained)
    if storage.isdir(url):
        url = latest_clip_weights(storage, url)
    if not storage.exists(url):
        raise UserFacingError(f"CLIP checkpoint {url} does not exist (config key: clip.pretrained)")
    if is_local(url) and not url.startswith("file://"):
        url = os.path.abspath(url)
    return url


def located(source: ClipSource, storage: Storage, root: str) -> dict[str, str | None]:
    """``source`` with absolute locations (the weights file, the model config), for a manifest:
    whoever reads the store later (generation, evaluation) loads the same CLIP without being told.
    """
    config = source.model_config
    if config and "://" not in config:
        config = _model_config_path(config) or config
        config = os.path.abspath(config)
    pretrained = checkpoint_url(source, storage, root) or source.pretrained
    return {"model": source.model, "pretrained": pretrained, "model_config": config}


@dataclass(frozen=True)
class CheckpointRef:
    """A CLIP checkpoint on object storage, pinned by its content: what a driver hands to
    processes on other nodes instead of a path on its own disk (picklable, a few bytes).

    Each process gets a local copy with :func:`fetch_checkpoint`, which refuses an object whose
    content is no longer ``sha256``, so every actor of a job loads the weights the job was
    planned with (and named its embedding store after).
    """

    url: str
    sha256: str
    size: int


# A checkpoint as the driver resolved it: a local path (usable as is on this node), or a ref.
Checkpoint = str | CheckpointRef

CACHE_ENV = "UNCLIP_CHECKPOINT_CACHE"


def checkpoint_ref(storage: Storage, url: str) -> CheckpointRef:
    """Hash the object at ``url`` by streaming it, writing nothing to disk."""
    digest = hashlib.sha256()
    size = 0
    with storage.open(url) as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
            size += len(chunk)
    return CheckpointRef(url, digest.hexdigest(), size)


def resolve_checkpoint(source: ClipSource, storage: Storage, root: str) -> Checkpoint | None:
    """The checkpoint ``source.pretrained`` names, for the job's driver: a local path for a file
    on this machine (loaded where it lies, as before), a :class:`CheckpointRef` for one on object
    storage (hashed while streamed, with no local copy: the processes that load it fetch it with
    :func:`fetch_checkpoint`), or None for an open_clip tag or unset (:func:`checkpoint_url`)."""
    url = checkpoint_url(source, storage, root)
    if url is None:
        return None
    if is_local(url):
        return url[len("file://") :] if url.startswith("file://") else url
    return checkpoint_ref(storage, url)


def checkpoint_cache_dir() -> str:
    """This node's checkpoint cache: ``$UNCLIP_CHECKPOINT_CACHE``, else ``unclip-checkpoints``
    under the process's temp dir (``tempfile.gettempdir()``, which follows ``TMPDIR``)."""
    return os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), "unclip-checkpoints")


def fetch_checkpoint(checkpoint: Checkpoint, storage: Storage | None = None) -> str:
    """A local path to ``checkpoint``, callable in any process on any node.

    A path is returned as is. A :class:`CheckpointRef` is downloaded once per node into
    :func:`checkpoint_cache_dir`, named by its sha256 (so a cached copy is reused by every later
    process and job), through a temporary name renamed into place only after its hash is checked,
    so a file under the final name is always a verified one. The actors starting together on one
    node take turns (a file lock): the first downloads, the others find its copy. An object that
    changed since the driver hashed it is refused, naming its URL. ``storage`` reaches the object
    (None: the default options, from the environment).
    """
    if isinstance(checkpoint, str):
        return checkpoint[len("file://") :] if checkpoint.startswith("file://") else checkpoint
    ref = checkpoint
    suffix = os.path.splitext(ref.url)[1] or ".bin"  # open_clip picks the loader by suffix
    target = os.path.join(checkpoint_cache_dir(), ref.sha256 + suffix)
    if _cached(target, ref):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if not _cached(target, ref):
            _download(ref, storage or Storage(), target)
    return target


def _cached(target: str, ref: CheckpointRef) -> bool:
    return os.path.exists(target) and os.path.getsize(target) == ref.size


def _download(ref: CheckpointRef, storage: Storage, target: str) -> None:
    """``ref``'s object to ``target``, atomically, if its content is still ``ref.sha256``."""
    if not storage.exists(ref.url):
        raise _changed(ref, "it is gone")
    size = storage.size(ref.url)
    if size != ref.size:
        raise _changed(ref, f"it is now {size} bytes, not {ref.size}")
    digest = hashlib.sha256()
    with Storage().open_atomic(target) as out, storage.open(ref.url) as src:
        while chunk := src.read(8 << 20):
            digest.update(chunk)
            out.write(chunk)
        if digest.hexdigest() != ref.sha256:  # raising here removes the temporary copy
            raise _changed(ref, f"its sha256 is now {digest.hexdigest()[:12]}...")


def _changed(ref: CheckpointRef, how: str) -> UserFacingError:
    return UserFacingError(
        f"the CLIP checkpoint {ref.url} changed since the job started: {how}, but the job "
        f"started with sha256 {ref.sha256[:12]}... (config key: clip.pretrained); rerun the job "
        "to use the new weights, or put the old ones back"
    )


def latest_clip_weights(storage: Storage, run_url: str) -> str:
    """The open_clip weights (``clip.safetensors``) of a train-clip run's latest whole checkpoint."""
    from pipeline.storage import join
    from pipeline.train.checkpoints import latest_checkpoint

    weights = join(latest_checkpoint(storage, run_url), "clip.safetensors")
    if not storage.exists(weights):
        raise UserFacingError(
            f"{run_url} is not a train-clip run: its checkpoint has no clip.safetensors"
        )
    return weights


def identity(source: ClipSource, checkpoint: Checkpoint | None) -> ClipIdentity:
    """The CLIP's identity: model + tag, or model + checkpoint hash (+ config hash). A
    :class:`CheckpointRef` carries its hash; a local path is hashed here."""
    config_path = _model_config_path(source.model_config) if source.model_config else None
    config_sha = _sha256_file(config_path)[:12] if config_path else None
    if checkpoint:
        if isinstance(checkpoint, CheckpointRef):
            sha = checkpoint.sha256
        else:
            sha = _sha256_file(fetch_checkpoint(checkpoint))
        ident = f"{source.model}--ckpt-{sha[:12]}"
        return ClipIdentity(ident, source.model, None, sha, config_sha)
    if source.pretrained:
        ident = f"{source.model}--{source.pretrained}"
        return ClipIdentity(ident, source.model, source.pretrained, None, config_sha)
    ident = f"{source.model}--random" + (f"-{config_sha}" if config_sha else "")
    return ClipIdentity(ident, source.model, None, None, config_sha)


def safe_id(ident: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", ident)


@dataclass
class LoadedClip:
    model: Any  # open_clip.CLIP
    tokenizer: Any
    image_transform: Any  # PIL image -> PIL image (resize + crop), the model's own
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    context_length: int
    embed_dim: int


def require_model(source: ClipSource) -> None:
    """Register ``source.model_config`` and check that open_clip knows ``source.model``."""
    import open_clip

    register_model_config(source)
    if source.model not in open_clip.list_models():
        raise UserFacingError(
            f"unknown open_clip model {source.model!r} (config key: clip.model); "
            "give clip.model_config for a custom architecture"
        )


def image_size_of(model_config: dict[str, Any]) -> int:
    """The square input side of an open_clip model config."""
    size = model_config["vision_cfg"]["image_size"]
    return size[0] if isinstance(size, list | tuple) else int(size)


def split_preprocess(
    preprocess: Any, model: str
) -> tuple[Any, tuple[float, ...], tuple[float, ...]]:
    """open_clip's transform as (the PIL steps: resize, crop, RGB; mean; std): the PIL steps run
    where images are decoded, the tensor conversion and normalisation where the model runs."""
    from torchvision import transforms as T

    steps = list(preprocess.transforms)
    normalize = steps[-1]
    if not isinstance(normalize, T.Normalize) or "ToTensor" not in type(steps[-2]).__name__:
        raise UserFacingError(f"unexpected preprocessing for {model}: {preprocess}")
    return (
        T.Compose(steps[:-2]),
        tuple(float(m) for m in normalize.mean),
        tuple(float(v) for v in normalize.std),
    )


def load_clip(
    source: ClipSource,
    checkpoint: Checkpoint | None,
    device: str = "cpu",
    storage: Storage | None = None,
) -> LoadedClip:
    """Build the open_clip model, its tokenizer and its preprocessing, in eval mode.

    ``checkpoint`` is what :func:`resolve_checkpoint` gave the driver: a local path, a
    :class:`CheckpointRef` (fetched into this node's cache through ``storage``, see
    :func:`fetch_checkpoint`), or None for ``source.pretrained``'s open_clip tag."""
    import open_clip
    import torch

    require_model(source)
    pretrained = fetch_checkpoint(checkpoint, storage) if checkpoint else source.pretrained
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            source.model, pretrained=pretrained, device=device, weights_only=True
        )
    except RuntimeError as exc:
        raise UserFacingError(f"cannot load CLIP {source.model} from {pretrained}: {exc}") from None
    model.eval().requires_grad_(False)
    image_transform, mean, std = split_preprocess(preprocess, source.model)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, tuple | list) else int(image_size)
    tokenizer = open_clip.get_tokenizer(source.model)
    with torch.no_grad():
        embed_dim = int(model.encode_text(tokenizer(["x"]).to(device)).shape[-1])
    return LoadedClip(
        model=model,
        tokenizer=tokenizer,
        image_transform=image_transform,
        mean=mean,
        std=std,
        image_size=image_size,
        context_length=int(tokenizer.context_length),
        embed_dim=embed_dim,
    )


_TOKENIZERS: dict[str, Any] = {}


def tokenizer(source: ClipSource) -> Any:
    """``source``'s open_clip tokenizer, made once per process (Ray Data calls this per batch)."""
    if source.model not in _TOKENIZERS:
        import open_clip

        register_model_config(source)
        _TOKENIZERS[source.model] = open_clip.get_tokenizer(source.model)
    return _TOKENIZERS[source.model]


def prepare_image(image_transform: Any, image: Any) -> np.ndarray:
    """A PIL image → the model's resized, cropped RGB pixels, uint8 (H, W, 3)."""
    return np.asarray(image_transform(image.convert("RGB")), dtype=np.uint8)
