"""Read and check your own preference pairs: a manifest, or two folders with matching names.

Both formats become one ``PairTable`` (caption, chosen path, rejected path, optional preference
probability per row), checked at start-up so that a bad row stops the run with one line naming
the file, the row and the column:

- a manifest (``--pairs FILE --images ROOT``): JSONL (one object per line) or CSV (a header),
  with ``caption``, ``chosen``, ``rejected`` (paths relative to ROOT) and an optional ``prob``,
  the probability in [0, 1] that the chosen image is preferred (a soft label);
- two folders (``--pairs_dirs W,L``): every image of W (the chosen ones) pairs with the image of
  the same file name in L (the rejected ones); captions from ``--captions``: a JSONL of
  ``{"file_name", "caption"}`` objects, or a directory of ``<stem>.txt`` files; by default the
  ``<stem>.txt`` beside each image of W.

Rows are numbered from 1 (a JSONL's first line, a CSV's first row after its header).
"""

import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from data.errors import DataError
from data.kto_table import IMAGE_SAMPLE, MAX_MISSING_SHARE, check_table

MANIFEST_COLUMNS = ("caption", "chosen", "rejected")
PROB_COLUMN = "prob"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True)
class PairTable:
    # pyarrow arrays, as in kto_table: workers forked from the trainer share them.
    source: str  # the file or folders, for messages
    root: str  # chosen/rejected are relative to it
    captions: pa.Array  # [N] str
    chosen: pa.Array  # [N] str
    rejected: pa.Array  # [N] str
    probs: np.ndarray | None  # [N] float32 P(chosen preferred), or None (a hard 1)

    def __len__(self) -> int:
        return len(self.captions)

    def paths(self, row: int) -> tuple[str, str]:
        return (
            os.path.join(self.root, self.chosen[row].as_py()),
            os.path.join(self.root, self.rejected[row].as_py()),
        )


def read_pair_chunk(table: PairTable, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) in the Pick-a-Pic schema: ``caption``, ``jpg_0`` (the chosen image's
    bytes, None when the file cannot be read), ``jpg_1``, ``label_0`` = 1, ``label_1`` = 0,
    plus the paths (``chosen``, ``rejected``) and ``prob_0`` when the table has probabilities."""
    blobs: dict[int, list] = {0: [], 1: []}
    for row in range(start, stop):
        for side, path in enumerate(table.paths(row)):
            try:
                blobs[side].append(Path(path).read_bytes())
            except OSError:
                blobs[side].append(None)
    n = stop - start
    columns = {
        "caption": table.captions[start:stop],
        "jpg_0": pa.array(blobs[0], pa.binary()),
        "jpg_1": pa.array(blobs[1], pa.binary()),
        "label_0": pa.array([1.0] * n),
        "label_1": pa.array([0.0] * n),
        "chosen": table.chosen[start:stop],
        "rejected": table.rejected[start:stop],
    }
    if table.probs is not None:
        columns["prob_0"] = pa.array(table.probs[start:stop].astype(np.float64))
    return pa.table(columns)


def load_manifest(path: str, image_root: str) -> PairTable:
    """Read a JSONL or CSV manifest and check every row's columns, paths and probability."""
    if not os.path.isfile(path):
        raise DataError(f"--pairs {path}: no such file")
    if not os.path.isdir(image_root):
        raise DataError(f"--images {image_root}: image root is not a directory")
    frame = _read_jsonl(path) if path.endswith((".jsonl", ".json")) else _read_csv(path)
    check_table(frame, MANIFEST_COLUMNS, f"--pairs {path}")
    for column in MANIFEST_COLUMNS:
        _check_strings(path, frame[column], column)
    for column in ("chosen", "rejected"):
        _check_inside_root(path, frame[column], column, image_root)
    probs = _probs(path, frame[PROB_COLUMN]) if PROB_COLUMN in frame.columns else None
    table = PairTable(
        path,
        image_root,
        pa.array(frame["caption"].tolist(), type=pa.string()),
        pa.array(frame["chosen"].tolist(), type=pa.string()),
        pa.array(frame["rejected"].tolist(), type=pa.string()),
        probs,
    )
    _check_image_sample(table, f"--images {image_root}")
    return table


