"""The evaluation's report: ``report.md`` (one table row per conditioning, what each column means,
the notes, links to the pictures) and ``metrics.png`` (bars of attribute accuracy and CLIP score),
both read from the ``report.json`` dictionary that :func:`pipeline.eval.run.run_eval` builds."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pipeline import pictures

TRAIN, HELDOUT = "train", "heldout"
"""The prompt sets: captions like the training ones, and captions naming a held-out pair."""

METRIC_DOCS: dict[str, str] = {
    "CLIP score": "100 × the cosine between each generated image's CLIP image embedding and its "
    "prompt's CLIP text embedding (the store's CLIP), averaged; higher follows the prompt better",
    "FD (CLIP)": "Fréchet distance between the generated and the real images' CLIP image "
    "embeddings (the first prompt set); lower is closer to the data",
    "FID": "the same on Inception-v3 pool features at the final resolution (torchvision's "
    "weights: comparable between runs of this project, not with published FIDs)",
    "colour, shape": "of the (colour, shape) objects a prompt names, the fraction whose colour is "
    "in the image, and whose colour is drawn as the named shape (a geometric checker; prompts "
    "that name none are left out)",
    "held-out": "the same on prompts that name a colour-shape pair the training data left out",
    "@64px": "the same on the decoder's output (64px in the paper), before the upsamplers",
}


def lookup(entry: dict[str, Any] | None, *path: str) -> Any:
    for key in path:
        if not isinstance(entry, dict):
            return None
        entry = entry.get(key)
    return entry


def ordered(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The report's conditionings in the order evaluated (JSON files sort their keys)."""
    return [(name, report["conditionings"][name]) for name in report["order"]]


