"""Your own pairs (manifest, two folders, mapped parquet columns) and soft labels.

Every image is a solid grey whose level encodes (row, side), so which image came out reads off
the pixels; PNG keeps the levels exact.
"""

import itertools
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import train
from data import (
    DataError,
    ImageTransform,
    PairOptions,
    PickapicPairs,
    StreamSettings,
    collate_pairs,
)
from data.pair_table import load_manifest, load_pair_dirs
from data.table_pairs import TablePairs
from losses import build_loss, dpo
from tests.support import end_wandb_session, stream_kwargs
from training.config import parse_config

RES = 8
N = 7


def level(row: int, side: int) -> int:
    return 20 + 30 * row + 10 * side  # chosen (side 0) and rejected (side 1) of each row


def write_images(folder: Path, n: int = N, side: int | None = None) -> list[str]:
    """n PNGs; both sides under ``c/`` and ``r/`` unless ``side`` writes one flat folder."""
    names = []
    for row in range(n):
        for s, sub in ((0, "c"), (1, "r")):
            if side is not None and s != side:
                continue
            path = folder / (f"{row:02d}.png" if side is not None else f"{sub}/{row:02d}.png")
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (10, 10), (level(row, s),) * 3).save(path)
        names.append(f"{row:02d}.png")
    return names