def load_pair_dirs(chosen_dir: str, rejected_dir: str, captions: str | None) -> PairTable:
    """Pair the images of two folders by file name; captions from a JSONL, a folder of
    ``<stem>.txt`` files, or (None) the ``.txt`` beside each chosen image."""
    for flag_dir in (chosen_dir, rejected_dir):
        if not os.path.isdir(flag_dir):
            raise DataError(f"--pairs_dirs {flag_dir}: not a directory")
    names = _image_names(chosen_dir)
    if not names:
        raise DataError(f"--pairs_dirs {chosen_dir}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    others = set(_image_names(rejected_dir))
    for name in names:
        if name not in others:
            raise DataError(
                f"--pairs_dirs {chosen_dir}: image {name} has no file of the same name in "
                f"{rejected_dir}"
            )
    unpaired = sorted(others - set(names))
    if unpaired:
        raise DataError(
            f"--pairs_dirs {rejected_dir}: image {unpaired[0]} has no file of the same name in "
            f"{chosen_dir} ({len(unpaired)} such files)"
        )
    texts = _captions(names, chosen_dir, captions)
    root = os.path.commonpath([os.path.abspath(chosen_dir), os.path.abspath(rejected_dir)])
    rel_w = os.path.relpath(os.path.abspath(chosen_dir), root)
    rel_l = os.path.relpath(os.path.abspath(rejected_dir), root)
    return PairTable(
        f"{chosen_dir},{rejected_dir}",
        root,
        pa.array(texts, type=pa.string()),
        pa.array([posixpath.join(rel_w, n) for n in names], type=pa.string()),
        pa.array([posixpath.join(rel_l, n) for n in names], type=pa.string()),
        None,
    )


def _image_names(directory: str) -> list[str]:
    """Image files below ``directory``, as sorted POSIX paths relative to it."""
    base = Path(directory)
    return sorted(
        p.relative_to(base).as_posix()
        for p in base.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _captions(names: list[str], chosen_dir: str, captions: str | None) -> list[str]:
    if captions is not None and os.path.isfile(captions):
        frame = _read_jsonl(captions, flag="--captions")
        for column in ("file_name", "caption"):
            if column not in frame.columns:
                raise DataError(f"--captions {captions}: missing column {column}")
        _check_strings(captions, frame["caption"], "caption")
        by_name = dict(zip(frame["file_name"].astype(str), frame["caption"], strict=True))
        missing = [n for n in names if n not in by_name]
        if missing:
            raise DataError(
                f"--captions {captions}: no caption for image {missing[0]} "
                f"({len(missing)} images without one)"
            )
        return [by_name[n] for n in names]
    folder = chosen_dir if captions is None else captions
    if not os.path.isdir(folder):
        raise DataError(f"--captions {captions}: neither a JSONL file nor a directory")
    texts = []
    for name in names:
        path = os.path.join(folder, os.path.splitext(name)[0] + ".txt")
        if not os.path.isfile(path):
            raise DataError(f"--captions {folder}: no caption file {path} for image {name}")
        texts.append(Path(path).read_text(encoding="utf-8").strip())
    return texts


def _read_jsonl(path: str, flag: str = "--pairs") -> pd.DataFrame:
    records = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{flag} {path}: row {line_number}: not JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise DataError(f"{flag} {path}: row {line_number}: not a JSON object")
            records.append(record)
    frame = pd.DataFrame.from_records(records)
    frame.index = range(len(frame))
    return frame


def _read_csv(path: str) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"--pairs {path}: empty file (expected a header)") from exc
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        message = str(exc).splitlines()[0]
        raise DataError(f"--pairs {path}: not a readable CSV ({message})") from exc


def _check_strings(path: str, values: pd.Series, column: str) -> None:
    path_column = column != "caption"
    bad = [i for i, v in enumerate(values) if not isinstance(v, str) or (path_column and not v)]
    if bad:
        row = bad[0]
        raise DataError(
            f"{path}: row {row + 1}, column {column}: {values.iloc[row]!r} is not a "
            f"{'non-empty path' if path_column else 'string'}"
        )


def _check_inside_root(path: str, names: pd.Series, column: str, root: str) -> None:
    for row, name in enumerate(names):
        normal = posixpath.normpath(name)
        if posixpath.isabs(normal) or normal in (".", "..") or normal.startswith("../"):
            raise DataError(
                f"{path}: row {row + 1}, column {column}: {name!r} does not name a file inside "
                f"the image root {root}"
            )


def _probs(path: str, values: pd.Series) -> np.ndarray:
    numbers = pd.to_numeric(values.replace("", np.nan), errors="coerce").to_numpy(np.float64)
    bad = np.flatnonzero(~((numbers >= 0) & (numbers <= 1)))  # NaN fails both
    if bad.size:
        row = int(bad[0])
        raise DataError(
            f"{path}: row {row + 1}, column {PROB_COLUMN}: {values.iloc[row]!r} is not a "
            "probability in [0, 1]"
        )
    return numbers.astype(np.float32)


def _check_image_sample(table: PairTable, flag: str) -> None:
    """Stop when most of ``IMAGE_SAMPLE`` evenly spaced rows lack an image (a wrong root)."""
    rows = np.unique(np.linspace(0, len(table) - 1, min(IMAGE_SAMPLE, len(table))).astype(int))
    missing = [(int(r), p) for r in rows for p in table.paths(int(r)) if not os.path.isfile(p)]
    if len(missing) > MAX_MISSING_SHARE * 2 * len(rows):
        row, path = missing[0]
        raise DataError(
            f"{flag}: {len(missing)} of {2 * len(rows)} sampled image files named by "
            f"{table.source} are missing (e.g. row {row + 1}: {path}); is it the directory the "
            "paths are relative to?"
        )
