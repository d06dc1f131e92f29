"""The evaluation's work on the cluster: Ray Data actors that each hold the whole cascade (every
prior compared, the CLIP, Inception when FID is asked for) generate and score the rows, so the
driver holds per-row numbers only (embeddings, Inception features, attribute checks), never the
images, whatever ``num_real`` and the prompt count are, and ``concurrency`` actors (one per GPU)
share the work.

The work is a list of :class:`Item` (one cascade call, or one source shard's real images):

* ``gen``: up to ``batch_size`` rows of one conditioning. Row ``r`` draws all of its random numbers
  from its own generator seeded by :func:`pipeline.generate.batch.row_seed` (``seed``, ``r``), the
  same for every conditioning, so the conditionings are compared on the same noise and a row's
  image does not depend on which actor made it. The actor encodes the prompts with the cascade's
  CLIP, generates, and returns per row the text and image CLIP embeddings, the Inception features
  of the final image (rows of the first prompt set only: what FID compares), the attribute checks
  of the final and the decoder's image (:func:`pipeline.eval.metrics.attribute_row`), and the
  final image as a PNG for the rows a grid shows.
* ``real``: the drawn real images of one source shard, read from its tar beside the store file
  (:func:`pipeline.embed.store.iter_shard_with_embeddings`) at the final resolution; per image its
  Inception features and attribute check. A key not found there returns no row, and the driver
  reports the real images incomplete.

Every returned row has the same columns (:data:`COLUMNS`; arrays as float32 bytes), so Ray Data
moves them as Arrow tables.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline.cascade_config import EvalConfig
from pipeline.data.shard_set import TarLocator
from pipeline.embed.store import EmbeddingStore
from pipeline.generate.cascade import CascadePlan, StageCheckpoint
from pipeline.storage import Storage, basename, is_local

MAX_BLOCKS = 4096  # Ray Data blocks of items: enough to spread, few enough to schedule cheaply
COLUMNS = (
    "kind",  # "gen" or "real"
    "conditioning",  # the gen row's conditioning; "" for real rows
    "row",  # gen: the row (prompt × sample); real: the position in the draw
    "text_emb",  # gen: float32 bytes of the prompt's CLIP text embedding
    "clip_emb",  # gen: float32 bytes of the final image's CLIP image embedding
    "inception",  # float32 bytes of the Inception pool features, or b"" when not computed
    "attributes",  # JSON of attribute_row on the final image
    "attributes_decoder",  # gen: JSON of attribute_row on the decoder's image
    "png",  # gen: the final image as a PNG when a grid shows it, else b""
    "device",
    "generate_s",  # the item's seconds, shared out over its rows
    "clip_s",
    "inception_s",
)


@dataclass
class Item:
    """One unit of work (see the module); the unused fields stay empty."""

    kind: str
    conditioning: str = ""
    rows: list[int] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    inception: list[bool] = field(default_factory=list)
    grid: list[bool] = field(default_factory=list)
    shard: str = ""
    keys: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EvalPlan:
    """What an actor loads: the checked cascade plan (with the first prior), the second prior's
    checkpoint, the Inception weights' URL (None: no FID), and where the real images are."""

    cfg: EvalConfig
    cascade: CascadePlan
    ar_prior: StageCheckpoint | None
    inception: str | None
    store: str
    tars: TarLocator | None


def local_file(storage: Storage, url: str, tmp: str) -> str:
    """A local path for ``url``: itself when local, else a copy in ``tmp``."""
    if is_local(url):
        return url[len("file://") :] if url.startswith("file://") else url
    path = os.path.join(tmp, basename(url))
    with open(path, "wb") as handle:
        handle.write(storage.read_bytes(url))
    return path


def _bytes(array: Any) -> bytes:
    return np.ascontiguousarray(np.asarray(array, dtype=np.float32)).tobytes()


def floats(data: bytes, width: int) -> np.ndarray:
    """Rows of float32 bytes back to an (N, width) array."""
    return np.frombuffer(data, dtype=np.float32).reshape(-1, width)


