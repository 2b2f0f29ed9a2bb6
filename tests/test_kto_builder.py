"""scripts/build_kto_csv.py on hand-made comparisons whose per-image splits are known."""

import csv
import io
import os
import signal
from pathlib import Path

import pytest
from PIL import Image

from scripts.build_kto_csv import CSV_NAME, build_kto
from scripts.build_toy_data import write_pairs_parquet

COLOURS = {"A": "red", "B": "green", "C": "blue", "D": "white", "E": "black", "F": "yellow",
           "G": "purple", "H": "orange", "I": "gray"}  # fmt: skip


def image_bytes(uid: str, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), COLOURS[uid]).save(buf, format=fmt)
    return buf.getvalue()


def row(winner: str, loser: str, tie: bool = False, swap: bool = False) -> dict:
    a, b = (loser, winner) if swap else (winner, loser)
    label_0 = 0.5 if tie else float(a == winner)
    return {
        "caption": f"caption of {a}{b}", "jpg_0": image_bytes(a), "jpg_1": image_bytes(b),
        "label_0": label_0, "label_1": 1.0 - label_0, "image_0_uid": a, "image_1_uid": b,
    }  # fmt: skip


# Shard 1: A beats B and C, B beats C, I beats C, D ties E.
# Shard 2: F beats A (so A also lost), F beats G, G beats H... and H ties A; I beats G.
SHARD_1 = [row("A", "B"), row("A", "C", swap=True), row("B", "C"), row("I", "C", swap=True),
           row("D", "E", tie=True)]  # fmt: skip
SHARD_2 = [row("F", "A", swap=True), row("F", "G"), row("G", "H", swap=True),
           row("H", "A", tie=True), row("I", "G")]  # fmt: skip
EXPECTED = {
    "A": "intersections",  # won twice in shard 1, lost in shard 2
    "B": "intersections",
    "C": "exclusive_lose",
    "F": "exclusive_win",
    "G": "intersections",
    "H": "exclusive_lose",  # its tie says nothing
    "I": "exclusive_win",
}  # D and E appear only in a tie: not listed


@pytest.fixture
def shards(tmp_path) -> Path:
    root = tmp_path / "pairs"
    write_pairs_parquet(root / "train-0.parquet", SHARD_1, rows_per_group=2)
    write_pairs_parquet(root / "train-1.parquet", SHARD_2, rows_per_group=2)
    return root


def read_csv(out: Path) -> dict[str, tuple[str, str]]:
    with open(out / CSV_NAME, newline="") as f:
        rows = list(csv.DictReader(f))
    return {Path(r["file_name"]).stem: (r["split"], r["file_name"]) for r in rows}


def test_splits_are_derived_across_all_comparisons(shards, tmp_path):
    out = tmp_path / "kto"
    summary = build_kto(str(shards), out)
    assert summary.complete and summary.pairs == 8 and summary.ties == 2
    found = read_csv(out)
    assert {uid: split for uid, (split, _) in found.items()} == EXPECTED
    assert summary.splits == {"exclusive_win": 2, "intersections": 3, "exclusive_lose": 2}
    for uid, (_, file_name) in found.items():
        assert (out / file_name).read_bytes() == image_bytes(uid)  # JPEG copied as is, once
    with open(out / CSV_NAME, newline="") as f:
        first = next(csv.DictReader(f))
    assert first == {"file_name": "train/A/A.jpg", "caption": "caption of AB",
                     "split": "intersections"}  # fmt: skip


def test_the_csv_loads_as_training_data(shards, tmp_path):
    from data import ImageTransform, LabeledImages, StreamSettings

    out = tmp_path / "kto"
    build_kto(str(shards), out)
    settings = StreamSettings(ImageTransform(16, True, False))
    dataset = LabeledImages(str(out / CSV_NAME), str(out), settings)
    assert (dataset.num_desirable, dataset.num_undesirable) == (5, 2)
    assert next(iter(dataset))["pixels"].shape == (1, 3, 16, 16)


def test_an_interrupted_build_resumes_to_the_same_result(shards, tmp_path):
    whole = tmp_path / "whole"
    build_kto(str(shards), whole)
    out = tmp_path / "parts"
    first = build_kto(str(shards), out, max_row_groups=2)
    assert not first.complete and not (out / CSV_NAME).exists()

    pid = os.fork()  # a real crash: SIGKILL in the middle of the next row group's transaction
    if pid == 0:
        import scripts.build_kto_csv as builder

        real = builder.write_atomic

        def write_then_die(path, data):
            real(path, data)
            os.kill(os.getpid(), signal.SIGKILL)

        builder.write_atomic = write_then_die
        build_kto(str(shards), out)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL

    final = build_kto(str(shards), out)
    # Committed before the kill: the 2 groups of the first call and shard 1's last group (a
    # lone tie, no image to write); the killed transaction of the next group was redone.
    assert final.complete and final.row_groups_skipped == 3 and final.row_groups_done == 3
    assert final.pairs == 8 and final.ties == 2  # nothing counted twice
    assert (out / CSV_NAME).read_text() == (whole / CSV_NAME).read_text()


def test_non_jpeg_is_reencoded_and_undecodable_rows_are_dropped(tmp_path):
    rows = [row("A", "B"), row("C", "D")]
    rows[0]["jpg_1"] = image_bytes("B", "PNG")
    rows[1]["jpg_0"] = b"garbage"
    write_pairs_parquet(tmp_path / "p" / "x.parquet", rows, rows_per_group=2)
    summary = build_kto(str(tmp_path / "p"), tmp_path / "kto")
    assert summary.bad_images == 1 and summary.pairs == 1
    found = read_csv(tmp_path / "kto")
    assert set(found) == {"A", "B"}
    with Image.open(tmp_path / "kto" / found["B"][1]) as image:
        assert image.format == "JPEG" and image.getpixel((8, 8))[1] > 100  # green survived
