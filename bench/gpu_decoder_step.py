"""The paper decoder's training step as the worker loop runs it, on one GPU: DDP against FSDP2, and
the throughput variants (fused AdamW, channels-last, ``torch.compile`` per block, no gradient
checkpointing).

Issue 17 asks two things of one GPU: what FSDP costs against DDP (peak memory, step time) for the
3.5B decoder, and where its bf16 throughput can come from. ``bench/gpu_stages.py`` times the
model's bare step; this one times the loop's: the model built by ``pipeline.train.stages``, wrapped
as ``pipeline.train.loop`` wraps it (``LossOf`` in DDP, or ``sharding.shard``), with the loop's
AdamW (``make_optimizer``), EMA, autocast, gradient clipping and ``finish_step``, on random batches
of the right shapes (no data pipeline). One process group of one rank (NCCL; gloo on a CPU), so DDP
and FSDP run their real hooks; on one rank FSDP shards nothing, so its memory here is the
unsharded model's: with W workers the model states (parameters, gradients, AdamW's moments and the
EMA: 20 bytes per parameter) divide by W and the activations do not.

Each variant runs in its own process (a crash or an out-of-memory is that variant's line, not the
run's end) under ``--timeout`` seconds; ``+`` joins features to a base:

  ddp, fsdp           the wrapping (``ddp`` on one rank still runs DDP's reducer)
  +fused              AdamW's fused CUDA kernel (``make_optimizer(..., fused=True)``)
  +cl                 channels-last weights and images
  +compile            ``torch.compile`` on every block ``sharding.shard_units`` names
  +nockpt             ``model.grad_checkpointing=false``

    python bench/gpu_decoder_step.py                                   # the default variants
    python bench/gpu_decoder_step.py --variants ddp,fsdp --batch 8
    python bench/gpu_decoder_step.py --config configs/decoder/tiny.yaml --batch 4 --steps 2 \\
        --warmup 1                                                     # a dry run on a CPU

Prints one line per variant and a table; ``--json PATH`` writes every figure. MFU counts the model's
FLOPs (5153 GFLOP per 64 px sample, forward + backward, without checkpointing's recomputed
forwards) against 989 TFLOP/s.

Measured 2026-12-04 on one NVIDIA H200 (torch 2.11.0+cu130, bf16, 3563 M parameters; the default
variants at micro-batch 16, then three more):

  variant                      micro-batch  ms/step  samples/s  peak GiB  MFU
  ddp         (the loop before)         16      645       24.8      93.1  13%
  fsdp                                  16      872       18.3      79.8  10%
  ddp+fused   (the loop now)            16      563       28.4      80.6  15%
  fsdp+fused                            16      701       22.8      67.6  12%
  ddp+fused+cl                          16      647       24.7      80.6  13%
  ddp+fused+compile                     16      663       24.1      79.8  13%  (131 s to compile)
  ddp+fused+nockpt                      16      430       37.2     100.1  19%
  fsdp+fused+nockpt                     16      515       31.1      80.5  16%
  ddp+fused                             32      938       34.1      86.5  18%
  fsdp+fused+nockpt (paper.yaml)        32      743       43.1     107.6  22%

Read: the loop's AdamW was a loop of per-tensor kernels whose temporaries cost 12 GiB; fused, the
step is 13% faster under DDP and 20% under FSDP, so the worker loop uses it on a GPU. FSDP on one
rank costs 25% of the step (it casts and copies every block's weights for the forward, and again
for the checkpointed recompute) and saves the DDP reducer's gradient buckets (13 GiB). Gradient
checkpointing costs a third of the step; without it the activations of micro-batch 32 are 41 GiB,
which fit an 80 GB GPU only once FSDP has divided the 66 GiB of model states (W = 64: 1 GiB each):
``configs/decoder/paper.yaml`` is that configuration. Channels-last and per-block
``torch.compile`` gained nothing (the attention already runs in SDPA's fused kernel; the time is
in the convolutions and the norms' float32 round trips). The losses of every variant agree to
4 digits: the same step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_VARIANTS = "ddp,fsdp,ddp+fused,fsdp+fused,ddp+fused+cl,ddp+fused+compile,ddp+fused+nockpt"
EMBED_DIM = 1024  # the ViT-H/14 store's
MARK = "RESULT "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    """One variant in this process: build, wrap, ``--warmup`` + ``--steps`` loop steps."""
    import torch
    import torch.distributed as dist

    from bench.gpu_stages import batch_of
    from bench.measure import flops_per_sample, sync
    from pipeline import config as configlib
    from pipeline.stage_config import DecoderConfig
    from pipeline.train import sharding
    from pipeline.train.loop import (
        LossOf,
        autocast,
        backward,
        finish_step,
        grad_scaler,
        lr_factor,
        make_optimizer,
        resolved_precision,
    )
    from pipeline.train.stages import build_decoder
    from unclip.ema import EMA

    base, *features = args.one.split("+")
    cuda = args.device == "cuda"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)

    overrides = [f"train.precision={args.precision}"]
    if "nockpt" in features:
        overrides.append("model.grad_checkpointing=false")
    cfg = configlib.load(DecoderConfig, args.config, overrides)
    torch.manual_seed(0)
    with device:  # parameters made on the device: a 3.5B model's CPU init takes minutes
        model = build_decoder(cfg, {"embed_dim": EMBED_DIM})
    params = sum(p.numel() for p in model.parameters())
    batch = batch_of("decoder", cfg, args.batch, device, seed=0)
    if "cl" in features:
        model.to(memory_format=torch.channels_last)
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)

    gflop = None
    if args.flops:  # the model FLOPs of one forward + backward, before any wrapping
        generator = torch.Generator(device=device).manual_seed(0)
        # without gradient checkpointing's recomputed forwards: MFU counts the model's FLOPs,
        # so a variant that recomputes shows its cost as a lower MFU
        # (the UNet holds the switch as an attribute, the text encoder's owner in its config)
        holders = [getattr(m, "cfg", None) for m in model.modules()] + list(model.modules())
        checkpointed = [h for h in holders if getattr(h, "grad_checkpointing", False)]
        for m in checkpointed:
            m.grad_checkpointing = False

        def forward_backward() -> None:
            with autocast(cfg, device):
                model.loss(batch, generator=generator).backward()

        gflop = flops_per_sample(model, forward_backward, args.batch) / 1e9
        for m in checkpointed:
            m.grad_checkpointing = True

    if "compile" in features:
        for unit in sharding.shard_units(model):
            unit.compile()
    fsdp = base == "fsdp"
    if fsdp:
        sharding.shard(model, device, bf16_params=resolved_precision(cfg, device) == "bf16")
    ema = EMA(model, cfg.ema.decay)
    optimizer = make_optimizer(model, cfg, fused="fused" in features)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    scaler = grad_scaler(cfg, device)
    wrapped: torch.nn.Module = LossOf(model)
    if base == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[0] if cuda else None
        )
    state: dict[str, Any] = {"step": 0, "samples": 0}
    generator = torch.Generator(device=device).manual_seed(1)
    if cuda:
        states_gib = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        sync(device)
        began = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast(cfg, device):
            loss = wrapped(batch, generator)
        backward(loss, 1.0, scaler)
        finish_step(
            model=model,
            optimizer=optimizer,
            scaler=scaler,
            schedule=schedule,
            ema=ema,
            state=state,
            grad_clip=cfg.optim.grad_clip,
            batch_size=args.batch,
        )
        sync(device)
        losses.append(float(loss.detach()))
        if step >= args.warmup:
            times.append(time.perf_counter() - began)
        else:
            print(f"  warm-up step {step}: {time.perf_counter() - began:.2f} s", flush=True)
    times.sort()
    step_s = times[len(times) // 2]
    result = {
        "variant": args.one,
        "params_m": round(params / 1e6, 1),
        "micro_batch": args.batch,
        "precision": resolved_precision(cfg, device),
        "step_s_median": step_s,
        "step_s_min": times[0],
        "step_s_max": times[-1],
        "samples_per_s": args.batch / step_s,
        "losses": losses,
        "finite": all(map(math.isfinite, losses)),
        "gflop_per_sample": gflop,
    }
    if cuda:
        result["states_gib"] = states_gib
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    dist.destroy_process_group()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/decoder/paper.yaml")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--batch", type=int, default=16, help="micro-batch per step")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per variant")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child's variant
    parser.add_argument("--flops", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one:
        print(MARK + json.dumps(run_variant(args)), flush=True)
        return 0

    results: list[dict[str, Any]] = []
    gflop = None
    for index, variant in enumerate(args.variants.split(",")):
        command = [sys.executable, os.path.abspath(__file__), "--one", variant]
        for name in ("config", "batch", "steps", "warmup", "precision", "device"):
            command += [f"--{name}", str(getattr(args, name))]
        if index == 0:
            command.append("--flops")
        print(f"{variant}:", flush=True)
        began = time.monotonic()
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=args.timeout, check=False
            )
            lines = done.stdout.splitlines()
            found = [json.loads(x[len(MARK) :]) for x in lines if x.startswith(MARK)]
            for line in lines:
                if not line.startswith(MARK):
                    print(line, flush=True)
            result = found[0] if found else {"variant": variant, "error": done.stderr[-1500:]}
        except subprocess.TimeoutExpired:
            result = {"variant": variant, "error": f"timed out after {args.timeout:.0f} s"}
        result["wall_s"] = round(time.monotonic() - began, 1)
        gflop = gflop or result.get("gflop_per_sample")
        if gflop and "samples_per_s" in result:
            result["tflops"] = result["samples_per_s"] * gflop / 1e3
            result["mfu"] = result["tflops"] / args.peak_tflops
        results.append(result)
        print(f"  {json.dumps(result)}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    print(f"\n{'variant':28} {'ms/step':>8} {'samples/s':>9} {'peak GiB':>8} {'MFU':>5}  note")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:28} {'-':>8} {'-':>9} {'-':>8} {'-':>5}  {r['error'][-200:]!r}")
            continue
        peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
        mfu = f"{100 * r['mfu']:.0f}%" if "mfu" in r else "-"
        print(
            f"{r['variant']:28} {1000 * r['step_s_median']:8.0f} {r['samples_per_s']:9.2f} "
            f"{peak:>8} {mfu:>5}  losses {r['losses'][0]:.4f}..{r['losses'][-1]:.4f}, "
            f"{r['wall_s']:.0f} s wall"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