class EvalWorker:
    """The evaluation actor (see the module): loads the models once, then takes one
    :class:`Item` per call."""

    def __init__(self, plan: EvalPlan, storage: Storage, threads: int | None = None) -> None:
        import torch

        from pipeline.eval import metrics
        from pipeline.generate.cascade import load_cascade, load_stage_model

        if threads:
            torch.set_num_threads(threads)
        self.plan, self.cfg, self.storage = plan, plan.cfg, storage
        self.cascade = load_cascade(plan.cascade, storage, self.cfg.device)
        self.priors: dict[str, Any] = {"prior": self.cascade.prior}
        if plan.ar_prior is not None:
            self.priors["ar_prior"] = load_stage_model(storage, plan.ar_prior, self.cascade.device)
        self.inception = None
        if plan.inception is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = local_file(storage, plan.inception, tmp)
                self.inception = metrics.load_inception(path, self.cascade.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[Any]] = {c: [] for c in COLUMNS}
        for i in range(len(batch["kind"])):
            item = Item(**{k: _plain(batch[k][i]) for k in Item.__dataclass_fields__})
            rows = self.generate(item) if item.kind == "gen" else self.real(item)
            for row in rows:
                for c in COLUMNS:
                    out[c].append(row[c])
        return {c: np.asarray(v, dtype=object) for c, v in out.items()}

    def _features(self, pixels: np.ndarray) -> np.ndarray:
        """Inception features (N, 2048) of uint8 (N, H, W, 3) images."""
        import torch

        from pipeline.eval import metrics

        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
        return metrics.inception_features(self.inception, x, self.cfg.batch_size)

    def generate(self, item: Item) -> list[dict[str, Any]]:
        import torch
        from PIL import Image

        from pipeline import pictures
        from pipeline.eval import metrics
        from pipeline.generate.batch import row_seed
        from unclip import generation

        cfg, name = self.cfg, item.conditioning
        began = time.perf_counter()
        text_emb, tokens = self.cascade.encode_text(item.prompts)
        prior = self.priors.get(name)
        checkpoint = {"prior": self.plan.cascade.prior, "ar_prior": self.plan.ar_prior}.get(name)
        ar = checkpoint is not None and str(checkpoint.cfg.model.kind) == "autoregressive"
        result = generation.generate(
            text_emb,
            tokens,
            decoder=self.cascade.decoder,
            prior=prior,
            upsamplers=self.cascade.upsamplers,
            conditioning="prior" if name in ("prior", "ar_prior") else name,
            prior_guidance=cfg.prior_guidance,
            prior_steps=cfg.prior_steps,
            num_candidates=cfg.num_candidates,
            temperature=cfg.temperature if ar else None,
            decoder_guidance=cfg.decoder_guidance,
            decoder_steps=cfg.decoder_steps,
            upsampler_steps=cfg.upsampler_steps,
            generator=[torch.Generator().manual_seed(row_seed(cfg.seed, r)) for r in item.rows],
        )
        final = pictures.to_uint8(result.final)
        low = pictures.to_uint8(result.images[0])
        generated = time.perf_counter()
        clip_emb = self.cascade.encode_images([Image.fromarray(p) for p in final]).cpu().numpy()
        encoded = time.perf_counter()
        wanted = [i for i, want in enumerate(item.inception) if want]
        features: dict[int, np.ndarray] = {}
        if self.inception is not None and wanted:
            features = dict(zip(wanted, self._features(final[wanted]), strict=True))
        scored = time.perf_counter()
        n = len(item.rows)
        return [
            {
                "kind": "gen",
                "conditioning": name,
                "row": int(r),
                "text_emb": _bytes(text_emb[i].cpu().numpy()),
                "clip_emb": _bytes(clip_emb[i]),
                "inception": _bytes(features[i]) if i in features else b"",
                "attributes": _json(metrics.attribute_row(final[i], item.prompts[i])),
                "attributes_decoder": _json(metrics.attribute_row(low[i], item.prompts[i])),
                "png": pictures.png_bytes(final[i]) if item.grid[i] else b"",
                "device": str(self.cascade.device),
                "generate_s": (generated - began) / n,
                "clip_s": (encoded - generated) / n,
                "inception_s": (scored - encoded) / n,
            }
            for i, r in enumerate(item.rows)
        ]

    def real(self, item: Item) -> list[dict[str, Any]]:
        from pipeline.embed.store import decode_image, iter_shard_with_embeddings
        from pipeline.eval import metrics

        began = time.perf_counter()
        side = self.plan.cascade.resolutions[-1]
        wanted = dict(zip(item.keys, item.rows, strict=True))
        found: list[tuple[int, np.ndarray]] = []
        store = EmbeddingStore(self.storage, self.plan.store)
        for sample in iter_shard_with_embeddings(
            self.storage, self.plan.tars, store, item.shard, columns=()
        ):
            if sample["key"] in wanted:
                where = f"{sample['key']} of shard {item.shard}"
                found.append(
                    (wanted[sample["key"]], decode_image(sample["image_bytes"], side, where))
                )
        read = time.perf_counter()
        pixels = np.stack([p for _, p in found]) if found else None
        features = (
            self._features(pixels) if self.inception is not None and pixels is not None else None
        )
        scored = time.perf_counter()
        captions = dict(zip(item.rows, item.prompts, strict=True))
        n = max(1, len(found))
        return [
            {
                "kind": "real",
                "conditioning": "",
                "row": int(pos),
                "text_emb": b"",
                "clip_emb": b"",
                "inception": _bytes(features[i]) if features is not None else b"",
                "attributes": _json(metrics.attribute_row(image, captions[pos])),
                "attributes_decoder": "",
                "png": b"",
                "device": str(self.cascade.device),
                "generate_s": (read - began) / n,
                "clip_s": 0.0,
                "inception_s": (scored - read) / n,
            }
            for i, (pos, image) in enumerate(found)
        ]


def run_items(plan: EvalPlan, items: list[Item], storage: Storage, gpus: float) -> Iterator[Any]:
    """The rows of every item (pyarrow tables of :data:`COLUMNS`, in no particular order) from
    ``cfg.concurrency`` :class:`EvalWorker` actors, one item per call; raises
    :class:`~pipeline.cluster.watchdog.PipelineStalled` when nothing arrives for
    ``cfg.stall_timeout_s``."""
    import ray

    from pipeline.cluster.watchdog import iter_until_stalled

    cfg = plan.cfg
    rows = ray.data.from_items(
        [item.to_dict() for item in items], override_num_blocks=min(len(items), MAX_BLOCKS)
    ).map_batches(
        EvalWorker,
        fn_constructor_kwargs={"plan": plan, "storage": storage, "threads": cfg.threads_per_actor},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
        num_gpus=gpus,
        num_cpus=cfg.cpus_per_actor,
    )

    def stalled(seconds: float) -> str:
        return (
            f"eval stalled: nothing generated or scored for {seconds:.0f} s (config key: "
            "stall_timeout_s). After a lost node, the evaluation actors (concurrency × "
            "cpus_per_actor, gpus_per_actor) may not fit on the nodes left; rerun the eval."
        )

    stream = rows.iter_batches(batch_size=None, batch_format="pyarrow")
    yield from iter_until_stalled(stream, cfg.stall_timeout_s, stalled)


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True)


def _plain(value: Any) -> Any:
    """A value of a Ray Data numpy batch back to plain Python (lists for arrays)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value
