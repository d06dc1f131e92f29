"""FSDP pieces that run without a process group (milliseconds): which modules are sharded on
their own, and the sharded checkpoint reader: DCP parts read back through the project's storage,
and a crafted ``.metadata`` refused instead of unpickled. Training under FSDP on 2 Ray workers is in
``test_train.py`` (``-k fsdp``)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from pipeline.errors import UserFacingError
from pipeline.storage import Storage
from pipeline.train import sharding


def test_fsdp_units_are_the_outermost_module_list_elements() -> None:
    inner = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    block = nn.Sequential(nn.Linear(2, 2), nn.Sequential(inner))
    model = nn.Module()
    model.blocks = nn.ModuleList([block, nn.ReLU(), nn.Linear(2, 2)])  # ReLU: no parameters
    model.head = nn.Linear(2, 2)
    units = sharding.shard_units(model)
    assert units == [block, model.blocks[2]]  # not the list inside a unit, not the ReLU


def test_fsdp_parts_load_through_storage_and_a_crafted_metadata_is_refused(tmp_path) -> None:
    state = {"model": {"w": torch.arange(12.0).reshape(3, 4)}, "step": torch.tensor(7)}
    folder = str(tmp_path / "parts")
    dcp.save(state, storage_writer=dcp.FileSystemWriter(folder))  # one process: no group needed
    loaded = {"model": {"w": torch.zeros(3, 4)}, "step": torch.tensor(0)}
    dcp.load(loaded, storage_reader=sharding.SafeMetadataReader(Storage(), folder))
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and int(loaded["step"]) == 7

    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with open(os.path.join(folder, ".metadata"), "wb") as handle:
        pickle.dump(Exploit(), handle)
    with pytest.raises(UserFacingError, match=r"parts/.metadata: refusing posix.system"):
        sharding.read_metadata(Storage(), folder)
    assert not (tmp_path / "pwned").exists()
