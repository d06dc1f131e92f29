"""The priors (Ramesh et al. 2022, section 2.2): caption → CLIP image embedding.

Two priors, as the paper compares:

* :class:`DiffusionPrior` (this module): a decoder-only Transformer, :class:`DiffusionPriorNet`,
  denoises the CLIP image embedding under a Gaussian diffusion and predicts x₀ directly.
* :class:`unclip.ar_prior.ARPrior`: PCA-reduced, quantized image embeddings predicted code by code.

Both take the same batches (``text_emb``, ``text_tokens``, ``image_emb``) and have the same
``loss(batch, generator)`` / ``sample(text_emb, text_tokens, ...)`` shapes; :func:`build_prior`
picks one by :attr:`PriorNetConfig.kind`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from unclip.diffusion import GaussianDiffusion
from unclip.diffusion_process import DiffusionConfig
from unclip.fields import param, require
from unclip.transformer import Transformer, timestep_embedding

CLIP_VOCAB = 49408


@dataclass
class PriorNetConfig:
    """The prior network (paper section 2.2): caption → CLIP image embedding.

    For the autoregressive prior, ``width``/``depth``/``heads``/``text_context`` describe its text
    encoder and the ``latent_*`` fields its latent decoder (paper table 3 lists both).
    """

    kind: Literal["diffusion", "autoregressive"] = param("diffusion", "which prior (section 2.2)")
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
    latent_width: int | None = param(
        None, "autoregressive prior: latent decoder width (null: width; paper: 1664)", ge=8
    )
    latent_depth: int | None = param(
        None, "autoregressive prior: latent decoder layers (null: depth; paper: 24)", ge=1
    )
    latent_heads: int | None = param(
        None, "autoregressive prior: latent decoder heads (null: heads; paper: 26)", ge=1
    )
    latent_context: int | None = param(
        None,
        "autoregressive prior: latent decoder positions, at least pca_dims + 1 "
        "(null: pca_dims + 1; paper: 384)",
        ge=2,
    )
    embed_scale: float | None = param(
        None,
        "diffusion prior: embeddings are unit-normalized, then multiplied by this "
        "(null: sqrt(D), unit variance per dimension; the paper uses 17.2 at D = 1024)",
        gt=0,
    )
    dot_bins: int = param(
        32,
        "autoregressive prior: buckets of the quantized image·text dot product prefix token "
        "(the paper does not give its number)",
        ge=2,
    )
    dot_quantile: float = param(
        0.5,
        "autoregressive prior: sampling draws the dot-product token from the buckets above this "
        "quantile of its training distribution (paper: the top half)",
        ge=0,
        lt=1,
    )

    def validate(self) -> None:
        require(
            self.width % self.heads == 0,
            "heads",
            f"must divide width ({self.width}), got {self.heads}",
        )
        latent_width = self.latent_width or self.width
        latent_heads = self.latent_heads or self.heads
        require(
            latent_width % latent_heads == 0,
            "latent_heads",
            f"must divide latent_width ({latent_width}), got {latent_heads}",
        )
        if self.kind == "autoregressive" and self.latent_context is not None:
            require(
                self.latent_context >= self.pca_dims + 1,
                "latent_context",
                f"must be at least pca_dims + 1 ({self.pca_dims + 1}), got {self.latent_context}",
            )


# ----------------------------------------------------------------------------------------------
# Helpers shared with the autoregressive prior


def uniform(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """U[0, 1) drawn on the generator's device (a CPU generator may drive a GPU model)."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where).to(device)


