"""What differs between the training stages: their data, their model, their pictures.

The shared driver (``pipeline.train.driver``) and worker loop (``pipeline.train.loop``) are the same for
every stage; a :class:`StageSpec` supplies the rest:

* ``prepare`` (driver): the stage's :class:`~pipeline.train.sources.Source` (its data as pieces the
  workers read themselves, from listings and completion records: no data passes through the
  driver) and a small ``info`` dict for the workers (embedding dim, the store's identity, a sample
  for the AR prior's PCA fit, ...);
* ``build`` (worker): the stage model from ``unclip`` (it has ``loss(batch, generator)``);
* ``collate`` (worker): a micro-batch's stacked columns (tensors) into the model's inputs;
* ``pictures`` (worker, rank 0): a PNG grid of EMA samples at each checkpoint;
* ``exports`` (worker, rank 0): extra files in the checkpoint (train-clip's open_clip weights);
* ``compatible``: config keys that must not change when a run resumes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import pictures
from pipeline.data.shard_set import ShardSet, list_shards, sample_counts
from pipeline.embed.sampling import sample_arrays
from pipeline.embed.store import EmbeddingStore
from pipeline.errors import UserFacingError
from pipeline.stage_config import (
    DecoderConfig,
    PriorConfig,
    TrainClipConfig,
    TrainStageConfig,
    UpsamplerConfig,
)
from pipeline.storage import Storage, join
from pipeline.train.order import Piece
from pipeline.train.sources import Source, StoreImages, StoreRows, TarImages

GRID_SAMPLES = 8


@dataclass(frozen=True)
class StageSpec:
    name: str
    config_cls: type[TrainStageConfig]
    prepare: Callable[[Any, Storage], tuple[Source, dict[str, Any]]]
    build: Callable[[Any, dict[str, Any]], nn.Module]
    collate: Callable[[dict[str, Any], Any], dict[str, torch.Tensor]]
    compatible: tuple[str, ...]
    pictures: Callable[[nn.Module, dict[str, torch.Tensor], Any], bytes | None] | None = None
    exports: Callable[[nn.Module, Any], dict[str, bytes]] | None = None


def to_images(uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 → (B, 3, H, W) float in [-1, 1]."""
    return torch.as_tensor(uint8).permute(0, 3, 1, 2).float() / 127.5 - 1


def shard_pieces(storage: Storage, shards: ShardSet, cfg: TrainStageConfig) -> tuple[Piece, ...]:
    """The complete source shards as pieces, each with its sample count (img2dataset's stats, or
    plain tars counted once on the cluster and kept in the run folder for its reruns)."""
    counts = sample_counts(storage, shards, join(cfg.run_url(), "source-counts.parquet"))
    return tuple(Piece(name, counts[name]) for name in shards.names)


def store_pieces(
    store: EmbeddingStore, records: dict[str, dict[str, Any]] | None = None
) -> tuple[Piece, ...]:
    """The store's completed shards as pieces, each with the rows its record counts (``records``:
    ``store.completed()``, read here when not given)."""
    records = store.completed() if records is None else records
    if not records:
        raise UserFacingError(f"the embedding store at {store.url} has no completed shards")
    return tuple(Piece(name, int(records[name]["rows"])) for name in sorted(records))


# ----------------------------------------------------------------------------------------------
# Prior


def _store(cfg: Any, storage: Storage) -> EmbeddingStore:
    return EmbeddingStore.locate(storage, cfg.url(cfg.store), cfg.clip_id)


def store_info(store: EmbeddingStore) -> dict[str, Any]:
    """What a stage reads of the store before it trains (the ``info`` its model is built with):
    the store's URL and CLIP, the embedding dim and the tokenizer's context length."""
    manifest = store.manifest()
    return {
        "store": store.url,
        "clip": manifest["clip"]["id"],
        "embed_dim": int(manifest["embed_dim"]),
        "context_length": int(manifest["tokenizer"]["context_length"]),
    }


PRIOR_COLUMNS = ("text_emb", "text_tokens", "image_emb")
FIT_ROWS = 100_000  # the autoregressive prior's PCA and buckets are fitted on this many rows


