"""The interactive generation commands: sample (section 2), variations (§3.1), interpolations
(§3.2) and text diffs (§3.3), each from trained checkpoints to PNG files, a grid and an index.

Each command plans its cascade first (``pipeline.generate.cascade``: every checkpoint found and checked
before a weight is read), loads it, encodes its inputs with the CLIP that made the decoder's
embedding store, calls the pure functions of ``unclip.generation`` with one generator seeded by
``seed``, and writes under ``<root>/<output>/``:

* each final image as ``<index>_<slug>.png``;
* ``grid.png``: one captioned row per prompt or input image (inputs in the first column);
* ``index.json``: every file with its prompt or input, the seed and the checkpoints used.

The same config and seed give the same bytes: every random number comes from that generator, and
PNGs carry no timestamp. Writes are atomic (``Storage.write_bytes``), so a rerun replaces files
whole.
"""

from __future__ import annotations

import logging
import numbers
import os
import re
from collections.abc import Sequence
from typing import Any

import torch

from pipeline import pictures
from pipeline.cascade_config import (
    CascadeConfig,
    InterpolateConfig,
    SampleConfig,
    TextConditionedConfig,
    TextDiffConfig,
    TextToImageConfig,
    VariationsConfig,
)
from pipeline.errors import UserFacingError
from pipeline.generate.cascade import (
    Cascade,
    CascadePlan,
    load_cascade,
    plan_cascade,
    read_image,
    square,
)
from pipeline.storage import Storage, basename, join
from unclip import generation

log = logging.getLogger(__name__)

INDEX, GRID = "index.json", "grid.png"


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe form of a prompt or file name: lowercase words joined by ``-``."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return words[:limit].rstrip("-") or "image"


def plan_for(cfg: CascadeConfig, storage: Storage, prior: str | None = None) -> CascadePlan:
    """The checked plan of the cascade a generation or evaluation config names, with ``prior``
    (a run folder or checkpoint, or none), and its samplers when the config chooses them."""
    plan = plan_cascade(
        storage,
        cfg.root,
        decoder=cfg.decoder,
        prior=prior,
        upsamplers=cfg.upsamplers,
        clip=cfg.clip,
    )
    if isinstance(cfg, TextConditionedConfig):
        plan = plan.with_samplers(cfg.decoder_sampler, cfg.upsampler_sampler)
    return plan


def open_cascade(cfg: CascadeConfig, storage: Storage, prior: str | None = None) -> Cascade:
    """Plan (check) then load the cascade a generation config names."""
    return load_cascade(plan_for(cfg, storage, prior), storage, cfg.device)


def _generator(seed: int) -> torch.Generator:
    """A CPU generator: the same numbers on every device (``unclip.generation``'s contract)."""
    return torch.Generator().manual_seed(seed)


