"""The per-worker training loop shared by every stage; the only place Ray Train is touched.

Each worker: builds the stage model (``pipeline.train.stages``), restores the latest checkpoint Ray
Train hands it (model, EMA, AdamW, schedule, loss scale, step, data position, loss history), wraps
the model (DDP through ``ray.train.torch.prepare_model``, or FSDP2 by
:mod:`pipeline.train.sharding`, before the optimizer and the EMA are built on its shards), then
steps on the rows of its data streams (:mod:`pipeline.train.feed`: the same global batch, in the
same order, on any number of workers), gradient accumulation, bf16 autocast on GPU (or fp16 by
config, with a gradient scaler that skips steps whose gradients overflow), gradient clipping, AdamW
with warm-up then decay, EMA. Every ``log_every`` steps it reports loss, learning rate, samples/s,
step time and ETA (logged by rank 0, written for TensorBoard, and the step, loss and ETA written to
``<run>/progress.json``, at most every few seconds, for the driver's progress line: a quiet command
does not forward the workers' output); every ``checkpoint.every_steps`` and
at the end rank 0 writes a checkpoint with a grid of EMA samples and the loss curve, reported to Ray
Train with that step's metrics (under FSDP every rank first uploads its shards of the model,
optimizer and EMA, and rank 0 adds the EMA gathered whole, for sampling; a resumed FSDP run reads
its shards from storage, on any number of workers). Only checkpoints are reported: Ray Train (V2)
keeps no metrics without a checkpoint, and ``ray.train.report`` blocks until its controller has
taken the previous report, which it polls for every 2 s (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``), so
a report every ``log_every`` steps would cap a fast run at ``log_every`` steps per 2 s
(``bench/train_throughput.py --log-every 5``). The randomness of each micro-batch (timesteps, noise,
dropout) is seeded by (seed, step, data stream, micro-batch), and the checkpoint keeps every data
stream's position, so a resumed run, on any number of workers, sees the rows and draws the noise an
uninterrupted one would have: an elastic run restarted on more or fewer workers too
(``state["workers"]`` records each change of the count).
"""

from __future__ import annotations

import contextlib
import logging
import math
import posixpath
import shutil
import tempfile
import time
from typing import Any

import torch
from torch import nn

from pipeline import config as configlib
from pipeline.pictures import loss_curve_png
from pipeline.storage import Storage, StorageError, join
from pipeline.train import checkpoints
from pipeline.train.feed import Feed
from pipeline.train.stages import STAGES, StageSpec
from unclip.ema import EMA

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
"""``<run>/progress.json``: ``{attempt, step, steps, loss, eta_s}`` of the running training, written
by rank 0 (see :func:`write_progress`) and read by the driver's progress line."""
PROGRESS_EVERY_S = 2.0  # at most this often, and at the last step: one small write each