def pad_tokens(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """Caption ids cut or right-padded with 0 (open_clip's padding id) to exactly ``length``."""
    tokens = tokens[:, :length].long()
    if tokens.shape[1] < length:
        tokens = F.pad(tokens, (0, length - tokens.shape[1]), value=0)
    return tokens


def keep_best(candidates: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """From ``candidates`` (B, N, D), the one per row with the highest dot product with the
    (unit-norm) text embedding (B, D): the paper's sampling trick for the prior (section 2.2)."""
    scores = (candidates.float() * text_emb.float()[:, None]).sum(dim=-1)  # no autocast matmul
    best = scores.argmax(dim=1)
    return candidates[torch.arange(candidates.shape[0], device=candidates.device), best]


# ----------------------------------------------------------------------------------------------
# The diffusion prior


class DiffusionPriorNet(nn.Module):
    """The diffusion prior's decoder-only Transformer (section 2.2).

    A causal Transformer reads, in order: the caption tokens (token + position embeddings, cut or
    padded to ``cfg.text_context``; padding, id 0, masked as keys), the CLIP text embedding, an
    embedding of the diffusion timestep, the noised CLIP image embedding, and a final learned
    query. The output at the final position, through a LayerNorm and a linear layer, predicts the
    unnoised image embedding (x₀, or whatever the diffusion objective asks for).

    Captions are always padded to ``text_context`` so every conditioning token sits at a fixed
    position: extra padding then cannot change the output. ``drop_text`` (B,) bool replaces a row's
    caption with one learned null token (all other caption positions masked) and its text
    embedding with a learned null embedding, for classifier-free guidance (Ho & Salimans 2022;
    the paper drops the text conditioning 10% of the time).
    """

    def __init__(self, cfg: PriorNetConfig, *, embed_dim: int, vocab_size: int = CLIP_VOCAB):
        super().__init__()
        cfg.validate()
        width = cfg.width
        self.cfg = cfg
        self.embed_dim = embed_dim
        self.text_context = cfg.text_context
        self.token_embedding = nn.Embedding(vocab_size, width)
        # caption positions, then text embedding, timestep, noised embedding, query
        self.position_embedding = nn.Parameter(torch.randn(cfg.text_context + 4, width) * 0.01)
        self.text_emb_proj = nn.Linear(embed_dim, width)
        self.time_embed = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.x_proj = nn.Linear(embed_dim, width)
        self.query = nn.Parameter(torch.randn(width) * 0.01)
        self.null_token = nn.Parameter(torch.randn(width) * 0.01)
        self.null_text_emb = nn.Parameter(torch.randn(width) * 0.01)
        self.transformer = Transformer(
            width, cfg.depth, cfg.heads, dropout=cfg.dropout, causal=True
        )
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, embed_dim)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        *,
        text_emb: torch.Tensor,
        text_tokens: torch.Tensor,
        drop_text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x_t`` (B, D) noised embedding, ``t`` (B,) timesteps, ``text_emb`` (B, D),
        ``text_tokens`` (B, L) int64 → (B, D)."""
        dtype = self.out.weight.dtype
        b = x_t.shape[0]
        tokens = pad_tokens(text_tokens.to(x_t.device), self.text_context)
        padding = tokens == 0
        padding[:, 0] = False  # the start-of-text token; keeps every softmax row non-empty
        tok = self.token_embedding(tokens)
        txt = self.text_emb_proj(text_emb.to(dtype))
        if drop_text is not None:
            drop = drop_text.to(device=x_t.device, dtype=torch.bool)
            tok = torch.where(drop[:, None, None], self.null_token.to(tok.dtype), tok)
            later = torch.arange(tokens.shape[1], device=x_t.device) > 0
            padding = padding | (drop[:, None] & later[None])
            txt = torch.where(drop[:, None], self.null_text_emb.to(txt.dtype), txt)
        temb = self.time_embed(timestep_embedding(t.to(x_t.device), self.cfg.width).to(dtype))
        xe = self.x_proj(x_t.to(dtype))
        h_dtype = tok.dtype
        h = torch.cat(
            [
                tok,
                txt[:, None].to(h_dtype),
                temb[:, None].to(h_dtype),
                xe[:, None].to(h_dtype),
                self.query.to(h_dtype).expand(b, 1, -1),
            ],
            dim=1,
        )
        h = h + self.position_embedding.to(h_dtype)
        padding = torch.cat([padding, padding.new_zeros(b, 4)], dim=1)
        h = self.transformer(h, padding)
        return self.out(self.norm(h[:, -1]))


class DiffusionPrior(nn.Module):
    """The diffusion prior stage model (section 2.2): trains and samples a
    :class:`DiffusionPriorNet` under a :class:`GaussianDiffusion`.

    The net works on unit-normalized CLIP embeddings scaled by sqrt(D) (DALLE2-pytorch's
    ``image_embed_scale``), or by ``cfg.embed_scale`` when set. A unit-norm D-vector has
    per-dimension variance ≈ 1/D; the noise schedules (DDPM's linear, Improved DDPM's cosine) are
    designed for data of about unit variance per dimension, so without the scale the
    signal-to-noise ratio of every step would be D times lower than intended (at D = 1024 the
    embedding would be lost under the noise after a few percent of the steps) and most of the
    schedule would be wasted. The paper does the same with a factor 17.2 at D = 1024 (appendix C:
    "to match the empirical variance of RGB pixel values of ImageNet images scaled to [-1, 1]",
    i.e. a per-dimension std of about 0.54); sqrt(D) makes it exactly 1 at any D. The text
    embedding is given to the net on the same scale. Samples are renormalized to unit norm.

    Because the scaled embeddings have per-dimension values of order 1 (not bounded by 1), the
    diffusion must not threshold x₀ (``thresholding: none``), and vectors use a fixed variance.
    """

    def __init__(
        self,
        net_cfg: PriorNetConfig,
        diffusion_cfg: DiffusionConfig,
        *,
        embed_dim: int,
        vocab_size: int = CLIP_VOCAB,
    ) -> None:
        super().__init__()
        if diffusion_cfg.thresholding != "none":
            raise ValueError(
                "the diffusion prior needs diffusion.thresholding: none (its embeddings are "
                f"scaled to unit variance, not to [-1, 1]), got {diffusion_cfg.thresholding!r}"
            )
        if diffusion_cfg.learned_variance:
            raise ValueError("the diffusion prior does not learn variances (vectors)")
        self.cfg = net_cfg
        self.embed_dim = embed_dim
        self.scale = net_cfg.embed_scale or math.sqrt(embed_dim)
        self.net = DiffusionPriorNet(net_cfg, embed_dim=embed_dim, vocab_size=vocab_size)
        self.diffusion = GaussianDiffusion(diffusion_cfg)

    def _device(self) -> torch.device:
        return self.net.out.weight.device

    def _scaled(self, emb: torch.Tensor) -> torch.Tensor:
        return F.normalize(emb.to(self._device(), torch.float32), dim=-1) * self.scale

    def loss(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Mean diffusion loss (the paper's x₀ MSE with ``objective: x0``) over the batch, with
        the text conditioning dropped per row with probability ``cfg.cond_drop_prob``."""
        device = self._device()
        image = self._scaled(batch["image_emb"])
        text_emb = self._scaled(batch["text_emb"])
        tokens = batch["text_tokens"].to(device)
        drop = uniform((image.shape[0],), generator, device) < self.cfg.cond_drop_prob

        def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.net(x_t, t, text_emb=text_emb, text_tokens=tokens, drop_text=drop)

        losses = self.diffusion.training_losses(model_fn, image, generator=generator)
        return losses["loss"].mean()

    @torch.no_grad()
    def sample_candidates(
        self,
        text_emb: torch.Tensor,
        text_tokens: torch.Tensor,
        *,
        guidance_scale: float = 1.0,
        steps: int | None = None,
        num_candidates: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``num_candidates`` unit-norm image embeddings per caption, (B, N, D)."""
        n = num_candidates or self.cfg.num_candidates
        device = self._device()
        b = text_emb.shape[0]
        cond = self._scaled(text_emb).repeat_interleave(n, dim=0)
        tokens = text_tokens.to(device).repeat_interleave(n, dim=0)

        def fn3(x_t: torch.Tensor, t: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
            k = x_t.shape[0] // cond.shape[0]  # guidance stacks [cond; uncond]
            return self.net(
                x_t,
                t,
                text_emb=cond.repeat(k, 1),
                text_tokens=tokens.repeat(k, 1),
                drop_text=drop,
            )

        model_fn = self.diffusion.guided(fn3, guidance_scale)
        x = self.diffusion.sample(
            model_fn, (b * n, self.embed_dim), steps=steps, generator=generator, device=device
        )
        return F.normalize(x.float(), dim=-1).view(b, n, self.embed_dim)

    @torch.no_grad()
    def sample(
        self,
        text_emb: torch.Tensor,
        text_tokens: torch.Tensor,
        *,
        guidance_scale: float = 1.0,
        steps: int | None = None,
        num_candidates: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Unit-norm image embeddings (B, D) for captions: ``num_candidates`` (default
        ``cfg.num_candidates``, the paper's 2) samples per caption with classifier-free guidance
        ``guidance_scale``, keeping the one with the higher dot product with the text embedding
        (section 2.2). ``steps`` respaces the sampler (default: the diffusion config's)."""
        candidates = self.sample_candidates(
            text_emb,
            text_tokens,
            guidance_scale=guidance_scale,
            steps=steps,
            num_candidates=num_candidates,
            generator=generator,
        )
        return keep_best(candidates, F.normalize(text_emb.to(candidates).float(), dim=-1))


def build_prior(
    net_cfg: PriorNetConfig,
    diffusion_cfg: DiffusionConfig,
    *,
    embed_dim: int,
    vocab_size: int = CLIP_VOCAB,
) -> nn.Module:
    """The prior stage model ``net_cfg.kind`` names: :class:`DiffusionPrior` or
    :class:`unclip.ar_prior.ARPrior` (which ignores ``diffusion_cfg``)."""
    if net_cfg.kind == "autoregressive":
        from unclip.ar_prior import ARPrior

        return ARPrior(net_cfg, embed_dim=embed_dim, vocab_size=vocab_size)
    if net_cfg.kind == "diffusion":
        return DiffusionPrior(net_cfg, diffusion_cfg, embed_dim=embed_dim, vocab_size=vocab_size)
    raise ValueError(f"unknown prior kind {net_cfg.kind!r}")
