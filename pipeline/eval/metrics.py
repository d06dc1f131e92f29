"""Evaluation metrics for ``unclip eval``: Fréchet distance, CLIP score, Inception features for FID,
and attribute accuracy on the captioned-shapes dataset. CPU-friendly, no network, no downloads.

* **Fréchet distance** (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to
  a Local Nash Equilibrium") between Gaussians fitted to two feature sets: FID on Inception pool
  features, "FD in CLIP space" on CLIP image embeddings (same function, other features).
* **CLIP score**: how well image embeddings match their captions' text embeddings (after Hessel et
  al. 2021, "CLIPScore"), on embeddings the caller computed with the run's CLIP.
* **Inception features** from a local torchvision Inception-v3 weights file: the user gives the file,
  nothing is downloaded (:func:`load_inception`).
* **Attribute accuracy**: for the captioned-shapes dataset, whether each ``(color, shape)`` a prompt
  names is in the generated image, read by the geometric :mod:`pipeline.data.shape_checker`,
  with a 95% bootstrap interval over prompts (:func:`attribute_totals`), and the paired difference
  of two conditionings scored on the same prompts and seeds (:func:`paired_difference`).

Everything takes numpy arrays or tensors and returns plain floats, arrays or dicts; reading images,
running CLIP and writing results are the eval job's business.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.data.shape_checker import check_image
from pipeline.data.shapes import parse_caption
from pipeline.errors import UserFacingError

__all__ = [
    "INCEPTION_FEATURE_DIM",
    "INCEPTION_SIZE",
    "FeatureStats",
    "InceptionFeatures",
    "attribute_accuracy",
    "attribute_totals",
    "clip_score",
    "clip_scores",
    "feature_stats",
    "frechet_distance",
    "frechet_distance_features",
    "inception_features",
    "load_inception",
    "paired_difference",
]

INCEPTION_SIZE = 299  # Inception-v3's input side
INCEPTION_FEATURE_DIM = 2048  # its pool features, the input of the classifier


# ---------------------------------------------------------------------------------------------
# Fréchet distance


@dataclass(frozen=True)
class FeatureStats:
    """The Gaussian fitted to a feature set: mean (D,), unbiased covariance (D, D), row count."""

    mean: np.ndarray
    cov: np.ndarray
    count: int

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])


def feature_stats(features: np.ndarray | Tensor) -> FeatureStats:
    """Mean and unbiased covariance (float64) of an (N, D) feature matrix, N >= 2."""
    x = _as_float64(features)
    if x.ndim != 2:
        raise ValueError(f"expected an (N, D) feature matrix, got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"feature statistics need at least 2 rows, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    return FeatureStats(mean=x.mean(axis=0), cov=np.cov(x, rowvar=False), count=int(x.shape[0]))


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (eigenvalues below
    zero, which rounding makes of a singular covariance, are taken as zero)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """Fréchet distance between two Gaussians (Heusel et al. 2017, the FID formula):
    ``||mu_a - mu_b||² + Tr(C_a + C_b - 2 (C_a C_b)^½)``.

    ``Tr (C_a C_b)^½`` is computed as the sum of the square roots of the eigenvalues of
    ``C_a^½ C_b C_a^½``, which has the same eigenvalues as ``C_a C_b`` but is symmetric positive
    semi-definite: a symmetric eigendecomposition, no complex parts to drop, and singular
    covariances (fewer samples than dimensions) need no added ``eps`` as with ``scipy.linalg.sqrtm``
    of the non-symmetric product. Rounding below zero is clamped, so identical statistics give 0.
    """
    if a.dim != b.dim:
        raise ValueError(f"feature dimensions differ: {a.dim} vs {b.dim}")
    diff = a.mean - b.mean
    root_a = _sqrt_psd(a.cov)
    inner = root_a @ b.cov @ root_a
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    distance = float(diff @ diff) + float(np.trace(a.cov) + np.trace(b.cov)) - 2.0 * trace_sqrt
    return max(distance, 0.0)


def frechet_distance_features(x: np.ndarray | Tensor, y: np.ndarray | Tensor) -> float:
    """:func:`frechet_distance` between the Gaussians fitted to two (N, D) feature matrices; with
    fewer rows than dimensions, by the exact O(n·m·D) form of :func:`_frechet_distance_few`."""
    x, y = _as_float64(x), _as_float64(y)
    few = (
        x.ndim == y.ndim == 2
        and x.shape[1] == y.shape[1]
        and min(len(x), len(y)) >= 2
        and len(x) + len(y) < x.shape[1]
        and bool(np.isfinite(x).all() and np.isfinite(y).all())
    )
    if few:  # else feature_stats and frechet_distance check and explain the inputs
        return _frechet_distance_few(x, y)
    return frechet_distance(feature_stats(x), feature_stats(y))


def _frechet_distance_few(x: np.ndarray, y: np.ndarray) -> float:
    """:func:`frechet_distance_features` of (n, D) and (m, D) features, exactly,
    in O(n·m·D) rather than O(D³): for fewer rows than dimensions (32 images' 2048 Inception
    features), where the two D x D eigendecompositions take seconds each on a CPU.

    With A, B the centred features, C_a = AᵀA/(n-1) and C_b = BᵀB/(m-1), the non-zero eigenvalues
    of C_a C_b are those of (ABᵀ)(BAᵀ)/((n-1)(m-1)), the squared singular values of ABᵀ (n x m),
    so Tr (C_a C_b)^½ is the sum of the singular values of ABᵀ over √((n-1)(m-1)).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    a, b = x - x.mean(axis=0), y - y.mean(axis=0)
    n, m = len(x) - 1, len(y) - 1
    diff = x.mean(axis=0) - y.mean(axis=0)
    trace_sqrt = float(np.linalg.svd(a @ b.T, compute_uv=False).sum()) / math.sqrt(n * m)
    distance = float(diff @ diff) + float((a * a).sum()) / n + float((b * b).sum()) / m
    return max(distance - 2.0 * trace_sqrt, 0.0)