def prepare_prior(cfg: PriorConfig, storage: Storage) -> tuple[Source, dict[str, Any]]:
    """The prior's data (the store's files as pieces) and ``info``; for the autoregressive prior,
    ``info`` also holds ``fit_image_emb`` and ``fit_text_emb`` (float32, at most ``FIT_ROWS``
    rows), a seeded sample of the store for its PCA quantizer, drawn by
    :func:`pipeline.embed.sampling.sample_arrays` from a bounded number of store files, so the
    driver's memory does not grow with the store."""
    store = _store(cfg, storage)
    info = store_info(store)
    records = store.completed()  # read once, for the pieces and the PCA sample
    if cfg.model.kind == "autoregressive":  # the PCA and buckets are fitted on the store
        fit = sample_arrays(
            store, ["image_emb", "text_emb"], FIT_ROWS, cfg.train.seed, records=records
        )
        info["fit_image_emb"], info["fit_text_emb"] = fit["image_emb"], fit["text_emb"]
    source = StoreRows(
        store_pieces(store, records),
        cfg.storage,
        cfg.train.seed,
        store=store.url,
        columns=PRIOR_COLUMNS,
    )
    return source, info


def build_prior(cfg: PriorConfig, info: dict[str, Any]) -> nn.Module:
    """The prior; the autoregressive one's PCA quantizer is fitted on ``info``'s sample when it
    has one (training), and left unfitted otherwise (a checkpoint's ``info`` has none: its fitted
    quantizer lives in buffers that loading the state dict restores)."""
    from unclip.prior import build_prior as build

    model = build(cfg.model, cfg.diffusion, embed_dim=info["embed_dim"])
    if cfg.model.kind == "autoregressive" and "fit_image_emb" in info:
        model.fit_quantizer(
            torch.from_numpy(info["fit_image_emb"]), torch.from_numpy(info["fit_text_emb"])
        )
    return model


def collate_embeddings(batch: dict[str, Any], cfg: Any = None) -> dict[str, torch.Tensor]:
    return {
        k: torch.from_numpy(batch[k]).long() if k == "text_tokens" else torch.from_numpy(batch[k])
        for k in PRIOR_COLUMNS
    }


# ----------------------------------------------------------------------------------------------
# Decoder


def prepare_decoder(cfg: DecoderConfig, storage: Storage) -> tuple[Source, dict[str, Any]]:
    store = _store(cfg, storage)
    records = store.completed()  # read once, for the pieces and the source check
    pieces = store_pieces(store, records)
    shards = store.check_source(cfg.url(cfg.shards), records)
    source = StoreImages(
        pieces,
        cfg.storage,
        cfg.train.seed,
        store=store.url,
        tars=shards.locator(),
        image_size=cfg.model.image_size,
        columns=("image_emb", "text_tokens"),
    )
    return source, store_info(store)


def build_decoder(cfg: DecoderConfig, info: dict[str, Any]) -> nn.Module:
    from unclip.decoder import Decoder

    return Decoder(cfg.model, cfg.diffusion, embed_dim=info["embed_dim"])


def collate_images(batch: dict[str, Any], cfg: Any = None) -> dict[str, torch.Tensor]:
    out = {"image": to_images(batch["image"])}
    for key in ("image_emb", "text_tokens"):
        if key in batch:
            value = torch.as_tensor(batch[key])
            out[key] = value.long() if key == "text_tokens" else value
    return out


def decoder_pictures(model: nn.Module, batch: dict[str, torch.Tensor], cfg: DecoderConfig) -> bytes:
    """Top row: training images; bottom: the EMA decoder's samples from their CLIP embeddings."""
    n = min(GRID_SAMPLES, len(batch["image"]))
    generator = torch.Generator().manual_seed(cfg.train.seed)
    steps = min(cfg.diffusion.sampling_steps, 50)
    samples = model.sample(
        batch["image_emb"][:n], batch["text_tokens"][:n], steps=steps, generator=generator
    )
    return pictures.tensor_rows_png([batch["image"][:n].cpu(), samples.cpu()])


# ----------------------------------------------------------------------------------------------
# Upsampler


def prepare_upsampler(cfg: UpsamplerConfig, storage: Storage) -> tuple[Source, dict[str, Any]]:
    shards = list_shards(storage, cfg.url(cfg.shards))
    pieces = shard_pieces(storage, shards, cfg)
    return TarImages(
        pieces, cfg.storage, cfg.train.seed, tars=shards.locator(), image_size=cfg.model.high_res
    ), {}


def build_upsampler(cfg: UpsamplerConfig, info: dict[str, Any]) -> nn.Module:
    from unclip.upsampler import Upsampler

    return Upsampler(cfg.model, cfg.diffusion)


