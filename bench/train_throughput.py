"""Stage-training throughput through the Ray Train driver against a bare PyTorch loop, per stage.

For each stage (prior, decoder, upsampler, clip) and size (``tiny``: ``configs/<stage>/tiny.yaml``;
``small``: the overrides in ``SMALL`` below, a model a few times larger), on this machine:

  1. the bare loop: the model from ``STAGES[stage].build``, the same global batch, its batches
     read once from the stage's own Ray Dataset, collated and held in memory (cycled), then
     ``LossOf`` + backward + gradient clipping + AdamW with its schedule + EMA (the worker loop's
     math, imported from ``pipeline.train.loop``), single process, with the torch thread count a
     Ray Train worker gets (probed in a worker, see below). No per-step host syncs, no logging.
     Timed: ``--steps`` steps after a warm-up of ``--warmup`` steps. Run before and after the
     driver (the mean is reported, both are printed: the machine may be shared).
  2. the driver: ``pipeline.train.driver.run_training`` (Ray Train ``TorchTrainer``, Ray Data ingest
     from the Ray Dataset it caches, collate per step) with one worker, warm-up + ``--steps``
     steps, metrics every ``log_every`` steps (the config's, or ``--log-every``; the warm-up is
     ``log_every`` steps unless ``--warmup`` names a multiple of it) and one checkpoint, at the end.
     Timed: from the metrics at the end of the warm-up to those at the last step, by the
     wall-clock times of the run's own TensorBoard scalars (written by rank 0 at each log step,
     before that step's checkpoint): so the figure holds the data ingest, collate, per-step syncs,
     the loss all-reduce, printing and TensorBoard writes of each log step, and excludes start-up,
     warm-up and checkpointing. The run's own ``samples_per_s`` metric (an EMA of per-step times,
     leaving out what the loop does after a step: logging, checkpoints, reports) is shown beside.
     Each stage's data are ``--n`` synthetic samples: enough for several batches per epoch, as
     each epoch restarts the Ray Data iterator (tens of ms, not overlapped with compute).
Peak resident memory is sampled (every 0.2 s) over this process and all its descendants (Ray's
processes) during the driver run, and for this process alone during the bare loop; the Ray Train
worker's own peak is shown apart. FLOPs per sample come from ``torch.utils.flop_counter``
(matmuls, convolutions, attention) on one forward + backward of the bare model; on CUDA the MFU is
samples/s × FLOPs/sample ÷ ``--peak-tflops`` (default: H100 SXM bf16 dense, 989).

    .venv/bin/python bench/train_throughput.py --stages prior --sizes tiny,small      # ~5 min
    .venv/bin/python bench/train_throughput.py --stages clip --n 1024
    .venv/bin/python bench/train_throughput.py --stages decoder,upsampler --batch-size 8 \
        --steps 20 --log-every 5 --n 512         # 2 CPU cores: the tiny UNets take ~0.4 s a step
    .venv/bin/python bench/train_throughput.py --log-every 5 --stages prior   # reports every 5
    .venv/bin/python bench/train_throughput.py --stages decoder --sizes tiny,small  # GPU: bf16, MFU
    .venv/bin/python bench/train_throughput.py --root runs/quickstart   # its shards and store

Target (issue): driver ≥ 0.9 × the bare loop on one worker.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from bench.measure import PeakMemory, flops_per_sample, mfu, sync

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
TINY_CLIP = os.path.join(CONFIGS, "clip", "tiny-clip.json")

STAGE_NAMES = {
    "prior": "train-prior",
    "decoder": "train-decoder",
    "upsampler": "train-upsampler",
    "clip": "train-clip",
}
# "small": the tiny config with these overrides (a model a few times larger, same batch size).
SMALL = {
    "prior": ["model.width=256", "model.depth=4", "model.heads=8"],
    "decoder": ["model.channels=64", "model.head_channels=64", "model.text_width=128"],
    "upsampler": ["model.channels=32"],
    "clip": [],  # plus clip.model=bench-small-clip: tiny-clip.json with widths ×2, layers ×2
}
SMALL_CLIP = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}


# ----------------------------------------------------------------------------------------------
# Data


def make_data(tmp: str, n: int, image_size: int) -> tuple[str, str]:
    """Synthetic shards + a tiny CLIP (random weights) + its embedding store under ``tmp``.
    Returns the shards folder and the store root."""
    import open_clip
    from safetensors.torch import save_file

    from pipeline.data import synth
    from pipeline.embed.job import run_embedding
    from pipeline.stage_config import ClipSource, EmbedConfig, SynthConfig
    from pipeline.storage import Storage

    root, storage = os.path.join(tmp, "data"), Storage()
    synth.generate(
        SynthConfig(
            root=root, num_samples=n, samples_per_shard=max(n // 4, 16), image_size=image_size
        ),
        storage,
    )
    open_clip.add_model_config(TINY_CLIP)
    torch.manual_seed(0)
    weights = os.path.join(tmp, "tiny-clip.safetensors")
    clip = open_clip.create_model("tiny-clip")
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, weights)
    source = ClipSource(model="tiny-clip", model_config=TINY_CLIP, pretrained=weights)
    run_embedding(EmbedConfig(root=root, clip=source, batch_size=32), storage)
    return os.path.join(root, "shards"), os.path.join(root, "embeddings")


def stage_config(
    stage: str, size: str, args: argparse.Namespace, paths: dict[str, str]
) -> tuple[Any, int]:
    """The stage's config for this bench, and its warm-up steps (a multiple of log_every)."""
    from pipeline import config as configlib
    from pipeline.train.stages import STAGES

    spec = STAGES[STAGE_NAMES[stage]]
    path = os.path.join(CONFIGS, stage, "tiny.yaml")
    log_every = args.log_every or configlib.load(spec.config_cls, path).train.log_every
    warmup = args.warmup if args.warmup is not None else log_every
    if warmup < log_every or warmup % log_every:
        raise SystemExit(f"--warmup ({warmup}) must be a multiple of log_every ({log_every})")
    overrides = [
        f"root={paths['runs']}",
        f"run=bench-{stage}-{size}",
        f"train.steps={warmup + args.steps}",
        f"train.log_every={log_every}",
        f"checkpoint.every_steps={warmup + args.steps + 1}",  # only the final checkpoint
        "checkpoint.keep=1",
        "scaling.num_workers=1",
        f"scaling.cpus_per_worker={args.cpus_per_worker}",
        f"scaling.use_gpu={str(args.device == 'cuda').lower()}",
        f"train.precision={args.precision}",
        "train.max_failures=0",
    ]
    if stage in ("prior", "decoder"):  # embeddings from the store
        overrides.append(f"store={paths['store']}")
    if stage in ("decoder", "upsampler", "clip"):  # images from the shards
        overrides.append(f"shards={paths['shards']}")
    if stage == "clip" and size == "small":
        overrides += ["clip.model=bench-small-clip", f"clip.model_config={paths['small_clip']}"]
    if size == "small":
        overrides += SMALL[stage]
    if args.batch_size:
        overrides.append(f"train.batch_size={args.batch_size}")
    return configlib.load(spec.config_cls, path, overrides), warmup


