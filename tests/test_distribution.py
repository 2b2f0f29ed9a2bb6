"""Diversity and drift (evaluation/distribution.py) on hand-made image sets of known spread."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from evaluation.distribution import (
    FEATURE_DIM,
    FEATURE_SIDE,
    compare,
    downsampled,
    frechet_distance,
    image_features,
    projection,
    spread,
)


def flat(grey: float) -> Image.Image:
    return Image.new("RGB", (32, 32), (int(grey),) * 3)


def greys(values: list[float]) -> list[Image.Image]:
    return [flat(v) for v in values]


def test_the_feature_map_is_fixed_and_box_downsamples():
    assert np.array_equal(projection(), projection())  # same seed, same matrix
    assert projection().shape == (FEATURE_DIM, 3 * FEATURE_SIDE**2)
    image = Image.new("RGB", (32, 32), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 4, 4))  # exactly the first 4 x 4 block
    pixels = downsampled(image).reshape(FEATURE_SIDE, FEATURE_SIDE, 3)
    assert pixels[0, 0].tolist() == [1.0, 1.0, 1.0]
    assert pixels.sum() == 3.0


def test_spread_is_the_mean_pairwise_distance():
    # distances 3-4-5 triangle: (0,0)-(3,0) 3, (0,0)-(3,4) 5, (3,0)-(3,4) 4 -> mean 4
    assert spread(np.array([[0.0, 0.0], [3.0, 0.0], [3.0, 4.0]])) == pytest.approx(4.0)
    assert spread(np.ones((5, 2))) == 0.0
    assert spread(np.ones((1, 2))) == 0.0


def test_image_sets_with_known_spread():
    """Flat grey images: the features of grey g are (g / 255) * P @ 1, so the spread of a set
    is the mean |g_i - g_j| / 255 times ||P @ 1||."""
    unit = np.linalg.norm(projection() @ np.ones(3 * FEATURE_SIDE**2))
    collapsed = image_features(greys([100, 100, 100, 100]))
    narrow = image_features(greys([90, 100, 110, 120]))
    wide = image_features(greys([60, 100, 140, 180]))  # deviations 4x narrow's
    assert spread(collapsed) == pytest.approx(0.0, abs=1e-12)
    # pairwise |differences| of 90, 100, 110, 120: 10, 20, 30, 10, 20, 10 -> mean 100 / 6
    assert spread(narrow) == pytest.approx(100 / 6 / 255 * unit, rel=1e-9)
    assert spread(wide) == pytest.approx(4 * spread(narrow), rel=1e-9)


def test_diversity_is_per_prompt_spread_relative_to_the_base():
    prompts = ["a", "a", "a", "b", "b", "b"]
    base = image_features(greys([60, 100, 140, 10, 50, 90]))
    half = image_features(greys([80, 100, 120, 30, 50, 70]))  # every prompt's spread halved
    result = compare("tuned", half, "base", base, prompts)
    assert result.prompts == 2 and result.images == 6
    assert result.diversity == pytest.approx(0.5, rel=1e-9)
    assert compare("base", base, "base", base, prompts).diversity == pytest.approx(1.0)
    # one image per seed, all the same: no spread left
    same = image_features(greys([100] * 6))
    assert compare("collapsed", same, "base", base, prompts).diversity == pytest.approx(0.0)


def test_frechet_distance_against_hand_computed_gaussians():
    # 1-D: N(mu_a, s_a^2), N(mu_b, s_b^2) -> (mu_a - mu_b)^2 + (s_a - s_b)^2
    a = np.array([[-1.0], [1.0]])  # mean 0, sample variance 2
    b = np.array([[1.0], [5.0]])  # mean 3, sample variance 8
    assert frechet_distance(a, b) == pytest.approx(9 + (math.sqrt(2) - math.sqrt(8)) ** 2)
    with pytest.raises(ValueError, match="at least 2 images"):
        frechet_distance(a[:1], b)


def test_drift_is_zero_for_identical_sets_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    values = rng.integers(40, 160, size=40).astype(float)
    base = image_features(greys(values.tolist()))
    assert frechet_distance(base, base) == pytest.approx(0.0, abs=1e-9)
    unit = np.linalg.norm(projection() @ np.ones(3 * FEATURE_SIDE**2))
    drifts = []
    for shift in (10, 20, 40):
        shifted = image_features(greys((values + shift).tolist()))
        # a pure shift moves the mean by (shift / 255) * P @ 1 and keeps the covariance
        assert frechet_distance(shifted, base) == pytest.approx((shift / 255 * unit) ** 2, rel=1e-4)
        drifts.append(frechet_distance(shifted, base))
    assert drifts[0] < drifts[1] < drifts[2]
    # a set with the same mean but collapsed spread also drifts
    collapsed = image_features(greys([float(values.mean().round())] * 40))
    assert frechet_distance(collapsed, base) > 0.01
