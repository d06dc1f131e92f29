"""A tiny trained cascade made in seconds, without Ray Train: random stage models built by the
stages' own build functions (``pipeline.train.stages``), written by the checkpoint writer the
training loop uses, with the ``info`` the training driver gives (``stages.store_info`` of a store in
the embedding job's format, made by the tiny CLIP). The generation and evaluation tests load it."""

from __future__ import annotations

import tempfile

import numpy as np
import torch
from helpers import TINY_CLIP_CONFIG, randomize, tiny_decoder_net

from pipeline import config as configlib
from pipeline.embed import clip_model
from pipeline.embed.job import store_header
from pipeline.embed.store import EmbeddingStore, to_table
from pipeline.stage_config import ClipSource, DecoderConfig, PriorConfig, UpsamplerConfig
from pipeline.storage import Storage, join
from pipeline.train import checkpoints, stages
from unclip.config import DiffusionConfig, PriorNetConfig, UpsamplerNetConfig

SIZE, HIGH = 16, 32  # the decoder's and the upsampler's output side
STEPS = 2  # sampling steps of every stage in these tests


def diffusion_cfg(**kw) -> DiffusionConfig:
    return DiffusionConfig(**{"sampling_steps": STEPS, **kw})


def decoder_cfg(root: str) -> DecoderConfig:
    net = tiny_decoder_net(image_size=SIZE)
    return DecoderConfig(root=root, run="decoder", model=net, diffusion=diffusion_cfg())


def prior_cfg(root: str, kind: str = "diffusion") -> PriorConfig:
    net = PriorNetConfig(kind=kind, width=32, depth=1, heads=2, text_context=8, pca_dims=4)
    diffusion = diffusion_cfg(objective="x0", thresholding="none")
    return PriorConfig(root=root, run=f"prior-{kind}", model=net, diffusion=diffusion)


def upsampler_cfg(root: str, low: int, high: int) -> UpsamplerConfig:
    net = UpsamplerNetConfig(
        low_res=low, high_res=high, channels=16, channel_mult=(1, 2), crop_fraction=0.5
    )
    return UpsamplerConfig(root=root, run=f"upsampler-{high}", model=net, diffusion=diffusion_cfg())


def write_checkpoint(
    storage: Storage,
    run_url: str,
    stage: str,
    cfg,
    model: torch.nn.Module,
    info: dict,
    *,
    step: int = 10,
    ema: torch.nn.Module | bool | None = True,
) -> str:
    """A checkpoint as the training loop writes it (``checkpoints.write_local``, then persisted to
    the run folder); ``ema``: True writes the model as its EMA, a module that module's weights,
    False none."""
    ema_model = model if ema is True else (ema or None)
    url = join(run_url, f"checkpoint_{step:06d}")
    with tempfile.TemporaryDirectory() as local:
        checkpoints.write_local(
            local,
            model_state=model.state_dict(),
            ema_state=ema_model.state_dict() if ema_model is not None else None,
            optimizer_state=None,
            state={
                "step": step,
                "stage": stage,
                "info": {k: v for k, v in info.items() if not k.startswith("fit_")},
            },
            config_yaml=configlib.dumps(cfg),
        )
        storage.copy_from_local(local, url)
    return url


def build_model(stage: str, cfg, info: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize(stages.STAGES[stage].build(cfg, info), seed)


def make_cascade_root(storage: Storage, root: str, clip_path: str) -> dict:
    """A root with a tiny CLIP's embedding store and checkpoints of every stage trained on it."""
    source = ClipSource(model="tiny-clip", model_config=TINY_CLIP_CONFIG, pretrained=clip_path)
    ident = clip_model.identity(source, clip_path)
    store = EmbeddingStore(storage, join(root, "embeddings", clip_model.safe_id(ident.id)))
    store.open_for_writing({**store_header(ident, 64, 32, "tiny-clip"), "source": "synthetic"})
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(8, 64)).astype(np.float32)
    store.write_shard(
        "00000",
        to_table(
            [f"k{i}" for i in range(8)], ["a red circle"] * 8, emb, emb, np.ones((8, 32), np.int32)
        ),
        {"skipped": {}},
    )
    store.finalize_manifest()
    info = stages.store_info(store)
    runs = {}

    def run(name: str) -> str:
        runs[name] = join(root, "checkpoints", name)
        return runs[name]

    prior_config = prior_cfg(root)
    write_checkpoint(
        storage,
        run("prior"),
        "train-prior",
        prior_config,
        build_model("train-prior", prior_config, info, 1),
        info,
    )
    decoder_config = decoder_cfg(root)
    decoder = build_model("train-decoder", decoder_config, info, 2)
    raw = build_model(
        "train-decoder", decoder_config, info, 3
    )  # the training weights: not what samples
    write_checkpoint(
        storage, run("decoder"), "train-decoder", decoder_config, raw, info, step=5, ema=raw
    )
    write_checkpoint(
        storage, runs["decoder"], "train-decoder", decoder_config, raw, info, ema=decoder
    )
    up_cfg = upsampler_cfg(root, SIZE, HIGH)
    write_checkpoint(
        storage,
        run("upsampler"),
        "train-upsampler",
        up_cfg,
        build_model("train-upsampler", up_cfg, {}, 4),
        {},
    )
    return {"source": source, "runs": runs, "info": info, "decoder_ema": decoder}


def cascade_overrides(c: dict, *extra: str) -> list[str]:
    """The tiny config pointed at a cascade root (``c``: ``make_cascade_root``'s result with its
    ``root`` and ``clip_path``), its CLIP and runs, with few sampling steps."""
    return [
        f"root={c['root']}",
        "clip.model=tiny-clip",
        f"clip.pretrained={c['clip_path']}",
        f"clip.model_config={TINY_CLIP_CONFIG}",
        "decoder=checkpoints/decoder",
        "upsamplers=[checkpoints/upsampler]",
        f"decoder_steps={STEPS}",
        f"upsampler_steps={STEPS}",
        "device=cpu",
        *extra,
    ]
