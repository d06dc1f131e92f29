"""UNets for the 64px decoder and the upsamplers (Ramesh et al. 2022, section 2.1).

Both are the ADM UNet (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs"), as GLIDE uses it
(Nichol et al. 2021):

* a sinusoidal timestep embedding followed by a two-layer MLP (width 4 × ``channels``);
* residual blocks GroupNorm → SiLU → conv → GroupNorm → scale-shift (FiLM) from the embedding →
  SiLU → dropout → conv, ADM's ``use_scale_shift_norm`` (ADM section 3);
* resolution changes inside residual blocks (ADM's ``resblock_updown``, which GLIDE also uses):
  average pooling down, nearest-neighbour up, applied to both the residual branch and the skip;
* multi-head self-attention (``head_channels`` per head) at the configured resolutions; in the
  decoder every attention layer also attends to the projected text-encoder sequence (GLIDE's
  ``encoder_kv``, section 2.3 of GLIDE), masking caption padding;
* skip connections from every encoder block to the decoder half; the last conv of every residual
  block, every attention output projection and the output conv are zero-initialised, so a fresh
  network predicts 0 and each block starts as the identity.

:class:`DecoderUNet` adds unCLIP's conditioning (DALL-E 2 section 2.1); :class:`UpsamplerUNet` has
no attention anywhere and no text or CLIP conditioning (section 2.1, "we use only spatial
convolutions"), so it runs at any size divisible by ``2 ** (len(channel_mult) - 1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

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
# Building blocks


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017; ADM), float32."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (ADM's ``GroupNorm32``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(
            x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps
        ).to(x.dtype)


def norm(channels: int) -> GroupNorm32:
    """32 groups as ADM, fewer when 32 does not divide ``channels`` (small test networks)."""
    return GroupNorm32(math.gcd(32, channels), channels)


def zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def upsample_nearest2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling of (B, C, H, W), as ``F.interpolate(x, scale_factor=2)``.

    Written as a broadcast and a reshape because ATen's CPU nearest kernel is several times slower
    (about 7x on 2 cores for 64 channels at 32 px), which made upsampling a sixth of a tiny UNet's
    forward pass; on GPU both are memory-bound copies.
    """
    b, c, h, w = x.shape
    return x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)


class ResBlock(nn.Module):
    """ADM residual block with scale-shift norm and optional down/up-sampling inside it.

    out = skip(resample(x)) + conv(dropout(SiLU(GN(h) · (1 + scale) + shift))),
    h = conv(resample(SiLU(GN(x)))), (scale, shift) = Linear(SiLU(emb)).
    """

    def __init__(
        self,
        channels: int,
        emb_dim: int,
        out_channels: int,
        *,
        dropout: float = 0.0,
        resample: Literal["none", "down", "up"] = "none",
    ) -> None:
        super().__init__()
        self.resample = resample
        self.in_norm = norm(channels)
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_channels)
        self.out_norm = norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = (
            nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)
        )

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return upsample_nearest2x(x)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_conv(self._resample(F.silu(self.in_norm(x))))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale) + shift
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(self._resample(x)) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over pixels, optionally also over an encoder sequence.

    With ``context_channels`` the keys and values are [projected context tokens; pixels] (GLIDE's
    ``encoder_kv``): every pixel can read the caption and the CLIP tokens. ``context_mask`` (B, L)
    is True at keys to ignore (caption padding); the pixels' own keys keep every softmax row
    non-empty.
    """

    def __init__(self, channels: int, head_channels: int, context_channels: int | None) -> None:
        super().__init__()
        if channels % head_channels:
            raise ValueError(f"head_channels ({head_channels}) must divide channels ({channels})")
        self.heads = channels // head_channels
        self.norm = norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.context_kv = (
            nn.Linear(context_channels, 2 * channels) if context_channels is not None else None
        )
        self.proj = zero(nn.Conv1d(channels, channels, 1))

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, c, height, width = x.shape
        heads, d = self.heads, c // self.heads
        qkv = self.qkv(self.norm(x).reshape(b, c, height * width))
        q, k, v = qkv.reshape(b, 3, heads, d, height * width).transpose(-1, -2).unbind(1)
        mask = None
        if self.context_kv is not None and context is not None:
            ek, ev = (
                self.context_kv(context)
                .reshape(b, -1, 2, heads, d)
                .permute(2, 0, 3, 1, 4)
                .to(k.dtype)
                .unbind(0)
            )
            k, v = torch.cat([ek, k], dim=2), torch.cat([ev, v], dim=2)
            if context_mask is not None:
                keep = torch.cat([~context_mask, context_mask.new_ones(b, height * width)], dim=1)
                mask = keep[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(-1, -2).reshape(b, c, height * width)
        return x + self.proj(y).reshape(b, c, height, width)


class _Stage(nn.Module):
    """One UNet step: a residual block, then attention if this resolution has it."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None,
        context_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        x = self.res(x, emb)
        if self.attn is not None:
            x = self.attn(x, context, context_mask)
        return x


