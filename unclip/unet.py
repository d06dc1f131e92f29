"""UNets for the 64px decoder and the upsamplers (Ramesh et al. 2022, section 2.1) and their
configs.

Both wrap the ADM UNet body (Dhariwal & Nichol 2021) as GLIDE uses it (Nichol et al. 2021),
:class:`unclip.adm_unet.UNet`, whose architecture that module describes.

:class:`DecoderUNet` adds unCLIP's conditioning (DALL-E 2 section 2.1): every attention layer also
attends to the projected text-encoder sequence (GLIDE's ``encoder_kv``, section 2.3 of GLIDE),
masking caption padding. :class:`UpsamplerUNet` has no attention anywhere and no text or CLIP
conditioning (section 2.1, "we use only spatial convolutions"), so it runs at any size divisible by
``2 ** (len(channel_mult) - 1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from unclip.adm_unet import UNet
from unclip.fields import param, require
from unclip.transformer import TextEncoder

# ----------------------------------------------------------------------------------------------
# Configs


@dataclass
class DecoderNetConfig:
    """The 64px decoder (section 2.1): a GLIDE UNet conditioned on the CLIP image embedding."""

    image_size: int = param(64, "output resolution", ge=8)
    channels: int = param(32, "base channels of the UNet", ge=8)
    patch_size: int = param(
        1,
        "pixels per side folded into channels before the first layer (space-to-depth, unfolded "
        "after the last): the UNet runs at image_size / patch_size, about patch_size² cheaper",
        ge=1,
    )
    channel_mult: tuple[int, ...] = param((1, 2, 2), "channel multiplier per resolution")
    num_res_blocks: int = param(1, "residual blocks per resolution", ge=1)
    attention_resolutions: tuple[int, ...] = param(
        (16,), "feature-map resolutions with self-attention (image_size / patch_size at level 0)"
    )
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
    grad_checkpointing: bool = param(
        False, "recompute each UNet block and text layer in the backward pass to save memory"
    )

    def validate(self) -> None:
        require(len(self.channel_mult) >= 1, "channel_mult", "needs at least one resolution")
        require(all(m >= 1 for m in self.channel_mult), "channel_mult", "must be positive")
        downsample = self.patch_size * 2 ** (len(self.channel_mult) - 1)
        require(
            self.image_size % downsample == 0,
            "channel_mult",
            f"{len(self.channel_mult)} resolutions with patch_size {self.patch_size} need "
            f"image_size divisible by {downsample}",
        )
        require(
            self.text_width % self.text_heads == 0,
            "text_heads",
            f"must divide text_width ({self.text_width}), got {self.text_heads}",
        )
        for level, mult in enumerate(self.channel_mult):
            width = self.channels * mult
            if self.feature_size(level) in self.attention_resolutions:
                require(
                    width % self.head_channels == 0,
                    "head_channels",
                    f"must divide the channels ({width}) at resolution "
                    f"{self.feature_size(level)}, got {self.head_channels}",
                )

    def feature_size(self, level: int) -> int:
        """Side of the UNet's feature maps at ``level`` (0: after the space-to-depth input)."""
        return self.image_size // self.patch_size // 2**level


