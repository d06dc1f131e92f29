"""The training objective of the Gaussian diffusion process (Ho et al. 2020; Nichol & Dhariwal
2021).

What a stage model minimises, written once on top of
:class:`~unclip.diffusion_process.DiffusionProcess` (the network enters only as a model function
``fn(x_t, t)`` passed as an argument):

* L_simple, the mean squared error of the mean prediction against the objective's target (Ho et al.
  2020 eq. 14 for ε; the same form for x₀ and v, Salimans & Ho 2022 §4), optionally weighted by
  Min-SNR-γ (Hang et al. 2023);
* with a learned variance, the variational-bound term L_t (Ho et al. eq. 5: Gaussian KLs, and the
  discretized Gaussian decoder NLL of §3.3 at t = 0) and the hybrid loss L_simple + λ·L_vlb
  (Nichol & Dhariwal 2021 §3.1, eq. 16), as the unCLIP decoder trains (Ramesh et al. 2022,
  table 3);
* the likelihood terms those need (:func:`normal_kl`, :func:`discretized_gaussian_log_likelihood`),
  elementwise, in float32 or wider.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from unclip.diffusion_process import DiffusionProcess, ModelFn, randn, work_dtype

__all__ = ["DiffusionLosses", "discretized_gaussian_log_likelihood", "normal_kl"]

# ----------------------------------------------------------------------------------------------
# Likelihood terms (float32 or wider; used by the hybrid loss)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


_MAX_Z = 1000.0


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log p(x) of 8-bit data in [-1, 1] under N(means, e^{2·log_scales}) integrated over the pixel's
    bin (Ho et al. 2020 §3.3 decoder L_0); the edge bins extend to ±∞. Elementwise, in nats.

    Uses ``log_ndtr`` for the tails and clamps probabilities at 1e-12 (no log 0 when the predicted
    scale is tiny), and clamps the standardised bin edges to ±1000 (log-probabilities below about
    -5e5 nats): float32 ``log_ndtr`` has wrong gradients beyond a few thousand and NaN ones beyond
    ~1e8. Result and gradients stay finite for any finite inputs.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    plus_in = (inv_std * (centered + 1.0 / 255.0)).clamp(-_MAX_Z, _MAX_Z)
    min_in = (inv_std * (centered - 1.0 / 255.0)).clamp(-_MAX_Z, _MAX_Z)
    log_cdf_plus = torch.special.log_ndtr(plus_in)  # log P(X ≤ x + 1/255): the lowest bin
    log_one_minus_cdf_min = torch.special.log_ndtr(-min_in)  # log P(X > x − 1/255): the highest
    cdf_delta = torch.special.ndtr(plus_in) - torch.special.ndtr(min_in)
    log_delta = torch.log(cdf_delta.clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    )


def _mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


# ----------------------------------------------------------------------------------------------
# The objective


class DiffusionLosses(DiffusionProcess):
    """The training losses of a :class:`~unclip.diffusion_process.DiffusionProcess` (a base of
    :class:`~unclip.diffusion.GaussianDiffusion`)."""

    def training_losses(
        self,
        model_fn: ModelFn,
        x_start: Tensor,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample (B,) losses at t (uniform in [0, T) if None) and noise (N(0, I) if None).

        ``"mse"``: mean squared error of the mean prediction against the objective's target
        (L_simple, Ho et al. eq. 14, for ε; the same form for x₀ and v). With learned variance,
        ``"vb"``: the variational-bound term L_t in bits per dimension, computed with a stop-gradient
        on the mean prediction so it trains only the variance (Improved DDPM §3.1): the Gaussian KL
        of eq. 5 for t > 0, and at t = 0 for images (4-d x) the discretized Gaussian decoder NLL
        (Ho et al. §3.3; data in [-1, 1]); vectors use the KL at t = 0 too. ``"loss"`` = mse, or the
        hybrid L_simple + λ·L_vlb (Improved DDPM eq. 16) with λ = ``cfg.vlb_weight``: L_vlb = Σ_t L_t
        is estimated by T·L_t, as improved-diffusion's ``vb *= num_timesteps / 1000`` with λ = 1e-3.
        The losses are computed in float32 (or float64) even under autocast.
        """
        batch = x_start.shape[0]
        device = x_start.device
        if t is None:
            where = generator.device if generator is not None else device
            t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=where)
            t = t.to(device)
        if noise is None:
            noise = randn(x_start.shape, generator, device, x_start.dtype)
        x_t = self.q_sample(x_start, t, noise)
        output = model_fn(x_t, self._map(t))
        work = work_dtype(x_start.dtype)
        with torch.autocast(device_type=device.type, enabled=False):
            mean_out, var_out = self._split(output, x_t)
            target = self.training_target(x_start.to(work), t, noise.to(work))
            mse = _mean_flat((target - mean_out) ** 2)
            terms = {"mse": mse}
            if self.cfg.min_snr_gamma is not None:
                mse = mse * self.min_snr_weight(t).to(work)
            if var_out is None:
                terms["loss"] = mse
            else:
                frozen = torch.cat([mean_out.detach(), var_out], dim=1)
                vb = self._vb_bits(frozen, x_start.to(work), x_t.to(work), t)
                terms["vb"] = vb
                terms["loss"] = mse + self.cfg.vlb_weight * self.num_timesteps * vb
        return terms

    def min_snr_weight(self, t: Tensor) -> Tensor:
        """Min-SNR-γ weights (Hang et al. 2023, eq. 8 and §3.4) for the objective's MSE at ``t``.

        With SNR = ᾱ/(1−ᾱ) and x_t fixed, ‖ε̂−ε‖² = SNR·‖x̂₀−x₀‖² and ‖v̂−v‖² = ‖ε̂−ε‖²/ᾱ =
        ‖ε̂−ε‖²·(SNR + 1)/SNR, so the ε-loss weighted by min(SNR, γ)/SNR is the ε-MSE times
        min(SNR, γ)/SNR, the x₀-MSE times min(SNR, γ), and the v-MSE times min(SNR, γ)/(SNR + 1).
        """
        alpha_bar = self._table("alphas_cumprod", t.device)[t]
        snr = alpha_bar / (1.0 - alpha_bar).clamp(min=1e-20)
        clipped = snr.clamp(max=float(self.cfg.min_snr_gamma))
        if self.cfg.objective == "eps":
            return clipped / snr.clamp(min=1e-20)
        if self.cfg.objective == "x0":
            return clipped
        return clipped / (snr + 1.0)

    def _vb_bits(self, output: Tensor, x_start: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """L_t of the variational bound in bits/dim, per sample (Ho et al. eq. 5; Improved DDPM)."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self._p_from_output(output, x_t, t, threshold=False)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        kl = _mean_flat(kl) / math.log(2.0)
        if x_start.ndim != 4:
            return kl
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        nll = _mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)
