"""Build the per-image Diffusion-KTO data from Pick-a-Pic pairs: a CSV plus JPEG files.

    python scripts/build_kto_csv.py --data /data/pickapic_v2 --out /data/pickapic_kto
    python scripts/build_kto_csv.py --data /data/mine --columns caption=prompt,jpg_0=a,... --out OUT
    python scripts/build_kto_csv.py --pairs my_pairs.jsonl --images /data/mine --out OUT
    python scripts/build_kto_csv.py --pairs_dirs /data/w,/data/l --captions c.jsonl --out OUT

writes ``OUT/train_processed_v3.csv`` (``file_name``, ``caption``, ``split``; the released
format, ``file_name`` relative to OUT) and ``OUT/train/<xx>/<uid>.jpg``. An image's split comes
from every non-tied comparison it appears in, across all shards: ``exclusive_win`` (won all),
``exclusive_lose`` (lost all), ``intersections`` (won some, lost some). Ties carry no
preference and are ignored, so an image seen only in ties is not listed. An image is identified
by ``image_<side>_uid`` when the shards have it, otherwise by a hash of its bytes; its caption is
that of its first comparison. Your own pairs (data/pair_table.py) count as 1/0 comparisons, the
chosen image winning; an image is identified by its path, and rows are read in chunks of
``OWN_CHUNK`` that play the role of row groups (done marks, resume). Parquet in another schema
is read through ``--columns`` as train.py reads it (data/columns.py); ``image_<side>_uid`` is
used only when the shard has both uid columns and the mapping does not name them. A hub dataset
(``--data owner/name``, ``--hub_split``) is streamed in chunks of ``OWN_CHUNK`` rows, each a
"row group" (data/hub_chunks.py).

Streaming with bounded memory: one parquet row group at a time; the per-image tallies live in
an SQLite file (``OUT/.kto_build.sqlite``), one transaction per row group that also marks the
group done. A killed run, re-run with the same arguments, continues after the last committed
row group (an image written by the lost transaction is simply written again). The CSV is
written last, atomically, from the database. JPEG bytes are copied as they are; other formats
are re-encoded to JPEG; an image that does not decode drops its row (counted and logged).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import logging
import os
import re
import sqlite3
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import cli
from data.columns import columns_flag, parse_columns
from data.errors import DataError
from data.hub_chunks import HubChunks, pair_chunk
from data.pair_table import PairTable, load_manifest, load_pair_dirs, read_pair_chunk
from data.parquet_index import local_parquet_files, missing_column
from data.pickapic_hub import open_hub_pairs

logger = logging.getLogger(__name__)

CSV_NAME = "train_processed_v3.csv"
DB_NAME = ".kto_build.sqlite"
IMAGE_DIR = "train"
JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_QUALITY = 95  # only for the rare non-JPEG input
_SAFE_UID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    uid TEXT PRIMARY KEY, caption TEXT NOT NULL, file_name TEXT NOT NULL,
    wins INTEGER NOT NULL DEFAULT 0, losses INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS done (file TEXT, row_group INTEGER, PRIMARY KEY (file, row_group));
CREATE TABLE IF NOT EXISTS counts (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass
class BuildSummary:
    row_groups_done: int = 0  # in this run
    row_groups_skipped: int = 0  # already done by an earlier run
    unreadable_row_groups: int = 0
    pairs: int = 0  # non-tied rows counted, all runs
    ties: int = 0
    bad_images: int = 0
    images: int = 0  # rows of the CSV
    splits: dict[str, int] | None = None
    complete: bool = False


def split_of(wins: int, losses: int) -> str:
    if losses == 0:
        return "exclusive_win"
    return "exclusive_lose" if wins == 0 else "intersections"


def image_id(uid: object, data: bytes | None) -> str:
    """The uid when it is a safe file name, else a hash of it (or of the bytes)."""
    if isinstance(uid, str) and _SAFE_UID.match(uid) and uid not in (".", ".."):
        return uid
    source = uid.encode() if isinstance(uid, str) else (data or b"")
    return hashlib.blake2b(source, digest_size=16).hexdigest()


def as_jpeg(data: bytes | None) -> bytes | None:
    """JPEG bytes of an image cell, or None when it does not decode."""
    if data is None:
        return None
    if data.startswith(JPEG_MAGIC):
        return data
    try:
        with Image.open(io.BytesIO(data)) as image:
            buf = io.BytesIO()
            image.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
            return buf.getvalue()
    except Exception:  # PIL raises many types for bad input
        return None


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class KtoBuilder:
    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.out_dir / DB_NAME)
        self.db.executescript(SCHEMA)
        self.db.commit()

    def close(self) -> None:
        self.db.close()

    def _bump(self, name: str, n: int) -> None:
        self.db.execute(
            "INSERT INTO counts VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?",
            (name, n, n),
        )

    def count(self, name: str) -> int:
        row = self.db.execute("SELECT value FROM counts WHERE name = ?", (name,)).fetchone()
        return row[0] if row else 0

    def is_done(self, file: str, group: int) -> bool:
        query = "SELECT 1 FROM done WHERE file = ? AND row_group = ?"
        return self.db.execute(query, (file, group)).fetchone() is not None

    def add_row_group(self, file: str, group: int, table: pa.Table) -> None:
        """Tally one row group's comparisons and write its new images, in one transaction."""
        has_uids = "image_0_uid" in table.column_names
        columns = {name: table.column(name) for name in table.column_names}
        labels = [columns[f"label_{s}"].to_pylist() for s in (0, 1)]
        captions = columns["caption"].to_pylist()
        pairs = ties = bad = 0
        with self.db:  # one transaction: tallies, new images and the done mark commit together
            for i in range(table.num_rows):
                if labels[0][i] == labels[1][i]:
                    ties += 1
                    continue
                winner = 0 if labels[0][i] > labels[1][i] else 1
                sides = []
                for side in (0, 1):
                    data = columns[f"jpg_{side}"][i].as_py()
                    uid = columns[f"image_{side}_uid"][i].as_py() if has_uids else None
                    sides.append((image_id(uid, data), data))
                if not all(self._ensure_image(uid, data, captions[i]) for uid, data in sides):
                    bad += 1
                    logger.warning(
                        "%s row group %d row %d: an image does not decode", file, group, i
                    )
                    continue
                pairs += 1
                for side, (uid, _) in enumerate(sides):
                    column = "wins" if side == winner else "losses"
                    self.db.execute(
                        f"UPDATE images SET {column} = {column} + 1 WHERE uid = ?", (uid,)
                    )
            self._bump("pairs", pairs)
            self._bump("ties", ties)
            self._bump("bad_images", bad)
            self.db.execute("INSERT INTO done VALUES (?, ?)", (file, group))

    def _ensure_image(self, uid: str, data: bytes | None, caption: object) -> bool:
        """Register the image and write its file the first time it is seen."""
        if self.db.execute("SELECT 1 FROM images WHERE uid = ?", (uid,)).fetchone():
            return True
        jpeg = as_jpeg(data)
        if jpeg is None:
            return False
        file_name = f"{IMAGE_DIR}/{uid[:2]}/{uid}.jpg"
        write_atomic(self.out_dir / file_name, jpeg)
        self.db.execute(
            "INSERT INTO images (uid, caption, file_name) VALUES (?, ?, ?)",
            (uid, caption if isinstance(caption, str) else "", file_name),
        )
        return True

    def write_csv(self) -> dict[str, int]:
        """Stream the tallies, in first-seen order, into the CSV (atomically)."""
        splits = {"exclusive_win": 0, "intersections": 0, "exclusive_lose": 0}
        tmp = self.out_dir / f".{CSV_NAME}.tmp"
        query = "SELECT file_name, caption, wins, losses FROM images ORDER BY rowid"
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["file_name", "caption", "split"])
            for file_name, caption, wins, losses in self.db.execute(query):
                if wins + losses == 0:
                    continue  # registered, but every comparison it was in was dropped
                split = split_of(wins, losses)
                splits[split] += 1
                writer.writerow([file_name, caption, split])
        os.replace(tmp, self.out_dir / CSV_NAME)
        return splits


