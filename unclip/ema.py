"""Exponential moving average (EMA) of a model's weights, used for sampling.

Why: diffusion models sample noticeably better from an EMA of their weights than from the raw,
noisy final iterate (Ho et al. 2020 §4 use decay 0.9999; Nichol & Dhariwal 2021 and GLIDE do the
same), and the unCLIP paper trains every diffusion stage so: Ramesh et al. 2022, appendix C, table 3
lists EMA decay 0.9999 for the prior, the decoder and both upsamplers. The trainer updates the
average after each optimizer step and checkpoints it; generation loads the averaged weights.

The average is kept in float32 whatever the model trains in: with decay 0.9999 each update moves the
average by 1e-4 of the difference, far below bf16's resolution (8 bits of mantissa), so a bf16 average
would simply stop moving.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["EMA", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel and ``torch.compile`` wrappers.

    FSDP2 (``fully_shard``) modules are their own underlying module and are returned as they are.
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            return model


def _is_sharded(module: nn.Module) -> bool:
    """True for FSDP-managed modules: deep copies are refused there and parameters are shards."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    if any(isinstance(p, DTensor) for p in module.parameters()):
        return True
    return any(
        type(m).__name__ in ("FullyShardedDataParallel", "FSDPModule")
        or any(base.__name__ == "FSDPModule" for base in type(m).__mro__)
        for m in module.modules()
    )


def _float32(tensor: Tensor) -> Tensor:
    """A detached copy, upcast to float32 when the tensor is a lower-precision float."""
    tensor = tensor.detach()
    if tensor.is_floating_point() and tensor.element_size() < 4:
        return tensor.to(torch.float32, copy=True)
    return tensor.clone()