@dataclass
class UpsamplerNetConfig:
    """A super-resolution UNet (section 2.1): low-resolution image → high-resolution image."""

    low_res: int = param(64, "input resolution", ge=8)
    high_res: int = param(256, "output resolution", ge=16)
    channels: int = param(32, "base channels of the UNet", ge=8)
    patch_size: int = param(
        1, "pixels per side folded into channels (space-to-depth) before the first layer", ge=1
    )
    channel_mult: tuple[int, ...] = param((1, 2, 2), "channel multiplier per resolution")
    num_res_blocks: int = param(1, "residual blocks per resolution", ge=1)
    dropout: float = param(0.0, "dropout in residual blocks", ge=0, lt=1)
    crop_fraction: float = param(
        0.25, "training crops are this fraction of the high-res side", gt=0, le=1
    )
    augmentation: Literal["blur", "bsr"] = param(
        "blur", "noise-conditioning augmentation of the low-res input: Gaussian blur or BSR"
    )
    blur_sigma: tuple[float, float] = param(
        (0.4, 0.6),
        "augmentation 'blur': Gaussian blur σ (in low-res pixels) drawn uniformly from this range",
    )
    sample_blur_sigma: float = param(
        0.4,
        "Gaussian blur σ (low-res pixels) applied to the conditioning image at sampling time, "
        "so it looks like the corrupted inputs seen in training (0: none)",
        ge=0,
    )
    residual: bool = param(
        False,
        "diffuse the residual (high-res − upscaled conditioning image) / 2 instead of the image, "
        "and add it back when sampling (not in the paper; a small upsampler learns it far faster)",
    )
    grad_checkpointing: bool = param(
        False, "recompute each UNet block in the backward pass to save memory"
    )

    def crop_size(self) -> int:
        """Side of the training crops in high-res pixels."""
        return round(self.crop_fraction * self.high_res)

    def validate(self) -> None:
        require(
            self.high_res > self.low_res,
            "high_res",
            f"must be larger than low_res ({self.low_res})",
        )
        require(len(self.channel_mult) >= 1, "channel_mult", "needs at least one resolution")
        require(all(m >= 1 for m in self.channel_mult), "channel_mult", "must be positive")
        downsample = self.patch_size * 2 ** (len(self.channel_mult) - 1)
        require(
            self.crop_size() % downsample == 0 and self.high_res % downsample == 0,
            "crop_fraction",
            f"{len(self.channel_mult)} resolutions with patch_size {self.patch_size} need "
            "high_res and the crop side "
            f"(crop_fraction × high_res = {self.crop_size()}) divisible by {downsample}",
        )
        low, high = self.blur_sigma
        require(0 <= low <= high, "blur_sigma", f"needs 0 ≤ low ≤ high, got {self.blur_sigma}")


# ----------------------------------------------------------------------------------------------
# The decoder and the upsamplers


