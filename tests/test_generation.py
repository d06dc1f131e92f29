"""Generation with unCLIP (DALL-E 2 sections 2 and 3): slerp, the cascade with each conditioning,
variations, interpolations and text diffs, on tiny untrained models with a few sampling steps."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import caption_tokens, randomize, tiny_decoder_net

from unclip import generation as gen
from unclip.ar_prior import ARPrior
from unclip.decoder import Decoder
from unclip.diffusion_process import DiffusionConfig
from unclip.prior import DiffusionPrior, PriorNetConfig
from unclip.sphere import slerp, text_diff_direction
from unclip.unet import UpsamplerNetConfig
from unclip.upsampler import Upsampler, downscale

D = 16
VOCAB = 100
SIZE = 16  # decoder resolution
HIGH = 32  # upsampler resolution


@pytest.fixture(scope="module")
def decoder() -> Decoder:
    """A 16px decoder with learned variance sampled with DDPM, as the paper's (table 3), so the
    manipulations' switch to DDIM is observable; guidance 3 by default."""
    torch.manual_seed(0)
    net = tiny_decoder_net(image_size=SIZE)
    diffusion = DiffusionConfig(
        learned_variance=True, sampler="ddpm", sampling_steps=4, guidance_scale=3.0
    )
    return randomize(Decoder(net, diffusion, embed_dim=D, vocab_size=VOCAB)).eval()


@pytest.fixture(scope="module")
def upsampler() -> Upsampler:
    """16→32, sampled with DDPM by its config (the manipulations must switch it to DDIM)."""
    torch.manual_seed(1)
    net = UpsamplerNetConfig(
        low_res=SIZE, high_res=HIGH, channels=16, channel_mult=(1, 2), crop_fraction=0.5
    )
    return randomize(Upsampler(net, DiffusionConfig(sampler="ddpm", sampling_steps=3)), 1).eval()


def prior_cfg(**kw) -> PriorNetConfig:
    return PriorNetConfig(**{"width": 32, "depth": 2, "heads": 4, "text_context": 12, **kw})


@pytest.fixture(scope="module")
def diffusion_prior() -> DiffusionPrior:
    torch.manual_seed(2)
    cfg = DiffusionConfig(objective="x0", thresholding="none", sampling_steps=4, sampler="ddim")
    return DiffusionPrior(prior_cfg(), cfg, embed_dim=D, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def ar_prior() -> ARPrior:
    """An autoregressive prior whose PCA quantizer is fitted on random unit embeddings."""
    torch.manual_seed(3)
    cfg = prior_cfg(kind="autoregressive", pca_dims=6, quant_bins=16, dot_bins=8)
    prior = ARPrior(cfg, embed_dim=D, vocab_size=VOCAB)
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(500, D, generator=g), dim=-1)
    image = F.normalize(text + 0.7 * torch.randn(500, D, generator=g), dim=-1)
    prior.fit_quantizer(image, text)
    return prior.eval()


def captions(b: int, seed: int = 0, length: int = 9) -> torch.Tensor:
    return caption_tokens(b, VOCAB, seed, length)


def unit(b: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(b, D, generator=torch.Generator().manual_seed(seed)), dim=-1)


