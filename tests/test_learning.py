"""The decoder learns what captions ask for, on a budget the suite affords.

A 32 px decoder (the quickstart's kind of network, smaller) trains for a few hundred steps on
captioned-shapes scenes, in this process, through the stage's own loss, optimizer and EMA; its
samples are then read by the project's checker (:mod:`pipeline.data.shape_checker`). It conditions
on the caption alone (the image embedding always dropped), so nothing but the caption's tokens can
tell it which colour to draw; an untrained decoder with the same weights at step 0 draws none of
them. The whole cascade learning, shapes included, is what ``make quickstart`` shows and
``bench/decoder_learning.py`` measures; this test keeps the learning path honest between those runs.
"""

from __future__ import annotations

import numpy as np
import open_clip
import torch

from pipeline import pictures
from pipeline.data.shapes import render, sample_scene
from pipeline.eval.metrics import attribute_row
from pipeline.stage_config import DecoderConfig, EmaOptions, OptimOptions, TrainOptions
from pipeline.train.loop import lr_factor, make_optimizer
from pipeline.train.stages import build_decoder, to_images
from unclip.config import DiffusionConfig
from unclip.decoder import Decoder
from unclip.ema import EMA
from unclip.unet import DecoderNetConfig

SIZE = 32
SCENES = 600
STEPS = 500
BATCH = 32
EMBED_DIM = 8  # never seen: the image embedding is always dropped
CONTEXT = 16


def _scenes(first: int, count: int) -> tuple[np.ndarray, list[str]]:
    """``count`` one-object scenes (large, centred, plain background) from index ``first``."""
    scenes = [
        sample_scene(
            0, first + i, max_objects=1, two_tone_prob=0.0, positions=["center"], sizes=["large"]
        )
        for i in range(count)
    ]
    return np.stack([render(s, SIZE) for s in scenes]), [s.caption for s in scenes]


def _config() -> DecoderConfig:
    net = DecoderNetConfig(
        image_size=SIZE,
        channels=16,
        channel_mult=(1, 2, 2),
        attention_resolutions=(8,),
        head_channels=32,
        clip_tokens=0,
        text_context=CONTEXT,
        text_width=32,
        text_heads=2,
        image_emb_drop=1.0,
        text_drop=0.1,
    )
    return DecoderConfig(
        model=net,
        diffusion=DiffusionConfig(objective="v", min_snr_gamma=5.0, sampling_steps=20),
        train=TrainOptions(steps=STEPS, batch_size=BATCH),
        optim=OptimOptions(lr=3e-3, warmup_steps=20, decay="constant"),
        ema=EmaOptions(decay=0.99),
    )


def _colour_accuracy(model: Decoder, captions: list[str]) -> float:
    tokens = open_clip.tokenize(captions, context_length=CONTEXT)
    images = model.sample(
        torch.zeros(len(captions), EMBED_DIM),
        tokens,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(1),
        drop_image_emb=True,
    )
    rows = [
        attribute_row(image, caption)
        for image, caption in zip(pictures.to_uint8(images), captions, strict=True)
    ]
    return sum(r["color_ok"] for r in rows) / sum(r["objects"] for r in rows)


def test_a_decoder_learns_the_colours_its_captions_ask_for() -> None:
    images, captions = _scenes(0, SCENES)
    pixels = to_images(images)
    tokens = open_clip.tokenize(captions, context_length=CONTEXT)
    _, prompts = _scenes(SCENES, 24)  # scenes it did not train on
    cfg = _config()
    torch.manual_seed(0)
    model = build_decoder(cfg, {"embed_dim": EMBED_DIM})
    untrained = _colour_accuracy(model, prompts)

    optimizer = make_optimizer(model, cfg)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    ema = EMA(model, cfg.ema.decay)
    rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for step in range(STEPS):
        rows = rng.choice(SCENES, size=BATCH, replace=False)
        batch = {
            "image": pixels[rows],
            "image_emb": torch.zeros(BATCH, EMBED_DIM),
            "text_tokens": tokens[rows],
        }
        model.train()
        loss = model.loss(batch, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        ema.update(model, step)
        losses.append(loss.item())

    trained = _colour_accuracy(ema.ema_model, prompts)
    assert np.mean(losses[-50:]) < 0.5 * np.mean(losses[:50])
    assert untrained <= 0.2, (
        f"an untrained decoder drew the asked colour {untrained:.0%} of the time"
    )
    assert trained >= 0.75, f"colour accuracy after {STEPS} steps: {trained:.0%}"