def in_memory_batches(stage: str, cfg: Any, device: str, most: int = 8) -> tuple[list, dict]:
    """Up to ``most`` collated batches of ``cfg.train.batch_size`` rows of the stage's own data."""
    from pipeline.storage import Storage
    from pipeline.train.feed import Feed
    from pipeline.train.stages import STAGES

    spec = STAGES[STAGE_NAMES[stage]]
    source, info = spec.prepare(cfg, Storage(cfg.storage))
    one = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, data_streams=1),
        optim=dataclasses.replace(cfg.optim, grad_accum=1),
    )
    feed = Feed(source, one, 0, 1, None)  # the workers' reader, as one worker
    try:
        batches = [
            {k: v.to(device) for k, v in spec.collate(part.columns, cfg).items()}
            for _ in range(most)
            for part in feed.step()
        ]
    finally:
        feed.close()
    return batches, info


# ----------------------------------------------------------------------------------------------
# The bare loop


def loss_flops_per_sample(model: torch.nn.Module, batch: dict, cfg: Any, device: str) -> float:
    """Model FLOPs of one forward + backward of the training loss, per sample."""
    from pipeline.train.loop import LossOf, autocast

    def forward_backward() -> None:
        with autocast(cfg, torch.device(device)):
            loss = LossOf(model)(batch, torch.Generator().manual_seed(0))
        loss.float().backward()

    return flops_per_sample(model, forward_backward, len(next(iter(batch.values()))))


