"""The weight EMA: closed-form averages, start_step copies, update_every, checkpoint round trips,
a float32 average for a bf16 model, buffers, and DDP / FSDP2 modules."""

from __future__ import annotations

import io
import socket

import pytest
import torch
from torch import nn

from unclip.ema import EMA, unwrap_model


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def set_params(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_constant_parameter_reaches_the_closed_form() -> None:
    """Shadow s₀ = w₀ and a constant parameter c: after n updates s = c + (w₀ − c)·decayⁿ."""
    model = small_model()
    initial = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    decay, c, n = 0.9, 0.5, 7
    ema = EMA(model, decay)
    set_params(model, c)
    for step in range(n):
        assert ema.update(model, step)
    assert ema.num_updates == n and ema.step == n - 1
    for name, shadow in ema.shadow.items():
        expected = c + (initial[name] - c) * decay**n
        torch.testing.assert_close(shadow.double(), expected, rtol=0, atol=1e-6)
    # The parameters themselves are untouched.
    assert all(torch.all(p == c) for p in model.parameters())


def test_update_every_and_default_step_counter() -> None:
    model = small_model()
    set_params(model, 0.0)
    ema = EMA(model, 0.5, update_every=3)
    set_params(model, 1.0)
    changed = [ema.update(model) for _ in range(9)]  # steps 0..8: updates at 0, 3 and 6
    assert changed == [True, False, False] * 3
    assert ema.num_updates == 3 and ema.step == 8
    for shadow in ema.shadow.values():
        torch.testing.assert_close(shadow, torch.full_like(shadow, 1 - 0.5**3))


def test_start_step_copies_the_weights() -> None:
    model = small_model()
    ema = EMA(model, 0.99, start_step=5)
    for step in range(5):
        set_params(model, float(step))
        assert ema.update(model, step)
        for shadow in ema.shadow.values():
            assert torch.all(shadow == float(step))  # exact copies before start_step
    assert ema.num_updates == 0
    set_params(model, 10.0)
    ema.update(model, 5)  # the first averaging update starts from the copied weights (4.0)
    assert ema.num_updates == 1
    for shadow in ema.shadow.values():
        torch.testing.assert_close(shadow, torch.full_like(shadow, 0.99 * 4.0 + 0.01 * 10.0))


def test_ema_model_is_an_eval_copy_and_buffers_are_copied() -> None:
    model = small_model()
    ema = EMA(model, 0.9)
    ema_model = ema.ema_model
    assert ema_model is not model and not ema_model.training
    assert all(not p.requires_grad for p in ema_model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert next(ema_model.parameters()).device == next(model.parameters()).device
    # A training forward changes BatchNorm's running statistics: the EMA copies them.
    model.train()
    model(torch.randn(16, 4))
    ema.update(model, 0)
    torch.testing.assert_close(ema_model[1].running_mean, model[1].running_mean)
    assert int(ema_model[1].num_batches_tracked) == 1
    # The shadow is the copy's parameters (no second set of weights).
    assert ema.shadow["0.weight"].data_ptr() == ema_model[0].weight.data_ptr()


def test_state_dict_round_trip_continues_identically() -> None:
    model = small_model(seed=1)
    ema = EMA(model, 0.95, update_every=2, start_step=3)

    def perturb(target: nn.Module, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in target.parameters():
                p.add_(torch.randn(p.shape, generator=g))

    for step in range(7):
        perturb(model, step)
        ema.update(model, step)
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)

    other_model = small_model(seed=3)  # different weights: everything must come from the state
    other_model.load_state_dict(model.state_dict())
    resumed = EMA(other_model, 0.95, update_every=2, start_step=3)
    resumed.load_state_dict(state)
    assert (resumed.step, resumed.num_updates) == (ema.step, ema.num_updates) == (6, 2)
    for step in range(7, 15):
        perturb(model, step)
        perturb(other_model, step)
        ema.update(model)
        resumed.update(other_model)
    assert resumed.num_updates == ema.num_updates == 6
    for name, shadow in ema.shadow.items():
        assert torch.equal(resumed.shadow[name], shadow), name


def test_bf16_model_keeps_a_float32_average() -> None:
    """decay 0.999: each update moves the average by 1e-3 of the gap, below bf16's resolution
    near 1 (2⁻⁷ ≈ 0.008), so only a float32 average follows the closed form."""
    model = nn.Linear(16, 16).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(1.0)
    ema = EMA(model, 0.999)
    assert all(s.dtype == torch.float32 for s in ema.shadow.values())
    assert ema.ema_model.weight.dtype == torch.float32
    set_params(model, 2.0)
    n = 200
    for step in range(n):
        ema.update(model, step)
    expected = 2.0 + (1.0 - 2.0) * 0.999**n  # ≈ 1.181
    for shadow in ema.shadow.values():
        torch.testing.assert_close(
            shadow.double(), torch.full_like(shadow.double(), expected), rtol=0, atol=1e-5
        )
    # A bf16 average would not have moved at all.
    stalled = torch.tensor(1.0, dtype=torch.bfloat16)
    for _ in range(n):
        stalled = stalled.lerp(torch.tensor(2.0, dtype=torch.bfloat16), 0.001)
    assert abs(stalled.item() - expected) > 0.1
    # copy_to casts the average back into the bf16 model.
    target = nn.Linear(16, 16).to(torch.bfloat16)
    ema.copy_to(target)
    assert target.weight.dtype == torch.bfloat16
    assert target.weight[0, 0].item() == pytest.approx(expected, abs=0.01)


def test_rejects_bad_arguments_and_mismatched_models() -> None:
    model = small_model()
    with pytest.raises(ValueError):
        EMA(model, 1.0)
    with pytest.raises(ValueError):
        EMA(model, 0.9, update_every=0)
    ema = EMA(model, 0.9)
    with pytest.raises(ValueError, match="differ"):
        ema.update(nn.Linear(4, 8), 0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def process_group():
    """A one-process gloo group (DDP and FSDP2 on the CPU)."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        yield dist
    finally:
        dist.destroy_process_group()


def test_ddp_and_fsdp2_modules(process_group) -> None:
    # DDP: the wrapper is unwrapped, parameter names have no "module." prefix.
    model = small_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    assert unwrap_model(ddp) is model
    ema = EMA(ddp, 0.5)
    assert set(ema.shadow) == {n for n, _ in model.named_parameters()}
    set_params(model, 1.0)
    initial = {n: s.clone() for n, s in ema.shadow.items()}
    ema.update(ddp, 0)
    for name, shadow in ema.shadow.items():
        torch.testing.assert_close(shadow, 0.5 * initial[name] + 0.5)

    # FSDP2: no deep copy (FSDP refuses it); the average is kept on the DTensor shards.
    fully_shard = pytest.importorskip("torch.distributed.fsdp").fully_shard
    from torch.distributed.tensor import DTensor

    sharded = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    reference = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    reference.load_state_dict(sharded.state_dict())
    fully_shard(sharded)
    ema = EMA(sharded, 0.8)
    assert all(isinstance(s, DTensor) for s in ema.shadow.values())
    with pytest.raises(RuntimeError, match="FSDP"):
        _ = ema.ema_model
    initial = {n: p.detach().clone() for n, p in reference.named_parameters()}
    set_params(sharded, 3.0)
    for step in range(4):
        ema.update(sharded, step)
    averaged = ema.averaged_state_dict()
    assert set(averaged) == set(reference.state_dict())
    reference.load_state_dict(averaged)
    for name, param in reference.named_parameters():
        torch.testing.assert_close(param.detach(), 3.0 + (initial[name] - 3.0) * 0.8**4)
    # And a resumed sharded EMA continues from the saved shards.
    resumed = EMA(sharded, 0.8)
    resumed.load_state_dict(ema.state_dict())
    ema.update(sharded, 4)
    resumed.update(sharded, 4)
    for name, shadow in ema.shadow.items():
        assert torch.equal(resumed.shadow[name].full_tensor(), shadow.full_tensor())
