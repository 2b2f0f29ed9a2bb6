"""``--columns`` (parquet in another schema) beyond training: the data check, the latent cache
and the KTO builder read a mapped shard, and the same shard as a hub dataset by name (offline,
through datasets' cache), exactly as they read the same rows in Pick-a-Pic's schema, and name
the shard's own column when something is wrong."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data import check
from data.cache import TEXT_PREFIX
from scripts.build_toy_data import make_pair_rows, write_pairs_parquet
from tests.test_cache import latent_entries

MAPPING = {"caption": "prompt", "jpg_0": "image_a", "jpg_1": "image_b", "label_0": "a_wins",
           "label_1": "b_wins"}  # fmt: skip
COLUMNS = ",".join(f"{k}={v}" for k, v in MAPPING.items())


def write_both(root: Path, rows: list[dict], rows_per_group: int = 4) -> tuple[Path, Path]:
    """The same rows as ``std/train.parquet`` (Pick-a-Pic's names) and ``mapped/train.parquet``
    (MAPPING's names; the uid columns, unmapped, kept)."""
    std = root / "std" / "train.parquet"
    write_pairs_parquet(std, rows, rows_per_group)
    table = pq.read_table(std)
    table = table.rename_columns([MAPPING.get(n, n) for n in table.column_names])
    mapped = root / "mapped" / "train.parquet"
    mapped.parent.mkdir(parents=True)
    pq.write_table(table, mapped, row_group_size=rows_per_group)
    return std.parent, mapped.parent


def test_data_check_reads_a_mapped_schema_and_names_its_columns(tmp_path, offline_hub):
    rows = make_pair_rows(20, seed=2)
    untied = [i for i, r in enumerate(rows) if r["label_0"] != r["label_1"]]
    rows[untied[2]]["jpg_1"] = b"not an image"
    std, mapped = write_both(tmp_path, rows)
    expected, _ = check.run([str(std), "--tokenizer", "none"])
    report, code = check.run([str(mapped), "--columns", COLUMNS, "--tokenizer", "none"])
    assert code == 0 and not report.fatal
    ties = sum(r["label_0"] == r["label_1"] for r in rows)
    assert (report.rows, report.ties, report.usable) == (20, ties, 20 - ties - 1)
    assert report.labels == expected.labels and sum(report.labels.values()) == 20 - ties
    assert report.undecodable_images.examples == [
        f"{mapped / 'train.parquet'} row {untied[2] + 1}, column jpg_1 (image_b)"
    ]
    # The same shard as a hub dataset with Image features, streamed by name.
    offline_hub("owner/pairs", mapped / "train.parquet", ["image_a", "image_b"])
    hub, code = check.run(["owner/pairs", "--columns", COLUMNS, "--tokenizer", "none"])
    assert code == 0 and (hub.rows, hub.ties, hub.usable) == (report.rows, report.ties,
                                                               report.usable)  # fmt: skip
    assert hub.labels == report.labels and hub.duplicates.count == report.duplicates.count
    assert hub.undecodable_images.examples == [f"owner/pairs row {untied[2] + 1}, column jpg_1 "
                                               "(image_b)"]  # fmt: skip
    hub, code = check.run(["owner/pairs", "--tokenizer", "none"])
    assert code == 1 and "missing column caption" in hub.fatal[0]
    # Without the mapping, the shard's own names are reported missing.
    report, code = check.run([str(mapped), "--tokenizer", "none"])
    assert code == 1 and "missing column caption" in report.fatal[0]
    # A bad label in a mapped column: the row group, row and both column names.
    table = pq.read_table(mapped)
    a_wins = table.column("a_wins").to_pylist()
    a_wins[5] = 0.7
    table = table.set_column(table.column_names.index("a_wins"), "a_wins", pa.array(a_wins))
    pq.write_table(table, mapped / "train.parquet", row_group_size=4)
    report, code = check.run([str(mapped), "--columns", COLUMNS, "--tokenizer", "none"])
    assert code == 1 and len(report.fatal) == 1
    assert "row group 1 (rows 5-8): row 2" in report.fatal[0]
    assert "column label_0: value 0.7" in report.fatal[0]
    assert "label_0=a_wins" in report.fatal[0]
    # An explicitly mapped soft label must be there and in [0, 1].
    report, code = check.run([str(std), "--columns", "prob_0=p", "--tokenizer", "none"])
    assert code == 1 and "missing column p (--columns prob_0)" in report.fatal[0]
    # The flag is parsed and refused as train.py's.
    for argv, message in [
        ([str(mapped), "--columns", "cap=prompt"], "unknown name 'cap'"),
        (["--csv", "k.csv", "--images", "i", "--columns", COLUMNS], "does not apply to --csv"),
    ]:
        with pytest.raises(ValueError, match=message):
            check.run(argv)


def test_cache_of_a_mapped_schema_equals_the_cache_of_the_same_pairs(
    tiny_sd15_dir, tmp_path, offline_hub
):
    from scripts.build_cache import main as build_cache_main

    rows = [r for r in make_pair_rows(10, seed=4) if r["label_0"] != r["label_1"]][:5]
    std, mapped = write_both(tmp_path, rows, rows_per_group=2)
    offline_hub("owner/pairs", mapped / "train.parquet", ["image_a", "image_b"])
    caches = {}
    for name, data, extra in (("std", std, []), ("mapped", mapped, ["--columns", COLUMNS]),
                              ("hub", "owner/pairs", ["--columns", COLUMNS])):  # fmt: skip
        caches[name] = tmp_path / f"cache-{name}"
        build_cache_main(["--pretrained_model", str(tiny_sd15_dir), "--data", str(data),
                          "--resolution", "64", "--cache", str(caches[name]), *extra])  # fmt: skip
    expected = latent_entries(caches["std"])
    assert len(expected) >= 4 * 5  # >= 5 distinct images, mean and std, both flips
    texts = {name: latent_entries(c, TEXT_PREFIX) for name, c in caches.items()}
    assert len(texts["std"]) > 1
    for name in ("mapped", "hub"):
        found = latent_entries(caches[name])
        assert found.keys() == expected.keys(), name
        for key, tensor in expected.items():
            torch.testing.assert_close(found[key], tensor, rtol=0, atol=0)
        assert texts[name].keys() == texts["std"].keys()
        for key, tensor in texts["std"].items():
            torch.testing.assert_close(texts[name][key], tensor, rtol=0, atol=0)
    with pytest.raises(ValueError, match="give the cache a --cache DIR"):
        build_cache_main(["--pretrained_model", str(tiny_sd15_dir), "--data", "owner/pairs",
                          "--columns", COLUMNS, "--resolution", "64"])  # fmt: skip
    with pytest.raises(Exception, match="missing column caption"):
        build_cache_main(["--pretrained_model", str(tiny_sd15_dir), "--data", str(mapped),
                          "--resolution", "64", "--cache", str(tmp_path / "x")])  # fmt: skip


def test_kto_builder_reads_a_mapped_schema(tmp_path, capsys, offline_hub, monkeypatch):
    from scripts import build_kto_csv

    rows = make_pair_rows(24, seed=5)
    std, mapped = write_both(tmp_path, rows)
    build_kto_csv.main(["--data", str(std), "--out", str(tmp_path / "kto-std")])
    build_kto_csv.main(["--data", str(mapped), "--columns", COLUMNS,
                        "--out", str(tmp_path / "kto-mapped")])  # fmt: skip
    csv = {
        n: (tmp_path / f"kto-{n}" / build_kto_csv.CSV_NAME).read_text() for n in ("std", "mapped")
    }
    assert csv["mapped"] == csv["std"] and csv["std"].count("\n") > 10
    assert "wrote" in capsys.readouterr().out
    # The same shard as a hub dataset, in chunks of 8 rows; killed after one chunk, resumed.
    offline_hub("owner/pairs", mapped / "train.parquet", ["image_a", "image_b"])
    monkeypatch.setattr(build_kto_csv, "OWN_CHUNK", 8)
    mapping = dict(MAPPING, prob_0="prob_0")
    first = build_kto_csv.build_kto("owner/pairs", tmp_path / "kto-hub", 1, mapping)
    assert (first.row_groups_done, first.complete) == (1, False)
    rest = build_kto_csv.build_kto("owner/pairs", tmp_path / "kto-hub", None, mapping)
    assert (rest.row_groups_skipped, rest.row_groups_done, rest.complete) == (1, 2, True)
    assert (tmp_path / "kto-hub" / build_kto_csv.CSV_NAME).read_text() == csv["std"]
    with pytest.raises(Exception, match="missing column caption"):
        build_kto_csv.build_kto(str(mapped), tmp_path / "kto-x")
    with pytest.raises(SystemExit):  # a one-line usage error, as train.py refuses it
        build_kto_csv.main(["--pairs", "m.jsonl", "--images", "i", "--columns", COLUMNS,
                            "--out", str(tmp_path / "kto-y")])  # fmt: skip
    assert "does not apply to --pairs" in capsys.readouterr().err
