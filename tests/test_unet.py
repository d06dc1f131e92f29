"""The decoder and upsampler UNets (DALL-E 2 section 2.1) and the upsamplers' degradations: shapes,
where attention sits, what the decoder's output depends on, the corruptions, and the paper sizes."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize, tiny_decoder_net

from jobs.entry import CONFIG_DIR
from pipeline.config import load
from pipeline.stage_config import DecoderConfig, UpsamplerConfig
from unclip.adm_unet import AttentionBlock
from unclip.degradations import (
    add_gaussian_noise,
    anisotropic_blur,
    bsr_degrade,
    gaussian_blur,
    jpeg_compress,
    random_blur,
    resize_degrade,
)
from unclip.unet import (
    DecoderNetConfig,
    DecoderUNet,
    UpsamplerNetConfig,
    UpsamplerUNet,
)

EMBED = 16


def tiny_decoder_cfg(**kw) -> DecoderNetConfig:
    """``helpers.tiny_decoder_net`` with three levels and a longer caption."""
    return tiny_decoder_net(**{"channel_mult": (1, 2, 2), "text_context": 12, **kw})


def randomized(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``helpers.randomize`` in eval mode: every input path reaches the output."""
    return randomize(net, seed).eval()


def tokens(*captions: list[int], length: int = 12) -> torch.Tensor:
    """Caption token ids: start-of-text, the ids, end-of-text, then 0-padding to ``length``."""
    rows = [[49406, *c, 49407] + [0] * (length - len(c) - 2) for c in captions]
    return torch.tensor(rows)


def decoder_inputs(b: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 16, 16, generator=gen)
    t = torch.tensor([10, 500][:b] + [900] * (b - 2))
    emb = torch.nn.functional.normalize(torch.randn(b, EMBED, generator=gen), dim=-1)
    toks = tokens(*[[320 + i, 1000 + 7 * i] for i in range(b)])
    return x, t, emb, toks


# ---------------------------------------------------------------------------------------------
# Shapes and structure


@pytest.mark.parametrize("learned_variance", [False, True])
def test_decoder_output_shape_and_zero_init(learned_variance: bool) -> None:
    torch.manual_seed(0)
    net = DecoderUNet(tiny_decoder_cfg(), embed_dim=EMBED, learned_variance=learned_variance)
    x, t, emb, toks = decoder_inputs()
    out = net(x, t, image_emb=emb, text_tokens=toks)
    assert out.shape == (2, 6 if learned_variance else 3, 16, 16)
    assert out.dtype == x.dtype
    assert not out.any()  # zero-initialised output conv: a fresh network predicts 0
    out = randomized(net)(x, t, image_emb=emb, text_tokens=toks)
    assert torch.isfinite(out).all() and out.abs().mean() > 1e-3


def _attention_sizes(net: torch.nn.Module, run) -> list[int]:
    sizes: list[int] = []
    hooks = [
        m.register_forward_hook(lambda _m, args, _out: sizes.append(args[0].shape[-1]))
        for m in net.modules()
        if isinstance(m, AttentionBlock)
    ]
    run()
    for h in hooks:
        h.remove()
    return sizes


