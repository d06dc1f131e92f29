"""The prior (Ramesh et al. 2022, section 2.1): caption → CLIP image embedding.

(The networks land with the model-library issue; their hyperparameters are here.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from unclip.fields import param, require


@dataclass
class PriorNetConfig:
    """The prior network (paper section 2.1): caption → CLIP image embedding."""

    kind: Literal["diffusion", "autoregressive"] = param("diffusion", "which prior (section 2.1)")
    width: int = param(128, "transformer width", ge=8)
    depth: int = param(2, "transformer layers", ge=1)
    heads: int = param(4, "attention heads", ge=1)
    text_context: int = param(32, "caption tokens the prior reads (longer captions are cut)", ge=1)
    dropout: float = param(0.0, "dropout in the transformer", ge=0, lt=1)
    cond_drop_prob: float = param(
        0.1,
        "probability of dropping the text conditioning in training (classifier-free)",
        ge=0,
        le=1,
    )
    num_candidates: int = param(
        2, "diffusion prior: samples drawn, keeping the one closest to the text embedding", ge=1
    )
    pca_dims: int = param(16, "autoregressive prior: PCA dimensions kept (paper: 319)", ge=1)
    quant_bins: int = param(
        64, "autoregressive prior: buckets per PCA dimension (paper: 1024)", ge=2
    )

    def validate(self) -> None:
        require(
            self.width % self.heads == 0,
            "heads",
            f"must divide width ({self.width}), got {self.heads}",
        )
