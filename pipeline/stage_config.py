"""One typed config per stage, and the sections they share.

Every stage works under one storage ``root`` (a local path or ``s3://bucket/prefix``); its inputs and
outputs are paths relative to that root unless given as absolute URLs, so changing ``root`` moves a
whole pipeline and every stage still finds the others' outputs::

    <root>/shards/                 webdataset shards (img2dataset layout)
    <root>/embeddings/<clip-id>/   the embedding store
    <root>/checkpoints/<run>/      one folder per stage run: config, checkpoints, metrics
    <root>/samples/, <root>/eval/  generated images and reports

The YAML files in ``configs/<stage>/`` set these fields; ``pipeline.config.load`` reads and checks them.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

from pipeline.storage import StorageOptions, resolve
from unclip.config import DecoderNetConfig, DiffusionConfig, PriorNetConfig, UpsamplerNetConfig
from unclip.fields import param, require

Precision = Literal["auto", "fp32", "bf16", "fp16"]


# ----------------------------------------------------------------------------------------------
# Names and folders that are joined into URLs


def _control_character(value: str) -> str | None:
    return next((ch for ch in value if unicodedata.category(ch) == "Cc"), None)


def name_problem(value: str) -> str | None:
    """Why ``value`` is not one plain folder name (None when it is). A name is joined into a URL
    as one path segment (``<root>/checkpoints/<run>``), so it must not name another folder
    (``.``, ``..``, a ``/`` or ``\\`` separator), be hidden (storage listings skip names starting
    with ``.``, so a checkpoint or store there would never be found), or hold control characters."""
    if not value.strip():
        return "it is empty or blank"
    if value in (".", ".."):
        return f"{value!r} names {'this folder' if value == '.' else 'the folder above'}"
    if "/" in value:
        return "'/' separates folders"
    if "\\" in value:
        return "a backslash separates folders on Windows"
    if value.startswith("."):
        return "a name starting with '.' is hidden: storage listings skip it"
    control = _control_character(value)
    if control is not None:
        return f"it contains the control character {control!r}"
    return None


def require_name(value: str, key: str, where: str) -> None:
    """Refuse ``value`` for ``key`` unless it is one plain folder name (:func:`name_problem`);
    ``where`` says which folder it is made under, for the message."""
    problem = name_problem(value)
    require(
        problem is None,
        key,
        f"must be a plain folder name under {where}, got {value!r}: {problem}",
    )


def folder_problem(value: str) -> str | None:
    """Why ``value`` is not a usable output folder (None when it is): a path under the root, or an
    absolute path or URL, without ``.`` or ``..`` segments (local disk would leave the folder
    meant, S3 would make keys literally named ``..``), ``\\`` or control characters."""
    if not value.strip():
        return "it is empty or blank"
    path = value.split("://", 1)[1] if "://" in value else value
    for segment in path.split("/"):
        if segment in (".", ".."):
            return f"it has a {segment!r} segment"
    if "\\" in value:
        return "it has a backslash: separate folders with '/'"
    control = _control_character(value)
    if control is not None:
        return f"it contains the control character {control!r}"
    return None


def require_folder(value: str, key: str) -> None:
    """Refuse ``value`` for ``key`` unless it is a usable output folder (:func:`folder_problem`)."""
    problem = folder_problem(value)
    require(
        problem is None,
        key,
        f"must be a folder under root (or an absolute path or URL), got {value!r}: {problem}",
    )


# ----------------------------------------------------------------------------------------------
# Shared sections


@dataclass
class RayOptions:
    """Which Ray cluster to use."""

    address: str | None = param(
        None,
        "Ray address: null joins RAY_ADDRESS when set (a submitted job has it), else starts a "
        "private local Ray; 'local' always starts one, even with RAY_ADDRESS set; 'auto' (the Ray "
        "that `ray start` runs on this machine), host:port or ray://host:10001 joins a cluster",
    )
    num_cpus: int | None = param(None, "CPUs of a local Ray (null: all of this machine's)", ge=1)


@dataclass
class ClipSource:
    """Which open_clip model encodes images and captions."""

    model: str = param("ViT-B-32", "open_clip model name (open_clip.list_models())")
    pretrained: str | None = param(
        None,
        "open_clip pretrained tag (e.g. laion2b_s34b_b79k) or a checkpoint path/URL; "
        "null: random weights (tests only)",
    )
    model_config: str | None = param(
        None, "JSON model config registering a custom model name (e.g. configs/clip/tiny-clip.json)"
    )


@dataclass
class ScalingOptions:
    """How many Ray Train workers, with what resources (Ray Train's ScalingConfig)."""

    num_workers: int | str = param(
        1,
        "training workers (one per GPU on a GPU cluster), or a range min..max for elastic "
        "training: it starts with what the cluster has, goes on with fewer when a node is lost "
        "and grows when one joins (each change restarts from the latest checkpoint)",
        ge=1,
    )
    use_gpu: bool = param(False, "give each worker a GPU")
    cpus_per_worker: float = param(
        1.0, "CPUs reserved per worker (leave some for Ray Data's reading on small machines)", gt=0
    )
    strategy: Literal["ddp", "fsdp"] = param(
        "ddp", "data parallelism: DDP, or FSDP to shard a large decoder's weights and optimizer"
    )
    resources_per_worker: dict[str, float] = param(
        factory=dict, doc="extra custom resources per worker, e.g. {accelerator_type:H100: 0.01}"
    )
    resize_interval_s: float = param(
        60.0,
        "elastic runs: seconds between looks for more workers than it runs with "
        "(Ray Train's elastic_resize_monitor_interval_s)",
        gt=0,
    )

    @property
    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers: both ``num_workers`` unless it is a ``min..max`` range."""
        if isinstance(self.num_workers, int):
            return self.num_workers, self.num_workers
        low, _, high = self.num_workers.partition("..")
        return int(low), int(high)

    @property
    def max_workers(self) -> int:
        return self.worker_range[1]

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, str)

    def validate(self) -> None:
        if isinstance(self.num_workers, str):
            require(
                re.fullmatch(r"\d+\.\.\d+", self.num_workers.strip()) is not None,
                "num_workers",
                f"expected a number or a range min..max (e.g. 2..8), got {self.num_workers!r}",
            )
            low, high = self.worker_range
            require(
                1 <= low <= high,
                "num_workers",
                f"a range min..max needs 1 <= min <= max, got {self.num_workers}",
            )


@dataclass
class OptimOptions:
    """AdamW with a linear warm-up then a decay (paper table 3 gives the per-stage values)."""

    lr: float = param(1e-4, "peak learning rate", gt=0)
    beta1: float = param(0.9, "Adam β1", ge=0, lt=1)
    beta2: float = param(0.999, "Adam β2", ge=0, lt=1)
    eps: float = param(1e-8, "Adam ε", gt=0)
    weight_decay: float = param(0.0, "decoupled weight decay", ge=0)
    warmup_steps: int = param(0, "linear warm-up steps", ge=0)
    decay: Literal["constant", "cosine", "linear"] = param("cosine", "decay after warm-up")
    min_lr_ratio: float = param(0.1, "final learning rate as a fraction of lr", ge=0, le=1)
    grad_clip: float | None = param(1.0, "clip the global gradient norm to this (null: off)", gt=0)
    grad_accum: int = param(1, "micro-batches accumulated per optimizer step", ge=1)


@dataclass
class TrainOptions:
    """Length, batch and precision of a training run."""

    steps: int = param(1000, "optimizer steps in the whole run", ge=1)
    batch_size: int = param(32, "global batch size per optimizer step, over all workers", ge=1)
    precision: Precision = param(
        "auto",
        "auto: bf16 autocast on GPU, fp32 on CPU; fp16 adds a gradient scaler (on CPU too, slowly)",
    )
    seed: int = param(0, "random seed")
    log_every: int = param(10, "steps between metric reports", ge=1)
    max_failures: int = param(3, "worker failures survived before the run fails", ge=-1)
    data_streams: int | None = param(
        None,
        "streams the global batch is drawn from, fixed for a run: it resumes exactly on any "
        "number of workers up to this (null: scaling.num_workers)",
        ge=1,
    )
    shuffle_shards: int = param(
        4, "shards a data stream reads at once, their rows interleaved at random", ge=1
    )
    shuffle_buffer: int = param(
        1000, "rows of the shuffle buffer after the interleave (raw bytes, decoded on exit)", ge=1
    )
    stop_at_step: int | None = param(
        None,
        "end this run at this step with a checkpoint; rerunning continues (for time-limited jobs)",
        ge=1,
    )

    def validate(self) -> None:
        require(self.max_failures >= -1, "max_failures", "must be -1 (unlimited) or more")


@dataclass
class EmaOptions:
    """Exponential moving average of weights, used for sampling."""

    decay: float = param(0.9999, "EMA decay per update", ge=0, lt=1)
    update_every: int = param(1, "optimizer steps between EMA updates", ge=1)
    start_step: int = param(0, "step before which the EMA just copies the weights", ge=0)


@dataclass
class CheckpointOptions:
    """When to write checkpoints and how many to keep."""

    every_steps: int = param(500, "steps between checkpoints (and one at the end)", ge=1)
    keep: int = param(3, "most recent checkpoints kept", ge=1)


# ----------------------------------------------------------------------------------------------
# Stage configs


@dataclass
class StageConfig:
    """What every stage has: the storage root, how to reach storage, and which Ray cluster."""

    root: str = param("runs/quickstart", "storage root (local path or s3://bucket/prefix)")
    storage: StorageOptions = param(factory=StorageOptions, doc="object storage access")
    ray: RayOptions = param(factory=RayOptions, doc="Ray cluster")

    def url(self, path: str) -> str:
        """``path`` resolved against ``root`` (absolute paths and URLs are kept)."""
        return resolve(self.root, path)

    def validate(self) -> None:
        require(bool(self.root.strip()), "root", "must not be empty")


@dataclass
class TrainStageConfig(StageConfig):
    """What every training stage adds: a run name, the loop, optimizer, EMA, checkpoints, workers."""

    run: str = param("run", "run name: checkpoints go to <root>/checkpoints/<run>")
    train: TrainOptions = param(factory=TrainOptions, doc="training loop")
    optim: OptimOptions = param(factory=OptimOptions, doc="optimizer and schedule")
    ema: EmaOptions = param(factory=EmaOptions, doc="weight EMA")
    checkpoint: CheckpointOptions = param(factory=CheckpointOptions, doc="checkpointing")
    scaling: ScalingOptions = param(factory=ScalingOptions, doc="Ray Train workers")

    def run_url(self) -> str:
        return self.url(f"checkpoints/{self.run}")

    def validate(self) -> None:
        super().validate()
        require_name(self.run, "run", "<root>/checkpoints/")
        most = self.scaling.max_workers
        streams = self.train.data_streams or most
        require(
            streams >= most,
            "train.data_streams",
            f"must be at least scaling.num_workers ({self.scaling.num_workers}): every worker "
            f"serves a data stream of its own, got {streams}",
        )
        require(
            not (self.scaling.strategy == "fsdp" and self.train.precision == "fp16"),
            "train.precision",
            "fp16 is not supported with scaling.strategy=fsdp: use bf16 (fp32's range, no loss "
            "scale needed) or auto",
        )
        per_step = streams * self.optim.grad_accum
        require(
            self.train.batch_size % per_step == 0,
            "train.batch_size",
            f"must be divisible by the data streams × optim.grad_accum ({streams} × "
            f"{self.optim.grad_accum}; streams: train.data_streams, else the most scaling.num_workers), "
            f"got {self.train.batch_size}",
        )


@dataclass
class SynthConfig(StageConfig):
    """``unclip synth``: the captioned-shapes dataset, written as webdataset shards."""

    output: str = param("shards", "where the shards go")
    num_samples: int = param(4000, "images in the dataset", ge=1)
    samples_per_shard: int = param(500, "images per shard", ge=1)
    image_size: int = param(256, "image side in pixels", ge=16, le=1024)
    seed: int = param(0, "the same seed gives the same bytes")
    split: Literal["train", "heldout"] = param(
        "train", "train: never the holdout pairs; heldout: every image has one of them"
    )
    holdout: list[str] = param(
        factory=lambda: ["red star", "blue triangle", "green cross"],
        doc="'colour shape' pairs kept out of the train split, to test generalisation",
    )
    max_objects: int = param(2, "objects per image (1 or 2)", ge=1, le=2)
    positions: list[str] | None = param(
        None, "object positions to draw from, e.g. [center] (null: all nine)"
    )
    sizes: list[str] | None = param(None, "object sizes to draw from: small, large (null: both)")
    two_tone_prob: float = param(0.3, "fraction of images with a two-tone background", ge=0, le=1)
    jpeg_quality: int = param(95, "JPEG quality of the stored images", ge=1, le=100)

    def holdout_pairs(self) -> frozenset[tuple[str, str]]:
        return frozenset(tuple(p.split()) for p in self.holdout)  # type: ignore[misc]

    def validate(self) -> None:
        super().validate()
        require_folder(self.output, "output")
        from pipeline.data.shapes import COLORS, POSITIONS, SHAPES, SIZES, sample_scene

        for i, pair in enumerate(self.holdout):
            words = pair.split()
            require(
                len(words) == 2 and words[0] in COLORS and words[1] in SHAPES,
                f"holdout[{i}]",
                f"expected 'colour shape' with a colour in {', '.join(COLORS)} and a shape in "
                f"{', '.join(SHAPES)}, got {pair!r}",
            )
        require(
            self.split == "train" or bool(self.holdout),
            "holdout",
            "the heldout split needs at least one pair",
        )
        for field, known in (("positions", POSITIONS), ("sizes", SIZES)):
            names = getattr(self, field)
            if names is None:
                continue
            require(bool(names), field, "at least one, or null for all")
            for i, name in enumerate(names):
                require(
                    name in known,
                    f"{field}[{i}]",
                    f"expected one of {', '.join(known)}, got {name!r}",
                )
        if self.max_objects == 2 and self.positions is not None:
            try:
                sample_scene(self.seed, 0, max_objects=2, positions=self.positions)
            except ValueError as e:
                require(False, "positions", str(e))


@dataclass
class IngestConfig(StageConfig):
    """``unclip ingest``: download an image-text URL list into webdataset shards with img2dataset."""

    input: str = param(
        "urls.parquet", "URL list: a csv, tsv, parquet, txt or jsonl file, or a folder"
    )
    input_format: Literal["auto", "csv", "tsv", "tsv.gz", "parquet", "txt", "json", "jsonl"] = (
        param("auto", "format of the URL list (auto: from the file extension)")
    )
    url_col: str = param("url", "column with the image URL")
    caption_col: str | None = param("caption", "column with the caption (null: none)")
    output: str = param("shards", "where the shards go")
    image_size: int = param(256, "images are resized to this side", ge=8)
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = param(
        "center_crop", "img2dataset resize mode"
    )
    encode_format: Literal["jpg", "png", "webp"] = param("jpg", "stored image format")
    encode_quality: int = param(95, "JPEG/WebP quality (PNG: compression level 0-9)", ge=0, le=100)
    samples_per_shard: int = param(10000, "URLs per shard", ge=1)
    processes: int = param(1, "download processes per node", ge=1)
    threads: int = param(64, "download threads per process", ge=1)
    timeout_s: float = param(10.0, "seconds before a download is abandoned", gt=0)
    retries: int = param(0, "immediate retries of a failed download", ge=0)
    distributor: Literal["auto", "multiprocessing", "ray"] = param(
        "auto", "auto: ray when running on a Ray cluster, multiprocessing on one machine"
    )
    retry_failed: bool = param(
        False,
        "instead of the URL list, retry the samples that failed with a transient error",
    )

    def validate(self) -> None:
        super().validate()
        require_folder(self.output, "output")


@dataclass
class EmbedConfig(StageConfig):
    """``unclip embed``: open_clip image and text embeddings of webdataset shards into the store."""

    shards: str = param("shards", "webdataset shards to encode (folder, glob or brace pattern)")
    store: str = param("embeddings", "embedding store root; the store is <store>/<clip-id>")
    clip_id: str | None = param(
        None, "the store's folder name under <store> (null: derived from the CLIP's identity)"
    )
    clip: ClipSource = param(factory=ClipSource, doc="the CLIP to encode with")
    batch_size: int = param(64, "samples per encoder call", ge=1)
    concurrency: int = param(1, "encoder actors", ge=1)
    readers_per_encoder: int = param(
        2,
        "shard tasks running per encoder actor (1 CPU each): each reads, decodes and batches "
        "one source shard for its encoder and writes the shard's store file",
        ge=1,
    )
    gpus_per_actor: float = param(0.0, "GPUs per encoder actor (0: CPU)", ge=0)
    cpus_per_actor: float = param(1.0, "CPUs reserved per encoder actor", gt=0)
    threads_per_actor: int | None = param(
        None, "torch threads per encoder actor (null: Ray's default, one per reserved CPU)", ge=1
    )
    precision: Precision = param("auto", "auto: fp16 on GPU, fp32 on CPU")
    stall_timeout_s: float | None = param(
        1800.0,
        "fail when no encoded rows arrive for this long, e.g. after a node loss stalls the actor "
        "pool; complete shards are kept and a rerun resumes (null: wait forever)",
        gt=0,
    )
    import_clip_retrieval: str | None = param(
        None,
        "instead of encoding, import a clip-retrieval output folder (img_emb/, text_emb/, metadata/)",
    )

    def validate(self) -> None:
        super().validate()
        require_folder(self.store, "store")
        if self.clip_id is not None:
            require_name(self.clip_id, "clip_id", "<store>/")


@dataclass
class TrainClipConfig(TrainStageConfig):
    """``unclip train-clip``: contrastive training of an open_clip model on the shards."""

    run: str = param("clip", "run name: checkpoints go to <root>/checkpoints/<run>")
    shards: str = param("shards", "webdataset shards to train on (folder, glob or brace pattern)")
    clip: ClipSource = param(factory=ClipSource, doc="the open_clip model to train (or fine-tune)")


@dataclass
class PriorConfig(TrainStageConfig):
    """``unclip train-prior``: text embedding and caption → CLIP image embedding (section 2.2)."""

    run: str = param("prior", "run name: checkpoints go to <root>/checkpoints/<run>")
    store: str = param("embeddings", "embedding store root")
    clip_id: str | None = param(None, "which store under <store>/ (null: the only one)")
    model: PriorNetConfig = param(factory=PriorNetConfig, doc="prior network")
    diffusion: DiffusionConfig = param(
        factory=lambda: DiffusionConfig(objective="x0", thresholding="none"),
        doc="diffusion process (the paper's prior predicts x₀)",
    )

    def validate(self) -> None:
        super().validate()
        if self.clip_id is not None:
            require_name(self.clip_id, "clip_id", "<store>/")


@dataclass
class DecoderConfig(TrainStageConfig):
    """``unclip train-decoder``: CLIP image embedding (and caption) → 64px image (section 2.1)."""

    run: str = param("decoder", "run name: checkpoints go to <root>/checkpoints/<run>")
    shards: str = param(
        "shards", "webdataset shards with the images (folder, glob or brace pattern)"
    )
    store: str = param("embeddings", "embedding store root")
    clip_id: str | None = param(None, "which store under <store>/ (null: the only one)")
    model: DecoderNetConfig = param(factory=DecoderNetConfig, doc="decoder UNet")
    diffusion: DiffusionConfig = param(factory=DiffusionConfig, doc="diffusion process")
    sample_grid: int = param(16, "samples in the grid written at each checkpoint (0: none)", ge=0)

    def validate(self) -> None:
        super().validate()
        if self.clip_id is not None:
            require_name(self.clip_id, "clip_id", "<store>/")


@dataclass
class UpsamplerConfig(TrainStageConfig):
    """``unclip train-upsampler``: 64→256 or 256→1024 super-resolution (section 2.1)."""

    run: str = param("upsampler", "run name: checkpoints go to <root>/checkpoints/<run>")
    shards: str = param(
        "shards", "webdataset shards with the images (folder, glob or brace pattern)"
    )
    model: UpsamplerNetConfig = param(factory=UpsamplerNetConfig, doc="upsampler UNet")
    diffusion: DiffusionConfig = param(factory=DiffusionConfig, doc="diffusion process")
    sample_grid: int = param(8, "samples in the grid written at each checkpoint (0: none)", ge=0)