def bare_loop(
    stage: str, cfg: Any, info: dict, batches: list, warmup: int, args: argparse.Namespace
) -> dict[str, float]:
    """samples/s of the worker loop's math alone over in-memory batches, one process."""
    from pipeline.train.loop import LossOf, autocast, lr_factor, make_optimizer, step_seed
    from pipeline.train.stages import STAGES
    from unclip.ema import EMA

    spec, device = STAGES[STAGE_NAMES[stage]], torch.device(args.device)
    torch.manual_seed(cfg.train.seed)
    model = spec.build(cfg, info).to(device)
    flops = loss_flops_per_sample(model, batches[0], cfg, args.device)
    ema = EMA(
        model, cfg.ema.decay, update_every=cfg.ema.update_every, start_step=cfg.ema.start_step
    )
    optimizer = make_optimizer(model, cfg)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    wrapped = LossOf(model)
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else float("inf")
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = 0.0
    for step in range(warmup + args.steps):
        if step == warmup:
            sync(args.device)
            started = time.perf_counter()
        batch = batches[step % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        seed = step_seed(cfg.train.seed, step, 0, 0)
        torch.manual_seed(seed)
        with autocast(cfg, device):
            loss = wrapped(batch, torch.Generator().manual_seed(seed))
        loss.float().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        schedule.step()
        ema.update(model, step + 1)
    sync(args.device)
    elapsed = time.perf_counter() - started
    return {
        "samples_per_s": args.steps * cfg.train.batch_size / elapsed,
        "params": sum(p.numel() for p in model.parameters()),
        "flops_per_sample": flops,
        "gpu_peak": torch.cuda.max_memory_allocated() if args.device == "cuda" else 0,
    }


# ----------------------------------------------------------------------------------------------
# The driver


def read_scalars(folder: str) -> dict[str, list[tuple[int, float, float]]]:
    """{tag: [(step, wall_time, value)]} from TensorBoard event files (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float, float]]] = {}
    for name in sorted(os.listdir(folder)):
        if "tfevents" not in name:
            continue
        with open(os.path.join(folder, name), "rb") as f:
            while header := f.read(12):  # length (u64) + its crc (u32)
                (length,) = struct.unpack("<Q", header[:8])
                data = f.read(length)
                f.read(4)  # the data's crc
                event = event_pb2.Event()
                event.ParseFromString(data)
                for value in event.summary.value:
                    out.setdefault(value.tag, []).append(
                        (event.step, event.wall_time, value.simple_value)
                    )
    return out


def driver_run(stage: str, cfg: Any, warmup: int, args: argparse.Namespace) -> dict[str, float]:
    from pipeline.storage import Storage, join
    from pipeline.train.driver import run_training

    storage = Storage(cfg.storage)
    with PeakMemory(tree=True, worker="RayTrainWorker") as memory:
        started = time.perf_counter()
        summary = run_training(STAGE_NAMES[stage], cfg, storage)
        total = time.perf_counter() - started
    end = warmup + args.steps
    assert summary["step"] == end, summary
    _, tb_path = storage.filesystem(join(cfg.run_url(), "tensorboard"))
    scalars = read_scalars(tb_path)
    times = {step: wall for step, wall, _ in scalars["train/step"]}
    if end not in times or warmup not in times:
        raise RuntimeError(f"the run's TensorBoard scalars lack step {warmup} or {end}: {times}")
    reported = {step: value for step, _, value in scalars["train/samples_per_s"]}
    return {
        "samples_per_s": args.steps * cfg.train.batch_size / (times[end] - times[warmup]),
        "reported_samples_per_s": reported[end],
        "wall_s": total,
        "peak": memory.peak,
        "worker_peak": memory.worker_peak,
    }


def worker_threads(args: argparse.Namespace, runs: str) -> dict[str, Any]:
    """What a Ray Train worker with ``--cpus-per-worker`` CPUs sees: torch threads, OMP env."""
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def probe(_: dict) -> None:
        metrics = {
            "torch_threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "omp": os.environ.get("OMP_NUM_THREADS", "unset"),
        }
        with tempfile.TemporaryDirectory() as folder:  # Ray Train V2 keeps metrics with checkpoints
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    resources = {"CPU": args.cpus_per_worker}
    if args.device == "cuda":
        resources["GPU"] = 1
    result = TorchTrainer(
        probe,
        scaling_config=ScalingConfig(
            num_workers=1, use_gpu=args.device == "cuda", resources_per_worker=resources
        ),
        run_config=RunConfig(name="thread-probe", storage_path=runs),
    ).fit()
    return dict(result.metrics)


# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stages", default="prior,decoder,upsampler,clip")
    parser.add_argument("--sizes", default="tiny", help="tiny, small or tiny,small")
    parser.add_argument("--steps", type=int, default=50, help="timed steps")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps (default: log_every, its multiple)"
    )
    parser.add_argument(
        "--log-every", type=int, default=None, help="steps between reports (default: the config's)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default: the tiny config's")
    parser.add_argument("--n", type=int, default=1024, help="synthetic samples")
    parser.add_argument("--image-size", type=int, default=256, help="synthetic image side")
    parser.add_argument("--root", default=None, help="use this root's shards/ and embeddings/")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument(
        "--threads", type=int, default=None, help="bare-loop torch threads (default: a worker's)"
    )
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--peak-tflops", type=float, default=None, help="CUDA default: 989")
    parser.add_argument("--verbose", action="store_true", help="show the workers' output")
    args = parser.parse_args()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if not set(stages) <= set(STAGE_NAMES) or not set(sizes) <= {"tiny", "small"}:
        parser.error(f"stages from {sorted(STAGE_NAMES)}, sizes from tiny, small")
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.precision == "auto":  # the worker loop's "auto": bf16 autocast on GPU, fp32 on CPU
        args.precision = "bf16" if args.device == "cuda" else "fp32"
    if args.peak_tflops is None and args.device == "cuda":
        args.peak_tflops = 989.0  # H100 SXM, dense bf16

    import logging

    import ray

    if not args.verbose:
        import ray.data  # configures its loggers on import: quieten them afterwards

        ray.data.DataContext.get_current().enable_progress_bars = False
        for name in ("ray.data", "ray.train"):
            logging.getLogger(name).setLevel(logging.WARNING)
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths are limited
    tmp = tempfile.mkdtemp(prefix="bench-train-")
    ray.init(
        address="local",
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        log_to_driver=args.verbose,
        _temp_dir=ray_tmp,
    )
    try:
        paths = {"runs": os.path.join(tmp, "runs")}
        if args.root:
            root = os.path.abspath(args.root)
            paths["shards"], paths["store"] = f"{root}/shards", f"{root}/embeddings"
        else:
            started = time.perf_counter()
            paths["shards"], paths["store"] = make_data(tmp, args.n, args.image_size)
            print(f"data: {args.n} synthetic samples in {time.perf_counter() - started:.0f} s")
        paths["small_clip"] = os.path.join(tmp, "bench-small-clip.json")
        with open(paths["small_clip"], "w") as f:
            json.dump(SMALL_CLIP, f)

        probe = worker_threads(args, os.path.join(tmp, "probe"))
        threads = args.threads or int(probe["torch_threads"])
        torch.set_num_threads(threads)
        print(
            f"device {args.device}, precision {args.precision}, {os.cpu_count()} CPUs; a Ray Train "
            f"worker with {args.cpus_per_worker:g} CPU: torch threads {probe['torch_threads']}, "
            f"interop {probe['interop_threads']}, OMP_NUM_THREADS={probe['omp']}; bare loop: "
            f"{threads} threads; {args.steps} timed steps after a warm-up of log_every steps"
        )
        rows = []
        for stage in stages:
            for size in sizes:
                cfg, warmup = stage_config(stage, size, args, paths)
                batches, info = in_memory_batches(stage, cfg, args.device)
                with PeakMemory(tree=False) as memory:
                    before = bare_loop(stage, cfg, info, batches, warmup, args)
                if args.device == "cuda":
                    torch.cuda.empty_cache()  # the worker gets the GPU this process let go
                driver = driver_run(stage, cfg, warmup, args)
                after = bare_loop(stage, cfg, info, batches, warmup, args)
                bare = (before["samples_per_s"] + after["samples_per_s"]) / 2
                row = {
                    "stage": stage,
                    "size": size,
                    "batch": cfg.train.batch_size,
                    "log_every": cfg.train.log_every,
                    "params": before["params"],
                    "gflop": before["flops_per_sample"] / 1e9,
                    "bare": bare,
                    "driver": driver["samples_per_s"],
                    "reported": driver["reported_samples_per_s"],
                    "ratio": driver["samples_per_s"] / bare,
                    "bare_rss": memory.peak,
                    "driver_rss": driver["peak"],
                    "worker_rss": driver["worker_peak"],
                    "gpu_peak": before["gpu_peak"],
                }
                if args.peak_tflops:
                    for key in ("bare", "driver"):
                        row[f"mfu_{key}"] = mfu(
                            row[key], before["flops_per_sample"], args.peak_tflops
                        )
                rows.append(row)
                print(
                    f"{stage} {size}: bare {before['samples_per_s']:.1f} then "
                    f"{after['samples_per_s']:.1f} samples/s; driver {row['driver']:.1f} "
                    f"samples/s (run's own EMA metric {row['reported']:.1f}), whole run "
                    f"{driver['wall_s']:.0f} s",
                    flush=True,
                )
                del batches
        print_table(rows, args)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    gib = 2**30
    mfu = bool(args.peak_tflops)
    head = (
        f"{'stage':<10}{'size':<6}{'batch':>6}{'log':>5}{'params':>9}{'GFLOP':>9}{'bare/s':>9}"
        f"{'driver/s':>9}{'ratio':>7}{'(EMA)/s':>9}{'bare RSS':>10}{'run RSS':>9}{'worker':>8}"
    )
    if mfu:
        head += f"{'MFU bare':>9}{'MFU drv':>9}{'GPU GiB':>8}"
    print()
    print(head)
    for r in rows:
        line = (
            f"{r['stage']:<10}{r['size']:<6}{r['batch']:>6}{r['log_every']:>5}{r['params'] / 1e6:>8.2f}M"
            f"{r['gflop']:>9.3f}{r['bare']:>9.1f}{r['driver']:>9.1f}{r['ratio']:>7.2f}"
            f"{r['reported']:>9.1f}{r['bare_rss'] / gib:>9.2f}G{r['driver_rss'] / gib:>8.2f}G"
            f"{r['worker_rss'] / gib:>7.2f}G"
        )
        if mfu:
            line += f"{r['mfu_bare']:>9.1%}{r['mfu_driver']:>9.1%}{r['gpu_peak'] / gib:>8.2f}"
        print(line)
    print(
        "log: steps between metrics. GFLOP: model FLOPs per sample, forward + backward. samples/s: bare = mean of the bare loop before and after the "
        "driver run; driver = wall clock between the run's metrics (TensorBoard) at the end of "
        "warm-up and at the last step; (EMA) = the "
        "run's own samples_per_s at the last step. RSS: bare = this process during the bare loop; "
        "run = this process + all Ray processes during run_training; worker = the Ray Train "
        "worker alone. Target: ratio ≥ 0.9."
    )


if __name__ == "__main__":
    main()
