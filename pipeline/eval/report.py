"""The evaluation's report: ``report.md`` (one table row per conditioning, the accuracies with
their intervals, what each column means, each prior against no prior, the notes, links to the
pictures) and ``metrics.png`` (bars of attribute accuracy and CLIP score), both read from the
``report.json`` dictionary that :func:`pipeline.eval.run.run_eval` builds."""

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
    "(lo–hi)": "beside an accuracy, its 95% bootstrap interval over prompts (percentile "
    "interval of 2000 resamples of the prompts, each with all its images, as the images of one "
    "prompt are not independent): how far the figure could move with other prompts like these",
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
        (f"colour {low}", ("sets", TRAIN, "attributes_decoder", "color"), "pct"),
        (f"shape {low}", ("sets", TRAIN, "attributes_decoder", "shape"), "pct"),
        (f"held-out colour {low}", ("sets", HELDOUT, "attributes_decoder", "color"), "pct"),
        (f"held-out shape {low}", ("sets", HELDOUT, "attributes_decoder", "shape"), "pct"),
    ]
    return [c for c in columns if held or "held-out" not in c[0]]


def _cell(entry: dict[str, Any], path: tuple[str, ...], kind: str) -> str:
    """A table cell: the value at ``path``, and for an accuracy its interval (the sibling key
    ``<key>_ci``, as :func:`pipeline.eval.metrics.attribute_totals` writes it) when there is one."""
    value = lookup(entry, *path)
    if kind != "pct":
        return _format(value, kind)
    return format_pct_ci(value, lookup(entry, *path[:-1], f"{path[-1]}_ci"))


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _interval(ci: Any) -> tuple[float, float] | None:
    """``[lo, hi]`` as a pair of finite numbers, or None (missing, or null in ``report.json``)."""
    if isinstance(ci, list | tuple) and len(ci) == 2 and all(_finite(b) for b in ci):
        return float(ci[0]), float(ci[1])
    return None


def format_pct_ci(value: Any, ci: Any) -> str:
    """An accuracy in percent with its interval, ``94% (89–98)``; the accuracy alone when the
    interval is missing, ``–`` when the accuracy is."""
    text, bounds = _format(value, "pct"), _interval(ci)
    if text == "–" or bounds is None:
        return text
    return f"{text} ({100 * bounds[0]:.0f}–{100 * bounds[1]:.0f})"


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
        cells = [_cell(entry, path, kind) for _, path, kind in columns]
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
        *comparison_section(report),  # last: a section of its own, nothing after its heading
        "",
    ]
    return "\n".join(lines)


SET_NAMES = {TRAIN: "training-like", HELDOUT: "held-out"}
METRIC_NAMES = {"color": "colour", "shape": "shape"}


def comparison_section(report: dict[str, Any]) -> list[str]:
    """``report.md``'s lines comparing each prior with each conditioning without one (DALL-E 2
    §5.1: does the prior help?), one table row per ``report["comparisons"]`` entry
    (:func:`pipeline.eval.run.comparisons`); none when there is nothing to compare."""
    rows = report.get("comparisons") or []
    if not rows:
        return []
    labels = {name: entry["label"] for name, entry in report["conditionings"].items()}
    lines = [
        "",
        "## Prior against no prior (DALL-E 2 §5.1)",
        "",
        "The final images' accuracy with a prior minus without one, in points, on the same "
        "prompts and noise seeds, with its 95% paired bootstrap interval over prompts (the "
        "prompts resampled once for both conditionings). An interval that excludes 0 is a "
        "difference the choice of prompts does not explain.",
        "",
        "| prompts | metric | conditionings | difference (points) | excludes 0 |",
        "|---|---|---|---:|---|",
    ]
    for row in rows:
        cells = [
            SET_NAMES.get(row["set"], row["set"]),
            METRIC_NAMES.get(row["metric"], row["metric"]),
            f"{labels.get(row['a'], row['a'])} − {labels.get(row['b'], row['b'])}",
            format_difference(row["difference"], row.get("ci")),
            excludes_zero(row.get("ci")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def format_difference(difference: Any, ci: Any) -> str:
    """A difference of accuracies in points with its interval, ``+12.5 (+4.0 to +21.0)``; ``–``
    when there is none."""
    if not _finite(difference):
        return "–"
    text, bounds = f"{100 * difference:+.1f}", _interval(ci)
    if bounds is not None:
        text += f" ({100 * bounds[0]:+.1f} to {100 * bounds[1]:+.1f})"
    return text


def excludes_zero(ci: Any) -> str:
    """``yes`` when the interval lies wholly above or below 0, ``no`` when it holds 0, ``–``
    when there is none."""
    bounds = _interval(ci)
    if bounds is None:
        return "–"
    return "yes" if bounds[0] > 0 or bounds[1] < 0 else "no"


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
