"""The paper-sized stage models on one GPU: bf16 training-step throughput, peak memory, MFU, the
bf16 loss against fp32's, and guided sampling speed.

For each stage, the model of ``configs/<stage>/paper.yaml`` (or ``--config-size``) is built from
``unclip`` alone (no Ray, no data: random batches of the right shapes; 1024-d embeddings, the
ViT-H/14 store's), then:

  1. ``--steps`` timed training steps after ``--warmup``: bf16 autocast forward + backward, gradient
     clipping at 1, fused AdamW (the worker loop's math without DDP/FSDP), at the micro-batch
     ``--batch`` (per stage; the global batch of the config is ``scaling.num_workers`` of these,
     with ``optim.grad_accum``); peak memory from the CUDA allocator, FLOPs from
     ``torch.utils.flop_counter`` on one forward + backward, MFU against ``--peak-tflops``;
  2. the loss of one batch in fp32 and under bf16 autocast, from the same (trained: the UNets'
     output layers start at zero) weights and the same generator: the relative difference says
     whether bf16 changes what the model is trained on;
  3. guided sampling under bf16 autocast: the prior's two candidates per caption with guidance,
     the decoder's classifier-free guidance at scale 3, the upsampler's DDIM; images (or
     embeddings) per second at the config's sampling steps (``--sample-steps`` overrides), and
     whether every output is finite.

    python bench/gpu_stages.py                                  # prior, decoder, upsampler-256
    python bench/gpu_stages.py --stages decoder --batch decoder=16 --steps 10
    python bench/gpu_stages.py --config-size tiny --device cpu --steps 2 --warmup 1   # a dry run

Prints one line per figure and a JSON summary at the end (``--json PATH`` writes it too).

Measured 2026-11-26 on one NVIDIA H200 (torch 2.11.0+cu130), ``--batch prior=128``, defaults
otherwise (MFU against 989 TFLOP/s):

  stage          params  micro-batch  train samples/s  peak GiB  GFLOP/sample  MFU  bf16 vs fp32  sampling
  prior          1325 M  128          260              73.5      1931          51%  0.00%         3.0 captions/s (64 steps, 2 candidates, guided)
  decoder        3563 M  16           30.1             54.0      6621          20%  0.01%         0.25 images/s (250 steps, guided)
  upsampler-256   730 M  16           140              17.6      1594          23%  0.00%         1.26 images/s (27 DDIM steps)

(the prior at micro-batch 256: 259 samples/s, 129.8 GiB.) The decoder trained with gradient
checkpointing (the paper config's then), so part of its step recomputes forwards, and the FLOP
count above includes them: by the model's FLOPs (5153 GFLOP/sample) its MFU was 16%.
``bench/gpu_decoder_step.py`` measures the decoder as the worker loop runs it, DDP against FSDP. The UNets' low MFU is
where kernel work would pay, not the prior's transformer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.measure import flops_per_sample, mfu, sync, tflops
from pipeline import config as configlib
from pipeline.stage_config import DecoderConfig, PriorConfig, UpsamplerConfig

EMBED_DIM, CONTEXT, VOCAB = 1024, 77, 49408
STAGES = {
    "prior": (PriorConfig, "prior"),
    "decoder": (DecoderConfig, "decoder"),
    "upsampler-256": (UpsamplerConfig, "upsampler"),
}
DEFAULT_BATCH = {"prior": 256, "decoder": 16, "upsampler-256": 16}


def build(stage: str, cfg: Any) -> torch.nn.Module:
    if stage == "prior":
        from unclip.prior import build_prior

        return build_prior(cfg.model, cfg.diffusion, embed_dim=EMBED_DIM)
    if stage == "decoder":
        from unclip.decoder import Decoder

        return Decoder(cfg.model, cfg.diffusion, embed_dim=EMBED_DIM)
    from unclip.upsampler import Upsampler

    return Upsampler(cfg.model, cfg.diffusion)


def batch_of(stage: str, cfg: Any, n: int, device: torch.device, seed: int) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (n, CONTEXT), generator=g)
    emb = torch.nn.functional.normalize(torch.randn(n, EMBED_DIM, generator=g), dim=-1)
    if stage == "prior":
        text = torch.nn.functional.normalize(emb + 0.5 * torch.randn(n, EMBED_DIM, generator=g))
        out = {"image_emb": emb, "text_emb": text, "text_tokens": tokens}
    elif stage == "decoder":
        side = cfg.model.image_size
        image = torch.rand(n, 3, side, side, generator=g) * 2 - 1
        out = {"image": image, "image_emb": emb, "text_tokens": tokens}
    else:
        side = cfg.model.high_res
        out = {"image": torch.rand(n, 3, side, side, generator=g) * 2 - 1}
    return {k: v.to(device) for k, v in out.items()}


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def loss_of(model, batch, device, bf16: bool, seed: int) -> float:
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad(), autocast(device, bf16):
        return float(model.loss(batch, generator=generator))


def loss_flops_per_sample(model, batch, device, n: int) -> float:
    generator = torch.Generator(device=device).manual_seed(0)

    def forward_backward() -> None:
        with autocast(device, device.type == "cuda"):
            model.loss(batch, generator=generator).backward()

    return flops_per_sample(model, forward_backward, n)


def train_steps(model, batch, device, steps: int, warmup: int, n: int) -> dict[str, float]:
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    generator = torch.Generator(device=device).manual_seed(1)
    bf16 = device.type == "cuda"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(warmup + steps):
        sync(device)
        began = time.perf_counter()
        with autocast(device, bf16):
            loss = model.loss(batch, generator=generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - began)
    step_s = sum(times) / len(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    del optimizer
    return {
        "step_s": step_s,
        "samples_per_s": n / step_s,
        "peak_gib": peak,
        "last_loss": float(loss.detach()),
    }


def sample_speed(stage: str, model, cfg, device, n: int, steps: int | None) -> dict[str, Any]:
    g = torch.Generator(device=device).manual_seed(2)
    data = batch_of(stage, cfg, n, device, seed=3)
    model.eval()
    sync(device)
    began = time.perf_counter()
    with autocast(device, device.type == "cuda"):
        if stage == "prior":
            out = model.sample(
                data["text_emb"], data["text_tokens"], guidance_scale=2.0, steps=steps, generator=g
            )
        elif stage == "decoder":
            out = model.sample(
                data["image_emb"], data["text_tokens"], guidance_scale=3.0, steps=steps, generator=g
            )
        else:
            low = torch.nn.functional.interpolate(data["image"], size=cfg.model.low_res)
            out = model.sample(low, steps=steps, generator=g)
    sync(device)
    seconds = time.perf_counter() - began
    model.train()
    return {
        "sample_batch": n,
        "sample_steps": steps or cfg.diffusion.sampling_steps,
        "sampled_per_s": n / seconds,
        "finite": bool(torch.isfinite(out.float()).all()),
        "out_dtype": str(out.dtype),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", default="prior,decoder,upsampler-256")
    parser.add_argument("--config-size", default="paper")
    parser.add_argument("--batch", action="append", default=[], help="stage=N micro-batch")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--sample-batch", type=int, default=8)
    parser.add_argument("--sample-steps", type=int, default=None)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    batches = {**DEFAULT_BATCH, **{k: int(v) for k, v in (b.split("=") for b in args.batch)}}
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    results: dict[str, Any] = {}
    for stage in args.stages.split(","):
        config_cls, folder = STAGES[stage]
        name = f"{args.config_size}-256" if stage == "upsampler-256" else args.config_size
        if args.config_size == "tiny" and stage == "upsampler-256":
            name = "tiny"
        path = os.path.join("configs", folder, f"{name}.yaml")
        cfg = configlib.load(config_cls, path, [])
        torch.manual_seed(0)
        model = build(stage, cfg).to(device)
        params = sum(p.numel() for p in model.parameters())
        n = batches[stage]
        batch = batch_of(stage, cfg, n, device, seed=0)
        flops = loss_flops_per_sample(model, batch, device, n)
        timing = train_steps(model, batch, device, args.steps, args.warmup, n)
        # after the steps: the UNets' zero-initialised output layers make the loss at
        # initialisation independent of the precision
        fp32 = loss_of(model, batch, device, bf16=False, seed=5)
        bf16 = loss_of(model, batch, device, bf16=True, seed=5)
        achieved = tflops(timing["samples_per_s"], flops)
        entry = {
            "config": path,
            "params_m": round(params / 1e6, 1),
            "micro_batch": n,
            "loss_fp32": fp32,
            "loss_bf16": bf16,
            "bf16_rel_diff": abs(bf16 - fp32) / max(abs(fp32), 1e-12),
            "gflop_per_sample": flops / 1e9,
            **timing,
            "tflops": achieved,
            "mfu": mfu(timing["samples_per_s"], flops, args.peak_tflops)
            if device.type == "cuda"
            else None,
        }
        if device.type == "cuda":
            torch.cuda.empty_cache()
        entry.update(sample_speed(stage, model, cfg, device, args.sample_batch, args.sample_steps))
        results[stage] = entry
        print(
            f"{stage}: {entry['params_m']} M params, micro-batch {n}: "
            f"{timing['samples_per_s']:.1f} samples/s ({1000 * timing['step_s']:.0f} ms/step), "
            f"peak {timing['peak_gib']:.1f} GiB, {entry['gflop_per_sample']:.1f} GFLOP/sample, "
            f"{achieved:.0f} TFLOP/s"
            + (f" (MFU {100 * entry['mfu']:.0f}%)" if entry["mfu"] is not None else "")
            + f"; loss fp32 {fp32:.5f} vs bf16 {bf16:.5f} ({100 * entry['bf16_rel_diff']:.2f}%); "
            f"sampling {entry['sampled_per_s']:.2f}/s at {entry['sample_steps']} steps "
            f"(batch {entry['sample_batch']}, finite: {entry['finite']})",
            flush=True,
        )
        del model, batch
        if device.type == "cuda":
            torch.cuda.empty_cache()
    summary = json.dumps(results, indent=1)
    print(summary)
    if args.json:
        with open(args.json, "w") as f:
            f.write(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
