"""The decoder stage (Ramesh et al. 2022, section 2.1): CLIP image embedding (and caption) → 64px image.

A :class:`~unclip.unet.DecoderUNet` trained under a :class:`~unclip.diffusion.GaussianDiffusion`. As
the paper does for classifier-free guidance, training drops the CLIP image embedding (replaced by a
learned null embedding) for 10% of the rows and the caption for 50% (``DecoderNetConfig``'s
``image_emb_drop`` / ``text_drop``, drawn independently); sampling guides towards the fully
conditional prediction and away from the one with both dropped (Ho & Salimans 2022; GLIDE §2.3).
With ``learned_variance`` the network also predicts the reverse-process variance and trains on the
hybrid loss L_simple + λ·L_vlb (Nichol & Dhariwal 2021 eq. 16), as the paper's decoder does (table 3,
"learned" sampling variance).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from unclip.diffusion_process import DiffusionConfig
from unclip.diffusion_sampling import GuidableFn
from unclip.stage import ImageDiffusionStage, eval_mode
from unclip.unet import DecoderNetConfig, DecoderUNet


def bernoulli(
    batch: int, p: float, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """(batch,) bool, True with probability ``p``; drawn on the generator's device."""
    where = generator.device if generator is not None else device
    return (torch.rand(batch, generator=generator, device=where) < p).to(device)