# ---------------------------------------------------------------------------------------------
# CLIP score


def clip_scores(image_emb: np.ndarray | Tensor, text_emb: np.ndarray | Tensor) -> np.ndarray:
    """Per pair, ``100 * max(cos(image_emb[i], text_emb[i]), 0)``: (N,) float64.

    Hessel et al. (2021) define CLIPScore as ``w * max(cos, 0)`` with ``w = 2.5`` (to spread the
    values of their CLIP); text-to-image papers report ``100 * max(cos, 0)`` averaged over prompts
    instead, and so does this project. Embeddings need not be normalised (they are here).
    """
    image, text = _as_float64(image_emb), _as_float64(text_emb)
    if image.ndim != 2 or image.shape != text.shape:
        raise ValueError(
            f"expected two (N, D) embedding matrices of the same shape, got {image.shape} and "
            f"{text.shape}"
        )
    norms = np.linalg.norm(image, axis=1) * np.linalg.norm(text, axis=1)
    cosine = (image * text).sum(axis=1) / np.maximum(norms, 1e-12)
    return 100.0 * np.clip(cosine, 0.0, None)


def clip_score(image_emb: np.ndarray | Tensor, text_emb: np.ndarray | Tensor) -> float:
    """The mean of :func:`clip_scores`: 100 for images that match their captions as well as CLIP
    can tell, 0 for unrelated (orthogonal) or opposed ones."""
    scores = clip_scores(image_emb, text_emb)
    if len(scores) == 0:
        raise ValueError("clip_score needs at least one pair")
    return float(scores.mean())