def json_safe(value: Any) -> Any:
    """JSON-safe data: NaN and infinities as null, numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _columns(report: dict[str, Any]) -> list[tuple[str, tuple[str, ...], str]]:
    """The Markdown table's columns: (header, path into a conditioning's entry, format)."""
    low = f"@{report['resolutions'][0]}px"
    held = HELDOUT in report["prompts"]
    columns = [
        ("CLIP score", ("sets", TRAIN, "clip_score"), "score"),
        ("CLIP score, held-out", ("sets", HELDOUT, "clip_score"), "score"),
        ("FD (CLIP)", ("fd_clip",), "distance"),
        ("FID", ("fid",), "distance"),
        ("colour", ("sets", TRAIN, "attributes", "color"), "pct"),
        ("shape", ("sets", TRAIN, "attributes", "shape"), "pct"),
        ("held-out colour", ("sets", HELDOUT, "attributes", "color"), "pct"),
        ("held-out shape", ("sets", HELDOUT, "attributes", "shape"), "pct"),
        (f"shape {low}", ("sets", TRAIN, "attributes_decoder", "shape"), "pct"),
        (f"held-out shape {low}", ("sets", HELDOUT, "attributes_decoder", "shape"), "pct"),
    ]
    return [c for c in columns if held or "held-out" not in c[0]]


def _format(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if kind == "pct":
        return f"{100 * value:.0f}%"
    if kind == "score":
        return f"{value:.1f}"
    return f"{value:.4g}"


def markdown_report(report: dict[str, Any]) -> str:
    """``report.md``: what was evaluated, one table row per conditioning (and the real images),
    what each column means, the notes, and links to the pictures."""
    checkpoints = report["checkpoints"]
    stages = [f"decoder `{checkpoints['decoder']['url']}` (step {checkpoints['decoder']['step']})"]
    stages += [f"upsampler `{u['url']}` (step {u['step']})" for u in checkpoints["upsamplers"]]
    for key in ("prior", "ar_prior"):
        if checkpoints.get(key):
            stages.append(f"{key} `{checkpoints[key]['url']}` (step {checkpoints[key]['step']})")
    prompts = report["prompts"]
    sets = [f"{len(prompts[TRAIN])} prompts ({report['prompt_sources'][TRAIN]})"]
    if HELDOUT in prompts:
        pairs = ", ".join(report["config"]["heldout_pairs"])
        sets.append(f"{len(prompts[HELDOUT])} held-out prompts (each names one of: {pairs})")
    sides = " → ".join(f"{side}px" for side in report["resolutions"])
    columns = _columns(report)
    lines = [
        "# unCLIP evaluation: the decoder's conditionings compared (DALL-E 2 §5.1, figure 7)",
        "",
        f"Checkpoints: {'; '.join(stages)}. CLIP: `{checkpoints['clip']}`.",
        "",
        f"{' and '.join(sets)}; {report['config']['samples_per_prompt']} image(s) per prompt, "
        f"seed {report['config']['seed']}, {sides}; {report['real']['images']} real images.",
        "",
        *([samples_sentence(report["samples"]), ""] if report.get("samples") else []),
        "| conditioning | " + " | ".join(header for header, _, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for _, entry in [*ordered(report), ("real", report["real"])]:
        cells = [_format(lookup(entry, *path), kind) for _, path, kind in columns]
        lines.append(f"| {entry['label']} | " + " | ".join(cells) + " |")
    lines += ["", "What the columns mean:", ""]
    low = f"@{report['resolutions'][0]}px"
    docs = {(low if name == "@64px" else name): doc for name, doc in METRIC_DOCS.items()}
    lines += [f"- **{name}**: {doc}." for name, doc in docs.items()]
    if report["notes"]:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in report["notes"]]
    links = " · ".join(f"[{entry['label']}]({entry['grid']})" for _, entry in ordered(report))
    lines += [
        "",
        f"![attribute accuracy and CLIP score per conditioning]({report['plot']})",
        "",
        f"Sample grids, one row per prompt: {links}",
        "",
    ]
    return "\n".join(lines)


def samples_sentence(samples: dict[str, Any]) -> str:
    """What each figure rests on, in words (``report.json``'s ``samples``, built by
    :func:`pipeline.eval.run.sample_counts`): a difference between conditionings smaller than the
    noise of a few dozen images means nothing, so the reader is told the counts."""
    per = samples["per_prompt"]

    def images(name: str) -> str:
        counts = samples["sets"][name]
        return f"{counts['prompts']} prompts × {per} = {counts['images']} images"

    held = f" (held-out: {images(HELDOUT)})" if HELDOUT in samples["sets"] else ""
    fd = samples["fd_clip"]
    fid = samples.get("fid")
    fid_text = (
        f"FID {fid['generated']} generated with {fid['real']} real images"
        if fid
        else "FID not computed"
    )
    return (
        f"Samples: each conditioning's CLIP score and attribute accuracy rest on {images(TRAIN)}"
        f"{held}; FD (CLIP) compares {fd['generated']} generated images with {fd['real']} real "
        f"images, {fid_text}; the real row rests on {samples['real']} real images, drawn from "
        f"{samples['store_files']} store file(s)."
    )


def plot_png(report: dict[str, Any]) -> bytes:
    """Bars of attribute accuracy and CLIP score per conditioning (and the real images)."""
    entries = [*ordered(report), ("real", report["real"])]
    groups = [name for name, _ in entries]
    held = HELDOUT in report["prompts"]

    def values(*path: str) -> list[float | None]:
        return [lookup(entry, *path) for _, entry in entries]

    accuracy = [
        ("colour", values("sets", TRAIN, "attributes", "color")),
        ("shape", values("sets", TRAIN, "attributes", "shape")),
    ]
    scores = [("prompts", values("sets", TRAIN, "clip_score"))]
    if held:
        accuracy += [
            ("held-out colour", values("sets", HELDOUT, "attributes", "color")),
            ("held-out shape", values("sets", HELDOUT, "attributes", "shape")),
        ]
        scores.append(("held-out", values("sets", HELDOUT, "clip_score")))
    finite = [v for _, vs in scores for v in vs if v is not None and math.isfinite(v)]
    top = max(10.0, 10.0 * math.ceil(max(finite, default=100.0) * 1.1 / 10))
    return pictures.bar_chart_png(
        groups,
        [
            ("attribute accuracy (final images)", accuracy, 1.0),
            ("CLIP score (100 x cosine)", scores, min(top, 100.0)),
        ],
    )


def rounded(timings: Any) -> Any:
    if isinstance(timings, dict):
        return {k: rounded(v) for k, v in timings.items()}
    return round(float(timings), 3)