class UNet(nn.Module):
    """The ADM UNet body: ``forward(x, emb, context, context_mask)`` → output channels.

    ``patch_size`` p > 1 folds each p×p block of input pixels into channels (space-to-depth) before
    the first convolution and unfolds the output the same way, so every level runs at 1/p the
    resolution: about p² less compute for the same channels, the patching that simple diffusion
    (Hoogeboom et al. 2023) and ViT-style diffusion models use to avoid full-resolution feature
    maps. ``attention_levels`` are level indices (0 = the first, p-times-smaller, resolution; one
    per ``channel_mult`` entry)
    whose residual blocks are followed by attention; the middle block has attention iff the lowest
    level does. ``context_channels`` (None: no encoder sequence) is the width of the sequence every
    attention layer also attends to.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        channels: int,
        channel_mult: tuple[int, ...],
        num_res_blocks: int,
        attention_levels: frozenset[int],
        head_channels: int,
        dropout: float,
        context_channels: int | None = None,
        grad_checkpointing: bool = False,
        patch_size: int = 1,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.emb_dim = emb_dim = 4 * channels
        self.grad_checkpointing = grad_checkpointing
        self.levels = len(channel_mult)
        self.time_embed = nn.Sequential(
            nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.channels = channels

        def stage(cin: int, cout: int, level: int, resample: str = "none") -> _Stage:
            attn = (
                AttentionBlock(cout, head_channels, context_channels)
                if level in attention_levels and resample == "none"
                else None
            )
            return _Stage(ResBlock(cin, emb_dim, cout, dropout=dropout, resample=resample), attn)

        ch = channels * channel_mult[0]
        self.input_conv = nn.Conv2d(in_channels * patch_size**2, ch, 3, padding=1)
        skips = [ch]
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(stage(ch, channels * mult, level))
                ch = channels * mult
                skips.append(ch)
            if level != self.levels - 1:
                self.down.append(stage(ch, ch, level, "down"))
                skips.append(ch)
        bottom = self.levels - 1
        self.middle = nn.ModuleList([stage(ch, ch, bottom), stage(ch, ch, -1)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                self.up.append(stage(ch + skips.pop(), channels * mult, level))
                ch = channels * mult
                if level and i == num_res_blocks:
                    self.up.append(stage(ch, ch, level, "up"))
        self.out = nn.Sequential(
            norm(ch), nn.SiLU(), zero(nn.Conv2d(ch, out_channels * patch_size**2, 3, padding=1))
        )

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_embed(timestep_embedding(t, self.channels).to(self.dtype))

    @property
    def dtype(self) -> torch.dtype:
        return self.input_conv.weight.dtype

    def _run(self, block: _Stage, *args: torch.Tensor | None) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        factor = self.patch_size * 2 ** (self.levels - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(
                f"input size {tuple(x.shape[-2:])} must be divisible by {factor} "
                f"({self.levels} resolutions, patch size {self.patch_size})"
            )
        x = x.to(self.dtype)
        if self.patch_size > 1:
            x = F.pixel_unshuffle(x, self.patch_size)
        h = self.input_conv(x)
        hs = [h]
        for block in self.down:
            h = self._run(block, h, emb, context, context_mask)
            hs.append(h)
        for block in self.middle:
            h = self._run(block, h, emb, context, context_mask)
        for block in self.up:
            if block.res.resample == "none":
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(block, h, emb, context, context_mask)
        out = self.out(h)
        return F.pixel_shuffle(out, self.patch_size) if self.patch_size > 1 else out

    def attention_blocks(self) -> list[AttentionBlock]:
        return [m for m in self.modules() if isinstance(m, AttentionBlock)]


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
