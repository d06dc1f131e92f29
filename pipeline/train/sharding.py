"""FSDP2 for stage training: which modules are sharded, checkpoints written in parts, the EMA
gathered for sampling.

Why: the paper's decoder (Ramesh et al. 2022, appendix C: 3.5B parameters) with AdamW and a float32
EMA needs about 70 GB per replica before activations, more than DDP fits on an 80 GB GPU. FSDP2
(``torch.distributed.fsdp.fully_shard``) keeps 1/W of every parameter, gradient, optimizer moment and
EMA on each of W workers and gathers a block's weights only while that block runs.

* :func:`shard` shards every element of the model's outermost ``nn.ModuleList`` s (the
  transformer's blocks, the U-Net's down, middle and up stages: the units one all-gather brings in
  at a time), then the whole model, and makes ``model.loss`` an FSDP forward method, so the loop
  calls it as it does unsharded. The optimizer and the EMA are built afterwards, on the shards.
* :func:`save_parts` writes a checkpoint's model, optimizer and EMA with ``torch.distributed
  .checkpoint`` (DCP): every rank writes its own shards into ``parts/`` and rank 0 the metadata;
  :func:`load_parts` reads them back on any number of workers (DCP reshards), straight from storage,
  each rank reading only the byte ranges it holds, and never unpickling anything but DCP's own
  metadata classes (:class:`SafeMetadataReader`).
* :func:`gathered` brings a sharded state dict to rank 0 one tensor at a time (CPU), for the
  checkpoint's ``ema.safetensors``, which sampling loads as it loads a DDP run's.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)

from pipeline.errors import UserFacingError
from pipeline.storage import Storage, join

PARTS = "parts"  # the checkpoint subfolder DCP writes


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded on their own: every element, holding parameters, of the outermost
    ``nn.ModuleList`` s (a ModuleList inside a chosen element is left to its element)."""
    units: list[nn.Module] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList):
            continue
        if any(name == t or name.startswith(t + ".") for t in taken):
            continue
        for index, child in enumerate(module):
            if any(True for _ in child.parameters()):
                units.append(child)
                taken.append(f"{name}.{index}" if name else str(index))
    return units


def shard(model: nn.Module, device: torch.device, *, bf16_params: bool = False) -> nn.Module:
    """Shard ``model`` in place over every worker of the default process group (FSDP2), and
    return it. ``bf16_params`` gathers the weights in bf16 for the forward and backward (half the
    communication and the unsharded memory) and reduces gradients in float32."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16_params
        else MixedPrecisionPolicy()
    )
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if hasattr(model, "loss"):
        register_fsdp_forward_method(model, "loss")
    return model


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Whether this backward reduces gradients across workers (off for all but a step's last
    micro-batch: they accumulate locally, as under DDP's ``no_sync``)."""
    model.set_requires_gradient_sync(sync)


