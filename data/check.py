"""Check a training dataset before spending GPU hours on it.

    python -m data.check /data/pickapic_v2                      # Pick-a-Pic parquet pairs
    python -m data.check /data/mine --columns caption=prompt,jpg_0=a,jpg_1=b,label_0=x,label_1=y
    python -m data.check owner/name [--hub_split test] [--columns ...]   # a hub dataset, streamed
    python -m data.check --csv train_processed_v3.csv --images /data/pickapic_kto
    python -m data.check --pairs my_pairs.jsonl --images /data/mine      # your own pairs
    python -m data.check --pairs_dirs /data/w,/data/l --captions captions.jsonl

Reports rows, ties, undecodable images, missing image files, duplicate pairs (or duplicate
``file_name`` rows), captions longer than the tokenizer's limit (they get truncated), and
label / split counts. Exits 1 when a problem would stop or corrupt training (an unreadable
parquet file or row group, a missing column, a bad label, an unknown split, a path outside the
image root, most image files missing, no usable rows), or, with ``--strict``, when anything at
all was found; 2, with one line naming the flag, when the input cannot be read at all (a path
that does not exist, an empty or unparsable CSV); 0 otherwise. Rows are numbered from 1 in
both formats (a parquet file's first row, the CSV's first row after its header). ``--columns``
reads parquet in another schema as training does (data/columns.py); reports keep the standard
names (``jpg_0``, ``label_0``) and name the shard's own column beside them.

Images are decoded in JPEG draft mode (DCT scaling to about 1/8 size), which still reads the
whole entropy-coded stream, so truncated or garbled files fail here as they would in training,
at a fraction of the cost of a full decode.
"""

import argparse
import hashlib
import io
import itertools
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from common import cli
from data.columns import PROB, columns_flag, parse_columns
from data.errors import DataError
from data.hub_chunks import UID_COLUMNS, HubChunks, pair_chunk
from data.kto_table import DEFAULT_SPLIT_LABELS, MAX_MISSING_SHARE, parse_split_labels, read_csv
from data.pair_table import PairTable, load_manifest, load_pair_dirs
from data.parquet_index import (
    REQUIRED_COLUMNS,
    check_probs,
    count_mapped_pairs,
    local_parquet_files,
    missing_column,
)
from data.pickapic_hub import open_hub_pairs

logger = logging.getLogger(__name__)

HUB_CHUNK_ROWS = 1024  # rows of a hub dataset read at a time
EXAMPLES_KEPT = 20  # locations listed per kind of defect; the counts are always complete
DRAFT_SCALE = 8  # JPEG DCT scaling: the largest libjpeg offers


