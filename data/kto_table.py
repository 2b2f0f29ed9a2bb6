"""Read and check the per-image CSV of Diffusion-KTO (``file_name``, ``caption``, ``split``).

The released Diffusion-KTO CSV labels each Pick-a-Pic image by how it fared in the comparisons it
appeared in: ``exclusive_win`` (won all), ``intersections`` (won some, lost some) or
``exclusive_lose`` (lost all). A mapping turns these splits into binary labels.
"""

import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from data.errors import DataError

# The released Diffusion-KTO code's mapping: desirable = won at least one comparison.
DEFAULT_SPLIT_LABELS = {"exclusive_win": 1, "intersections": 1, "exclusive_lose": 0}
CSV_COLUMNS = ("file_name", "caption", "split")
# Image files looked up at start-up, evenly spread over the rows: cheap (one stat each) and
# enough to tell a wrong image root (none found) from a few missing files.
IMAGE_SAMPLE = 64
# More than this share of the sample missing stops the run: training would mostly skip rows.
MAX_MISSING_SHARE = 0.5


@dataclass(frozen=True)
class LabeledTable:
    # pyarrow arrays, not lists of str: DataLoader workers forked from the trainer then share
    # the 928K strings instead of copying them on first touch (Python refcounts write to pages).
    file_names: pa.Array  # [N] paths relative to the image root
    captions: pa.Array  # [N]
    labels: np.ndarray  # [N] int8, 1 desirable / 0 undesirable


def parse_split_labels(text: str) -> dict[str, int]:
    """``"exclusive_win=1,intersections=1,exclusive_lose=0"`` -> ``{"exclusive_win": 1, ...}``.

    Raises ValueError for a missing ``=``, an empty name, a label other than 0 or 1, or a name
    given twice.
    """
    mapping: dict[str, int] = {}
    for item in text.split(","):
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not name:
            raise ValueError(f"split labels {text!r}: expected name=0|1 items, got {item!r}")
        if value not in ("0", "1"):
            raise ValueError(f"split labels {text!r}: label of {name!r} must be 0 or 1: {value!r}")
        if name in mapping:
            raise ValueError(f"split labels {text!r}: {name!r} is given twice")
        mapping[name] = int(value)
    return mapping


def check_split_labels(split_labels: dict[str, int]) -> None:
    """Raise ValueError unless the mapping is non-empty with labels 0 or 1."""
    if not split_labels:
        raise ValueError("split_labels is empty: map at least one split to 0 or 1")
    for name, label in split_labels.items():
        if label not in (0, 1):
            raise ValueError(f"split_labels[{name!r}] must be 0 or 1, got {label!r}")


def read_csv(csv_path: str, image_root: str) -> pd.DataFrame:
    """The CSV as strings, with its three columns; DataError naming ``--csv`` / ``--images``
    for a missing, empty or unparsable file or a missing image root."""
    if not os.path.isfile(csv_path):
        raise DataError(f"--csv {csv_path}: no such file")
    if not os.path.isdir(image_root):
        raise DataError(f"--images {image_root}: image root is not a directory")
    try:
        # Every cell as str and no NA guessing: a caption "NA" stays "NA", an empty one is "".
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError as exc:
        raise DataError(
            f"--csv {csv_path}: empty file (expected a header: file_name,caption,split)"
        ) from exc
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        message = str(exc).splitlines()[0]
        raise DataError(f"--csv {csv_path}: not a readable CSV ({message})") from exc
    check_table(frame, CSV_COLUMNS, f"--csv {csv_path}")
    return frame


def check_table(frame: pd.DataFrame, columns: Sequence[str], where: str) -> None:
    """DataError unless ``frame`` has each of ``columns`` and a row; ``where``: the flag and file
    that the messages start with, e.g. ``--csv data.csv``."""
    for column in columns:
        if column not in frame.columns:
            found = ", ".join(map(str, frame.columns))
            raise DataError(f"{where}: missing column {column} (found {found})")
    if frame.empty:
        raise DataError(f"{where}: no data rows")


def load_labeled_csv(csv_path: str, image_root: str, split_labels: dict[str, int]) -> LabeledTable:
    """Read the CSV and check it: columns, split values, paths inside ``image_root``, and a
    sample of the image files.

    Rows in messages are 1-based data rows (the header excluded). Paths are checked by string
    normalisation, with a system call only for the ``IMAGE_SAMPLE`` sampled files, so 928K rows
    take about a second; another missing file is found (and skipped) when it is drawn.
    """
    frame = read_csv(csv_path, image_root)
    labels = _labels(csv_path, frame["split"], split_labels)
    _check_inside_root(csv_path, frame["file_name"], image_root)
    check_image_sample(csv_path, frame["file_name"], image_root)
    return LabeledTable(
        file_names=pa.array(frame["file_name"], type=pa.string()),
        captions=pa.array(frame["caption"], type=pa.string()),
        labels=labels,
    )


def _labels(csv_path: str, splits: pd.Series, split_labels: dict[str, int]) -> np.ndarray:
    labels = splits.map(split_labels)
    unknown = np.flatnonzero(labels.isna().to_numpy())
    if unknown.size:
        row = int(unknown[0])
        known = ", ".join(f"{k}={v}" for k, v in split_labels.items())
        raise DataError(
            f"{csv_path}: row {row + 1} (1-based data row), column split: value "
            f"{splits.iloc[row]!r} is not in the split mapping ({known}); add it to the mapping"
        )
    return labels.to_numpy(dtype=np.int8)


def _check_inside_root(csv_path: str, names: pd.Series, image_root: str) -> None:
    # Only names that could escape need normalising: absolute, with "..", or naming the root.
    suspect = names.str.startswith(("/", "./")) | names.str.contains("..", regex=False)
    suspect |= names.isin(["", "."])
    for row in np.flatnonzero(suspect.to_numpy()):
        name = names.iloc[row]
        normal = posixpath.normpath(name) if name else "."
        if posixpath.isabs(normal) or normal in (".", "..") or normal.startswith("../"):
            raise DataError(
                f"{csv_path}: row {row + 1} (1-based data row), column file_name: {name!r} "
                f"does not name a file inside the image root {image_root}"
            )


def check_image_sample(csv_path: str, names: pd.Series, image_root: str) -> None:
    """Stop when none or most of ``IMAGE_SAMPLE`` evenly spaced files exist under the root."""
    rows = np.unique(np.linspace(0, len(names) - 1, min(IMAGE_SAMPLE, len(names))).astype(int))
    missing = [r for r in rows if not os.path.isfile(os.path.join(image_root, names.iloc[r]))]
    if len(missing) > MAX_MISSING_SHARE * len(rows):
        first = int(missing[0])
        raise DataError(
            f"--images {image_root}: {len(missing)} of {len(rows)} sampled image files named by "
            f"--csv {csv_path} are missing (e.g. row {first + 1} (1-based data row), column "
            f"file_name: {os.path.join(image_root, names.iloc[first])}); is --images the "
            "directory that file_name is relative to?"
        )
