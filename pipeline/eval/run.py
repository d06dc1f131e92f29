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
  prompts naming a held-out colour-shape pair (``heldout_pairs``: the generalisation test), each
  with its 95% bootstrap interval over prompts; and each prior against each conditioning without
  one, the paired difference of their accuracies with its interval (:func:`comparisons`).

Prompt sets: ``train`` (the config's prompts, or ``num_prompts`` captions drawn from the store) and
``heldout`` (``num_heldout`` captioned-shapes scenes, each with a held-out pair). A ``real`` row
scores the drawn real images the same way (CLIP score from the store's embeddings, attribute
accuracy of the decoded images), as the ceiling the conditionings are read against.

The store's prompts and real images are one seeded sample (:func:`draw_store_rows`, through
:func:`pipeline.embed.sampling.sample_rows`) of at most ``store_files`` store files, each row
carrying its source shard so its image is read from that shard's tar alone: nothing lists every
key or caption of the store, so the cost is the same at the quickstart's size and at LAION's. The
report states how many samples each figure rests on (``samples`` in ``report.json``).

The work runs on the cluster (:mod:`pipeline.eval.workers`): ``concurrency`` Ray Data actors
(one GPU each when the cluster has GPUs) each hold the cascade, every prior compared, the CLIP and
Inception, generate the rows of every conditioning ``batch_size`` at a time and read and score the
real images shard by shard; the driver plans, draws, and adds up per-row numbers (embeddings,
Inception features, attribute checks), holding no image but those the grids show. Row ``r``
draws its noise from its own seed, the same for every conditioning, so the conditionings are
compared on the same noise and the numbers do not depend on the number of actors.

Outputs under ``<root>/<output>/``: ``report.json`` (every number, the config, the checkpoints with
their steps, timings), ``report.md`` (a table, what each metric means, links to the pictures),
``metrics.png`` (bars of attribute accuracy and CLIP score per conditioning) and one captioned
``grid_<conditioning>.png`` per conditioning. The same config and seed give the same numbers.
"""

from __future__ import annotations

import io
import json
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import config as configlib
from pipeline import pictures
from pipeline.cascade_config import EvalConfig
from pipeline.cluster.connect import connect
from pipeline.cluster.preflight import check_cluster_fits
from pipeline.data.shapes import sample_scene
from pipeline.data.shard_set import list_shards
from pipeline.data.synth import scene_options
from pipeline.embed.sampling import MAX_SHARDS, sample_rows
from pipeline.embed.store import (
    EmbeddingStore,
    column_array,
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
from pipeline.eval.workers import EvalPlan, Item, floats, local_file, run_items
from pipeline.generate.batch import actor_gpus, actor_pool
from pipeline.generate.cascade import (
    PRIOR,
    CascadePlan,
    StageCheckpoint,
    check_same_clip,
    find_checkpoint,
)
from pipeline.generate.sampling import plan_for
from pipeline.progress import Progress
from pipeline.storage import Storage, join

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


def real_items(rows: StoreRows) -> list[Item]:
    """The drawn real images as work items: one per source shard, with its keys, their positions
    in the draw and their captions (for the attribute check)."""
    by_shard: dict[str, Item] = {}
    for pos, (shard, key, caption) in enumerate(
        zip(rows.shards, rows.keys, rows.captions, strict=True)
    ):
        item = by_shard.setdefault(shard, Item("real", shard=shard))
        item.keys.append(key)
        item.rows.append(pos)
        item.prompts.append(caption)
    return list(by_shard.values())


# ----------------------------------------------------------------------------------------------
# Loading


def _label(name: str, kind: str | None) -> str:
    if name == "caption":
        return "caption only"
    if name == "text_embedding":
        return "text embedding (no prior)"
    prefix = "AR" if kind == "autoregressive" else "diffusion"
    return f"{prefix} prior" + (" (ar_prior)" if name == "ar_prior" else "")


def inception_url(cfg: EvalConfig, storage: Storage, notes: list[str]) -> str | None:
    """The URL of the FID network's weights, ``inception_weights`` (relative to root unless
    absolute), or None with a note when the config gives none or the file is not there. A file
    that is there but is not Inception-v3 weights is an error, raised here before anything is
    generated (the file is loaded once to check it; the actors load it again)."""
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
        metrics.load_inception(local_file(storage, url, tmp), "cpu")
    return url


def _plan(cfg: EvalConfig, storage: Storage) -> tuple[CascadePlan, StageCheckpoint | None]:
    """Plan (check, reading no weights) the cascade with ``prior``, and ``ar_prior`` beside it."""
    names = cfg.selected()
    plan = plan_for(cfg, storage, cfg.prior if "prior" in names else None)
    second = None
    if "ar_prior" in names:
        second = find_checkpoint(storage, cfg.url(cfg.ar_prior), PRIOR, "ar_prior")
        check_same_clip(second, plan.decoder)
    return plan, second


def _store(
    cfg: EvalConfig, storage: Storage, plan: CascadePlan
) -> tuple[EmbeddingStore, dict[str, Any]]:
    """The store to draw prompts and real images from, and its manifest (read once); its CLIP
    must be the cascade's."""
    url = cfg.url(cfg.store) if cfg.store else plan.decoder.info.get("store")
    if not url:
        raise UserFacingError(
            f"the decoder {plan.decoder.url} does not record its embedding store: set store"
        )
    store = EmbeddingStore(storage, url)
    if not store.exists():
        raise UserFacingError(f"no embedding store at {url} (config key: store)")
    manifest = store.manifest()
    found = manifest["clip"]["id"]
    if found != plan.clip_id:
        raise UserFacingError(
            f"the embedding store at {url} was made by {found!r}, but the cascade reads "
            f"embeddings of {plan.clip_id!r}: give the decoder's store (config key: store)"
        )
    return store, manifest


