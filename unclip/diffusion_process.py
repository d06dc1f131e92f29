"""The Gaussian diffusion process (Ho et al. 2020; Nichol & Dhariwal 2021): its configuration, its β
schedules, and every distribution the schedule determines, apart from every network.

This is the bottom of the diffusion modules: the training objective (:mod:`unclip.diffusion_losses`)
and the samplers (:mod:`unclip.diffusion_sampling`) are written on top of :class:`DiffusionProcess`,
and :class:`unclip.diffusion.GaussianDiffusion` puts the three together. It owns:

* :class:`DiffusionConfig`, the hyperparameters of one stage's process (schedule, objective,
  variance, loss weighting, sampler);
* the β schedules (:func:`make_beta_schedule`: Ho et al. §4's linear one, Nichol & Dhariwal §3.2's
  cosine one, eq. 17) and the respacing of their steps (:func:`space_timesteps`, Nichol & Dhariwal
  §4);
* :class:`DiffusionProcess`: the schedule quantities (precomputed in float64, cast per batch to the
  dtype and device of the data), the forward process q(x_t | x_0) (Ho et al. eq. 4), its posterior
  q(x_{t−1} | x_t, x_0) (Ho et al. eqs. 6-7), the model parameterisations (ε, x₀, v) with
  thresholding of x̂₀, and the model's reverse step p(x_{t−1} | x_t), fixed or learned variance
  (Ho et al. §3.2; Nichol & Dhariwal eq. 15). A model enters only as a *model function*
  ``fn(x_t, t) -> Tensor`` (docs/ARCHITECTURE.md, "The model function") passed as an argument;
* :func:`randn`, the standard normal draws of the process and its samplers.

A *respaced* process (:meth:`DiffusionProcess.respace`) keeps a subset of the training steps with
the same ᾱ there, so a model trained with T steps samples in far fewer; the model still receives
the ORIGINAL timestep indices.

Notation: β_t the noise schedule, α_t = 1 − β_t, ᾱ_t = ∏_{s≤t} α_s, with t ∈ [0, T) the step index
(index t is the paper's step t+1; ᾱ_{-1} = 1 means "clean data").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
from torch import Tensor

from unclip.fields import param, require

ModelFn = Callable[[Tensor, Tensor], Tensor]
"""``fn(x_t, t) -> output``: ``t`` (int64, shape (B,)) always in the original range [0, T)."""

__all__ = [
    "DiffusionConfig",
    "DiffusionProcess",
    "ModelFn",
    "make_beta_schedule",
    "randn",
    "space_timesteps",
    "work_dtype",
]

_Process = TypeVar("_Process", bound="DiffusionProcess")


@dataclass
class DiffusionConfig:
    """The Gaussian diffusion process (Ho et al. 2020; Nichol & Dhariwal 2021) of one stage."""

    timesteps: int = param(1000, "diffusion steps T used in training", ge=1)
    schedule: Literal["cosine", "linear"] = param("cosine", "noise schedule β_t")
    objective: Literal["eps", "x0", "v"] = param(
        "eps", "what the network predicts: noise ε, the clean sample x₀, or velocity v"
    )
    learned_variance: bool = param(
        False, "network also predicts the variance interpolation (hybrid loss, Nichol & Dhariwal)"
    )
    vlb_weight: float = param(0.001, "weight λ of the variational bound in the hybrid loss", ge=0)
    min_snr_gamma: float | None = param(
        None,
        "Min-SNR-γ loss weighting (Hang et al. 2023): each step's MSE weighted as an ε-loss "
        "weighted by min(SNR, γ)/SNR, so the nearly clean steps stop dominating (null: off)",
        gt=0,
    )
    sampler: Literal["ddpm", "ddim"] = param("ddim", "sampler used for generation")
    sampling_steps: int = param(64, "respaced steps used for generation", ge=1)
    eta: float = param(0.0, "DDIM η: 0 is deterministic, 1 matches DDPM's variance", ge=0)
    guidance_scale: float = param(1.0, "classifier-free guidance scale (1: no guidance)", ge=0)
    thresholding: Literal["none", "static", "dynamic"] = param(
        "static", "clip predicted x₀ to [-1, 1] (static) or by percentile (dynamic, Imagen)"
    )
    dynamic_percentile: float = param(0.995, "percentile for dynamic thresholding", gt=0, le=1)
    fixed_variance: Literal["small", "large"] = param(
        "small",
        "reverse variance when not learned: posterior β̃_t (small) or β_t (large), Ho et al. §3.2",
    )

    def validate(self) -> None:
        require(
            self.sampling_steps <= self.timesteps,
            "sampling_steps",
            f"must be at most timesteps ({self.timesteps}), got {self.sampling_steps}",
        )


# ----------------------------------------------------------------------------------------------
# Schedules


def make_beta_schedule(name: str, num_timesteps: int) -> Tensor:
    """β_t for t in [0, T), float64.

    * ``"cosine"``: Improved DDPM eq. 17, ᾱ(t) = f(t)/f(0) with f(t) = cos²(((t/T + s)/(1 + s))·π/2),
      s = 0.008, and β_t = 1 − ᾱ(t+1)/ᾱ(t) clipped at 0.999 (section 3.2: the last steps would
      otherwise be singular).
    * ``"linear"``: Ho et al. 2020 §4, β from 1e-4 to 0.02 for T = 1000, both scaled by 1000/T so other
      T keep the same total noise (as improved-diffusion does); also clipped at 0.999.
    """
    steps = int(num_timesteps)
    if steps < 1:
        raise ValueError(f"num_timesteps must be at least 1, got {num_timesteps}")
    if name == "cosine":
        s = 0.008
        grid = torch.arange(steps + 1, dtype=torch.float64) / steps
        f = torch.cos((grid + s) / (1 + s) * (math.pi / 2)) ** 2
        alpha_bar = f / f[0]
        betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    elif name == "linear":
        scale = 1000.0 / steps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)
    else:
        raise ValueError(f"unknown beta schedule {name!r} (expected 'cosine' or 'linear')")
    return betas.clamp(max=0.999)


def space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` evenly spaced original step indices in [0, T), ascending.

    Both ends are kept when ``steps`` ≥ 2 (0, so sampling ends by predicting x₀ from the least noisy
    step; T−1, so it starts from the noisiest); a single step keeps T−1. As improved-diffusion's
    ``space_timesteps`` with one section (Nichol & Dhariwal 2021 §4: sampling with fewer steps).
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    stride = (num_timesteps - 1) / (steps - 1)
    # Consecutive values are ≥ 1 apart before rounding, so rounding never merges two of them.
    return [round(i * stride) for i in range(steps)]


# ----------------------------------------------------------------------------------------------
# Noise and working precision


def randn(
    shape: Sequence[int],
    generator: torch.Generator | None,
    device: torch.device | str | None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise, the ε of the forward process and of every sampler; drawn on the
    generator's device (so a CPU generator gives the same numbers for any target device), in
    float32, then moved and cast."""
    where = generator.device if generator is not None else device
    z = torch.randn(tuple(shape), generator=generator, device=where, dtype=torch.float32)
    return z.to(device=device, dtype=dtype)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the process computes in: at least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else torch.float32