def _drop_mask(drop: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    if drop is None:
        return torch.zeros(batch, dtype=torch.bool, device=device)
    return drop.to(device=device, dtype=torch.bool).reshape(batch)


class DecoderUNet(nn.Module):
    """unCLIP's 64px decoder network (DALL-E 2 section 2.1, on GLIDE's text-conditional UNet).

    Conditioning, added to GLIDE's (Nichol et al. 2021 section 2.3):

    * the caption goes through :class:`~unclip.transformer.TextEncoder`; the feature of its last
      unpadded token (the end-of-text token, which a causal encoder makes a summary of the caption)
      is projected and added to the timestep embedding, as GLIDE does;
    * the CLIP image embedding is projected and added to the timestep embedding, and projected into
      ``clip_tokens`` extra context tokens appended to the caption's token sequence (DALL-E 2
      section 2.1); every attention layer attends to [caption tokens; CLIP tokens] besides its own
      pixels, with caption padding masked;
    * classifier-free guidance (section 2.1; Ho & Salimans 2022): ``drop_image`` rows use a learned
      null image embedding instead of theirs (so both its timestep term and its CLIP tokens come
      from the null), ``drop_text`` rows see one learned null caption token, which also stands for
      the caption's pooled feature, and nothing of their caption.

    Output: (B, 3, H, W), or (B, 6, H, W) with ``learned_variance`` (mean channels first, then the
    variance interpolation, Improved DDPM eq. 15).
    """

    def __init__(
        self,
        cfg: DecoderNetConfig,
        *,
        embed_dim: int,
        vocab_size: int = 49408,
        learned_variance: bool,
    ) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed_dim = embed_dim
        width = cfg.text_width
        attention_levels = frozenset(
            level
            for level in range(len(cfg.channel_mult))
            if cfg.feature_size(level) in cfg.attention_resolutions
        )
        self.unet = UNet(
            in_channels=3,
            out_channels=6 if learned_variance else 3,
            channels=cfg.channels,
            channel_mult=tuple(cfg.channel_mult),
            num_res_blocks=cfg.num_res_blocks,
            attention_levels=attention_levels,
            head_channels=cfg.head_channels,
            dropout=cfg.dropout,
            context_channels=width,
            grad_checkpointing=cfg.grad_checkpointing,
            patch_size=cfg.patch_size,
        )
        emb_dim = self.unet.emb_dim
        self.text_encoder = TextEncoder(
            vocab_size=vocab_size,
            context=cfg.text_context,
            width=width,
            depth=cfg.text_depth,
            heads=cfg.text_heads,
        )
        self.text_to_emb = nn.Linear(width, emb_dim)
        self.image_to_emb = nn.Linear(embed_dim, emb_dim)
        self.image_to_tokens = (
            nn.Linear(embed_dim, cfg.clip_tokens * width) if cfg.clip_tokens else None
        )
        self.null_image = nn.Parameter(torch.randn(embed_dim) / math.sqrt(embed_dim))
        self.null_text = nn.Parameter(torch.randn(width) * 0.02)
        self.start_token = min(49406, vocab_size - 1)  # open_clip's start-of-text id

    def encode_text(
        self, text_tokens: torch.Tensor, drop_text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Caption → (token features (B, L, W), padding mask (B, L), pooled feature (B, W)).

        An all-padding row (an empty caption) is read as a lone start-of-text token, so no
        attention row of the causal encoder is empty (which would give NaN)."""
        tokens = text_tokens.long()[:, : self.cfg.text_context]
        empty = (tokens == 0).all(dim=1)
        if bool(empty.any()):
            tokens = tokens.clone()
            tokens[empty, 0] = self.start_token
        if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
            feats, padding = checkpoint(self.text_encoder, tokens, use_reentrant=False)
        else:
            feats, padding = self.text_encoder(tokens)
        last = ((~padding).sum(dim=1) - 1).clamp(min=0)
        pooled = feats[torch.arange(feats.shape[0], device=feats.device), last]
        null = self.null_text.to(feats.dtype)
        dropped = drop_text[:, None]
        pooled = torch.where(dropped, null, pooled)
        first = torch.zeros_like(padding)
        first[:, 0] = True
        feats = torch.where(dropped[:, :, None] & first[:, :, None], null, feats)
        padding = torch.where(dropped, ~first, padding)
        return feats, padding, pooled

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        *,
        image_emb: torch.Tensor,
        text_tokens: torch.Tensor,
        drop_image: torch.Tensor | None = None,
        drop_text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, device = x_t.shape[0], x_t.device
        drop_image = _drop_mask(drop_image, b, device)
        drop_text = _drop_mask(drop_text, b, device)
        dtype = self.image_to_emb.weight.dtype
        image_emb = torch.where(
            drop_image[:, None], self.null_image.to(dtype), image_emb.to(device, dtype)
        )
        feats, padding, pooled = self.encode_text(text_tokens.to(device), drop_text)
        context, context_mask = feats, padding
        if self.image_to_tokens is not None:
            clip_tokens = self.image_to_tokens(image_emb).reshape(b, self.cfg.clip_tokens, -1)
            context = torch.cat([feats, clip_tokens.to(feats.dtype)], dim=1)
            context_mask = torch.cat([padding, padding.new_zeros(b, self.cfg.clip_tokens)], dim=1)
        emb = self.unet.time_embedding(t) + self.image_to_emb(image_emb) + self.text_to_emb(pooled)
        return self.unet(x_t, emb, context, context_mask).to(x_t.dtype)


class UpsamplerUNet(nn.Module):
    """A super-resolution UNet (DALL-E 2 section 2.1; ADM's ``SuperResModel`` without attention).

    The input is x_t concatenated on channels with the low-resolution conditioning image already
    upsampled to x_t's size; only spatial convolutions (no attention layers, section 2.1), so the
    same weights run on training crops and on full images. No caption or CLIP conditioning (the
    paper's upsamplers have none). Output: (B, 3, H, W), or (B, 6, H, W) with learned variance.
    """

    def __init__(self, cfg: UpsamplerNetConfig, *, learned_variance: bool) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.unet = UNet(
            in_channels=6,
            out_channels=6 if learned_variance else 3,
            channels=cfg.channels,
            channel_mult=tuple(cfg.channel_mult),
            num_res_blocks=cfg.num_res_blocks,
            attention_levels=frozenset(),
            head_channels=1,
            dropout=cfg.dropout,
            grad_checkpointing=cfg.grad_checkpointing,
            patch_size=cfg.patch_size,
        )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, *, low_res: torch.Tensor) -> torch.Tensor:
        """``low_res``: the conditioning image (B, 3, H, W), upsampled to x_t's size already."""
        if low_res.shape != (x_t.shape[0], 3, *x_t.shape[2:]):
            raise ValueError(
                f"low_res must be upsampled to x_t's size {tuple(x_t.shape)}, got "
                f"{tuple(low_res.shape)}"
            )
        x = torch.cat([x_t, low_res.to(x_t.device, x_t.dtype)], dim=1)
        return self.unet(x, self.unet.time_embedding(t)).to(x_t.dtype)