# ----------------------------------------------------------------------------------------------
# Generating and scoring one conditioning


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
    real_decoded: int | None,
    with_fid: bool,
) -> dict[str, Any]:
    """How many samples each figure rests on (``report.json``'s ``samples``; ``report.md`` says
    it in words): per prompt set, prompts × images per prompt (a conditioning's CLIP score and
    attribute accuracy); for FD (CLIP) and FID, the first set's generated images against the
    real ones (FID: None when not computed); the real row's images (and how many were decoded
    from the source tars), and the store files (each one source shard) they were drawn from. A
    figure on a few dozen images is noise: the counts say how far to trust a difference."""
    first = len(sets[0].prompts) * per
    return {
        "per_prompt": per,
        "sets": {s.name: {"prompts": len(s.prompts), "images": len(s.prompts) * per} for s in sets},
        "fd_clip": {"generated": first, "real": len(real)},
        "fid": {"generated": first, "real": real_decoded}
        if with_fid and real_decoded is not None
        else None,
        "real": len(real),
        "real_images_decoded": real_decoded,
        "store_files": len(set(real.shards)),
    }


def _set_metrics(
    attributes: Sequence[dict[str, Any]] | None,
    decoder: Sequence[dict[str, Any]] | None,
    clip_emb: np.ndarray,
    text_emb: np.ndarray,
    per: int = 1,
) -> dict[str, Any]:
    """A prompt set's figures from its rows' attribute checks (final and decoder images, each
    :func:`pipeline.eval.metrics.attribute_row`, ``per`` rows a prompt: the accuracies'
    intervals resample prompts) and CLIP embeddings."""
    out: dict[str, Any] = {
        "images": len(clip_emb),
        "clip_score": metrics.clip_score(clip_emb, text_emb) if len(clip_emb) else None,
        "attributes": metrics.attribute_totals(attributes, per_prompt=per)
        if attributes is not None
        else None,
    }
    if decoder is not None:
        out["attributes_decoder"] = metrics.attribute_totals(decoder, per_prompt=per)
    return out


PRIORS = ("prior", "ar_prior")  # the conditionings with a prior
NO_PRIOR = ("caption", "text_embedding")  # those without, which a prior is compared with


def comparisons(
    scored: dict[str, Scored], sets: Sequence[PromptSet], spans: dict[str, slice], per: int
) -> list[dict[str, Any]]:
    """Each prior against each conditioning without one (DALL-E 2 section 5.1's question: does
    the prior help?), per prompt set, in colour and shape accuracy of the final images: the
    difference, prior minus the other, with its paired bootstrap interval
    (:func:`pipeline.eval.metrics.paired_difference`). The conditionings share prompts and noise
    seeds, so the pairing is exact. One dict a comparison: ``{"set", "metric", "a", "b",
    "difference", "ci", "prompts"}``, ``report.json``'s ``comparisons``."""
    pairs = [(a, b) for a in PRIORS if a in scored for b in NO_PRIOR if b in scored]
    out = []
    for prompt_set in sets:
        span = spans[prompt_set.name]
        for key in ("color", "shape"):
            for a, b in pairs:
                difference = metrics.paired_difference(
                    scored[a].attribute_rows(span), scored[b].attribute_rows(span), per, key
                )
                out.append({"set": prompt_set.name, "metric": key, "a": a, "b": b, **difference})
    return out


