"""The encoder: an open_clip model held by a Ray actor, turning batches of model inputs into unit
CLIP embeddings, and what is known of a CLIP before its weights load.

An actor holds one model (on its GPU when it has one) and serves every shard task that sends it a
batch (:mod:`pipeline.embed.shard_task`); its calls run one at a time, in the order they arrive,
so several tasks keep it busy while each decodes its next batch. It counts the rows it encoded,
which the driver reads (on a concurrency group of its own, so the question never waits behind a
batch) to tell a slow job from a stalled one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.embed import clip_model
from pipeline.stage_config import ClipSource
from pipeline.storage import Storage

# The encoder actor's concurrency groups: batches one at a time (the default group), and the
# driver's progress questions beside them.
STATUS_GROUP = "status"


def embedding_problems(image_emb: np.ndarray, text_emb: np.ndarray) -> list[str]:
    """Per row, why its embeddings are unusable ("" when they are fine): a NaN or inf anywhere
    (an fp16 overflow, a broken checkpoint), or a zero vector, which has no direction to
    normalise (the store holds unit vectors)."""
    out = []
    for img, txt in zip(image_emb, text_emb, strict=True):
        if not (np.isfinite(img).all() and np.isfinite(txt).all()):
            out.append("non-finite embedding")
        elif min(np.linalg.norm(img), np.linalg.norm(txt)) < 1e-6:
            out.append("zero embedding")
        else:
            out.append("")
    return out


class ClipEncoder:
    """Loads the CLIP once, then encodes batches of (pixels, tokens).

    On a GPU: pinned host batches copied asynchronously, autocast in half precision (fp16 by
    default, bf16 if configured). On CPU the same code runs in float32.
    """

    def __init__(
        self,
        source: ClipSource,
        checkpoint: clip_model.Checkpoint | None,
        storage: Storage,
        precision: str,
        threads: int | None,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.clip = clip_model.load_clip(source, checkpoint, self.device, storage)
        if precision == "auto":
            precision = "fp16" if self.device == "cuda" else "fp32"
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
            precision
        ]
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.rows = 0

    def encode(
        self, pixels: np.ndarray, tokens: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """``pixels`` (B, H, W, 3) uint8, resized and cropped; ``tokens`` (B, L) int32 →
        L2-normalised image and text embeddings (B, D) float16, and per row why it is unusable
        ("" when fine, :func:`embedding_problems`; an unusable row's embeddings are zeros)."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(pixels))
        t = torch.from_numpy(np.ascontiguousarray(tokens)).long()
        if self.device == "cuda":
            x, t = x.pin_memory(), t.pin_memory()
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float() / 255
        t = t.to(self.device, non_blocking=True)
        x = (x - self.mean) / self.std
        with (
            torch.no_grad(),
            torch.autocast(self.device, self.dtype, enabled=self.dtype != torch.float32),
        ):
            img = self.clip.model.encode_image(x).float()
            txt = self.clip.model.encode_text(t).float()
        img, txt = img.cpu().numpy(), txt.cpu().numpy()
        problems = embedding_problems(img, txt)
        bad = np.asarray([bool(p) for p in problems])
        img = img / np.maximum(np.linalg.norm(img, axis=-1, keepdims=True), 1e-12)
        txt = txt / np.maximum(np.linalg.norm(txt, axis=-1, keepdims=True), 1e-12)
        img[bad], txt[bad] = 0.0, 0.0
        self.rows += len(pixels)
        return (
            np.nan_to_num(img).astype(np.float16),
            np.nan_to_num(txt).astype(np.float16),
            problems,
        )

    def encoded(self) -> int:
        """Rows encoded since the actor (re)started."""
        return self.rows


def describe_clip(
    source: ClipSource, checkpoint: clip_model.Checkpoint | None
) -> tuple[Any, tuple, tuple, int, int, int]:
    """The CLIP's preprocessing and sizes, without loading its weights: (image transform, mean,
    std, image size, context length, embedding dim)."""
    import open_clip

    clip_model.require_model(source)
    config = open_clip.get_model_config(source.model)
    tag = None if checkpoint else source.pretrained
    _, _, preprocess = open_clip.create_model_and_transforms(
        source.model, pretrained=tag, load_weights=False
    )
    transform, mean, std = clip_model.split_preprocess(preprocess, source.model)
    return (
        transform,
        mean,
        std,
        clip_model.image_size_of(config),
        int(config.get("text_cfg", {}).get("context_length", 77)),
        int(config["embed_dim"]),
    )