class LossOf(nn.Module):
    """``forward`` = the stage model's ``loss``, so DDP/FSDP wrap the loss computation."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        return self.model.loss(batch, generator=generator)


def lr_factor(step: int, cfg: Any) -> float:
    """Linear warm-up to 1, then constant, cosine or linear decay to ``min_lr_ratio``."""
    optim, total = cfg.optim, cfg.train.steps
    if optim.warmup_steps and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.decay == "constant":
        return 1.0
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total - optim.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if optim.decay == "cosine" else 1 - progress
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * shape


def make_optimizer(model: nn.Module, cfg: Any, *, fused: bool = False) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms or 1-d embeddings).
    ``fused``: one kernel for every parameter's update (CUDA) instead of a loop of small ones."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        fused=fused or None,
    )


def step_seed(seed: int, step: int, stream: int, micro: int) -> int:
    """The seed of one micro-batch's randomness: by data stream, not by worker, so it does not
    depend on how many workers share the streams."""
    return (seed * 1_000_003 + step * 10_007 + stream * 101 + micro) % (2**63 - 1)


def resolved_precision(cfg: Any, device: torch.device) -> str:
    """What ``train.precision`` means on ``device``: ``auto`` is bf16 on a GPU and fp32 elsewhere;
    fp16 and bf16 autocast run on a CPU too (slowly), so an explicit value is kept as given."""
    precision = cfg.train.precision
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(cfg: Any, device: torch.device):
    """The forward pass's autocast context for the configured precision (none for fp32)."""
    precision = resolved_precision(cfg, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(cfg: Any, device: torch.device) -> torch.amp.GradScaler:
    """The loss scaler: enabled for fp16 only, whose gradients underflow without it (bf16 has
    fp32's range and needs none). A disabled scaler passes every call through unchanged, so the
    loop has one code path. DDP's gradients are all-reduced before it looks for inf/NaN, so every
    rank skips the same steps (FSDP's sharded gradients would need ``ShardedGradScaler``; the
    config refuses fp16 with FSDP)."""
    enabled = resolved_precision(cfg, device) == "fp16"
    return torch.amp.GradScaler(device.type, enabled=enabled)


def backward(loss: torch.Tensor, weight: float, scaler: torch.amp.GradScaler) -> None:
    """Accumulate one micro-batch's gradients: the fp32 loss times its ``weight`` (its share of
    the global batch, :class:`pipeline.train.feed.Feed`), scaled for fp16."""
    scaler.scale(loss.float() * weight).backward()


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    grad_clip: float | None,
) -> tuple[torch.Tensor, bool]:
    """Unscale the gradients, clip their global norm, step and update the scale.

    Returns the norm of the unscaled gradients (before clipping) and whether the optimizer
    stepped: with fp16, a step whose gradients hold inf or NaN is skipped and the scale backed
    off (what ``GradScaler.step`` does); the caller then leaves the schedule and the EMA as they
    are. Unscaling first makes ``grad_clip`` apply to the true gradients, not the scaled ones.
    """
    scaler.unscale_(optimizer)
    clip = grad_clip if grad_clip is not None else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: the norm over every rank's shards, replicated
        grad_norm = grad_norm.full_tensor()
    scale = scaler.get_scale()  # 1.0 when disabled
    scaler.step(optimizer)
    scaler.update()
    return grad_norm, scaler.get_scale() >= scale  # the scale backs off only on a skipped step


def finish_step(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    ema: EMA,
    state: dict[str, Any],
    grad_clip: float | None,
    batch_size: int,
) -> torch.Tensor:
    """End a training step once its micro-batches' gradients are in: :func:`optimizer_step`, then
    the counters. The step and samples count either way (the batch was drawn, and the next step's
    seed and data follow from the step); the schedule and the EMA advance only when the optimizer
    stepped, and an fp16 step skipped for inf/NaN gradients is counted in ``skipped_steps``.
    Returns the gradient norm before clipping."""
    grad_norm, stepped = optimizer_step(model, optimizer, scaler, grad_clip)
    state["step"] += 1
    state["samples"] += batch_size
    if stepped:
        schedule.step()
        ema.update(model, state["step"])
    else:
        state["skipped_steps"] = state.get("skipped_steps", 0) + 1
    return grad_norm


def _all_mean(value: torch.Tensor) -> float:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


def checkpoint_state(
    state: dict[str, Any],
    schedule: torch.optim.lr_scheduler.LRScheduler,
    ema: EMA,
    scaler: torch.amp.GradScaler,
) -> dict[str, Any]:
    """What a checkpoint's ``state.json`` holds of the training (numbers only): the loop's counters
    and loss history, the schedule, the EMA's counters and, with fp16, the loss scale and its
    growth counter, so a resumed run scales (and skips steps) as an uninterrupted one would."""
    out = {
        **state,
        "scheduler": schedule.state_dict(),
        "ema": {"step": ema.step, "num_updates": ema.num_updates},
    }
    if scaler.is_enabled():
        out["grad_scaler"] = scaler.state_dict()
    return out


