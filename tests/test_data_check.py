"""The data check finds every planted defect; training streams past a truncated shard."""

import csv
from pathlib import Path

import pytest

from data import check
from scripts.build_toy_data import make_pair_rows, write_pairs_parquet
from tests.support import reset_accelerate

LONG_CAPTION = "a very " * 60 + "long caption"  # ~120 CLIP tokens, over the limit of 77


@pytest.fixture
def tokenizer(tiny_sd15_dir) -> str:
    return str(tiny_sd15_dir / "tokenizer")


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def planted_pairs(root: Path, num_rows: int = 40) -> dict:
    """Two shards with known defects, and a third one cut in half; returns what was planted."""
    rows = make_pair_rows(num_rows, seed=2)
    untied = [i for i, r in enumerate(rows) if r["label_0"] != r["label_1"]]
    garbage, truncated, long, duplicated = untied[1], untied[4], 9, untied[6]
    rows[garbage]["jpg_0"] = b"not a jpeg at all"
    rows[truncated]["jpg_1"] = rows[truncated]["jpg_1"][: len(rows[truncated]["jpg_1"]) // 2]
    rows[long]["caption"] = LONG_CAPTION
    copy = dict(rows[duplicated])  # the same two images again, sides swapped
    for a, b in (("jpg_0", "jpg_1"), ("label_0", "label_1"), ("image_0_uid", "image_1_uid")):
        copy[a], copy[b] = copy[b], copy[a]
    rows.append(copy)  # the last row of shard a
    write_pairs_parquet(root / "a.parquet", rows, rows_per_group=8)
    extra = make_pair_rows(num_rows // 2, seed=3)
    write_pairs_parquet(root / "b.parquet", extra, rows_per_group=8)
    write_pairs_parquet(root / "c.parquet", extra, rows_per_group=8)
    truncate(root / "c.parquet")
    ties = sum(r["label_0"] == r["label_1"] for r in rows + extra)
    return {
        "rows": len(rows) + len(extra),
        "ties": ties,
        "undecodable": [
            f"a.parquet row {garbage + 1}, column jpg_0",
            f"a.parquet row {truncated + 1}, column jpg_1",
        ],
        "duplicate": f"a.parquet row {num_rows + 1}",  # rows count from 1
        "long": f"a.parquet row {long + 1}",
    }


def test_pairs_check_finds_every_planted_defect(tmp_path, tokenizer):
    planted = planted_pairs(tmp_path / "pairs")
    report, code = check.run([str(tmp_path / "pairs"), "--tokenizer", tokenizer])
    assert code == 1  # the truncated shard is fatal for the check
    assert len(report.fatal) == 1 and "c.parquet" in report.fatal[0]
    assert report.rows == planted["rows"] and report.ties == planted["ties"]
    assert report.usable == report.rows - report.ties - 2  # 2 pairs have a broken image
    assert sum(report.labels.values()) == report.usable + 2
    found = report.undecodable_images.examples
    assert len(found) == 2 and all(
        any(e.endswith(p) for e in found) for p in planted["undecodable"]
    )
    assert report.duplicates.count == 1
    assert report.duplicates.examples[0].endswith(planted["duplicate"])
    assert report.long_captions.count == 1
    assert report.long_captions.examples[0].endswith(planted["long"])
    assert report.missing_files.count == 0

    (tmp_path / "pairs" / "c.parquet").unlink()
    report, code = check.run([str(tmp_path / "pairs"), "--tokenizer", tokenizer])
    assert code == 0 and not report.fatal  # defects alone are reported, not fatal...
    _, strict = check.run([str(tmp_path / "pairs"), "--tokenizer", "none", "--strict"])
    assert strict == 1  # ...unless --strict


def planted_csv(root: Path, rows: list[dict]) -> Path:
    (root / "img").mkdir(parents=True)
    lines = []
    for i, row in enumerate(rows[:6]):
        (root / "img" / f"{i}.jpg").write_bytes(row["jpg_0"])
        lines.append(
            [f"img/{i}.jpg", row["caption"], "exclusive_win" if i % 2 else "intersections"]
        )
    (root / "img" / "2.jpg").write_bytes(b"garbage")  # undecodable
    lines.append(["img/missing.jpg", "a cat", "exclusive_lose"])  # missing file
    lines.append(["img/3.jpg", "a cat", "exclusive_lose"])  # duplicate file_name
    lines[4][1] = LONG_CAPTION
    path = root / "train.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "caption", "split"])
        writer.writerows(lines)
    return path


def test_csv_check_finds_every_planted_defect(tmp_path, tokenizer):
    path = planted_csv(tmp_path, make_pair_rows(8, seed=4))
    report, code = check.run(["--csv", str(path), "--images", str(tmp_path), "--tokenizer",
                              tokenizer])  # fmt: skip
    assert code == 0 and report.rows == 8
    assert report.splits == {"intersections": 3, "exclusive_win": 3, "exclusive_lose": 2}
    assert report.labels == {"1": 6, "0": 2}
    assert [e.split(" (")[0] for e in report.undecodable_images.examples] == [f"{path} row 3"]
    assert report.missing_files.count == 1 and "img/missing.jpg" in report.missing_files.examples[0]
    assert report.duplicates.count == 1 and "row 8 (img/3.jpg)" in report.duplicates.examples[0]
    assert report.long_captions.count == 1 and "row 5" in report.long_captions.examples[0]

    text = path.read_text().replace("exclusive_lose", "loser", 1)
    path.write_text(text)
    report, code = check.run(["--csv", str(path), "--images", str(tmp_path), "--tokenizer",
                              "none"])  # fmt: skip
    assert code == 1 and "loser" in report.fatal[0]


def test_training_streams_past_a_truncated_shard_and_corrupt_images(
    tiny_sd15_dir, tmp_path, caplog
):
    import train

    reset_accelerate()
    planted_pairs(tmp_path / "pairs", num_rows=16)
    result = train.main([
        "--pretrained_model", str(tiny_sd15_dir), "--data", str(tmp_path / "pairs"),
        "--output_dir", str(tmp_path / "out"), "--resolution", "32", "--train_batch_size", "4",
        "--max_train_steps", "6", "--dataloader_num_workers", "0", "--report_to", "none",
        "--checkpointing_steps", "100", "--lr_warmup_steps", "0",
    ])  # fmt: skip
    reset_accelerate()
    assert len(result.history) == 6
    assert result.unreadable_files == [str(tmp_path / "pairs" / "c.parquet")]
    # 24 pairs consumed, more than one epoch of a.parquet and b.parquet (<= 25 rows): each
    # of the two corrupt rows was met and skipped at least once.
    assert result.skipped_rows >= 2
    assert "skipped 1 unreadable parquet files" in caplog.text
