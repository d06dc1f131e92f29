"""Generation with unCLIP (Ramesh et al. 2022): the cascade of section 2 and the image
manipulations of section 3, as small pure functions of trained stage models and tensors.

* :func:`generate` — the text-to-image cascade of section 2 (figure 2): caption → prior → CLIP image
  embedding z_i → 64px decoder → each upsampler in turn (64→256, 256→1024). The conditioning the
  decoder sees is one of the four the paper compares (section 5.1, figure 7): z_i from the prior
  given (diffusion or autoregressive), the normalised CLIP *text* embedding in place of z_i (no
  prior), or the caption alone.
* :func:`variations` — section 3.1 (figure 3): the decoder's *bipartite latent* (z_i, x_T); keep
  z_i and decode with DDIM η > 0, so each sample takes a different path.
* :func:`interpolate` — section 3.2 (figure 4): slerp between two image embeddings, decoded with one
  fixed x_T for the row or with the slerp of the two images' DDIM-inverted latents.
* :func:`text_diff` — section 3.3 (figure 5): rotate z_i towards z_d = normalize(z_t − z_t0), the
  difference of a target and a current caption's text embeddings, decoded from a fixed inverted x_T.
* Building blocks: :func:`image_embeddings` (the prior step), :func:`decode`, :func:`upsample`,
  :func:`invert` (DDIM inversion, Song et al. 2021 §4.3); the embedding geometry of section 3,
  :func:`~unclip.sphere.slerp` and :func:`~unclip.sphere.text_diff_direction`, is in
  :mod:`unclip.sphere`.

Contract of every function: it runs under ``torch.no_grad()``, works on the models' device (inputs
are moved there, noise is drawn on the generator's device and moved, so a CPU generator gives the
same numbers for any device), draws every random number from the one ``generator`` it is given
(the same seed gives identical outputs; results also depend on how rows are batched), never
changes a model's train/eval mode, and returns images as float32 (B, 3, H, W) in [-1, 1]. Rows of a
manipulation are grouped by input: row ``i * num + j`` is output ``j`` of input ``i``.

The cascade's functions (:func:`generate`, :func:`image_embeddings`, :func:`decode`,
:func:`upsample`) also take one generator per row (a sequence of B generators,
:data:`~unclip.diffusion_sampling.Generators`): every random number of row i (the prior's x_T and
step noise for its candidates, the decoder's and each upsampler's) then comes from generator i, so
a row's output does not depend on the rows batched with it, beyond the floating-point differences
of batched kernels: B rows in one call give what B one-row calls with those generators give. This
is what lets ``unclip generate`` run real batches and still give each row the image its own seed
gives alone.

The manipulations decode with DDIM (Song et al. 2021) at every stage, each upsampler with the same η
as the decoder and one x_T per input row shared by the row's outputs, so a row varies only through
what the manipulation changes (z_i, or the decoder's sampling noise for variations). For decoding
from an inverted latent to reconstruct the image, pass the same ``steps`` and ``guidance_scale`` to
:func:`invert` and to the manipulation (both default to the decoder config's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unclip.decoder import Decoder
from unclip.diffusion_process import randn
from unclip.diffusion_sampling import Generators
from unclip.prior import DiffusionPrior
from unclip.sphere import slerp, text_diff_direction
from unclip.stage import eval_mode
from unclip.upsampler import Upsampler, downscale

__all__ = [
    "Conditioning",
    "Generation",
    "decode",
    "generate",
    "image_embeddings",
    "interpolate",
    "invert",
    "text_diff",
    "upsample",
    "variations",
]

Conditioning = Literal["prior", "text_embedding", "caption"]
"""What the decoder is conditioned on besides the caption (paper section 5.1, figure 7): ``"prior"``
z_i sampled by the prior, ``"text_embedding"`` the normalised CLIP text embedding in place of z_i (no
prior), ``"caption"`` nothing (the decoder's learned null image embedding, which stands for the
paper's zero vector and is what classifier-free training dropped z_i to)."""

Steps = int | Sequence[int | None] | None
"""Upsampler sampling steps: one value for all, one per upsampler, or None (each config's)."""


@dataclass
class Generation:
    """Every stage's output for N rows, so callers can grid them.

    ``image_emb``: (N, D) unit-norm embeddings the decoder was conditioned on (None for
    caption-only decoding). ``images``: the decoder's 64px output, then each upsampler's, in
    ascending resolution, each (N, 3, H, W) float32 in [-1, 1]. ``theta``: (N,) interpolation
    weights of :func:`interpolate` / :func:`text_diff` rows, else None.
    """

    image_emb: Tensor | None
    images: list[Tensor]
    theta: Tensor | None = None

    @property
    def final(self) -> Tensor:
        """The highest-resolution images."""
        return self.images[-1]

    @property
    def resolutions(self) -> list[int]:
        """Image side of each stage's output, ascending."""
        return [int(x.shape[-1]) for x in self.images]


# ----------------------------------------------------------------------------------------------
# Helpers


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _per_stage(value: Steps, count: int, name: str) -> list[int | None]:
    if value is None or isinstance(value, int):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise ValueError(f"{name}: {len(values)} values for {count} upsamplers")
    return values


def _upsampled_sizes(decoder: Decoder, upsamplers: Sequence[Upsampler]) -> list[int]:
    """Side of each upsampler's output when fed the decoder's (as :meth:`Upsampler.sample`)."""
    sizes, side = [], decoder.cfg.image_size
    for up in upsamplers:
        side = round(side * up.cfg.high_res / up.cfg.low_res)
        sizes.append(side)
    return sizes


def _rows(x: Tensor | None, num: int) -> Tensor | None:
    return None if x is None else x.repeat_interleave(num, dim=0)


def _check_rows(name: str, x: Tensor | None, rows: int) -> None:
    if x is not None and x.shape[0] != rows:
        raise ValueError(f"{name} has {x.shape[0]} rows, expected {rows}")


def _per_row(generator: Generators) -> list[torch.Generator] | None:
    """The generators of a per-row ``generator`` (a sequence), else None (one or no generator)."""
    if generator is None or isinstance(generator, torch.Generator):
        return None
    return list(generator)


def _check_generators(generator: Generators, rows: int) -> None:
    per_row = _per_row(generator)
    if per_row is not None and len(per_row) != rows:
        raise ValueError(f"{len(per_row)} generators for {rows} rows: give one per row")


def _generator_rows(generator: Generators, rows: slice) -> Generators:
    """The generators of ``rows`` (one generator serves every row)."""
    per_row = _per_row(generator)
    return generator if per_row is None else per_row[rows]


# ----------------------------------------------------------------------------------------------
# Building blocks


@torch.no_grad()
def image_embeddings(
    text_emb: Tensor,
    text_tokens: Tensor,
    prior: nn.Module | None = None,
    *,
    conditioning: Conditioning = "prior",
    guidance_scale: float = 1.0,
    steps: int | None = None,
    num_candidates: int | None = None,
    temperature: float | None = None,
    generator: Generators = None,
) -> Tensor | None:
    """The image embeddings (B, D, unit norm) the decoder is conditioned on (section 2, figure 2).

    ``"prior"``: sampled by ``prior`` (a :class:`~unclip.prior.DiffusionPrior` or
    :class:`~unclip.ar_prior.ARPrior`, section 2.2) from the CLIP text embeddings ``text_emb``
    (B, D) and caption tokens (B, L), with classifier-free guidance ``guidance_scale``, ``steps``
    (diffusion prior), ``num_candidates`` (the best of N by z_i·z_t) and ``temperature`` (only the
    autoregressive prior takes it; None leaves it out). ``"text_embedding"``: the normalised text
    embedding itself, the paper's no-prior baseline (section 5.1). ``"caption"``: None (the decoder
    reads the caption alone). The prior runs in eval mode, its mode restored afterwards.

    ``generator``: one for all rows, or one per row. Per row, a diffusion prior samples the batch
    at once, each caption's candidates drawn from its generator
    (:func:`~unclip.diffusion_sampling.randn_rows`); any other prior (the autoregressive one draws
    its tokens with the generator directly) samples row by row, each with its own generator.
    """
    if conditioning == "caption":
        return None
    if conditioning == "text_embedding":
        return F.normalize(text_emb.float(), dim=-1)
    if conditioning != "prior":
        raise ValueError(f"unknown conditioning {conditioning!r}")
    if prior is None:
        raise ValueError('conditioning "prior" needs a prior')
    _check_rows("text_tokens", text_tokens, text_emb.shape[0])
    _check_generators(generator, text_emb.shape[0])
    kwargs: dict = {
        "guidance_scale": guidance_scale,
        "steps": steps,
        "num_candidates": num_candidates,
    }
    if temperature is not None:
        kwargs["temperature"] = temperature
    per_row = _per_row(generator)
    with eval_mode(prior):
        if per_row is None or isinstance(prior, DiffusionPrior):
            emb = prior.sample(text_emb, text_tokens, generator=generator, **kwargs)
        else:
            rows = [
                prior.sample(text_emb[i : i + 1], text_tokens[i : i + 1], generator=g, **kwargs)
                for i, g in enumerate(per_row)
            ]
            emb = torch.cat(rows)
    return F.normalize(emb.float(), dim=-1)


@torch.no_grad()
def decode(
    decoder: Decoder,
    image_emb: Tensor | None,
    text_tokens: Tensor | None = None,
    *,
    guidance_scale: float | None = None,
    steps: int | None = None,
    sampler: Literal["ddpm", "ddim"] | None = None,
    eta: float | None = None,
    noise: Tensor | None = None,
    generator: Generators = None,
) -> Tensor:
    """64px images (B, 3, S, S) from the decoder (section 2.1), guided towards its conditioning
    with classifier-free guidance ``guidance_scale`` (default: the decoder config's).

    ``image_emb`` (B, D) None decodes from the caption alone (the learned null image embedding);
    ``text_tokens`` (B, L) None drops the caption (the learned null caption, as in training), which
    suits images whose caption is unknown. ``noise`` is x_T (e.g. a DDIM-inverted latent);
    ``sampler``, ``steps`` and the DDIM ``eta`` default to the decoder config's. ``generator``:
    one for all rows or one per row (the module docstring).
    """
    if image_emb is None and text_tokens is None:
        raise ValueError("decode needs an image embedding, a caption, or both")
    reference = image_emb if image_emb is not None else text_tokens
    b = reference.shape[0]
    device = _device(decoder)
    _check_rows("text_tokens", text_tokens, b)
    _check_rows("noise", noise, b)
    _check_generators(generator, b)
    emb = torch.zeros(b, decoder.embed_dim, device=device) if image_emb is None else image_emb
    tokens = torch.zeros(b, 1, dtype=torch.long) if text_tokens is None else text_tokens
    return decoder.sample(
        emb,
        tokens,
        guidance_scale=guidance_scale,
        steps=steps,
        generator=generator,
        noise=noise,
        sampler=sampler,
        eta=eta,
        drop_image_emb=image_emb is None,
        drop_caption=text_tokens is None,
    )


@torch.no_grad()
def upsample(
    upsamplers: Sequence[Upsampler],
    image: Tensor,
    *,
    steps: Steps = None,
    sampler: Literal["ddpm", "ddim"] | None = None,
    eta: float | None = None,
    noise: Sequence[Tensor | None] | None = None,
    generator: Generators = None,
) -> list[Tensor]:
    """Each upsampler's output in turn (section 2.1: 64→256, then 256→1024), lowest first.

    ``steps``: one value for all or one per upsampler (None: each config's; the paper uses DDIM
    with 27 and 15 steps); ``noise``: None or one x_T (or None) per upsampler; ``sampler`` and the
    DDIM ``eta`` default to each upsampler's config. ``generator``: one for all rows or one per
    row of ``image`` (the module docstring).
    """
    _check_generators(generator, image.shape[0])
    per_steps = _per_stage(steps, len(upsamplers), "steps")
    per_noise = [None] * len(upsamplers) if noise is None else list(noise)
    if len(per_noise) != len(upsamplers):
        raise ValueError(f"noise: {len(per_noise)} tensors for {len(upsamplers)} upsamplers")
    outputs, x = [], image
    for up, n_steps, x_T in zip(upsamplers, per_steps, per_noise, strict=True):
        x = up.sample(x, steps=n_steps, generator=generator, noise=x_T, sampler=sampler, eta=eta)
        outputs.append(x)
    return outputs


@torch.no_grad()
def invert(
    decoder: Decoder,
    image: Tensor,
    image_emb: Tensor,
    text_tokens: Tensor | None = None,
    *,
    guidance_scale: float | None = None,
    steps: int | None = None,
) -> Tensor:
    """The DDIM-inverted latent x_T (B, 3, S, S) of images (B, 3, H, W) in [-1, 1] under the
    decoder conditioned on their CLIP image embeddings (section 3: the bipartite latent (z_i, x_T),
    "obtained by inverting the decoder with DDIM"; Song et al. 2021 §4.3).

    Images of another size are resized to the decoder's S first (antialiased bicubic).
    ``text_tokens`` None drops the caption, as :func:`decode` does. Decoding z_i from x_T with
    DDIM η = 0 and the same ``steps`` and ``guidance_scale`` (both default to the decoder config's)
    reconstructs the image up to discretisation error.
    """
    size = decoder.cfg.image_size
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"invert needs (B, 3, H, W) images, got {tuple(image.shape)}")
    if tuple(image.shape[-2:]) != (size, size):
        image = downscale(image, size)
    b = image.shape[0]
    _check_rows("image_emb", image_emb, b)
    _check_rows("text_tokens", text_tokens, b)
    tokens = torch.zeros(b, 1, dtype=torch.long) if text_tokens is None else text_tokens
    return decoder.invert(
        image.float(),
        image_emb,
        tokens,
        guidance_scale=guidance_scale,
        steps=steps,
        drop_caption=text_tokens is None,
    )


