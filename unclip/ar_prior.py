"""The autoregressive prior (Ramesh et al. 2022, section 2.2), the paper's alternative to the
diffusion prior.

The CLIP image embedding z_i is reduced with PCA (the paper keeps 319 of 1024 dimensions, which
retain nearly all of the information), each kept dimension is quantized into buckets (the paper
uses 1024), and a causal Transformer predicts the resulting code sequence. It is conditioned on
the caption and the CLIP text embedding z_t, encoded as a prefix, and on a prefix token holding
the quantized dot product z_i·z_t, so sampling can ask for a high dot product (the paper samples
it from the top half of its distribution). Classifier-free guidance as for the diffusion prior:
the text conditioning is dropped in training with probability ``cond_drop_prob`` and the logits
are mixed at sampling (Ho & Salimans 2022).

Architecture (paper table 3 lists a "text encoder" and a "latent decoder" for this prior): a
causal text encoder (:class:`unclip.transformer.TextEncoder`, as GLIDE's) encodes the caption; the
latent decoder attends to its token features as a prefix of keys and values in every layer,
projected per layer as GLIDE's ``encoder_kv`` (Nichol et al. 2021), and its own sequence is
[text embedding, dot-product token, code₁, …, code_{K-1}], whose outputs predict code₁ … code_K.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from unclip.prior import CLIP_VOCAB, PriorNetConfig, keep_best, uniform
from unclip.transformer import TextEncoder


def _quantile_edges(values: torch.Tensor, bins: int) -> torch.Tensor:
    """Equal-mass bucket edges (bins - 1,) per column of ``values`` (N, K) → (K, bins - 1)."""
    n = values.shape[0]
    ordered = values.sort(dim=0).values
    q = torch.arange(1, bins, dtype=torch.float64, device=values.device) / bins * (n - 1)
    lo = q.floor().long()
    hi = q.ceil().long()
    frac = (q - lo).to(values.dtype)[:, None]
    edges = ordered[lo] * (1 - frac) + ordered[hi] * frac  # linear interpolation, as np.quantile
    return edges.T.contiguous()


def _bucketize(values: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Bucket index of ``values`` (N, K) under per-column ``edges`` (K, bins - 1) → (N, K)."""
    codes = torch.searchsorted(edges, values.T.contiguous().to(edges.dtype), right=True)
    return codes.T