def _grid(
    shown: dict[int, np.ndarray], sets: Sequence[PromptSet], spans: dict[str, slice], per: int
) -> bytes:
    """One row per prompt (its samples) under the prompt, from the rows a grid shows; small
    images are enlarged (nearest) so that a row is at least :data:`GRID_WIDTH` pixels wide and its
    caption readable."""
    side = next(iter(shown.values())).shape[0]
    scale = max(1, math.ceil(GRID_WIDTH / (per * side)))
    rows, captions = [], []
    for prompt_set in sets:
        first = spans[prompt_set.name].start
        for i, prompt in enumerate(prompt_set.prompts):
            wanted = range(first + i * per, first + (i + 1) * per)
            if wanted[0] not in shown:
                break
            images = [shown[r] for r in wanted]
            if scale > 1:
                images = [image.repeat(scale, axis=0).repeat(scale, axis=1) for image in images]
            rows.append(images)
            captions.append(("held-out: " if prompt_set.name == HELDOUT else "") + prompt)
    return pictures.captioned_grid(rows, captions)


@dataclass
class Scored:
    """What the actors returned for one conditioning (rows in row order), or for the real
    images (positions in the draw)."""

    text_emb: np.ndarray
    clip_emb: np.ndarray
    inception: dict[int, np.ndarray] = field(default_factory=dict)
    attributes: dict[int, dict[str, Any]] = field(default_factory=dict)
    decoder: dict[int, dict[str, Any]] = field(default_factory=dict)
    shown: dict[int, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def attribute_rows(self, span: slice, decoder: bool = False) -> list[dict[str, Any]]:
        source = self.decoder if decoder else self.attributes
        return [source[r] for r in range(span.start, span.stop)]

    def features(self, span: slice) -> np.ndarray | None:
        rows = range(span.start, span.stop)
        if not all(r in self.inception for r in rows):
            return None
        return np.stack([self.inception[r] for r in rows])


def collect(
    tables: Any, names: Sequence[str], rows: int, real: int, dim: int
) -> tuple[dict[str, Scored], Scored, str]:
    """The actors' rows (:data:`pipeline.eval.workers.COLUMNS`), by conditioning and for the real
    images, and the device they ran on."""
    from PIL import Image

    gen = {
        n: Scored(np.zeros((rows, dim), np.float32), np.zeros((rows, dim), np.float32))
        for n in names
    }
    reals = Scored(np.zeros((0, dim), np.float32), np.zeros((0, dim), np.float32))
    device = "cpu"
    total = rows * len(names) + real
    progress = Progress("eval", total, "images")
    progress.update(0, "starting the actors")
    done = 0
    for table in tables:
        for row in table.to_pylist():
            done += 1
            device = row["device"]
            scored = gen[row["conditioning"]] if row["kind"] == "gen" else reals
            r = int(row["row"])
            if row["kind"] == "gen":
                scored.text_emb[r] = floats(row["text_emb"], dim)[0]
                scored.clip_emb[r] = floats(row["clip_emb"], dim)[0]
                scored.decoder[r] = json.loads(row["attributes_decoder"])
                if row["png"]:
                    scored.shown[r] = np.asarray(Image.open(io.BytesIO(row["png"])).convert("RGB"))
            scored.attributes[r] = json.loads(row["attributes"])
            if row["inception"]:
                scored.inception[r] = floats(row["inception"], metrics.INCEPTION_FEATURE_DIM)[0]
            for key in ("generate_s", "clip_s", "inception_s"):
                scored.seconds[key] = scored.seconds.get(key, 0.0) + float(row[key])
        progress.update(done, f"{len(names)} conditionings, {real} real")
    return gen, reals, device


def run_eval(cfg: EvalConfig, storage: Storage | None = None) -> dict[str, Any]:
    """``unclip eval``: generate with every conditioning of ``cfg.selected()``, score, and write
    the report (module docstring). Returns the paths written and the headline numbers:
    ``{"output", "report", "markdown", "plot", "grids": {conditioning: url}, "metrics":
    {conditioning: {"clip_score", "fd_clip", "fid", "shape", "heldout_shape"}}, "notes"}``."""
    storage = storage or Storage(cfg.storage)
    began = time.perf_counter()
    notes: list[str] = []
    plan, ar_prior = _plan(cfg, storage)
    store, manifest = _store(cfg, storage, plan)
    weights = inception_url(cfg, storage, notes)
    timings: dict[str, Any] = {"plan": time.perf_counter() - began}

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
    shards_url = cfg.url(cfg.shards) if cfg.shards else manifest.get("source")
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
    first_rows = spans[TRAIN]
    shown = {
        spans[s.name].start + i
        for s in sets
        for i in range(min(cfg.grid_prompts, len(s.prompts)) * per)
    }
    tars = None
    if shards_url:
        try:
            tars = list_shards(storage, shards_url).locator()
        except UserFacingError as exc:
            log.warning("no real images: %s", exc)

    # The work: every conditioning's rows in cascade calls, and the real images by shard
    names = cfg.selected()
    items = [
        Item(
            "gen",
            name,
            rows=list(range(start, min(start + cfg.batch_size, len(row_prompts)))),
            prompts=row_prompts[start : start + cfg.batch_size],
        )
        for name in names
        for start in range(0, len(row_prompts), cfg.batch_size)
    ]
    for item in items:
        item.inception = [weights is not None and r < first_rows.stop for r in item.rows]
        item.grid = [r in shown for r in item.rows]
    if tars is not None:
        items += real_items(real)
    eval_plan = EvalPlan(cfg, plan, ar_prior, weights, store.url, tars)
    connect(cfg.ray)
    gpus = actor_gpus(cfg)
    check_cluster_fits("eval", "evaluation actors", actor_pool(cfg, gpus))
    log.info(
        "eval: %d conditionings × %d rows and %d real images with %d actor(s) (%g GPU each)",
        len(names),
        len(row_prompts),
        len(real) if tars is not None else 0,
        cfg.concurrency,
        gpus,
    )
    timings["prompts_and_real_images"] = time.perf_counter() - started
    started = time.perf_counter()
    dim = int(manifest["embed_dim"])
    gen, reals, device = collect(
        run_items(eval_plan, items, storage, gpus), names, len(row_prompts), len(real), dim
    )
    timings["generate_and_score"] = time.perf_counter() - started

    real_decoded = len(reals.attributes) if tars is not None else None
    complete = real_decoded == len(real)
    if not complete:
        notes.append(
            f"the real images are not all in the source shards ({shards_url}; config key: "
            "shards): no FID and no attribute accuracy of real images"
        )
    real_features = reals.features(slice(0, len(real))) if complete and weights else None
    real_entry = {
        "label": "real images (reference)",
        "images": len(real),
        "sets": {
            TRAIN: _set_metrics(
                reals.attribute_rows(slice(0, len(real))) if complete else None,
                None,
                real.image_emb,
                real.text_emb,
            )
        },
    }
    samples = sample_counts(
        sets, per, real, real_decoded if complete else None, real_features is not None
    )
    generated = samples["sets"][TRAIN]["images"]
    if generated <= real.image_emb.shape[1]:
        notes.append(
            f"FD (CLIP) rests on {generated} generated images, no more than the embedding's "
            f"{real.image_emb.shape[1]} dimensions: its covariance is rank-deficient and the "
            "figure is biased upwards; compare conditionings with each other (raise num_prompts "
            "or samples_per_prompt for a steadier one)"
        )

    # Each conditioning
    output = cfg.url(cfg.output)
    entries: dict[str, dict[str, Any]] = {}
    grid_urls: dict[str, str] = {}
    timings["conditionings"] = {}
    kinds = {"prior": plan.prior, "ar_prior": ar_prior}
    for name in names:
        scored = gen[name]
        started = time.perf_counter()
        checkpoint = kinds.get(name)
        kind = str(checkpoint.cfg.model.kind) if checkpoint is not None else None
        entry = {
            "label": _label(name, kind),
            "checkpoint": checkpoint.describe() if checkpoint is not None else None,
            "prior_kind": kind,
            "fd_clip": _frechet(scored.clip_emb[first_rows], real.image_emb),
            "fid": _frechet(scored.features(first_rows), real_features),
            "sets": {
                s.name: _set_metrics(
                    scored.attribute_rows(spans[s.name]),
                    scored.attribute_rows(spans[s.name], decoder=True),
                    scored.clip_emb[spans[s.name]],
                    scored.text_emb[spans[s.name]],
                    per,
                )
                for s in sets
            },
            "grid": f"grid_{name}.png",
        }
        grid_urls[name] = join(output, entry["grid"])
        storage.write_bytes(grid_urls[name], _grid(scored.shown, sets, spans, per))
        entries[name] = entry
        timings["conditionings"][name] = {
            **scored.seconds,
            "metrics": time.perf_counter() - started,
        }

    # The report
    checkpoints = plan.describe()
    if ar_prior is not None:
        checkpoints["ar_prior"] = ar_prior.describe()
    timings["total"] = time.perf_counter() - began
    report = json_safe(
        {
            "command": "eval",
            "config": configlib.to_dict(cfg),
            "checkpoints": checkpoints,
            "device": device,
            "resolutions": plan.resolutions,
            "prompts": {s.name: s.prompts for s in sets},
            "prompt_sources": {s.name: s.source for s in sets},
            "real": {**real_entry, "keys": real.keys, "shards": shards_url},
            "samples": samples,
            "order": list(entries),
            "conditionings": entries,
            "comparisons": comparisons(gen, sets, spans, per),
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
