"""``unclip eval``: the decoder's conditionings compared on one cascade, as DALL-E 2 section 5.1
(figure 7) does: the caption alone, the CLIP text embedding in place of z_i (no prior), and z_i
from a prior (diffusion, and autoregressive when one is given).

Every conditioning draws the same prompts with the same seed through the same decoder and
upsamplers (``unclip.generation.generate``), and is scored on its final (highest-resolution)
images with ``pipeline.eval.metrics``:

* **CLIP score**: the generated images encoded by the CLIP that made the decoder's embedding store,
  against the prompts' text embeddings by the same CLIP;
* **FD (CLIP)**: Fréchet distance between the generated images' CLIP image embeddings and the real
  images' stored ones (``num_real`` of them, 2000 by default, independent of the prompt count);
* **FID**: the same on Inception-v3 pool features, the real images decoded from the source shards
  at the generated resolution, when ``inception_weights`` names a local file (skipped, with a
  note, otherwise);
* **attribute accuracy**: for the captioned-shapes dataset, whether the colour and the shape each
  prompt names are in its image (:func:`pipeline.eval.metrics.attribute_accuracy`), on the final images
  and on the decoder's 64px ones, for prompts like the training captions and, separately, for
  prompts naming a held-out colour-shape pair (``heldout_pairs``: the generalisation test).

Prompt sets: ``train`` (the config's prompts, or ``num_prompts`` captions drawn from the store) and
``heldout`` (``num_heldout`` captioned-shapes scenes, each with a held-out pair). A ``real`` row
scores the drawn real images the same way (CLIP score from the store's embeddings, attribute
accuracy of the decoded images), as the ceiling the conditionings are read against.

The store's prompts and real images are one seeded sample (:func:`draw_store_rows`, through
:func:`pipeline.embed.sampling.sample_rows`) of at most ``store_files`` store files, each row
carrying its source shard so its image is read from that shard's tar alone: nothing lists every
key or caption of the store, so the cost is the same at the quickstart's size and at LAION's. The
report states how many samples each figure rests on (``samples`` in ``report.json``).

Outputs under ``<root>/<output>/``: ``report.json`` (every number, the config, the checkpoints with
their steps, timings), ``report.md`` (a table, what each metric means, links to the pictures),
``metrics.png`` (bars of attribute accuracy and CLIP score per conditioning) and one captioned
``grid_<conditioning>.png`` per conditioning. The same config and seed give the same numbers.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from pipeline import config as configlib
from pipeline import pictures
from pipeline.cascade_config import EvalConfig
from pipeline.data.shapes import sample_scene
from pipeline.data.shard_set import list_shards
from pipeline.data.synth import scene_options
from pipeline.embed.sampling import MAX_SHARDS, sample_rows
from pipeline.embed.store import (
    EmbeddingStore,
    column_array,
    decode_image,
    iter_shard_with_embeddings,
)
from pipeline.errors import UserFacingError
from pipeline.eval import metrics
from pipeline.eval.report import (
    HELDOUT,
    METRIC_DOCS,
    TRAIN,
    json_safe,
    lookup,
    markdown_report,
    ordered,
    plot_png,
    rounded,
)
from pipeline.generate.cascade import (
    PRIOR,
    Cascade,
    StageCheckpoint,
    check_same_clip,
    find_checkpoint,
    load_cascade,
    load_stage_model,
)
from pipeline.generate.sampling import plan_for
from pipeline.storage import Storage, basename, is_local, join
from unclip import generation

log = logging.getLogger(__name__)

REPORT_JSON, REPORT_MD, PLOT = "report.json", "report.md", "metrics.png"
GRID_WIDTH = 256  # the least width of a grid row, for its caption

# ----------------------------------------------------------------------------------------------
# Prompts and real images


@dataclass
class StoreRows:
    """Rows drawn from the embedding store: source shard, key, caption, unit-norm embeddings."""

    shards: list[str]
    keys: list[str]
    captions: list[str]
    image_emb: np.ndarray  # (N, D) float32
    text_emb: np.ndarray  # (N, D) float32

    def __len__(self) -> int:
        return len(self.keys)

    def head(self, count: int) -> StoreRows:
        """The first ``count`` rows."""
        return StoreRows(
            self.shards[:count],
            self.keys[:count],
            self.captions[:count],
            self.image_emb[:count],
            self.text_emb[:count],
        )


@dataclass
class PromptSet:
    """One set of prompts scored on its own: ``train`` or ``heldout``."""

    name: str
    prompts: list[str]
    source: str


SHARD_COLUMN = "source_shard"  # the column sample_rows adds: each drawn row's store file
DRAW_COLUMNS = ("key", "caption", "image_emb", "text_emb")


def draw_store_rows(
    store: EmbeddingStore, count: int, seed: int, max_files: int = MAX_SHARDS
) -> StoreRows:
    """At most ``count`` captioned rows of the store, a seeded sample read from at most
    ``max_files`` store files (more only when these cannot hold ``count`` rows), in a seeded
    random order.

    The draw is :func:`pipeline.embed.sampling.sample_rows` (each row drawn with probability
    ``count / rows``; one column set read per chosen file, the rest of the store never opened), so
    its cost does not grow with the store: the evaluation never lists every key or caption.
    Uncaptioned rows are dropped (fewer rows then). The order is shuffled so that any prefix (the
    prompts, the real images) is a random subset of the draw, not the first files' rows. The same
    seed and completed files give the same rows in the same order.
    """
    table = sample_rows(
        store, DRAW_COLUMNS, count, seed, max_shards=max_files, shard_column=SHARD_COLUMN
    )
    captions = table.column("caption").to_pylist()
    keep = np.array([i for i, c in enumerate(captions) if c and c.strip()], dtype=np.int64)
    if not len(keep):
        raise UserFacingError(f"the embedding store at {store.url} has no captioned rows")
    table = table.take(pa.array(keep[np.random.default_rng(seed).permutation(len(keep))]))
    return StoreRows(
        shards=table.column(SHARD_COLUMN).to_pylist(),
        keys=table.column("key").to_pylist(),
        captions=table.column("caption").to_pylist(),
        image_emb=column_array(table, "image_emb").astype(np.float32),
        text_emb=column_array(table, "text_emb").astype(np.float32),
    )


def heldout_prompts(
    pairs: frozenset[tuple[str, str]], count: int, seed: int, **scene_options: Any
) -> list[str]:
    """Captions of ``count`` captioned-shapes scenes (:func:`pipeline.data.shapes.sample_scene`), each
    with at least one ``(colour, shape)`` of ``pairs``: pairs the training split never shows.
    ``scene_options`` (:func:`pipeline.data.synth.scene_options`) match the training data's objects,
    backgrounds, positions and sizes, so that only the pair is new."""
    return [
        sample_scene(seed, i, require_pairs=pairs, **scene_options).caption for i in range(count)
    ]


def read_real_images(
    storage: Storage, shards_url: str, store: EmbeddingStore, rows: StoreRows, size: int
) -> np.ndarray | None:
    """The rows' images (N, size, size, 3) uint8 from the source shards beside the store (one
    pass over each tar the rows fall in), or None when any is missing there."""
    try:
        tars = list_shards(storage, shards_url).locator()
    except UserFacingError as exc:
        log.warning("no real images: %s", exc)
        return None
    wanted: dict[str, dict[str, int]] = {}
    for pos, (shard, key) in enumerate(zip(rows.shards, rows.keys, strict=True)):
        wanted.setdefault(shard, {})[key] = pos
    images: list[np.ndarray | None] = [None] * len(rows)
    for shard, keys in wanted.items():
        for sample in iter_shard_with_embeddings(storage, tars, store, shard, columns=()):
            pos = keys.get(sample["key"])
            if pos is not None:
                where = f"{sample['key']} of shard {shard}"
                images[pos] = decode_image(sample["image_bytes"], size, where)
    missing = sum(image is None for image in images)
    if missing:
        log.warning(
            "%d of %d real images are not in the shards at %s", missing, len(rows), shards_url
        )
        return None
    return np.stack(images)


# ----------------------------------------------------------------------------------------------
# Loading


@dataclass
class Prior:
    """A loaded prior for one conditioning, with the checkpoint it came from."""

    checkpoint: StageCheckpoint
    model: nn.Module

    @property
    def kind(self) -> str:
        return str(self.checkpoint.cfg.model.kind)


def _label(name: str, prior: Prior | None) -> str:
    if name == "caption":
        return "caption only"
    if name == "text_embedding":
        return "text embedding (no prior)"
    kind = "AR" if prior is not None and prior.kind == "autoregressive" else "diffusion"
    return f"{kind} prior" + (" (ar_prior)" if name == "ar_prior" else "")


def _local_file(storage: Storage, url: str, tmp: str) -> str:
    """A local path for ``url``: itself when local, else a copy in ``tmp``."""
    if is_local(url):
        return url[len("file://") :] if url.startswith("file://") else url
    path = os.path.join(tmp, basename(url))
    with open(path, "wb") as handle:
        handle.write(storage.read_bytes(url))
    return path


def load_inception(
    cfg: EvalConfig, storage: Storage, device: torch.device, notes: list[str]
) -> metrics.InceptionFeatures | None:
    """The FID network from ``inception_weights`` (relative to root unless absolute), or None with
    a note when the config gives none or the file is not there. A file that is there but is not
    Inception-v3 weights is an error (before anything is generated)."""
    if not cfg.inception_weights:
        notes.append(
            "FID skipped: no inception_weights (a local torchvision Inception-v3 weights file, "
            "e.g. inception_v3_google-0cc3c7bd.pth; nothing is downloaded)"
        )
        return None
    url = cfg.url(cfg.inception_weights)
    if not storage.exists(url):
        notes.append(f"FID skipped: no Inception weights at {url} (config key: inception_weights)")
        log.warning("FID skipped: no Inception weights at %s", url)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return metrics.load_inception(_local_file(storage, url, tmp), device)


def _open(cfg: EvalConfig, storage: Storage) -> tuple[Cascade, dict[str, Prior]]:
    """Plan (check) and load the cascade with ``prior``, and ``ar_prior`` beside it."""
    names = cfg.selected()
    first = cfg.prior if "prior" in names else None
    plan = plan_for(cfg, storage, first)
    second = None
    if "ar_prior" in names:
        second = find_checkpoint(storage, cfg.url(cfg.ar_prior), PRIOR, "ar_prior")
        check_same_clip(second, plan.decoder)
    cascade = load_cascade(plan, storage, cfg.device)
    priors = {}
    if plan.prior is not None:
        priors["prior"] = Prior(plan.prior, cascade.prior)
    if second is not None:
        priors["ar_prior"] = Prior(second, load_stage_model(storage, second, cascade.device))
    return cascade, priors


def _store(cfg: EvalConfig, storage: Storage, cascade: Cascade) -> EmbeddingStore:
    """The store to draw prompts and real images from; its CLIP must be the cascade's."""
    url = cfg.url(cfg.store) if cfg.store else cascade.plan.decoder.info.get("store")
    if not url:
        raise UserFacingError(
            f"the decoder {cascade.plan.decoder.url} does not record its embedding store: set store"
        )
    store = EmbeddingStore(storage, url)
    if not store.exists():
        raise UserFacingError(f"no embedding store at {url} (config key: store)")
    found = store.manifest()["clip"]["id"]
    if found != cascade.plan.clip_id:
        raise UserFacingError(
            f"the embedding store at {url} was made by {found!r}, but the cascade reads "
            f"embeddings of {cascade.plan.clip_id!r}: give the decoder's store (config key: store)"
        )
    return store


