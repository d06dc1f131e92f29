"""Noise-conditioning augmentation of the upsamplers' low-resolution inputs (DALL-E 2 section 2.1).

"we corrupt the conditioning images for the first upsampling stage with gaussian blur, and for the
second we use a more diverse BSR degradation" (Ramesh et al. 2022, following Ho et al. 2021's
conditioning augmentation, Rombach et al. 2022's use of BSR, and Zhang et al. 2021 "BSRGAN").
Training on corrupted conditioning images makes an upsampler robust to the artefacts of the stage
below it, whose outputs are generated rather than clean downscaled photographs.

Every function takes a batch (B, C, H, W) in [-1, 1], returns the same shape in [-1, 1], computes in
float32 and returns the input's dtype. Random choices come only from the ``torch.Generator`` given
(on its own device; results are moved to the images' device), so a generator seeded the same way
gives the same output. Pure torch, no OpenCV/PIL: JPEG artefacts come from a real, vectorised
JPEG quantisation (YCbCr, 4:2:0 chroma subsampling, 8×8 DCT, the standard IJG quantisation tables
scaled by quality, rounding), without the lossless entropy coding, which changes no pixel.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F

_F = TypeVar("_F", bound=Callable[..., torch.Tensor])


def _float32(fn: _F) -> _F:
    """Run ``fn`` with autocast off on its images' device, so blur kernels and the DCT stay float32
    when the caller trains under bf16 autocast."""

    @functools.wraps(fn)
    def wrapper(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return fn(x, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# Random draws from a generator on its own device


def _device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _uniform(
    generator: torch.Generator | None, n: int, low: float, high: float, device: torch.device
) -> torch.Tensor:
    """n draws from U[low, high), as float32 on ``device``."""
    u = torch.rand(n, generator=generator, device=_device(generator))
    return (low + (high - low) * u).to(device)


def _coin(generator: torch.Generator | None, p: float) -> bool:
    return bool(torch.rand((), generator=generator, device=_device(generator)).item() < p)


def _choice(generator: torch.Generator | None, n: int) -> int:
    return int(torch.randint(n, (), generator=generator, device=_device(generator)).item())


def _as_sigma(sigma: float | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device)
    return sigma.expand(batch) if sigma.ndim == 0 else sigma.reshape(batch)


def _per_sample_conv(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Convolve each image of ``x`` (B, C, H, W) with its own kernel (B, kh, kw), every channel
    alike, replicate-padded so the size is kept."""
    b, c, h, w = x.shape
    kh, kw = kernels.shape[-2:]
    weight = kernels[:, None].repeat_interleave(c, dim=0)  # (B*C, 1, kh, kw)
    padded = F.pad(x.reshape(1, b * c, h, w), (kw // 2, kw // 2, kh // 2, kh // 2), "replicate")
    return F.conv2d(padded, weight, groups=b * c).reshape(b, c, h, w)


# ----------------------------------------------------------------------------------------------
# Blur


@_float32
def gaussian_blur(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """Isotropic Gaussian blur with standard deviation ``sigma`` pixels (a number or one per image,
    shape (B,)); σ = 0 leaves an image unchanged. Separable kernel of radius ⌈3·max σ⌉."""
    b = x.shape[0]
    xf = x.float()
    sigma = _as_sigma(sigma, b, x.device).clamp(min=1e-3)
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (B, K)
    out = _per_sample_conv(xf, kernel[:, :, None])
    out = _per_sample_conv(out, kernel[:, None, :])
    return out.clamp(-1, 1).to(x.dtype)


@_float32
def anisotropic_blur(
    x: torch.Tensor, sigma_x: torch.Tensor, sigma_y: torch.Tensor, theta: torch.Tensor
) -> torch.Tensor:
    """Anisotropic Gaussian blur (BSRGAN's generalised blur kernel): per image, standard deviations
    ``sigma_x``, ``sigma_y`` (B,) along axes rotated by ``theta`` (B,) radians."""
    b = x.shape[0]
    sx = _as_sigma(sigma_x, b, x.device).clamp(min=1e-3)
    sy = _as_sigma(sigma_y, b, x.device).clamp(min=1e-3)
    th = _as_sigma(theta, b, x.device)
    radius = max(1, math.ceil(3 * float(torch.maximum(sx, sy).max())))
    r = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    cos, sin = torch.cos(th)[:, None, None], torch.sin(th)[:, None, None]
    u = cos * xx + sin * yy
    v = -sin * xx + cos * yy
    kernel = torch.exp(-(u**2) / (2 * sx[:, None, None] ** 2) - v**2 / (2 * sy[:, None, None] ** 2))
    kernel = kernel / kernel.sum(dim=(1, 2), keepdim=True)
    return _per_sample_conv(x.float(), kernel).clamp(-1, 1).to(x.dtype)


@_float32
def random_blur(
    x: torch.Tensor,
    generator: torch.Generator | None,
    sigma_range: tuple[float, float] = (0.4, 0.6),
) -> torch.Tensor:
    """The first upsampler's augmentation (section 2.1): Gaussian blur with σ ~ U(sigma_range)
    drawn per image."""
    sigma = _uniform(generator, x.shape[0], sigma_range[0], sigma_range[1], x.device)
    return gaussian_blur(x, sigma)


# ----------------------------------------------------------------------------------------------
# Resize, noise, JPEG


@_float32
def resize_degrade(x: torch.Tensor, scale: float, down_mode: str, up_mode: str) -> torch.Tensor:
    """Downscale by ``scale`` (< 1) with ``down_mode`` and back to the input size with ``up_mode``
    (``"bilinear"``, ``"bicubic"``, ``"area"`` or ``"nearest"``): loses detail, adds
    interpolation artefacts."""
    h, w = x.shape[-2:]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))

    def resize(img: torch.Tensor, to: tuple[int, int], mode: str) -> torch.Tensor:
        if mode in ("bilinear", "bicubic"):
            return F.interpolate(img, size=to, mode=mode, align_corners=False, antialias=True)
        return F.interpolate(img, size=to, mode=mode)

    small = resize(x.float(), size, down_mode)
    return resize(small, (h, w), up_mode).clamp(-1, 1).to(x.dtype)


@_float32
def add_gaussian_noise(
    x: torch.Tensor,
    generator: torch.Generator | None,
    std: float,
    *,
    gray: bool = False,
) -> torch.Tensor:
    """Additive Gaussian noise of standard deviation ``std`` (in [-1, 1] units); ``gray`` uses the
    same noise on every channel (BSRGAN's grey noise), else each channel gets its own."""
    b, c, h, w = x.shape
    shape = (b, 1 if gray else c, h, w)
    noise = torch.randn(shape, generator=generator, device=_device(generator)).to(x.device)
    return (x.float() + std * noise).clamp(-1, 1).to(x.dtype)


_LUMA_Q = torch.tensor(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=torch.float32,
)
_CHROMA_Q = torch.full((8, 8), 99.0)
_CHROMA_Q[:4, :4] = torch.tensor(
    [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]], dtype=torch.float32
)


