"""The toy preference task's programmatic reward: rules a program checks on any image.

Toy scenes (scripts/build_toy_data.py) are one coloured shape on a plain background, captioned
"a red circle on a white background". Each rule maps (image, caption) to 1.0 (satisfied) or 0.0:

- ``colour``: the image shows the colour the caption names. The background is the median of
  the border pixels; the foreground is every pixel further than FOREGROUND_DISTANCE from it; its
  median colour, snapped to the nearest palette colour, must be the named one. An image with
  (almost) no foreground shows no colour and fails.
- ``shape``: the drawn shape is the caption's circle / square / triangle. The object is the
  largest 4-connected region of the foreground mask (as for ``colour``); within its bounding box
  a triangle (apex up, as drawn) holds far less of its area in the top half than the bottom
  (1/3 for an ideal one, 1 for a square or a circle), and a square fills its box (1.0) where a
  circle fills pi/4 = 0.785. No object: 0.
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

from scripts.build_toy_data import COLOURS, SHAPES

# RGB distance (0-255 scale) beyond which a pixel is not background; palette colours are all
# > 150 away from every background, anti-aliased edges and sampling noise mostly < 60.
FOREGROUND_DISTANCE = 60.0
# Fewer foreground pixels than this share of the image: no object is shown.
MIN_FOREGROUND_SHARE = 0.02
# Fixed before any fine-tuning; the shipped toy base meets it part of the time, as a preference
# needs (32.5% of 240 held-out images, 29.0% of its 672 on-policy training images; every image
# from its own seed).
WARM_MARGIN = 20.0

# Shape thresholds, halfway between the ideal shapes' values (top/bottom area: triangle 1/3,
# circle and square 1; box fill: circle pi/4, square 1), so soft edges and a pixel of blur on
# a 32 px image keep the call.
TRIANGLE_TOP_BOTTOM = 0.65
SQUARE_FILL = 0.89

PALETTE_NAMES = tuple(COLOURS)
PALETTE = np.array([COLOURS[name] for name in PALETTE_NAMES], dtype=np.float64)
_COLOUR_WORD = re.compile(r"\b(" + "|".join(PALETTE_NAMES) + r")\b", re.IGNORECASE)
_SHAPE_WORD = re.compile(r"\b(" + "|".join(SHAPES) + r")\b", re.IGNORECASE)


def named_colour(caption: str) -> str:
    """The first palette colour the caption names; ValueError if it names none."""
    match = _COLOUR_WORD.search(caption)
    if match is None:
        raise ValueError(f"caption names no palette colour {PALETTE_NAMES}: {caption!r}")
    return match.group(1).lower()


def named_shape(caption: str) -> str:
    """The first toy shape the caption names; ValueError if it names none."""
    match = _SHAPE_WORD.search(caption)
    if match is None:
        raise ValueError(f"caption names no toy shape {SHAPES}: {caption!r}")
    return match.group(1).lower()


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def foreground_mask(pixels: np.ndarray) -> np.ndarray:
    """Pixels further than FOREGROUND_DISTANCE from the background (median border colour)."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    return np.linalg.norm(pixels - background, axis=-1) > FOREGROUND_DISTANCE


def largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (stray pixels and specks dropped)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, label = 0, 0, 0
    height, width = mask.shape
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if labels[y0, x0]:
            continue
        label += 1
        labels[y0, x0], stack, size = label, [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best if best else np.zeros_like(mask)


def shape_of(region: np.ndarray) -> str:
    """circle / square / triangle from a region's top/bottom area balance and its box fill."""
    rows, cols = np.nonzero(region)
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    box = region[top : bottom + 1, left : right + 1].astype(np.float64)
    height = box.shape[0]
    # Row weights split the middle row of an odd height evenly between the halves.
    upper = np.clip(height / 2 - np.arange(height), 0.0, 1.0)
    top_area, bottom_area = (box.sum(1) * upper).sum(), (box.sum(1) * (1 - upper)).sum()
    if top_area < TRIANGLE_TOP_BOTTOM * bottom_area:
        return "triangle"
    return "square" if box.mean() >= SQUARE_FILL else "circle"


def foreground_shape(image: Image.Image) -> str | None:
    """The shape of the image's object, or None if it shows no object."""
    mask = foreground_mask(_pixels(image))
    if mask.mean() < MIN_FOREGROUND_SHARE:
        return None
    region = largest_region(mask)
    if region.mean() < MIN_FOREGROUND_SHARE:
        return None
    return shape_of(region)


def foreground_colour(image: Image.Image) -> str | None:
    """The palette colour nearest to the foreground's median colour, or None if no foreground."""
    pixels = _pixels(image)
    mask = foreground_mask(pixels)
    if mask.mean() < MIN_FOREGROUND_SHARE:
        return None
    colour = np.median(pixels[mask], axis=0)
    return PALETTE_NAMES[int(np.argmin(np.linalg.norm(PALETTE - colour, axis=-1)))]


def colour_reward(image: Image.Image, caption: str) -> float:
    """1.0 if the image shows the colour the caption names, else 0.0."""
    return float(foreground_colour(image) == named_colour(caption))


def shape_reward(image: Image.Image, caption: str) -> float:
    """1.0 if the image's object has the shape the caption names, else 0.0."""
    return float(foreground_shape(image) == named_shape(caption))


def warm_reward(image: Image.Image, caption: str = "") -> float:
    """1.0 if the image is warm (mean red - mean blue >= WARM_MARGIN), else 0.0."""
    pixels = _pixels(image)
    return float(pixels[..., 0].mean() - pixels[..., 2].mean() >= WARM_MARGIN)


RewardRule = Callable[[Image.Image, str], float]
RULES: dict[str, RewardRule] = {
    "colour": colour_reward,
    "shape": shape_reward,
    "warm": warm_reward,
}


def toy_reward(rule: str) -> RewardRule:
    """The rule registered under this name."""
    if rule not in RULES:
        raise ValueError(f"unknown toy reward rule {rule!r}; choose from {sorted(RULES)}")
    return RULES[rule]
