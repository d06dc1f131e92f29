"""The samplers of the Gaussian diffusion process: how a stage model draws x_0 from noise.

Written once on top of :class:`~unclip.diffusion_process.DiffusionProcess`, with the network only
as a model function ``fn(x_t, t)`` passed as an argument:

* ancestral DDPM sampling (Ho et al. 2020, Algorithm 2) with the process's fixed or learned
  variance (Nichol & Dhariwal 2021 eq. 15);
* DDIM sampling (Song et al. 2021 eq. 12, with σ_t(η) of eq. 16), which the unCLIP upsamplers
  sample with (Ramesh et al. 2022, appendix C, table 3) and the image manipulations decode with
  (section 3), and its deterministic η = 0 ODE run forward: DDIM inversion (Song et al. §4.3), how
  the paper gets an image's bipartite latent (section 3);
* both respaced to fewer steps than training used (Nichol & Dhariwal §4);
* classifier-free guidance (Ho & Salimans 2022 eq. 6; GLIDE §2.3) as a model function built from
  a network that can drop its conditioning, as the decoder and the diffusion prior sample
  (Ramesh et al. §2.1-2.2).

Every random number of a sampler (x_T and each step's z) comes from its ``generator``: one
``torch.Generator`` for the whole batch, or one per row (:data:`Generators`, :func:`randn_rows`), so
that a row's sample is a function of its own generator and not of the batch it is drawn in (up to
the floating-point differences of batched kernels): batch generation relies on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from unclip.diffusion_process import DiffusionProcess, ModelFn, randn, work_dtype

GuidableFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``fn3(x_t, t, drop) -> output``: ``drop`` (bool, (B,)) True where conditioning is dropped."""

Callback = Callable[[int, int, Tensor, Tensor], None]
"""``callback(done, total, x, pred_xstart)`` after each sampling step (x is the new, less noisy x)."""

Generators = torch.Generator | Sequence[torch.Generator] | None
"""Where a sampler's noise comes from: one generator for the whole batch, one per row (a sequence,
see :func:`randn_rows`), or None (torch's global generator)."""

__all__ = ["Callback", "DiffusionSampling", "Generators", "GuidableFn", "randn_rows"]