@dataclass
class Defects:
    """A count plus the first few locations, so a report of 10K bad rows stays readable."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, where: str, n: int = 1) -> None:
        self.count += n
        if len(self.examples) < EXAMPLES_KEPT:
            self.examples.append(where)


@dataclass
class Report:
    source: str
    rows: int = 0
    ties: int = 0
    usable: int = 0  # rows training would use: pairs after ties, or CSV rows with a known split
    undecodable_images: Defects = field(default_factory=Defects)
    missing_files: Defects = field(default_factory=Defects)
    duplicates: Defects = field(default_factory=Defects)
    long_captions: Defects = field(default_factory=Defects)
    labels: dict[str, int] = field(default_factory=dict)  # chosen side / label -> count
    splits: dict[str, int] = field(default_factory=dict)  # CSV split -> count
    fatal: list[str] = field(default_factory=list)
    images_checked: int = 0  # image files looked up (CSV)

    def defects(self) -> int:
        kinds = (self.undecodable_images, self.missing_files, self.duplicates)
        return sum(d.count for d in kinds)

    def exit_code(self, strict: bool) -> int:
        return 1 if self.fatal or (strict and self.defects()) else 0

    def summary(self) -> str:
        lines = [
            f"rows: {self.rows} ({self.usable} usable, {self.ties} ties; rows numbered from 1)",
            f"labels: {self.labels}",
        ]
        if self.splits:
            lines.append(f"splits: {self.splits}")
        for name in ("undecodable_images", "missing_files", "duplicates", "long_captions"):
            defects: Defects = getattr(self, name)
            shown = "; ".join(defects.examples[:5])
            lines.append(f"{name}: {defects.count}" + (f" (e.g. {shown})" if shown else ""))
        lines += [f"FATAL: {problem}" for problem in self.fatal]
        return "\n  ".join([f"data check of {self.source}:", *lines])


def image_decodes(data: bytes | str | dict | None) -> bool:
    """Whether an image (bytes, a path, or a hub-style ``{"bytes", "path"}`` cell, as
    data/decode.py reads) decodes; JPEGs in draft mode, other formats fully."""
    if isinstance(data, dict):
        data = data.get("bytes") or data.get("path")
    if data is None:
        return False
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            size = (image.width // DRAFT_SCALE, image.height // DRAFT_SCALE)
            image.draft("RGB", size)  # a no-op for non-JPEG formats
            image.load()
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        return False
    return True


class CaptionLengths:
    """Counts captions whose token count (with BOS/EOS) exceeds the tokenizer's limit."""

    def __init__(self, tokenizer_dir: str | None):
        self.tokenizer = None
        if tokenizer_dir is not None:
            from transformers import AutoTokenizer  # only this check needs it

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
            self.limit = self.tokenizer.model_max_length

    def too_long(self, captions: list[str]) -> np.ndarray:
        """[N] bool, all False without a tokenizer."""
        if self.tokenizer is None or not captions:
            return np.zeros(len(captions), dtype=bool)
        ids = self.tokenizer(captions, truncation=False)["input_ids"]
        return np.array([len(x) > self.limit for x in ids], dtype=bool)


def _pair_key(first: object, second: object) -> bytes:
    """Order-insensitive 8-byte digest of a pair's two image ids (or their bytes)."""
    parts = sorted(hashlib.blake2b(_as_bytes(x), digest_size=8).digest() for x in (first, second))
    return hashlib.blake2b(b"".join(parts), digest_size=8).digest()


def _as_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    return b"" if value is None else str(value).encode()


@dataclass
class _PairScan:
    """What a scan of pair rows accumulates across shards or hub chunks."""

    report: Report
    captions: CaptionLengths
    columns: dict[str, str]  # standard name -> the source's column
    seen: set[bytes] = field(default_factory=set)  # pair keys met so far (duplicates)
    chosen: Counter = field(default_factory=Counter)  # chosen side -> count


def check_pairs(
    source: str,
    captions: CaptionLengths,
    columns: dict[str, str] | None = None,
    hub_split: str = "train",
) -> Report:
    """Scan every row group of every shard named by ``source`` (as ``--data`` takes it), or
    every row of a hub dataset, its columns named by ``columns`` (standard name -> shard column,
    data/columns.py)."""
    columns = columns or parse_columns(None)
    report = Report(source)
    files = local_parquet_files(source)  # DataError for a path that does not exist
    scan = _PairScan(report, captions, columns)
    if files is None:
        _check_hub(source, hub_split, scan)
    for path in files or []:
        _check_shard(path, scan)
    report.labels = {f"image_{side}_chosen": n for side, n in sorted(scan.chosen.items())}
    if report.usable == 0 and not report.fatal:
        report.fatal.append(
            f"{source}: no usable pairs (every row is a tie or has an undecodable image)"
        )
    return report


