"""Transformer blocks shared by the priors and the decoder's caption encoder.

Pre-LayerNorm residual blocks (as GPT-2 / CLIP / GLIDE use) over ``F.scaled_dot_product_attention``,
with a causal mask, a key-padding mask, or both. Pure PyTorch, autocast-safe (LayerNorm runs in the
input's dtype under autocast, which PyTorch keeps in float32).

Also the Transformer's sinusoidal encoding (Vaswani et al. 2017 §3.5) applied to diffusion
timesteps, :func:`timestep_embedding`: every diffusion network reads t through it, the diffusion
prior's Transformer (Ramesh et al. 2022 §2.2) and the ADM UNets (:mod:`unclip.adm_unet`) alike, as
in DDPM (Ho et al. 2020 appendix B).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features (B, dim) of (possibly fractional) timesteps, in float32 (Vaswani et al.;
    as DDPM and ADM). An odd ``dim`` gets a zero last feature.

    ``t`` is in the original range [0, T) even when sampling is respaced (docs/ARCHITECTURE.md), so one
    embedding serves every sampling schedule.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"heads ({heads}) must divide width ({width})")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, L, W); ``mask`` bool (B or 1, 1, L, L), True where a query may attend."""
        b, length, width = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, width // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(b, length, width))


class Block(nn.Module):
    """x + attn(LN(x)); x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mlp_ratio * width, width),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


def attention_mask(
    length: int, *, causal: bool, padding: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """The bool mask (B or 1, 1, L, L) for ``Attention``: True where query i may attend to key j.

    ``padding`` (B, L) is True at padded keys. Callers keep at least one unpadded key visible to
    every query (causal sequences start with an unpadded token), so no softmax row is empty.
    """
    if not causal and padding is None:
        return None
    mask = torch.ones(1, 1, length, length, dtype=torch.bool, device=device)
    if causal:
        mask = torch.tril(mask)
    if padding is not None:
        mask = mask & ~padding[:, None, None, :]
    return mask


class Transformer(nn.Module):
    """A stack of :class:`Block` with an optional causal mask and key padding."""

    def __init__(
        self, width: int, depth: int, heads: int, *, dropout: float = 0.0, causal: bool = False
    ) -> None:
        super().__init__()
        self.causal = causal
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(depth))

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        mask = attention_mask(x.shape[1], causal=self.causal, padding=padding, device=x.device)
        for block in self.blocks:
            x = block(x, mask)
        return x


class TextEncoder(nn.Module):
    """Caption token ids → per-token features, as GLIDE's text encoder (Nichol et al. 2021, §2.3).

    Token id 0 is padding (open_clip's tokenizer pads with 0 after the end-of-text token). Returns the
    token features (B, L, W) after a final LayerNorm, and the padding mask (B, L), True at padding.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        context: int,
        width: int,
        depth: int,
        heads: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.context = context
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Parameter(torch.randn(context, width) * 0.01)
        self.transformer = Transformer(width, depth, heads, dropout=dropout, causal=True)
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = tokens[:, : self.context]
        padding = tokens == 0
        x = self.token_embedding(tokens) + self.position_embedding[: tokens.shape[1]]
        x = self.transformer(x, padding)
        return self.norm(x), padding
