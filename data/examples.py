"""The example dict every dataset yields, and the one place that builds it.

Caption dropout and the image transform both draw from the example's own generator (seeded by
its stream position), always in the same order: dropout first, then the transform's draws.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypedDict

import numpy as np
import torch
from PIL import Image

from data.transforms import ImageTransform


class Example(TypedDict, total=False):
    pixels: torch.Tensor  # [n, 3, R, R]; n = 2 (chosen, rejected) for pairs, 1 for images
    caption: str  # after caption dropout, shared by the n images
    label: float  # images only: 1.0 desirable, 0.0 undesirable
    original_sizes: list[tuple[int, int]]  # [n] (H, W) before resizing
    crop_top_lefts: list[tuple[int, int]]  # [n] (top, left) of the crop
    role: int  # the stream that produced it
    state: list[int]  # the stream's resume position AFTER this example (JSON-serialisable)
    skipped: int  # bad rows skipped in this stream just before this example
    row: tuple[int, ...]  # where it came from: (file index, row in file) for parquet, (csv row,)


@dataclass(frozen=True)
class PairOptions:
    """How a pair stream (PickapicPairs, TablePairs) serves each pair."""

    winners_only: bool = False  # the chosen image alone (pixels [1, 3, R, R], label 1.0): SFT
    shuffle: bool = True  # a new seeded order every epoch; False: the data's own order
    soft_labels: bool = False  # label each pair with P(chosen preferred), from the data

    @property
    def sides(self) -> int:
        """Images per example: the chosen one alone, or chosen then rejected."""
        return 1 if self.winners_only else 2

    def label(self, chosen_prob: Callable[[], float]) -> float | None:
        """The example's label: 1.0 for a winner alone; with soft labels, P(chosen preferred)
        (``chosen_prob`` is read only then); else None, a hard pair."""
        if self.winners_only:
            return 1.0
        return chosen_prob() if self.soft_labels else None


DEFAULT_PAIR_OPTIONS = PairOptions()


def build_example(
    images: list[Image.Image],
    caption: str,
    rng: np.random.Generator,
    transform: ImageTransform,
    caption_dropout: float,
    role: int,
    state: list[int],
    skipped: int,
    label: float | None = None,
    row: tuple[int, ...] = (),
) -> Example:
    """Drop the caption with probability ``caption_dropout`` (one draw, shared by all images,
    so both images of a pair are conditioned on the same text) and transform the images."""
    dropped = bool(rng.random() < caption_dropout)
    out = transform(images, rng)
    example = Example(
        pixels=out.pixels,
        caption="" if dropped else caption,
        original_sizes=out.original_sizes,
        crop_top_lefts=out.crop_top_lefts,
        role=role,
        state=list(state),
        skipped=skipped,
        row=tuple(row),
    )
    if label is not None:
        example["label"] = float(label)
    return example
