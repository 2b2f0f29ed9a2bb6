"""Relabel preference data with scorers (AI feedback): scores, combined labels, soft labels.

    python -m evaluation.relabel --data /data/pickapic_v2 --scorer pickscore=/models/PickScore_v1 \\
        --scorer hpsv2=/models/hpsv2 --weights 0.5,0.5 --out /data/pickapic_ai
    python -m evaluation.relabel --data owner/name --columns caption=prompt,jpg_0=a,jpg_1=b,... \\
        --scorer toy_warm --out OUT                                    # a hub dataset, streamed
    python -m evaluation.relabel --pairs my_pairs.jsonl --images /data/mine --scorer toy_warm \\
        --out OUT
    python -m evaluation.relabel --csv kto.csv --images /data/kto --scorer toy_warm \\
        --quantile 0.5 --out OUT

Pairs (parquet shards or a hub dataset, with ``--columns`` for another schema, or your own
pairs) become parquet shards ``OUT/train-*.parquet`` in the Pick-a-Pic schema: every original
column (the human ``label_0``/``label_1`` renamed ``human_label_0``/``human_label_1``, mapped
columns renamed to their standard names, a hub ``Image`` column stored as its bytes),
``score_<scorer>_<side>`` per scorer and image, ``score_combined_<side>``,
the AI labels ``label_0``/``label_1`` (a tie, 0.5/0.5, when the combined gap is at most
``--tie_threshold``) and ``prob_0 = sigmoid((c_0 - c_1) / --temperature)``, the soft label that
``train.py --soft_labels`` reads. Per-image data (the KTO CSV) becomes ``OUT/<csv name>`` with its
columns plus ``score_<scorer>``, ``score_combined`` and ``label`` (1 when the combined score is
at least ``--threshold``, or within the top ``1 - --quantile`` share), ``split`` set to
``exclusive_win`` / ``exclusive_lose`` so the default split mapping reads the AI label (the
original kept as ``split_human``).

Standardisation: scorers have different scales (PickScore ~20, HPS ~0.3, rules 0/1), so each
scorer's scores are z-scored, ``z = (s - mean) / std`` with the mean and standard deviation of
that scorer over every image scored in the run, before ``c = sum_k w_k z_k`` (``--weights``,
default equal, normalised to sum to 1). A constant scorer (std 0) contributes 0.

Two passes, both streaming and resumable: (1) each unit of work (a parquet row group, or a chunk of
``--chunk_rows`` rows of a hub dataset, a manifest, two folders or a CSV) is read, its images
decoded and scored ``--batch_size`` at a time, and its scores alone (with a checksum of each row's
caption and images, no image bytes) written to ``OUT/.scored/`` (atomically); (2) the statistics
are accumulated from those scores, and each unit is read again from the input, checked against its
checksums and written with its scores and labels as its final shard (one unit in memory at a time;
the CSV quantile needs the N combined scores, 8 bytes each). The output is thus the only copy of
the data written. A hub dataset is the exception: it is not read twice (a second download) but
kept by pass 1 under ``OUT/.rows/``, each unit deleted as soon as its final shard is written, so
the disk holds about one copy there too. ``OUT/relabel.json`` records the statistics and counts,
and the scratch folders are removed. Before scoring, the output's size is estimated from the input
(its bytes, plus the added columns) and the run stops when the free space on ``--out``'s filesystem
cannot hold it. A killed run, re-run with the same command, skips every unit already written (a
hub dataset is streamed in its stored order and re-read, undecoded, up to the first unit not
written: data/hub_chunks.py); a re-run with other scorers, weights or input is refused, and input
changed between the passes is named. An image that does not decode gets NaN scores; its pair
becomes a tie (counted, logged); its CSV row gets label 0 only if the score is known, else it is
dropped from the CSV (counted).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import shutil
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from common import cli
from data.columns import PROB, STANDARD, columns_flag
from data.decode import UnreadableImage, load_rgb
from data.errors import DataError
from data.hub_chunks import HubChunks, image_bytes
from data.pair_table import PairTable, load_manifest, load_pair_dirs, read_pair_chunk
from data.parquet_index import local_parquet_files
from data.pickapic_hub import open_hub_pairs

logger = logging.getLogger(__name__)

SCORED_DIR = ".scored"  # pass 1's scores, by unit
ROWS_DIR = ".rows"  # pass 1's copy of a hub dataset's rows, by unit (not streamed twice)
KEY = "row_checksum"  # the scratch's column that ties scores to their row
ARGS_FILE = ".relabel_args.json"
SUMMARY_FILE = "relabel.json"
DEFAULT_CHUNK_ROWS = 256
DESIRABLE, UNDESIRABLE = "exclusive_win", "exclusive_lose"  # the default KTO split mapping's


@dataclass(frozen=True)
class Unit:
    """One unit of work: its id (the output file's stem), a reader of its rows and where they are
    (for messages). A source of unknown length (a hub stream) yields units without end; its first
    read past the last row returns None. ``keep_rows``: reading again would download again, so
    pass 1 keeps the rows for pass 2."""

    name: str
    read: Callable[[], pa.Table | None]
    where: str = ""
    keep_rows: bool = False


@dataclass(frozen=True)
class Source:
    """The units of an input, and what the free-space check needs: the bytes of the input that the
    output copies and its rows (None where unknown)."""

    units: Iterable[Unit]
    per_image: bool = False
    csv_name: str = ""
    input_bytes: int | None = None
    rows: int | None = None


@dataclass
class Summary:
    units: int = 0
    scored_now: int = 0  # units scored by this call (the others were done before)
    rows: int = 0
    images: int = 0
    unreadable_images: int = 0
    ties: int = 0  # pairs; or CSV rows dropped (no score)
    labels: dict[str, int] = field(default_factory=dict)
    stats: dict[str, dict[str, float]] = field(default_factory=dict)  # scorer -> mean, std
    outputs: list[str] = field(default_factory=list)  # paths written (shards as one pattern)
    complete: bool = False


def parse_weights(text: str | None, count: int) -> list[float]:
    """``"0.5,0.5"`` -> weights normalised to sum to 1; equal weights when None."""
    if text is None:
        return [1.0 / count] * count
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError as exc:
        raise cli.UsageError(f"--weights {text}: expected comma-separated numbers") from exc
    if len(weights) != count:
        raise cli.UsageError(f"--weights {text}: {len(weights)} weights for {count} scorers")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise cli.UsageError(f"--weights {text}: weights must be >= 0 and not all 0")
    return [w / sum(weights) for w in weights]


# ---------------------------------------------------------------- sources -> units


def standard_names(names: Sequence[str], columns: dict[str, str]) -> list[str]:
    """A table's column names with mapped columns renamed to the standard names and the human
    labels (and soft label) to ``human_label_*`` (``human_prob_0``)."""
    renames = {columns[c]: c for c in STANDARD}
    renames[columns["label_0"]], renames[columns["label_1"]] = "human_label_0", "human_label_1"
    renames[columns[PROB]] = "human_prob_0"
    return [renames.get(n, n) for n in names]


def parquet_units(files: list[str], columns: dict[str, str]) -> list[Unit]:
    """One unit per row group of every shard, columns renamed by ``standard_names``."""
    units = []
    for file_index, path in enumerate(files):
        shard = pq.ParquetFile(path)
        names = shard.schema_arrow.names
        for column in STANDARD:
            if columns[column] not in names:
                raise DataError(f"{path}: missing column {columns[column]} ({column})")
        new_names = standard_names(names, columns)

        def read(path: str = path, group: int = 0, new_names: list[str] = new_names) -> pa.Table:
            return pq.ParquetFile(path).read_row_group(group).rename_columns(new_names)

        for group in range(shard.metadata.num_row_groups):
            name = f"train-{file_index:05d}-{group:05d}"
            where = f"{path}, row group {group}"
            units.append(Unit(name, lambda read=read, group=group: read(group=group), where))
    return units


def hub_source(name: str, split: str, columns: dict[str, str], chunk_rows: int) -> Source:
    """Chunks of ``chunk_rows`` rows of a hub dataset (data/hub_chunks.py), without end, columns
    renamed by ``standard_names`` and hub ``Image`` structs turned into bytes; the split's size
    as the dataset's card states it, if it does."""
    stream = open_hub_pairs(name, split, None, [columns[c] for c in STANDARD])
    info = (stream.info.splits or {}).get(split) if stream.info else None
    size = (info.num_bytes or None, info.num_examples or None) if info else (None, None)
    return Source(hub_units(stream, name, columns, chunk_rows), False, "", *size)


def hub_units(stream, name: str, columns: dict[str, str], chunk_rows: int) -> Iterator[Unit]:
    chunks = HubChunks(stream, chunk_rows)

    def read(index: int) -> pa.Table | None:
        table = chunks.get(index)
        if table is None:
            return None
        table = table.rename_columns(standard_names(table.column_names, columns))
        return image_bytes(image_bytes(table, "jpg_0"), "jpg_1")

    for index in itertools.count():
        where = f"{name}, rows {index * chunk_rows}-{(index + 1) * chunk_rows - 1}"
        yield Unit(f"train-{index:05d}", lambda index=index: read(index), where, keep_rows=True)


def pair_table_units(table: PairTable, chunk_rows: int) -> list[Unit]:
    def read(start: int) -> pa.Table:
        chunk = read_pair_chunk(table, start, min(start + chunk_rows, len(table)))
        renames = {"label_0": "human_label_0", "label_1": "human_label_1", PROB: "human_prob_0"}
        return chunk.rename_columns([renames.get(n, n) for n in chunk.column_names])

    return [
        Unit(f"train-{i:05d}", lambda start=start: read(start),
             f"{table.source}, rows {start}-{min(start + chunk_rows, len(table)) - 1}")
        for i, start in enumerate(range(0, len(table), chunk_rows))
    ]  # fmt: skip


class _CsvChunks:
    """The CSV's chunks in order, parsed once: ``get(i)`` advances the parser to chunk i."""

    def __init__(self, csv_path: str, chunk_rows: int):
        self.csv_path, self.chunk_rows = csv_path, chunk_rows
        self.reader: Iterator[pd.DataFrame] | None = None
        self.next = 0

    def get(self, index: int) -> pd.DataFrame:
        if self.reader is None or index < self.next:
            self.reader = iter(pd.read_csv(self.csv_path, dtype=str, keep_default_na=False,
                                           chunksize=self.chunk_rows))  # fmt: skip
            self.next = 0
        while True:
            frame = next(self.reader)
            self.next += 1
            if self.next - 1 == index:
                return frame


def csv_source(csv_path: str, image_root: str, chunk_rows: int) -> Source:
    """Chunks of the per-image CSV; ``image`` holds each row's path (file_name under the root)."""
    if not os.path.isfile(csv_path):
        raise DataError(f"--csv {csv_path}: no such file")
    try:
        header = pd.read_csv(csv_path, nrows=0, dtype=str).columns
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        raise DataError(f"--csv {csv_path}: not a readable CSV ({exc})") from exc
    for column in ("file_name", "caption"):
        if column not in header:
            raise DataError(f"--csv {csv_path}: missing column {column}")
    rows = sum(len(f) for f in pd.read_csv(csv_path, usecols=["file_name"], dtype=str,
                                           chunksize=65536))  # fmt: skip
    chunks = _CsvChunks(csv_path, chunk_rows)

    def read(index: int) -> pa.Table:
        frame = chunks.get(index)
        frame["image"] = [os.path.join(image_root, name) for name in frame["file_name"]]
        return pa.Table.from_pandas(frame, preserve_index=False)

    count = math.ceil(rows / chunk_rows)
    units = [
        Unit(f"part-{i:05d}", lambda i=i: read(i), f"{csv_path}, rows {i * chunk_rows}-"
             f"{min((i + 1) * chunk_rows, rows) - 1}")
        for i in range(count)
    ]  # fmt: skip
    # The output CSV copies the input's columns (no images) and adds the scores.
    return Source(units, True, Path(csv_path).name, os.path.getsize(csv_path), rows)


# ---------------------------------------------------------------- pass 1: scores


def score_images(
    cells: Sequence[object], prompts: Sequence[str], scorers: Sequence, batch_size: int
) -> tuple[np.ndarray, int]:
    """[len(cells), K] float64 scores (NaN where the image does not decode), and that count.
    Images are decoded ``batch_size`` at a time, so decoded pixels never outgrow one batch."""
    scores = np.full((len(cells), len(scorers)), np.nan)
    unreadable = 0
    for start in range(0, len(cells), batch_size):
        images, prompts_ok, rows = [], [], []
        for i in range(start, min(start + batch_size, len(cells))):
            try:
                images.append(load_rgb(cells[i]))
            except UnreadableImage as exc:
                logger.warning("image %d of the unit does not decode: %s", i, exc)
                unreadable += 1
                continue
            prompts_ok.append(prompts[i] if isinstance(prompts[i], str) else "")
            rows.append(i)
        if not images:
            continue
        for k, scorer in enumerate(scorers):
            scores[rows, k] = scorer.score(images, prompts_ok)
    return scores, unreadable


def row_checksums(table: pa.Table, sides: Sequence[str]) -> np.ndarray:
    """[rows] uint64: each row's caption and image cells (bytes or paths), as CRC-32 and length.
    Pass 2 compares them with the rows it reads again: input changed in between is found, not
    silently given another row's scores. CRC-32 rather than a cryptographic hash: it detects
    accidents, at several GB/s."""
    columns = [table.column(c).to_pylist() for c in ("caption", *sides)]
    sums = np.empty(table.num_rows, dtype=np.uint64)
    for row, cells in enumerate(zip(*columns, strict=True)):
        crc, length = 0, 0
        for cell in cells:
            data = b"" if cell is None else cell if isinstance(cell, bytes) else str(cell).encode()
            # The length and a null marker first, so ("ab", "c") and ("a", "bc") differ.
            tag = b"%d%s" % (len(data), b"n" if cell is None else b"v")
            crc = zlib.crc32(data, zlib.crc32(tag, crc))
            length += len(data)
        sums[row] = ((length & 0xFFFFFFFF) << 32) | crc
    return sums


def score_unit(table: pa.Table, sides: Sequence[str], scorers: Sequence, batch_size: int,
               names: Sequence[str]) -> tuple[pa.Table, int]:  # fmt: skip
    """The unit's scores: its rows' checksums, then ``score_<name>_<side>`` (pairs) or
    ``score_<name>`` (one image column); and the count of images that do not decode."""
    prompts = table.column("caption").to_pylist()
    scored = pa.table({KEY: pa.array(row_checksums(table, sides))})
    unreadable = 0
    for column in sides:
        cells = table.column(column).to_pylist()
        scores, bad = score_images(cells, prompts, scorers, batch_size)
        unreadable += bad
        suffix = f"_{column[-1]}" if len(sides) == 2 else ""
        for k, name in enumerate(names):
            scored = scored.append_column(f"score_{name}{suffix}", pa.array(scores[:, k]))
    return scored, unreadable


def joined(unit: Unit, scored: pa.Table, out: Path, sides: Sequence[str]) -> pa.Table:
    """The unit's rows, from the input again (or as pass 1 kept them), with its score columns
    appended, once their checksums show they are the rows that were scored."""
    if KEY not in scored.column_names:  # a scratch copy of the whole rows, as before
        raise DataError(f"{out / SCORED_DIR}: written by an older version of this command; "
                        "relabel into a new --out")  # fmt: skip
    kept = out / ROWS_DIR / f"{unit.name}.parquet"
    rows = pq.read_table(kept) if kept.is_file() else unit.read()
    expected = scored.column(KEY).to_numpy()
    found = row_checksums(rows, sides) if rows is not None else np.empty(0, np.uint64)
    if found.shape != expected.shape or (found != expected).any():
        detail = (f"row {int(np.flatnonzero(found != expected)[0])} differs"
                  if found.shape == expected.shape
                  else f"{found.size} rows where {expected.size} were scored")  # fmt: skip
        raise DataError(f"{unit.where or unit.name}: the input changed since it was scored "
                        f"({detail}); relabel into a new --out")  # fmt: skip
    for column in scored.column_names[1:]:
        rows = rows.append_column(column, scored.column(column))
    return rows


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------- pass 2: labels


def score_stats(
    files: Sequence[Path], columns: Sequence[Sequence[str]]
) -> list[tuple[float, float]]:
    """Per scorer (its columns: one per side), the mean and std over every finite score,
    accumulated file by file from the score columns alone."""
    flat = [c for group in columns for c in group]
    totals = np.zeros((len(columns), 3))  # count, sum, sum of squares
    for path in files:
        table = pq.read_table(path, columns=flat)
        for k, group in enumerate(columns):
            values = np.concatenate([table.column(c).to_numpy() for c in group])
            values = values[np.isfinite(values)]
            totals[k] += (values.size, values.sum(), np.square(values).sum())
    stats = []
    for count, total, squares in totals:
        mean = total / count if count else 0.0
        var = max(squares / count - mean * mean, 0.0) if count else 0.0
        stats.append((float(mean), float(math.sqrt(var))))
    return stats


def combined(table: pa.Table, columns: Sequence[str], stats, weights) -> np.ndarray:
    """sum_k w_k (s_k - mean_k) / std_k over the scorers' columns of one side (NaN stays NaN)."""
    total = np.zeros(table.num_rows)
    for column, (mean, std), weight in zip(columns, stats, weights, strict=True):
        values = table.column(column).to_numpy()
        z = (values - mean) / std if std > 0 else np.where(np.isfinite(values), 0.0, np.nan)
        total = total + weight * z
    return total


def pair_labels(c0: np.ndarray, c1: np.ndarray, tie_threshold: float, temperature: float):
    """label_0, label_1 (0.5/0.5 when |c0 - c1| <= threshold or a score is missing), prob_0."""
    gap = c0 - c1
    tie = ~np.isfinite(gap) | (np.abs(gap) <= tie_threshold)
    label_0 = np.where(tie, 0.5, (gap > 0).astype(np.float64))
    prob = np.where(np.isfinite(gap), 1.0 / (1.0 + np.exp(-np.nan_to_num(gap) / temperature)), 0.5)
    return label_0, np.where(tie, 0.5, 1.0 - label_0), prob


# ---------------------------------------------------------------- the run


@dataclass(frozen=True)
class Options:
    names: list[str]  # scorer names (column names)
    weights: list[float]
    tie_threshold: float = 0.0
    temperature: float = 1.0
    threshold: float | None = None  # per-image: label 1 when combined >= threshold
    quantile: float | None = None  # per-image: label 1 when combined >= this quantile
    batch_size: int = 32


def relabel(units: Iterable[Unit], scorers: Sequence, options: Options, out: Path, per_image: bool,
            csv_name: str = "", max_units: int | None = None) -> Summary:  # fmt: skip
    """Pass 1 over units not yet scored (at most ``max_units`` in this call), then pass 2."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / SUMMARY_FILE).is_file():  # finished before: nothing left to do
        return Summary(**json.loads((out / SUMMARY_FILE).read_text()))
    scored_dir = out / SCORED_DIR
    scored_dir.mkdir(exist_ok=True)
    summary = Summary()
    sides = ["image"] if per_image else ["jpg_0", "jpg_1"]
    done: list[Unit] = []  # the units, in order (a hub stream's count is known only at its end)
    for unit in units:
        path = scored_dir / f"{unit.name}.parquet"
        if path.is_file():
            done.append(unit)
            continue
        if max_units is not None and summary.scored_now >= max_units:
            summary.units = len(done)
            return summary  # "killed": a re-run continues from here
        rows = unit.read()
        if rows is None:
            break  # past the end of a stream of unknown length
        scores, bad = score_unit(rows, sides, scorers, options.batch_size, options.names)
        if bad:
            logger.warning("%s: %d images do not decode (scores NaN)", unit.name, bad)
        if unit.keep_rows:
            (out / ROWS_DIR).mkdir(exist_ok=True)
            write_parquet_atomic(rows, out / ROWS_DIR / f"{unit.name}.parquet")
        write_parquet_atomic(scores, path)  # last: it marks the unit as scored
        summary.scored_now += 1
        done.append(unit)
    if not done:
        raise DataError("no rows to relabel")
    summary.units = len(done)
    files = [scored_dir / f"{unit.name}.parquet" for unit in done]
    suffixes = [""] if per_image else ["_0", "_1"]
    stats = score_stats(files, [[f"score_{n}{s}" for s in suffixes] for n in options.names])
    summary.stats = {
        n: {"mean": m, "std": s} for n, (m, s) in zip(options.names, stats, strict=True)
    }
    if per_image:
        _write_csv(done, files, options, stats, out, csv_name, summary)
        summary.outputs = [str(out / csv_name)]
    else:
        _write_pairs(done, files, options, stats, out, summary)
        summary.outputs = [str(out / "train-*.parquet")]
    summary.outputs.append(str(out / SUMMARY_FILE))
    summary.complete = True
    (out / SUMMARY_FILE).write_text(json.dumps(asdict(summary), indent=2) + "\n")
    # The final shards hold every score; the scratch is of no further use.
    shutil.rmtree(scored_dir)
    shutil.rmtree(out / ROWS_DIR, ignore_errors=True)
    return summary


def _write_pairs(units, files, options: Options, stats, out: Path, summary: Summary) -> None:
    counts = {"image_0_chosen": 0, "image_1_chosen": 0, "tie": 0}
    for unit, path in zip(units, files, strict=True):
        table = pq.read_table(path)  # the unit's checksums and scores
        c = [combined(table, [f"score_{n}_{side}" for n in options.names], stats, options.weights)
             for side in (0, 1)]  # fmt: skip
        label_0, label_1, prob = pair_labels(c[0], c[1], options.tie_threshold, options.temperature)
        summary.rows += table.num_rows
        summary.images += 2 * table.num_rows
        summary.unreadable_images += int(sum(
            (~np.isfinite(table.column(f"score_{options.names[0]}_{s}").to_numpy())).sum()
            for s in (0, 1)))  # fmt: skip
        counts["tie"] += int((label_0 == 0.5).sum())
        counts["image_0_chosen"] += int((label_0 == 1).sum())
        counts["image_1_chosen"] += int((label_1 == 1).sum())
        final = out / f"{unit.name}.parquet"
        if not final.is_file():  # else written by an earlier (killed) call: the same values
            table = joined(unit, table, out, ["jpg_0", "jpg_1"])
            new = {"score_combined_0": c[0], "score_combined_1": c[1], "label_0": label_0,
                   "label_1": label_1, "prob_0": prob}  # fmt: skip
            for name, values in new.items():
                table = table.append_column(name, pa.array(values))
            write_parquet_atomic(table, final)
        # A hub unit's kept rows are in its shard now: the disk holds one copy of them.
        (out / ROWS_DIR / f"{unit.name}.parquet").unlink(missing_ok=True)
    summary.ties = counts["tie"]
    summary.labels = counts


def _write_csv(units, files, options: Options, stats, out: Path, csv_name: str,
               summary: Summary) -> None:  # fmt: skip
    target = out / csv_name
    scores = np.concatenate(
        [
            combined(
                pq.read_table(p, columns=[f"score_{n}" for n in options.names]),
                [f"score_{n}" for n in options.names],
                stats,
                options.weights,
            )
            for p in files
        ]
    )  # fmt: skip  (N floats: the quantile needs them all)
    finite = scores[np.isfinite(scores)]
    cut = options.threshold if options.threshold is not None else 0.0
    if options.quantile is not None:
        cut = float(np.quantile(finite, options.quantile)) if finite.size else 0.0
    summary.rows = summary.images = int(scores.size)
    summary.unreadable_images = summary.ties = int(scores.size - finite.size)
    tmp = target.with_name(f".{target.name}.tmp")
    header = True
    labels = {"1": 0, "0": 0}
    with open(tmp, "w", encoding="utf-8", newline="") as handle:
        for unit, path in zip(units, files, strict=True):
            frame = joined(unit, pq.read_table(path), out, ["image"]).to_pandas()
            frame["score_combined"] = combined(
                pa.Table.from_pandas(frame), [f"score_{n}" for n in options.names], stats,
                options.weights,
            )  # fmt: skip
            frame = frame[np.isfinite(frame["score_combined"])]
            frame["label"] = (frame["score_combined"] >= cut).astype(int)
            if "split" in frame.columns:
                frame["split_human"] = frame["split"]
            frame["split"] = np.where(frame["label"] == 1, DESIRABLE, UNDESIRABLE)
            labels["1"] += int(frame["label"].sum())
            labels["0"] += int((frame["label"] == 0).sum())
            frame.drop(columns=["image"]).to_csv(handle, index=False, header=header)
            header = False
    os.replace(tmp, target)
    summary.labels = labels
    summary.stats["cut"] = {"combined": cut}


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(prog="python -m evaluation.relabel", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="parquet pairs: directory, glob or file, or a hub dataset")
    source.add_argument("--pairs", help="your own pairs: JSONL/CSV manifest (with --images)")
    source.add_argument("--pairs_dirs", help="your own pairs: two folders W,L")
    source.add_argument("--csv", help="per-image KTO CSV (file_name, caption, ...; --images)")
    parser.add_argument("--images", help="image root of --pairs or --csv")
    parser.add_argument("--captions", help="--pairs_dirs captions: JSONL or folder of .txt")
    parser.add_argument("--columns", help="--data column mapping (as train.py's --columns)")
    parser.add_argument("--hub_split", default="train", help="split of a hub dataset --data")
    parser.add_argument("--scorer", action="append", required=True,
                        help="NAME or NAME=PATH of a registered scorer (repeatable)")  # fmt: skip
    parser.add_argument("--weights", help="comma-separated weight per --scorer (default equal)")
    parser.add_argument("--tie_threshold", type=float, default=0.0,
                        help="pairs: a tie when |combined gap| <= this (z units)")  # fmt: skip
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="pairs: prob_0 = sigmoid(gap / temperature)")  # fmt: skip
    cut = parser.add_mutually_exclusive_group()
    cut.add_argument("--threshold", type=float, help="CSV: label 1 when combined >= this (z)")
    cut.add_argument("--quantile", type=float, help="CSV: label 1 when combined >= this quantile")
    parser.add_argument("--batch_size", type=int, default=32, help="images per scorer call")
    parser.add_argument("--chunk_rows", type=int, default=DEFAULT_CHUNK_ROWS,
                        help="rows per unit of work for manifests, folders and CSVs")  # fmt: skip
    parser.add_argument("--device", default=None, help="scorer device (default: cuda if present)")
    parser.add_argument("--max_units", type=int, default=None,
                        help="score at most N new units now (re-run to continue)")  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if (args.pairs or args.csv) and not args.images:
        raise cli.UsageError(f"--{'pairs' if args.pairs else 'csv'} needs --images")
    if args.quantile is not None and not 0.0 <= args.quantile <= 1.0:
        raise cli.UsageError("--quantile must be in [0, 1]")
    if args.tie_threshold < 0 or not args.temperature > 0:
        raise cli.UsageError("--tie_threshold must be >= 0 and --temperature > 0")
    if args.batch_size < 1 or args.chunk_rows < 1:
        raise cli.UsageError("--batch_size and --chunk_rows must be >= 1")
    if args.pairs_dirs and len(args.pairs_dirs.split(",")) != 2:
        raise cli.UsageError("--pairs_dirs takes two folders: W,L")


def source_units(args: argparse.Namespace) -> Source:
    others = [f"--{n}" for n in ("csv", "pairs", "pairs_dirs") if getattr(args, n)]
    try:
        columns = columns_flag(args.columns, others)
    except ValueError as exc:
        raise cli.UsageError(str(exc)) from exc
    if args.csv:
        return csv_source(args.csv, args.images, args.chunk_rows)
    if args.data:
        files = local_parquet_files(args.data)  # None: not a local path but a hub name
        if files is None:
            return hub_source(args.data, args.hub_split, columns, args.chunk_rows)
        units = parquet_units(files, columns)
        rows = sum(pq.read_metadata(f).num_rows for f in files)
        return Source(units, False, "", sum(os.path.getsize(f) for f in files), rows)
    if args.pairs:
        table = load_manifest(args.pairs, args.images)
    else:
        table = load_pair_dirs(*args.pairs_dirs.split(","), args.captions)
    units = pair_table_units(table, args.chunk_rows)
    return Source(units, False, "", pair_image_bytes(table), len(table))


# ---------------------------------------------------------------- free space

SPACE_MARGIN = 1.1  # the output re-encodes the input (its own compression and pages): 10% spare
# Per added value and row: a float64 in the final shard and in the scratch (8 + 8 bytes), or its
# text in the output CSV (up to ~22 characters).
VALUE_BYTES = 24
SAMPLED_PAIRS = 256  # own pairs: their image files' sizes are sampled, not all looked up


def pair_image_bytes(table: PairTable, sample: int = SAMPLED_PAIRS) -> int:
    """About the bytes of every pair's two images, which the output embeds: the mean over up to
    ``sample`` evenly spaced pairs, times the pairs (a file that cannot be read counts 0)."""
    if not len(table):
        return 0
    rows = np.unique(np.linspace(0, len(table) - 1, min(sample, len(table))).astype(int))
    paths = [path for row in rows for path in table.paths(int(row))]
    total = sum(os.path.getsize(path) for path in paths if os.path.isfile(path))
    return round(total / len(rows) * len(table))


def output_estimate(source: Source, scorers: int) -> int | None:
    """Bytes that the output and the scratch take, about, at most: the input the output copies
    plus the added values (a checksum and a score per scorer for each image; per pair the
    combined scores, labels and prob_0, per image row its combined score, label and split),
    times SPACE_MARGIN; None when the input's size is unknown."""
    if source.input_bytes is None:
        return None
    images = 1 if source.per_image else 2
    values = images * (scorers + 1) + (3 if source.per_image else 5)
    added = (source.rows or 0) * values * VALUE_BYTES
    return math.ceil(SPACE_MARGIN * (source.input_bytes + added))


def readable_size(count: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{int(count)} bytes"


def check_free_space(out: Path, needed: int | None, free: int | None = None) -> None:
    """Stop before anything is scored when ``needed`` bytes, less those an earlier (killed) call
    already wrote under ``out``, exceed ``free`` (default: the free bytes of ``out``'s
    filesystem): better a line now than a full disk after hours of scoring."""
    if needed is None:
        logger.warning("the input's size is unknown: free space under --out is not checked")
        return
    written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.is_dir() else 0
    if free is None:
        existing = next(p for p in (out, *out.absolute().parents) if p.exists())
        free = shutil.disk_usage(existing).free
    if needed - written > free:
        raise cli.UsageError(
            f"--out {out}: the relabelled data needs about {readable_size(needed - written)} "
            f"(estimated from the input), and {readable_size(free)} is free there; "
            "free some space or choose another --out"
        )


def check_resume(out: Path, identity: dict, args_file: str = ARGS_FILE) -> None:
    """Refuse to mix outputs of different settings in one directory."""
    path = out / args_file
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous != identity:
            raise cli.UsageError(
                f"--out {out} holds a relabelling with other settings ({previous}); "
                "use another --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(identity, indent=2) + "\n")


def relabelling_record(out: Path) -> dict | None:
    """The arguments a finished relabelling in ``out`` was made with (what read, which scorers,
    weights), or None when ``out`` holds none: what a model trained on it cites on its card."""
    args, summary = Path(out) / ARGS_FILE, Path(out) / SUMMARY_FILE
    if not (args.is_file() and summary.is_file()):
        return None
    return json.loads(args.read_text())


def run(argv: Sequence[str] | None = None, scorers: Sequence | None = None,
        free_bytes: int | None = None) -> Summary:  # fmt: skip
    """Parse, relabel, return the summary; ``scorers`` replaces --scorer's built ones and
    ``free_bytes`` the free space on --out's filesystem (tests)."""
    args = build_parser().parse_args(None if argv is None else list(argv))
    check_args(args)
    specs = [s.partition("=") for s in args.scorer]
    names = [name for name, _, _ in specs]
    if len(set(names)) != len(names):
        raise cli.UsageError(f"--scorer: a scorer is given twice ({', '.join(names)})")
    weights = parse_weights(args.weights, len(names))
    options = Options(names, weights, args.tie_threshold, args.temperature, args.threshold,
                      args.quantile, args.batch_size)  # fmt: skip
    source = source_units(args)
    if not (args.out / SUMMARY_FILE).is_file():  # else finished before: nothing more to write
        check_free_space(args.out, output_estimate(source, len(names)), free_bytes)
    identity = {k: v for k, v in vars(args).items() if k not in ("max_units", "device", "out")}
    check_resume(args.out, json.loads(json.dumps(identity, default=str)))
    if scorers is None:
        scorers = [build_named(name, path, args.device) for name, _, path in specs]
    return relabel(source.units, scorers, options, args.out, source.per_image, source.csv_name,
                   args.max_units)  # fmt: skip


def build_named(name: str, path: str, device: str | None):
    from evaluation.scorers import build_scorer  # imports torch: only once the input checked

    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return build_scorer(name, path or None, device)
    except ValueError as exc:
        raise cli.UsageError(f"--scorer {name}: {exc}") from exc


def main(argv: Sequence[str] | None = None) -> int:
    cli.setup_logging("%(levelname)s %(name)s: %(message)s")
    summary = run(argv)
    if not summary.complete:
        print(f"scored {summary.scored_now} units; re-run the same command to continue")
        return 0
    print(f"relabelled {summary.rows} rows ({summary.images} images, {summary.unreadable_images} "
          f"unreadable): {summary.labels}")  # fmt: skip
    if summary.outputs:  # (a relabel.json of an older version lists none)
        print(f"wrote {', '.join(summary.outputs)}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, prog="python -m evaluation.relabel"))