def pictures(b: int, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    """Smooth colour fields in [-1, 1]."""
    base = torch.randn(b, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return 0.8 * F.interpolate(base, size=(size, size), mode="bilinear").tanh()


def seed(s: int) -> torch.Generator:
    return torch.Generator().manual_seed(s)


def same(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4) -> bool:
    """Equal up to float rounding, which an untrained network with guidance amplifies over the
    steps (an embedding renormalised once more, ~3e-8 apart, decodes ~1.5e-5 apart)."""
    return a.shape == b.shape and bool(torch.allclose(a, b, atol=atol, rtol=0))


def differ(a: torch.Tensor, b: torch.Tensor, by: float = 1e-2) -> bool:
    return float((a - b).abs().max()) > by


def angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = F.normalize(a.double(), dim=-1), F.normalize(b.double(), dim=-1)
    return torch.atan2((a - b).norm(dim=-1), (a + b).norm(dim=-1)) * 2


def ddim(decoder: Decoder, emb, tokens, noise, rows: int = 1) -> torch.Tensor:
    """The reference: the deterministic DDIM decoding of (z_i, x_T). ``rows`` runs each input
    ``rows`` times in one batch and keeps one: a manipulation's batch has that many rows per input,
    and an untrained network with guidance amplifies the rounding differences that another batch
    size gives (kernels sum in another order) to ~5e-3 over a few steps."""
    out = gen.decode(
        decoder,
        emb.repeat_interleave(rows, dim=0),
        None if tokens is None else tokens.repeat_interleave(rows, dim=0),
        noise=noise.repeat_interleave(rows, dim=0),
        sampler="ddim",
        eta=0.0,
        generator=seed(99),
    )
    return out[::rows]


# ---------------------------------------------------------------------------------------------
# slerp and the text diff direction


def test_slerp_endpoints_unit_norm_and_constant_angular_speed() -> None:
    a, b = unit(5, 0), unit(5, 1)
    torch.testing.assert_close(slerp(a, b, 0.0), a, rtol=0, atol=0)
    torch.testing.assert_close(slerp(a, b, 1.0), b, rtol=0, atol=0)
    t = torch.linspace(0, 1, 7)
    path = slerp(a[:, None], b[:, None], t)  # (5, 7, D): every pair at every t
    assert path.shape == (5, 7, D)
    torch.testing.assert_close(path[:, 0], a, rtol=0, atol=0)
    torch.testing.assert_close(path[:, -1], b, rtol=0, atol=0)
    torch.testing.assert_close(path.norm(dim=-1), torch.ones(5, 7), rtol=0, atol=1e-6)
    omega = angle(a, b)[:, None]
    torch.testing.assert_close(angle(a[:, None], path), t.double() * omega, rtol=0, atol=1e-5)
    torch.testing.assert_close(angle(path, b[:, None]), (1 - t.double()) * omega, rtol=0, atol=1e-5)
    # a per-row t, and non-unit inputs (latents): the same coefficients as in float64
    x, y = 3 * torch.randn(4, 10, generator=seed(0)), torch.randn(4, 10, generator=seed(1))
    tt = torch.tensor([0.1, 0.4, 0.7, 0.9])
    om = angle(x, y)[:, None]
    w = tt.double()[:, None]
    ref = (torch.sin((1 - w) * om) * x.double() + torch.sin(w * om) * y.double()) / torch.sin(om)
    torch.testing.assert_close(slerp(x, y, tt).double(), ref, rtol=0, atol=1e-5)
    assert slerp(a.double(), b.double(), 0.3).dtype == torch.float64


def test_slerp_is_robust_when_the_endpoints_coincide() -> None:
    a = unit(3, 0)
    for t in (0.0, 0.3, 1.0):
        torch.testing.assert_close(slerp(a, a.clone(), t), a, rtol=0, atol=1e-7)
    near = F.normalize(a + 1e-7 * torch.randn(3, D, generator=seed(1)), dim=-1)
    mid = slerp(a, near, 0.5)
    assert torch.isfinite(mid).all()
    torch.testing.assert_close(mid, a, rtol=0, atol=1e-6)
    torch.testing.assert_close(mid.norm(dim=-1), torch.ones(3), rtol=0, atol=1e-6)
    big = F.normalize(torch.randn(2, 4096, generator=seed(2)), dim=-1)  # high-dim, tiny angle
    bump = F.normalize(big + 1e-5 * torch.randn(2, 4096, generator=seed(3)), dim=-1)
    path = slerp(big[:, None], bump[:, None], torch.linspace(0, 1, 5))
    assert torch.isfinite(path).all()
    torch.testing.assert_close(path.norm(dim=-1), torch.ones(2, 5), rtol=0, atol=1e-5)
    assert torch.isfinite(slerp(a, -a, 0.5)).all()  # antipodal: ill-defined, but finite


def test_text_diff_direction() -> None:
    z_t0, z_t = unit(4, 0), unit(4, 1)
    z_d = text_diff_direction(3 * z_t0, z_t)  # normalises its inputs first
    torch.testing.assert_close(z_d, F.normalize(z_t - z_t0, dim=-1))
    torch.testing.assert_close(z_d.norm(dim=-1), torch.ones(4))


# ---------------------------------------------------------------------------------------------
# Building blocks


def test_decode_drops_caption_or_image_embedding(decoder: Decoder) -> None:
    emb, other = unit(2, 0), unit(2, 1)
    tokens, other_tokens = captions(2, 0), captions(2, 1)

    def draw(e, t, **kw) -> torch.Tensor:
        return gen.decode(decoder, e, t, generator=seed(0), **kw)

    full = draw(emb, tokens)
    assert full.shape == (2, 3, SIZE, SIZE) and full.min() >= -1 and full.max() <= 1
    assert differ(full, draw(emb, other_tokens)) and differ(full, draw(other, tokens))
    # no caption: the caption is dropped, not read (up to float rounding: fewer masked keys)
    no_caption = draw(emb, None)
    dropped = decoder.sample(emb, other_tokens, generator=seed(0), drop_caption=True)
    assert same(no_caption, dropped)
    assert differ(no_caption, full)
    # caption only: the image embedding is dropped, not read
    caption_only = draw(None, tokens)
    dropped = decoder.sample(other, tokens, generator=seed(0), drop_image_emb=True)
    assert same(caption_only, dropped, atol=0)
    assert differ(caption_only, full)
    with pytest.raises(ValueError, match="needs an image embedding"):
        draw(None, None)


def test_upsample_runs_each_stage(upsampler: Upsampler) -> None:
    low = pictures(2)
    out = gen.upsample([upsampler], low, generator=seed(0))
    assert len(out) == 1 and out[0].shape == (2, 3, HIGH, HIGH)
    assert same(out[0], upsampler.sample(low, generator=seed(0)), atol=0)
    chain = gen.upsample([upsampler, upsampler], low, steps=[2, None], generator=seed(0))
    assert [x.shape[-1] for x in chain] == [HIGH, 2 * HIGH]  # fully convolutional: ×2 twice
    with pytest.raises(ValueError, match="2 values for 1 upsamplers"):
        gen.upsample([upsampler], low, steps=[2, 3])


def test_invert_shape_resizing_and_conditioning(decoder: Decoder) -> None:
    image, emb = pictures(2, 2 * SIZE), unit(2, 0)
    x_T = gen.invert(decoder, image, emb)
    assert x_T.shape == (2, 3, SIZE, SIZE) and torch.isfinite(x_T).all()
    assert same(x_T, gen.invert(decoder, downscale(image, SIZE), emb), atol=0)  # resized first
    assert differ(x_T, gen.invert(decoder, image, unit(2, 1)))  # the decoder's z_i is read
    assert same(x_T, decoder.invert(downscale(image, SIZE), emb, captions(2), drop_caption=True))
    # a real inversion: the noisiest latent is far from the image, and not random
    assert differ(x_T, downscale(image, SIZE), by=0.5)


# ---------------------------------------------------------------------------------------------
# The cascade (section 2)


def test_generate_with_the_diffusion_prior(decoder, upsampler, diffusion_prior) -> None:
    text, tokens = unit(3, 0), captions(3)

    def run(s: int) -> gen.Generation:
        return gen.generate(
            text, tokens, decoder=decoder, prior=diffusion_prior, upsamplers=[upsampler],
            prior_guidance=2.0, generator=seed(s),
        )  # fmt: skip

    diffusion_prior.train()
    out = run(0)
    assert diffusion_prior.training  # the prior's mode is restored
    diffusion_prior.eval()
    assert out.image_emb.shape == (3, D)
    torch.testing.assert_close(out.image_emb.norm(dim=-1), torch.ones(3))
    assert [x.shape for x in out.images] == [(3, 3, SIZE, SIZE), (3, 3, HIGH, HIGH)]
    assert out.resolutions == [SIZE, HIGH] and out.final is out.images[-1]
    assert all(x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1 for x in out.images)
    # the cascade is prior → decoder → upsampler, drawing from one generator in that order
    g = seed(0)
    emb = diffusion_prior.sample(text, tokens, guidance_scale=2.0, generator=g)
    low = decoder.sample(emb, tokens, generator=g)
    high = upsampler.sample(low, generator=g)
    for got, want in zip([out.image_emb, *out.images], [emb, low, high], strict=True):
        assert same(got, want)
    # repeatable by seed, different across seeds, at every stage
    again, other = run(0), run(1)
    for i, x in enumerate([out.image_emb, *out.images]):
        assert same(x, [again.image_emb, *again.images][i], atol=0)
        assert differ(x, [other.image_emb, *other.images][i])


def test_generate_in_batches(decoder, upsampler, diffusion_prior) -> None:
    text, tokens = unit(5, 1), captions(5, 1)
    kw = {"decoder": decoder, "prior": diffusion_prior, "upsamplers": [upsampler]}
    out = gen.generate(text, tokens, batch_size=2, generator=seed(3), **kw)
    assert out.image_emb.shape == (5, D) and out.final.shape == (5, 3, HIGH, HIGH)
    g = seed(3)
    parts = [gen.generate(text[i : i + 2], tokens[i : i + 2], generator=g, **kw) for i in (0, 2, 4)]
    for stage in range(2):
        assert same(out.images[stage], torch.cat([p.images[stage] for p in parts]), atol=0)
    assert same(out.image_emb, torch.cat([p.image_emb for p in parts]), atol=0)
    again = gen.generate(text, tokens, batch_size=2, generator=seed(3), **kw)
    assert same(out.final, again.final, atol=0)


@pytest.mark.parametrize("which", ["diffusion", "autoregressive", "caption"])
def test_generate_with_one_generator_per_row(
    which, decoder, upsampler, diffusion_prior, ar_prior
) -> None:
    """One generator per row: each row's every random number (the prior's candidates and steps,
    the DDPM decoder's and upsampler's noise) comes from its own generator, so B rows in one call
    are the B rows generated alone with those generators, in any batching. In float64, to the
    last digits: in float32 these untrained networks amplify the rounding differences of batched
    kernels (1e-7) up to 1e-1 on some rows (an upsampler fed a saturated image: group norms of
    nearly constant maps), which would hide a wrong draw."""
    models = [copy.deepcopy(m).double() for m in (decoder, upsampler, diffusion_prior, ar_prior)]
    decoder, upsampler, diffusion_prior, ar_prior = models
    text, tokens = unit(4, 7).double(), captions(4, 7)
    prior = {"diffusion": diffusion_prior, "autoregressive": ar_prior}.get(which)
    kw = {
        "decoder": decoder,
        "prior": prior,
        "upsamplers": [upsampler],
        "conditioning": "caption" if prior is None else "prior",
        "prior_guidance": 2.0,
        "num_candidates": 2,
    }
    seeds = [11, 12, 13, 14]
    out = gen.generate(text, tokens, generator=[seed(s) for s in seeds], **kw)
    for i, s in enumerate(seeds):
        alone = gen.generate(text[i : i + 1], tokens[i : i + 1], generator=seed(s), **kw)
        for got, want in zip(out.images, alone.images, strict=True):
            assert same(got[i : i + 1], want, atol=1e-9)
        if prior is not None:
            assert same(out.image_emb[i : i + 1], alone.image_emb, atol=1e-9)
    chunked = gen.generate(text, tokens, generator=[seed(s) for s in seeds], batch_size=3, **kw)
    assert same(chunked.final, out.final, atol=1e-9)
    assert differ(out.final[0], out.final[1])  # rows differ: each has its own noise
    one = gen.generate(text, tokens, generator=seed(11), **kw)  # one generator: other draws
    assert differ(one.final[1:], out.final[1:])
    with pytest.raises(ValueError, match="3 generators for 4 rows"):
        gen.generate(text, tokens, generator=[seed(s) for s in seeds[:3]], **kw)


def test_generate_with_the_autoregressive_prior(decoder, ar_prior) -> None:
    text, tokens = unit(3, 2), captions(3, 2)

    def run(s: int, temperature: float | None) -> gen.Generation:
        return gen.generate(
            text, tokens, decoder=decoder, prior=ar_prior, temperature=temperature,
            generator=seed(s),
        )  # fmt: skip

    out = run(0, 0.7)
    assert out.image_emb.shape == (3, D) and out.resolutions == [SIZE]
    direct = ar_prior.sample(text, tokens, temperature=0.7, generator=seed(0))
    assert same(out.image_emb, direct)  # the temperature reaches the prior
    assert same(out.final, run(0, 0.7).final, atol=0)
    assert differ(out.final, run(1, 0.7).final)
    assert same(run(0, None).image_emb, ar_prior.sample(text, tokens, generator=seed(0)))


class Unused(torch.nn.Module):
    """A prior that must not be sampled."""

    def sample(self, *args, **kwargs):
        raise AssertionError("the prior was sampled")


def image_emb_inputs(decoder: Decoder, fn):
    """(fn(), the image embeddings the decoder network received during it, after the null
    substitution of dropped rows)."""
    seen: list[torch.Tensor] = []
    handle = decoder.net.image_to_emb.register_forward_hook(
        lambda _m, inputs, _out: seen.append(inputs[0].detach().clone())
    )
    try:
        result = fn()
    finally:
        handle.remove()
    return result, seen


def test_text_embedding_conditioning_feeds_the_text_embedding(decoder, upsampler) -> None:
    text, tokens = 2.5 * unit(3, 4), captions(3, 4)
    z_t = F.normalize(text, dim=-1)
    kw = {"decoder": decoder, "prior": Unused(), "upsamplers": [upsampler]}
    out, seen = image_emb_inputs(
        decoder,
        lambda: gen.generate(text, tokens, conditioning="text_embedding", generator=seed(0), **kw),
    )
    torch.testing.assert_close(out.image_emb, z_t)
    assert len(seen) == decoder.diffusion.cfg.sampling_steps
    null = decoder.net.null_image.detach()
    for rows in seen:  # guidance 3: [conditional; unconditional] rows
        assert rows.shape == (6, D)
        torch.testing.assert_close(rows[:3], z_t)  # the normalised text embedding, as z_i
        torch.testing.assert_close(rows[3:], null.expand(3, D))
    assert same(out.images[0], gen.decode(decoder, z_t, tokens, generator=seed(0)), atol=0)
    assert out.resolutions == [SIZE, HIGH]


def test_caption_only_conditioning(decoder) -> None:
    text, tokens = unit(2, 5), captions(2, 5)
    kw = {"decoder": decoder, "prior": Unused(), "conditioning": "caption"}
    out, seen = image_emb_inputs(
        decoder, lambda: gen.generate(text, tokens, generator=seed(0), **kw)
    )
    assert out.image_emb is None and out.final.shape == (2, 3, SIZE, SIZE)
    null = decoder.net.null_image.detach()
    assert seen and all(same(rows, null.expand(4, D), atol=0) for rows in seen)  # z_i unread
    other = gen.generate(
        text, captions(2, 6), decoder=decoder, conditioning="caption", generator=seed(0)
    )
    assert differ(out.final, other.final)  # the caption is
    with pytest.raises(ValueError, match="needs a prior"):
        gen.generate(text, tokens, decoder=decoder)


# ---------------------------------------------------------------------------------------------
# Manipulations (section 3)


def test_variations(decoder, upsampler) -> None:
    emb, images, tokens = unit(2, 7), pictures(2, seed=7), captions(2, 7)
    latent = gen.invert(decoder, images, emb, tokens)
    kw = {"num": 3, "upsamplers": [upsampler]}

    out = gen.variations(decoder, emb, tokens, eta=1.0, latent=latent, generator=seed(0), **kw)
    assert out.image_emb.shape == (6, D) and out.theta is None
    assert same(out.image_emb, emb.repeat_interleave(3, dim=0))
    assert [x.shape for x in out.images] == [(6, 3, SIZE, SIZE), (6, 3, HIGH, HIGH)]
    for x in out.images:  # η > 0: every variation of an image differs, at every stage
        for i in range(0, 6, 3):
            assert differ(x[i], x[i + 1]) and differ(x[i], x[i + 2]) and differ(x[i + 1], x[i + 2])
    again = gen.variations(decoder, emb, tokens, eta=1.0, latent=latent, generator=seed(0), **kw)
    other = gen.variations(decoder, emb, tokens, eta=1.0, latent=latent, generator=seed(1), **kw)
    assert same(out.final, again.final, atol=0) and differ(out.final, other.final)

    # η = 0 from the inverted latent: deterministic, the same decoding (z_i, x_T) every time
    det = gen.variations(decoder, emb, tokens, eta=0.0, latent=latent, generator=seed(0), **kw)
    for x in det.images:
        for i in range(0, 6, 3):
            assert same(x[i], x[i + 1]) and same(x[i], x[i + 2])
        assert differ(x[0], x[3])
    assert same(det.images[0][::3], ddim(decoder, emb, tokens, latent, rows=3))
    # without a latent, each variation starts from its own x_T
    fresh = gen.variations(decoder, emb, eta=0.0, generator=seed(0), **kw)
    assert differ(fresh.final[0], fresh.final[1])


def test_interpolate(decoder, upsampler) -> None:
    za, zb, zc = unit(2, 10), unit(2, 11), unit(2, 12)
    kw = {"num": 4, "upsamplers": [upsampler]}
    x_a = gen.invert(decoder, pictures(2, seed=1), za)
    x_b = gen.invert(decoder, pictures(2, seed=2), zb)

    out = gen.interpolate(decoder, za, zb, latents=(x_a, x_b), generator=seed(0), **kw)
    assert out.image_emb.shape == (8, D)
    assert [x.shape for x in out.images] == [(8, 3, SIZE, SIZE), (8, 3, HIGH, HIGH)]
    torch.testing.assert_close(out.theta, torch.tensor([0, 1 / 3, 2 / 3, 1]).repeat(2))
    torch.testing.assert_close(out.image_emb.norm(dim=-1), torch.ones(8))
    emb = out.image_emb.view(2, 4, D)
    torch.testing.assert_close(emb[:, 0], za, rtol=0, atol=1e-7)
    torch.testing.assert_close(emb[:, -1], zb, rtol=0, atol=1e-7)
    torch.testing.assert_close(emb[:, 1], slerp(za, zb, 1 / 3))
    # the endpoints are the decodings of z_i1 from x_T1 and of z_i2 from x_T2
    low = out.images[0].view(2, 4, 3, SIZE, SIZE)
    assert same(low[:, 0], ddim(decoder, za, None, x_a, rows=4))
    assert same(low[:, -1], ddim(decoder, zb, None, x_b, rows=4))
    assert differ(low[:, 1], low[:, 0]) and differ(low[:, 1], low[:, -1])
    # ... at every stage: the θ = 0 end does not depend on the other end
    other = gen.interpolate(decoder, za, zc, latents=(x_a, x_b), generator=seed(0), **kw)
    for x, y in zip(out.images, other.images, strict=True):
        assert same(x[::4], y[::4]) and differ(x[3::4], y[3::4])

    # one fixed x_T for the whole row: interpolating an embedding with itself is constant
    fixed = gen.interpolate(decoder, za, za.clone(), generator=seed(0), **kw)
    for x in fixed.images:
        x = x.view(2, 4, *x.shape[1:])
        assert all(same(x[:, j], x[:, 0]) for j in range(1, 4))
        assert differ(x[0, 0], x[1, 0])
    given = gen.interpolate(decoder, za, zb, latents=x_a, generator=seed(0), **kw)
    assert same(given.images[0][::4], ddim(decoder, za, None, x_a, rows=4))
    assert same(given.images[0][3::4], ddim(decoder, zb, None, x_a, rows=4))
    # repeatable by seed, different across seeds
    again = gen.interpolate(decoder, za, zb, generator=seed(5), **kw)
    assert same(
        again.final, gen.interpolate(decoder, za, zb, generator=seed(5), **kw).final, atol=0
    )
    assert differ(again.final, gen.interpolate(decoder, za, zb, generator=seed(6), **kw).final)


def test_text_diff(decoder, upsampler) -> None:
    z_i, image, tokens = unit(2, 20), pictures(2, seed=20), captions(2, 20)
    z_t0, z_t = unit(2, 21), unit(2, 22)
    latent = gen.invert(decoder, image, z_i, tokens)
    kw = {"num": 3, "max_theta": 0.5, "upsamplers": [upsampler]}

    out = gen.text_diff(decoder, z_i, z_t0, z_t, tokens, latent=latent, generator=seed(0), **kw)
    assert out.image_emb.shape == (6, D)
    assert [x.shape for x in out.images] == [(6, 3, SIZE, SIZE), (6, 3, HIGH, HIGH)]
    torch.testing.assert_close(out.theta, torch.tensor([0.0, 0.25, 0.5]).repeat(2))
    emb = out.image_emb.view(2, 3, D)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2, 3))
    z_d = F.normalize(z_t - z_t0, dim=-1)
    torch.testing.assert_close(emb[:, 0], z_i, rtol=0, atol=1e-7)
    # z_θ turns from z_i towards z_d by θ·Ω
    omega = angle(z_i, z_d)[:, None]
    turned = angle(z_i[:, None], emb)
    want = torch.tensor([0.0, 0.25, 0.5]).double() * omega
    torch.testing.assert_close(turned, want, atol=1e-5, rtol=0)
    dots = (emb * z_d[:, None]).sum(-1)
    assert bool((dots[:, 1:] > dots[:, :-1]).all())
    # θ = 0 decodes z_i from its inverted latent; larger θ change the image
    low = out.images[0].view(2, 3, 3, SIZE, SIZE)
    assert same(low[:, 0], ddim(decoder, z_i, tokens, latent, rows=3))
    assert differ(low[:, 1], low[:, 0]) and differ(low[:, 2], low[:, 1])
    for x in out.images:
        assert differ(x[2], x[0])
    # deterministic by seed (the upsampler's x_T), and by the latent when given
    again = gen.text_diff(decoder, z_i, z_t0, z_t, tokens, latent=latent, generator=seed(0), **kw)
    assert same(out.final, again.final, atol=0)
    random_a = gen.text_diff(decoder, z_i, z_t0, z_t, generator=seed(1), **kw)
    random_b = gen.text_diff(decoder, z_i, z_t0, z_t, generator=seed(2), **kw)
    assert differ(random_a.images[0], random_b.images[0])
    assert not math.isnan(float(random_a.final.sum()))
