"""Stage checkpoints: what one holds, how it is written, and how readers find the latest whole one.

A checkpoint is a folder (Ray Train persists it as ``<root>/checkpoints/<run>/checkpoint_<time>/``)::

    model.safetensors      the stage model's weights (DDP runs)
    parts/                 FSDP runs, instead of model.safetensors and optimizer.pt: every rank's
                           shards of the model, AdamW and EMA (torch.distributed.checkpoint)
    ema.safetensors        the EMA of those weights (what sampling uses), float32
    optimizer.pt           AdamW state (tensors and numbers only; loaded with weights_only=True)
    state.json             step, schedule, EMA counters, fp16 loss scale, samples seen, the stage
    config.yaml            the stage config that trained it
    samples.png, loss.png  a grid of EMA samples (image stages) and the loss curve so far
    checkpoint.json        written last: the step and every file's size

Nothing is unpickled on load. A checkpoint counts only when ``checkpoint.json`` is present and every
file it lists has its size, so one whose upload was interrupted is never picked up, by the resuming
run or by sampling and evaluation (:func:`latest_checkpoint`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import UserFacingError
from pipeline.storage import Storage, StorageError, StorageNotFoundError, basename, join

MARKER = "checkpoint.json"
FORMAT_VERSION = 1


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share memory (tied weights): store independent copies
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def write_local(
    folder: str,
    *,
    model_state: dict[str, torch.Tensor] | None,
    ema_state: dict[str, torch.Tensor] | None,
    optimizer_state: dict[str, Any] | None,
    state: dict[str, Any],
    config_yaml: str,
    extra_files: dict[str, bytes] | None = None,
    parts: dict[str, int] | None = None,
) -> None:
    """Write a checkpoint into a local folder (Ray Train then persists it); the marker goes last.

    A sharded (FSDP) checkpoint has no ``model_state`` or ``optimizer_state``: its ``parts``
    (``parts/...`` by size, :mod:`pipeline.train.sharding`) were uploaded by every rank before
    this, and the marker lists them with the folder's own files, so the checkpoint counts only
    when every rank's part is whole."""
    os.makedirs(folder, exist_ok=True)
    if model_state is not None:
        save_file(_contiguous(model_state), os.path.join(folder, "model.safetensors"))
    if ema_state is not None:
        save_file(_contiguous(ema_state), os.path.join(folder, "ema.safetensors"))
    if optimizer_state is not None:
        torch.save(optimizer_state, os.path.join(folder, "optimizer.pt"))
    with open(os.path.join(folder, "state.json"), "w") as handle:
        json.dump(state, handle, indent=2, sort_keys=True)
    with open(os.path.join(folder, "config.yaml"), "w") as handle:
        handle.write(config_yaml)
    for name, data in (extra_files or {}).items():
        with open(os.path.join(folder, name), "wb") as handle:
            handle.write(data)
    files = {
        name: os.path.getsize(os.path.join(folder, name))
        for name in sorted(os.listdir(folder))
        if name != MARKER and os.path.isfile(os.path.join(folder, name))
    }
    files.update(parts or {})
    marker = {"format_version": FORMAT_VERSION, "step": state["step"], "files": files}
    with open(os.path.join(folder, MARKER), "w") as handle:
        json.dump(marker, handle, indent=2)


def upload(storage: Storage, folder: str, url: str) -> None:
    """Persist a local checkpoint folder at ``url``: every file atomically and with the storage
    retries, the marker last. If any upload still fails this raises and the marker is never
    written, so the folder never counts as a checkpoint (Ray Train's own copy, pyarrow's
    ``copy_files``, was seen to lose a file whose multipart upload kept failing and report the
    checkpoint as saved)."""
    names = sorted(os.listdir(folder))
    for name in names:
        if name != MARKER:
            storage.upload_file(os.path.join(folder, name), join(url, name))
    storage.upload_file(os.path.join(folder, MARKER), join(url, MARKER))


def is_complete_local(folder: str) -> bool:
    """Whether a local checkpoint folder is whole (marker present, every listed size right)."""
    try:
        with open(os.path.join(folder, MARKER)) as handle:
            marker = json.load(handle)
        return all(
            os.path.getsize(os.path.join(folder, name)) == size
            for name, size in marker["files"].items()
        )
    except (OSError, ValueError, KeyError):
        return False


def read_local(folder: str) -> dict[str, Any]:
    """Load a local checkpoint folder: tensors via safetensors, the optimizer with weights_only."""
    if not is_complete_local(folder):
        raise UserFacingError(f"checkpoint {folder} is incomplete (its write was interrupted)")
    out: dict[str, Any] = {"model": load_file(os.path.join(folder, "model.safetensors"))}
    ema_path = os.path.join(folder, "ema.safetensors")
    out["ema"] = load_file(ema_path) if os.path.exists(ema_path) else None
    opt_path = os.path.join(folder, "optimizer.pt")
    out["optimizer"] = (
        torch.load(opt_path, map_location="cpu", weights_only=True)
        if os.path.exists(opt_path)
        else None
    )
    with open(os.path.join(folder, "state.json")) as handle:
        out["state"] = json.load(handle)
    with open(os.path.join(folder, "config.yaml")) as handle:
        out["config_yaml"] = handle.read()
    return out


def read(storage: Storage, url: str) -> dict[str, Any]:
    """The checkpoint at ``url`` as :func:`read_local` returns it, read by this process alone: the
    files its marker lists are streamed (with the storage retries) into a private temporary folder.
    Ray's ``Checkpoint.as_directory`` shares one download folder between a node's workers, and a
    resumed worker was seen reading an ``optimizer.pt`` of the right size and broken contents."""
    marker = storage.read_json(join(url, MARKER))
    with tempfile.TemporaryDirectory(prefix="unclip-resume-") as folder:
        for name in [*marker["files"], MARKER]:
            path = os.path.join(folder, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with storage.open(join(url, name)) as src, open(path, "wb") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
        return read_local(folder)


# ----------------------------------------------------------------------------------------------
# Readers outside Ray Train (sampling, evaluation, embedding with a trained CLIP)


def list_checkpoints(storage: Storage, run_url: str) -> list[tuple[int, str]]:
    """(step, url) of every whole checkpoint under a run folder, by step."""
    found = []
    for url in storage.list(run_url):
        if not basename(url).startswith("checkpoint_"):
            continue
        marker_url = join(url, MARKER)
        if not storage.exists(marker_url):
            continue
        try:
            marker = storage.read_json(marker_url)
            whole = all(storage.size(join(url, n)) == s for n, s in marker["files"].items())
        except (StorageNotFoundError, KeyError, TypeError, ValueError):
            whole = False  # a file missing or a marker malformed: an upload cut short
        except StorageError as exc:
            if exc.transient:  # unreadable now is not "incomplete": never fall back silently
                raise
            whole = False
        if whole:
            found.append((int(marker["step"]), url))
    return sorted(found)


def latest_checkpoint(storage: Storage, url: str) -> str:
    """The checkpoint folder named by ``url``: itself if it is a checkpoint, else the latest whole
    checkpoint of the run folder ``url``."""
    if storage.exists(join(url, MARKER)):
        return url
    found = list_checkpoints(storage, url)
    if not found:
        raise UserFacingError(f"no complete checkpoint under {url} (train that stage first)")
    return found[-1][1]