def _check_shard(path: str, scan: _PairScan) -> None:
    report, columns = scan.report, scan.columns
    try:
        shard = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        report.fatal.append(f"{path}: not a readable parquet file ({exc})")
        return
    names = set(shard.schema_arrow.names)
    # prob_0 is checked when the shard has it, or when --columns names it explicitly.
    prob = columns[PROB] in names or columns[PROB] != PROB
    missing = missing_column(path, names, columns, [*REQUIRED_COLUMNS, *([PROB] if prob else [])])
    if missing:
        report.fatal.append(missing)
        return
    standard = [*REQUIRED_COLUMNS, *([PROB] if prob else [])]
    uids = set(UID_COLUMNS) <= names and not set(UID_COLUMNS) & set(columns.values())
    id_columns = list(UID_COLUMNS) if uids else ["jpg_0", "jpg_1"]
    read = [columns[c] for c in standard] + (list(UID_COLUMNS) if uids else [])
    first_row = 0
    for group in range(shard.metadata.num_row_groups):
        num_rows = shard.metadata.row_group(group).num_rows
        where = f"{path} row group {group} (rows {first_row + 1}-{first_row + num_rows})"
        try:
            table = shard.read_row_group(group, columns=read)
            table = table.rename_columns(standard + read[len(standard) :])
            count_mapped_pairs(where, table.select(["label_0", "label_1"]), columns)
            if prob:
                check_probs(where, table.column(PROB))
        except (OSError, pa.ArrowException, DataError) as exc:
            report.fatal.append(f"{where}: {exc}" if not isinstance(exc, DataError) else str(exc))
            first_row += num_rows
            continue
        _check_rows(path, first_row, table, id_columns, scan)
        first_row += num_rows


def _check_hub(name: str, split: str, scan: _PairScan) -> None:
    """A hub dataset, streamed in its stored order in chunks (data/hub_chunks.py); rows are
    numbered from 1 in that order."""
    report, columns = scan.report, scan.columns
    prob = columns[PROB] != PROB  # a hub stream's soft label is checked when mapped explicitly
    needed = [columns[c] for c in (*REQUIRED_COLUMNS, *([PROB] if prob else []))]
    try:
        chunks = HubChunks(open_hub_pairs(name, split, None, needed), HUB_CHUNK_ROWS)
    except DataError as exc:
        if "missing column" not in str(exc):
            raise  # the name cannot be opened at all
        report.fatal.append(str(exc))
        return
    first_row = 0
    for index in itertools.count():
        table = pair_chunk(chunks, index, columns, prob)
        if table is None:
            return
        where = f"{name} rows {first_row + 1}-{first_row + table.num_rows}"
        try:
            count_mapped_pairs(where, table.select(["label_0", "label_1"]), columns)
            if prob:
                check_probs(where, table.column(PROB))
        except DataError as exc:
            report.fatal.append(str(exc))
        else:
            ids = list(UID_COLUMNS) if set(UID_COLUMNS) <= set(table.column_names) else None
            ids = ids or ["jpg_0", "jpg_1"]
            _check_rows(name, first_row, table, ids, scan)
        first_row += table.num_rows


def _check_rows(
    path: str, first_row: int, table: pa.Table, id_columns: list[str], scan: _PairScan
) -> None:
    report, seen, chosen, columns = scan.report, scan.seen, scan.chosen, scan.columns
    label_0 = table.column("label_0").to_numpy(zero_copy_only=False)
    label_1 = table.column("label_1").to_numpy(zero_copy_only=False)
    text = [c if isinstance(c, str) else "" for c in table.column("caption").to_pylist()]
    long = scan.captions.too_long(text)
    ids = [table.column(c) for c in id_columns]
    jpgs = [table.column("jpg_0"), table.column("jpg_1")]
    for i in range(table.num_rows):
        where = f"{path} row {first_row + i + 1}"
        report.rows += 1
        if long[i]:
            report.long_captions.add(where)
        if label_0[i] == label_1[i]:
            report.ties += 1
            continue
        chosen[0 if label_0[i] == 1 else 1] += 1
        key = _pair_key(ids[0][i].as_py(), ids[1][i].as_py())
        if key in seen:
            report.duplicates.add(where)
        seen.add(key)
        decodes = True
        for side in (0, 1):
            if not image_decodes(jpgs[side][i].as_py()):
                report.undecodable_images.add(f"{where}, column {_named(columns, f'jpg_{side}')}")
                decodes = False
        report.usable += decodes  # training skips a pair whose image does not decode


