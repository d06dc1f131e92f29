"""The Gaussian diffusion process: schedules, forward noising, posterior, parameterisations,
respacing, samplers on an analytic model, DDIM inversion, guidance and thresholding (the training
objective is ``test_diffusion_losses``).

Most checks use data x₀ ~ N(μ, σ²I), whose optimal predictors are closed form: with
x_t = √ᾱ·x₀ + √(1−ᾱ)·ε, E[ε | x_t] = √(1−ᾱ)·(x_t − √ᾱ·μ)/(ᾱσ² + 1 − ᾱ). Every sampler is then a
linear-Gaussian map whose output moments the tests compute independently.
"""

from __future__ import annotations

import math

import pytest
import torch

from unclip.diffusion import GaussianDiffusion
from unclip.diffusion_process import DiffusionConfig, make_beta_schedule, space_timesteps

T = 1000
MU, SIGMA = 0.3, 0.5


def cosine_alpha_bar(t: float, steps: int = T, s: float = 0.008) -> float:
    """Improved DDPM eq. 17, written out independently: ᾱ(t) = f(t)/f(0)."""

    def f(u: float) -> float:
        return math.cos((u / steps + s) / (1 + s) * math.pi / 2) ** 2

    return f(t) / f(0)


def reference_alphas(schedule: str = "cosine", steps: int = T) -> list[float]:
    """ᾱ at step indices 0..T−1 (index t is the paper's step t+1), in plain Python floats."""
    if schedule == "cosine":
        betas = [
            min(1 - cosine_alpha_bar(i + 1, steps) / cosine_alpha_bar(i, steps), 0.999)
            for i in range(steps)
        ]
    else:
        scale = 1000 / steps
        lo, hi = scale * 1e-4, scale * 0.02
        betas = [lo + (hi - lo) * i / (steps - 1) for i in range(steps)]
    out, prod = [], 1.0
    for b in betas:
        prod *= 1 - b
        out.append(prod)
    return out


def process(**overrides) -> GaussianDiffusion:
    cfg = DiffusionConfig(**{"thresholding": "none", **overrides})
    cfg.validate()
    return GaussianDiffusion(cfg)


