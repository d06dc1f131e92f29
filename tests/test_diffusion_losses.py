"""The diffusion training objective (Ho et al. 2020; Nichol & Dhariwal 2021): the learned-variance
hybrid loss (L_simple + λ·L_vb, finite at every step and for extreme outputs, its L_vb term equal to
the closed forms), float32 under bf16 autocast, a learned-variance model that trains stably, the
output shape checked, and Min-SNR-γ weighting (Hang et al. 2023) as one ε-loss for every
parameterisation. The process and its helpers are ``test_diffusion``'s."""

from __future__ import annotations

import math

import pytest
import torch
from test_diffusion import T, float64_draws, process, reference_alphas
from torch import nn


class TinyNet(nn.Module):
    """A small conv net with a timestep channel; outputs 2C channels (mean, variance value)."""

    def __init__(self, channels: int = 3, width: int = 24) -> None:
        super().__init__()
        self.inp = nn.Conv2d(channels + 1, width, 3, padding=1)
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Conv2d(width, 2 * channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = (t.to(x.dtype) / T).reshape(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        h = nn.functional.silu(self.inp(torch.cat([x, tt], dim=1)))
        h = nn.functional.silu(self.mid(h))
        return self.out(h)


def quantized_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Smooth 8-bit images in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.linspace(0, 1, size)
    freq = torch.rand(n, 3, 1, 1, generator=gen) * 4 + 1
    phase = torch.rand(n, 3, 1, 1, generator=gen) * 6
    img = torch.sin(freq * grid.reshape(1, 1, -1, 1) + phase) * torch.cos(freq * grid + phase)
    return torch.round((img.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def grads_finite(module: nn.Module) -> bool:
    return all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_hybrid_loss_finite_at_every_t(objective: str) -> None:
    torch.manual_seed(12)
    diffusion = process(objective=objective, learned_variance=True, thresholding="static")
    net = TinyNet()
    x0 = quantized_images(T, 8, seed=12)
    t = torch.arange(T)  # every step, including 0 and T − 1
    losses = diffusion.training_losses(net, x0, t=t, generator=torch.Generator().manual_seed(0))
    assert set(losses) == {"loss", "mse", "vb"}
    for value in losses.values():
        assert value.shape == (T,) and torch.isfinite(value).all()
    torch.testing.assert_close(losses["loss"], losses["mse"] + 0.001 * T * losses["vb"])
    losses["loss"].mean().backward()
    assert grads_finite(net)


@pytest.mark.parametrize("value", [1e4, -1e4, 1e6])
def test_hybrid_loss_finite_for_extreme_outputs(value: float) -> None:
    diffusion = process(learned_variance=True)
    x0 = quantized_images(8, 8, seed=13)
    t = torch.tensor([0, 1, 2, 10, 500, 997, 998, 999])
    for mean_value, var_value in ((value, 0.0), (0.0, value), (value, value), (value, -value)):
        scale = torch.tensor(1.0, requires_grad=True)

        def fn(x, tt, mv=mean_value, vv=var_value, scale=scale):
            mean = torch.full_like(x, mv) * scale
            var = torch.full_like(x, vv) * scale
            return torch.cat([mean, var], dim=1)

        losses = diffusion.training_losses(fn, x0, t=t, generator=torch.Generator().manual_seed(1))
        assert all(torch.isfinite(v).all() for v in losses.values()), (mean_value, var_value)
        losses["loss"].sum().backward()
        assert torch.isfinite(scale.grad), (mean_value, var_value)


def test_vb_term_matches_closed_forms_and_stops_mean_gradient() -> None:
    """x0 objective: the mean output is x̂₀. At t = 0 vb is the discretized Gaussian NLL of x₀ under
    N(x̂₀, σ²) in bits/dim; at t > 0 the KL between Ho et al.'s posterior and N(μ̃(x̂₀), σ²)."""
    diffusion = process(objective="x0", learned_variance=True)
    alphas = reference_alphas()
    x0 = quantized_images(2, 4, seed=14).to(torch.float64)
    t = torch.tensor([0, 300])
    gen = torch.Generator().manual_seed(15)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    pred = (x0 + 0.01 * torch.randn(x0.shape, generator=gen, dtype=torch.float64)).requires_grad_()
    v = torch.empty_like(x0).uniform_(-0.9, 0.9, generator=gen).requires_grad_()
    losses = diffusion.training_losses(
        lambda x, tt: torch.cat([pred, v], dim=1), x0, t=t, noise=noise
    )
    x_t = diffusion.q_sample(x0, t, noise)

    def log_var(i: int, frac: torch.Tensor) -> torch.Tensor:
        a, a_prev = alphas[i], (alphas[i - 1] if i > 0 else 1.0)
        beta = 1 - a / a_prev
        j = max(i, 1)  # clipped: β̃ at t = 0 replaced by β̃_1
        beta_tilde = (1 - alphas[j - 1]) / (1 - alphas[j]) * (1 - alphas[j] / alphas[j - 1])
        return frac * math.log(beta) + (1 - frac) * math.log(beta_tilde)

    # t = 0: the posterior mean of x̂₀ is x̂₀ itself.
    frac = (v[0].detach() + 1) / 2
    std = torch.exp(0.5 * log_var(0, frac))
    normal = torch.distributions.Normal(pred[0].detach(), std)
    upper = torch.where(x0[0] > 0.999, torch.ones_like(std), normal.cdf(x0[0] + 1 / 255))
    lower = torch.where(x0[0] < -0.999, torch.zeros_like(std), normal.cdf(x0[0] - 1 / 255))
    nll_bits = -torch.log(upper - lower).mean() / math.log(2)
    assert losses["vb"][0].item() == pytest.approx(nll_bits.item(), rel=1e-6)
    # t = 300: Gaussian KL in bits.
    i = 300
    a, a_prev = alphas[i], alphas[i - 1]
    beta = 1 - a / a_prev
    c1, c2 = math.sqrt(a_prev) * beta / (1 - a), math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)
    true_mean, true_var = c1 * x0[1] + c2 * x_t[1], (1 - a_prev) / (1 - a) * beta
    model_mean, model_log_var = (
        c1 * pred[1].detach() + c2 * x_t[1],
        log_var(i, (v[1].detach() + 1) / 2),
    )
    kl = 0.5 * (
        -1
        + model_log_var
        - math.log(true_var)
        + true_var / torch.exp(model_log_var)
        + (true_mean - model_mean) ** 2 / torch.exp(model_log_var)
    )
    assert losses["vb"][1].item() == pytest.approx((kl.mean() / math.log(2)).item(), rel=1e-6)
    # Stop-gradient: vb reaches the variance channels only; mse the mean channels only.
    grad_pred, grad_v = torch.autograd.grad(losses["vb"].sum(), [pred, v])
    assert grad_pred.abs().max().item() == 0.0 and grad_v.abs().max().item() > 0
    grad_pred, grad_v = torch.autograd.grad(losses["mse"].sum(), [pred, v], allow_unused=True)
    assert grad_pred.abs().max().item() > 0 and (grad_v is None or grad_v.abs().max() == 0)


def test_hybrid_loss_is_float32_under_bf16_autocast() -> None:
    torch.manual_seed(16)
    diffusion = process(learned_variance=True)
    net = TinyNet()
    x0 = quantized_images(32, 8, seed=16)
    t = torch.linspace(0, T - 1, 32).long()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(x0, t).dtype == torch.bfloat16
        losses = diffusion.training_losses(net, x0, t=t, generator=torch.Generator().manual_seed(0))
    for value in losses.values():
        assert value.dtype == torch.float32 and torch.isfinite(value).all()
    losses["loss"].mean().backward()
    assert grads_finite(net)


def test_learned_variance_training_is_stable_and_learns() -> None:
    """~200 Adam steps of a tiny conv net with the hybrid loss on a fixed batch of 16×16 images: no
    NaN/inf in any loss or gradient, and the loss on a fixed set of (t, noise) falls."""
    torch.manual_seed(17)
    diffusion = process(learned_variance=True, thresholding="static")
    net = TinyNet(width=16)
    x0 = quantized_images(8, 16, seed=17)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    eval_t = torch.linspace(0, T - 1, 8).long()
    eval_noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(18))

    def eval_losses() -> dict[str, float]:
        with torch.no_grad():
            losses = diffusion.training_losses(net, x0, t=eval_t, noise=eval_noise)
        return {k: v.mean().item() for k, v in losses.items()}

    before = eval_losses()
    gen = torch.Generator().manual_seed(19)
    for _ in range(200):
        losses = diffusion.training_losses(net, x0, generator=gen)
        assert all(torch.isfinite(v).all() for v in losses.values())
        opt.zero_grad()
        losses["loss"].mean().backward()
        assert grads_finite(net)
        opt.step()
    after = eval_losses()
    # Measured: loss 94 → 11, mse 1.03 → 0.23, vb 93 → 11 (the t = 0 decoder NLL dominates at init).
    for key in ("loss", "mse", "vb"):
        assert math.isfinite(after[key]) and after[key] < 0.5 * before[key], (key, before, after)
    # And the trained net samples (learned variance, DDPM, respaced) without NaN.
    with torch.no_grad():
        x = diffusion.sample(net, (2, 3, 16, 16), sampler="ddpm", steps=20, generator=gen)
    assert torch.isfinite(x).all() and x.abs().max() <= 1.0 + 1e-6


def test_output_shape_is_checked() -> None:
    diffusion = process(learned_variance=True)
    with pytest.raises(ValueError, match="learned variance"):
        diffusion.training_losses(lambda x, t: x, torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="model output"):
        process().training_losses(lambda x, t: x[:, :1], torch.zeros(2, 3))


def test_dtypes_and_pickling() -> None:
    """Schedule values are cast to x's dtype; a bf16 model output is lifted to float32; the process
    survives pickling (Ray ships stage models between processes)."""
    import pickle

    diffusion = process()
    x0 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(20))
    t = torch.tensor([0, 10, 500, 999])
    assert diffusion.q_sample(x0, t, torch.randn_like(x0)).dtype == torch.float32
    assert diffusion.q_sample(x0.bfloat16(), t, torch.randn_like(x0).bfloat16()).dtype == (
        torch.bfloat16
    )
    out = diffusion.p_mean_variance(lambda x, tt: torch.zeros_like(x, dtype=torch.bfloat16), x0, t)
    assert all(out[k].dtype == torch.float32 for k in ("mean", "variance", "pred_xstart"))
    clone = pickle.loads(pickle.dumps(diffusion))
    noise = torch.randn_like(x0)

    def fn(x, tt):
        return 0.5 * x

    torch.testing.assert_close(
        clone.training_losses(fn, x0, t=t, noise=noise)["loss"],
        diffusion.training_losses(fn, x0, t=t, noise=noise)["loss"],
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_min_snr_weighting_is_the_same_eps_loss_for_every_objective(objective: str) -> None:
    """Hang et al. 2023: whatever the network predicts, the weighted loss of an output whose implied
    ε is off by δ is min(SNR, γ)/SNR · mean(δ²)."""
    gamma = 5.0
    diffusion = process(objective=objective, min_snr_gamma=gamma)
    batch = 32
    gen, t, x0, noise, a = float64_draws(seed=3, batch=batch)
    delta = 0.1 * torch.randn(batch, 3, 4, 4, generator=gen, dtype=torch.float64)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    eps_hat = noise + delta
    x0_hat = (x_t - (1 - a).sqrt() * eps_hat) / a.sqrt()
    output = {"eps": eps_hat, "x0": x0_hat, "v": a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat}
    losses = diffusion.training_losses(lambda x, tt: output[objective], x0, t=t, noise=noise)
    snr = (a / (1 - a)).flatten()
    expected = snr.clamp(max=gamma) / snr * (delta**2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(losses["loss"], expected, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(  # the unweighted MSE is still reported as it was
        losses["mse"],
        ((output[objective] - diffusion.training_target(x0, t, noise)) ** 2).mean(dim=(1, 2, 3)),
    )