def _write_outputs(
    storage: Storage,
    cfg: CascadeConfig,
    cascade: Cascade,
    command: str,
    files: list[tuple[str, torch.Tensor, dict[str, Any]]],
    grid_rows: list[list[Any]],
    captions: list[str],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Write the images (name, (3, H, W) tensor, index record), the grid and the index."""
    output = cfg.url(cfg.output)
    records = []
    for name, image, record in files:
        storage.write_bytes(
            join(output, name), pictures.png_bytes(pictures.to_uint8(image[None])[0])
        )
        records.append({"file": name, **record})
    grid_url = join(output, GRID)
    storage.write_bytes(grid_url, pictures.captioned_grid(grid_rows, captions))
    index = {
        "command": command,
        "seed": cfg.seed,
        "resolution": cascade.resolutions[-1],
        "resolutions": cascade.resolutions,
        "checkpoints": cascade.plan.describe(),
        **extra,
        "grid": GRID,
        "images": records,
    }
    storage.write_json(join(output, INDEX), index)
    log.info("%s: %d images, %s and %s under %s", command, len(files), GRID, INDEX, output)
    return {"output": output, "grid": grid_url, "index": join(output, INDEX), "images": len(files)}


def _steps(cfg: CascadeConfig) -> dict[str, Any]:
    return {
        "guidance_scale": cfg.decoder_guidance,
        "steps": cfg.decoder_steps,
        "upsampler_steps": cfg.upsampler_steps,
    }


# ----------------------------------------------------------------------------------------------
# Section 2: text → image


def generate_images(
    cascade: Cascade, cfg: TextToImageConfig, prompts: Sequence[str], seed: int | Sequence[int]
) -> torch.Tensor:
    """The final images (N, 3, H, W) in [-1, 1] for ``prompts`` (one row each) through the whole
    cascade, in chunks of ``cfg.batch_size`` rows.

    ``seed`` an int: every random number is drawn from one generator seeded by it (the same seed,
    prompts and batch size give the same images; ``unclip sample``). A sequence of N seeds: row i
    draws all of its random numbers from its own generator seeded by ``seed[i]``
    (``unclip.generation``'s per-row generators), so a row's image is the one that prompt gives
    alone with ``seed=seed[i]``, whatever the batch (``unclip generate``), up to the rounding of
    batched kernels."""
    if isinstance(seed, numbers.Integral):
        generator: torch.Generator | list[torch.Generator] = _generator(int(seed))
    else:
        generator = [_generator(int(s)) for s in seed]
        if len(generator) != len(prompts):
            raise ValueError(f"{len(generator)} seeds for {len(prompts)} prompts")
    text_emb, tokens = cascade.encode_text(prompts)
    result = generation.generate(
        text_emb,
        tokens,
        decoder=cascade.decoder,
        prior=cascade.prior,
        upsamplers=cascade.upsamplers,
        conditioning=cfg.conditioning,
        prior_guidance=cfg.prior_guidance,
        prior_steps=cfg.prior_steps,
        num_candidates=cfg.num_candidates,
        temperature=cfg.temperature,
        decoder_guidance=cfg.decoder_guidance,
        decoder_steps=cfg.decoder_steps,
        upsampler_steps=cfg.upsampler_steps,
        batch_size=cfg.batch_size,
        generator=generator,
    )
    return result.final


def prior_url(cfg: TextToImageConfig) -> str | None:
    """The prior a text-to-image config loads: none unless its conditioning needs one."""
    return cfg.prior if cfg.conditioning == "prior" else None


def run_sample(cfg: SampleConfig, storage: Storage | None = None) -> dict[str, Any]:
    """``unclip sample``: ``samples_per_prompt`` images of each prompt (section 2)."""
    storage = storage or Storage(cfg.storage)
    if not cfg.prompts:
        raise UserFacingError(
            'no prompts: give them on the command line (unclip sample "a red circle") '
            "or in the config (prompts: [...])"
        )
    cascade = open_cascade(cfg, storage, prior_url(cfg))
    per = cfg.samples_per_prompt
    rows = [prompt for prompt in cfg.prompts for _ in range(per)]
    images = generate_images(cascade, cfg, rows, cfg.seed)
    files = [
        (
            f"{i:03d}_{slug(prompt)}.png",
            images[i],
            {"prompt": prompt, "sample": i % per, "seed": cfg.seed},
        )
        for i, prompt in enumerate(rows)
    ]
    pixels = pictures.to_uint8(images)
    grid_rows = [list(pixels[p * per : (p + 1) * per]) for p in range(len(cfg.prompts))]
    extra = {
        "conditioning": cfg.conditioning,
        "batch_size": cfg.batch_size,
        "prompts": list(cfg.prompts),
    }
    return _write_outputs(
        storage, cfg, cascade, "sample", files, grid_rows, list(cfg.prompts), extra
    )


# ----------------------------------------------------------------------------------------------
# Section 3: manipulations of images


def _inputs(cfg: Any, storage: Storage) -> list[Any]:
    """The config's input images as PIL images (paths relative to the root unless absolute)."""
    return [read_image(storage, cfg.url(path)) for path in cfg.images]


def _name(path: str) -> str:
    return slug(os.path.splitext(basename(path))[0])


def _shown(images: Sequence[Any], side: int) -> list[Any]:
    """Input images as grid cells at the output resolution."""
    return [square(image, side) for image in images]


def _latent(cascade: Cascade, cfg: CascadeConfig, images: Sequence[Any], emb: torch.Tensor):
    """The DDIM-inverted x_T of images under the decoder (section 3's bipartite latent), with the
    decoding's steps and guidance so that η = 0 reconstructs them."""
    return generation.invert(
        cascade.decoder,
        cascade.decoder_images(images),
        emb,
        None,
        guidance_scale=cfg.decoder_guidance,
        steps=cfg.decoder_steps,
    )


def run_variations(cfg: VariationsConfig, storage: Storage | None = None) -> dict[str, Any]:
    """``unclip variations``: ``num`` variations of each image (section 3.1): its CLIP image
    embedding z_i kept, decoded with DDIM η = ``eta`` from its inverted (or a random) x_T."""
    storage = storage or Storage(cfg.storage)
    if not cfg.images:
        raise UserFacingError("no images: give them on the command line (unclip variations a.png)")
    cascade = open_cascade(cfg, storage)
    images = _inputs(cfg, storage)
    emb = cascade.encode_images(images)
    latent = _latent(cascade, cfg, images, emb) if cfg.latent == "inverted" else None
    result = generation.variations(
        cascade.decoder,
        emb,
        None,
        num=cfg.num,
        eta=cfg.eta,
        latent=latent,
        upsamplers=cascade.upsamplers,
        generator=_generator(cfg.seed),
        **_steps(cfg),
    )
    final, side = result.final, cascade.resolutions[-1]
    files, grid_rows = [], []
    pixels = pictures.to_uint8(final)
    for i, (path, shown) in enumerate(zip(cfg.images, _shown(images, side), strict=True)):
        for j in range(cfg.num):
            record = {"input": path, "variation": j, "seed": cfg.seed}
            files.append((f"{i:03d}_{_name(path)}_{j:02d}.png", final[i * cfg.num + j], record))
        grid_rows.append([shown, *pixels[i * cfg.num : (i + 1) * cfg.num]])
    captions = [
        f"{basename(p)}: input, then {cfg.num} variations (eta {cfg.eta:g})" for p in cfg.images
    ]
    extra = {"eta": cfg.eta, "latent": cfg.latent, "inputs": list(cfg.images)}
    return _write_outputs(storage, cfg, cascade, "variations", files, grid_rows, captions, extra)


def run_interpolate(cfg: InterpolateConfig, storage: Storage | None = None) -> dict[str, Any]:
    """``unclip interpolate``: z_iθ = slerp(z_i1, z_i2, θ) for ``num`` θ in [0, 1] (section 3.2),
    decoded with DDIM η = 0 from one fixed random x_T or the slerp of the images' inverted x_T."""
    storage = storage or Storage(cfg.storage)
    if len(cfg.images) != 2:
        raise UserFacingError(
            f"interpolate needs two images, got {len(cfg.images)}: unclip interpolate a.png b.png"
        )
    cascade = open_cascade(cfg, storage)
    images = _inputs(cfg, storage)
    emb = cascade.encode_images(images)
    latents = None
    if cfg.latent == "inverted":
        inverted = _latent(cascade, cfg, images, emb)
        latents = (inverted[:1], inverted[1:])
    result = generation.interpolate(
        cascade.decoder,
        emb[:1],
        emb[1:],
        None,
        num=cfg.num,
        latents=latents,
        upsamplers=cascade.upsamplers,
        generator=_generator(cfg.seed),
        **_steps(cfg),
    )
    final, thetas = result.final, result.theta.tolist()
    a, b = cfg.images
    files = [
        (f"{j:03d}_theta-{theta:.2f}.png", final[j], {"theta": theta, "seed": cfg.seed})
        for j, theta in enumerate(thetas)
    ]
    first, last = _shown(images, cascade.resolutions[-1])
    grid_rows = [[first, *pictures.to_uint8(final), last]]
    captions = [f"{basename(a)} to {basename(b)}: {cfg.num} steps of theta from 0 to 1"]
    extra = {"latent": cfg.latent, "inputs": [a, b]}
    return _write_outputs(storage, cfg, cascade, "interpolate", files, grid_rows, captions, extra)


def run_textdiff(cfg: TextDiffConfig, storage: Storage | None = None) -> dict[str, Any]:
    """``unclip textdiff``: each image's z_i rotated towards the text diff z_d = normalize(z_t −
    z_t0) of ``to_caption`` and ``from_caption`` (section 3.3), θ in [0, ``max_theta``], decoded
    with DDIM η = 0 from the image's inverted x_T (θ = 0 reconstructs the image)."""
    storage = storage or Storage(cfg.storage)
    if not cfg.images:
        raise UserFacingError(
            'no images: unclip textdiff a.png --from "a photo of a cat" --to "a photo of a dog"'
        )
    if not cfg.from_caption.strip() or not cfg.to_caption.strip():
        raise UserFacingError(
            'a text diff needs both captions: --from "what the image shows" --to "what it should"'
        )
    cascade = open_cascade(cfg, storage)
    images = _inputs(cfg, storage)
    emb = cascade.encode_images(images)
    n = len(images)
    from_emb, _ = cascade.encode_text([cfg.from_caption] * n)
    to_emb, _ = cascade.encode_text([cfg.to_caption] * n)
    result = generation.text_diff(
        cascade.decoder,
        emb,
        from_emb,
        to_emb,
        None,
        num=cfg.num,
        max_theta=cfg.max_theta,
        latent=_latent(cascade, cfg, images, emb),
        upsamplers=cascade.upsamplers,
        generator=_generator(cfg.seed),
        **_steps(cfg),
    )
    final, thetas = result.final, result.theta.tolist()
    files, grid_rows = [], []
    pixels = pictures.to_uint8(final)
    for i, (path, shown) in enumerate(
        zip(cfg.images, _shown(images, cascade.resolutions[-1]), strict=True)
    ):
        for j in range(cfg.num):
            row = i * cfg.num + j
            record = {"input": path, "theta": thetas[row], "seed": cfg.seed}
            files.append((f"{i:03d}_{_name(path)}_{j:02d}.png", final[row], record))
        grid_rows.append([shown, *pixels[i * cfg.num : (i + 1) * cfg.num]])
    captions = [
        f"{basename(p)}: {cfg.from_caption!r} to {cfg.to_caption!r}, theta up to {cfg.max_theta:g}"
        for p in cfg.images
    ]
    extra = {
        "from_caption": cfg.from_caption,
        "to_caption": cfg.to_caption,
        "max_theta": cfg.max_theta,
        "inputs": list(cfg.images),
    }
    return _write_outputs(storage, cfg, cascade, "textdiff", files, grid_rows, captions, extra)