def analytic_model(diffusion: GaussianDiffusion, mu: float = MU, sigma: float = SIGMA, calls=None):
    """The optimal predictor for x₀ ~ N(μ, σ²I) under ``diffusion``'s objective (original t)."""
    alpha_bar = diffusion.alphas_cumprod  # of the ORIGINAL process: model functions see original t
    assert diffusion.num_timesteps == diffusion.original_num_timesteps

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(t.clone())
        a = alpha_bar[t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        eps = (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * sigma**2 + 1 - a)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        objective = diffusion.cfg.objective
        if objective == "eps":
            return eps
        if objective == "x0":
            return x0
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    return fn


# ----------------------------------------------------------------------------------------------
# Schedules


def test_cosine_schedule_matches_eq17() -> None:
    betas = make_beta_schedule("cosine", T)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    alpha_bar = torch.cumprod(1 - betas, 0)
    # Only the last β reaches the 0.999 clip (β_{T−2} = 0.75), so eq. 17 holds exactly elsewhere.
    for t in (0, 1, 10, 250, 499, 750, 900, 998):
        assert alpha_bar[t].item() == pytest.approx(cosine_alpha_bar(t + 1), rel=1e-12)
    # Golden values (eq. 17 evaluated by hand): ᾱ at the first, middle and last-but-one steps.
    assert alpha_bar[0].item() == pytest.approx(0.999958715775178, rel=1e-12)
    assert alpha_bar[499].item() == pytest.approx(0.49384359044063775, rel=1e-12)
    assert alpha_bar[998].item() == pytest.approx(2.428766907034851e-06, rel=1e-9)
    assert betas[-1].item() == 0.999
    assert betas[-2].item() == pytest.approx(0.75, abs=1e-5)
    for steps in (1, 2, 50, T, 4000):
        b = make_beta_schedule("cosine", steps)
        assert torch.all(b > 0) and torch.all(b <= 0.999)
        assert torch.all(b[1:] >= b[:-1])


def test_linear_schedule_endpoints() -> None:
    betas = make_beta_schedule("linear", 1000)
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    betas = make_beta_schedule("linear", 250)  # scale 1000/T = 4
    assert betas[0].item() == pytest.approx(4e-4, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.08, rel=1e-12)
    for steps in (1, 10, 100, T):
        b = make_beta_schedule("linear", steps)
        assert torch.all(b > 0) and torch.all(b <= 0.999)
    with pytest.raises(ValueError, match="unknown beta schedule"):
        make_beta_schedule("quadratic", 10)


# ----------------------------------------------------------------------------------------------
# Forward process and posterior


def test_q_sample_moments_match_forward_process() -> None:
    diffusion = process()
    x0 = torch.tensor([-1.0, -0.2, 0.5, 1.0], dtype=torch.float64)
    n = 100_000
    gen = torch.Generator().manual_seed(0)
    for t_index in (0, 100, 500, 999):
        noise = torch.randn(n, 4, generator=gen, dtype=torch.float64)
        t = torch.full((n,), t_index, dtype=torch.long)
        x_t = diffusion.q_sample(x0.expand(n, 4), t, noise)
        a = reference_alphas()[t_index]
        var = 1 - a
        # 5 standard errors of the sample mean and of the sample variance.
        mean_err = (x_t.mean(0) - math.sqrt(a) * x0).abs().max().item()
        var_err = (x_t.var(0) / var - 1).abs().max().item()
        assert mean_err < 5 * math.sqrt(var / n), (t_index, mean_err)
        assert var_err < 5 * math.sqrt(2 / n), (t_index, var_err)
        mean, variance, log_variance = diffusion.q_mean_variance(x0.expand(2, 4), t[:2])
        torch.testing.assert_close(mean[0], math.sqrt(a) * x0, rtol=1e-12, atol=1e-12)
        assert variance[0, 0].item() == pytest.approx(var, rel=1e-10)
        assert log_variance[0, 0].item() == pytest.approx(math.log(var), rel=1e-10)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_posterior_matches_ho_eq7(schedule: str) -> None:
    diffusion = process(schedule=schedule)
    alphas = reference_alphas(schedule)
    gen = torch.Generator().manual_seed(1)
    steps = [0, 1, 2, 5, 500, 998, 999]
    t = torch.tensor(steps)
    x0 = torch.randn(len(steps), 3, 4, 4, generator=gen, dtype=torch.float64)
    x_t = torch.randn(len(steps), 3, 4, 4, generator=gen, dtype=torch.float64)
    mean, variance, log_variance = diffusion.q_posterior_mean_variance(x0, x_t, t)
    for row, i in enumerate(steps):
        a, a_prev = alphas[i], (alphas[i - 1] if i > 0 else 1.0)
        beta = 1 - a / a_prev
        mu = (
            math.sqrt(a_prev) * beta / (1 - a) * x0[row]
            + math.sqrt(1 - beta) * (1 - a_prev) / (1 - a) * x_t[row]
        )
        beta_tilde = (1 - a_prev) / (1 - a) * beta
        torch.testing.assert_close(mean[row], mu, rtol=1e-9, atol=1e-9)
        assert variance[row].max().item() == pytest.approx(beta_tilde, rel=1e-9, abs=1e-300)
        if i > 0:
            assert log_variance[row, 0, 0, 0].item() == pytest.approx(
                math.log(beta_tilde), rel=1e-9
            )
    # t = 0: the posterior is x₀ itself with variance 0; its log variance is clipped to t = 1's.
    torch.testing.assert_close(mean[0], x0[0], rtol=0, atol=1e-12)
    assert variance[0].abs().max().item() == 0.0
    assert log_variance[0, 0, 0, 0].item() == pytest.approx(log_variance[1, 0, 0, 0].item())
    assert torch.isfinite(log_variance).all()


def float64_draws(seed: int, batch: int):
    """(generator, t with both ends included, x₀, ε, ᾱ_t as (B, 1, 1, 1)) in float64; the
    generator goes on from there for further draws."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, T, (batch,), generator=gen)
    t[0], t[1] = 0, T - 1
    x0 = torch.randn(batch, 3, 4, 4, generator=gen, dtype=torch.float64)
    noise = torch.randn(batch, 3, 4, 4, generator=gen, dtype=torch.float64)
    a = torch.tensor(reference_alphas(), dtype=torch.float64)[t].reshape(-1, 1, 1, 1)
    return gen, t, x0, noise, a


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_true_target_recovers_x0_and_eps(objective: str) -> None:
    diffusion = process(objective=objective)
    batch = 64
    _, t, x0, noise, a = float64_draws(seed=2, batch=batch)
    x_t = diffusion.q_sample(x0, t, noise)
    target = {"eps": noise, "x0": x0, "v": a.sqrt() * noise - (1 - a).sqrt() * x0}[objective]
    torch.testing.assert_close(diffusion.training_target(x0, t, noise), target)
    out = diffusion.p_mean_variance(lambda x, tt: target, x_t, t)
    # ε from x₀ (x0 objective) divides by √(1/ᾱ − 1) ≈ 0.006 at t = 0: still ~1e-13 in float64.
    torch.testing.assert_close(out["pred_xstart"], x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(out["pred_eps"], noise, rtol=0, atol=1e-9)
    losses = diffusion.training_losses(lambda x, tt: target, x0, t=t, noise=noise)
    assert set(losses) == {"loss", "mse"}
    assert losses["loss"].shape == (batch,)
    assert losses["mse"].max().item() < 1e-18
    # A wrong output is penalised by exactly its mean squared error.
    losses = diffusion.training_losses(lambda x, tt: target + 0.5, x0, t=t, noise=noise)
    torch.testing.assert_close(losses["loss"], torch.full((batch,), 0.25, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# Respacing


@pytest.mark.parametrize("steps", [1, 2, 7, 50, 999, T])
def test_respacing_keeps_alpha_bar(steps: int) -> None:
    diffusion = process(timesteps=T)
    kept = space_timesteps(T, steps)
    assert len(kept) == steps and kept == sorted(set(kept))
    assert kept[-1] == T - 1 and (steps == 1 or kept[0] == 0)
    respaced = diffusion.respace(steps)
    assert respaced.num_timesteps == steps
    assert respaced.timestep_map.tolist() == kept
    torch.testing.assert_close(
        respaced.alphas_cumprod, diffusion.alphas_cumprod[kept], rtol=1e-13, atol=0
    )
    # The respaced β reproduce those ᾱ as a product (β_i = 1 − ᾱ_i/ᾱ_{i−1}).
    torch.testing.assert_close(
        torch.cumprod(1 - respaced.betas, 0), respaced.alphas_cumprod, rtol=1e-12, atol=1e-15
    )
    assert torch.all(respaced.betas > 0) and torch.all(respaced.betas < 1)
    assert diffusion.respace(steps) is respaced  # cached
    with pytest.raises(ValueError):
        space_timesteps(T, T + 1)


def test_model_sees_original_timesteps_when_respaced() -> None:
    diffusion = process()
    calls: list[torch.Tensor] = []
    fn = analytic_model(diffusion, calls=calls)
    diffusion.sample(fn, (2, 3), steps=10, sampler="ddpm", generator=torch.Generator())
    seen = [int(c[0]) for c in calls]
    assert seen == sorted(space_timesteps(T, 10), reverse=True)
    calls.clear()
    diffusion.training_losses(fn, torch.zeros(4, 3), t=torch.tensor([0, 3, 7, 9]))
    assert calls[0].tolist() == [0, 3, 7, 9]  # the full process maps to itself
    calls.clear()
    diffusion.respace(10).training_losses(fn, torch.zeros(2, 3), t=torch.tensor([0, 9]))
    assert calls[0].tolist() == [0, T - 1]


# ----------------------------------------------------------------------------------------------
# Samplers on the analytic model


def exact_output_moments(
    kept_alphas: list[float], sampler: str, eta: float, variance: str = "small"
) -> tuple[float, float]:
    """Mean and variance of the sampler's output with the optimal predictor and x_T ~ N(0, 1),
    propagated through each (linear-Gaussian) step: Ho et al. eq. 7 / Algorithm 2, DDIM eqs. 12, 16."""
    m, v = 0.0, 1.0
    for i in reversed(range(len(kept_alphas))):
        a = kept_alphas[i]
        a_prev = kept_alphas[i - 1] if i > 0 else 1.0
        k = math.sqrt(1 - a) / (a * SIGMA**2 + 1 - a)
        eps = (k, -k * math.sqrt(a) * MU)  # ε̂ = k·x + c, as (slope, offset)
        x0 = (
            (1 - math.sqrt(1 - a) * eps[0]) / math.sqrt(a),
            -math.sqrt(1 - a) * eps[1] / math.sqrt(a),
        )
        beta = 1 - a / a_prev
        if sampler == "ddpm":
            c1 = math.sqrt(a_prev) * beta / (1 - a)
            c2 = math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)
            slope, offset = c1 * x0[0] + c2, c1 * x0[1]
            if i == 0:
                noise_var = 0.0
            elif variance == "small":
                noise_var = (1 - a_prev) / (1 - a) * beta
            else:
                noise_var = beta
        else:
            sigma = eta * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
            d = math.sqrt(1 - a_prev - sigma**2)
            slope = math.sqrt(a_prev) * x0[0] + d * eps[0]
            offset = math.sqrt(a_prev) * x0[1] + d * eps[1]
            noise_var = sigma**2 if i > 0 else 0.0
        m, v = slope * m + offset, slope**2 * v + noise_var
    return m, v


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@pytest.mark.parametrize(
    ("sampler", "eta", "variance"),
    [
        ("ddpm", 0.0, "small"),
        ("ddpm", 0.0, "large"),
        ("ddim", 0.0, "small"),
        ("ddim", 0.5, "small"),
    ],
)
def test_sampler_output_has_the_exact_moments(
    objective: str, sampler: str, eta: float, variance: str
) -> None:
    """20 respaced steps: the empirical moments of 200k samples equal the propagated ones (within
    5 standard errors: ~0.6% of σ for the mean, ~1.6% for the variance)."""
    diffusion = process(objective=objective, fixed_variance=variance)
    steps = 20
    kept_alphas = [reference_alphas()[k] for k in space_timesteps(T, steps)]
    m, v = exact_output_moments(kept_alphas, sampler, eta, variance)
    n = 200_000
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    x = diffusion.sample(
        analytic_model(diffusion),
        (n, 1),
        sampler=sampler,
        steps=steps,
        eta=eta,
        noise=noise,
        generator=gen,
    )
    assert x.dtype == torch.float64
    assert abs(x.mean().item() - m) < 5 * math.sqrt(v / n)
    assert abs(x.var().item() / v - 1) < 5 * math.sqrt(2 / n)


def test_ddim_eta0_is_the_exact_affine_map() -> None:
    """With η = 0 the sampler is deterministic: output = slope·x_T + offset, to float64 rounding."""
    diffusion = process()
    steps = 30
    kept_alphas = [reference_alphas()[k] for k in space_timesteps(T, steps)]
    m0, _ = exact_output_moments(kept_alphas, "ddim", 0.0)  # the offset (x_T = 0)
    noise = torch.linspace(-3, 3, 13, dtype=torch.float64).reshape(13, 1)
    x = diffusion.sample(
        analytic_model(diffusion), (13, 1), sampler="ddim", steps=steps, eta=0.0, noise=noise
    )
    slope = (x[-1] - x[0]).item() / 6.0
    _, v = exact_output_moments(kept_alphas, "ddim", 0.0)
    assert slope == pytest.approx(math.sqrt(v), rel=1e-9)
    torch.testing.assert_close(x, m0 + slope * noise, rtol=0, atol=1e-10)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@pytest.mark.parametrize(("sampler", "steps"), [("ddpm", 250), ("ddim", 100)])
def test_samplers_reproduce_the_data_distribution(objective: str, sampler: str, steps: int) -> None:
    """16k samples: mean within 0.015 of μ = 0.3 and std within 3% of σ = 0.5 (measured: mean
    0.299, std 0.492-0.493 at these step counts; the std gap is the respacing's discretisation)."""
    diffusion = process(objective=objective)
    gen = torch.Generator().manual_seed(4)
    x = diffusion.sample(
        analytic_model(diffusion),
        (4000, 4),
        sampler=sampler,
        steps=steps,
        generator=gen,
        dtype=torch.float64,
    )
    assert abs(x.mean().item() - MU) < 0.015
    assert abs(x.std().item() / SIGMA - 1) < 0.03


def test_ddim_with_eta1_is_ddpm() -> None:
    """DDIM's σ(η = 1) is β̃_t, which makes its update the DDPM posterior step (Song et al. §4.1)."""
    diffusion = process()
    fn = analytic_model(diffusion)
    a = diffusion.sample(
        fn, (64, 4), sampler="ddpm", steps=25, generator=torch.Generator().manual_seed(5)
    )
    b = diffusion.sample(
        fn, (64, 4), sampler="ddim", eta=1.0, steps=25, generator=torch.Generator().manual_seed(5)
    )
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("objective", ["eps", "v"])
def test_ddim_inversion_reconstructs(objective: str) -> None:
    """ddim_invert then DDIM (η = 0) from that x_T gives back x₀: max error 0.006 with 1000 steps and
    0.023 with 250 (measured), shrinking ~linearly in the step size (first-order Euler both ways)."""
    diffusion = process(objective=objective)
    fn = analytic_model(diffusion)
    x0 = MU + SIGMA * torch.randn(
        256, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64
    )
    errors = {}
    for steps in (250, 1000):
        x_T = diffusion.ddim_invert(fn, x0, steps=steps)
        assert x_T.shape == x0.shape
        assert abs(x_T.std().item() - 1) < 0.1  # the latent looks like noise, not like the data
        back = diffusion.sample(fn, x0.shape, sampler="ddim", eta=0.0, steps=steps, noise=x_T)
        errors[steps] = (back - x0).abs().max().item()
    assert errors[1000] < 0.01
    assert errors[250] < 0.04
    assert errors[250] / errors[1000] > 3


# ----------------------------------------------------------------------------------------------
# Sampling API


def test_sampling_is_deterministic_for_a_generator() -> None:
    diffusion = process()
    fn = analytic_model(diffusion)
    for sampler, eta in (("ddpm", 0.0), ("ddim", 0.7)):
        a = diffusion.sample(
            fn,
            (8, 5),
            sampler=sampler,
            eta=eta,
            steps=10,
            generator=torch.Generator().manual_seed(7),
        )
        b = diffusion.sample(
            fn,
            (8, 5),
            sampler=sampler,
            eta=eta,
            steps=10,
            generator=torch.Generator().manual_seed(7),
        )
        c = diffusion.sample(
            fn,
            (8, 5),
            sampler=sampler,
            eta=eta,
            steps=10,
            generator=torch.Generator().manual_seed(8),
        )
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)


def test_per_row_generators_sample_each_row_as_alone() -> None:
    """One generator per row group (``randn_rows``): every row group's x_T and step noise is what
    its generator draws for that group sampled on its own, so a batch of groups samples as the
    groups one by one (the analytic model is row-wise: exactly)."""
    diffusion = process()
    fn = analytic_model(diffusion)

    def gens(*seeds: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(s) for s in seeds]

    for sampler, eta in (("ddpm", 0.0), ("ddim", 0.7)):
        kw = {"sampler": sampler, "eta": eta, "steps": 10}
        # 3 groups of 2 adjacent rows (e.g. a prior's 2 candidates per caption)
        batch = diffusion.sample(fn, (6, 5), generator=gens(3, 4, 5), **kw)
        alone = [diffusion.sample(fn, (2, 5), generator=g, **kw) for g in gens(3, 4, 5)]
        assert torch.equal(batch, torch.cat(alone))
        # one group: the same as that one generator
        assert torch.equal(
            diffusion.sample(fn, (2, 5), generator=gens(4), **kw),
            diffusion.sample(fn, (2, 5), generator=torch.Generator().manual_seed(4), **kw),
        )
    with pytest.raises(ValueError, match="2 generators for a batch of 3 rows"):
        diffusion.sample(fn, (3, 5), generator=gens(1, 2))


def test_sample_defaults_callback_and_trajectory() -> None:
    diffusion = process(sampler="ddim", sampling_steps=6)
    fn = analytic_model(diffusion)
    seen: list[tuple[int, int]] = []
    x, trajectory = diffusion.sample(
        fn,
        (3, 2),
        generator=torch.Generator().manual_seed(9),
        callback=lambda done, total, x, x0: seen.append((done, total)),
        return_trajectory=True,
    )
    assert seen == [(i, 6) for i in range(1, 7)]
    assert len(trajectory) == 7 and torch.equal(trajectory[-1], x)
    assert x.dtype == torch.float32 and x.shape == (3, 2)
    with pytest.raises(ValueError, match="noise shape"):
        diffusion.sample(fn, (3, 2), noise=torch.zeros(2, 2))


# ----------------------------------------------------------------------------------------------
# Guidance


@pytest.mark.parametrize("learned", [False, True])
def test_classifier_free_guidance(learned: bool) -> None:
    diffusion = process(learned_variance=learned)
    calls: list[tuple[int, list[bool]]] = []

    def fn3(x, t, drop):
        calls.append((x.shape[0], drop.tolist()))
        cond = torch.cat([x + 1.0, x + 0.25], dim=1) if learned else x + 1.0
        uncond = torch.cat([x - 1.0, x - 0.75], dim=1) if learned else x - 1.0
        keep = (~drop).reshape(-1, 1, 1, 1)
        return torch.where(keep, cond, uncond)

    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(10))
    t = torch.tensor([5, 6, 7])
    out = diffusion.guided(fn3, 1.0)(x, t)
    assert calls == [(3, [False] * 3)]  # scale 1: one conditional forward, no doubled batch
    torch.testing.assert_close(out, fn3(x, t, torch.zeros(3, dtype=torch.bool)))
    calls.clear()
    out = diffusion.guided(fn3, 3.0)(x, t)
    assert calls == [(6, [False] * 3 + [True] * 3)]  # one batched forward of both branches
    mean = (x - 1.0) + 3.0 * ((x + 1.0) - (x - 1.0))
    torch.testing.assert_close(out[:, :2], mean)
    if learned:
        assert out.shape == (3, 4, 4, 4)
        torch.testing.assert_close(out[:, 2:], x + 0.25)  # the conditional variance channels
    else:
        assert out.shape == x.shape