def _named(columns: dict[str, str], name: str) -> str:
    """``jpg_0``, or ``jpg_0 (image_a)`` when --columns maps it to the shard's ``image_a``."""
    return name if columns[name] == name else f"{name} ({columns[name]})"


def check_csv(
    csv_path: str, image_root: str, split_labels: dict[str, int], captions: CaptionLengths
) -> Report:
    """Check the per-image CSV and every image file it names."""
    report = Report(csv_path)
    frame = read_csv(csv_path, image_root)  # DataError: missing, empty or unparsable
    report.rows = len(frame)
    report.splits = dict(Counter(frame["split"]))
    unknown = sorted(set(report.splits) - set(split_labels))
    if unknown:
        report.fatal.append(f"{csv_path}: column split: values {unknown} are not in the mapping")
    labels = frame["split"].map(split_labels)
    report.labels = {str(k): int(v) for k, v in labels.dropna().astype(int).value_counts().items()}
    long = captions.too_long(list(frame["caption"]))
    first_seen: dict[str, int] = {}
    usable_files: set[int] = set()  # rows whose file exists and decodes
    root = os.path.realpath(image_root)
    known = labels.notna().to_numpy()
    for i, (name, caption_long) in enumerate(zip(frame["file_name"], long, strict=True)):
        where = f"{csv_path} row {i + 1} ({name})"
        if caption_long:
            report.long_captions.add(where)
        if name in first_seen:
            report.duplicates.add(f"{where}, first at row {first_seen[name] + 1}")
            report.usable += bool(known[i]) and first_seen[name] in usable_files
            continue
        first_seen[name] = i
        path = os.path.realpath(os.path.join(image_root, name))
        report.images_checked += 1
        if not path.startswith(root + os.sep):
            report.fatal.append(f"{where}: file_name is outside the image root {image_root}")
        elif not os.path.isfile(path):
            report.missing_files.add(where)
        elif not image_decodes(path):
            report.undecodable_images.add(where)
        else:
            usable_files.add(i)
            report.usable += bool(known[i])
    missing = report.missing_files.count
    if missing > MAX_MISSING_SHARE * report.images_checked:
        report.fatal.append(
            f"--images {image_root}: {missing} of {report.images_checked} image files are "
            "missing; is --images the directory that file_name is relative to?"
        )
    if report.usable == 0 and not report.fatal:
        report.fatal.append(
            f"{csv_path}: no usable rows (a known split and an image file that decodes)"
        )
    return report


def check_pair_table(table: PairTable, captions: CaptionLengths) -> Report:
    """Check your own pairs (data/pair_table.py, already validated row by row when loaded):
    every image file, duplicate pairs, caption lengths, the probability column's spread."""
    report = Report(table.source)
    report.rows = len(table)
    texts = table.captions.to_pylist()
    long = captions.too_long(texts)
    seen: dict[bytes, int] = {}
    for row in range(len(table)):
        where = f"{table.source} row {row + 1}"
        if long[row]:
            report.long_captions.add(where)
        chosen, rejected = table.chosen[row].as_py(), table.rejected[row].as_py()
        key = _pair_key(chosen, rejected)
        if key in seen:
            report.duplicates.add(f"{where}, first at row {seen[key] + 1}")
        seen.setdefault(key, row)
        usable = True
        for side, path in zip(("chosen", "rejected"), table.paths(row), strict=True):
            report.images_checked += 1
            if not os.path.isfile(path):
                report.missing_files.add(f"{where}, column {side}: {path}")
                usable = False
            elif not image_decodes(path):
                report.undecodable_images.add(f"{where}, column {side}: {path}")
                usable = False
        report.usable += usable
    if table.probs is not None:
        probs = table.probs
        report.labels = {
            "prob<0.5": int((probs < 0.5).sum()),
            "prob=0.5": int((probs == 0.5).sum()),
            "prob>0.5": int((probs > 0.5).sum()),
        }
    else:
        report.labels = {"chosen_first": report.rows}
    if report.missing_files.count > MAX_MISSING_SHARE * report.images_checked:
        report.fatal.append(
            f"{table.source}: {report.missing_files.count} of {report.images_checked} image "
            "files are missing; is the image root right?"
        )
    if report.usable == 0 and not report.fatal:
        report.fatal.append(f"{table.source}: no usable pairs (both images readable)")
    return report


