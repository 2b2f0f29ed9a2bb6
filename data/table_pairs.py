"""Your own pairs (``data/pair_table.py``) as an infinite, exactly resumable stream.

Each epoch the N rows are permuted by a generator seeded by (seed, epoch) (row order without
``PairOptions.shuffle``); role r (see ``data/roles.py``) reads positions r, r + R, r + 2R, ...
of that order. A role's state is ``[epoch, k]``: the next row is the k-th of its share of that
epoch. Every random decision of an example (caption dropout, flip, crop) comes from a generator
seeded by (seed, epoch, role, k), so a resumed stream is the same stream.

With ``PairOptions.soft_labels`` each pair example carries ``label`` = the row's preference
probability (the manifest's ``prob`` column); a missing or undecodable image skips the row
(logged, counted).
"""

import logging
from collections.abc import Iterator

import numpy as np

from data.decode import UnreadableImage, load_rgb
from data.errors import DataError
from data.examples import DEFAULT_PAIR_OPTIONS, Example, PairOptions, build_example
from data.kto_csv import MAX_CONSECUTIVE_SKIPS
from data.pair_table import PairTable
from data.roles import RoleStream, StreamSettings, check_positions

logger = logging.getLogger(__name__)

_ORDER, _EXAMPLE = range(2)  # second seed word of each generator (as in data/pickapic.py)


class TablePairs(RoleStream):
    """Pairs (pixels [2, 3, R, R], chosen first) or, with ``PairOptions.winners_only``, the
    chosen image alone (pixels [1, 3, R, R], label 1.0)."""

    def __init__(
        self, table: PairTable, settings: StreamSettings, pairs: PairOptions = DEFAULT_PAIR_OPTIONS
    ):
        super().__init__(settings)
        if pairs.soft_labels and table.probs is None:
            raise DataError(
                f"{table.source}: soft labels need a preference probability column "
                "(the manifest's prob)"
            )
        if len(table) < self.num_roles:
            raise DataError(
                f"{table.source}: {len(table)} pairs cannot feed {self.num_roles} data streams "
                "(processes x DataLoader workers); use fewer --dataloader_num_workers"
            )
        self.table = table
        self.pairs = pairs
        self.num_pairs = len(table)

    def resume_from(self, positions: dict[int, list], role_offset: int = 0) -> None:
        """Continue each role right after its saved state ``[epoch, k]``."""
        self._positions = check_positions(positions, self.num_roles, 2)
        self._role_offset = role_offset

    def _share(self, epoch: int, role: int) -> np.ndarray:
        order = np.arange(self.num_pairs)
        if self.pairs.shuffle:
            order = np.random.default_rng([self.seed, _ORDER, epoch]).permutation(self.num_pairs)
        return order[role :: self.num_roles]

    def _stream(self, role: int) -> Iterator[Example]:
        epoch, k = self._positions.get(role, [0, 0])
        skipped = 0
        while True:
            share = self._share(epoch, role)
            for position in range(k, len(share)):
                row = int(share[position])
                images = self._images(row)
                if images is None:
                    skipped += 1
                    if skipped >= MAX_CONSECUTIVE_SKIPS:
                        raise DataError(
                            f"{self.table.source}: {skipped} pairs in a row have a missing or "
                            "unreadable image; is the image root right?"
                        )
                    continue
                label = self.pairs.label(lambda row=row: float(self.table.probs[row]))
                yield build_example(
                    images,
                    self.table.captions[row].as_py(),
                    np.random.default_rng([self.seed, _EXAMPLE, epoch, role, position]),
                    self.transform,
                    self.caption_dropout,
                    role,
                    [epoch, position + 1],
                    skipped,
                    label=label,
                    row=(row,),
                )
                skipped = 0
            epoch, k = epoch + 1, 0

    def _images(self, row: int) -> list | None:
        paths = self.table.paths(row)[: self.pairs.sides]
        images = []
        for side, path in zip(("chosen", "rejected"), paths, strict=False):
            try:
                images.append(load_rgb(path))
            except UnreadableImage as exc:
                logger.warning("skipping %s row %d, %s %s: %s", self.table.source, row + 1,
                               side, path, exc)  # fmt: skip
                return None
        return images