READ_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
UID_COLUMNS = ("image_0_uid", "image_1_uid")
OWN_CHUNK = 256  # own-pair rows per transaction (their image bytes are in memory at once)


def own_pair_chunks(table: PairTable) -> Iterator[tuple[int, Callable[[], pa.Table]]]:
    """(chunk index, reader) of a pair table as Pick-a-Pic-shaped row groups (chosen = jpg_0,
    labels 1/0), the relative paths as image uids; bytes are read only when the chunk is."""

    def read(start: int) -> pa.Table:
        chunk = read_pair_chunk(table, start, min(start + OWN_CHUNK, len(table)))
        chunk = chunk.append_column("image_0_uid", chunk.column("chosen"))
        return chunk.append_column("image_1_uid", chunk.column("rejected"))

    for index, start in enumerate(range(0, len(table), OWN_CHUNK)):
        yield index, lambda start=start: read(start)


class _Pass:
    """One call's pass over the row groups: those done by an earlier call are counted and
    skipped, at most ``max_row_groups`` new ones are added (the rest stay pending for the next
    call), and the CSV is written only once none is pending. A context manager: the builder's
    database is closed however the pass ends."""

    def __init__(self, out_dir: Path, max_row_groups: int | None):
        self.builder = KtoBuilder(out_dir)
        self.summary = BuildSummary()
        self.max_row_groups = max_row_groups
        self.pending = False

    def __enter__(self) -> _Pass:
        return self

    def __exit__(self, *exc: object) -> None:
        self.builder.close()

    def wants(self, source: str, index: int) -> bool:
        """Whether to add this row group now: not when done earlier, nor over the budget."""
        if self.builder.is_done(source, index):
            self.summary.row_groups_skipped += 1
            return False
        budget = self.max_row_groups
        if budget is not None and self.summary.row_groups_done >= budget:
            self.pending = True
            return False
        return True

    def add(self, source: str, index: int, table: pa.Table) -> None:
        self.builder.add_row_group(source, index, table)
        self.summary.row_groups_done += 1

    def finish(self) -> BuildSummary:
        summary, builder = self.summary, self.builder
        summary.pairs = builder.count("pairs")
        summary.ties = builder.count("ties")
        summary.bad_images = builder.count("bad_images")
        if not self.pending:
            summary.splits = builder.write_csv()
            summary.images = sum(summary.splits.values())
            summary.complete = True
        return summary


