"""Set-level measures of a model's generations against the base's for the same prompts and seeds.

Fine-tuning toward a reward can buy it with collapse (every seed gives the same picture) or with
drift (images unlike the base's). Both are measured on a fixed feature map that needs no
downloaded weights:

- **features**: the image as RGB in [0, 1], box-downsampled to FEATURE_SIDE x FEATURE_SIDE
  (position, size and colour of a toy scene survive; pixel noise averages out), flattened, then
  multiplied by a fixed Gaussian matrix (FEATURE_DIM x 3 * FEATURE_SIDE**2, entries N(0, 1/dim),
  numpy seed PROJECTION_SEED) so the covariance is small enough to estimate from a few hundred
  images. The map is linear: shifting every pixel by d shifts every feature mean by P @ d and
  leaves spreads unchanged, which the tests use.
- **spread** of a prompt: the mean Euclidean distance between the features of its images over
  all pairs of seeds (0 when every seed draws the same picture).
- **diversity** of a model: its mean spread over prompts divided by the base's over the same
  prompts and seeds (1: as diverse as the base; below 1: collapsing).
- **drift**: the Fréchet distance (as in FID, Heusel et al. 2017) between Gaussians fitted to the
  model's and the base's features, ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)):
  0 for identical sets, growing with the square of a shift.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd
from PIL import Image

FEATURE_SIDE = 8  # toy images are 32 px: one feature pixel per 4 x 4 block
FEATURE_DIM = 32
PROJECTION_SEED = 0


def projection() -> np.ndarray:
    """The fixed random projection [FEATURE_DIM, 3 * FEATURE_SIDE**2]."""
    rng = np.random.default_rng(PROJECTION_SEED)
    inputs = 3 * FEATURE_SIDE * FEATURE_SIDE
    return rng.standard_normal((FEATURE_DIM, inputs)) / np.sqrt(FEATURE_DIM)


def downsampled(image: Image.Image) -> np.ndarray:
    """RGB in [0, 1], box-downsampled to FEATURE_SIDE x FEATURE_SIDE, flattened."""
    small = image.convert("RGB").resize((FEATURE_SIDE, FEATURE_SIDE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64).reshape(-1) / 255.0


def image_features(images: Sequence[Image.Image]) -> np.ndarray:
    """[N, FEATURE_DIM] features of N images."""
    if not images:
        return np.zeros((0, FEATURE_DIM))
    return np.stack([downsampled(image) for image in images]) @ projection().T


def spread(features: np.ndarray) -> float:
    """Mean pairwise Euclidean distance between rows; 0 for fewer than 2 rows."""
    if len(features) < 2:
        return 0.0
    return float(np.mean([np.linalg.norm(a - b) for a, b in combinations(features, 2)]))


def psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative rounding clipped)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D] and [M, D].

    Tr (S_a S_b)^(1/2) is computed as Tr (S_a^(1/2) S_b S_a^(1/2))^(1/2), a symmetric PSD
    matrix, so eigh suffices (no scipy)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"drift needs at least 2 images per set, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    root_a = psd_sqrt(cov_a)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0.0, None)).sum()
    distance = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)
    return max(distance, 0.0)


def prompt_spreads(features: np.ndarray, prompts: Sequence[str]) -> dict[str, float]:
    """Spread of each prompt's images (rows of features in the order of prompts)."""
    rows: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        rows.setdefault(prompt, []).append(i)
    return {prompt: spread(features[index]) for prompt, index in rows.items()}


@dataclass(frozen=True)
class Distribution:
    model: str
    baseline: str
    images: int  # images of the model matched to a baseline image (same prompt and seed)
    prompts: int
    spread: float  # mean over prompts
    baseline_spread: float
    diversity: float  # spread / baseline_spread
    drift: float


def compare(
    model: str,
    features: np.ndarray,
    baseline: str,
    baseline_features: np.ndarray,
    prompts: Sequence[str],
) -> Distribution:
    """Diversity and drift of a model against the baseline; row i of both feature arrays is
    the same (prompt, seed)."""
    ours, theirs = prompt_spreads(features, prompts), prompt_spreads(baseline_features, prompts)
    mine, base = float(np.mean(list(ours.values()))), float(np.mean(list(theirs.values())))
    return Distribution(
        model=model,
        baseline=baseline,
        images=len(features),
        prompts=len(ours),
        spread=mine,
        baseline_spread=base,
        diversity=mine / base if base > 0 else float("nan"),
        drift=frechet_distance(features, baseline_features),
    )


def compare_runs(scores: pd.DataFrame, baseline: str) -> list[Distribution]:
    """Every model of a score table (model, prompt, seed, path) against the baseline, on the
    (prompt, seed) keys both have; models sharing none with the baseline are left out."""
    keys = ["model", "prompt", "seed"]
    paths = scores.drop_duplicates(keys).set_index(keys)["path"]  # a repeated prompt: once
    base = paths.loc[baseline]
    results = []
    for model in scores["model"].unique():
        keys = paths.loc[model].index.intersection(base.index)
        if len(keys) < 2:
            continue
        features = image_features([_load(p) for p in paths.loc[model].loc[keys]])
        base_features = image_features([_load(p) for p in base.loc[keys]])
        prompts = keys.get_level_values(0).tolist()
        results.append(compare(model, features, baseline, base_features, prompts))
    return results


def _load(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def distribution_markdown(results: Sequence[Distribution]) -> str:
    """The diversity and drift table (empty string when there is nothing to compare)."""
    if not results:
        return ""
    lines = [
        f"Against {results[0].baseline}'s images for the same prompts and seeds "
        f"(features: {FEATURE_SIDE}x{FEATURE_SIDE} RGB, fixed projection to {FEATURE_DIM} "
        f"dims, seed {PROJECTION_SEED}; evaluation/distribution.py):",
        "",
        "| model | images | prompts | spread per prompt | diversity vs baseline | drift |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.model} | {r.images} | {r.prompts} | {r.spread:.4g} | {r.diversity:.3f} | "
        f"{r.drift:.4g} |"
        for r in results
    ]
    return "\n".join(lines) + "\n"