# ----------------------------------------------------------------------------------------------
# Section 2: the cascade


@torch.no_grad()
def generate(
    text_emb: Tensor,
    text_tokens: Tensor,
    *,
    decoder: Decoder,
    prior: nn.Module | None = None,
    upsamplers: Sequence[Upsampler] = (),
    conditioning: Conditioning = "prior",
    prior_guidance: float = 1.0,
    prior_steps: int | None = None,
    num_candidates: int | None = None,
    temperature: float | None = None,
    decoder_guidance: float | None = None,
    decoder_steps: int | None = None,
    upsampler_steps: Steps = None,
    batch_size: int | None = None,
    generator: Generators = None,
) -> Generation:
    """Text → image with the unCLIP cascade (section 2, figure 2): CLIP text embeddings ``text_emb``
    (N, D) and caption tokens ``text_tokens`` (N, L) → image embeddings (:func:`image_embeddings`
    with ``conditioning``, ``prior_*``, ``num_candidates``, ``temperature``) → 64px images
    (:func:`decode` with the caption, guidance ``decoder_guidance``) → each upsampler in turn
    (:func:`upsample`). Every sampler uses its stage config's sampler and η.

    Many prompts (or one prompt repeated for several samples) are rows; ``batch_size`` runs them in
    chunks of at most that many rows, one after the other from the same generator (None: all at
    once). The same generator seed and ``batch_size`` give identical outputs.

    ``generator`` may instead be one generator per row (N of them): row i's random numbers at every
    stage then come from generator i alone, so its output is what the same call gives for that row
    alone with that generator, whatever ``batch_size`` and the other rows (up to the rounding of
    batched kernels). Batch generation (``unclip generate``) runs this way.
    """
    n = text_emb.shape[0]
    if n < 1:
        raise ValueError("generate needs at least one caption")
    _check_rows("text_tokens", text_tokens, n)
    _check_generators(generator, n)
    step = n if batch_size is None else int(batch_size)
    if step < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    parts = []
    for start in range(0, n, step):
        rows = slice(start, start + step)
        rows_generator = _generator_rows(generator, rows)
        emb = image_embeddings(
            text_emb[rows],
            text_tokens[rows],
            prior,
            conditioning=conditioning,
            guidance_scale=prior_guidance,
            steps=prior_steps,
            num_candidates=num_candidates,
            temperature=temperature,
            generator=rows_generator,
        )
        low = decode(
            decoder,
            emb,
            text_tokens[rows],
            guidance_scale=decoder_guidance,
            steps=decoder_steps,
            generator=rows_generator,
        )
        high = upsample(upsamplers, low, steps=upsampler_steps, generator=rows_generator)
        parts.append(Generation(emb, [low, *high]))
    return Generation(
        None if parts[0].image_emb is None else torch.cat([p.image_emb for p in parts]),
        [torch.cat(stage) for stage in zip(*(p.images for p in parts), strict=True)],
    )