def _as_float64(array: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(array, Tensor):
        array = array.detach().cpu().float().numpy()
    return np.asarray(array, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Inception features for FID


class InceptionFeatures(nn.Module):
    """torchvision's Inception-v3 up to its 2048-d pool features, with its input preprocessing.

    Input: float images in [-1, 1], (B, 3, H, W) of any size. They are resized (bilinear,
    antialiased, as clean-fid recommends against aliasing when downsampling; Parmar et al. 2022) to
    299 x 299 and passed on as they are: torchvision's ImageNet weights (ported from Google's) want
    pixels in [-1, 1], which torchvision's own pipeline gets by normalising with the ImageNet mean
    and std and undoing that with ``transform_input=True``. Scaling [0, 1] to [-1, 1] directly is
    the same thing, and what pytorch-fid does.

    These are torchvision's Inception weights (``inception_v3_google-*.pth``), not the TF-FID graph
    (``pt_inception-2015-12-05``) that the published FID numbers use: FIDs are comparable between
    runs of this project, not with papers' numbers.
    """

    def __init__(self, inception: nn.Module) -> None:
        super().__init__()
        inception.fc = nn.Identity()  # the pool features, not the ImageNet logits
        self.inception = inception.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> InceptionFeatures:
        """Stays in eval mode (batch-norm running statistics, no dropout, no auxiliary head)."""
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        x = images.float().clamp(-1, 1)
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = F.interpolate(
                x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", antialias=True
            )
        return self.inception(x)


def _read_state_dict(path: str) -> dict[str, Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserFacingError(f"Inception weights {path}: expected a state dict, got {type(state)}")
    return state


def _few(names: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(sorted(names)[:n])
    return shown + (", ..." if len(names) > n else "")


def load_inception(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> InceptionFeatures:
    """:class:`InceptionFeatures` with torchvision's Inception-v3 weights from a local file.

    ``path`` is a ``.safetensors`` file or a torch state dict (``.pt``/``.pth``, loaded with
    ``weights_only=True``), such as torchvision's ``inception_v3_google-0cc3c7bd.pth``. The load is
    strict: every weight of the network must be in the file and nothing else, so a wrong file fails
    here with the missing and unexpected names, not later as a meaningless FID. The auxiliary
    classifier (``AuxLogits.*``) and the final classifier (``fc.*``), which the features do not
    use, may be absent.
    """
    from torchvision.models import inception_v3

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserFacingError(f"Inception weights {path} do not exist (a local file is needed)")
    try:
        state = _read_state_dict(path)
    except UserFacingError:
        raise
    except Exception as exc:
        raise UserFacingError(f"Inception weights {path}: cannot read ({exc})") from None
    model = inception_v3(
        weights=None,
        aux_logits=any(k.startswith("AuxLogits.") for k in state),
        init_weights=False,
        transform_input=False,
    )
    if not any(k.startswith("fc.") for k in state):
        model.fc = nn.Identity()
    expected = model.state_dict().keys()
    missing, unexpected = list(expected - state.keys()), list(state.keys() - expected)
    if missing or unexpected:
        raise UserFacingError(
            f"Inception weights {path} do not fit torchvision's inception_v3: "
            f"{len(missing)} missing keys ({_few(missing)}), "
            f"{len(unexpected)} unexpected keys ({_few(unexpected)})"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shape mismatches: one line per tensor, kept on one line
        lines = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        raise UserFacingError(
            f"Inception weights {path} do not fit torchvision's inception_v3: "
            + ("; ".join(lines) if lines else str(exc))
        ) from None
    return InceptionFeatures(model).to(device)


@torch.no_grad()
def inception_features(
    model: InceptionFeatures, images: Tensor, batch_size: int = 50
) -> np.ndarray:
    """(N, 2048) float64 pool features of (N, 3, H, W) images in [-1, 1], ``batch_size`` at a time on
    the model's device."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    out = [
        model(images[i : i + batch_size].to(device)).double().cpu()
        for i in range(0, len(images), batch_size)
    ]
    if not out:
        return np.zeros((0, INCEPTION_FEATURE_DIM))
    return torch.cat(out).numpy()


# ---------------------------------------------------------------------------------------------
# Attribute accuracy (captioned-shapes dataset)


BOOTSTRAP_RESAMPLES = 2000  # resamples of the prompts behind each interval
BOOTSTRAP_SEED = 0  # fixed: the same rows give the same interval
CONFIDENCE = 0.95
_GATHER_LIMIT = 1 << 20  # prompt indices drawn at once, to bound the memory of a resample block


def attribute_row(image: np.ndarray, caption: str) -> dict[str, Any]:
    """One image's check against its caption: ``objects`` named, how many have their ``color``
    present and their ``shape`` right, and the ``checks`` (:class:`ObjectCheck` fields); no
    objects when the caption names no ``(color, shape)``. What :func:`attribute_totals` adds up,
    so that images scored on different processes add up to what one process would give."""
    asked = parse_caption(caption)
    checks = check_image(np.asarray(image), asked) if asked else []
    return {
        "objects": len(checks),
        "color_ok": sum(c.color_ok for c in checks),
        "shape_ok": sum(c.shape_ok for c in checks),
        "checks": [asdict(c) for c in checks],
    }


def attribute_totals(rows: Sequence[dict[str, Any]], *, per_prompt: int = 1) -> dict[str, Any]:
    """The accuracies of :func:`attribute_accuracy` from its rows (:func:`attribute_row`), with
    ``color_ci`` and ``shape_ci``: their 95% bootstrap intervals over prompts, ``[lo, hi]``
    (None when no row names an object).

    ``rows`` come prompt-major, ``per_prompt`` images of a prompt after one another (what
    ``unclip eval`` generates). The prompt, not the image, is what is resampled: the images of one
    prompt share its caption and its difficulty, so they succeed or fail together and are not
    independent draws; resampling images would count ``per_prompt`` correlated images as that many
    independent ones and give too narrow an interval. Each resample draws as many prompts with
    replacement, each carrying all its images' objects, and takes the accuracy as the objects
    right over the objects named (the same ratio as the point estimate). The interval is the
    percentile interval (Efron & Tibshirani 1993, "An Introduction to the Bootstrap", ch. 13) of
    :data:`BOOTSTRAP_RESAMPLES` resamples, from a fixed seed: the same rows give the same
    interval. With one prompt it is that prompt's accuracy twice.
    """
    parsed = [r for r in rows if r["objects"]]
    objects = sum(r["objects"] for r in parsed)
    color_ok = sum(r["color_ok"] for r in parsed)
    shape_ok = sum(r["shape_ok"] for r in parsed)
    all_ok = sum(r["shape_ok"] == r["objects"] for r in parsed)
    counts = _prompt_counts(rows, per_prompt)
    sums = _bootstrap_sums(counts) if len(counts) else None
    return {
        "color": color_ok / objects if objects else math.nan,
        "shape": shape_ok / objects if objects else math.nan,
        "all": all_ok / len(parsed) if parsed else math.nan,
        "color_ci": _percentile_interval(sums[:, 1] / sums[:, 0]) if sums is not None else None,
        "shape_ci": _percentile_interval(sums[:, 2] / sums[:, 0]) if sums is not None else None,
        "objects": objects,
        "images": len(parsed),
        "unparsed": len(rows) - len(parsed),
    }


def paired_difference(
    rows_a: Sequence[dict[str, Any]],
    rows_b: Sequence[dict[str, Any]],
    per_prompt: int,
    key: str,
) -> dict[str, Any]:
    """The difference of two conditionings' ``key`` accuracy (``"color"`` or ``"shape"``),
    ``a - b``, with its 95% paired bootstrap interval: ``{"difference", "ci": [lo, hi],
    "prompts"}`` (``prompts``: those naming an object, the ones resampled).

    Both row lists (:func:`attribute_row`, ``per_prompt`` images of a prompt after one another, as
    in :func:`attribute_totals`) must come from the same prompts and seeds. Each resample draws
    the prompts once and applies the draw to both, so what the prompts have in common (an easy
    prompt is easy for both) cancels out of the difference: the interval is that of the
    difference, narrower than the two accuracies' intervals side by side suggest. An interval
    that excludes 0 is a difference that the choice of prompts does not explain. NaN and None
    when no prompt names an object.
    """
    if key not in ("color", "shape"):
        raise ValueError(f"key must be 'color' or 'shape', got {key!r}")
    if len(rows_a) != len(rows_b):
        raise ValueError(f"paired rows differ in number: {len(rows_a)} vs {len(rows_b)}")
    a = _prompt_counts(rows_a, per_prompt, keep_all=True)
    b = _prompt_counts(rows_b, per_prompt, keep_all=True)
    if not np.array_equal(a[:, 0], b[:, 0]):
        raise ValueError("paired rows name different objects: not the same prompts")
    named = a[:, 0] > 0
    a, b = a[named], b[named]
    if not len(a):
        return {"difference": math.nan, "ci": None, "prompts": 0}
    column = 1 if key == "color" else 2
    difference = a[:, column].sum() / a[:, 0].sum() - b[:, column].sum() / b[:, 0].sum()
    sums = _bootstrap_sums(np.concatenate([a, b], axis=1))
    resampled = sums[:, column] / sums[:, 0] - sums[:, 3 + column] / sums[:, 3]
    return {
        "difference": float(difference),
        "ci": _percentile_interval(resampled),
        "prompts": len(a),
    }


def _prompt_counts(
    rows: Sequence[dict[str, Any]], per_prompt: int, keep_all: bool = False
) -> np.ndarray:
    """Per prompt, its images' ``(objects, color_ok, shape_ok)`` added up: (P, 3) float64, the
    prompts that name no object left out (unless ``keep_all``)."""
    if per_prompt < 1:
        raise ValueError(f"per_prompt must be >= 1, got {per_prompt}")
    if len(rows) % per_prompt:
        raise ValueError(f"{len(rows)} rows are not whole prompts of {per_prompt} images")
    counts = np.array(
        [[r["objects"], r["color_ok"], r["shape_ok"]] for r in rows], dtype=np.float64
    ).reshape(-1, per_prompt, 3)
    counts = counts.sum(axis=1)
    return counts if keep_all else counts[counts[:, 0] > 0]


def _bootstrap_sums(counts: np.ndarray) -> np.ndarray:
    """The column sums of :data:`BOOTSTRAP_RESAMPLES` resamples of the (P, K) rows of ``counts``
    (P rows drawn with replacement each time, from :data:`BOOTSTRAP_SEED`): (resamples, K)."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    prompts = len(counts)
    block = max(1, _GATHER_LIMIT // prompts)
    sums = np.empty((BOOTSTRAP_RESAMPLES, counts.shape[1]))
    for start in range(0, BOOTSTRAP_RESAMPLES, block):
        stop = min(start + block, BOOTSTRAP_RESAMPLES)
        drawn = rng.integers(0, prompts, size=(stop - start, prompts))
        sums[start:stop] = counts[drawn].sum(axis=1)
    return sums


def _percentile_interval(statistics: np.ndarray) -> list[float]:
    """The central :data:`CONFIDENCE` interval of the resampled ``statistics``: ``[lo, hi]``."""
    tail = 100 * (1 - CONFIDENCE) / 2
    lo, hi = np.percentile(statistics, [tail, 100 - tail])
    return [float(lo), float(hi)]


def attribute_accuracy(
    images: Sequence[np.ndarray], captions: Sequence[str], *, rows: bool = False
) -> dict[str, Any]:
    """How often the ``(color, shape)`` objects named by each caption are in its image.

    Each caption is parsed with :func:`pipeline.data.shapes.parse_caption` and its image (HxWx3 uint8,
    :func:`pipeline.pictures.to_uint8` for generated ones) checked with
    :func:`pipeline.data.shape_checker.check_image`. Returns:

    * ``color``: the fraction of named objects whose colour is present;
    * ``shape``: the fraction whose colour is present as the named shape (so ``shape <= color``);
    * ``all``: the fraction of images in which every named object is right (colour and shape);
    * ``color_ci``, ``shape_ci``: 95% bootstrap intervals of ``color`` and ``shape``, each image
      its own prompt (:func:`attribute_totals`);
    * ``objects``, ``images``: the named objects and the images they come from;
    * ``unparsed``: captions that name no ``(color, shape)`` (free prompts): excluded from the rest;
    * ``rows`` (with ``rows=True``): per caption, ``{"caption", "objects": [ObjectCheck fields]}``,
      unparsed captions with an empty list.

    Fractions are NaN when no caption names an object.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    checked = [attribute_row(i, c) for i, c in zip(images, captions, strict=True)]
    result = attribute_totals(checked)
    if rows:
        result["rows"] = [
            {"caption": c, "objects": r["checks"]} for c, r in zip(captions, checked, strict=True)
        ]
    return result
