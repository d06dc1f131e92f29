"""The evaluation's confidence intervals: the bootstrap over prompts of the attribute accuracies
(:func:`pipeline.eval.metrics.attribute_totals`), the paired difference of two conditionings
(:func:`pipeline.eval.metrics.paired_difference`, :func:`pipeline.eval.run.comparisons`) and how
``report.md`` shows them. No Ray, no images: attribute rows are built by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.eval.metrics import BOOTSTRAP_RESAMPLES, attribute_totals, paired_difference
from pipeline.eval.report import METRIC_DOCS, excludes_zero, format_pct_ci, markdown_report
from pipeline.eval.run import PromptSet, Scored, comparisons


def _rows(oks: list[bool], objects: int = 1) -> list[dict]:
    """One attribute row per entry, naming ``objects`` objects, all right (colour and shape) or
    all wrong."""
    return [
        {"objects": objects, "color_ok": objects * ok, "shape_ok": objects * ok, "checks": []}
        for ok in oks
    ]


def _width(ci: list[float]) -> float:
    return ci[1] - ci[0]


def test_interval_holds_the_estimate_narrows_with_prompts_and_is_deterministic() -> None:
    few = attribute_totals(_rows([True] * 7 + [False] * 3))
    many = attribute_totals(_rows([True] * 70 + [False] * 30))
    for totals in (few, many):
        assert totals["color"] == totals["shape"] == pytest.approx(0.7)
        for key in ("color", "shape"):
            lo, hi = totals[f"{key}_ci"]
            assert 0 <= lo < totals[key] < hi <= 1
    assert _width(many["shape_ci"]) < _width(few["shape_ci"]) / 2  # ~ 1/sqrt(10) as wide
    assert attribute_totals(_rows([True] * 7 + [False] * 3)) == few


def test_colour_and_shape_have_their_own_intervals() -> None:
    rows = [{"objects": 2, "color_ok": 2, "shape_ok": i % 3 == 0, "checks": []} for i in range(30)]
    totals = attribute_totals(rows)
    assert totals["color_ci"] == [1.0, 1.0]
    assert totals["shape_ci"][0] < totals["shape"] < totals["shape_ci"][1] < 1.0


def test_no_objects_no_interval_and_one_prompt_a_degenerate_one() -> None:
    none = attribute_totals([{"objects": 0, "color_ok": 0, "shape_ok": 0, "checks": []}] * 4)
    assert math.isnan(none["color"]) and none["color_ci"] is None and none["shape_ci"] is None
    one = attribute_totals(_rows([True, False]), per_prompt=2)
    assert one["shape_ci"] == [0.5, 0.5]
    with pytest.raises(ValueError, match="not whole prompts"):
        attribute_totals(_rows([True, False, True]), per_prompt=2)


def test_the_images_of_a_prompt_are_resampled_together() -> None:
    """Two images a prompt that agree carry one prompt's evidence, not two: resampling prompts
    gives a wider interval than treating the same rows as independent images."""
    oks = [ok for i in range(20) for ok in (i % 2 == 0,) * 2]
    by_image = attribute_totals(_rows(oks), per_prompt=1)
    by_prompt = attribute_totals(_rows(oks), per_prompt=2)
    assert by_image["shape"] == by_prompt["shape"] == 0.5
    assert _width(by_prompt["shape_ci"]) > 1.2 * _width(by_image["shape_ci"])


def test_paired_difference() -> None:
    rng = np.random.default_rng(3)
    rows = _rows(list(rng.random(40) < 0.6), objects=2)
    same = paired_difference(rows, rows, 2, "shape")
    assert same == {"difference": 0.0, "ci": [0.0, 0.0], "prompts": 20}

    right, wrong = _rows([True] * 12, objects=3), _rows([False] * 12, objects=3)
    for key in ("color", "shape"):
        assert paired_difference(right, wrong, 3, key) == {
            "difference": 1.0,
            "ci": [1.0, 1.0],
            "prompts": 4,
        }
    assert paired_difference(wrong, right, 3, "color")["difference"] == -1.0

    # The pairing: b is a with one more prompt right, so the difference is small and sure,
    # narrower than either accuracy's own interval.
    oks = list(rng.random(40) < 0.5)
    better = [*oks]
    better[oks.index(False)] = True
    paired = paired_difference(_rows(better), _rows(oks), 1, "shape")
    assert paired["difference"] == pytest.approx(1 / 40)
    assert 0 <= paired["ci"][0] <= paired["difference"] <= paired["ci"][1]
    assert _width(paired["ci"]) < _width(attribute_totals(_rows(oks))["shape_ci"]) / 3
    with pytest.raises(ValueError, match="differ in number"):
        paired_difference(rows, rows[:-2], 2, "shape")
    with pytest.raises(ValueError, match="'color' or 'shape'"):
        paired_difference(rows, rows, 2, "all")


def test_comparisons_pair_each_prior_with_each_conditioning_without_one() -> None:
    def scored(oks: list[bool]) -> Scored:
        empty = np.zeros((len(oks), 2), np.float32)
        return Scored(empty, empty, attributes=dict(enumerate(_rows(oks))))

    sets = [PromptSet("train", ["a", "b"], ""), PromptSet("heldout", ["c"], "")]
    spans = {"train": slice(0, 4), "heldout": slice(4, 6)}
    gen = {
        "caption": scored([False] * 6),
        "prior": scored([True] * 6),
        "text_embedding": scored([True, True, False, False, True, True]),
    }
    found = comparisons(gen, sets, spans, per=2)
    assert [(c["set"], c["metric"], c["a"], c["b"]) for c in found] == [
        (s, m, "prior", b)
        for s in ("train", "heldout")
        for m in ("color", "shape")
        for b in ("caption", "text_embedding")
    ]
    train_shape = {c["b"]: c for c in found if c["set"] == "train" and c["metric"] == "shape"}
    assert train_shape["caption"]["difference"] == 1.0
    assert train_shape["text_embedding"]["difference"] == 0.5
    assert train_shape["text_embedding"]["prompts"] == 2
    assert comparisons({"caption": gen["caption"], "prior": gen["prior"]}, sets, spans, 2)
    assert comparisons({"prior": gen["prior"]}, sets, spans, 2) == []


def test_cells_show_the_interval() -> None:
    assert format_pct_ci(0.94, [0.891, 0.98]) == "94% (89–98)"
    assert format_pct_ci(0.94, None) == "94%"
    assert format_pct_ci(None, [0.1, 0.2]) == "–"
    assert format_pct_ci(0.5, [None, None]) == "50%"
    assert excludes_zero([0.01, 0.2]) == excludes_zero([-0.2, -0.01]) == "yes"
    assert excludes_zero([-0.01, 0.2]) == excludes_zero([0.0, 0.0]) == "no"
    assert excludes_zero(None) == "–"


def _report() -> dict:
    """A report.json dictionary as run_eval writes it, reduced to what report.md reads."""

    def entry(label: str, shape: float, ci: list[float]) -> dict:
        attributes = {"color": 1.0, "color_ci": [1.0, 1.0], "shape": shape, "shape_ci": ci}
        decoder = {"color": 0.75, "color_ci": [0.5, 1.0], "shape": 0.5, "shape_ci": [0.25, 0.75]}
        sets = {"clip_score": 25.0, "attributes": attributes, "attributes_decoder": decoder}
        return {"label": label, "fd_clip": 1.5, "fid": None, "sets": {"train": sets}}

    return {
        "checkpoints": {
            "decoder": {"url": "runs/decoder", "step": 10},
            "upsamplers": [],
            "prior": {"url": "runs/prior", "step": 10},
            "clip": "runs/clip",
        },
        "prompts": {"train": ["a red circle", "a blue square"]},
        "prompt_sources": {"train": "the config's prompts"},
        "config": {"samples_per_prompt": 2, "seed": 0},
        "resolutions": [64, 256],
        "real": {"label": "real images (reference)", "images": 4, "sets": {}},
        "order": ["caption", "prior"],
        "conditionings": {
            "caption": {**entry("caption only", 0.25, [0.0, 0.5]), "grid": "grid_caption.png"},
            "prior": {**entry("diffusion prior", 0.875, [0.75, 1.0]), "grid": "grid_prior.png"},
        },
        "comparisons": [
            {
                "set": "train",
                "metric": "shape",
                "a": "prior",
                "b": "caption",
                "difference": 0.625,
                "ci": [0.25, 1.0],
                "prompts": 2,
            }
        ],
        "notes": [],
        "plot": "metrics.png",
    }


def test_markdown_report_shows_intervals_and_the_comparison() -> None:
    markdown = markdown_report(_report())
    lines = markdown.splitlines()
    header = next(line for line in lines if line.startswith("| conditioning"))
    assert "| colour @64px | shape @64px |" in header
    prior = next(line for line in lines if line.startswith("| diffusion prior |"))
    assert "| 100% (100–100) | 88% (75–100) |" in prior
    assert "| 75% (50–100) | 50% (25–75) |" in prior  # the decoder's colour and shape
    real = next(line for line in lines if line.startswith("| real images"))
    assert "%" not in real and real.endswith("| – | – |")  # no accuracy: no interval either
    assert "## Prior against no prior (DALL-E 2 §5.1)" in markdown
    row = (
        "| training-like | shape | diffusion prior − caption only | +62.5 (+25.0 to +100.0) | yes |"
    )
    assert row in markdown
    assert "95% bootstrap interval over prompts" in markdown
    assert f"{BOOTSTRAP_RESAMPLES} resamples" in METRIC_DOCS["(lo–hi)"]

    without = markdown_report({**_report(), "comparisons": []})
    assert "Prior against no prior" not in without
