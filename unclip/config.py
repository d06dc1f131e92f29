"""Hyperparameters of the diffusion process and the networks, as typed dataclasses.

Pure data: the stage configs in ``pipeline.stage_config`` embed these sections, the networks and the
diffusion process are built from them. Defaults are small; the paper's values (Ramesh et al. 2022,
appendix C, table 3) are in ``configs/*/paper.yaml``.
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


@dataclass
class DecoderNetConfig:
    """The 64px decoder (section 2.2): a GLIDE UNet conditioned on the CLIP image embedding."""

    image_size: int = param(64, "output resolution", ge=8)
    channels: int = param(32, "base channels of the UNet", ge=8)
    channel_mult: tuple[int, ...] = param((1, 2, 2), "channel multiplier per resolution")
    num_res_blocks: int = param(1, "residual blocks per resolution", ge=1)
    attention_resolutions: tuple[int, ...] = param((16,), "resolutions with self-attention")
    head_channels: int = param(32, "channels per attention head", ge=1)
    dropout: float = param(0.0, "dropout in residual blocks", ge=0, lt=1)
    clip_tokens: int = param(4, "extra context tokens projected from the image embedding", ge=0)
    text_context: int = param(32, "caption tokens read by the text encoder", ge=1)
    text_width: int = param(64, "caption encoder width", ge=8)
    text_depth: int = param(1, "caption encoder layers", ge=0)
    text_heads: int = param(2, "caption encoder heads", ge=1)
    image_emb_drop: float = param(
        0.1, "probability of dropping the image embedding in training", ge=0, le=1
    )
    text_drop: float = param(0.5, "probability of dropping the caption in training", ge=0, le=1)

    def validate(self) -> None:
        require(len(self.channel_mult) >= 1, "channel_mult", "needs at least one resolution")
        downsample = 2 ** (len(self.channel_mult) - 1)
        require(
            self.image_size % downsample == 0,
            "channel_mult",
            f"{len(self.channel_mult)} resolutions need image_size divisible by {downsample}",
        )
        require(
            self.text_width % self.text_heads == 0,
            "text_heads",
            f"must divide text_width ({self.text_width}), got {self.text_heads}",
        )


@dataclass
class UpsamplerNetConfig:
    """A super-resolution UNet (section 2.2): low-resolution image → high-resolution image."""

    low_res: int = param(64, "input resolution", ge=8)
    high_res: int = param(256, "output resolution", ge=16)
    channels: int = param(32, "base channels of the UNet", ge=8)
    channel_mult: tuple[int, ...] = param((1, 2, 2), "channel multiplier per resolution")
    num_res_blocks: int = param(1, "residual blocks per resolution", ge=1)
    dropout: float = param(0.0, "dropout in residual blocks", ge=0, lt=1)
    crop_fraction: float = param(
        0.25, "training crops are this fraction of the high-res side", gt=0, le=1
    )
    augmentation: Literal["blur", "bsr"] = param(
        "blur", "noise-conditioning augmentation of the low-res input: Gaussian blur or BSR"
    )

    def validate(self) -> None:
        require(
            self.high_res > self.low_res,
            "high_res",
            f"must be larger than low_res ({self.low_res})",
        )
