"""The stage-training driver shared by every stage: checks, then one Ray Train ``TorchTrainer``.

Before anything is asked of the cluster: the config is already typed and checked; storage is
reachable and writable; a run folder that already holds checkpoints was trained with a compatible
config (same model, diffusion process, data, data order: batch size, seed, data streams and
shuffle, and checkpoint layout: DDP or FSDP), else the run is refused with the keys that differ rather than silently resumed. Then the
run's config is saved beside its checkpoints and a ``TorchTrainer`` runs ``pipeline.train.loop``
with the stage's data source (the workers read their own rows), a ``RunConfig`` named
after the run on the shared storage (so rerunning the same command resumes from the latest
checkpoint), checkpoints kept and ``FailureConfig``. While it trains, a thread reads the run's
``progress.json`` (rank 0 writes it) into the stage's progress line (:mod:`pipeline.progress`):
the workers' own output is not forwarded to a quiet command's terminal.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

from pipeline import config as configlib
from pipeline.cluster.connect import connect
from pipeline.errors import UserFacingError
from pipeline.progress import Progress
from pipeline.storage import Storage, join, parent
from pipeline.train import checkpoints
from pipeline.train.feed import data_streams
from pipeline.train.loop import PROGRESS_FILE, train_loop_per_worker
from pipeline.train.stages import STAGES

log = logging.getLogger(__name__)

PROGRESS_POLL_S = 5.0


def _get(cfg: Any, dotted: str) -> Any:
    value = configlib.to_dict(cfg)
    for part in dotted.split("."):
        value = value[part]
    return value


# What fixes the order of the rows a run sees (pipeline.train.order): a run resumed with another
# value would not continue its data where it stopped. The worker count and grad_accum may change:
# the global batch stays the data streams' rows.
ORDER_KEYS = ("train.batch_size", "train.seed", "train.shuffle_shards", "train.shuffle_buffer")
# What fixes a checkpoint's layout: FSDP's sharded parts and DDP's single files read differently.
LAYOUT_KEYS = ("scaling.strategy",)


def _value(cfg: Any, key: str) -> Any:
    return data_streams(cfg) if key == "train.data_streams" else _get(cfg, key)


def check_compatible(stage: str, cfg: Any, storage: Storage) -> int:
    """Refuse to resume a run whose latest checkpoint was trained with an incompatible config;
    return that checkpoint's step (0 for a new run)."""
    spec = STAGES[stage]
    found = checkpoints.list_checkpoints(storage, cfg.run_url())
    if not found:
        return 0
    step, url = found[-1]
    text = storage.read_text(join(url, "config.yaml"))
    saved = configlib.from_dict(spec.config_cls, configlib.read_yaml_text(text), source=url)
    changed = [
        key
        for key in (*spec.compatible, *ORDER_KEYS, *LAYOUT_KEYS)
        if _get(saved, key) != _get(cfg, key)
    ]
    if data_streams(saved) != data_streams(cfg):
        changed.append("train.data_streams")
    if changed:
        details = "; ".join(
            f"{k}: {_value(saved, k)!r} in the run, {_value(cfg, k)!r} now" for k in changed
        )
        raise UserFacingError(
            f"run {cfg.run_url()} was trained to step {step} with another config ({details}); "
            "use another run name (run=...) to start afresh, or restore those settings to resume"
        )
    return step


def watch_progress(
    storage: Storage,
    run_url: str,
    attempt: str,
    progress: Progress,
    stop: threading.Event,
    every_s: float = PROGRESS_POLL_S,
) -> None:
    """Until ``stop`` is set: every ``every_s`` seconds, feed ``progress`` from the run's
    ``progress.json`` when this ``attempt`` wrote it (a file an earlier run left is ignored). What
    cannot be read now (not written yet, storage busy) is tried again next time: the line is only
    a display, never a reason to fail."""
    url = join(run_url, PROGRESS_FILE)
    while not stop.wait(every_s):
        try:
            data = storage.read_json(url)
            if data.get("attempt") != attempt:
                continue
            progress.update(int(data["step"]), f"loss {data['loss']:.4f}", eta_s=data["eta_s"])
        except Exception as exc:  # a display: see the docstring
            log.debug("progress of %s not read: %s", run_url, exc)


def run_training(stage: str, cfg: Any, storage: Storage | None = None) -> dict[str, Any]:
    """Train one stage to ``cfg.train.steps`` (or ``stop_at_step``), resuming if it has checkpoints."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    spec = STAGES[stage]
    storage = storage or Storage(cfg.storage)
    run_url = cfg.run_url()
    storage.check(run_url, write=True)
    resumed = check_compatible(stage, cfg, storage)
    connect(cfg.ray)
    source, info = spec.prepare(cfg, storage)
    storage.write_text(join(run_url, "config.yaml"), configlib.dumps(cfg))

    filesystem, path = storage.arrow_filesystem(parent(run_url))
    resources = {"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = 1
    attempt = uuid.uuid4().hex
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "stage": stage,
            "cfg": cfg,
            "info": info,
            "source": source,
            "attempt": attempt,
        },
        scaling_config=ScalingConfig(
            num_workers=(
                cfg.scaling.worker_range if cfg.scaling.elastic else cfg.scaling.num_workers
            ),
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=resources,
            elastic_resize_monitor_interval_s=cfg.scaling.resize_interval_s,
        ),
        run_config=RunConfig(
            name=cfg.run,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
        ),
    )
    end_step = min(cfg.train.steps, cfg.train.stop_at_step or cfg.train.steps)
    progress = Progress(stage, end_step, "steps", start=resumed)
    stop = threading.Event()
    watcher = None
    if resumed < end_step:
        progress.update(resumed, "starting workers")
        watcher = threading.Thread(
            target=watch_progress,
            args=(storage, run_url, attempt, progress, stop),
            name=f"{stage}-progress",
            daemon=True,
        )
        watcher.start()
    started = time.time()
    try:
        result = trainer.fit()
    except Exception as exc:
        progress.close()
        raise UserFacingError(f"{stage} run {run_url} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        stop.set()
        if watcher is not None:
            watcher.join(timeout=PROGRESS_POLL_S)
    metrics = dict(result.metrics or {})
    if watcher is not None and metrics.get("step") is not None and metrics.get("loss") is not None:
        progress.update(int(metrics["step"]), f"loss {metrics['loss']:.4f}", eta_s=0)
    progress.close()
    found = checkpoints.list_checkpoints(storage, run_url)
    if metrics.get("step") is not None and (not found or found[-1][0] != metrics["step"]):
        raise UserFacingError(
            f"{stage} run {run_url} reached step {metrics['step']} but its latest whole "
            f"checkpoint is {found[-1][0] if found else 'none'}: a checkpoint upload failed; "
            "rerun the same command to continue from the last whole checkpoint"
        )
    return {
        "stage": stage,
        "run": run_url,
        "step": metrics.get("step"),
        "loss": metrics.get("loss"),
        "checkpoint": checkpoints.latest_checkpoint(storage, run_url),
        "seconds": round(time.time() - started, 1),
    }


def summary_line(summary: dict[str, Any]) -> str:
    loss = summary["loss"]
    return (
        f"{summary['stage']}: step {summary['step']}, loss {loss:.4f}, "
        f"latest checkpoint {summary['checkpoint']} ({summary['seconds']} s)"
        if loss is not None
        else f"{summary['stage']}: nothing left to train; latest checkpoint {summary['checkpoint']}"
    )