def gathered(tensors: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Full CPU copies of ``tensors`` (sharded DTensors gathered; a collective, call on every rank)
    on rank 0, one tensor at a time so no rank holds more than one full tensor on its device; an
    empty dict elsewhere."""
    out: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        if rank == 0:
            out[name] = full.detach().to("cpu", copy=True)
        del full
    return out


# ----------------------------------------------------------------------------------------------
# Sharded checkpoints


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer, ema: Any) -> dict[str, Any]:
    model_state, optim_state = get_state_dict(model, optimizer)
    return {
        "model": model_state,
        "optimizer": optim_state,
        "ema": {"shadow": ema.shadow, "buffers": ema.buffers},
    }


def save_parts(
    folder: str, model: nn.Module, optimizer: torch.optim.Optimizer, ema: Any
) -> dict[str, int]:
    """Write this rank's shards of the model, optimizer and EMA under ``folder/parts`` (rank 0 also
    DCP's ``.metadata``; a collective). Returns {path relative to ``folder``: size} of the files
    this rank wrote: the ones it must upload."""
    target = os.path.join(folder, PARTS)
    os.makedirs(target, exist_ok=True)
    before = set(os.listdir(target))
    dcp.save(_dcp_state(model, optimizer, ema), storage_writer=dcp.FileSystemWriter(target))
    return {
        f"{PARTS}/{name}": os.path.getsize(os.path.join(target, name))
        for name in sorted(set(os.listdir(target)) - before)
    }


def upload_parts(
    storage: Storage,
    folder: str,
    url: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: Any,
) -> dict[str, int]:
    """:func:`save_parts` into the local ``folder``, upload this rank's files to the checkpoint
    folder ``url`` (each with the storage retries; a failure raises and fails the worker, so no
    marker is written), remove them locally, and gather every rank's: returns {path: size} of all
    parts, for the marker (a collective)."""
    mine = save_parts(folder, model, optimizer, ema)
    for relative in mine:
        storage.upload_file(os.path.join(folder, relative), join(url, relative))
    shutil.rmtree(os.path.join(folder, PARTS), ignore_errors=True)
    every: list[dict[str, int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return {name: size for part in every for name, size in (part or {}).items()}


def checkpoint_name() -> str:
    """A new checkpoint folder's name, made by rank 0 (Ray Train's style: by time) and agreed by
    every rank, which all write their parts there before the checkpoint is reported."""
    now = time.time()
    name = [
        time.strftime("checkpoint_%Y-%m-%d_%H-%M-%S", time.gmtime(now))
        + f".{int(now * 1e6) % 1_000_000:06d}"
    ]
    dist.broadcast_object_list(name, src=0)
    return name[0]


def load_parts(
    storage: Storage,
    checkpoint_url: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: Any,
) -> None:
    """Load a sharded checkpoint's model, optimizer and EMA into this rank's shards (a collective;
    any number of workers: DCP reshards), reading ``checkpoint_url/parts`` from storage."""
    url = join(checkpoint_url, PARTS)
    read_metadata(storage, url)  # a refused or unreadable index fails here, by name
    state = _dcp_state(model, optimizer, ema)
    dcp.load(state, storage_reader=SafeMetadataReader(storage, url))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
    )
    # the EMA's shadow and buffers were loaded in place (DCP fills the tensors it is given)


def read_metadata(storage: Storage, url: str) -> Metadata:
    """The DCP index of the sharded checkpoint parts at ``url``, read safely; a file that is not
    one, or that asks to unpickle anything else, is refused naming it."""
    try:
        return SafeMetadataReader(storage, url).read_metadata()
    except pickle.UnpicklingError as exc:
        raise UserFacingError(f"{join(url, '.metadata')}: {exc}") from None


_METADATA_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
)
_METADATA_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout by its name (torch.strided)
    ("pathlib", "PosixPath"),  # the checkpoint id DCP records
    ("torch._utils", "_rebuild_tensor_v2"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` (a pickle, by DCP's format) allowing only the classes that
    file is made of: DCP's metadata dataclasses, ``torch.Size``, torch dtypes and layouts and
    plain containers. Anything else (a crafted file's ``os.system``) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _METADATA_MODULES or (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype | torch.layout):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"refusing {module}.{name} in a checkpoint's DCP metadata: it holds only metadata"
        )


class _StorageFiles:
    """DCP's file-system interface (the read side) over :class:`pipeline.storage.Storage`: files
    are opened on storage and read by seeking, so a rank fetches only the byte ranges it loads."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    @contextlib.contextmanager
    def create_stream(self, path: str, mode: str) -> Iterator[io.IOBase]:
        if mode != "rb":
            raise ValueError(f"sharded checkpoints are read here, not written ({mode})")
        with self.storage.open(str(path), "rb") as handle:
            yield handle

    def concat_path(self, path: str, suffix: str) -> str:
        return join(str(path), suffix)

    def init_path(self, path: str, **kwargs: Any) -> str:
        return str(path)

    def exists(self, path: str) -> bool:
        return self.storage.exists(str(path))


class SafeMetadataReader(FileSystemReader):
    """A DCP storage reader for the sharded checkpoint at ``url``: through :class:`_StorageFiles`
    (local disk or object storage), with ``.metadata`` read by :class:`_MetadataUnpickler`."""

    def __init__(self, storage: Storage, url: str) -> None:
        super().__init__(url)
        self.fs = _StorageFiles(storage)
        self.path = url

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with self.fs.create_stream(join(self.path, ".metadata"), "rb") as handle:
            metadata = _MetadataUnpickler(io.BytesIO(handle.read())).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError("not DCP metadata")
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
