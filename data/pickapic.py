"""Pick-a-Pic v2 preference pairs from parquet shards, as an infinite, exactly resumable stream.

The unit of work is a parquet row group. Each epoch, the row groups are permuted with a generator
seeded by (seed, epoch) (file order without ``PairOptions.shuffle``) and cut into blocks of
``row_groups_per_block`` consecutive groups; role r reads blocks b with ``b % num_roles == r``
(see ``data/roles.py``), one block in memory at a time, its rows permuted by (seed, epoch, b).
A role's state is ``[epoch, block, offset]``: the next row to read is row ``offset`` of block
``block`` in that order. Every random decision for a row (caption dropout, flip, crop) comes from
a generator seeded by (seed, epoch, block, offset), so a resumed stream is the same stream.

A worker holds one block in memory (its JPEG bytes included), so ``row_groups_per_block`` trades
memory for shuffle quality; the DataLoader must run the ``num_workers`` given here.

Ties (``label_0 == label_1``) are dropped; the chosen image is the one labelled 1 and comes first.
A row whose JPEG does not decode, or whose row group cannot be read, is skipped, logged and
counted in the next example's ``skipped``.
"""

import dataclasses
import logging
import math
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from data.columns import parse_columns
from data.decode import UnreadableImage, load_rgb
from data.errors import DataError
from data.examples import DEFAULT_PAIR_OPTIONS, Example, PairOptions, build_example
from data.parquet_index import (
    PROB_COLUMN,
    REQUIRED_COLUMNS,
    ParquetIndex,
    RowGroup,
    local_parquet_files,
    scan_shards,
    split_row_groups,
)
from data.pickapic_hub import hub_rows, open_hub_pairs
from data.roles import RoleStream, StreamSettings, check_positions

logger = logging.getLogger(__name__)

# Second seed word of each generator, so that e.g. the example generator of (epoch e, block 0,
# offset 0) never equals the block generator of (epoch e): SeedSequence ignores trailing zeros.
_ROW_GROUP_ORDER, _ROW_ORDER, _EXAMPLE, _HUB_EXAMPLE = range(4)


