"""Evaluation metrics: Fréchet distance against closed forms, CLIP score, Inception features from a
local weights file, attribute accuracy on rendered scenes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.data.shapes import COLORS, SHAPES, render, sample_scene
from pipeline.errors import UserFacingError
from pipeline.eval.metrics import (
    INCEPTION_FEATURE_DIM,
    FeatureStats,
    attribute_accuracy,
    clip_score,
    clip_scores,
    feature_stats,
    frechet_distance,
    frechet_distance_features,
    inception_features,
    load_inception,
)

# ---------------------------------------------------------------------------------------------
# Fréchet distance


def _features(n: int = 400, d: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d))  # correlated features, a full covariance
    return rng.normal(size=(n, d)) @ mixing + rng.normal(size=d)


def test_feature_stats_are_float64_unbiased() -> None:
    x = _features(n=50, d=4).astype(np.float32)
    stats = feature_stats(x)
    assert stats.mean.dtype == stats.cov.dtype == np.float64
    assert stats.count == 50 and stats.dim == 4
    centered = x.astype(np.float64) - x.mean(axis=0, dtype=np.float64)
    np.testing.assert_allclose(stats.cov, centered.T @ centered / 49, rtol=1e-10)
    with pytest.raises(ValueError, match="at least 2 rows"):
        feature_stats(x[:1])
    with pytest.raises(ValueError, match="NaN"):
        feature_stats(np.full((3, 2), np.nan))


def test_identical_sets_have_distance_zero() -> None:
    x = _features()
    scale = float(np.trace(feature_stats(x).cov))
    assert abs(frechet_distance_features(x, x)) < 1e-9 * scale
    # Singular covariances (fewer rows than dimensions) too, where a plain sqrtm struggles.
    few = _features(n=10, d=32)
    assert abs(frechet_distance_features(few, few)) < 1e-9 * float(np.trace(np.cov(few.T)))


def test_mean_shift_adds_its_squared_norm() -> None:
    x = _features()
    shift = np.linspace(-2.0, 3.0, x.shape[1])
    distance = frechet_distance_features(x, x + shift)
    assert distance == pytest.approx(float(shift @ shift), rel=1e-9)


def test_diagonal_covariances_match_the_closed_form() -> None:
    rng = np.random.default_rng(1)
    d = 8
    var_a, var_b = rng.uniform(0.5, 4.0, d), rng.uniform(0.1, 9.0, d)
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
    a = FeatureStats(mean=mu_a, cov=np.diag(var_a), count=100)
    b = FeatureStats(mean=mu_b, cov=np.diag(var_b), count=100)
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)
    # The same Gaussians in a rotated basis: the distance is a property of the distributions.
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    rotated = [FeatureStats(q @ s.mean, q @ s.cov @ q.T, s.count) for s in (a, b)]
    assert frechet_distance(*rotated) == pytest.approx(expected, rel=1e-9)
    # And scaled covariances of one shape: Tr(C (1 - sqrt(k))^2).
    cov = np.cov(_features().T)
    k = 2.5
    scaled = frechet_distance(FeatureStats(mu_a, cov, 2), FeatureStats(mu_a, k * cov, 2))
    assert scaled == pytest.approx(np.trace(cov) * (1 - math.sqrt(k)) ** 2, rel=1e-9)


def test_frechet_distance_is_symmetric_and_checks_dimensions() -> None:
    x, y = _features(seed=2), _features(seed=3) * 1.5
    assert frechet_distance_features(x, y) == pytest.approx(frechet_distance_features(y, x))
    assert frechet_distance_features(x, y) > 1.0
    with pytest.raises(ValueError, match="feature dimensions differ: 16 vs 8"):
        frechet_distance_features(x, x[:, :8])


# ---------------------------------------------------------------------------------------------
# CLIP score


def test_clip_score() -> None:
    eye = torch.eye(4)
    assert clip_score(eye, eye) == pytest.approx(100.0)
    assert clip_score(eye, eye.roll(1, dims=0)) == pytest.approx(0.0)  # orthogonal
    assert clip_score(eye, -eye) == 0.0  # opposed: clipped at 0, not -100
    # Not normalised, mixed: cos 1 (scaled), cos 0.6, cos -1 → 100, 60, 0.
    image = np.array([[3.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    text = np.array([[0.5, 0.0], [0.6, 0.8], [0.0, -2.0]])
    np.testing.assert_allclose(clip_scores(image, text), [100.0, 60.0, 0.0])
    assert clip_score(image, text) == pytest.approx(160.0 / 3)
    with pytest.raises(ValueError, match="same shape"):
        clip_score(image, text[:2])


# ---------------------------------------------------------------------------------------------
# Inception features


@pytest.fixture(scope="module")
def inception_state() -> dict[str, torch.Tensor]:
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    model = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_inception_features_from_safetensors_and_pt(inception_state, tmp_path) -> None:
    from safetensors.torch import save_file

    # Inception at 299 px is slow on 2 shared cores: three image passes in all.
    st, pt, trunk = (tmp_path / n for n in ("inception.safetensors", "inception.pt", "trunk.pt"))
    save_file(inception_state, str(st))
    torch.save(inception_state, pt)
    # Without the auxiliary and final classifiers, which the features use neither of.
    heads = ("AuxLogits.", "fc.")
    torch.save({k: v for k, v in inception_state.items() if not k.startswith(heads)}, trunk)
    from_st, from_pt, from_trunk = load_inception(st), load_inception(pt), load_inception(trunk)
    for model in (from_st, from_pt):
        loaded = model.inception.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in inception_state.items() if k in loaded)

    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    features = inception_features(from_st, images, batch_size=2)
    assert features.shape == (2, INCEPTION_FEATURE_DIM) and features.dtype == np.float64
    assert np.isfinite(features).all() and features.std() > 0
    assert not np.allclose(features[0], features[1])
    # Another file of the same weights, another batch size: the same features.
    again = inception_features(from_trunk, images[:1], batch_size=1)
    np.testing.assert_allclose(again, features[:1], rtol=1e-4, atol=1e-5)


def test_inception_errors_name_the_file(inception_state, tmp_path) -> None:
    missing = tmp_path / "nothing-here.safetensors"
    with pytest.raises(UserFacingError, match=r"nothing-here\.safetensors"):
        load_inception(missing)

    wrong = dict(inception_state)
    wrong["Mixed_5b.extra.weight"] = wrong.pop("Conv2d_1a_3x3.conv.weight")
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(UserFacingError, match=r"wrong\.pt.*1 missing keys \(Conv2d_1a_3x3") as err:
        load_inception(tmp_path / "wrong.pt")
    assert "1 unexpected keys (Mixed_5b.extra.weight)" in str(err.value)

    resnet_like = {"conv1.weight": torch.zeros(64, 3, 7, 7)}
    torch.save(resnet_like, tmp_path / "resnet.pt")
    with pytest.raises(UserFacingError, match=r"resnet\.pt.*unexpected keys \(conv1\.weight\)"):
        load_inception(tmp_path / "resnet.pt")

    shape = dict(inception_state)
    shape["Conv2d_1a_3x3.conv.weight"] = torch.zeros(32, 3, 5, 5)
    torch.save(shape, tmp_path / "shape.pt")
    with pytest.raises(UserFacingError, match=r"shape\.pt.*size mismatch"):
        load_inception(tmp_path / "shape.pt")

    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserFacingError, match=r"garbage\.safetensors: cannot read"):
        load_inception(tmp_path / "garbage.safetensors")


# ---------------------------------------------------------------------------------------------
# Attribute accuracy


def _scenes(n: int = 12) -> list:
    return [sample_scene(41, i) for i in range(n)]


def test_attribute_accuracy_on_rendered_scenes() -> None:
    scenes = _scenes()
    images = [render(s, 64) for s in scenes]
    captions = [s.caption for s in scenes]
    n_objects = sum(len(s.objects) for s in scenes)

    result = attribute_accuracy([*images, images[0]], [*captions, "a photo of a dog"], rows=True)
    assert result["color"] == result["shape"] == result["all"] == 1.0
    assert result["objects"] == n_objects and result["images"] == len(scenes)
    assert result["unparsed"] == 1
    assert result["rows"][-1] == {"caption": "a photo of a dog", "objects": []}
    for scene, row in zip(scenes, result["rows"], strict=False):
        assert row["caption"] == scene.caption
        assert sorted((o["color"], o["found_shape"]) for o in row["objects"]) == sorted(
            (o.color, o.shape) for o in scene.objects
        )

    # Every object asked in a colour that is not in its image: no colour, hence no shape, is right.
    wrong_color = []
    for s in scenes:
        absent = [c for c in COLORS if c not in {o.color for o in s.objects}]
        wrong_color.append(
            " and ".join(f"a {c} {o.shape}" for c, o in zip(absent, s.objects, strict=False))
        )
    result = attribute_accuracy(images, wrong_color)
    assert result["objects"] == n_objects
    assert result["color"] == result["shape"] == result["all"] == 0.0

    # The right colours with another shape: colours all found, shapes all wrong.
    wrong_shape = [
        " and ".join(
            f"a {o.color} {SHAPES[(SHAPES.index(o.shape) + 1) % len(SHAPES)]}" for o in s.objects
        )
        for s in scenes
    ]
    result = attribute_accuracy(images, wrong_shape)
    assert result["color"] == 1.0 and result["shape"] == 0.0 and result["all"] == 0.0


def test_attribute_accuracy_edge_cases() -> None:
    result = attribute_accuracy([np.zeros((64, 64, 3), np.uint8)], ["nothing to see"])
    assert result["objects"] == result["images"] == 0 and result["unparsed"] == 1
    assert math.isnan(result["color"]) and math.isnan(result["shape"])
    with pytest.raises(ValueError, match="1 images but 2 captions"):
        attribute_accuracy([np.zeros((64, 64, 3), np.uint8)], ["a", "b"])


def test_frechet_distance_of_few_rows_is_the_full_one() -> None:
    """Fewer rows than dimensions take the O(n·m·D) path; it equals the eigendecomposition's."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(9, 40)), rng.normal(size=(6, 40)) * 1.5 + 0.3
    full = frechet_distance(feature_stats(x), feature_stats(y))
    assert frechet_distance_features(x, y) == pytest.approx(full, rel=1e-6)
    assert frechet_distance_features(x, x) == pytest.approx(0.0, abs=1e-9)
