"""The decoder and upsampler stage models (DALL-E 2 section 2.1): losses, conditioning dropout,
overfitting a fixed batch, a finite hybrid loss with learned variance, and sampling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize, tiny_decoder_net

from unclip.decoder import Decoder
from unclip.diffusion_process import DiffusionConfig
from unclip.unet import DecoderNetConfig, UpsamplerNetConfig
from unclip.upsampler import Upsampler, downscale, random_crops

EMBED = 16


def decoder_cfg(**kw) -> DecoderNetConfig:
    return tiny_decoder_net(**kw)


def upsampler_cfg(**kw) -> UpsamplerNetConfig:
    base = dict(
        low_res=8,
        high_res=32,
        channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        crop_fraction=0.5,
    )
    return UpsamplerNetConfig(**{**base, **kw})


def images(b: int, size: int, seed: int = 0) -> torch.Tensor:
    """Simple images in [-1, 1]: smooth colour fields plus a bright square."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(b, 3, 4, 4, generator=gen)
    img = 0.6 * F.interpolate(base, size=(size, size), mode="bilinear").tanh()
    for i in range(b):
        y, x = torch.randint(0, size // 2, (2,), generator=gen).tolist()
        img[i, :, y : y + size // 3, x : x + size // 3] = 0.9
    return img


def tokens(b: int, length: int = 8) -> torch.Tensor:
    rows = [[49406, 320 + i, 1000 + i, 49407] + [0] * (length - 4) for i in range(b)]
    return torch.tensor(rows)


def decoder_batch(b: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "image": images(b, 16, seed),
        "image_emb": F.normalize(torch.randn(b, EMBED, generator=gen), dim=-1),
        "text_tokens": tokens(b),
    }


def repeat(batch: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    return {k: v.repeat(n, *[1] * (v.ndim - 1)) for k, v in batch.items()}


def train(model, batch, steps: int, lr: float, check_finite: bool = False):
    """Adam on a fixed batch; returns (eval terms before, eval terms after, per-step records).
    The evaluation uses a fixed generator and 8 copies of the batch (fixed t and noise)."""
    big = repeat(batch, 8)

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            model.eval()
            terms = model.terms(big, torch.Generator().manual_seed(123))
            model.train()
        return {k: float(v) for k, v in terms.items()}

    before = evaluate()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    records = []
    for _ in range(steps):
        terms = model.terms(batch, gen)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if check_finite:
            grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            records.append(
                {
                    "loss": float(terms["loss"].detach()),
                    "vb": float(terms["vb"].detach()),
                    "grads_finite": bool(torch.isfinite(grads).all()),
                }
            )
        opt.step()
    return before, evaluate(), records


# ---------------------------------------------------------------------------------------------
# Decoder


@pytest.fixture(scope="module")
def trained_lv_decoder():
    """A tiny decoder with learned variance (the paper's setting) trained 200 steps on 4 images."""
    torch.manual_seed(0)
    model = Decoder(
        decoder_cfg(),
        DiffusionConfig(timesteps=1000, learned_variance=True, sampling_steps=8),
        embed_dim=EMBED,
    )
    before, after, records = train(model, decoder_batch(), 200, 2e-3, check_finite=True)
    return model, before, after, records


def test_decoder_overfits_a_fixed_batch(trained_lv_decoder) -> None:
    _, before, after, _ = trained_lv_decoder
    assert before["mse"] > 0.8  # a fresh network predicts ε = 0: MSE ≈ E[ε²] = 1
    assert after["mse"] < 0.3 * before["mse"], (before, after)
    assert after["loss"] < 0.3 * before["loss"], (before, after)


def test_learned_variance_hybrid_loss_stays_finite(trained_lv_decoder) -> None:
    _, before, after, records = trained_lv_decoder
    assert len(records) == 200
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["vb"]) for r in records)
    assert all(r["grads_finite"] for r in records)
    assert "vb" in before and after["vb"] < before["vb"]  # the variance is being learned


def test_decoder_loss_is_deterministic_and_reads_half_precision_batches() -> None:
    torch.manual_seed(0)
    model = randomize(Decoder(decoder_cfg(), DiffusionConfig(timesteps=100), embed_dim=EMBED))
    batch = decoder_batch()
    a = model.loss(batch, torch.Generator().manual_seed(5))
    b = model.loss(batch, torch.Generator().manual_seed(5))
    c = model.loss(batch, torch.Generator().manual_seed(6))
    assert a.ndim == 0 and torch.isfinite(a)
    assert a == b and a != c
    half = {**batch, "image": batch["image"].half(), "image_emb": batch["image_emb"].half()}
    h = model.loss(half, torch.Generator().manual_seed(5))
    assert h.dtype == torch.float32 and abs(float((h - a).detach())) < 1e-2


def test_decoder_loss_drops_conditioning_with_the_configured_probabilities() -> None:
    batch = decoder_batch()
    other = {
        **batch,
        "image_emb": batch["image_emb"].flip(0),
        "text_tokens": batch["text_tokens"].flip(0),
    }

    def losses(image_emb_drop: float, text_drop: float) -> tuple[float, float]:
        torch.manual_seed(0)
        cfg = decoder_cfg(image_emb_drop=image_emb_drop, text_drop=text_drop)
        model = randomize(Decoder(cfg, DiffusionConfig(timesteps=100), embed_dim=EMBED)).eval()
        with torch.no_grad():
            return tuple(
                float(model.loss(x, torch.Generator().manual_seed(1))) for x in (batch, other)
            )

    dropped = losses(1.0, 1.0)  # everything dropped: the conditioning is never read
    assert dropped[0] == pytest.approx(dropped[1], abs=1e-6)
    kept = losses(0.0, 0.0)
    assert abs(kept[0] - kept[1]) > 1e-5


def test_decoder_sampling_shape_range_determinism_and_guidance() -> None:
    torch.manual_seed(0)
    model = randomize(
        Decoder(
            decoder_cfg(), DiffusionConfig(timesteps=1000, learned_variance=True), embed_dim=EMBED
        )
    )
    batch = decoder_batch(2)
    emb, toks = batch["image_emb"], batch["text_tokens"]

    def draw(seed: int, scale: float = 3.0, **kw) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return model.sample(emb, toks, guidance_scale=scale, steps=4, generator=g, **kw)

    model.train()
    a = draw(0)
    assert model.training  # the mode is restored after sampling
    assert a.shape == (2, 3, 16, 16) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, draw(0), rtol=0, atol=0)
    assert (a - draw(1)).abs().max() > 1e-3
    assert (a - draw(0, scale=1.0)).abs().max() > 1e-4  # guidance changes the samples
    noise = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(draw(0, noise=noise), draw(0, noise=noise), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Upsampler


def test_upsampler_conditioning_and_crops() -> None:
    model = Upsampler(upsampler_cfg(), DiffusionConfig(timesteps=100))
    hr = images(3, 32)
    cond = model.conditioning(hr, torch.Generator().manual_seed(0))
    assert cond.shape == hr.shape
    # the conditioning holds what the 8px image holds, blurred: close to the image, but not it
    assert 0.01 < (cond - hr).abs().mean() < 0.25
    assert (cond - hr).abs().mean() > (
        F.interpolate(downscale(hr, 8), size=(32, 32), mode="bilinear") - hr
    ).abs().mean()
    # the same crop from every tensor
    a, b = random_crops([hr, 2 * hr], 16, torch.Generator().manual_seed(0))
    assert a.shape == (3, 3, 16, 16)
    torch.testing.assert_close(b, 2 * a)
    assert any((a[i] - hr[i, :, :16, :16]).abs().max() > 0 for i in range(3))  # not always (0, 0)
    with pytest.raises(ValueError, match=r"\(32, 32\) images"):
        model.loss({"image": images(1, 16)})


@pytest.mark.parametrize("augmentation", ["blur", "bsr"])
def test_upsampler_loss_is_deterministic(augmentation: str) -> None:
    torch.manual_seed(0)
    model = randomize(
        Upsampler(upsampler_cfg(augmentation=augmentation), DiffusionConfig(timesteps=100))
    )
    batch = {"image": images(2, 32).half()}
    a = model.loss(batch, torch.Generator().manual_seed(3))
    b = model.loss(batch, torch.Generator().manual_seed(3))
    assert a.ndim == 0 and torch.isfinite(a) and a == b


def test_upsampler_overfits_a_fixed_batch() -> None:
    torch.manual_seed(0)
    model = Upsampler(upsampler_cfg(), DiffusionConfig(timesteps=1000))
    before, after, _ = train(model, {"image": images(4, 32)}, 200, 2e-3)
    assert before["loss"] > 0.8
    assert after["loss"] < 0.3 * before["loss"], (before, after)


def test_upsampler_sampling_at_full_resolution() -> None:
    torch.manual_seed(0)
    model = randomize(Upsampler(upsampler_cfg(), DiffusionConfig(timesteps=1000, sampling_steps=3)))
    low = downscale(images(2, 32), 8)

    def draw(seed: int, x: torch.Tensor = low) -> torch.Tensor:
        return model.sample(x, generator=torch.Generator().manual_seed(seed))

    a = draw(0)
    assert a.shape == (2, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, draw(0), rtol=0, atol=0)
    assert (a - draw(1)).abs().max() > 1e-3
    assert (a - draw(0, low.flip(-1))).abs().max() > 1e-3  # the low-res image is read
    # a larger input gives a proportionally larger output (the network is fully convolutional)
    assert draw(0, downscale(images(1, 64), 16)).shape == (1, 3, 64, 64)


def test_a_residual_upsampler_starts_from_its_conditioning_image() -> None:
    """``residual``: the network diffuses (image − cond) / 2. Untrained (zero output layer), an
    x₀-predicting residual upsampler draws exactly the upscaled, blurred conditioning image; its
    training target is the halved residual, in [-1, 1]."""
    from unclip.degradations import gaussian_blur
    from unclip.upsampler import from_residual, to_residual, upscale

    cfg = upsampler_cfg(residual=True)
    model = Upsampler(cfg, DiffusionConfig(timesteps=100, objective="x0", sampling_steps=4))
    low = downscale(images(2, 32), 8)
    cond = upscale(gaussian_blur(low, cfg.sample_blur_sigma), (32, 32))
    out = model.sample(low, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, cond.clamp(-1, 1), rtol=0, atol=1e-5)
    hr = images(2, 32)
    residual = to_residual(hr, cond)
    assert residual.abs().max() <= 1
    torch.testing.assert_close(from_residual(residual, cond), hr)
    # and it learns: the loss of a fixed batch falls
    torch.manual_seed(0)
    before, after, _ = train(model, {"image": images(4, 32)}, 150, 2e-3)
    assert after["loss"] < 0.6 * before["loss"], (before, after)
