"""Pixels for the VAE: RGB, shorter side resized to R, an R x R crop, a random flip, [-1, 1].

All images passed in one call are ONE pair (or one single image) and share one set of random
draws: one flip coin for all of them, and one crop draw ``u, v ~ U[0, 1)`` that places each
image's crop at ``(round(u * slack_h), round(v * slack_w))`` of its own slack (resized size
minus R). The chosen and rejected images of a Pick-a-Pic pair are two samples for the same
prompt, so flipping or cropping one and not the other would hand the preference loss a
difference that has nothing to do with the preference.

The three draws (flip, u, v) are always taken, whatever the options, so the caller's generator
advances the same way with centre crop or random crop, with or without flipping.

``crop_top_lefts`` are given in the frame of the image the model sees: when the image is flipped,
``left`` counts the pixels cut from the left of the flipped image (``slack_w - left``). This is
what SDXL's crop conditioning means (pixels cut from the top and left of what it is shown).
"""

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass
class TransformedImages:
    pixels: torch.Tensor  # [n, 3, R, R] float32 in [-1, 1]
    original_sizes: list[tuple[int, int]]  # [n] (H, W) before resizing
    crop_top_lefts: list[tuple[int, int]]  # [n] (top, left) of the crop in the resized image


def resized_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(H, W) after scaling the shorter side to ``resolution``, keeping the aspect ratio.

    The longer side is truncated, not rounded, as torchvision's ``Resize(int)`` (which the
    released trainers use) computes it, so crops and cached latents match theirs pixel for pixel."""
    if height <= width:
        return resolution, int(resolution * width / height)
    return int(resolution * height / width), resolution


def centre_offset(slack: int) -> int:
    """torchvision's ``CenterCrop``: ``int(round(slack / 2))``, Python's round half to even."""
    return round(slack / 2.0)


class ImageTransform:
    """Resize, crop, flip and normalise the images of one pair (or one single image) together."""

    def __init__(self, resolution: int, center_crop: bool = True, random_flip: bool = True):
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __call__(self, images: list[Image.Image], rng: np.random.Generator) -> TransformedImages:
        """``images``: n PIL images of any sizes and modes -> pixels [n, 3, R, R]."""
        if not images:
            raise ValueError("ImageTransform needs at least one image")
        coin, u, v = rng.random(3)
        flip = self.random_flip and bool(coin < 0.5)
        pixels, sizes, corners = [], [], []
        for image in images:
            tensor, corner = self._one(image, flip, u, v)
            pixels.append(tensor)
            sizes.append((image.height, image.width))
            corners.append(corner)
        return TransformedImages(torch.stack(pixels), sizes, corners)

    def crop_corner(
        self, height: int, width: int, flip: bool, u: float, v: float
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        """For an image of (height, width): its resized size, and the crop's (top, left) in the
        resized image before flipping (``__call__`` reports ``left`` in the flipped frame)."""
        res = self.resolution
        height, width = resized_size(height, width, res)
        slack_h, slack_w = height - res, width - res
        if self.center_crop:
            return (height, width), (centre_offset(slack_h), centre_offset(slack_w))
        return (height, width), (round(u * slack_h), round(v * slack_w))

    def _one(
        self, image: Image.Image, flip: bool, u: float, v: float
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        res = self.resolution
        if image.mode != "RGB":
            image = image.convert("RGB")
        (height, width), (top, left) = self.crop_corner(image.height, image.width, flip, u, v)
        if (height, width) != (image.height, image.width):
            # PIL's bilinear filter widens its support when downscaling, i.e. it antialiases.
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        array = np.asarray(image)[top : top + res, left : left + res]
        if flip:
            array = array[:, ::-1]
            left = width - res - left
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)  # writable, contiguous
        return tensor.float().div(127.5).sub(1.0), (top, left)