# ----------------------------------------------------------------------------------------------
# Section 3: manipulations


def _decode_rows(
    decoder: Decoder,
    emb: Tensor,
    tokens: Tensor | None,
    latent: Tensor,
    *,
    num: int,
    eta: float,
    guidance_scale: float | None,
    steps: int | None,
    upsamplers: Sequence[Upsampler],
    upsampler_steps: Steps,
    generator: torch.Generator | None,
) -> list[Tensor]:
    """DDIM-decode rows grouped ``num`` per input from x_T = ``latent``, then upsample every stage
    with DDIM at the same η from one x_T per input group (module docstring)."""
    device = _device(decoder)
    groups = emb.shape[0] // num
    up_noise = [
        _rows(randn((groups, 3, side, side), generator, device), num)
        for side in _upsampled_sizes(decoder, upsamplers)
    ]
    low = decode(
        decoder,
        emb,
        tokens,
        guidance_scale=guidance_scale,
        steps=steps,
        sampler="ddim",
        eta=eta,
        noise=latent,
        generator=generator,
    )
    high = upsample(
        upsamplers,
        low,
        steps=upsampler_steps,
        sampler="ddim",
        eta=eta,
        noise=up_noise,
        generator=generator,
    )
    return [low, *high]


@torch.no_grad()
def variations(
    decoder: Decoder,
    image_emb: Tensor,
    text_tokens: Tensor | None = None,
    *,
    num: int = 4,
    eta: float = 1.0,
    latent: Tensor | None = None,
    guidance_scale: float | None = None,
    steps: int | None = None,
    upsamplers: Sequence[Upsampler] = (),
    upsampler_steps: Steps = None,
    generator: torch.Generator | None = None,
) -> Generation:
    """``num`` variations of each of B images (section 3.1, figure 3): keep the image embedding z_i
    (B, D) and decode it with DDIM η = ``eta`` > 0, so each sample takes its own path while keeping
    what z_i encodes ("to produce variations, we use DDIM with η > 0 for sampling").

    ``latent`` (B, 3, S, S), e.g. :func:`invert` of the images, starts every variation of an image
    from that x_T (with η = 0 they are then identical and reconstruct the image); without it each
    variation draws its own x_T. ``text_tokens`` (B, L) None drops the caption. Returns B·num rows,
    row i·num + j the j-th variation of image i.
    """
    if num < 1:
        raise ValueError(f"num must be at least 1, got {num}")
    if eta < 0:
        raise ValueError(f"eta must be non-negative, got {eta}")
    b = image_emb.shape[0]
    _check_rows("text_tokens", text_tokens, b)
    _check_rows("latent", latent, b)
    size = decoder.cfg.image_size
    if latent is None:
        x_T = randn((b * num, 3, size, size), generator, _device(decoder))
    else:
        x_T = _rows(latent.float(), num)
    emb = _rows(F.normalize(image_emb.float(), dim=-1), num)
    images = _decode_rows(
        decoder,
        emb,
        _rows(text_tokens, num),
        x_T,
        num=num,
        eta=eta,
        guidance_scale=guidance_scale,
        steps=steps,
        upsamplers=upsamplers,
        upsampler_steps=upsampler_steps,
        generator=generator,
    )
    return Generation(emb, images)


