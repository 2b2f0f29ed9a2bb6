"""Find the Pick-a-Pic parquet shards named by a source and check them at start-up.

Only metadata and the two label columns are read (column projection), which stays cheap even for
the full 335 GB train split, so a bad shard fails in seconds instead of hours into training.
"""

import glob
import itertools
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.errors import DataError

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
PROB_COLUMN = "prob_0"  # soft label: P(jpg_0 preferred); optional (data/columns.py)
LABEL_VALUES = (0.0, 0.5, 1.0)
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class RowGroup:
    """One unit of work: a parquet row group."""

    file: int  # index into ParquetIndex.files
    index: int  # row group number within its file
    first_row: int  # index within the file of the unit's first row (for log messages)
    num_rows: int
    offset: int = 0  # a slice of the row group (split_row_groups): its first row in the group


def split_row_groups(groups: list[RowGroup], pieces: int) -> list[RowGroup]:
    """At least ``pieces`` units from ``groups`` (when they hold that many rows): each row
    group cut into ``ceil(pieces / len(groups))`` slices of near-equal size. Small files written
    by pandas or pyarrow hold one row group, fewer than a run's data streams; each stream then
    reads the whole group and keeps its slice, which for a small file costs little."""
    per_group = -(-pieces // len(groups))
    units = []
    for group in groups:
        cuts = np.linspace(0, group.num_rows, min(per_group, group.num_rows) + 1).astype(int)
        for start, stop in itertools.pairwise(cuts.tolist()):
            units.append(
                RowGroup(group.file, group.index, group.first_row + start, stop - start, start)
            )
    return units


@dataclass(frozen=True)
class ParquetIndex:
    files: list[str]
    row_groups: list[RowGroup]  # non-empty row groups, in file order
    num_pairs: int  # rows with label_0 != label_1 (ties dropped)
    unreadable_files: list[str] = field(default_factory=list)  # skipped (e.g. truncated)


def local_parquet_files(source: str) -> list[str] | None:
    """Sorted parquet files named by a directory (searched recursively), a glob or a file.

    Returns None when ``source`` exists nowhere locally but looks like a hub name
    (``owner/name``). Raises DataError naming ``source`` for a local-looking path that does not
    exist, a directory without parquet files or a glob that matches nothing.
    """
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        files = sorted(str(p) for p in Path(path).rglob("*.parquet") if p.is_file())
        if not files:
            raise DataError(f"--data {source}: directory contains no *.parquet files")
        return files
    if os.path.isfile(path):
        return [path]
    if any(char in path for char in "*?["):
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not files:
            raise DataError(f"--data {source}: glob matches no files")
        return files
    if _HUB_NAME.match(source) and not source.endswith(".parquet"):
        return None
    raise DataError(f"--data {source}: no such file or directory")


def scan_shards(
    files: list[str], columns: dict[str, str] | None = None, prob: bool = False
) -> ParquetIndex:
    """Check every shard's schema and labels; count pairs; list the non-empty row groups.

    A shard whose footer cannot be read (a truncated or half-copied file) is skipped with a
    warning and listed in ``unreadable_files``: one bad file out of thousands must not stop a
    day-long run. A readable shard with a wrong schema or labels stops it (a systematic error).
    ``columns`` maps the standard names to the shards' (data/columns.py); with ``prob`` the
    soft-label column ``prob_0`` must be there too, each value in [0, 1].
    """
    columns = columns or {name: name for name in (*REQUIRED_COLUMNS, PROB_COLUMN)}
    needed = [*REQUIRED_COLUMNS, PROB_COLUMN] if prob else list(REQUIRED_COLUMNS)
    row_groups, num_pairs, unreadable = [], 0, []
    for file_index, path in enumerate(files):
        try:
            shard = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as exc:
            logger.warning("skipping %s: not a readable parquet file (%s)", path, exc)
            unreadable.append(path)
            continue
        missing = missing_column(path, set(shard.schema_arrow.names), columns, needed)
        if missing:
            raise DataError(missing)
        try:
            labels = shard.read(columns=[columns["label_0"], columns["label_1"]])
            labels = labels.rename_columns(["label_0", "label_1"])
            if prob:
                check_probs(path, shard.read(columns=[columns[PROB_COLUMN]]).column(0))
        except (OSError, pa.ArrowException) as exc:
            logger.warning("skipping %s: its label columns do not read (%s)", path, exc)
            unreadable.append(path)
            continue
        num_pairs += count_mapped_pairs(path, labels, columns)
        first_row = 0
        for index in range(shard.metadata.num_row_groups):
            num_rows = shard.metadata.row_group(index).num_rows
            if num_rows:
                row_groups.append(RowGroup(file_index, index, first_row, num_rows))
            first_row += num_rows
    return ParquetIndex(files, row_groups, num_pairs, unreadable)


def count_pairs(path: str, labels: pa.Table) -> int:
    """Validate ``label_0``/``label_1`` of one shard and return its number of non-tie rows.

    Each label must be 0, 0.5 or 1, and an untied row must be a 1/0 preference (so "chosen = the
    image labelled 1" is always defined). Rows are reported numbered from 1 within the file."""
    values = {}
    for column in ("label_0", "label_1"):
        array = labels.column(column)
        if not (pa.types.is_integer(array.type) or pa.types.is_floating(array.type)):
            raise DataError(f"{path}: column {column}: type {array.type} is not numeric")
        values[column] = array.cast(pa.float64()).to_numpy()
        bad = np.flatnonzero(~np.isin(values[column], LABEL_VALUES))  # NaN (null) is bad too
        if bad.size:
            row = int(bad[0])
            shown = "null" if array[row].as_py() is None else f"{values[column][row]:g}"
            raise DataError(
                f"{path}: row {row + 1} (rows numbered from 1), column {column}: value {shown} "
                "is not one of 0, 0.5, 1"
            )
    first, second = values["label_0"], values["label_1"]
    untied = first != second
    half = untied & ((first == 0.5) | (second == 0.5))
    if half.any():
        row = int(np.flatnonzero(half)[0])
        raise DataError(
            f"{path}: row {row + 1} (rows numbered from 1), columns label_0/label_1: values "
            f"{first[row]:g} and "
            f"{second[row]:g} are neither a tie nor a 1/0 preference"
        )
    return int(untied.sum())


def count_mapped_pairs(path: str, labels: pa.Table, columns: dict[str, str]) -> int:
    """``count_pairs`` of labels read through a ``--columns`` mapping (already renamed to
    ``label_0``/``label_1``); an error names the shard's own columns too."""
    try:
        return count_pairs(path, labels)
    except DataError as exc:
        if (columns["label_0"], columns["label_1"]) == ("label_0", "label_1"):
            raise
        mapped = f"label_0={columns['label_0']}, label_1={columns['label_1']}"
        raise DataError(f"{exc} (columns mapped by --columns {mapped})") from exc


def missing_column(
    path: str, names: set[str], columns: dict[str, str], needed: Sequence[str]
) -> str | None:
    """The first of ``needed`` (standard names) whose mapped column is not in ``names``, as
    a message naming the shard, the column and the mapping; None when all are there."""
    for column in needed:
        if columns[column] not in names:
            renamed = "" if columns[column] == column else f" (--columns {column})"
            return (
                f"{path}: missing column {columns[column]}{renamed} (a Pick-a-Pic shard "
                f"needs {', '.join(REQUIRED_COLUMNS)}; found {', '.join(sorted(names))})"
            )
    return None


def check_probs(path: str, array: pa.ChunkedArray) -> None:
    """Every value of the soft-label column must be a number in [0, 1]."""
    if not (pa.types.is_integer(array.type) or pa.types.is_floating(array.type)):
        raise DataError(f"{path}: column {PROB_COLUMN}: type {array.type} is not numeric")
    values = array.cast(pa.float64()).to_numpy()
    bad = np.flatnonzero(~((values >= 0) & (values <= 1)))
    if bad.size:
        row = int(bad[0])
        raise DataError(
            f"{path}: row {row + 1} (rows numbered from 1), column {PROB_COLUMN}: value "
            f"{array[row].as_py()} is not a probability in [0, 1]"
        )