class PickapicPairs(RoleStream):
    """Infinite stream of pair examples (pixels [2, 3, R, R], chosen first), or of the chosen
    image alone (pixels [1, 3, R, R], label 1.0) with ``PairOptions(winners_only=True)``.

    ``source``: a directory (every ``*.parquet`` below it), a glob, a parquet file, or a hub
    dataset name ``owner/name`` streamed with ``datasets`` (then ``num_pairs`` is None and the
    state is ``[epoch, rows consumed by the role in that epoch]``). Local shards are validated
    here, reading only their metadata and label columns.
    """

    def __init__(
        self,
        source: str,
        settings: StreamSettings,
        pairs: PairOptions = DEFAULT_PAIR_OPTIONS,
        row_groups_per_block: int = 1,
        hub_split: str = "train",
        hub_revision: str | None = None,
        columns: dict[str, str] | None = None,
    ):
        super().__init__(settings)
        if row_groups_per_block < 1:
            raise ValueError(f"row_groups_per_block must be >= 1, got {row_groups_per_block}")
        self.source = source
        self.pairs = pairs
        self.row_groups_per_block = row_groups_per_block
        self.columns = columns or parse_columns(None)
        self._index: ParquetIndex | None = None
        self._hub = None
        self.num_pairs: int | None = None
        self.num_files: int | None = None
        self.num_row_groups: int | None = None
        self.unreadable_files: list[str] = []

        files = local_parquet_files(source)
        if files is None:
            self._hub = open_hub_pairs(source, hub_split, hub_revision, self._needed_columns())
            return
        self._index = scan_shards(files, self.columns, prob=pairs.soft_labels)
        self.num_pairs = self._index.num_pairs
        self.num_files = len(files)
        self.num_row_groups = len(self._index.row_groups)
        self.unreadable_files = self._index.unreadable_files
        if self.num_pairs == 0:
            raise DataError(f"{source}: no pairs left after dropping ties (label_0 == label_1)")
        if self._num_blocks() < self.num_roles:
            self._split_finer()

    def _needed_columns(self) -> list[str]:
        """The shards' names of the columns this stream reads."""
        soft = self.pairs.soft_labels
        names = [*REQUIRED_COLUMNS, PROB_COLUMN] if soft else list(REQUIRED_COLUMNS)
        return [self.columns[name] for name in names]

    def _split_finer(self) -> None:
        """Fewer blocks than streams (e.g. one small file, one row group, two workers): cut
        the row groups into row slices, one per block, so every stream has a share."""
        units = split_row_groups(self._index.row_groups, self.num_roles)
        if len(units) < self.num_roles:
            raise DataError(
                f"{self.source}: {len(units)} rows cannot feed {self.num_roles} data streams "
                "(processes x DataLoader workers); use fewer --dataloader_num_workers"
            )
        logger.info(
            "%s: %d row groups for %d data streams (processes x DataLoader workers): each row "
            "group is split into row slices, %d blocks in all",
            self.source,
            len(self._index.row_groups),
            self.num_roles,
            len(units),
        )
        self._index = dataclasses.replace(self._index, row_groups=units)
        self.row_groups_per_block = 1

    def resume_from(self, positions: dict[int, list], role_offset: int = 0) -> None:
        """Continue each role right after its saved state; call before creating an iterator.

        Roles missing from ``positions`` start from the beginning. ``role_offset`` rotates which
        DataLoader worker plays which role (see ``data/roles.py``).
        """
        checked = check_positions(positions, self.num_roles, 2 if self._hub is not None else 3)
        for role, state in checked.items():
            if self._hub is None and state[1] % self.num_roles != role:
                raise ValueError(f"resume state {state} is not a block of role {role}")
        self._positions = checked
        self._role_offset = role_offset

    def _stream(self, role: int) -> Iterator[Example]:
        return self._iter_hub(role) if self._hub is not None else self._iter_local(role)

    def _num_blocks(self) -> int:
        return math.ceil(len(self._index.row_groups) / self.row_groups_per_block)

    def _blocks(self, epoch: int) -> list[list[RowGroup]]:
        groups = self._index.row_groups
        order = range(len(groups))
        if self.pairs.shuffle:
            order = np.random.default_rng([self.seed, _ROW_GROUP_ORDER, epoch]).permutation(
                len(groups)
            )
        ordered = [groups[i] for i in order]
        size = self.row_groups_per_block
        return [ordered[i : i + size] for i in range(0, len(ordered), size)]

    def _iter_local(self, role: int) -> Iterator[Example]:
        epoch, block, offset = self._positions.get(role, [0, role, 0])
        skipped = 0
        idle_blocks = 0  # consecutive blocks that yielded nothing
        shards: dict[int, pq.ParquetFile] = {}  # opened lazily, per iterator (i.e. per worker)
        while True:
            blocks = self._blocks(epoch)
            while block < len(blocks):
                yielded = False
                for position, row in self._block_rows(epoch, block, blocks[block], offset, shards):
                    if row is None:  # its row group could not be read (logged once)
                        skipped += 1
                        continue
                    if row.labels[0] == row.labels[1]:
                        continue  # a tie: dropped, not counted as skipped
                    key = [self.seed, _EXAMPLE, epoch, block, position]
                    example = self._example(row, key, role, [epoch, block, position + 1], skipped)
                    if example is None:
                        skipped += 1
                        continue
                    yield example
                    skipped, yielded = 0, True
                idle_blocks = 0 if yielded else idle_blocks + 1
                if idle_blocks > math.ceil(len(blocks) / self.num_roles) + 1:
                    raise DataError(
                        f"{self.source}: stream {role} read a whole epoch without one usable "
                        "pair (all ties or unreadable); check the data or use fewer streams"
                    )
                block, offset = block + self.num_roles, 0
            epoch, block, offset = epoch + 1, role, 0

    def _block_rows(
        self, epoch: int, block: int, groups: list[RowGroup], offset: int, shards: dict
    ) -> Iterator[tuple[int, "_Row | None"]]:
        """(position, row) of one block from ``offset`` on, in the block's (shuffled) row
        order; the row is None when its row group could not be read."""
        size = sum(group.num_rows for group in groups)
        if offset >= size:
            return  # a state saved after the block's last row: do not read the block again
        order = np.arange(size)
        if self.pairs.shuffle:
            order = np.random.default_rng([self.seed, _ROW_ORDER, epoch, block]).permutation(size)
        rows = _BlockRows(self._index, groups, shards, self._needed_columns())
        for position in range(offset, size):
            yield position, rows.row(int(order[position]))

    def _iter_hub(self, role: int) -> Iterator[Example]:
        epoch, start = self._positions.get(role, [0, 0])
        skipped = 0
        while True:
            yielded = False
            shuffle = self.pairs.shuffle
            rows = hub_rows(self._hub, self.seed, shuffle, epoch, role, self.num_roles, start)
            names = self.columns
            for n, record in enumerate(rows, start=start):
                row = _Row(
                    f"{self.source} stream {role} epoch {epoch} row {n}",
                    record.get(names["caption"]),
                    (record.get(names["jpg_0"]), record.get(names["jpg_1"])),
                    (record.get(names["label_0"]), record.get(names["label_1"])),
                    (role, n),
                    record.get(names[PROB_COLUMN]),
                )
                if row.labels[0] == row.labels[1]:
                    continue
                key = [self.seed, _HUB_EXAMPLE, epoch, role, n]
                example = self._example(row, key, role, [epoch, n + 1], skipped)
                if example is None:
                    skipped += 1
                    continue
                yield example
                skipped, yielded = 0, True
            if not yielded and start == 0:
                raise DataError(f"{self.source}: stream {role} has no usable pair in an epoch")
            epoch, start = epoch + 1, 0

    def _example(
        self, row: "_Row", key: list[int], role: int, state: list[int], skipped: int
    ) -> Example | None:
        """The example of an untied row, or None when an image does not decode (logged)."""
        # Chosen first: the image labelled 1 (labels were checked to be a 1/0 preference).
        columns = ["jpg_1", "jpg_0"] if row.labels[1] == 1 else ["jpg_0", "jpg_1"]
        columns = columns[: self.pairs.sides]  # SFT on winners: the rejected one is not decoded
        images: list[Image.Image] = []
        for column in columns:
            cell = row.images[int(column[-1])]
            if isinstance(cell, pa.Scalar):  # JPEG bytes are copied out only when needed
                cell = cell.as_py()
            try:
                images.append(load_rgb(cell))
            except UnreadableImage as exc:
                logger.warning("skipping %s, column %s: %s", row.where, column, exc)
                return None
        rng = np.random.default_rng(key)
        # prob_0 is P(jpg_0 preferred); the example's label is P(chosen preferred).
        label = self.pairs.label(
            lambda: _probability(row) if columns[0] == "jpg_0" else 1.0 - _probability(row)
        )
        caption = row.caption if isinstance(row.caption, str) else ""
        return build_example(
            images,
            caption,
            rng,
            self.transform,
            self.caption_dropout,
            role,
            state,
            skipped,
            label,
            row=row.ident,
        )