@torch.no_grad()
def interpolate(
    decoder: Decoder,
    image_emb_a: Tensor,
    image_emb_b: Tensor,
    text_tokens: Tensor | None = None,
    *,
    num: int = 5,
    latents: Tensor | tuple[Tensor, Tensor] | None = None,
    guidance_scale: float | None = None,
    steps: int | None = None,
    upsamplers: Sequence[Upsampler] = (),
    upsampler_steps: Steps = None,
    generator: torch.Generator | None = None,
) -> Generation:
    """Interpolations between pairs of images (section 3.2, figure 4): z_iθ = slerp(z_i1, z_i2, θ)
    for ``num`` values of θ evenly spaced in [0, 1], decoded with DDIM η = 0.

    ``latents``: None draws one x_T per pair, fixed for its whole row ("fix the DDIM latent to a
    randomly-sampled value for all interpolates"); a tensor (B, 3, S, S) is that fixed x_T; a pair
    (x_T1, x_T2), the two images' DDIM-inverted latents (:func:`invert`), is slerped too,
    x_Tθ = slerp(x_T1, x_T2, θ) on the flattened latents. ``image_emb_a``/``_b`` (B, D);
    ``text_tokens`` (B, L) None drops the caption. Returns B·num rows, row i·num + j at θ_j of pair
    i; θ = 0 / 1 decode z_i1 / z_i2 from x_T1 / x_T2 exactly as :func:`decode` would.
    """
    if num < 2:
        raise ValueError(f"num must be at least 2, got {num}")
    b = image_emb_a.shape[0]
    _check_rows("image_emb_b", image_emb_b, b)
    _check_rows("text_tokens", text_tokens, b)
    device = _device(decoder)
    size = decoder.cfg.image_size
    theta = torch.linspace(0.0, 1.0, num, device=device)
    za = F.normalize(image_emb_a.to(device).float(), dim=-1)
    zb = F.normalize(image_emb_b.to(device).float(), dim=-1)
    emb = slerp(za[:, None], zb[:, None], theta).reshape(b * num, -1)
    if latents is None:
        x_T = _rows(randn((b, 3, size, size), generator, device), num)
    elif isinstance(latents, Tensor):
        _check_rows("latents", latents, b)
        x_T = _rows(latents.to(device).float(), num)
    else:
        xa, xb = (x.to(device).float() for x in latents)
        _check_rows("latents[0]", xa, b)
        _check_rows("latents[1]", xb, b)
        x_T = slerp(xa.flatten(1)[:, None], xb.flatten(1)[:, None], theta)
        x_T = x_T.reshape(b * num, *xa.shape[1:])
    images = _decode_rows(
        decoder,
        emb,
        _rows(text_tokens, num),
        x_T,
        num=num,
        eta=0.0,
        guidance_scale=guidance_scale,
        steps=steps,
        upsamplers=upsamplers,
        upsampler_steps=upsampler_steps,
        generator=generator,
    )
    return Generation(emb, images, theta.repeat(b))


