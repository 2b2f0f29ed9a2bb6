"""The toy preference task's programmatic reward: rules a program checks on any image.

Toy scenes (scripts/build_toy_data.py) are one coloured shape on a plain background, captioned
"a red circle on a white background". Each rule maps (image, caption) to 1.0 (satisfied) or 0.0:

- ``colour``: the image shows the colour the caption names. The background is the median of
  the border pixels; the foreground is every pixel further than FOREGROUND_DISTANCE from it; its
  median colour, snapped to the nearest palette colour, must be the named one. An image with
  (almost) no foreground shows no colour and fails.
- ``shape``: the drawn shape is the caption's circle / square / triangle. The object is the
  largest 4-connected region of the foreground mask (as for ``colour``); it must hold at least
  MIN_OBJECT_SHARE of the foreground (one object, not scattered pieces). Its soft coverage (per
  pixel, 0..1 between the background and the object's median colour) is compared with each toy
  shape drawn anti-aliased with the same area and centroid (the circle inscribed in a side x side
  box, the triangle apex up, as scripts/build_toy_data.py draws them); the best match by soft
  intersection over union is the object's shape if that IoU is at least MIN_SHAPE_IOU, else the
  image shows no toy shape (a blob). No object, pieces or a blob: 0.
- ``warm``: a "warm filter" taste, as in the Diffusion-KTO paper's per-user experiment: the mean
  red channel exceeds the mean blue channel by at least WARM_MARGIN (0-255 scale). It ignores
  the caption.

The toy benchmark runs two tasks (README, "Toy benchmark"): ``colour`` (prompt alignment: the
shipped toy base draws the named colour in about a quarter of held-out images, held back by a
typical-colour habit) and ``warm`` (a global taste the base meets about 60% of the time); ``shape``
measures what fine-tuning costs in fidelity.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

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

# One object: its largest connected region holds at least this share of the foreground.
MIN_OBJECT_SHARE = 0.8
# The object must overlap a toy shape of its area and centroid by at least this soft IoU: ideal
# shapes match their own at 1.0 and another at most ~0.8 (circle vs square); the toy scenes at
# 32 px match their own above it unless the training crop cut the shape at the border.
MIN_SHAPE_IOU = 0.8
# A shape's area as a share of its side x side box.
SHAPE_AREA = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
SUPERSAMPLE = 4  # samples per pixel side when drawing the templates

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


def background_colour(pixels: np.ndarray) -> np.ndarray:
    """The median colour of the border pixels."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return np.median(border, axis=0)


def foreground_mask(pixels: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Pixels further than FOREGROUND_DISTANCE from the background colour."""
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


def dilate(mask: np.ndarray) -> np.ndarray:
    """The mask grown by one pixel (4-neighbourhood)."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown


def coverage(pixels: np.ndarray, region: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Per pixel, the share covered by the object (0..1): the pixel's position between the
    background and the object's median colour, on the object's region grown by a pixel (its
    soft edge); 0 elsewhere."""
    colour = np.median(pixels[region], axis=0)
    direction = colour - background
    alpha = ((pixels - background) @ direction) / max(float(direction @ direction), 1e-9)
    return np.clip(alpha, 0.0, 1.0) * dilate(region)


def shape_template(shape: str, height: int, width: int, alpha: np.ndarray) -> np.ndarray:
    """The toy shape with the object's area and centroid, anti-aliased (SUPERSAMPLE^2 samples per
    pixel): a side x side box as scripts/build_toy_data.py draws it, the circle inscribed, the
    triangle apex up with its centroid 2/3 of the way down."""
    area = float(alpha.sum())
    ys, xs = np.indices(alpha.shape)
    cy, cx = float((ys * alpha).sum()) / area, float((xs * alpha).sum()) / area
    side = np.sqrt(area / SHAPE_AREA[shape])
    top = cy + 0.5 - (2 * side / 3 if shape == "triangle" else side / 2)
    left = cx + 0.5 - side / 2
    offsets = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    y = ((np.arange(height)[:, None] + offsets).reshape(-1, 1) - top) / side  # 0..1 in the box
    x = ((np.arange(width)[:, None] + offsets).reshape(1, -1) - left) / side - 0.5
    inside = (y >= 0) & (y <= 1) & (np.abs(x) <= 0.5)
    if shape == "circle":
        inside &= (2 * x) ** 2 + (2 * y - 1) ** 2 <= 1.0
    elif shape == "triangle":
        inside &= np.abs(x) <= y / 2
    samples = inside.reshape(height, SUPERSAMPLE, width, SUPERSAMPLE)
    return samples.mean(axis=(1, 3))


def shape_matches(pixels: np.ndarray, region: np.ndarray, background: np.ndarray) -> dict:
    """Soft intersection over union of the object's coverage with each toy shape of the same
    area and centroid."""
    alpha = coverage(pixels, region, background)
    height, width = alpha.shape
    matches = {}
    for shape in SHAPES:
        template = shape_template(shape, height, width, alpha)
        overlap = np.minimum(alpha, template).sum()
        matches[shape] = float(overlap / np.maximum(alpha, template).sum())
    return matches


def foreground_shape(image: Image.Image) -> str | None:
    """The toy shape the image's object matches best, or None if it shows no object, shows
    scattered pieces rather than one, or matches no shape well (a blob)."""
    pixels = _pixels(image)
    background = background_colour(pixels)
    mask = foreground_mask(pixels, background)
    if mask.mean() < MIN_FOREGROUND_SHARE:
        return None
    region = largest_region(mask)
    if region.sum() < MIN_OBJECT_SHARE * mask.sum():
        return None
    matches = shape_matches(pixels, region, background)
    best = max(matches, key=matches.__getitem__)
    return best if matches[best] >= MIN_SHAPE_IOU else None


def foreground_colour(image: Image.Image) -> str | None:
    """The palette colour nearest to the foreground's median colour, or None if no foreground."""
    pixels = _pixels(image)
    mask = foreground_mask(pixels, background_colour(pixels))
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


# What each rule reads from the caption (None: it ignores the caption), so a prompt set can be
# checked before any image is drawn; each raises ValueError on a caption it cannot read.
CAPTION_READERS: dict[str, Callable[[str], str] | None] = {
    "colour": named_colour,
    "shape": named_shape,
    "warm": None,
}


def unreadable_caption(rule: str, captions: Sequence[str]) -> tuple[int, str] | None:
    """(index, reason) of the first caption ``rule`` cannot read, or None when it reads them
    all; checked before any image is drawn, so a wrong prompt list fails at once."""
    reader = CAPTION_READERS.get(rule)
    for index, caption in enumerate(captions if reader else []):
        try:
            reader(caption)
        except ValueError as exc:
            return index, str(exc)
    return None


def toy_reward(rule: str) -> RewardRule:
    """The rule registered under this name."""
    if rule not in RULES:
        raise ValueError(f"unknown toy reward rule {rule!r}; choose from {sorted(RULES)}")
    return RULES[rule]
