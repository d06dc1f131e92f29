"""The ADM UNet body (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs"), as GLIDE uses it
(Nichol et al. 2021), shared by unCLIP's 64px decoder and its upsamplers (Ramesh et al. 2022,
section 2.1; the networks themselves, with their conditioning and configs, are in
:mod:`unclip.unet`):

* a sinusoidal timestep embedding (:func:`unclip.transformer.timestep_embedding`) followed by a
  two-layer MLP (width 4 × ``channels``);
* residual blocks GroupNorm → SiLU → conv → GroupNorm → scale-shift (FiLM) from the embedding →
  SiLU → dropout → conv, ADM's ``use_scale_shift_norm`` (ADM section 3);
* resolution changes inside residual blocks (ADM's ``resblock_updown``, which GLIDE also uses):
  average pooling down, nearest-neighbour up, applied to both the residual branch and the skip;
* multi-head self-attention (``head_channels`` per head) at the configured resolutions, which can
  also attend to an encoder sequence (GLIDE's ``encoder_kv``, section 2.3 of GLIDE), masking its
  padding;
* skip connections from every encoder block to the decoder half; the last conv of every residual
  block, every attention output projection and the output conv are zero-initialised, so a fresh
  network predicts 0 and each block starts as the identity.

The body knows nothing of diffusion schedules or of what conditions it: it maps (x, embedding,
context) to output channels, and its owners add their conditioning to the embedding and context.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from unclip.transformer import timestep_embedding

# ----------------------------------------------------------------------------------------------
# Building blocks


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