# ----------------------------------------------------------------------------------------------
# Generating and scoring one conditioning


@dataclass
class Generated:
    """One conditioning's images for every row, and their features."""

    final: np.ndarray  # (N, H, W, 3) uint8
    decoder: np.ndarray  # (N, S, S, 3) uint8, the decoder's output
    clip_emb: np.ndarray  # (N, D) float32, unit norm
    seconds: dict[str, float]


def _as_pil(pixels: np.ndarray) -> list[Any]:
    from PIL import Image

    return [Image.fromarray(p) for p in pixels]


def generate_rows(
    cascade: Cascade,
    cfg: EvalConfig,
    conditioning: str,
    prior: Prior | None,
    text_emb: torch.Tensor,
    tokens: torch.Tensor,
) -> Generated:
    """Images of every row with one conditioning, ``cfg.batch_size`` rows at a time from one
    generator seeded by ``cfg.seed`` (chunked as ``unclip sample`` does), and their CLIP image
    embeddings (of the uint8 images, as a saved PNG would be encoded)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    temperature = cfg.temperature if prior is not None and prior.kind == "autoregressive" else None
    mode = "prior" if conditioning in ("prior", "ar_prior") else conditioning
    finals, lows, embs = [], [], []
    spent = {"generate": 0.0, "clip": 0.0}
    for start in range(0, text_emb.shape[0], cfg.batch_size):
        rows = slice(start, start + cfg.batch_size)
        began = time.perf_counter()
        result = generation.generate(
            text_emb[rows],
            tokens[rows],
            decoder=cascade.decoder,
            prior=prior.model if prior is not None else None,
            upsamplers=cascade.upsamplers,
            conditioning=mode,
            prior_guidance=cfg.prior_guidance,
            prior_steps=cfg.prior_steps,
            num_candidates=cfg.num_candidates,
            temperature=temperature,
            decoder_guidance=cfg.decoder_guidance,
            decoder_steps=cfg.decoder_steps,
            upsampler_steps=cfg.upsampler_steps,
            generator=generator,
        )
        finals.append(pictures.to_uint8(result.final))
        lows.append(pictures.to_uint8(result.images[0]))
        encoded = time.perf_counter()
        embs.append(cascade.encode_images(_as_pil(finals[-1])).cpu().numpy())
        spent["generate"] += encoded - began
        spent["clip"] += time.perf_counter() - encoded
    return Generated(np.concatenate(finals), np.concatenate(lows), np.concatenate(embs), spent)


def _pixels(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 → (N, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _inception(
    inception: metrics.InceptionFeatures, images: np.ndarray, batch_size: int
) -> np.ndarray:
    """Inception features of (N, H, W, 3) uint8 images, converted to floats ``batch_size`` at a
    time: ``num_real`` (2000) real images at 1024 px as one float tensor would take 25 GB."""
    parts = [
        metrics.inception_features(inception, _pixels(images[i : i + batch_size]), batch_size)
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, metrics.INCEPTION_FEATURE_DIM))


def _attributes(images: np.ndarray, captions: Sequence[str]) -> dict[str, Any]:
    return metrics.attribute_accuracy(list(images), list(captions))


def _frechet(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    if a is None or b is None or len(a) < 2 or len(b) < 2:
        return None
    return metrics.frechet_distance_features(a, b)


# ----------------------------------------------------------------------------------------------
# The command


def sample_counts(
    sets: Sequence[PromptSet],
    per: int,
    real: StoreRows,
    real_images: np.ndarray | None,
    with_fid: bool,
) -> dict[str, Any]:
    """How many samples each figure rests on (``report.json``'s ``samples``; ``report.md`` says
    it in words): per prompt set, prompts × images per prompt (a conditioning's CLIP score and
    attribute accuracy); for FD (CLIP) and FID, the first set's generated images against the
    real ones (FID: None when not computed); the real row's images (and how many were decoded
    from the source tars), and the store files (each one source shard) they were drawn from. A figure on a few dozen images is noise: the
    counts say how far to trust a difference."""
    first = len(sets[0].prompts) * per
    return {
        "per_prompt": per,
        "sets": {s.name: {"prompts": len(s.prompts), "images": len(s.prompts) * per} for s in sets},
        "fd_clip": {"generated": first, "real": len(real)},
        "fid": {"generated": first, "real": len(real_images)}
        if with_fid and real_images is not None
        else None,
        "real": len(real),
        "real_images_decoded": None if real_images is None else len(real_images),
        "store_files": len(set(real.shards)),
    }


def _set_metrics(
    images: np.ndarray,
    low: np.ndarray | None,
    clip_emb: np.ndarray,
    text_emb: np.ndarray,
    prompts: Sequence[str],
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "images": len(prompts),
        "clip_score": metrics.clip_score(clip_emb, text_emb) if len(prompts) else None,
        "attributes": _attributes(images, prompts) if images is not None else None,
    }
    if low is not None:
        out["attributes_decoder"] = _attributes(low, prompts)
    return out


def _grid(
    gen: Generated, sets: Sequence[PromptSet], spans: dict[str, slice], per: int, cfg: EvalConfig
) -> bytes:
    """One row per prompt (its samples) under the prompt; small images are enlarged (nearest) so
    that a row is at least :data:`GRID_WIDTH` pixels wide and its caption readable."""
    side = gen.final.shape[1]
    scale = max(1, math.ceil(GRID_WIDTH / (per * side)))
    images = gen.final.repeat(scale, axis=1).repeat(scale, axis=2) if scale > 1 else gen.final
    rows, captions = [], []
    for prompt_set in sets:
        first = spans[prompt_set.name].start
        for i, prompt in enumerate(prompt_set.prompts[: cfg.grid_prompts]):
            rows.append(list(images[first + i * per : first + (i + 1) * per]))
            captions.append(("held-out: " if prompt_set.name == HELDOUT else "") + prompt)
    return pictures.captioned_grid(rows, captions)


def run_eval(cfg: EvalConfig, storage: Storage | None = None) -> dict[str, Any]:
    """``unclip eval``: generate with every conditioning of ``cfg.selected()``, score, and write
    the report (module docstring). Returns the paths written and the headline numbers:
    ``{"output", "report", "markdown", "plot", "grids": {conditioning: url}, "metrics":
    {conditioning: {"clip_score", "fd_clip", "fid", "shape", "heldout_shape"}}, "notes"}``."""
    storage = storage or Storage(cfg.storage)
    began = time.perf_counter()
    notes: list[str] = []
    cascade, priors = _open(cfg, storage)
    store = _store(cfg, storage, cascade)
    inception = load_inception(cfg, storage, cascade.device, notes)
    timings: dict[str, Any] = {"load": time.perf_counter() - began}

    # Prompts, and the real images the distances compare with
    started = time.perf_counter()
    per = cfg.samples_per_prompt
    num_first = len(cfg.prompts) if cfg.prompts else cfg.num_prompts
    wanted = max(cfg.num_real, 0 if cfg.prompts else num_first)
    drawn = draw_store_rows(store, wanted, cfg.seed, cfg.store_files)
    if cfg.prompts:
        sets = [PromptSet(TRAIN, list(cfg.prompts), "the config's prompts")]
        notes.append(
            "FD (CLIP) and FID compare the config's prompts' images with real images drawn from "
            "the store: they measure the prompt choice as well as the images"
        )
    else:
        captions = drawn.captions[:num_first]
        sets = [PromptSet(TRAIN, captions, f"captions drawn from the store, seed {cfg.seed}")]
        if len(captions) < num_first:
            notes.append(
                f"the store's sample holds {len(drawn)} captioned rows: {len(captions)} prompts"
            )
    shards_url = cfg.url(cfg.shards) if cfg.shards else store.manifest().get("source")
    if cfg.heldout_pairs:
        options = scene_options(storage, shards_url) if shards_url else {}
        prompts = heldout_prompts(cfg.holdout_pairs(), cfg.num_heldout, cfg.seed, **options)
        sets.append(PromptSet(HELDOUT, prompts, "captioned-shapes scenes with a held-out pair"))
    real = drawn.head(cfg.num_real)
    if len(real) < cfg.num_real:
        notes.append(
            f"the store's sample holds {len(real)} captioned rows: {len(real)} real images, "
            f"not num_real={cfg.num_real}"
        )
    row_prompts = [p for s in sets for p in s.prompts for _ in range(per)]
    spans, first = {}, 0
    for prompt_set in sets:
        spans[prompt_set.name] = slice(first, first + len(prompt_set.prompts) * per)
        first = spans[prompt_set.name].stop
    encoded = [
        cascade.encode_text(row_prompts[i : i + cfg.batch_size])
        for i in range(0, len(row_prompts), cfg.batch_size)
    ]
    text_emb = torch.cat([e for e, _ in encoded])
    tokens = torch.cat([t for _, t in encoded])
    text_np = text_emb.cpu().numpy()
    side = cascade.resolutions[-1]
    real_images = read_real_images(storage, shards_url, store, real, side) if shards_url else None
    if real_images is None:
        notes.append(
            f"the real images are not all in the source shards ({shards_url}; config key: "
            "shards): no FID and no attribute accuracy of real images"
        )
    real_features = None
    if inception is not None and real_images is not None:
        real_features = _inception(inception, real_images, cfg.batch_size)
    real_entry = {
        "label": "real images (reference)",
        "images": len(real),
        "sets": {
            TRAIN: _set_metrics(real_images, None, real.image_emb, real.text_emb, real.captions)
        },
    }
    samples = sample_counts(sets, per, real, real_images, real_features is not None)
    generated = samples["sets"][TRAIN]["images"]
    if generated <= real.image_emb.shape[1]:
        notes.append(
            f"FD (CLIP) rests on {generated} generated images, no more than the embedding's "
            f"{real.image_emb.shape[1]} dimensions: its covariance is rank-deficient and the "
            "figure is biased upwards; compare conditionings with each other (raise num_prompts "
            "or samples_per_prompt for a steadier one)"
        )
    timings["prompts_and_real_images"] = time.perf_counter() - started

    # Each conditioning
    output = cfg.url(cfg.output)
    entries: dict[str, dict[str, Any]] = {}
    grid_urls: dict[str, str] = {}
    timings["conditionings"] = {}
    first_rows = spans[TRAIN]
    for name in cfg.selected():
        prior = priors.get(name)
        log.info("eval: %s on %d rows", name, len(row_prompts))
        gen = generate_rows(cascade, cfg, name, prior, text_emb, tokens)
        seconds = dict(gen.seconds)
        started = time.perf_counter()
        fid = None
        if real_features is not None:
            features = _inception(inception, gen.final[first_rows], cfg.batch_size)
            fid = _frechet(features, real_features)
        seconds["inception"] = time.perf_counter() - started
        started = time.perf_counter()
        entry = {
            "label": _label(name, prior),
            "checkpoint": prior.checkpoint.describe() if prior is not None else None,
            "prior_kind": prior.kind if prior is not None else None,
            "fd_clip": _frechet(gen.clip_emb[first_rows], real.image_emb),
            "fid": fid,
            "sets": {
                s.name: _set_metrics(
                    gen.final[spans[s.name]],
                    gen.decoder[spans[s.name]],
                    gen.clip_emb[spans[s.name]],
                    text_np[spans[s.name]],
                    row_prompts[spans[s.name]],
                )
                for s in sets
            },
            "grid": f"grid_{name}.png",
        }
        seconds["metrics"] = time.perf_counter() - started
        grid_urls[name] = join(output, entry["grid"])
        storage.write_bytes(grid_urls[name], _grid(gen, sets, spans, per, cfg))
        entries[name] = entry
        timings["conditionings"][name] = seconds

    # The report
    checkpoints = cascade.plan.describe()
    if "ar_prior" in priors:
        checkpoints["ar_prior"] = priors["ar_prior"].checkpoint.describe()
    timings["total"] = time.perf_counter() - began
    report = json_safe(
        {
            "command": "eval",
            "config": configlib.to_dict(cfg),
            "checkpoints": checkpoints,
            "device": str(cascade.device),
            "resolutions": cascade.resolutions,
            "prompts": {s.name: s.prompts for s in sets},
            "prompt_sources": {s.name: s.source for s in sets},
            "real": {**real_entry, "keys": real.keys, "shards": shards_url},
            "samples": samples,
            "order": list(entries),
            "conditionings": entries,
            "metrics": METRIC_DOCS,
            "notes": notes,
            "plot": PLOT,
            "timings_s": rounded(timings),
        }
    )
    urls = {key: join(output, name) for key, name in (("json", REPORT_JSON), ("md", REPORT_MD))}
    plot_url = join(output, PLOT)
    storage.write_bytes(plot_url, plot_png(report))
    storage.write_text(urls["md"], markdown_report(report))
    storage.write_json(urls["json"], report)
    log.info("eval: %d conditionings, report at %s", len(entries), urls["md"])
    return {
        "output": output,
        "report": urls["json"],
        "markdown": urls["md"],
        "plot": plot_url,
        "grids": grid_urls,
        "metrics": {
            name: {
                "clip_score": lookup(entry, "sets", TRAIN, "clip_score"),
                "fd_clip": entry["fd_clip"],
                "fid": entry["fid"],
                "color": lookup(entry, "sets", TRAIN, "attributes", "color"),
                "shape": lookup(entry, "sets", TRAIN, "attributes", "shape"),
                "heldout_shape": lookup(entry, "sets", HELDOUT, "attributes", "shape"),
            }
            for name, entry in ordered(report)
        },
        "notes": notes,
    }