class PCAQuantizer(nn.Module):
    """PCA reduction and per-dimension quantization of CLIP image embeddings (section 2.2).

    ``encode`` normalizes an embedding, projects it on the first K principal components and
    buckets each coordinate; ``decode`` maps each bucket to the mean of the training coordinates
    that fell into it (one Lloyd step, the MSE-optimal value for the bucket), projects back and
    renormalizes to unit norm. Everything lives in buffers, so checkpoints carry the fit.

    Bucket edges are the per-dimension quantiles of the training coordinates (equal-mass
    buckets) rather than a uniform grid on ±k·std: every code is used equally often, so the
    Transformer's softmax targets are balanced and no capacity goes to empty tail buckets; the
    resolution is finest where the data are densest (close to the Lloyd-Max quantizer for these
    roughly Gaussian coordinates); it needs no choice of k; and the same rule gives the
    dot-product buckets, where "the top half of the distribution" is then exactly the upper
    half of the codes.
    """

    mean: torch.Tensor
    components: torch.Tensor
    variance: torch.Tensor
    total_variance: torch.Tensor
    edges: torch.Tensor
    centers: torch.Tensor
    fitted: torch.Tensor

    def __init__(self, embed_dim: int, dims: int, bins: int) -> None:
        super().__init__()
        if not 1 <= dims <= embed_dim:
            raise ValueError(f"PCA dims must be in [1, {embed_dim}], got {dims}")
        self.embed_dim, self.dims, self.bins = embed_dim, dims, bins
        self.register_buffer("mean", torch.zeros(embed_dim))
        self.register_buffer("components", torch.zeros(dims, embed_dim))  # rows: unit vectors
        self.register_buffer("variance", torch.zeros(dims))  # variance along each component
        self.register_buffer("total_variance", torch.zeros(()))
        self.register_buffer("edges", torch.zeros(dims, bins - 1))
        self.register_buffer("centers", torch.zeros(dims, bins))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @classmethod
    def fit(
        cls, image_emb: torch.Tensor, dims: int, bins: int, *, chunk: int = 65536
    ) -> PCAQuantizer:
        """Fit on ``image_emb`` (N, D) (normalized here): principal components from the
        eigendecomposition of the covariance (accumulated in float64), then quantile edges and
        bucket means of the projected coordinates. Needs N well above ``bins``."""
        with torch.autocast(device_type=image_emb.device.type, enabled=False):
            return cls._fit(image_emb, dims, bins, chunk)

    @classmethod
    def _fit(cls, image_emb: torch.Tensor, dims: int, bins: int, chunk: int) -> PCAQuantizer:
        n, d = image_emb.shape
        if n < 2:
            raise ValueError("PCAQuantizer.fit needs at least 2 embeddings")
        device = image_emb.device
        z = F.normalize(image_emb.to(torch.float32), dim=-1)
        mean = z.to(torch.float64).mean(dim=0)
        cov = torch.zeros(d, d, dtype=torch.float64, device=device)
        for start in range(0, n, chunk):
            zc = z[start : start + chunk].to(torch.float64) - mean
            cov += zc.T @ zc
        cov /= n - 1
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        evals, evecs = evals.flip(0)[:dims], evecs.flip(1)[:, :dims].T  # (K,), (K, D)
        # a deterministic sign: the largest-magnitude entry of each component is positive
        sign = torch.sign(evecs.gather(1, evecs.abs().argmax(dim=1, keepdim=True)))
        evecs = evecs * sign

        q = cls(d, dims, bins).to(device)
        q.mean.copy_(mean.float())
        q.components.copy_(evecs.float())
        q.variance.copy_(evals.clamp_min(0).float())
        q.total_variance.copy_(torch.diagonal(cov).sum().float())
        coords = (z - q.mean) @ q.components.T  # (N, K)
        q.edges.copy_(_quantile_edges(coords, bins))
        codes = _bucketize(coords, q.edges)  # (N, K)
        sums = torch.zeros(dims, bins, device=device).scatter_add_(1, codes.T, coords.T)
        counts = torch.zeros(dims, bins, device=device).scatter_add_(
            1, codes.T, torch.ones_like(coords.T)
        )
        # empty buckets (possible only with few samples) fall back to their edges' midpoint
        lo = torch.cat([q.edges[:, :1], q.edges], dim=1)
        hi = torch.cat([q.edges, q.edges[:, -1:]], dim=1)
        q.centers.copy_(torch.where(counts > 0, sums / counts.clamp_min(1), (lo + hi) / 2))
        q.fitted.fill_(True)
        return q

    def project(self, emb: torch.Tensor) -> torch.Tensor:
        """PCA coordinates (B, K) of the normalized embeddings, in float32 whatever the buffers'
        dtype and with autocast off: bf16 would move coordinates across the narrow buckets."""
        device = self.mean.device
        with torch.autocast(device_type=device.type, enabled=False):
            z = F.normalize(emb.to(device, torch.float32), dim=-1)
            return (z - self.mean.float()) @ self.components.float().T

    def encode(self, emb: torch.Tensor) -> torch.Tensor:
        """Codes (B, K) int64 in [0, bins) of embeddings (B, D)."""
        return _bucketize(self.project(emb), self.edges.float())

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings (B, D) from codes (B, K)."""
        device = self.centers.device
        with torch.autocast(device_type=device.type, enabled=False):
            coords = self.centers.float().gather(1, codes.to(device).long().T).T  # (B, K)
            return F.normalize(coords @ self.components.float() + self.mean.float(), dim=-1)

    def explained_variance(self) -> torch.Tensor:
        """Fraction (K,) of the normalized embeddings' total variance along each kept component
        (descending; the sum is the fraction PCA retains)."""
        return self.variance.float() / self.total_variance.float().clamp_min(1e-12)


class LatentBlock(nn.Module):
    """A pre-LayerNorm causal block whose attention also sees prefix keys and values (GLIDE's
    ``encoder_kv``: the text encoder's features projected per layer and put before the
    sequence's own keys), with an optional cache of the sequence's keys and values for
    code-by-code sampling."""

    def __init__(self, width: int, heads: int, prefix_width: int, dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"heads ({heads}) must divide width ({width})")
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.prefix_kv = nn.Linear(prefix_width, 2 * width)
        self.out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(4 * width, width),
        )

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, length, width = x.shape
        return x.view(b, length, self.heads, width // self.heads).transpose(1, 2)

    def prefix(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-layer prefix keys and values (B, H, Lp, W/H) from the text features."""
        k, v = self.prefix_kv(features).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def forward(
        self,
        x: torch.Tensor,
        prefix: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        cache: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``x`` (B, L, W); ``mask`` bool (B, 1, L, Lp + L_total), True where a query may
        attend; ``cache`` (updated in place) holds the keys and values of earlier positions."""
        b, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        pk, pv = prefix
        k = torch.cat([pk.to(k.dtype), k], dim=2)
        v = torch.cat([pv.to(v.dtype), v], dim=2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.out(y.transpose(1, 2).reshape(b, length, width))
        return x + self.mlp(self.norm2(x))


class ARPriorNet(nn.Module):
    """The autoregressive prior's Transformer (section 2.2, table 3): a text encoder and a latent
    decoder.

    The text encoder (``cfg.width``/``depth``/``heads``, ``cfg.text_context`` tokens) encodes the
    caption; the latent decoder (``cfg.latent_*``) runs causally over [CLIP text embedding,
    quantized dot product, code₁ … code_{K-1}] with the caption features as prefix keys in every
    layer, and predicts code₁ … code_K (teacher forcing). Codes share one embedding table (their
    PCA dimension is told by the position embedding) and one output layer.

    ``drop_text`` (B,) bool replaces a row's caption by one learned null feature, and its text
    embedding and dot-product token by learned null embeddings (classifier-free guidance; the
    dot product is text conditioning too, so the unconditional branch models p(z_i)).
    """

    def __init__(
        self, cfg: PriorNetConfig, *, embed_dim: int, vocab_size: int = CLIP_VOCAB
    ) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed_dim = embed_dim
        self.dims = cfg.pca_dims
        self.bins = cfg.quant_bins
        self.dot_bins = cfg.dot_bins
        width = cfg.latent_width or cfg.width
        depth = cfg.latent_depth or cfg.depth
        heads = cfg.latent_heads or cfg.heads
        self.context = cfg.latent_context or cfg.pca_dims + 1
        if self.context < cfg.pca_dims + 1:
            raise ValueError(f"latent_context must be at least pca_dims + 1 ({cfg.pca_dims + 1})")
        self.text_encoder = TextEncoder(
            vocab_size=vocab_size,
            context=cfg.text_context,
            width=cfg.width,
            depth=cfg.depth,
            heads=cfg.heads,
            dropout=cfg.dropout,
        )
        self.null_caption = nn.Parameter(torch.randn(cfg.width) * 0.01)
        self.text_emb_proj = nn.Linear(embed_dim, width)
        self.null_text_emb = nn.Parameter(torch.randn(width) * 0.01)
        self.dot_embedding = nn.Embedding(cfg.dot_bins + 1, width)  # last id: dropped
        self.code_embedding = nn.Embedding(cfg.quant_bins, width)
        self.position_embedding = nn.Parameter(torch.randn(self.context, width) * 0.01)
        self.blocks = nn.ModuleList(
            LatentBlock(width, heads, cfg.width, cfg.dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, cfg.quant_bins)

    def _condition(
        self,
        text_emb: torch.Tensor,
        text_tokens: torch.Tensor,
        dot_code: torch.Tensor,
        drop_text: torch.Tensor | None,
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
        """Per-layer prefix keys/values, the prefix padding (B, Lp), and the first two decoder
        inputs (B, 2, W): text embedding and dot-product token."""
        device = self.out.weight.device
        dtype = self.out.weight.dtype
        tokens = text_tokens.to(device).long()
        features, padding = self.text_encoder(tokens)
        txt = self.text_emb_proj(text_emb.to(device, dtype))
        dot_code = dot_code.to(device).long()
        if drop_text is not None:
            drop = drop_text.to(device=device, dtype=torch.bool)
            features = torch.where(
                drop[:, None, None], self.null_caption.to(features.dtype), features
            )
            later = torch.arange(padding.shape[1], device=device) > 0
            padding = torch.where(drop[:, None], later[None], padding)
            txt = torch.where(drop[:, None], self.null_text_emb.to(txt.dtype), txt)
            dot_code = torch.where(drop, torch.full_like(dot_code, self.dot_bins), dot_code)
        dot = self.dot_embedding(dot_code)
        start = torch.stack([txt.to(dot.dtype), dot], dim=1)
        prefix = [block.prefix(features) for block in self.blocks]
        return prefix, padding, start

    def _run(
        self,
        h: torch.Tensor,
        prefix: list[tuple[torch.Tensor, torch.Tensor]],
        padding: torch.Tensor,
        offset: int,
        caches: list[dict[str, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """The decoder on inputs ``h`` (B, L, W) at positions offset … offset + L - 1."""
        b, length, _ = h.shape
        device = h.device
        h = h + self.position_embedding[offset : offset + length].to(h.dtype)
        rows = torch.arange(offset, offset + length, device=device)
        cols = torch.arange(offset + length, device=device)
        causal = (cols[None, :] <= rows[:, None])[None, None].expand(b, 1, length, -1)
        visible = (~padding)[:, None, None, :].expand(b, 1, length, padding.shape[1])
        mask = torch.cat([visible, causal], dim=-1)
        for i, block in enumerate(self.blocks):
            h = block(h, prefix[i], mask, None if caches is None else caches[i])
        return self.out(self.norm(h))

    def forward(
        self,
        codes: torch.Tensor,
        *,
        text_emb: torch.Tensor,
        text_tokens: torch.Tensor,
        dot_code: torch.Tensor,
        drop_text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced logits (B, K, bins): position k predicts ``codes[:, k]`` from the
        conditioning and ``codes[:, :k]``."""
        prefix, padding, start = self._condition(text_emb, text_tokens, dot_code, drop_text)
        inputs = self.code_embedding(codes[:, :-1].to(start.device).long())
        h = torch.cat([start, inputs.to(start.dtype)], dim=1)
        return self._run(h, prefix, padding, 0)[:, 1:]

    @torch.no_grad()
    def generate(
        self,
        text_emb: torch.Tensor,
        text_tokens: torch.Tensor,
        dot_code: torch.Tensor,
        *,
        guidance_scale: float = 1.0,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Codes (B, K) sampled one by one with cached keys and values. Guidance mixes the
        conditional and unconditional logits, uncond + scale·(cond − uncond), from one batched
        forward (scale 1: the conditional one alone); temperature 0 is greedy."""
        b = text_emb.shape[0]
        guided = guidance_scale != 1.0
        drop = torch.zeros(b, dtype=torch.bool, device=text_emb.device)
        if guided:
            text_emb, text_tokens, dot_code = (
                torch.cat([x, x]) for x in (text_emb, text_tokens, dot_code)
            )
            drop = torch.cat([drop, ~drop])
        prefix, padding, start = self._condition(text_emb, text_tokens, dot_code, drop)
        caches: list[dict[str, torch.Tensor]] = [{} for _ in self.blocks]
        h, offset = start, 0
        codes = []
        for _ in range(self.dims):
            logits = self._run(h, prefix, padding, offset, caches)[:, -1].float()
            offset += h.shape[1]
            if guided:
                cond, uncond = logits.chunk(2)
                logits = uncond + guidance_scale * (cond - uncond)
            if temperature == 0:
                code = logits.argmax(dim=-1)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                where = generator.device if generator is not None else probs.device
                code = torch.multinomial(probs.to(where), 1, generator=generator)[:, 0]
                code = code.to(logits.device)
            codes.append(code)
            step = code.repeat(2) if guided else code
            h = self.code_embedding(step)[:, None].to(start.dtype)
        return torch.stack(codes, dim=1)


class ARPrior(nn.Module):
    """The autoregressive prior stage model (section 2.2): an :class:`ARPriorNet` with its
    :class:`PCAQuantizer` and the dot-product buckets, all in the state dict.

    Call :meth:`fit_quantizer` on (a sample of) the training embeddings before training; the same
    call shapes as :class:`unclip.prior.DiffusionPrior` otherwise.
    """

    dot_edges: torch.Tensor

    def __init__(
        self, net_cfg: PriorNetConfig, *, embed_dim: int, vocab_size: int = CLIP_VOCAB
    ) -> None:
        super().__init__()
        self.cfg = net_cfg
        self.embed_dim = embed_dim
        self.net = ARPriorNet(net_cfg, embed_dim=embed_dim, vocab_size=vocab_size)
        self.quantizer = PCAQuantizer(embed_dim, net_cfg.pca_dims, net_cfg.quant_bins)
        self.register_buffer("dot_edges", torch.zeros(net_cfg.dot_bins - 1))

    @property
    def fitted(self) -> bool:
        """Whether :meth:`fit_quantizer` has run (or a fitted state dict was loaded)."""
        return bool(self.quantizer.fitted)

    def _device(self) -> torch.device:
        return self.net.out.weight.device

    @torch.no_grad()
    def fit_quantizer(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> None:
        """Fit the PCA, its buckets and the dot-product buckets on paired embeddings (N, D).
        Deterministic, so every data-parallel worker fitting the same sample agrees."""
        device = self._device()
        image_emb = image_emb.to(device, torch.float32)
        fitted = PCAQuantizer.fit(image_emb, self.cfg.pca_dims, self.cfg.quant_bins)
        self.quantizer.load_state_dict(fitted.state_dict())
        dots = self._dots(image_emb, text_emb)
        self.dot_edges.copy_(_quantile_edges(dots[:, None], self.cfg.dot_bins)[0].float())

    def _scaled_text(self, text_emb: torch.Tensor) -> torch.Tensor:
        # unit norm × sqrt(D): unit variance per dimension into the net, as the diffusion prior
        device = self._device()
        return F.normalize(text_emb.to(device, torch.float32), dim=-1) * math.sqrt(self.embed_dim)

    def _dots(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        device = self._device()
        zi = F.normalize(image_emb.to(device, torch.float32), dim=-1)
        zt = F.normalize(text_emb.to(device, torch.float32), dim=-1)
        return (zi * zt).sum(dim=-1)

    def dot_codes(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """The quantized dot product z_i·z_t (B,) int64 in [0, dot_bins)."""
        dots = self._dots(image_emb, text_emb)
        return torch.searchsorted(self.dot_edges.float(), dots.contiguous(), right=True)

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError("ARPrior: call fit_quantizer(image_emb, text_emb) first")

    def loss(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Mean cross-entropy (nats per code) of the teacher-forced codes, with the text
        conditioning dropped per row with probability ``cfg.cond_drop_prob``."""
        self._check_fitted()
        device = self._device()
        codes = self.quantizer.encode(batch["image_emb"])
        dot = self.dot_codes(batch["image_emb"], batch["text_emb"])
        drop = uniform((codes.shape[0],), generator, device) < self.cfg.cond_drop_prob
        logits = self.net(
            codes,
            text_emb=self._scaled_text(batch["text_emb"]),
            text_tokens=batch["text_tokens"],
            dot_code=dot,
            drop_text=drop,
        )
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), codes.reshape(-1))

    @torch.no_grad()
    def sample(
        self,
        text_emb: torch.Tensor,
        text_tokens: torch.Tensor,
        *,
        guidance_scale: float = 1.0,
        temperature: float = 1.0,
        steps: int | None = None,
        num_candidates: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Unit-norm image embeddings (B, D). The dot-product token is drawn uniformly from the
        buckets above ``cfg.dot_quantile`` of its training distribution (the buckets are
        equal-mass, so this samples from the top half of the distribution at 0.5, as the
        paper). ``steps`` is accepted for call compatibility with the diffusion prior and
        ignored; ``num_candidates`` (default 1: the dot-product token already asks for a close
        match) draws that many and keeps the one closest to the text embedding."""
        del steps
        self._check_fitted()
        device = self._device()
        n = num_candidates or 1
        b = text_emb.shape[0]
        zt = F.normalize(text_emb.to(device, torch.float32), dim=-1)
        low = min(math.floor(self.cfg.dot_quantile * self.cfg.dot_bins), self.cfg.dot_bins - 1)
        where = generator.device if generator is not None else device
        dot = torch.randint(low, self.cfg.dot_bins, (b * n,), generator=generator, device=where).to(
            device
        )
        codes = self.net.generate(
            self._scaled_text(text_emb).repeat_interleave(n, dim=0),
            text_tokens.to(device).repeat_interleave(n, dim=0),
            dot,
            guidance_scale=guidance_scale,
            temperature=temperature,
            generator=generator,
        )
        candidates = self.quantizer.decode(codes).view(b, n, self.embed_dim)
        return keep_best(candidates, zt)