@torch.no_grad()
def text_diff(
    decoder: Decoder,
    image_emb: Tensor,
    text_emb: Tensor,
    target_text_emb: Tensor,
    text_tokens: Tensor | None = None,
    *,
    num: int = 5,
    max_theta: float = 0.5,
    latent: Tensor | None = None,
    guidance_scale: float | None = None,
    steps: int | None = None,
    upsamplers: Sequence[Upsampler] = (),
    upsampler_steps: Steps = None,
    generator: torch.Generator | None = None,
) -> Generation:
    """Language-guided edits by text diffs (section 3.3, figure 5): with z_d =
    normalize(z_t − z_t0) (:func:`text_diff_direction`; ``text_emb`` the current caption's z_t0,
    ``target_text_emb`` the target's z_t), decode z_θ = slerp(z_i, z_d, θ) for ``num`` values of θ
    evenly spaced in [0, ``max_theta``] (the paper goes up to a value in [0.25, 0.50]) with DDIM
    η = 0 from one x_T per image, fixed for its row.

    ``latent`` (B, 3, S, S) is that x_T, normally the image's DDIM-inverted latent (:func:`invert`,
    with the same ``text_tokens``, ``steps`` and ``guidance_scale``), so θ = 0 reconstructs the
    image; None draws one per row. ``text_tokens`` (B, L) None drops the caption. Returns B·num
    rows, row i·num + j at θ_j of image i.
    """
    if num < 1:
        raise ValueError(f"num must be at least 1, got {num}")
    b = image_emb.shape[0]
    for name, x in (
        ("text_emb", text_emb),
        ("target_text_emb", target_text_emb),
        ("text_tokens", text_tokens),
        ("latent", latent),
    ):
        _check_rows(name, x, b)
    device = _device(decoder)
    size = decoder.cfg.image_size
    theta = torch.linspace(0.0, float(max_theta), num, device=device)
    z_i = F.normalize(image_emb.to(device).float(), dim=-1)
    z_d = text_diff_direction(text_emb.to(device), target_text_emb.to(device))
    emb = slerp(z_i[:, None], z_d[:, None], theta).reshape(b * num, -1)
    if latent is None:
        latent = randn((b, 3, size, size), generator, device)
    images = _decode_rows(
        decoder,
        emb,
        _rows(text_tokens, num),
        _rows(latent.to(device).float(), num),
        num=num,
        eta=0.0,
        guidance_scale=guidance_scale,
        steps=steps,
        upsamplers=upsamplers,
        upsampler_steps=upsampler_steps,
        generator=generator,
    )
    return Generation(emb, images, theta.repeat(b))
