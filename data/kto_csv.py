"""Diffusion-KTO's per-image data: an infinite stream of labelled images drawn from a CSV.

Draw ``i`` of role ``r`` has the global index ``g = i * num_roles + r`` and its own generator
``default_rng([seed, g])``, which decides, in this order: desirable or not (probability
``desirable_prob``; the Diffusion-KTO paper's best gamma is 0.8), a row uniformly within that
class (with replacement), caption dropout, then flip and crop. With ``desirable_prob=None`` the
row is drawn uniformly over all rows instead (natural class balance). A role's state is ``[i]``,
the next draw, so a resumed stream is the same stream and never re-reads consumed data.

A drawn image that is missing or does not decode is skipped, logged and counted in the next
example's ``skipped``.
"""

import logging
import os
from collections.abc import Iterator

import numpy as np

from data.decode import UnreadableImage, load_rgb
from data.errors import DataError
from data.examples import Example, build_example
from data.kto_table import (
    DEFAULT_SPLIT_LABELS,
    check_split_labels,
    load_labeled_csv,
    parse_split_labels,
)
from data.roles import RoleStream, StreamSettings, check_positions

__all__ = ["DEFAULT_SPLIT_LABELS", "LabeledImages", "parse_split_labels"]

logger = logging.getLogger(__name__)

# Fail loudly instead of spinning forever when (nearly) every image is missing, e.g. a wrong
# image_root; isolated bad files only cost a warning each.
MAX_CONSECUTIVE_SKIPS = 1000


class LabeledImages(RoleStream):
    """Infinite stream of image examples: pixels [1, 3, R, R], caption, label 1.0 or 0.0."""

    def __init__(
        self,
        csv_path: str,
        image_root: str,
        settings: StreamSettings,
        split_labels: dict[str, int] | None = None,
        desirable_prob: float | None = 0.8,
    ):
        super().__init__(settings)
        if desirable_prob is not None and not 0.0 <= desirable_prob <= 1.0:
            raise ValueError(f"desirable_prob must be in [0, 1] or None, got {desirable_prob}")
        split_labels = dict(DEFAULT_SPLIT_LABELS if split_labels is None else split_labels)
        check_split_labels(split_labels)
        self.csv_path = csv_path
        self.image_root = image_root
        self.split_labels = split_labels
        self.desirable_prob = desirable_prob

        self._table = load_labeled_csv(csv_path, image_root, split_labels)
        self._desirable = np.flatnonzero(self._table.labels == 1)
        self._undesirable = np.flatnonzero(self._table.labels == 0)
        self.num_images = len(self._table.labels)
        self.num_desirable = len(self._desirable)
        self.num_undesirable = len(self._undesirable)
        self._check_classes()

    def _check_classes(self) -> None:
        """Every class that can be drawn must have rows (gamma = 1 needs only desirable ones)."""
        prob = self.desirable_prob
        for needed, count, name in (
            (prob is not None and prob > 0, self.num_desirable, "desirable"),
            (prob is not None and prob < 1, self.num_undesirable, "undesirable"),
        ):
            if needed and count == 0:
                raise DataError(
                    f"{self.csv_path}: no {name} rows under the split mapping "
                    f"{self.split_labels}, but desirable_prob={prob} draws them"
                )

    def resume_from(self, positions: dict[int, list], role_offset: int = 0) -> None:
        """Continue each role right after its saved state ``[i]``; call before iterating.

        Roles missing from ``positions`` start from the beginning. ``role_offset`` rotates which
        DataLoader worker plays which role (see ``data/roles.py``).
        """
        self._positions = check_positions(positions, self.num_roles, 1)
        self._role_offset = role_offset

    def _stream(self, role: int) -> Iterator[Example]:
        (draw,) = self._positions.get(role, [0])
        skipped = 0
        while True:
            rng = np.random.default_rng([self.seed, draw * self.num_roles + role])
            row = self._draw_row(rng)
            draw += 1
            name = self._table.file_names[row].as_py()
            try:
                image = load_rgb(os.path.join(self.image_root, name))
            except UnreadableImage as exc:
                logger.warning(
                    "skipping %s row %d (1-based data row), %s: %s",
                    self.csv_path,
                    row + 1,
                    name,
                    exc,
                )
                skipped += 1
                if skipped >= MAX_CONSECUTIVE_SKIPS:
                    raise DataError(
                        f"--images {self.image_root}: {skipped} drawn images in a row named by "
                        f"{self.csv_path} are missing or unreadable; is --images right?"
                    ) from exc
                continue
            yield build_example(
                [image],
                self._table.captions[row].as_py(),
                rng,
                self.transform,
                self.caption_dropout,
                role,
                [draw],
                skipped,
                label=float(self._table.labels[row]),
                row=(row,),
            )
            skipped = 0

    def _draw_row(self, rng: np.random.Generator) -> int:
        """Class first with probability ``desirable_prob``, then a row within it."""
        if self.desirable_prob is None:
            return int(rng.integers(self.num_images))
        pool = self._desirable if rng.random() < self.desirable_prob else self._undesirable
        return int(pool[rng.integers(len(pool))])
