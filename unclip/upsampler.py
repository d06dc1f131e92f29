"""The upsampler stages (Ramesh et al. 2022, section 2.1): 64→256 and 256→1024 super-resolution.

An :class:`~unclip.unet.UpsamplerUNet` trained under a :class:`~unclip.diffusion.GaussianDiffusion`
to draw a high-resolution image given a low-resolution one:

* **conditioning input** — the stage model makes it from the high-res training image: an
  antialiased bicubic downscale to ``low_res``, then noise-conditioning augmentation (section 2.1:
  Gaussian blur for the first upsampler, BSR degradation for the second; ``augmentation``), then a
  bilinear upscale back to ``high_res`` (as ADM's super-resolution model does), concatenated to x_t;
* **random crops** — the paper trains on random crops of a quarter of the target size
  (``crop_fraction``, table 3) and, since the network is purely convolutional, samples at full
  resolution; the same crop is taken from the target and from the upscaled conditioning image.

At sampling the conditioning image gets a fixed, mild Gaussian blur (``sample_blur_sigma``,
default σ = 0.4 low-res pixels, the low end of the training blur range) and no other corruption. The
model never saw an uncorrupted conditioning image in training (the "blur" augmentation always blurs;
BSR always applies at least one blur), so a sharp input would be slightly out of distribution; the
mild blur puts it in-distribution while throwing away the least information, and it is
deterministic, so sampling is a function of ``low_res``, the noise and the generator only.
Set ``sample_blur_sigma: 0`` to feed the low-res image unchanged.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from unclip.degradations import bsr_degrade, gaussian_blur, random_blur
from unclip.diffusion_process import DiffusionConfig
from unclip.stage import ImageDiffusionStage
from unclip.unet import UpsamplerNetConfig, UpsamplerUNet


def downscale(image: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bicubic resize of (B, C, H, W) to (size, size), clamped to [-1, 1]."""
    out = F.interpolate(
        image.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True
    )
    return out.clamp(-1, 1).to(image.dtype)


def upscale(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize to ``size`` (H, W) (ADM's super-resolution conditioning)."""
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False)


def to_residual(image: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """What a ``residual`` upsampler diffuses: (image − cond) / 2, in [-1, 1] like an image, so
    the diffusion's scale and static thresholding still fit. Its x₀ is near zero wherever the
    upscaled conditioning image is already right (flat regions), so the network only learns
    edges and texture; predicting the image itself, a small UNet spends its first thousands of
    steps learning to copy the conditioning image's colours."""
    return (image - cond) / 2


def from_residual(residual: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """The image of :func:`to_residual`'s ``residual`` on ``cond``."""
    return cond + 2 * residual


def random_crops(
    images: list[torch.Tensor], size: int, generator: torch.Generator | None
) -> list[torch.Tensor]:
    """The same random (size × size) crop, drawn per row, of each (B, C, H, W) tensor."""
    b, _, h, w = images[0].shape
    if size == h and size == w:
        return images
    where = generator.device if generator is not None else torch.device("cpu")
    top = torch.randint(0, h - size + 1, (b,), generator=generator, device=where).tolist()
    left = torch.randint(0, w - size + 1, (b,), generator=generator, device=where).tolist()
    return [
        torch.stack(
            [
                img[i, :, y : y + size, x : x + size]
                for i, (y, x) in enumerate(zip(top, left, strict=True))
            ]
        )
        for img in images
    ]


class Upsampler(ImageDiffusionStage):
    """An upsampler stage model: ``loss`` for the trainer, ``sample`` for generation.

    Holds the network as ``net`` and the diffusion process as the plain attribute ``diffusion``
    (:class:`~unclip.stage.ImageDiffusionStage`).
    """

    cfg: UpsamplerNetConfig

    def __init__(self, net_cfg: UpsamplerNetConfig, diffusion_cfg: DiffusionConfig) -> None:
        net = UpsamplerUNet(net_cfg, learned_variance=diffusion_cfg.learned_variance)
        super().__init__(net_cfg, net, diffusion_cfg)

    def corrupt(self, low: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Training-time noise-conditioning augmentation of low-res images (section 2.1)."""
        if self.cfg.augmentation == "bsr":
            return bsr_degrade(low, generator)
        return random_blur(low, generator, tuple(self.cfg.blur_sigma))

    def conditioning(
        self, image: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """High-res training images → their corrupted low-res versions, upscaled back to the
        high-res size (what the network is conditioned on in training)."""
        low = self.corrupt(downscale(image, self.cfg.low_res), generator)
        return upscale(low, tuple(image.shape[-2:]))

    def terms(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Batch means of the diffusion loss terms ("loss", "mse", and "vb" with learned variance)
        on random ``crop_fraction`` crops of the batch's high-res images and of their corrupted,
        re-upscaled low-res versions (section 2.1)."""
        device, dtype = self._device_dtype()
        image = batch["image"].to(device, dtype)
        high = self.cfg.high_res
        if tuple(image.shape[-2:]) != (high, high):
            raise ValueError(
                f"upsampler batches need ({high}, {high}) images, got {tuple(image.shape[-2:])}"
            )
        cond = self.conditioning(image, generator)
        target, cond = random_crops([image, cond], self.cfg.crop_size(), generator)
        if self.cfg.residual:
            target = to_residual(target, cond)

        def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.net(x_t, t, low_res=cond)

        losses = self.diffusion.training_losses(model_fn, target, generator=generator)
        return {name: value.mean() for name, value in losses.items()}

    @torch.no_grad()
    def sample(
        self,
        low_res: torch.Tensor,
        *,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        sampler: Literal["ddpm", "ddim"] | None = None,
        eta: float | None = None,
    ) -> torch.Tensor:
        """High-res images (B, 3, high_res, high_res) in [-1, 1] from low-res ones (B, 3, low_res,
        low_res), at full resolution. A ``low_res`` of another size gives an output scaled by
        high_res / low_res (its sides must stay divisible by 2^(levels−1)). The conditioning image
        gets the fixed ``sample_blur_sigma`` blur (module docstring). ``steps`` respaces the sampler
        (default: the diffusion config's ``sampling_steps``, e.g. DDIM 27 / 15 in the paper);
        ``noise`` is x_T; ``sampler`` and the DDIM ``eta`` default to the diffusion config's. Runs
        the network in eval mode and restores its mode afterwards."""
        device, dtype = self._device_dtype()
        low = low_res.to(device, dtype).clamp(-1, 1)
        b, _, h, w = low.shape
        size = (
            round(h * self.cfg.high_res / self.cfg.low_res),
            round(w * self.cfg.high_res / self.cfg.low_res),
        )
        if self.cfg.sample_blur_sigma > 0:
            low = gaussian_blur(low, self.cfg.sample_blur_sigma)
        cond = upscale(low, size)

        def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.net(x_t, t, low_res=cond)

        x = self._sample(
            model_fn,
            (b, 3, *size),
            sampler=sampler,
            steps=steps,
            eta=eta,
            noise=noise,
            generator=generator,
        )
        if self.cfg.residual:
            x = from_residual(x, cond)
        return x.float().clamp(-1, 1)