# ----------------------------------------------------------------------------------------------
# Thresholding


def test_static_thresholding_clips() -> None:
    diffusion = process(thresholding="static")
    x0 = torch.tensor([[-3.0, -1.0, 0.25, 1.5]])
    assert diffusion.threshold(x0).tolist() == [[-1.0, -1.0, 0.25, 1.0]]
    # Inside p_mean_variance: pred_xstart clipped, pred_eps consistent with it.
    t = torch.tensor([500])
    x_t = torch.zeros(1, 4)
    out = diffusion.p_mean_variance(lambda x, tt: torch.full_like(x, -5.0), x_t, t)
    assert out["pred_xstart"].abs().max().item() == 1.0  # ε = −5 at ᾱ ≈ 0.49 means x̂₀ ≈ 5
    recon = diffusion.q_sample(out["pred_xstart"], t, out["pred_eps"])
    torch.testing.assert_close(recon, x_t, rtol=0, atol=1e-5)
    raw = diffusion.p_mean_variance(lambda x, tt: torch.full_like(x, -5.0), x_t, t, threshold=False)
    assert raw["pred_xstart"].max().item() > 1.0


def test_dynamic_thresholding_rescales_per_sample() -> None:
    p = 0.9
    diffusion = process(thresholding="dynamic", dynamic_percentile=p)
    gen = torch.Generator().manual_seed(11)
    big = 3.0 * torch.randn(1, 3, 8, 8, generator=gen)  # quantile of |x| well above 1
    small = 0.3 * torch.rand(1, 3, 8, 8, generator=gen)  # all |x| < 1: s = 1, left unchanged
    x0 = torch.cat([big, small])
    out = diffusion.threshold(x0)
    s = torch.quantile(big.abs().flatten(), p).item()
    assert s > 1.5
    torch.testing.assert_close(out[0], big[0].clamp(-s, s) / s)
    torch.testing.assert_close(out[1], small[0])
    assert out[0].abs().max().item() == pytest.approx(1.0)
    # Exactly a fraction 1 − p of the entries saturate (±1 after the division).
    saturated = (out[0].abs() >= 1 - 1e-6).float().mean().item()
    assert saturated == pytest.approx(1 - p, abs=2 / big.numel())
