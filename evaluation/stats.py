"""Summaries of per-image scores: means with 95% intervals, and per-prompt win rates.

Scores arrive as a table with one row per image: ``model``, ``prompt``, ``seed`` and one column
per scorer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

Z_95 = 1.959964  # two-sided 95% quantile of the normal distribution


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its 95% interval. Scores that are all 0 or 1 (a rule's
    reward rate) get the Wilson score interval, which stays inside [0, 1] and has width at 0% and
    100%; other scores the normal approximation mean +- 1.96 * sample std / sqrt(n). One value
    gives an interval of nan."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values to summarise")
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    if np.isin(x, (0.0, 1.0)).all():
        return (mean, *wilson_interval(mean, x.size))
    half = Z_95 * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, mean - half, mean + half


def wilson_interval(rate: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson (1927) score interval of a binomial proportion observed as ``rate`` of n trials."""
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    # At 0 and n successes the bounds are exactly 0 and 1, but the formula's rounding can land a
    # few ulps outside [0, 1] (0 of 2 gave -5.6e-17, printed as a negative rate).
    low = 0.0 if rate <= 0 else max(centre - half, 0.0)
    high = 1.0 if rate >= 1 else min(centre + half, 1.0)
    return low, high


def summary(scores: pd.DataFrame, scorers: Sequence[str]) -> pd.DataFrame:
    """One row per (model, scorer): n, mean, ci_low, ci_high; models in first-seen order."""
    rows = []
    for model in scores["model"].unique():
        part = scores[scores["model"] == model]
        for scorer in scorers:
            mean, low, high = mean_interval(part[scorer].tolist())
            rows.append(
                {
                    "model": model,
                    "scorer": scorer,
                    "n": len(part),
                    "mean": mean,
                    "ci_low": low,
                    "ci_high": high,
                }
            )
    return pd.DataFrame(rows)


def median_image_scores(scores: pd.DataFrame, model: str, scorer: str) -> pd.Series:
    """prompt -> the score of the model's median-scoring image for that prompt.

    With k images per prompt this is the ceil(k/2)-th smallest score (for even k the lower of
    the two middle images), always the score of an actual image."""
    part = scores[scores["model"] == model]
    return part.groupby("prompt", sort=True)[scorer].agg(
        lambda s: float(np.sort(s.to_numpy())[(len(s) - 1) // 2])
    )


@dataclass(frozen=True)
class WinRate:
    model: str
    baseline: str
    scorer: str
    wins: int
    ties: int
    losses: int

    @property
    def prompts(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def rate(self) -> float:
        """Share of prompts won, a tie counting half."""
        return (self.wins + 0.5 * self.ties) / self.prompts if self.prompts else math.nan


def win_rate(scores: pd.DataFrame, model: str, baseline: str, scorer: str) -> WinRate:
    """Diffusion-KTO's protocol: per prompt, the model's median-scoring image against the
    baseline's; prompts that only one of them has are left out."""
    a = median_image_scores(scores, model, scorer)
    b = median_image_scores(scores, baseline, scorer)
    a, b = a.align(b, join="inner")
    return WinRate(
        model, baseline, scorer, int((a > b).sum()), int((a == b).sum()), int((a < b).sum())
    )