class Decoder(ImageDiffusionStage):
    """The decoder stage model: ``loss`` for the trainer, ``sample`` for generation.

    Holds the network as ``net`` and the diffusion process as the plain attribute ``diffusion``
    (:class:`~unclip.stage.ImageDiffusionStage`). Images are (B, 3, image_size, image_size) in
    [-1, 1]; image embeddings (B, embed_dim) are L2-normalised here (CLIP embeddings are unit
    vectors; this also absorbs float16 rounding of the embedding store); caption tokens are
    open_clip ids (0 = padding).
    """

    cfg: DecoderNetConfig

    def __init__(
        self,
        net_cfg: DecoderNetConfig,
        diffusion_cfg: DiffusionConfig,
        *,
        embed_dim: int,
        vocab_size: int = 49408,
    ) -> None:
        net = DecoderUNet(
            net_cfg,
            embed_dim=embed_dim,
            vocab_size=vocab_size,
            learned_variance=diffusion_cfg.learned_variance,
        )
        super().__init__(net_cfg, net, diffusion_cfg)
        self.embed_dim = embed_dim

    def _inputs(
        self, image_emb: torch.Tensor, text_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device, dtype = self._device_dtype()
        emb = F.normalize(image_emb.to(device, torch.float32), dim=-1).to(dtype)
        return emb, text_tokens.to(device).long()

    def terms(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Batch means of the diffusion loss terms: "loss" (what to minimise; the hybrid loss with
        learned variance), "mse", and "vb" with learned variance. The image embedding and the
        caption are each dropped per row with the configured probability (section 2.1)."""
        device, dtype = self._device_dtype()
        image = batch["image"].to(device, dtype)
        emb, tokens = self._inputs(batch["image_emb"], batch["text_tokens"])
        b = image.shape[0]
        drop_image = bernoulli(b, self.cfg.image_emb_drop, generator, device)
        drop_text = bernoulli(b, self.cfg.text_drop, generator, device)

        def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.net(
                x_t,
                t,
                image_emb=emb,
                text_tokens=tokens,
                drop_image=drop_image,
                drop_text=drop_text,
            )

        losses = self.diffusion.training_losses(model_fn, image, generator=generator)
        return {name: value.mean() for name, value in losses.items()}

    def _guidable(
        self,
        emb: torch.Tensor,
        tokens: torch.Tensor,
        *,
        drop_image_emb: bool = False,
        drop_caption: bool = False,
    ) -> GuidableFn:
        """``fn3(x_t, t, drop)`` for :meth:`GaussianDiffusion.guided`: the network on these
        embeddings and captions, repeated to x_t's rows (guidance stacks [cond; uncond]). The
        unconditional rows (``drop``) lose both the image embedding and the caption; the
        conditional ones lose the image embedding with ``drop_image_emb`` (the paper's
        caption-only decoding, figure 7, with the learned null embedding for the zero vector) and
        the caption with ``drop_caption`` (the learned null caption, as in training)."""
        b = emb.shape[0]

        def fn3(x_t: torch.Tensor, t: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
            k = x_t.shape[0] // b
            return self.net(
                x_t,
                t,
                image_emb=emb.repeat(k, 1),
                text_tokens=tokens.repeat(k, 1),
                drop_image=drop | drop_image_emb,
                drop_text=drop | drop_caption,
            )

        return fn3

    @torch.no_grad()
    def sample(
        self,
        image_emb: torch.Tensor,
        text_tokens: torch.Tensor,
        *,
        guidance_scale: float | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        sampler: Literal["ddpm", "ddim"] | None = None,
        eta: float | None = None,
        drop_image_emb: bool = False,
        drop_caption: bool = False,
    ) -> torch.Tensor:
        """64px images (B, 3, H, W) in [-1, 1] for image embeddings and captions.

        Classifier-free guidance with ``guidance_scale`` (default: the diffusion config's
        ``guidance_scale``; 1 = no guidance): the unconditional branch drops both the image
        embedding and the caption. ``steps`` respaces the sampler (default: the config's
        ``sampling_steps``); ``noise`` is x_T; ``generator`` draws x_T and every step's noise.
        ``sampler`` ("ddpm" | "ddim") and the DDIM ``eta`` default to the config's; DDIM with
        η > 0 from a fixed x_T gives the paper's variations (section 3.1), η = 0 a deterministic
        decoding of (z_i, x_T). ``drop_image_emb`` / ``drop_caption`` condition on the caption
        only / the image embedding only (learned null embeddings, see :meth:`_guidable`).
        Runs the network in eval mode (no dropout) and restores its mode afterwards.
        """
        emb, tokens = self._inputs(image_emb, text_tokens)
        b = emb.shape[0]
        scale = self.diffusion.cfg.guidance_scale if guidance_scale is None else guidance_scale
        fn3 = self._guidable(emb, tokens, drop_image_emb=drop_image_emb, drop_caption=drop_caption)
        size = self.cfg.image_size
        x = self._sample(
            self.diffusion.guided(fn3, scale),
            (b, 3, size, size),
            sampler=sampler,
            steps=steps,
            eta=eta,
            noise=noise,
            generator=generator,
        )
        return x.float().clamp(-1, 1)

    @torch.no_grad()
    def invert(
        self,
        image: torch.Tensor,
        image_emb: torch.Tensor,
        text_tokens: torch.Tensor,
        *,
        guidance_scale: float | None = None,
        steps: int | None = None,
        drop_image_emb: bool = False,
        drop_caption: bool = False,
    ) -> torch.Tensor:
        """The DDIM-inverted latent x_T (B, 3, H, W) of 64px images (B, 3, H, W) in [-1, 1]:
        the deterministic DDIM ODE (Song et al. 2021 §4.3) run forward with this decoder's model
        conditioned on ``image_emb`` and ``text_tokens`` (:meth:`GaussianDiffusion.ddim_invert`).
        (z_i, x_T) is the paper's bipartite latent (section 3): ``sample(image_emb, text_tokens,
        noise=x_T, sampler="ddim", eta=0)`` with the same ``guidance_scale``, ``steps`` and drop
        flags reconstructs the image up to discretisation error. ``guidance_scale`` defaults to the
        config's, as :meth:`sample`'s does, so the defaults of both agree."""
        emb, tokens = self._inputs(image_emb, text_tokens)
        device = emb.device
        size = self.cfg.image_size
        if image.ndim != 4 or tuple(image.shape[1:]) != (3, size, size):
            raise ValueError(
                f"invert needs (B, 3, {size}, {size}) images, got {tuple(image.shape)}"
            )
        if image.shape[0] != emb.shape[0]:
            raise ValueError(f"{image.shape[0]} images but {emb.shape[0]} image embeddings")
        scale = self.diffusion.cfg.guidance_scale if guidance_scale is None else guidance_scale
        fn3 = self._guidable(emb, tokens, drop_image_emb=drop_image_emb, drop_caption=drop_caption)
        with eval_mode(self):
            x = self.diffusion.ddim_invert(
                self.diffusion.guided(fn3, scale), image.to(device, torch.float32), steps=steps
            )
        return x.float()