def _dct_matrix(device: torch.device) -> torch.Tensor:
    """The orthonormal 8-point DCT-II matrix D (coefficients = D · block · Dᵀ)."""
    n = torch.arange(8, dtype=torch.float32, device=device)
    d = torch.cos((2 * n[None] + 1) * n[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    d[0] = d[0] / math.sqrt(2)
    return d


def _quality_tables(quality: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """IJG (libjpeg) quality scaling of a base table: (B,) qualities in [1, 100] → (B, 8, 8)."""
    q = quality.float().clamp(1, 100)
    scale = torch.where(q < 50, 5000 / q, 200 - 2 * q)
    tables = torch.floor((base.to(q.device)[None] * scale[:, None, None] + 50) / 100)
    return tables.clamp(1, 255)


def _dct_quantise(plane: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """(B, H, W) level-shifted plane → quantised and reconstructed plane, per-image tables."""
    b, h, w = plane.shape
    ph, pw = (-h) % 8, (-w) % 8
    padded = F.pad(plane[:, None], (0, pw, 0, ph), "replicate")[:, 0]
    hh, ww = padded.shape[-2:]
    blocks = padded.reshape(b, hh // 8, 8, ww // 8, 8).transpose(2, 3)  # (B, by, bx, 8, 8)
    d = _dct_matrix(plane.device)
    coeffs = d @ blocks @ d.T
    q = tables[:, None, None]
    coeffs = torch.round(coeffs / q) * q
    blocks = d.T @ coeffs @ d
    return blocks.transpose(2, 3).reshape(b, hh, ww)[:, :h, :w]


@_float32
def jpeg_compress(x: torch.Tensor, quality: float | torch.Tensor) -> torch.Tensor:
    """JPEG compression artefacts at ``quality`` (1-100; a number or one per image): RGB → YCbCr,
    4:2:0 chroma subsampling, 8×8 DCT quantised with the IJG tables, back to 8-bit RGB."""
    b, c, h, w = x.shape
    if c != 3:
        raise ValueError(f"jpeg_compress needs RGB images, got {c} channels")
    quality = _as_sigma(quality, b, x.device)
    rgb = (x.float().clamp(-1, 1) + 1) * 127.5
    r, g, bl = rgb.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * bl
    cb = -0.168736 * r - 0.331264 * g + 0.5 * bl
    cr = 0.5 * r - 0.418688 * g - 0.081312 * bl
    chroma = torch.stack([cb, cr], dim=1)
    ch, cw = (h + 1) // 2, (w + 1) // 2
    chroma = F.pad(chroma, (0, 2 * cw - w, 0, 2 * ch - h), "replicate")
    chroma = F.avg_pool2d(chroma, 2)  # 4:2:0
    y = _dct_quantise(y - 128, _quality_tables(quality, _LUMA_Q)) + 128
    ctab = _quality_tables(quality, _CHROMA_Q)
    cb = _dct_quantise(chroma[:, 0], ctab)
    cr = _dct_quantise(chroma[:, 1], ctab)
    chroma = F.interpolate(torch.stack([cb, cr], dim=1), scale_factor=2.0, mode="nearest")
    cb, cr = chroma[:, 0, :h, :w], chroma[:, 1, :h, :w]
    r = y + 1.402 * cr
    g = y - 0.344136 * cb - 0.714136 * cr
    bl = y + 1.772 * cb
    out = torch.round(torch.stack([r, g, bl], dim=1).clamp(0, 255))
    return (out / 127.5 - 1).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# BSR


@dataclass(frozen=True)
class BSRSettings:
    """Ranges of :func:`bsr_degrade`, scaled for the 64-256 px conditioning images it corrupts (BSRGAN's
    own ranges are for blurring a high-res photo before a ×4 downscale)."""

    blur_sigma: tuple[float, float] = (0.2, 1.0)
    """isotropic blur σ (pixels)"""
    aniso_sigma: tuple[float, float] = (0.2, 1.5)
    """anisotropic blur σ along each axis"""
    second_blur_prob: float = 0.5
    resize_prob: float = 0.75
    resize_scale: tuple[float, float] = (0.5, 1.0)
    noise_prob: float = 0.75
    noise_std: tuple[float, float] = (1 / 127.5, 20 / 127.5)
    """Gaussian noise σ in [-1, 1] units (1-20 grey levels of 255)"""
    jpeg_prob: float = 0.5
    jpeg_quality: tuple[float, float] = (40.0, 95.0)


_DOWN_MODES = ("bilinear", "bicubic", "area")
_UP_MODES = ("bilinear", "bicubic", "nearest")


def _random_blur_one(
    x: torch.Tensor, generator: torch.Generator | None, s: BSRSettings
) -> torch.Tensor:
    if _coin(generator, 0.5):
        return gaussian_blur(x, _uniform(generator, 1, *s.blur_sigma, x.device))
    sx, sy = _uniform(generator, 2, *s.aniso_sigma, x.device)
    theta = _uniform(generator, 1, 0.0, math.pi, x.device)
    return anisotropic_blur(x, sx[None], sy[None], theta)


@_float32
def bsr_degrade(
    x: torch.Tensor,
    generator: torch.Generator | None,
    settings: BSRSettings = BSRSettings(),
) -> torch.Tensor:
    """The second upsampler's augmentation (section 2.1): a BSR-style random degradation
    (Zhang et al. 2021 BSRGAN, as Rombach et al. 2022 use it), drawn independently per image.

    Each image gets, in a random order (BSRGAN shuffles its degradations): a blur (isotropic or
    anisotropic Gaussian, 50/50; always), a second blur (``second_blur_prob``), a
    downscale-upscale with random interpolation modes (``resize_prob``), Gaussian noise, colour or
    grey (``noise_prob``) and JPEG compression (``jpeg_prob``); then, as BSRGAN ends, a final JPEG
    compression. The size is kept: the upsampler's stage model resizes afterwards.
    """
    s = settings
    probs = {1: s.second_blur_prob, 2: s.resize_prob, 3: s.noise_prob, 4: s.jpeg_prob}
    out = []
    for i in range(x.shape[0]):
        img = x[i : i + 1]
        order = torch.randperm(5, generator=generator, device=_device(generator)).tolist()
        for op in order:
            if op != 0 and not _coin(generator, probs[op]):
                continue
            if op in (0, 1):
                img = _random_blur_one(img, generator, s)
            elif op == 2:
                scale = float(_uniform(generator, 1, *s.resize_scale, x.device))
                down = _DOWN_MODES[_choice(generator, len(_DOWN_MODES))]
                up = _UP_MODES[_choice(generator, len(_UP_MODES))]
                img = resize_degrade(img, scale, down, up)
            elif op == 3:
                std = float(_uniform(generator, 1, *s.noise_std, x.device))
                img = add_gaussian_noise(img, generator, std, gray=_coin(generator, 0.5))
            else:
                img = jpeg_compress(img, _uniform(generator, 1, *s.jpeg_quality, x.device).round())
        img = jpeg_compress(img, _uniform(generator, 1, *s.jpeg_quality, x.device).round())
        out.append(img)
    return torch.cat(out, dim=0)