def upsampler_pictures(
    model: nn.Module, batch: dict[str, torch.Tensor], cfg: UpsamplerConfig
) -> bytes:
    """Rows: the low-res input, the EMA upsampler's output, the real high-res image."""
    from unclip.upsampler import downscale

    n = min(GRID_SAMPLES // 2, len(batch["image"]))
    high = batch["image"][:n].float()
    low = downscale(high, cfg.model.low_res)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    samples = model.sample(low, steps=min(cfg.diffusion.sampling_steps, 25), generator=generator)
    return pictures.tensor_rows_png([low.cpu(), samples.cpu(), high.cpu()])


# ----------------------------------------------------------------------------------------------
# CLIP (contrastive training with open_clip's model and loss)


class ClipStage(nn.Module):
    """An open_clip model trained with open_clip's contrastive loss, gathered over workers."""

    def __init__(self, cfg: TrainClipConfig) -> None:
        super().__init__()
        import open_clip

        from pipeline.embed.clip_model import register_model_config

        register_model_config(cfg.clip)
        self.clip = open_clip.create_model(cfg.clip.model, pretrained=cfg.clip.pretrained)
        mean = self.clip.visual.image_mean or open_clip.OPENAI_DATASET_MEAN
        std = self.clip.visual.image_std or open_clip.OPENAI_DATASET_STD
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.contrastive = None

    def _loss_fn(self):
        if self.contrastive is None:
            import torch.distributed as dist
            from open_clip.loss import ClipLoss

            distributed = dist.is_available() and dist.is_initialized()
            self.contrastive = ClipLoss(
                local_loss=False,
                gather_with_grad=True,
                rank=dist.get_rank() if distributed else 0,
                world_size=dist.get_world_size() if distributed else 1,
            )
        return self.contrastive

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None):
        images = ((batch["image"] + 1) / 2 - self.mean) / self.std
        image_features, text_features, logit_scale = self.clip(images, batch["text_tokens"])[:3]
        return self._loss_fn()(image_features, text_features, logit_scale)

    forward = loss


def prepare_clip(cfg: TrainClipConfig, storage: Storage) -> tuple[Source, dict[str, Any]]:
    import open_clip

    from pipeline.embed.clip_model import image_size_of, require_model

    require_model(cfg.clip)
    size = image_size_of(open_clip.get_model_config(cfg.clip.model))
    shards = list_shards(storage, cfg.url(cfg.shards))
    source = TarImages(
        shard_pieces(storage, shards, cfg),
        cfg.storage,
        cfg.train.seed,
        tars=shards.locator(),
        image_size=size,
        captions=True,
    )
    return source, {"image_size": size}


def collate_clip(batch: dict[str, Any], cfg: TrainClipConfig) -> dict[str, torch.Tensor]:
    """Images to [-1, 1], captions to the CLIP's tokens."""
    from pipeline.embed.clip_model import tokenizer

    return {
        "image": to_images(batch["image"]),
        "text_tokens": tokenizer(cfg.clip)([str(c) for c in batch["caption"]]).long(),
    }


def build_clip(cfg: TrainClipConfig, info: dict[str, Any]) -> nn.Module:
    return ClipStage(cfg)


def clip_exports(model: nn.Module, cfg: TrainClipConfig) -> dict[str, bytes]:
    """The EMA CLIP in open_clip's format, so ``unclip embed clip.pretrained=<run>`` loads it."""
    from safetensors.torch import save

    state = {
        k[len("clip.") :]: v.detach().cpu().contiguous().clone()
        for k, v in model.state_dict().items()
        if k.startswith("clip.")
    }
    return {"clip.safetensors": save(state)}


_DIFFUSION_KEYS = (
    "diffusion.timesteps",
    "diffusion.schedule",
    "diffusion.objective",
    "diffusion.learned_variance",
)

STAGES: dict[str, StageSpec] = {
    "train-prior": StageSpec(
        "train-prior",
        PriorConfig,
        prepare_prior,
        build_prior,
        collate_embeddings,
        ("model", *_DIFFUSION_KEYS, "store", "clip_id"),
    ),
    "train-decoder": StageSpec(
        "train-decoder",
        DecoderConfig,
        prepare_decoder,
        build_decoder,
        collate_images,
        ("model", *_DIFFUSION_KEYS, "store", "clip_id"),
        pictures=decoder_pictures,
    ),
    "train-upsampler": StageSpec(
        "train-upsampler",
        UpsamplerConfig,
        prepare_upsampler,
        build_upsampler,
        collate_images,
        ("model", *_DIFFUSION_KEYS),
        pictures=upsampler_pictures,
    ),
    "train-clip": StageSpec(
        "train-clip",
        TrainClipConfig,
        prepare_clip,
        build_clip,
        collate_clip,
        ("clip",),
        exports=clip_exports,
    ),
}
