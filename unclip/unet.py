"""UNets for the 64px decoder and the upsamplers (Ramesh et al. 2022, section 2.2).

(The networks land with the model-library issue; their hyperparameters are here.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from unclip.fields import param, require


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