def test_attention_only_at_configured_resolutions() -> None:
    x, t, emb, toks = decoder_inputs()
    # levels 16, 8, 4: attention at 8 only → 1 block going down, 2 going up, none in the middle
    net = DecoderUNet(tiny_decoder_cfg(), embed_dim=EMBED, learned_variance=False)
    sizes = _attention_sizes(net, lambda: net(x, t, image_emb=emb, text_tokens=toks))
    assert sizes == [8, 8, 8]
    # the lowest resolution listed → the middle block has attention too (ADM)
    net = DecoderUNet(
        tiny_decoder_cfg(attention_resolutions=(8, 4), num_res_blocks=2),
        embed_dim=EMBED,
        learned_variance=False,
    )
    sizes = _attention_sizes(net, lambda: net(x, t, image_emb=emb, text_tokens=toks))
    assert sorted(sizes) == [4] * (2 + 1 + 3) + [8] * (2 + 3)
    net = DecoderUNet(
        tiny_decoder_cfg(attention_resolutions=(), clip_tokens=0),
        embed_dim=EMBED,
        learned_variance=False,
    )
    assert not net.unet.attention_blocks()
    assert net(x, t, image_emb=emb, text_tokens=toks).shape == (2, 3, 16, 16)
    net = DecoderUNet(tiny_decoder_cfg(clip_tokens=0), embed_dim=EMBED, learned_variance=False)
    assert net(x, t, image_emb=emb, text_tokens=toks).shape == (2, 3, 16, 16)
    up = UpsamplerUNet(
        UpsamplerNetConfig(low_res=16, high_res=64, channels=8), learned_variance=False
    )
    assert not [
        m for m in up.modules() if isinstance(m, AttentionBlock | torch.nn.MultiheadAttention)
    ]


@pytest.mark.parametrize("learned_variance", [False, True])
def test_upsampler_runs_on_crops_and_full_images(learned_variance: bool) -> None:
    torch.manual_seed(0)
    cfg = UpsamplerNetConfig(low_res=16, high_res=64, channels=8, channel_mult=(1, 2, 2))
    net = randomized(UpsamplerUNet(cfg, learned_variance=learned_variance))
    c = 6 if learned_variance else 3
    for size in (cfg.crop_size(), cfg.high_res, 20):  # a crop, the full size, any multiple of 4
        x = torch.randn(2, 3, size, size)
        low = torch.randn(2, 3, size, size)
        out = net(x, torch.tensor([3, 700]), low_res=low)
        assert out.shape == (2, c, size, size)
        assert torch.isfinite(out).all()
    # the conditioning image reaches the output
    other = net(x, torch.tensor([3, 700]), low_res=low.flip(-1))
    assert (other - out).abs().max() > 1e-4
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(1, 3, 18, 18), torch.tensor([0]), low_res=torch.randn(1, 3, 18, 18))
    with pytest.raises(ValueError, match="upsampled"):
        net(torch.randn(1, 3, 16, 16), torch.tensor([0]), low_res=torch.randn(1, 3, 8, 8))


def test_upsampler_config_checks_crop_divisibility() -> None:
    from unclip.fields import ConfigValueError

    with pytest.raises(ConfigValueError, match="divisible by 8"):
        UpsamplerNetConfig(
            low_res=64, high_res=256, channel_mult=(1, 1, 2, 2), crop_fraction=0.3
        ).validate()
    UpsamplerNetConfig(low_res=256, high_res=1024, channel_mult=(1, 1, 2, 2, 4, 4)).validate()


# ---------------------------------------------------------------------------------------------
# Conditioning


def test_decoder_depends_on_its_conditioning_and_timestep() -> None:
    torch.manual_seed(0)
    net = randomized(DecoderUNet(tiny_decoder_cfg(), embed_dim=EMBED, learned_variance=False))
    x, t, emb, toks = decoder_inputs()
    with torch.no_grad():
        base = net(x, t, image_emb=emb, text_tokens=toks)
        other_emb = net(x, t, image_emb=emb.flip(0), text_tokens=toks)
        other_text = net(x, t, image_emb=emb, text_tokens=toks.flip(0))
        other_t = net(x, t + 37, image_emb=emb, text_tokens=toks)
    for other in (other_emb, other_text, other_t):
        assert ((other - base).abs().amax(dim=(1, 2, 3)) > 1e-4).all()


