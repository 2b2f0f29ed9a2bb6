"""The toy preference task's programmatic reward: rules a program checks on any image.

Toy scenes (scripts/build_toy_data.py) are one coloured shape on a plain background, captioned
"a red circle on a white background". Each rule maps (image, caption) to 1.0 (satisfied) or 0.0:

- ``colour``: the image shows the colour the caption names. The background is the median of
  the border pixels; the foreground is every pixel further than FOREGROUND_DISTANCE from it; its
  median colour, snapped to the nearest palette colour, must be the named one. An image with
  (almost) no foreground shows no colour and fails.
- ``warm``: a "warm filter" taste, as in the Diffusion-KTO paper's per-user experiment: the mean
  red channel exceeds the mean blue channel by at least WARM_MARGIN (0-255 scale). It ignores
  the caption.

The toy benchmark's preference labels and its reward rate both use ``warm``: the shipped toy base
ignores colour words, so ``colour`` sits at chance for it and gives fine-tuning nothing to
sharpen, while its warmth varies with the seed (README, "The toy task").
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
from PIL import Image

from scripts.build_toy_data import COLOURS

# RGB distance (0-255 scale) beyond which a pixel is not background; palette colours are all
# > 150 away from every background, anti-aliased edges and sampling noise mostly < 60.
FOREGROUND_DISTANCE = 60.0
# Fewer foreground pixels than this share of the image: no object is shown.
MIN_FOREGROUND_SHARE = 0.02
# Fixed before any fine-tuning; the shipped toy base meets it part of the time, as a preference
# needs (32.5% of 240 held-out images, 29.0% of its 672 on-policy training images; every image
# from its own seed).
WARM_MARGIN = 20.0

PALETTE_NAMES = tuple(COLOURS)
PALETTE = np.array([COLOURS[name] for name in PALETTE_NAMES], dtype=np.float64)
_COLOUR_WORD = re.compile(r"\b(" + "|".join(PALETTE_NAMES) + r")\b", re.IGNORECASE)


def named_colour(caption: str) -> str:
    """The first palette colour the caption names; ValueError if it names none."""
    match = _COLOUR_WORD.search(caption)
    if match is None:
        raise ValueError(f"caption names no palette colour {PALETTE_NAMES}: {caption!r}")
    return match.group(1).lower()


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def foreground_colour(image: Image.Image) -> str | None:
    """The palette colour nearest to the foreground's median colour, or None if no foreground."""
    pixels = _pixels(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    mask = np.linalg.norm(pixels - background, axis=-1) > FOREGROUND_DISTANCE
    if mask.mean() < MIN_FOREGROUND_SHARE:
        return None
    colour = np.median(pixels[mask], axis=0)
    return PALETTE_NAMES[int(np.argmin(np.linalg.norm(PALETTE - colour, axis=-1)))]


def colour_reward(image: Image.Image, caption: str) -> float:
    """1.0 if the image shows the colour the caption names, else 0.0."""
    return float(foreground_colour(image) == named_colour(caption))


def warm_reward(image: Image.Image, caption: str = "") -> float:
    """1.0 if the image is warm (mean red - mean blue >= WARM_MARGIN), else 0.0."""
    pixels = _pixels(image)
    return float(pixels[..., 0].mean() - pixels[..., 2].mean() >= WARM_MARGIN)


RewardRule = Callable[[Image.Image, str], float]
RULES: dict[str, RewardRule] = {"colour": colour_reward, "warm": warm_reward}


def toy_reward(rule: str) -> RewardRule:
    """The rule registered under this name."""
    if rule not in RULES:
        raise ValueError(f"unknown toy reward rule {rule!r}; choose from {sorted(RULES)}")
    return RULES[rule]
