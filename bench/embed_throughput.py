"""Embedding job throughput against the bare encoder, and its memory as the dataset grows.

Runs, on this machine, for N and 10·N synthetic samples:
  1. the bare encoder: the same model's encode_image + encode_text over the same decoded,
     preprocessed batches held in memory (the ceiling for the pipeline), single process;
  2. the embedding job (``pipeline.embed.job.run_embedding``) on a local Ray over the same shards,
     while a sampler records the peak resident memory of the driver and all its Ray processes.
Prints samples/s of both, their ratio, and the job's peak memory at N and 10·N.

    .venv/bin/python bench/embed_throughput.py                    # ViT-B-32 (random weights), N=128
    .venv/bin/python bench/embed_throughput.py --model tiny-clip --n 512
    .venv/bin/python bench/embed_throughput.py --precision bf16   # on a GPU

Targets (issue 4): pipeline ≥ 0.9 × bare forward; peak memory at 10·N ≤ 1.2 × at N.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
from PIL import Image

from bench.measure import PeakMemory, sync

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "clip", "tiny-clip.json")


def bare_forward(clip, root: str, storage, batch_size: int, device: str, dtype) -> float:
    """samples/s of encode_image + encode_text over pre-decoded batches of the same shards."""
    from pipeline.data.shards import completed_shards, iter_tar_samples, shard_urls
    from pipeline.embed.clip_model import prepare_image

    pixels, captions = [], []
    for shard in completed_shards(storage, f"{root}/shards"):
        for s in iter_tar_samples(storage, shard_urls(f"{root}/shards", shard)["tar"]):
            image = Image.open(io.BytesIO(s["jpg"]))
            pixels.append(prepare_image(clip.image_transform, image))
            captions.append(s["txt"].decode())
    mean = torch.tensor(clip.mean).view(1, 3, 1, 1)
    std = torch.tensor(clip.std).view(1, 3, 1, 1)
    batches = []
    for i in range(0, len(pixels), batch_size):
        x = torch.from_numpy(np.stack(pixels[i : i + batch_size])).permute(0, 3, 1, 2).float() / 255
        batches.append(
            (((x - mean) / std).to(device), clip.tokenizer(captions[i : i + batch_size]).to(device))
        )
    model = clip.model.to(device)
    with torch.no_grad(), torch.autocast(device, dtype, enabled=dtype != torch.float32):
        model.encode_image(batches[0][0])  # warm-up
        start = time.perf_counter()
        for x, tokens in batches:
            model.encode_image(x)
            model.encode_text(tokens)
        sync(device)
    return len(pixels) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument(
        "--n", type=int, default=128, help="samples in the small run (10·N in the large)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=256, help="stored image side")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (CPU)")
    args = parser.parse_args()

    import ray

    from pipeline.data import synth
    from pipeline.embed import clip_model
    from pipeline.embed.job import run_embedding
    from pipeline.stage_config import ClipSource, EmbedConfig, SynthConfig
    from pipeline.storage import Storage

    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = (
        args.precision if args.precision != "auto" else ("fp16" if device == "cuda" else "fp32")
    )
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    torch.set_num_threads(args.threads)
    source = ClipSource(model=args.model, model_config=TINY if args.model == "tiny-clip" else None)
    storage = Storage()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    print(f"device {device}, precision {precision}, model {args.model}, batch {args.batch_size}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        clip = clip_model.load_clip(source, None, "cpu")
        for n in (args.n, 10 * args.n):
            root = os.path.join(tmp, f"n{n}")
            per_shard = max(args.n // 2, 16)
            synth.generate(
                SynthConfig(
                    root=root,
                    num_samples=n,
                    samples_per_shard=per_shard,
                    image_size=args.image_size,
                ),
                storage,
            )
            bare = bare_forward(clip, root, storage, args.batch_size, device, dtype)
            cfg = EmbedConfig(
                root=root,
                clip=source,
                batch_size=args.batch_size,
                precision=precision,
                gpus_per_actor=1.0 if device == "cuda" else 0.0,
                threads_per_actor=args.threads if device == "cpu" else None,
            )
            with PeakMemory() as memory:
                started = time.perf_counter()
                summary = run_embedding(cfg, storage)
                elapsed = time.perf_counter() - started
            assert summary["rows"] == n, summary
            job = n / elapsed
            rows.append((n, bare, job, memory.peak))
            print(
                f"N={n:>6}: bare forward {bare:8.1f} samples/s | embedding job {job:8.1f} samples/s "
                f"| ratio {job / bare:5.2f} | job peak RSS {memory.peak / 2**30:6.2f} GiB"
            )
    (n1, _, _, m1), (n2, _, _, m2) = rows
    print(f"peak memory at {n2} vs {n1} samples: {m2 / m1:.2f}×  (target ≤ 1.2×)")
    print(f"throughput ratio at {n2} samples: {rows[1][2] / rows[1][1]:.2f}  (target ≥ 0.9)")


if __name__ == "__main__":
    main()