class _Row:
    """The fields of one Pick-a-Pic row, plus where it came from (for log messages)."""

    __slots__ = ("caption", "ident", "images", "labels", "prob", "where")

    def __init__(
        self,
        where: str,
        caption: object,
        images: tuple,
        labels: tuple,
        ident: tuple[int, ...],
        prob: object = None,
    ):
        self.where, self.caption, self.images, self.labels = where, caption, images, labels
        self.prob = prob  # P(jpg_0 preferred) when soft labels are read, else None
        self.ident = ident  # (file index, row in file); (role, row of the role's epoch) on hub


class _BlockRows:
    """The rows of one block: its row groups read one after the other, addressed 0..size-1.

    A row group that fails to read keeps its place (its rows read as None), so positions, and
    hence resume states, do not depend on whether a read failed.
    """

    def __init__(
        self, index: ParquetIndex, groups: list[RowGroup], shards: dict, columns: list[str]
    ):
        self.index = index
        self.columns = columns  # the shards' names of caption, jpg_0/1, label_0/1 (, prob_0)
        self.groups = groups
        self.starts = np.cumsum([0] + [g.num_rows for g in groups])
        self.size = int(self.starts[-1])
        self.tables = [self._read(g, shards) for g in groups]

    def _read(self, group: RowGroup, shards: dict) -> dict | None:
        path = self.index.files[group.file]
        try:
            if group.file not in shards:
                shards[group.file] = pq.ParquetFile(path)
            table = shards[group.file].read_row_group(group.index, columns=self.columns)
            standard = [*REQUIRED_COLUMNS, PROB_COLUMN][: len(self.columns)]
            table = table.rename_columns(standard)
            if group.offset or group.num_rows < table.num_rows:  # a slice (split_row_groups)
                table = table.slice(group.offset, group.num_rows)
        except (OSError, pa.ArrowException) as exc:
            logger.warning(
                "skipping row group %d of %s (rows %d-%d, numbered from 1): %s",
                group.index,
                path,
                group.first_row + 1,
                group.first_row + group.num_rows,
                exc,
            )
            return None
        # Small columns as Python lists at once; JPEG bytes are pulled row by row when needed.
        return {
            "caption": table.column("caption").to_pylist(),
            "label_0": table.column("label_0").to_pylist(),
            "label_1": table.column("label_1").to_pylist(),
            "jpg_0": table.column("jpg_0"),
            "jpg_1": table.column("jpg_1"),
            "prob_0": table.column(PROB_COLUMN).to_pylist() if PROB_COLUMN in standard else None,
        }

    def row(self, index: int) -> _Row | None:
        slot = int(np.searchsorted(self.starts, index, side="right")) - 1
        table, group = self.tables[slot], self.groups[slot]
        if table is None:
            return None
        local = index - int(self.starts[slot])
        return _Row(
            f"{self.index.files[group.file]} row {group.first_row + local + 1}",
            table["caption"][local],
            (table["jpg_0"][local], table["jpg_1"][local]),
            (table["label_0"][local], table["label_1"][local]),
            (group.file, group.first_row + local),
            None if table["prob_0"] is None else table["prob_0"][local],
        )


def _probability(row: _Row) -> float:
    """The row's soft label as a float in [0, 1] (local shards were checked at start-up; a hub
    row is checked here)."""
    prob = row.prob
    if not isinstance(prob, int | float) or not 0.0 <= float(prob) <= 1.0:
        raise DataError(f"{row.where}, column {PROB_COLUMN}: value {prob!r} is not in [0, 1]")
    return float(prob)