def test_drop_masks_make_the_output_independent_of_what_they_drop() -> None:
    torch.manual_seed(0)
    net = randomized(DecoderUNet(tiny_decoder_cfg(), embed_dim=EMBED, learned_variance=True))
    x, t, emb, toks = decoder_inputs()
    emb2 = torch.nn.functional.normalize(torch.randn(2, EMBED), dim=-1)
    toks2 = tokens([5, 6, 7, 8, 9], [11])
    drop = torch.tensor([True, False])
    with torch.no_grad():
        a = net(x, t, image_emb=emb, text_tokens=toks, drop_image=drop)
        b = net(x, t, image_emb=emb2, text_tokens=toks, drop_image=drop)
        c = net(x, t, image_emb=emb, text_tokens=toks, drop_text=drop)
        d = net(x, t, image_emb=emb, text_tokens=toks2, drop_text=drop)
        full = net(x, t, image_emb=emb, text_tokens=toks)
    torch.testing.assert_close(a[0], b[0])  # dropped row: the image embedding is not read
    assert (a[1] - b[1]).abs().max() > 1e-4  # kept row still reads its own
    torch.testing.assert_close(c[0], d[0])  # dropped row: the caption is not read
    assert (c[1] - d[1]).abs().max() > 1e-4
    torch.testing.assert_close(a[1], full[1])  # one row's mask does not touch another row
    assert (a[0] - full[0]).abs().max() > 1e-4  # dropping changes the dropped row
    assert (c[0] - full[0]).abs().max() > 1e-4


def test_caption_padding_does_not_change_the_output() -> None:
    torch.manual_seed(0)
    net = randomized(DecoderUNet(tiny_decoder_cfg(), embed_dim=EMBED, learned_variance=False))
    x, t, emb, _ = decoder_inputs()
    short = tokens([320, 1000], [9, 8, 7], length=6)
    long = tokens([320, 1000], [9, 8, 7], length=12)
    with torch.no_grad():
        a = net(x, t, image_emb=emb, text_tokens=short)
        b = net(x, t, image_emb=emb, text_tokens=long)
        # tokens past text_context are cut off
        c = net(x, t, image_emb=emb, text_tokens=torch.cat([long, long[:, 1:4]], dim=1))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, c)


def test_empty_captions_read_as_a_start_token_with_finite_gradients() -> None:
    torch.manual_seed(0)
    net = randomized(DecoderUNet(tiny_decoder_cfg(), embed_dim=EMBED, learned_variance=False))
    x, t, emb, toks = decoder_inputs()
    toks[1] = 0  # an all-padding row would leave the causal encoder's attention rows empty
    out = net(x, t, image_emb=emb, text_tokens=toks)
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    start_only = toks.clone()
    start_only[1, 0] = 49406
    with torch.no_grad():
        torch.testing.assert_close(out, net(x, t, image_emb=emb, text_tokens=start_only))