def restore(
    saved: dict[str, Any],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    ema: EMA,
    state: dict[str, Any],
) -> None:
    """Load a checkpoint, as :func:`checkpoints.read_local` returns it, into a worker's model,
    optimizer, schedule, scaler, EMA and ``state``, and count the resume. A loss scale saved by an
    fp16 run is used only if this run is fp16 too; an fp16 run from any other checkpoint starts
    from the initial scale."""
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    restore_counters(saved["state"], schedule=schedule, scaler=scaler, state=state)
    if saved["ema"] is not None:
        _restore_ema(ema, model, saved["ema"], state)


def restore_counters(
    saved_state: dict[str, Any],
    *,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    state: dict[str, Any],
) -> None:
    """The numbers of a checkpoint's ``state.json`` into ``state``, the schedule and the scaler
    (what :func:`checkpoint_state` wrote), counting the resume."""
    state.update(saved_state)
    schedule.load_state_dict(state.pop("scheduler"))
    scaler_state = state.pop("grad_scaler", None)
    if scaler_state is not None and scaler.is_enabled():
        scaler.load_state_dict(scaler_state)
    state["resumes"] = state.get("resumes", 0) + 1  # restarts after failures, and reruns


def _restore_ema(
    ema: EMA, model: nn.Module, averaged: dict[str, torch.Tensor], state: dict
) -> None:
    params = {name for name, _ in model.named_parameters()}
    ema.load_state_dict(
        {
            "shadow": {k: v for k, v in averaged.items() if k in params},
            "buffers": {k: v for k, v in averaged.items() if k not in params},
            "step": state["ema"]["step"],
            "num_updates": state["ema"]["num_updates"],
        }
    )


