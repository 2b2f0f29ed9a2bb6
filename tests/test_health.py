"""Health metrics (losses/health.py) against hand-computed values."""

import math

import pytest
import torch

from losses.health import health_metrics

T = 1000  # timesteps 0..249 are q1, ..., 750..999 are q4


def test_pairs_by_timestep_quarter():
    # Chosen first: g_w = ref - policy = [0.1, -0.1, 0.05], g_l = [0.0, 0.1, 0.05]
    # -> margins [0.1, -0.2, 0.0] at timesteps [100 (q1), 900 (q4), 950 (q4)].
    policy = torch.tensor([0.1, 0.3, 0.15, 0.2, 0.1, 0.15])
    ref = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2, 0.2])
    t = torch.tensor([100, 900, 950, 100, 900, 950])
    m = health_metrics(policy, ref, t, T, pairwise=True)
    assert m["health/negative_margins"] == pytest.approx(1 / 3)
    assert m["health/margin_q1"] == pytest.approx(0.1)
    assert m["health/accuracy_q1"] == 1.0
    assert m["health/margin_q4"] == pytest.approx(-0.1)  # mean of -0.2 and 0.0
    assert m["health/accuracy_q4"] == 0.25  # a loss and a tie (half)
    assert math.isnan(m["health/margin_q2"]) and math.isnan(m["health/accuracy_q3"])


def test_labelled_images_use_the_signed_reward():
    # g = [0.1, -0.1, 0.05]; labels [1, 0, 0] -> signed [0.1, 0.1, -0.05]
    policy = torch.tensor([0.1, 0.3, 0.15])
    ref = torch.tensor([0.2, 0.2, 0.2])
    t = torch.tensor([300, 600, 620])  # q2, q3, q3
    m = health_metrics(policy, ref, t, T, pairwise=False, labels=torch.tensor([1.0, 0.0, 0.0]))
    assert m["health/negative_margins"] == pytest.approx(1 / 3)
    assert m["health/margin_q2"] == pytest.approx(0.1) and m["health/accuracy_q2"] == 1.0
    assert m["health/margin_q3"] == pytest.approx(0.025) and m["health/accuracy_q3"] == 0.5
    assert math.isnan(m["health/margin_q1"])


def test_no_reference_no_health_metrics():
    assert health_metrics(torch.ones(2), None, torch.zeros(2), T, pairwise=True) == {}


def test_the_last_timestep_is_in_q4():
    m = health_metrics(torch.zeros(2), torch.ones(2), torch.tensor([T - 1, T - 1]), T, True)
    assert m["health/margin_q4"] == 0.0 and m["health/accuracy_q4"] == 0.5