def test_decoder_accepts_half_precision_conditioning() -> None:
    torch.manual_seed(0)
    net = randomized(DecoderUNet(tiny_decoder_cfg(), embed_dim=EMBED, learned_variance=False))
    x, t, emb, toks = decoder_inputs()
    with torch.no_grad():
        out = net(x, t, image_emb=emb.half(), text_tokens=toks.int())
        ref = net(x, t, image_emb=emb.half().float(), text_tokens=toks)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    x, t, emb, toks = decoder_inputs()
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        net = randomized(
            DecoderUNet(
                tiny_decoder_cfg(grad_checkpointing=ckpt), embed_dim=EMBED, learned_variance=False
            )
        ).train()
        net(x, t, image_emb=emb, text_tokens=toks).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_networks_run_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    net = randomized(DecoderUNet(tiny_decoder_cfg(), embed_dim=EMBED, learned_variance=True))
    x, t, emb, toks = decoder_inputs()
    ref = net(x, t, image_emb=emb, text_tokens=toks)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t, image_emb=emb.half(), text_tokens=toks)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().mean() < 0.05 * ref.abs().mean()
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    # the degradations compute in float32 whatever the autocast state
    imgs = smooth_images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        blurred = gaussian_blur(imgs, 1.0)
        jpeg = jpeg_compress(imgs, 50)
    torch.testing.assert_close(blurred, gaussian_blur(imgs, 1.0), rtol=0, atol=0)
    torch.testing.assert_close(jpeg, jpeg_compress(imgs, 50), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Degradations


def smooth_images(b: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Natural-ish images in [-1, 1]: random low-frequency colour fields with sharp edges."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(b, 3, size // 4, size // 4, generator=gen)
    img = torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear")
    edges = (torch.rand(b, 1, size, size, generator=gen) > 0.5).float()
    return (0.5 * img + 0.5 * edges - 0.25).clamp(-1, 1)


def high_freq_energy(x: torch.Tensor) -> float:
    dx = x[..., :, 1:] - x[..., :, :-1]
    dy = x[..., 1:, :] - x[..., :-1, :]
    return float(dx.square().mean() + dy.square().mean())


DEGRADATIONS = {
    "random_blur": lambda x, g: random_blur(x, g, (0.4, 1.2)),
    "bsr": bsr_degrade,
    "noise": lambda x, g: add_gaussian_noise(x, g, 0.1),
}


@pytest.mark.parametrize("name", list(DEGRADATIONS))
def test_degradations_are_deterministic_keep_shape_and_range(name: str) -> None:
    fn = DEGRADATIONS[name]
    x = smooth_images()
    a = fn(x, torch.Generator().manual_seed(1))
    b = fn(x, torch.Generator().manual_seed(1))
    c = fn(x, torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= -1 and a.max() <= 1
    assert (a - x).abs().mean() > 1e-3
    # images are degraded independently, with their own random draws
    twice = fn(torch.cat([x[:1], x[:1]]), torch.Generator().manual_seed(3))
    assert (twice[0] - twice[1]).abs().max() > 1e-4


def test_blur_lowers_high_frequency_energy() -> None:
    x = smooth_images()
    assert (gaussian_blur(x, 0.0) - x).abs().max() < 1e-6
    energies = [high_freq_energy(gaussian_blur(x, s)) for s in (0.0, 0.5, 1.0, 2.0)]
    assert energies == sorted(energies, reverse=True) and energies[-1] < 0.3 * energies[0]
    blurred = random_blur(x, torch.Generator().manual_seed(0), (0.4, 0.6))
    assert high_freq_energy(blurred) < 0.8 * high_freq_energy(x)
    # a per-image σ: only the second image is blurred
    mixed = gaussian_blur(x[:2], torch.tensor([0.0, 1.5]))
    torch.testing.assert_close(mixed[0], x[0])
    assert high_freq_energy(mixed[1:]) < 0.5 * high_freq_energy(x[1:2])


def test_anisotropic_blur_blurs_along_its_axis_only() -> None:
    stripes = torch.sign(torch.sin(torch.arange(32.0) * 0.8)).expand(1, 3, 32, 32).clone()
    along_x = anisotropic_blur(
        stripes, torch.tensor([1.5]), torch.tensor([1e-3]), torch.tensor([0.0])
    )
    along_y = anisotropic_blur(
        stripes, torch.tensor([1.5]), torch.tensor([1e-3]), torch.tensor([torch.pi / 2])
    )
    # the stripes vary along x: blurring along x smooths them, blurring along y does nothing
    assert high_freq_energy(along_x) < 0.3 * high_freq_energy(stripes)
    torch.testing.assert_close(along_y, stripes, atol=1e-4, rtol=0)


def test_jpeg_and_resize_artefacts() -> None:
    x = smooth_images()
    gray = x.mean(dim=1, keepdim=True).expand_as(x).contiguous()
    # quality 100 keeps a grey image to within 8-bit rounding; low quality loses detail in blocks
    assert (jpeg_compress(gray, 100) - gray).abs().max() < 0.03
    low = jpeg_compress(x, 10)
    assert (low - x).abs().mean() > 0.03 and low.min() >= -1 and low.max() <= 1
    levels = (low + 1) * 127.5  # 8-bit output
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
    errors = [float((jpeg_compress(x, q) - x).abs().mean()) for q in (90, 50, 10)]
    assert errors == sorted(errors)
    # odd sizes work (blocks are padded)
    assert jpeg_compress(x[:, :, :29, :30], 50).shape == (4, 3, 29, 30)
    for down, up in [("area", "nearest"), ("bicubic", "bilinear")]:
        r = resize_degrade(x, 0.5, down, up)
        assert r.shape == x.shape and high_freq_energy(r) < high_freq_energy(x)


# ---------------------------------------------------------------------------------------------
# Paper sizes (Ramesh et al. 2022, table 3)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("stage", "yaml", "paper"),
    [
        ("decoder", "decoder/paper.yaml", 3.5e9),
        ("upsampler", "upsampler/paper-256.yaml", 700e6),
        ("upsampler", "upsampler/paper-1024.yaml", 300e6),
    ],
)
def test_paper_configs_match_the_paper_sizes(stage: str, yaml: str, paper: float) -> None:
    cfg = load(DecoderConfig if stage == "decoder" else UpsamplerConfig, str(CONFIG_DIR / yaml))
    with torch.device("meta"):
        if stage == "decoder":
            # CLIP ViT-H/16's embedding width D = 1024
            net = DecoderUNet(cfg.model, embed_dim=1024, learned_variance=True)
        else:
            net = UpsamplerUNet(cfg.model, learned_variance=cfg.diffusion.learned_variance)
    assert abs(_count(net) / paper - 1) < 0.10, _count(net)


def test_nearest_upsampling_matches_interpolate() -> None:
    import torch.nn.functional as F

    from unclip.adm_unet import upsample_nearest2x

    x = torch.randn(2, 5, 3, 7)
    assert torch.equal(upsample_nearest2x(x), F.interpolate(x, scale_factor=2.0, mode="nearest"))


def test_patching_keeps_the_output_size_at_a_fraction_of_the_compute() -> None:
    """patch_size 2: same (B, 3, S, S) output, attention at feature-map resolutions, ~4x fewer
    FLOPs than the same UNet on full-resolution feature maps."""
    from torch.utils.flop_counter import FlopCounterMode

    def flops(net: DecoderUNet, x: torch.Tensor) -> int:
        with FlopCounterMode(display=False) as counter:
            net(
                x,
                torch.tensor([10, 500]),
                image_emb=torch.randn(2, EMBED),
                text_tokens=tokens([5], [6]),
            )
        return counter.get_total_flops()

    x = torch.randn(2, 3, 32, 32)
    full = DecoderUNet(
        tiny_decoder_cfg(image_size=32, attention_resolutions=(8,)),
        embed_dim=EMBED,
        learned_variance=True,
    )
    patched = DecoderUNet(
        tiny_decoder_cfg(image_size=32, patch_size=2, attention_resolutions=(4,)),
        embed_dim=EMBED,
        learned_variance=True,
    )
    randomized(patched)
    out = patched(
        x, torch.tensor([10, 500]), image_emb=torch.randn(2, EMBED), text_tokens=tokens([5], [6])
    )
    assert out.shape == (2, 6, 32, 32)
    # Every output pixel of a 2x2 block is its own value (the unfolding is not an upsampling).
    assert not torch.equal(out[:, :, 0::2, 0::2], out[:, :, 1::2, 1::2])
    assert len(patched.unet.attention_blocks()) == len(full.unet.attention_blocks())
    assert flops(patched, x) < 0.35 * flops(full, x)
    with pytest.raises(ValueError, match="divisible by 8"):
        DecoderUNet(
            tiny_decoder_cfg(image_size=36, patch_size=2), embed_dim=EMBED, learned_variance=False
        )
