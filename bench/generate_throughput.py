"""Batch generation throughput on CPU: images per second at ``batch_size`` 16 against 1.

Builds a cascade of random (untrained) stage models under a temporary root, with the tiny CLIP and
its embedding store (``tests/tiny_cascade.py`` makes the root; the test helpers are imported from
``tests/``), then:

  1. the cascade alone: ``--rows`` rows through ``pipeline.generate.sampling.generate_images`` in
     batches of each ``--batch-sizes`` value (one cascade call per batch, one seed per row, as a
     generator actor runs them), after one warm-up batch; images/s, and the largest difference of
     a row's pixels from the same row generated alone (on [0, 1]);
  2. with ``--job``, ``unclip generate`` end to end on a local Ray (``run_generate``: one actor,
     PNGs, index parts, the index) of ``--job-rows`` rows at each batch size: its images/s after
     the first batch arrived, and with the actor's start-up and the cascade's loading; then the
     rerun of the finished job (nothing generated) and its seconds.

``--cascade quickstart`` (the default) takes the stage models of ``configs/{prior,decoder,
upsampler}/tiny.yaml`` (64 px decoder, 64→256 upsampler) and ``configs/generate/tiny.yaml``'s
sampling; ``--cascade tests`` the tests' 16→32 px cascade at 2 steps a stage. The ``--*-steps``
flags override the sampling steps (fewer steps shorten the run; the ratio barely moves).

    .venv/bin/python bench/generate_throughput.py --decoder-steps 10 --upsampler-steps 5
    .venv/bin/python bench/generate_throughput.py --cascade tests --rows 64 --job-rows 256 --job

``--threads`` defaults to 1, right for a small, shared machine: two torch threads on two busy cores
made the tiny models' small kernels 30× slower (OpenMP threads waiting on each other).

Measured 2026-12-03 on a 2-core CPU machine shared with other work (load average 3 to 7, so
±30%), torch 1 thread:

  --cascade tests --rows 64 --job-rows 256 --job       batch 1      batch 16    ratio
    the cascade alone                                  16.6 img/s   64.4 img/s  3.9×
    unclip generate, after the first batch             9.8 img/s    48.6 img/s  5.0×
    unclip generate, start-up and loading included     6.5 img/s    16.9 img/s
    rerun of the finished job                          0 images in 0.04 to 0.11 s
  --decoder-steps 10 --upsampler-steps 5 (quickstart)  0.28 img/s   0.26 img/s  0.94×

Batching pays where a call's fixed costs weigh (kernel launches, Python, small kernels: a GPU, or
the tests' 16→32 px cascade); the quickstart's 64→256 px cascade keeps a CPU core busy at batch 1
already. Rows batched and alone differ by a median 3e-8 of the [0, 1] range; in float32 these
untrained networks amplify that on some rows (8 of 64 above 1e-4, at most 2e-2 with the tests'
cascade, all of it in the upsampler fed a saturated image; every row, median 2e-2, with the
quickstart's, whose guided decoder is 3e-4 apart after 10 steps and its upsampler 1e-1). In float64
the rows agree to 1e-6: the draws are right (``tests/test_generation.py`` checks them in float64).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import torch  # noqa: E402

CAPTIONS = os.path.join(ROOT, "configs", "generate", "captions.txt")


def build_root(root: str, cascade: str) -> list[str]:
    """A cascade root under ``root``; returns the overrides that point the generate config at it."""
    from helpers import tiny_clip_checkpoint
    from tiny_cascade import (
        STEPS,
        build_model,
        cascade_overrides,
        make_cascade_root,
        write_checkpoint,
    )

    from pipeline import config as configlib
    from pipeline.stage_config import DecoderConfig, PriorConfig, UpsamplerConfig
    from pipeline.storage import Storage, join

    storage = Storage()
    clip_path = tiny_clip_checkpoint(os.path.join(root, "clip.safetensors"), 0)
    made = make_cascade_root(storage, os.path.join(root, "root"), clip_path)
    c = {**made, "root": os.path.join(root, "root"), "clip_path": clip_path}
    if cascade == "tests":
        steps = [f"prior_steps={STEPS}"]
        return cascade_overrides(c, "prior=checkpoints/prior", *steps)
    stages = (
        ("train-prior", PriorConfig, "prior", "q-prior"),
        ("train-decoder", DecoderConfig, "decoder", "q-decoder"),
        ("train-upsampler", UpsamplerConfig, "upsampler", "q-upsampler"),
    )
    for seed, (stage, cls, folder, run) in enumerate(stages):
        cfg = configlib.load(
            cls, os.path.join(ROOT, "configs", folder, "tiny.yaml"), [f"root={c['root']}"]
        )
        info = {} if stage == "train-upsampler" else made["info"]
        model = build_model(stage, cfg, info, seed + 10)
        write_checkpoint(storage, join(c["root"], "checkpoints", run), stage, cfg, model, info)
    # the tiny generate config's sampling: each run's steps (the overrides below drop the tests')
    return [
        *(
            o
            for o in cascade_overrides(c)
            if not o.startswith(("decoder=", "upsamplers=", "decoder_steps=", "upsampler_steps="))
        ),
        "prior=checkpoints/q-prior",
        "decoder=checkpoints/q-decoder",
        "upsamplers=[checkpoints/q-upsampler]",
    ]


def cascade_throughput(cfg, cascade, rows, batch: int) -> tuple[float, torch.Tensor]:
    """images/s of ``rows`` (caption, seed) through the cascade in batches of ``batch``, and the
    images."""
    from pipeline.generate.sampling import generate_images

    def run(part) -> torch.Tensor:
        return generate_images(cascade, cfg, [r[0] for r in part], [r[1] for r in part])

    run(rows[:batch])  # warm-up
    started = time.perf_counter()
    images = torch.cat([run(rows[i : i + batch]) for i in range(0, len(rows), batch)])
    return len(rows) / (time.perf_counter() - started), images


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cascade", choices=["quickstart", "tests"], default="quickstart")
    parser.add_argument("--rows", type=int, default=32, help="images generated per batch size")
    parser.add_argument("--job-rows", type=int, help="rows of each job (default: --rows)")
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--prior-steps", type=int)
    parser.add_argument("--decoder-steps", type=int)
    parser.add_argument("--upsampler-steps", type=int)
    parser.add_argument("--job", action="store_true", help="also run unclip generate on Ray")
    args = parser.parse_args()

    from pipeline import config as configlib
    from pipeline.cascade_config import GenerateConfig
    from pipeline.generate.batch import read_captions, row_seed, run_generate
    from pipeline.generate.sampling import open_cascade, prior_url
    from pipeline.storage import Storage

    torch.set_num_threads(args.threads)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    storage = Storage()
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        overrides = build_root(tmp, args.cascade)
        steps = [
            f"{key}={value}"
            for key, value in (
                ("prior_steps", args.prior_steps),
                ("decoder_steps", args.decoder_steps),
                ("upsampler_steps", args.upsampler_steps),
            )
            if value is not None
        ]

        def config(*extra: str) -> GenerateConfig:
            return configlib.load(
                GenerateConfig,
                os.path.join(ROOT, "configs", "generate", "tiny.yaml"),
                [*overrides, *steps, f"captions={CAPTIONS}", "device=cpu", *extra],
            )

        cfg = config(f"batch_size={max(sizes)}")
        cascade = open_cascade(cfg, storage, prior_url(cfg))
        captions = read_captions(storage, CAPTIONS)
        rows = [(captions[i % len(captions)], row_seed(0, i)) for i in range(args.rows)]
        job_rows = [captions[i % len(captions)] for i in range(args.job_rows or args.rows)]
        print(
            f"cascade {args.cascade}: resolutions {cascade.resolutions}, {args.rows} rows, "
            f"torch threads {args.threads}, overrides {steps or 'none'}"
        )
        results = {}
        for batch in sizes:
            results[batch] = cascade_throughput(cfg, cascade, rows, batch)
            print(f"  cascade, batch {batch:>3}: {results[batch][0]:7.2f} images/s")
        base = results[sizes[0]]
        for batch in sizes[1:]:
            gaps = ((results[batch][1] - base[1]) / 2).abs().flatten(1).amax(dim=1)
            print(
                f"  batch {batch} vs {sizes[0]}: {results[batch][0] / base[0]:.2f}× the images/s; "
                f"each row's largest pixel difference (on [0, 1]): median {gaps.median():.1e}, "
                f"max {gaps.max():.1e}, {int((gaps > 1e-4).sum())} of {len(gaps)} rows over 1e-4"
            )
        if not args.job:
            return

        import ray

        ray.init(
            address="local", num_cpus=2, include_dashboard=False, log_to_driver=False
        )  # one actor of 1 CPU, with threads_per_actor torch threads
        job = {}
        for batch in sizes:
            # --job-rows rows: the captions file's lines repeated
            caption_file = os.path.join(tmp, "captions.txt")
            with open(caption_file, "w") as handle:
                handle.write("\n".join(job_rows) + "\n")
            cfg = config(
                f"batch_size={batch}",
                f"output=gen-{batch}",
                f"threads_per_actor={args.threads}",
                f"captions={caption_file}",
                "concurrency=1",
            )
            summary = run_generate(cfg, storage)
            job[batch] = summary["steady_images_per_second"]
            print(
                f"  job, batch {batch:>3}: {summary['generated']} images, "
                f"{summary['steady_images_per_second']:7.2f} images/s after the first batch, "
                f"{summary['images_per_second']:7.2f} with the actor's start-up and loading; "
                f"{summary['seconds']} s in all"
            )
            started = time.perf_counter()
            again = run_generate(cfg, storage)
            print(
                f"  rerun of the finished job: {again['generated']} generated in "
                f"{time.perf_counter() - started:.2f} s"
            )
        for batch in sizes[1:]:
            print(f"  job batch {batch} vs {sizes[0]}: {job[batch] / job[sizes[0]]:.2f}×")
        ray.shutdown()


if __name__ == "__main__":
    main()