def default_tokenizer() -> str | None:
    """The embedded tiny model's tokenizer: the real CLIP vocabulary, limit 77, as SD's."""
    path = Path(__file__).resolve().parents[1] / "build" / "tiny-sd15" / "tokenizer"
    return str(path) if path.is_dir() else None


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "data", nargs="?", help="Pick-a-Pic parquet directory, glob or file, or a hub dataset"
    )
    parser.add_argument("--hub_split", default="train", help="split of a hub dataset DATA")
    parser.add_argument(
        "--columns",
        help="DATA column mapping for parquet in another schema, as train.py's --columns "
        "(caption=prompt,jpg_0=image_a,jpg_1=image_b,label_0=a_wins,label_1=b_wins[,prob_0=p])",
    )
    parser.add_argument("--csv", help="per-image KTO CSV (file_name, caption, split)")
    parser.add_argument("--images", help="image root of the CSV's or manifest's paths")
    parser.add_argument("--pairs", help="your own pairs: JSONL/CSV manifest (needs --images)")
    parser.add_argument("--pairs_dirs", help="your own pairs: two folders W,L (same file names)")
    parser.add_argument("--captions", help="--pairs_dirs captions: JSONL or folder of .txt")
    default_labels = ",".join(f"{k}={v}" for k, v in DEFAULT_SPLIT_LABELS.items())
    parser.add_argument("--split_labels", default=default_labels, help="CSV split -> label")
    parser.add_argument(
        "--tokenizer",
        default=default_tokenizer(),
        help="tokenizer directory for the caption-length check (default: the embedded model's;"
        " 'none' skips the check)",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 on any defect found")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    return parser


def run(argv: Iterable[str] | None = None) -> tuple[Report, int]:
    """Parse the command line, check, log the summary; returns the report and the exit code."""
    args = build_parser().parse_args(None if argv is None else list(argv))
    sources = [args.data, args.csv, args.pairs, args.pairs_dirs]
    if sum(x is not None for x in sources) != 1 or ((args.csv or args.pairs) and not args.images):
        raise cli.UsageError(
            "give one of: a parquet DATA path, --csv and --images, --pairs and --images, "
            "--pairs_dirs W,L"
        )
    others = [f"--{n}" for n in ("csv", "pairs", "pairs_dirs") if getattr(args, n)]
    try:
        columns = columns_flag(args.columns, others)
    except ValueError as exc:
        raise cli.UsageError(str(exc)) from exc
    tokenizer = None if str(args.tokenizer).lower() == "none" else args.tokenizer
    captions = CaptionLengths(tokenizer)
    if args.pairs:
        report = check_pair_table(load_manifest(args.pairs, args.images), captions)
    elif args.pairs_dirs:
        if len(args.pairs_dirs.split(",")) != 2:
            raise cli.UsageError("--pairs_dirs takes two folders: W,L")
        chosen, rejected = args.pairs_dirs.split(",")
        report = check_pair_table(load_pair_dirs(chosen, rejected, args.captions), captions)
    elif args.csv:
        report = check_csv(args.csv, args.images, parse_split_labels(args.split_labels), captions)
    else:
        report = check_pairs(args.data, captions, columns, args.hub_split)
    logger.info(report.summary())
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2) + "\n")
        logger.info("report written to %s", args.json)
    return report, report.exit_code(args.strict)


def main(argv: Iterable[str] | None = None) -> int:
    cli.setup_logging("%(levelname)s %(name)s: %(message)s")
    report, code = run(argv)
    print(f"data check: {'FAILED' if code else 'ok'} ({report.rows} rows, {report.usable} usable, "
          f"{report.defects()} defects, {len(report.fatal)} fatal)")  # fmt: skip
    return code


if __name__ == "__main__":
    sys.exit(cli.run(main, prog="python -m data.check"))