def randn_rows(
    shape: Sequence[int],
    generator: Generators,
    device: torch.device | str | None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise of ``shape`` (:func:`~unclip.diffusion_process.randn`), drawn from one
    generator, or by rows from a sequence of G generators: the batch's ``shape[0]`` rows are G
    groups of ``shape[0] / G`` adjacent rows (e.g. the prior's candidates of one caption, which
    ``repeat_interleave`` puts side by side), group g drawn from generator g with the shape it would
    have alone, and the groups stacked. So a group's noise is what the same generator draws for
    that group sampled on its own: with one sequence per row, a row's whole sampling trajectory
    depends only on its generator's seed."""
    if generator is None or isinstance(generator, torch.Generator):
        return randn(shape, generator, device, dtype)
    generators = list(generator)
    rows = int(shape[0])
    if not generators or rows % len(generators):
        raise ValueError(f"{len(generators)} generators for a batch of {rows} rows")
    per = (rows // len(generators), *shape[1:])
    return torch.cat([randn(per, g, device, dtype) for g in generators])


class DiffusionSampling(DiffusionProcess):
    """The samplers of a :class:`~unclip.diffusion_process.DiffusionProcess` (a base of
    :class:`~unclip.diffusion.GaussianDiffusion`)."""

    def _ddpm_step(
        self, out: dict[str, Tensor], x: Tensor, i: int, generator: Generators
    ) -> Tensor:
        """Ancestral step x_{t-1} = μ_θ + σ_t·z (Ho et al. Algorithm 2); no noise at t = 0."""
        mean = out["mean"]
        if i == 0:
            return mean
        z = randn_rows(x.shape, generator, x.device, mean.dtype)
        return mean + torch.exp(0.5 * out["log_variance"]) * z

    def _ddim_step(
        self,
        out: dict[str, Tensor],
        x: Tensor,
        t: Tensor,
        i: int,
        eta: float,
        generator: Generators,
    ) -> Tensor:
        """DDIM step (Song et al. eq. 12) with σ_t(η) of eq. 16:
        x_{t-1} = √ᾱ_{t−1}·x̂_0 + √(1−ᾱ_{t−1}−σ²)·ε̂ + σ·z,
        σ = η·√((1−ᾱ_{t−1})/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_{t−1}).
        A learned variance is not used (DDIM fixes its own)."""
        x0, eps = out["pred_xstart"], out["pred_eps"]
        abar = self._extract("alphas_cumprod", t, x0)
        abar_prev = self._extract("alphas_cumprod_prev", t, x0)
        sigma = (
            eta
            * ((1.0 - abar_prev) / (1.0 - abar)).sqrt()
            * (1.0 - abar / abar_prev).clamp(min=0.0).sqrt()
        )
        direction = (1.0 - abar_prev - sigma**2).clamp(min=0.0).sqrt()
        x_prev = abar_prev.sqrt() * x0 + direction * eps
        if eta > 0 and i > 0:
            x_prev = x_prev + sigma * randn_rows(x.shape, generator, x.device, x0.dtype)
        return x_prev

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        shape: Sequence[int],
        *,
        sampler: Literal["ddpm", "ddim"] | None = None,
        steps: int | None = None,
        eta: float | None = None,
        noise: Tensor | None = None,
        generator: Generators = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        callback: Callback | None = None,
        return_trajectory: bool = False,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Draw x_0 by running the reverse process from x_T = ``noise`` (N(0, I) if None).

        ``sampler`` "ddpm" (ancestral, Ho et al. Algorithm 2, with this process's variance) or "ddim"
        (Song et al. eq. 12 with ``eta``), respaced to ``steps``; each defaults to the config's value.
        ``noise`` fixes the device and dtype, else ``device``/``dtype``. ``generator`` draws x_T and
        every step's noise (a CPU generator works for any device); a sequence of generators draws
        them by rows (:func:`randn_rows`), so that each row group samples as it would alone
        (up to the rounding of batched kernels). ``callback(done, total, x,
        pred_xstart)`` runs after each step. Returns x_0 (float32 or wider), or with
        ``return_trajectory`` (x_0, [x_T, …, x_0]).
        """
        sampler = sampler or self.cfg.sampler
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"unknown sampler {sampler!r}")
        eta = self.cfg.eta if eta is None else float(eta)
        process = self.respace(steps or self.cfg.sampling_steps)
        if noise is None:
            x = randn_rows(shape, generator, device, dtype)
        else:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise shape {tuple(noise.shape)} != {tuple(shape)}")
            x = noise
        trajectory = [x] if return_trajectory else []
        total = process.num_timesteps
        for done, i in enumerate(reversed(range(total)), start=1):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            out = process.p_mean_variance(model_fn, x, t)
            if sampler == "ddpm":
                x = process._ddpm_step(out, x, i, generator)
            else:
                x = process._ddim_step(out, x, t, i, eta, generator)
            if return_trajectory:
                trajectory.append(x)
            if callback is not None:
                callback(done, total, x, out["pred_xstart"])
        return (x, trajectory) if return_trajectory else x

    @torch.no_grad()
    def ddim_invert(
        self, model_fn: ModelFn, x_start: Tensor, *, steps: int | None = None
    ) -> Tensor:
        """Run the deterministic DDIM ODE (η = 0) forward: x_0 → x_T (Song et al. §4.3).

        The data is taken as the state at the first kept step (ᾱ ≈ 1) and each step i → i+1 uses the
        model at (x_i, i): x_{i+1} = √ᾱ_{i+1}·x̂_0 + √(1−ᾱ_{i+1})·ε̂, mirroring the sampler, so
        ``sample(..., sampler="ddim", eta=0, steps=steps, noise=ddim_invert(...))`` reconstructs
        ``x_start`` up to discretisation error. Respaced to ``steps`` (default ``cfg.sampling_steps``).
        """
        process = self.respace(steps or self.cfg.sampling_steps)
        x = x_start.to(work_dtype(x_start.dtype))
        for i in range(process.num_timesteps - 1):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            out = process.p_mean_variance(model_fn, x, t)
            abar_next = process._extract("alphas_cumprod_next", t, x)
            x = abar_next.sqrt() * out["pred_xstart"] + (1.0 - abar_next).sqrt() * out["pred_eps"]
        return x

    # -- guidance ----------------------------------------------------------------------------

    def guided(self, fn3: GuidableFn, scale: float) -> ModelFn:
        """Classifier-free guidance (Ho & Salimans 2022 eq. 6; GLIDE §2.3) as a model function.

        The conditional (drop = False) and unconditional (drop = True) branches run in ONE batched
        forward of 2B rows; the result is uncond + scale·(cond − uncond) on the mean channels and the
        conditional half's variance channels when the variance is learned. Guiding the raw output is
        the same as guiding ε for every objective (x̂_0 and v are affine in ε at fixed x_t, t).
        ``scale == 1`` runs only the conditional forward (B rows).
        """
        scale = float(scale)
        learned = self.cfg.learned_variance

        def conditional(x_t: Tensor, t: Tensor) -> Tensor:
            drop = torch.zeros(x_t.shape[0], dtype=torch.bool, device=x_t.device)
            return fn3(x_t, t, drop)

        if scale == 1.0:
            return conditional

        def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
            batch = x_t.shape[0]
            drop = torch.zeros(2 * batch, dtype=torch.bool, device=x_t.device)
            drop[batch:] = True
            out = fn3(torch.cat([x_t, x_t]), torch.cat([t, t]), drop)
            cond, uncond = out[:batch], out[batch:]
            if learned:
                channels = x_t.shape[1]
                mean = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
                return torch.cat([mean, cond[:, channels:]], dim=1)
            return uncond + scale * (cond - uncond)

        return model_fn