def build_kto_from_pairs(
    table: PairTable, out_dir: Path, max_row_groups: int | None = None
) -> BuildSummary:
    """As ``build_kto``, from your own pairs."""
    with _Pass(out_dir, max_row_groups) as run:
        for index, read in own_pair_chunks(table):
            if run.wants(table.source, index):
                run.add(table.source, index, read())
        return run.finish()


def build_kto_from_hub(
    name: str, split: str, columns: dict[str, str], out_dir: Path, max_row_groups: int | None
) -> BuildSummary:
    """As ``build_kto``, from a hub dataset read in chunks of ``OWN_CHUNK`` rows in its stored
    order (data/hub_chunks.py): chunk i plays row group i (done marks, resume)."""
    needed = [columns[c] for c in READ_COLUMNS]
    chunks = HubChunks(open_hub_pairs(name, split, None, needed), OWN_CHUNK)
    with _Pass(out_dir, max_row_groups) as run:
        for index in itertools.count():
            if not run.wants(name, index):
                if run.pending:
                    break  # perhaps nothing is left: the next run finds out
                continue
            table = pair_chunk(chunks, index, columns)
            if table is None:
                break  # past the last row
            run.add(name, index, table)
        return run.finish()


def build_kto(
    data: str,
    out_dir: Path,
    max_row_groups: int | None = None,
    columns: dict[str, str] | None = None,
    hub_split: str = "train",
) -> BuildSummary:
    """Process every row group not yet done (at most ``max_row_groups`` in this call), then,
    once all are done, write the CSV. ``columns``: standard name -> shard column. A hub dataset
    name (``owner/name``) is read by ``build_kto_from_hub``."""
    columns = columns or parse_columns(None)
    files = local_parquet_files(data)
    if files is None:
        return build_kto_from_hub(data, hub_split, columns, out_dir, max_row_groups)
    with _Pass(out_dir, max_row_groups) as run:
        for path in files:
            try:
                shard = pq.ParquetFile(path)
            except (OSError, pa.ArrowException) as exc:
                logger.warning("skipping %s: not a readable parquet file (%s)", path, exc)
                run.summary.unreadable_row_groups += 1
                continue
            names = set(shard.schema_arrow.names)
            missing = missing_column(path, names, columns, READ_COLUMNS)
            if missing:
                raise DataError(missing)
            uids = [c for c in UID_COLUMNS if c in names and c not in columns.values()]
            uids = uids if len(uids) == len(UID_COLUMNS) else []
            read = [columns[c] for c in READ_COLUMNS] + uids
            for group in range(shard.metadata.num_row_groups):
                if not run.wants(path, group):
                    continue
                try:
                    table = shard.read_row_group(group, columns=read)
                    table = table.rename_columns([*READ_COLUMNS, *uids])
                except (OSError, pa.ArrowException) as exc:
                    logger.warning("skipping %s row group %d: %s", path, group, exc)
                    run.summary.unreadable_row_groups += 1
                    continue
                run.add(path, group, table)
        return run.finish()


