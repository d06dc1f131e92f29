"""How fast the tiny decoder learns shapes per second of CPU: bare-loop trials of decoder configs.

The quickstart's decoder is its longest stage on 2 cores. This script trains a decoder config in
one process (no Ray: the stage's own model, AdamW, schedule, EMA and loss, on the stage's own rows
read once into memory) and scores the EMA's samples with the project's checker
(:mod:`pipeline.data.shape_checker`) on held-in rows' true CLIP image embeddings and captions, so
it measures the decoder alone, as the eval's ``text_embedding``-free decoder path sees it. It
prints the training time, ms per step, and colour/shape accuracy at each checkpoint of the trial.

It needs a quickstart root that has the shards and the embedding store (``unclip quickstart``
stopped after its embeddings, or ``unclip synth``, ``train-clip`` and ``embed`` with that root)::

    python -m bench.decoder_learning --root runs/quickstart --steps 600 --eval-at 300,600 \
        --set model.patch_size=2 train.batch_size=32 optim.lr=3e-3

``--set`` takes the CLI's ``key=value`` overrides of ``configs/decoder/tiny.yaml``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from jobs.entry import CONFIG_DIR
from pipeline import config as configlib
from pipeline import pictures
from pipeline.eval.metrics import attribute_row
from pipeline.generate.cascade import find_checkpoint, load_stage_model
from pipeline.stage_config import DecoderConfig
from pipeline.storage import Storage
from pipeline.train import loop, stages
from pipeline.train.sources import stack
from unclip.ema import EMA


def load_rows(cfg: DecoderConfig, storage: Storage) -> tuple[dict, dict]:
    """Every row of the decoder's data (images at the model's size, embeddings, tokens, captions)
    as columns in memory, and the store's info."""
    source, info = stages.prepare_decoder(cfg, storage)
    source.columns = (*source.columns, "caption")
    rows = []
    for index, piece in enumerate(source.pieces):
        for _, raw in source.rows(index, 0, set(range(piece.slots))):
            row = None if raw is None else source.decode(raw)
            if row is not None:
                rows.append(row)
    return stack(rows), info


def score(
    model, data: dict, picks: np.ndarray, steps: int, guidance: float, grid: str | None = None
) -> dict[str, float]:
    """Colour and shape accuracy of the model's samples for the picked rows (one image each);
    ``grid``: a PNG of the first 32 (8 a row) written there."""
    generator = torch.Generator().manual_seed(0)
    images = []
    for start in range(0, len(picks), 32):
        chunk = picks[start : start + 32]
        with torch.no_grad():
            out = model.sample(
                torch.from_numpy(data["image_emb"][chunk]),
                torch.from_numpy(data["text_tokens"][chunk]).long(),
                steps=steps,
                guidance_scale=guidance,
                generator=generator,
            )
        images.extend(pictures.to_uint8(out))
    rows = [attribute_row(img, data["caption"][i]) for img, i in zip(images, picks, strict=True)]
    if grid:
        with open(grid, "wb") as f:
            f.write(
                pictures.png_bytes(
                    np.concatenate(
                        [np.concatenate(images[i : i + 8], 1) for i in range(0, 32, 8)], 0
                    )
                )
            )
    objects = sum(r["objects"] for r in rows)
    return {
        "color": sum(r["color_ok"] for r in rows) / objects,
        "shape": sum(r["shape_ok"] for r in rows) / objects,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="runs/quickstart")
    parser.add_argument("--steps", type=int, default=None, help="default: the config's")
    parser.add_argument("--eval-at", default="", help="steps to score at (default: the last)")
    parser.add_argument("--eval-rows", type=int, default=100)
    parser.add_argument("--sampling-steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=3.0, help="the eval config's default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grid", default=None, help="a PNG of samples at the last score")
    parser.add_argument(
        "--checkpoint", default=None, help="score this trained decoder (a run folder) instead"
    )
    parser.add_argument("--set", nargs="*", default=[], help="key=value overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = configlib.read_yaml(str(CONFIG_DIR / "decoder" / "tiny.yaml"))
    data["root"] = args.root
    if args.steps is not None:
        args.set = [f"train.steps={args.steps}", *args.set]
    configlib.apply_overrides(data, args.set)
    cfg = configlib.from_dict(DecoderConfig, data, source="configs/decoder/tiny.yaml")
    storage = Storage(cfg.storage)
    started = time.time()
    rows, info = load_rows(cfg, storage)
    count = len(rows["caption"])
    print(f"{count} rows in memory in {time.time() - started:.1f} s; {args.set}")

    picks = np.random.default_rng(1).choice(count, size=min(args.eval_rows, count), replace=False)
    sampling = args.sampling_steps or cfg.diffusion.sampling_steps
    if args.checkpoint:
        found = find_checkpoint(storage, args.checkpoint, "train-decoder", "decoder")
        result = score(load_stage_model(storage, found), rows, picks, sampling, args.guidance)
        print(f"{found.url}: colour {result['color']:.0%}, shape {result['shape']:.0%}")
        return
    torch.manual_seed(cfg.train.seed)
    model = stages.build_decoder(cfg, info)
    optimizer = loop.make_optimizer(model, cfg)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: loop.lr_factor(s, cfg))
    ema = EMA(model, cfg.ema.decay)
    rng = np.random.default_rng(cfg.train.seed)
    total = cfg.train.steps
    eval_at = {int(s) for s in args.eval_at.split(",") if s} or {total}
    generator = torch.Generator().manual_seed(cfg.train.seed)
    trained, losses = 0.0, []
    for step in range(1, total + 1):
        batch_rows = rng.choice(count, size=cfg.train.batch_size, replace=False)
        batch = stages.collate_images(
            {k: rows[k][batch_rows] for k in ("image", "image_emb", "text_tokens")}
        )
        tick = time.perf_counter()
        model.train()
        loss = model.loss(batch, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        ema.update(model, step)
        trained += time.perf_counter() - tick
        losses.append(loss.item())
        if step in eval_at:
            tick = time.perf_counter()
            grid = args.grid if step == max(eval_at) else None
            result = score(ema.ema_model, rows, picks, sampling, args.guidance, grid)
            print(
                f"step {step}: train {trained:.0f} s ({1000 * trained / step:.0f} ms/step), "
                f"loss {np.mean(losses[-50:]):.4f}, colour {result['color']:.0%}, "
                f"shape {result['shape']:.0%} ({len(picks)} rows, {sampling} sampling steps, "
                f"{time.perf_counter() - tick:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