def manifest_rows(n: int = N) -> list[dict]:
    return [
        {
            "caption": f"caption {row}",
            "chosen": f"c/{row:02d}.png",
            "rejected": f"r/{row:02d}.png",
            "prob": round(0.5 + row / 20, 3),
        }
        for row in range(n)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_csv(path: Path, rows: list[dict]) -> str:
    keys = list(rows[0])
    path.write_text(",".join(keys) + "\n" + "".join(",".join(str(r[k]) for k in keys) + "\n"
                                                     for r in rows))  # fmt: skip
    return str(path)


def stream(table, **kwargs) -> TablePairs:
    kwargs.setdefault("caption_dropout", 0.0)
    transform = ImageTransform(RES, center_crop=True, random_flip=False)
    return TablePairs(table, **stream_kwargs(transform, **kwargs))


def grey(pixels: torch.Tensor) -> int:
    """[3, R, R] in [-1, 1] -> the 0..255 level of a solid image."""
    return round((pixels.mean().item() + 1) * 127.5)


def assert_rows_read_back(examples: list[dict], captions: list[str]) -> None:
    assert [e["row"] for e in examples] == [(r,) for r in range(len(captions))]
    assert [e["caption"] for e in examples] == captions
    for row, example in enumerate(examples):
        assert [grey(p) for p in example["pixels"]] == [level(row, 0), level(row, 1)]


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_manifest_reads_back_row_for_row(kind, tmp_path):
    write_images(tmp_path / "img")
    writer = write_jsonl if kind == "jsonl" else write_csv
    rows = manifest_rows()
    table = load_manifest(writer(tmp_path / f"m.{kind}", rows), str(tmp_path / "img"))
    examples = list(
        itertools.islice(stream(table, shuffle=False, soft_labels=True).iter_role(0), N)
    )
    assert_rows_read_back(examples, [r["caption"] for r in rows])
    batch = collate_pairs(examples)
    assert torch.allclose(batch.labels, torch.tensor([r["prob"] for r in rows]))
    # Without --soft_labels the pairs carry no label: the loss sees p = 1 (hard preferences).
    plain = list(itertools.islice(stream(table, shuffle=False).iter_role(0), 2))
    assert collate_pairs(plain).labels is None


@pytest.mark.parametrize("captions", ["jsonl", "txt_beside", "txt_folder"])
def test_pair_dirs_read_back_row_for_row(captions, tmp_path):
    names = write_images(tmp_path / "w", side=0)
    write_images(tmp_path / "l", side=1)
    texts = [f"caption {row}" for row in range(N)]
    arg = None
    if captions == "jsonl":
        records = [{"file_name": n, "caption": t} for n, t in zip(names, texts, strict=True)]
        arg = write_jsonl(tmp_path / "captions.jsonl", records[::-1])  # order does not matter
    else:
        folder = tmp_path / ("w" if captions == "txt_beside" else "txt")
        folder.mkdir(exist_ok=True)
        for name, text in zip(names, texts, strict=True):
            (folder / name.replace(".png", ".txt")).write_text(text + "\n")
        arg = None if captions == "txt_beside" else str(folder)
    table = load_pair_dirs(str(tmp_path / "w"), str(tmp_path / "l"), arg)
    examples = list(itertools.islice(stream(table, shuffle=False).iter_role(0), N))
    assert_rows_read_back(examples, texts)


def test_bad_rows_are_named_at_start_up(tmp_path):
    write_images(tmp_path / "img")
    root = str(tmp_path / "img")
    cases = [
        ({"prob": 1.5}, "row 3, column prob"),
        ({"prob": "x"}, "row 3, column prob"),
        ({"chosen": "../outside.png"}, "row 3, column chosen"),
        ({"rejected": ""}, "row 3, column rejected"),
        ({"caption": None}, "row 3, column caption"),
    ]
    for change, message in cases:
        rows = manifest_rows()
        rows[2].update(change)
        path = write_jsonl(tmp_path / "bad.jsonl", rows)
        with pytest.raises(DataError, match=message) as info:
            load_manifest(path, root)
        assert path in str(info.value) and "\n" not in str(info.value)
    rows = [{k: v for k, v in r.items() if k != "rejected"} for r in manifest_rows()]
    with pytest.raises(DataError, match="missing column rejected"):
        load_manifest(write_csv(tmp_path / "m.csv", rows), root)
    (tmp_path / "broken.jsonl").write_text('{"caption": "a"}\n{not json\n')
    with pytest.raises(DataError, match=r"broken.jsonl: row 2: not JSON"):
        load_manifest(str(tmp_path / "broken.jsonl"), root)
    with pytest.raises(DataError, match=r"--images .* sampled image files .* missing"):
        load_manifest(write_jsonl(tmp_path / "m.jsonl", manifest_rows()), str(tmp_path))


def test_pair_dirs_bad_input_is_named(tmp_path):
    write_images(tmp_path / "w", side=0)
    write_images(tmp_path / "l", n=N - 1, side=1)
    with pytest.raises(DataError, match=r"image 06.png has no file of the same name in"):
        load_pair_dirs(str(tmp_path / "w"), str(tmp_path / "l"), None)
    write_images(tmp_path / "l", side=1)
    with pytest.raises(DataError, match=r"no caption file .*00.txt for image 00.png"):
        load_pair_dirs(str(tmp_path / "w"), str(tmp_path / "l"), None)
    path = write_jsonl(tmp_path / "c.jsonl", [{"file_name": "00.png", "caption": "a"}])
    with pytest.raises(DataError, match=r"c.jsonl: no caption for image 01.png"):
        load_pair_dirs(str(tmp_path / "w"), str(tmp_path / "l"), path)


def test_soft_labels_need_a_probability_column(tmp_path):
    write_images(tmp_path / "img")
    rows = [{k: v for k, v in r.items() if k != "prob"} for r in manifest_rows()]
    table = load_manifest(write_jsonl(tmp_path / "m.jsonl", rows), str(tmp_path / "img"))
    with pytest.raises(DataError, match="soft labels need a preference probability"):
        stream(table, soft_labels=True)


def test_resume_is_exact_across_roles_and_epochs(tmp_path):
    write_images(tmp_path / "img")
    table = load_manifest(write_jsonl(tmp_path / "m.jsonl", manifest_rows()), str(tmp_path / "img"))
    kwargs = {"caption_dropout": 0.5, "num_workers": 2, "soft_labels": True,
              "transform": ImageTransform(RES, center_crop=False)}  # fmt: skip
    for role in (0, 1):
        reference = list(itertools.islice(stream(table, **kwargs).iter_role(role), 12))
        # Roles split every epoch: 7 rows -> 4 and 3; each epoch is a full permutation.
        first_epoch = [e["row"][0] for e in reference if e["state"][0] == 0]
        assert len(first_epoch) == (4 if role == 0 else 3)
        new_epoch = next(k for k in range(1, 12) if reference[k]["state"][0] == 1)
        for k in sorted({1, 2, new_epoch, 9}):
            resumed = stream(table, **kwargs)
            resumed.resume_from({str(role): reference[k - 1]["state"]})
            continuation = list(itertools.islice(resumed.iter_role(role), 12 - k))
            for a, b in zip(continuation, reference[k:], strict=True):
                assert torch.equal(a["pixels"], b["pixels"])
                assert (a["caption"], a["state"], a["row"], a["label"]) == (
                    b["caption"], b["state"], b["row"], b["label"])  # fmt: skip
    shares = [
        {e["row"][0] for e in itertools.islice(stream(table, **kwargs).iter_role(r), 4 - r)}
        for r in (0, 1)
    ]
    assert shares[0].isdisjoint(shares[1]) and shares[0] | shares[1] == set(range(N))


def test_parquet_column_mapping_and_soft_labels(tmp_path):
    """A shard in another schema, read through --columns; prob_0 is P(image a preferred)."""
    images = [Image.new("RGB", (10, 10), (level(r, s),) * 3) for r in range(4) for s in (0, 1)]
    blobs = []
    for image in images:
        import io

        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        blobs.append(buffer.getvalue())
    a_wins = [1.0, 0.0, 1.0, 0.0]
    table = pa.table({
        "prompt": [f"p{r}" for r in range(4)],
        "image_a": pa.array(blobs[0::2], pa.binary()),
        "image_b": pa.array(blobs[1::2], pa.binary()),
        "a_wins": a_wins,
        "b_wins": [1 - x for x in a_wins],
        "p": [0.9, 0.2, 0.6, 0.3],
    })  # fmt: skip
    pq.write_table(table, tmp_path / "mine.parquet")
    mapping = {"caption": "prompt", "jpg_0": "image_a", "jpg_1": "image_b",
               "label_0": "a_wins", "label_1": "b_wins", "prob_0": "p"}  # fmt: skip
    settings = StreamSettings(ImageTransform(RES, True, False), caption_dropout=0.0)
    data = PickapicPairs(str(tmp_path / "mine.parquet"), settings,
                         PairOptions(shuffle=False, soft_labels=True), columns=mapping)  # fmt: skip
    examples = list(itertools.islice(data.iter_role(0), 4))
    assert [e["caption"] for e in examples] == ["p0", "p1", "p2", "p3"]
    for row, example in enumerate(examples):
        winner = 0 if a_wins[row] else 1  # the chosen image comes first
        assert [grey(p) for p in example["pixels"]] == [level(row, winner), level(row, 1 - winner)]
    # P(chosen preferred): p where image a was chosen, 1 - p where image b was.
    assert collate_pairs(examples).labels.tolist() == pytest.approx([0.9, 0.8, 0.6, 0.7])
    with pytest.raises(DataError, match="missing column caption"):
        PickapicPairs(str(tmp_path / "mine.parquet"), settings)
    bad = table.set_column(3, "a_wins", pa.array([1.0, 0.0, 0.7, 0.0]))
    pq.write_table(bad, tmp_path / "mine.parquet")
    with pytest.raises(DataError, match=r"row 3 .* column label_0: value 0.7 .* label_0=a_wins"):
        PickapicPairs(str(tmp_path / "mine.parquet"), settings, columns=mapping)
    bad = table.set_column(5, "p", pa.array([0.9, 0.2, 1.2, 0.3]))
    pq.write_table(bad, tmp_path / "mine.parquet")
    with pytest.raises(DataError, match=r"row 3 .* column prob_0: value 1.2"):
        PickapicPairs(str(tmp_path / "mine.parquet"), settings, PairOptions(soft_labels=True),
                      columns=mapping)  # fmt: skip


def test_soft_labels_reach_the_dpo_loss():
    """Hand case: margins u = (1, -2), p = (0.75, 0.25) -> L = mean of the cross-entropies."""
    beta = 2.0  # u = beta / 2 * ((ref_w - pol_w) - (ref_l - pol_l))
    policy_err = torch.tensor([0.0, 2.0, 1.0, 0.0])  # chosen (2), then rejected (2)
    ref_err = torch.tensor([1.0, 0.0, 1.0, 0.0])
    u = torch.tensor([1.0, -2.0])
    p = torch.tensor([0.75, 0.25])
    loss, _ = build_loss("dpo", {"beta": beta})(policy_err, ref_err, labels=p)
    expected = -(p * F.logsigmoid(u) + (1 - p) * F.logsigmoid(-u)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    hard, _ = build_loss("dpo", {"beta": beta})(policy_err, ref_err)
    assert hard.item() == pytest.approx(-F.logsigmoid(u).mean().item(), rel=1e-6)


def test_config_refuses_soft_labels_and_mixed_sources():
    for argv, message in [
        (["--loss", "ipo", "--soft_labels", "true"], "ipo does not train on soft labels"),
        (["--pairs", "m.jsonl"], "--pairs needs --images"),
        (["--pairs_dirs", "w"], "two folders"),
        (["--pairs", "m.jsonl", "--images", "i", "--pairs_dirs", "w,l"], "one data source"),
        (["--columns", "cap=prompt"], "unknown name 'cap'"),
        (["--columns", "caption=p", "--pairs", "m.jsonl", "--images", "i"], "does not apply"),
    ]:
        with pytest.raises(Exception, match=message):
            parse_config(argv)


def run_train(model: Path, out: Path, *extra: str) -> train.TrainResult:
    args = [
        "--pretrained_model", str(model), "--output_dir", str(out),
        "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "2",
        "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--dataloader_num_workers", "0",
        "--checkpointing_steps", "100", "--report_to", "none", "--beta", "500",
        "--caption_dropout", "0", *extra,
    ]  # fmt: skip
    try:
        return train.main(args)
    finally:
        end_wandb_session()


def test_train_on_a_manifest_with_soft_labels(tiny_sd15_dir, tmp_path, monkeypatch):
    """The trainer reads --pairs/--images and hands the probabilities to dpo."""
    write_images(tmp_path / "img")
    manifest = write_jsonl(tmp_path / "m.jsonl", manifest_rows())
    seen = []

    real = dpo.preference_targets

    def spy(labels, num_pairs, label_smoothing):
        seen.append(None if labels is None else labels.tolist())
        return real(labels, num_pairs, label_smoothing)

    monkeypatch.setattr(dpo, "preference_targets", spy)
    source = ("--pairs", manifest, "--images", str(tmp_path / "img"), "--soft_labels", "true")
    result = run_train(tiny_sd15_dir, tmp_path / "out", *source)
    assert len(result.history) == 2
    probs = {r["prob"] for r in manifest_rows()}
    assert len(seen) == 2 and all(len(s) == 2 for s in seen)
    assert all(min(abs(x - q) for q in probs) < 1e-6 for s in seen for x in s)
    assert np.isfinite([h["loss"] for h in result.history]).all()


def test_card_and_start_up_name_own_pairs_soft_labels_and_the_safeguard(
    tiny_sd15_dir, tmp_path, caplog
):
    """Everything that changed the result is on the card: the data actually used (not the
    default --data), soft labels, the Diffusion-SDPO safeguard (and its tag), the settings not at
    their defaults; the start-up block names the same data."""
    from huggingface_hub import ModelCard

    from training.model_card import OTHERS_ROW

    images = tmp_path / "img"
    write_images(images)
    manifest = write_jsonl(tmp_path / "m.jsonl", manifest_rows())
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="prefdiff"):
        run_train(tiny_sd15_dir, out, "--pairs", manifest, "--images", str(images),
                  "--soft_labels", "true", "--winner_preserving_mu", "0.9",
                  "--max_train_steps", "1", "--random_flip", "false")  # fmt: skip
    card = ModelCard.load(out / "README.md")
    assert "prefdiff-sdpo-safeguard" in card.data.tags
    rows = [
        f"| data | `--pairs {manifest}` with images under `{images}` |",
        "| labels | soft: each pair's preference probability (`--soft_labels`) |",
        "| Diffusion-SDPO safeguard | `--winner_preserving_mu 0.9` |",
        "| `--beta` | 500 |",
    ]
    for row in rows:
        assert row in card.text, row
    (others,) = [line for line in card.text.splitlines() if line.startswith(f"| {OTHERS_ROW} |")]
    for setting in ("--random_flip False", "--caption_dropout 0.0", "--dataloader_num_workers 0"):
        assert f"`{setting}`" in others
    assert "`--data " not in card.text and "toy-prefs" not in card.text
    assert "--output_dir" not in others  # where files go changes no weight
    assert f"data: --pairs {manifest} with images under {images}\n" in caplog.text
    assert "labels: soft: each pair's preference probability (--soft_labels)" in caplog.text


def test_data_check_reads_own_pairs(tmp_path):
    from data import check

    write_images(tmp_path / "img")
    (tmp_path / "img" / "r" / "03.png").write_bytes(b"garbage")
    (tmp_path / "img" / "c" / "05.png").unlink()
    rows = [*manifest_rows(), manifest_rows()[0]]  # row 8 repeats row 1
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    report, code = check.run(["--pairs", path, "--images", str(tmp_path / "img"),
                              "--tokenizer", "none"])  # fmt: skip
    assert (report.rows, report.usable, code) == (8, 6, 0)
    bad = tmp_path / "img" / "r" / "03.png"
    assert report.undecodable_images.examples == [f"{path} row 4, column rejected: {bad}"]
    assert (
        report.missing_files.count == 1
        and "row 6, column chosen" in report.missing_files.examples[0]
    )
    assert report.duplicates.examples == [f"{path} row 8, first at row 1"]
    assert report.labels == {"prob<0.5": 0, "prob=0.5": 2, "prob>0.5": 6}
    write_images(tmp_path / "w", side=0)
    write_images(tmp_path / "l", side=1)
    for name in write_images(tmp_path / "w", side=0):
        (tmp_path / "w" / name.replace(".png", ".txt")).write_text("a caption")
    report, code = check.run(["--pairs_dirs", f"{tmp_path / 'w'},{tmp_path / 'l'}",
                              "--tokenizer", "none"])  # fmt: skip
    assert (report.rows, report.usable, code) == (N, N, 0)


def test_latent_cache_of_own_pairs_trains_like_the_images(tiny_sd15_dir, tmp_path):
    from scripts.build_cache import main as build_cache_main
    from tests.support import reset_accelerate

    write_images(tmp_path / "w", side=0)
    write_images(tmp_path / "l", side=1)
    captions = [{"file_name": f"{r:02d}.png", "caption": f"caption {r}"} for r in range(N)]
    source = ("--pairs_dirs", f"{tmp_path / 'w'},{tmp_path / 'l'}",
              "--captions", write_jsonl(tmp_path / "c.jsonl", captions))  # fmt: skip
    cache = str(tmp_path / "cache")
    stats = build_cache_main(["--pretrained_model", str(tiny_sd15_dir), *source,
                              "--resolution", "64", "--cache", cache])  # fmt: skip
    assert stats.images_encoded == 2 * N  # every level differs: no duplicates
    plain = run_train(tiny_sd15_dir, tmp_path / "plain", *source)
    reset_accelerate()
    cached = run_train(tiny_sd15_dir, tmp_path / "cached", *source, "--cache", cache)
    for a, b in zip(plain.history, cached.history, strict=True):
        assert a["err/policy"] == pytest.approx(b["err/policy"], rel=1e-5)


def test_kto_csv_builder_reads_own_pairs(tmp_path, monkeypatch):
    """Own pairs count as 1/0 comparisons; an image in two rows tallies both; resumable."""
    import pandas as pd

    from scripts import build_kto_csv

    write_images(tmp_path / "img")
    rows = manifest_rows(4)
    rows[3]["rejected"] = rows[0]["chosen"]  # c/00 wins row 1, loses row 4
    table = load_manifest(write_jsonl(tmp_path / "m.jsonl", rows), str(tmp_path / "img"))
    monkeypatch.setattr(build_kto_csv, "OWN_CHUNK", 2)
    first = build_kto_csv.build_kto_from_pairs(table, tmp_path / "kto", max_row_groups=1)
    assert (first.row_groups_done, first.complete) == (1, False)  # killed after one chunk
    summary = build_kto_csv.build_kto_from_pairs(table, tmp_path / "kto")
    assert (summary.row_groups_skipped, summary.row_groups_done, summary.pairs) == (1, 1, 4)
    csv = pd.read_csv(tmp_path / "kto" / build_kto_csv.CSV_NAME)
    assert len(csv) == 7 and all((tmp_path / "kto" / f).is_file() for f in csv.file_name)
    assert summary.splits == {"exclusive_win": 3, "intersections": 1, "exclusive_lose": 3}
    mixed = csv[csv.split == "intersections"]
    assert mixed.caption.tolist() == ["caption 0"]