def write_progress(storage: Storage, run_url: str, progress: dict[str, Any]) -> None:
    """Write ``progress.json``; a failed write is logged, never the run's failure (it is only
    what the driver shows)."""
    try:
        storage.write_json(join(run_url, PROGRESS_FILE), progress)
    except StorageError as exc:
        log.warning("progress not written: %s", exc)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    spec: StageSpec = STAGES[loop_config["stage"]]
    cfg, info = loop_config["cfg"], loop_config["info"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    storage = Storage(cfg.storage)

    torch.manual_seed(cfg.train.seed)  # the same initial weights on every worker
    model = spec.build(cfg, info).to(device)
    fsdp = cfg.scaling.strategy == "fsdp"
    if fsdp:  # before the optimizer and the EMA: both hold the shards
        from pipeline.train import sharding

        sharding.shard(model, device, bf16_params=resolved_precision(cfg, device) == "bf16")
    ema = EMA(
        model, cfg.ema.decay, update_every=cfg.ema.update_every, start_step=cfg.ema.start_step
    )
    # fused on a GPU: the paper decoder's step 13% faster and 12 GiB lighter than the loop of
    # per-tensor kernels (bench/gpu_decoder_step.py, one H200), under DDP and FSDP alike
    optimizer = make_optimizer(model, cfg, fused=device.type == "cuda")
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    scaler = grad_scaler(cfg, device)
    state: dict[str, Any] = {
        "step": 0,
        "samples": 0,
        "streams": {},  # every data stream's position: {"<stream>": [epoch, drawn]}
        "skipped_steps": 0,  # fp16 steps skipped for inf/NaN gradients
        "history": [],
    }

    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        url = join(cfg.run_url(), posixpath.basename(resumed.path.rstrip("/")))
    if resumed is not None and fsdp:  # every rank reads its shards' byte ranges from storage
        sharding.load_parts(storage, url, model, optimizer, ema)
        restore_counters(
            storage.read_json(join(url, "state.json")),
            schedule=schedule,
            scaler=scaler,
            state=state,
        )
        ema.step, ema.num_updates = state["ema"]["step"], state["ema"]["num_updates"]
    elif resumed is not None:  # every worker reads its own copy (see checkpoints.read)
        restore(
            checkpoints.read(storage, url),
            model=model,
            optimizer=optimizer,
            schedule=schedule,
            scaler=scaler,
            ema=ema,
            state=state,
        )
    if resumed is not None and rank == 0:
        log.info("[%s] resumed at step %d from %s", spec.name, state["step"], resumed.path)
    # [step, workers] whenever the count changes: an elastic run's restarts on more or fewer
    state.setdefault("workers", [])
    if not state["workers"] or state["workers"][-1][1] != world:
        state["workers"].append([state["step"], world])
        if rank == 0 and len(state["workers"]) > 1:
            log.info("[%s] %d workers from step %d", spec.name, world, state["step"])

    wrapped = LossOf(model)  # under FSDP, model.loss is an FSDP forward method already
    if world > 1 and not fsdp:
        wrapped = ray.train.torch.prepare_model(wrapped, parallel_strategy="ddp")

    feed = Feed(
        loop_config["source"],
        cfg,
        rank,
        world,
        state["streams"],
        decode_threads=max(1, int(cfg.scaling.cpus_per_worker)),
    )
    last_micro = feed.micro_batches() - 1
    end_step = min(cfg.train.steps, cfg.train.stop_at_step or cfg.train.steps)

    writer = None
    tb_dir = tempfile.mkdtemp(prefix="unclip-tb-")
    if rank == 0:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(tb_dir)
    preview: dict[str, torch.Tensor] | None = None
    step_time = None
    attempt = loop_config.get("attempt")  # the driver's token: progress.json is this run's
    progress_at = float("-inf")
    while state["step"] < end_step:
        started = time.perf_counter()
        step = state["step"]
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for i, part in enumerate(feed.step()):
            batch = {k: v.to(device) for k, v in spec.collate(part.columns, cfg).items()}
            if preview is None:
                preview = {k: v[:8].detach().cpu() for k, v in batch.items()}
            seed = step_seed(cfg.train.seed, step, part.stream, part.micro)
            torch.manual_seed(seed)  # dropout and conditioning-dropout draws
            generator = torch.Generator().manual_seed(seed)
            sync = contextlib.nullcontext()
            if fsdp:  # gradients reduced on the step's last micro-batch only, as under DDP
                sharding.set_gradient_sync(model, i == last_micro)
            elif world > 1 and i < last_micro:
                sync = wrapped.no_sync()
            with sync, autocast(cfg, device):
                loss = wrapped(batch, generator)
            backward(loss, part.weight, scaler)
            total += loss.detach().float() * part.weight
        if not torch.isfinite(total):
            raise FloatingPointError(f"[{spec.name}] loss is {float(total)} at step {step}")
        grad_norm = finish_step(
            model=model,
            optimizer=optimizer,
            scaler=scaler,
            schedule=schedule,
            ema=ema,
            state=state,
            grad_clip=cfg.optim.grad_clip,
            batch_size=cfg.train.batch_size,
        )
        step = state["step"]

        elapsed = time.perf_counter() - started
        step_time = elapsed if step_time is None else 0.9 * step_time + 0.1 * elapsed
        checkpoint_now = step % cfg.checkpoint.every_steps == 0 or step == end_step
        if step % cfg.train.log_every and not checkpoint_now:
            continue
        loss_value = _all_mean(total)  # the weights make this the global batch's mean
        metrics = {
            "step": step,
            "loss": loss_value,
            "lr": schedule.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            "samples_per_s": cfg.train.batch_size / step_time,
            "step_time_s": step_time,
            "eta_s": step_time * (cfg.train.steps - step),
            "epoch": feed.epochs(),
            "workers": world,
        }
        if scaler.is_enabled():
            metrics["grad_scale"] = scaler.get_scale()
            metrics["skipped_steps"] = state["skipped_steps"]
        state["history"].append([step, loss_value])
        if rank == 0:
            eta = time.strftime("%H:%M:%S", time.gmtime(metrics["eta_s"]))
            log.info(
                "[%s] step %d/%d loss %.4f lr %.2e %.1f samples/s %.0f ms/step ETA %s",
                spec.name,
                step,
                cfg.train.steps,
                loss_value,
                metrics["lr"],
                metrics["samples_per_s"],
                step_time * 1000,
                eta,
            )
            for key, value in metrics.items():
                writer.add_scalar(f"train/{key}", value, step)
            writer.flush()
            if attempt is not None and (
                step == end_step or time.monotonic() - progress_at >= PROGRESS_EVERY_S
            ):
                progress_at = time.monotonic()
                write_progress(
                    storage,
                    cfg.run_url(),
                    {
                        "attempt": attempt,
                        "step": step,
                        "steps": end_step,
                        "loss": loss_value,
                        "eta_s": step_time * (end_step - step),
                    },
                )
        checkpoint, dir_name = None, None
        if checkpoint_now:
            state["streams"] = feed.positions()  # a collective: on every rank
            folder = tempfile.mkdtemp(prefix="unclip-ckpt-")
            parts, sampler, averaged = None, None, None
            if fsdp:  # every rank writes and uploads its shards; below, rank 0 the rest
                dir_name = sharding.checkpoint_name()
                parts = sharding.upload_parts(
                    storage, folder, join(cfg.run_url(), dir_name), model, optimizer, ema
                )
                averaged = sharding.gathered(ema.averaged(), rank)  # full tensors on rank 0
                if rank == 0:  # an unsharded copy of the average, to draw the samples
                    sampler = spec.build(cfg, info).to(device)
                    sampler.load_state_dict(averaged)
            elif rank == 0:
                sampler, averaged = ema.ema_model, ema.averaged_state_dict()
            if rank == 0:
                extra = {"loss.png": loss_curve_png(state["history"], f"{cfg.run}: training loss")}
                was = sampler.training
                sampler.eval()
                if spec.pictures is not None and preview is not None:
                    batch = {k: v.to(device) for k, v in preview.items()}
                    extra["samples.png"] = spec.pictures(sampler, batch, cfg)
                if spec.exports is not None:
                    extra.update(spec.exports(sampler, cfg))
                sampler.train(was)
                checkpoints.write_local(
                    folder,
                    model_state=None if fsdp else model.state_dict(),
                    ema_state=averaged,
                    optimizer_state=None if fsdp else optimizer.state_dict(),
                    state={
                        **checkpoint_state(state, schedule, ema, scaler),
                        "stage": spec.name,
                        "info": {k: v for k, v in info.items() if not k.startswith("fit_")},
                    },
                    config_yaml=configlib.dumps(cfg),
                    extra_files=extra,
                    parts=parts,
                )
                checkpoint = Checkpoint.from_directory(folder)
                if step == end_step:  # flush() leaves tensorboardX's queued events unwritten;
                    writer.close()  # close() writes them: the last copy holds every scalar
                    writer = None
                storage.copy_from_local(tb_dir, join(cfg.run_url(), "tensorboard"))
            else:
                shutil.rmtree(folder, ignore_errors=True)
            sampler = averaged = None
        if checkpoint_now:  # on every rank: a report is a collective (see the docstring)
            ray.train.report(
                metrics,
                checkpoint=checkpoint,
                checkpoint_dir_name=dir_name,  # FSDP: the folder every rank's parts went to
                checkpoint_upload_fn=lambda c, name: _persist(storage, cfg.run_url(), c, name),
            )
        if checkpoint is not None:
            shutil.rmtree(checkpoint.path, ignore_errors=True)
    feed.close()
    if writer is not None:
        writer.close()
    shutil.rmtree(tb_dir, ignore_errors=True)


def _persist(storage: Storage, run_url: str, checkpoint: Any, name: str) -> Any:
    """Ray Train's upload step, done by :func:`checkpoints.upload` (retried, marker last): a
    failed upload raises here, so the report fails and the run restarts from the last whole
    checkpoint or fails, instead of recording a checkpoint that lacks a file."""
    import posixpath

    import ray.train
    from ray.train import Checkpoint

    checkpoints.upload(storage, checkpoint.path, join(run_url, name))
    context = ray.train.get_context().get_storage()
    return Checkpoint(
        path=posixpath.join(context.experiment_fs_path, name),
        filesystem=context.storage_filesystem,
    )