# ----------------------------------------------------------------------------------------------
# The process


class DiffusionProcess:
    """The schedule of one stage's diffusion and every distribution it determines: the forward
    process, its posterior, the parameterisations and the model's reverse step.

    Built from a :class:`DiffusionConfig`. ``use_timesteps`` (original step indices) makes a respaced
    process (Nichol & Dhariwal 2021 §4) whose ᾱ at its step i equals the original ᾱ at
    ``use_timesteps[i]`` and whose β_i = 1 − ᾱ_i/ᾱ_{i−1}; prefer :meth:`respace`. The process holds no
    parameters.

    Model outputs by ``cfg.objective`` (x_t = √ᾱ·x₀ + √(1−ᾱ)·ε, Ho et al. eq. 4):
    ``"eps"`` ε (Ho et al. eq. 11), ``"x0"`` x₀, ``"v"`` v = √ᾱ·ε − √(1−ᾱ)·x₀ (Salimans & Ho 2022 §4,
    appendix D). With ``cfg.learned_variance`` the output has twice the channels (dim 1): the mean
    prediction, then v ∈ [-1, 1] interpolating log β_t and log β̃_t (Improved DDPM eq. 15).
    """

    def __init__(self, cfg: DiffusionConfig, *, use_timesteps: Sequence[int] | None = None) -> None:
        self.cfg = cfg
        base_betas = make_beta_schedule(cfg.schedule, cfg.timesteps)
        self.original_num_timesteps = int(cfg.timesteps)
        base_alphas_cumprod = torch.cumprod(1.0 - base_betas, dim=0)
        if use_timesteps is None:
            kept = torch.arange(cfg.timesteps, dtype=torch.long)
            betas, alphas_cumprod = base_betas, base_alphas_cumprod
        else:
            steps = sorted({int(k) for k in use_timesteps})
            if not steps or steps[0] < 0 or steps[-1] >= cfg.timesteps:
                raise ValueError(
                    f"use_timesteps must be a non-empty subset of [0, {cfg.timesteps})"
                )
            kept = torch.tensor(steps, dtype=torch.long)
            alphas_cumprod = base_alphas_cumprod[kept]
            prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
            betas = 1.0 - alphas_cumprod / prev
        self.timestep_map = kept
        self.num_timesteps = len(betas)
        self._tables: dict[tuple[str, str], Tensor] = {}
        self._respaced: dict[int, DiffusionProcess] = {}
        self._init_schedule(betas, alphas_cumprod)

    def _init_schedule(self, betas: Tensor, alphas_cumprod: Tensor) -> None:
        """Every schedule quantity, float64 on the CPU (Ho et al. eqs. 4, 6-7; Improved DDPM §3.1)."""
        one = torch.ones(1, dtype=torch.float64)
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        self.alphas_cumprod_prev = torch.cat([one, alphas_cumprod[:-1]])
        self.alphas_cumprod_next = torch.cat(
            [alphas_cumprod[1:], torch.zeros(1, dtype=torch.float64)]
        )
        self.sqrt_alphas_cumprod = alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - alphas_cumprod).sqrt()
        self.log_one_minus_alphas_cumprod = torch.log((1.0 - alphas_cumprod).clamp(min=1e-20))
        self.sqrt_recip_alphas_cumprod = (1.0 / alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / alphas_cumprod - 1.0).sqrt()
        # Posterior q(x_{t-1} | x_t, x_0) (Ho et al. eqs. 6-7); at t = 0 (ᾱ_{-1} = 1) its mean is x_0
        # and its variance 0. The log variance is "clipped": its t = 0 value replaced by t = 1's.
        prev = self.alphas_cumprod_prev
        self.posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
        self.posterior_mean_coef1 = betas * prev.sqrt() / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod)
        pv = self.posterior_variance
        pv_clipped = torch.cat([pv[1:2], pv[1:]]) if len(pv) > 1 else pv
        self.posterior_log_variance_clipped = torch.log(pv_clipped.clamp(min=1e-20))
        self.log_betas = torch.log(betas.clamp(min=1e-20))
        # Ho et al. §3.2's other fixed choice, σ² = β (improved-diffusion's "fixed large", which
        # uses β̃_1 at t = 0 so the decoder term stays sensible).
        large = torch.cat([pv[1:2], betas[1:]]) if len(pv) > 1 else betas
        self.large_log_variance = torch.log(large.clamp(min=1e-20))

    # -- helpers -----------------------------------------------------------------------------

    def _table(self, name: str, device: torch.device) -> Tensor:
        """A schedule array on ``device`` (cached; float32 where float64 is unsupported)."""
        key = (name, str(device))
        table = self._tables.get(key)
        if table is None:
            table = getattr(self, name)
            if device.type == "mps" and table.dtype == torch.float64:
                table = table.float()
            table = table.to(device)
            self._tables[key] = table
        return table

    def _extract(self, name: str, t: Tensor, x: Tensor) -> Tensor:
        """``name[t]`` cast to x's dtype and device, shaped (B, 1, …) to broadcast against x."""
        values = self._table(name, x.device)[t.to(x.device)].to(x.dtype)
        return values.reshape(t.shape[0], *([1] * (x.ndim - 1)))

    def _map(self, t: Tensor) -> Tensor:
        """Respaced step indices → the original indices the model was trained with."""
        return self._table("timestep_map", t.device)[t]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_tables"] = {}  # device caches are rebuilt where the object lands
        return state

    # -- respacing ---------------------------------------------------------------------------

    def respace(self: _Process, steps: int | None) -> _Process:
        """The process respaced to ``steps`` evenly spaced steps (:func:`space_timesteps`), cached;
        ``self`` when ``steps`` is None or the full length. Of this process's class, so a respaced
        :class:`~unclip.diffusion.GaussianDiffusion` still trains and samples."""
        if steps is None or steps == self.num_timesteps:
            return self
        if self.num_timesteps != self.original_num_timesteps:
            raise ValueError("respace the original process, not an already respaced one")
        steps = int(steps)
        process = self._respaced.get(steps)
        if process is None:
            process = type(self)(self.cfg, use_timesteps=space_timesteps(self.num_timesteps, steps))
            self._respaced[steps] = process
        return process

    # -- forward process ---------------------------------------------------------------------

    def q_mean_variance(self, x_start: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log variance of q(x_t | x_0) = N(√ᾱ_t·x_0, (1−ᾱ_t)·I), Ho et al. eq. 4."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = self._extract("alphas_cumprod", t, x_start).neg().add(1.0).expand_as(x_start)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start).expand_as(x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_t ~ q(x_t | x_0): √ᾱ_t·x_0 + √(1−ᾱ_t)·ε (Ho et al. eq. 4); the only noising formula."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: Tensor, x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0) (Ho et al. eqs. 6-7):
        μ̃ = √ᾱ_{t−1}·β_t/(1−ᾱ_t)·x_0 + √α_t·(1−ᾱ_{t−1})/(1−ᾱ_t)·x_t, β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t)·β_t.
        At t = 0 the mean is x_0 and the variance 0 (its log is clipped to t = 1's value)."""
        mean = (
            self._extract("posterior_mean_coef1", t, x_t) * x_start
            + self._extract("posterior_mean_coef2", t, x_t) * x_t
        )
        variance = self._extract("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # -- parameterisations -------------------------------------------------------------------

    def predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_0 = (x_t − √(1−ᾱ)·ε)/√ᾱ (Ho et al. eq. 4 inverted)."""
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, x_start: Tensor) -> Tensor:
        """ε = (x_t/√ᾱ − x_0)/√(1/ᾱ − 1); finite for every t since ᾱ_t < 1 (β_0 > 0)."""
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x_start) / self._extract(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    def predict_v(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """v = √ᾱ·ε − √(1−ᾱ)·x_0 (Salimans & Ho 2022 §4)."""
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start) * noise
            - self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * x_start
        )

    def training_target(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """What the network should output at (x_t = q_sample(x_start, t, noise), t)."""
        if self.cfg.objective == "eps":
            return noise
        if self.cfg.objective == "x0":
            return x_start
        if self.cfg.objective == "v":
            return self.predict_v(x_start, t, noise)
        raise ValueError(f"unknown objective {self.cfg.objective!r}")

    def _xstart_eps(self, mean_out: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x̂_0, ε̂) from the mean prediction, without thresholding."""
        objective = self.cfg.objective
        if objective == "eps":
            return self.predict_xstart_from_eps(x_t, t, mean_out), mean_out
        if objective == "x0":
            return mean_out, self.predict_eps_from_xstart(x_t, t, mean_out)
        if objective == "v":
            a = self._extract("sqrt_alphas_cumprod", t, x_t)
            b = self._extract("sqrt_one_minus_alphas_cumprod", t, x_t)
            # x_0 = √ᾱ·x_t − √(1−ᾱ)·v and ε = √(1−ᾱ)·x_t + √ᾱ·v (since ᾱ + (1−ᾱ) = 1).
            return a * x_t - b * mean_out, b * x_t + a * mean_out
        raise ValueError(f"unknown objective {objective!r}")

    def threshold(self, x_start: Tensor) -> Tensor:
        """Apply ``cfg.thresholding`` to a predicted x_0.

        ``"static"`` clips to [-1, 1] (Ho et al. 2020's sampler); ``"dynamic"`` (Saharia et al. 2022
        §2.3) takes per sample s = max(quantile(|x̂_0|, p), 1), clips to [-s, s] and divides by s, so
        saturated predictions are pushed inward instead of clipped flat (matters with large guidance).
        """
        mode = self.cfg.thresholding
        if mode == "none":
            return x_start
        if mode == "static":
            return x_start.clamp(-1.0, 1.0)
        if mode == "dynamic":
            flat = x_start.abs().reshape(x_start.shape[0], -1)
            s = _quantile_rows(flat, self.cfg.dynamic_percentile).clamp(min=1.0)
            s = s.reshape(-1, *([1] * (x_start.ndim - 1)))
            return torch.maximum(torch.minimum(x_start, s), -s) / s
        raise ValueError(f"unknown thresholding {mode!r}")

    def _split(self, output: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor | None]:
        """(mean prediction, variance values or None), cast to the working dtype (≥ float32)."""
        output = output.to(work_dtype(x_t.dtype))
        if self.cfg.learned_variance:
            channels = x_t.shape[1]
            if output.shape[1] != 2 * channels or output.shape[2:] != x_t.shape[2:]:
                raise ValueError(
                    f"learned variance needs an output of shape {(x_t.shape[0], 2 * channels)}"
                    f"+{tuple(x_t.shape[2:])}, got {tuple(output.shape)}"
                )
            return output[:, :channels], output[:, channels:]
        if output.shape != x_t.shape:
            raise ValueError(f"model output {tuple(output.shape)} != x_t {tuple(x_t.shape)}")
        return output, None

    # -- reverse process ---------------------------------------------------------------------

    def p_mean_variance(
        self, model_fn: ModelFn, x_t: Tensor, t: Tensor, *, threshold: bool = True
    ) -> dict[str, Tensor]:
        """p(x_{t-1} | x_t): calls ``model_fn(x_t, original t)`` once.

        Returns ``mean``, ``variance``, ``log_variance`` (all of x_t's shape), ``pred_xstart``
        (thresholded per ``cfg.thresholding`` when ``threshold``), ``pred_eps`` (consistent with
        ``pred_xstart``) and the raw ``model_output``. The variance is the fixed β̃_t ("small") or β_t
        ("large") of Ho et al. §3.2, or with learned variance exp(v'·log β_t + (1−v')·log β̃_t) with
        v' = (v+1)/2 and v clamped to [-1, 1] (Improved DDPM eq. 15; the clamp keeps exp finite).
        Computed in float32 or wider whatever the model's dtype.
        """
        output = model_fn(x_t, self._map(t))
        return self._p_from_output(output, x_t, t, threshold=threshold)

    def _p_from_output(
        self, output: Tensor, x_t: Tensor, t: Tensor, *, threshold: bool
    ) -> dict[str, Tensor]:
        x_t = x_t.to(work_dtype(x_t.dtype))
        mean_out, var_out = self._split(output, x_t)
        pred_xstart, pred_eps = self._xstart_eps(mean_out, x_t, t)
        if threshold and self.cfg.thresholding != "none":
            pred_xstart = self.threshold(pred_xstart)
            pred_eps = self.predict_eps_from_xstart(x_t, t, pred_xstart)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        if var_out is None:
            name = (
                "large_log_variance"
                if self.cfg.fixed_variance == "large"
                else "posterior_log_variance_clipped"
            )
            log_variance = self._extract(name, t, x_t).expand_as(x_t)
        else:
            frac = (var_out.clamp(-1.0, 1.0) + 1.0) / 2.0
            max_log = self._extract("log_betas", t, x_t)
            min_log = self._extract("posterior_log_variance_clipped", t, x_t)
            log_variance = frac * max_log + (1.0 - frac) * min_log
        return {
            "mean": mean,
            "variance": torch.exp(log_variance),
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "pred_eps": pred_eps,
            "model_output": output,
        }


def _quantile_rows(x: Tensor, q: float) -> Tensor:
    """Per-row quantile with linear interpolation (``torch.quantile``'s default) via a sort, which,
    unlike ``torch.quantile``, has no input size limit (a batch of 256² images exceeds it)."""
    n = x.shape[1]
    position = q * (n - 1)
    lo = math.floor(position)
    hi = min(lo + 1, n - 1)
    weight = position - lo
    ordered = x.sort(dim=1).values
    return ordered[:, lo] * (1.0 - weight) + ordered[:, hi] * weight