def main(argv: list[str] | None = None) -> None:
    parser = cli.Parser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="Pick-a-Pic parquet directory, glob or file, or hub name")
    source.add_argument("--pairs", help="your own pairs: JSONL/CSV manifest (with --images)")
    source.add_argument("--pairs_dirs", help="your own pairs: two folders W,L")
    parser.add_argument("--columns", help="--data column mapping, as train.py's --columns")
    parser.add_argument("--hub_split", default="train", help="split of a hub dataset --data")
    parser.add_argument("--images", help="image root of --pairs")
    parser.add_argument("--captions", help="--pairs_dirs captions: JSONL or folder of .txt")
    parser.add_argument("--out", type=Path, required=True, help="output directory (CSV + images)")
    parser.add_argument(
        "--max_row_groups",
        type=int,
        default=None,
        help="process at most this many new row groups in this run (re-run to continue)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    others = [f"--{n}" for n in ("pairs", "pairs_dirs") if getattr(args, n)]
    try:
        columns = columns_flag(args.columns, others)
    except ValueError as exc:
        parser.error(str(exc))
    if args.data:
        summary = build_kto(args.data, args.out, args.max_row_groups, columns, args.hub_split)
    else:
        if args.pairs and not args.images:
            parser.error("--pairs needs --images")
        if args.pairs:
            table = load_manifest(args.pairs, args.images)
        else:
            table = load_pair_dirs(*args.pairs_dirs.split(",", 1), args.captions)
        summary = build_kto_from_pairs(table, args.out, args.max_row_groups)
    if summary.unreadable_row_groups:
        logger.warning("%d unreadable files/row groups skipped", summary.unreadable_row_groups)
    if not summary.complete:
        print(f"processed {summary.row_groups_done} row groups; re-run to continue")
        return
    print(
        f"wrote {args.out / CSV_NAME}: {summary.images} images {summary.splits} from "
        f"{summary.pairs} pairs ({summary.ties} ties, {summary.bad_images} with bad images)"
    )


if __name__ == "__main__":
    cli.run(main, prog="scripts/build_kto_csv.py")  # a DataError: one line naming the file