class EMA:
    """An exponential moving average of a module's parameters; buffers are copied.

    ``update(model, step)``: for ``step < start_step`` the average is set to the weights (so the
    average does not start from the random initialisation); afterwards, every ``update_every`` steps
    (``step % update_every == 0``), shadow ← decay·shadow + (1 − decay)·param, in float32. Buffers
    (e.g. normalisation statistics) are copied at each update.

    Pass the module itself (DDP / ``torch.compile`` wrappers are unwrapped here); build the EMA after
    the model is on its device, the average lives there too. For an ordinary module the average is
    held by :attr:`ema_model`, a deep copy (eval mode, ``requires_grad`` False, float32 parameters).
    For an FSDP-sharded module (FSDP2 ``fully_shard`` DTensor parameters, or the inner module of
    FSDP1) deep copies are impossible: the average is kept per parameter shard (the update is
    elementwise, so each rank averages its own shard), :attr:`ema_model` is unavailable, and
    :meth:`averaged_state_dict` gathers full tensors to load into an unsharded model for sampling.

    :meth:`state_dict` / :meth:`load_state_dict` include the step and update counters, so a resumed
    run continues the same average.
    """

    def __init__(
        self, model: nn.Module, decay: float, *, update_every: int = 1, start_step: int = 0
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if update_every < 1:
            raise ValueError(f"update_every must be at least 1, got {update_every}")
        if start_step < 0:
            raise ValueError(f"start_step must be non-negative, got {start_step}")
        self.decay = float(decay)
        self.update_every = int(update_every)
        self.start_step = int(start_step)
        self.step = -1  # the last step passed to update()
        self.num_updates = 0  # averaging updates applied (copies before start_step not counted)
        module = unwrap_model(model)
        self._state_keys = list(module.state_dict().keys())
        self._ema_model: nn.Module | None = None
        self._shadow: dict[str, Tensor] = {}
        self._buffers: dict[str, Tensor] = {}
        if _is_sharded(module):
            self._shadow = {n: _float32(p) for n, p in module.named_parameters()}
            self._buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
        else:
            ema_model = copy.deepcopy(module)
            ema_model.eval()
            ema_model.requires_grad_(False)
            for param in ema_model.parameters():
                if param.is_floating_point() and param.element_size() < 4:
                    param.data = param.data.to(torch.float32)
            self._ema_model = ema_model  # its parameters are the shadow: no second set of weights

    @property
    def shadow(self) -> dict[str, Tensor]:
        """The averaged parameters by name (float32 where the model's are lower precision)."""
        if self._ema_model is None:
            return self._shadow
        return {n: p.detach() for n, p in self._ema_model.named_parameters()}

    @property
    def buffers(self) -> dict[str, Tensor]:
        """The copied buffers by name."""
        if self._ema_model is None:
            return self._buffers
        return {n: b.detach() for n, b in self._ema_model.named_buffers()}

    # -- the average ---------------------------------------------------------------------------

    @property
    def ema_model(self) -> nn.Module:
        """The averaged model (eval mode, no gradients), on the model's device, for sampling."""
        if self._ema_model is None:
            raise RuntimeError(
                "the EMA of an FSDP-sharded model has no module copy: load averaged_state_dict() "
                "into an unsharded model, or copy_to() a model to sample from"
            )
        return self._ema_model

    def _pairs(
        self, model: nn.Module
    ) -> tuple[list[tuple[Tensor, Tensor]], list[tuple[Tensor, Tensor]]]:
        module = unwrap_model(model)
        params = dict(module.named_parameters())
        buffers = dict(module.named_buffers())
        shadow, shadow_buffers = self.shadow, self.buffers
        if params.keys() != shadow.keys() or buffers.keys() != shadow_buffers.keys():
            raise ValueError("the model's parameters or buffers differ from the EMA's")
        return (
            [(shadow[n], p.detach()) for n, p in params.items()],
            [(shadow_buffers[n], b.detach()) for n, b in buffers.items()],
        )

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> bool:
        """Fold ``model``'s current weights into the average after optimizer step ``step`` (default:
        the previous step + 1). Returns True when the average changed (a copy or an update)."""
        step = self.step + 1 if step is None else int(step)
        self.step = step
        params, buffers = self._pairs(model)
        if step < self.start_step:
            for shadow, param in params:
                shadow.copy_(param)
        elif step % self.update_every == 0:
            weight = 1.0 - self.decay
            for shadow, param in params:
                if shadow.is_floating_point():
                    shadow.lerp_(param.to(shadow.dtype), weight)
                else:
                    shadow.copy_(param)
            self.num_updates += 1
        else:
            return False
        for shadow, buffer in buffers:
            shadow.copy_(buffer)
        return True

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters and buffers with the average (cast to its dtypes)."""
        params, buffers = self._pairs(model)
        for shadow, param in params + buffers:
            param.copy_(shadow)

    def averaged(self) -> dict[str, Tensor]:
        """The average by ``model.state_dict()`` key, as held: shards of a sharded model."""
        values = {**self.shadow, **self.buffers}
        return {key: values[key] for key in self._state_keys}

    def averaged_state_dict(self) -> dict[str, Tensor]:
        """The average as a ``model.state_dict()``-style dict (same keys), full tensors (sharded
        FSDP2 parameters are gathered: call it on every rank), float32 parameters."""
        out = {}
        for key, value in self.averaged().items():
            full_tensor = getattr(value, "full_tensor", None)
            out[key] = full_tensor() if callable(full_tensor) else value
        return out

    # -- checkpointing -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the same average: shadow, buffers and counters (the
        tensors are references, as ``nn.Module.state_dict``)."""
        return {
            "shadow": self.shadow,
            "buffers": self.buffers,
            "step": self.step,
            "num_updates": self.num_updates,
            "decay": self.decay,
            "update_every": self.update_every,
            "start_step": self.start_step,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s average and counters. ``decay``, ``update_every`` and
        ``start_step`` stay as constructed (the resumed run's config decides them)."""
        shadow, buffers = self.shadow, self.buffers
        if state["shadow"].keys() != shadow.keys() or state["buffers"].keys() != buffers.keys():
            raise ValueError("EMA state does not match the model's parameters and buffers")
        for name, tensor in state["shadow"].items():
            shadow[name].copy_(tensor)
        for name, tensor in state["buffers"].items():
            buffers[name].copy_(tensor)
        self.step = int(state["step"])
        self.num_updates = int(state["num_updates"])
