"""Gaussian diffusion (Ho et al. 2020; Nichol & Dhariwal 2021), apart from every network.

(The process itself lands with the model-library issue; its hyperparameters are here.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from unclip.fields import param, require


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
    sampler: Literal["ddpm", "ddim"] = param("ddim", "sampler used for generation")
    sampling_steps: int = param(64, "respaced steps used for generation", ge=1)
    eta: float = param(0.0, "DDIM η: 0 is deterministic, 1 matches DDPM's variance", ge=0)
    guidance_scale: float = param(1.0, "classifier-free guidance scale (1: no guidance)", ge=0)
    thresholding: Literal["none", "static", "dynamic"] = param(
        "static", "clip predicted x₀ to [-1, 1] (static) or by percentile (dynamic, Imagen)"
    )
    dynamic_percentile: float = param(0.995, "percentile for dynamic thresholding", gt=0, le=1)

    def validate(self) -> None:
        require(
            self.sampling_steps <= self.timesteps,
            "sampling_steps",
            f"must be at most timesteps ({self.timesteps}), got {self.sampling_steps}",
        )
