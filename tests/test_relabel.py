"""python -m evaluation.relabel: scores for every image, standardised combination, labels, ties,
soft labels, per-image labels, resume and flat memory, on tiny generated data with the toy rule
and a tiny random-init scorer."""

import io
import itertools
import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from common import cli
from data import ImageTransform, PairOptions, PickapicPairs, StreamSettings, collate_pairs
from data.errors import DataError
from evaluation.relabel import Source, output_estimate
from evaluation.relabel import main as relabel_main
from evaluation.relabel import run as relabel
from evaluation.scorers import ToyRewardScorer


class TinyRandomScorer:
    """A random-init conv net: a learned-scorer stand-in with an arbitrary scale."""

    name = "tiny"

    def __init__(self):
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Tanh(),
                                       torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                       torch.nn.Linear(4, 1))  # fmt: skip
        self.calls: list[int] = []

    @torch.no_grad()
    def score(self, images, prompts):
        self.calls.append(len(images))
        x = torch.stack([torch.from_numpy(np.asarray(i, dtype=np.float32) / 255).permute(2, 0, 1)
                         for i in images])  # fmt: skip
        return (100 * self.net(x).squeeze(-1)).tolist()


def image(seed: int, size: int = 16) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, 3)
    pixels = np.clip(base + rng.integers(-10, 10, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def write_pairs(path: Path, n: int, size: int = 16, row_group: int = 4) -> list[tuple]:
    """n rows with random-colour images; the human labels all say image 0 (kept as human_*)."""
    pairs = [(image(2 * i, size), image(2 * i + 1, size)) for i in range(n)]
    table = pa.table({
        "caption": [f"a thing {i}" for i in range(n)],
        "jpg_0": pa.array([png(a) for a, _ in pairs], pa.binary()),
        "jpg_1": pa.array([png(b) for _, b in pairs], pa.binary()),
        "label_0": [1.0] * n,
        "label_1": [0.0] * n,
        "extra": list(range(n)),
    })  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group)
    return pairs


def read_out(out: Path) -> pd.DataFrame:
    files = sorted(out.glob("train-*.parquet"))
    return pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)


def z(values: np.ndarray) -> np.ndarray:
    return (values - values.mean()) / values.std()


def test_scores_combined_labels_ties_and_soft_labels(tmp_path):
    pairs = write_pairs(tmp_path / "in" / "a.parquet", 12)
    scorers = [ToyRewardScorer("warm"), TinyRandomScorer()]
    args = ["--data", str(tmp_path / "in"), "--scorer", "toy_warm", "--scorer", "tiny",
            "--weights", "1,3", "--tie_threshold", "0.3", "--temperature", "2",
            "--batch_size", "5", "--out", str(tmp_path / "out")]  # fmt: skip
    summary = relabel(args, scorers=scorers)
    assert summary.complete and summary.rows == 12 and summary.unreadable_images == 0
    assert max(scorers[1].calls) <= 5  # batched
    frame = read_out(tmp_path / "out")
    assert frame["extra"].tolist() == list(range(12))  # original columns, in order
    assert (frame["human_label_0"] == 1).all() and frame["caption"][3] == "a thing 3"
    # Scores for every image, equal to the scorer's own on that image.
    fresh = [ToyRewardScorer("warm"), TinyRandomScorer()]
    for side in (0, 1):
        imgs = [p[side] for p in pairs]
        prompts = [f"a thing {i}" for i in range(12)]
        for scorer, name in zip(fresh, ("toy_warm", "tiny"), strict=True):
            expected = scorer.score(imgs, prompts)
            assert frame[f"score_{name}_{side}"].to_numpy() == pytest.approx(expected, abs=1e-4)
    # Standardised over all 24 images per scorer, weighted 0.25 / 0.75.
    both = {n: np.concatenate([frame[f"score_{n}_0"], frame[f"score_{n}_1"]]) for n in
            ("toy_warm", "tiny")}  # fmt: skip
    assert both["toy_warm"].std() > 0  # the rule splits these images
    zs = {n: z(v) for n, v in both.items()}
    c = 0.25 * zs["toy_warm"] + 0.75 * zs["tiny"]
    assert frame["score_combined_0"].to_numpy() == pytest.approx(c[:12], abs=1e-6)
    assert frame["score_combined_1"].to_numpy() == pytest.approx(c[12:], abs=1e-6)
    gap = c[:12] - c[12:]
    tie = np.abs(gap) <= 0.3
    assert 0 < tie.sum() < 12  # both kinds occur
    assert (frame["label_0"][tie] == 0.5).all() and (frame["label_1"][tie] == 0.5).all()
    assert (frame["label_0"][~tie] == (gap[~tie] > 0)).all()
    assert (frame["label_1"][~tie] == (gap[~tie] < 0)).all()
    assert frame["prob_0"].to_numpy() == pytest.approx(1 / (1 + np.exp(-gap / 2)), abs=1e-9)
    assert summary.ties == int(tie.sum())
    stats = json.loads((tmp_path / "out" / "relabel.json").read_text())["stats"]
    assert stats["tiny"]["std"] == pytest.approx(both["tiny"].std(), rel=1e-9)

    # The output trains as it is: --data OUT [--soft_labels] reads the AI labels and prob_0.
    settings = StreamSettings(ImageTransform(8, True, False), caption_dropout=0.0)
    data = PickapicPairs(
        str(tmp_path / "out"), settings, PairOptions(shuffle=False, soft_labels=True)
    )
    assert data.num_pairs == int((~tie).sum())
    batch = collate_pairs(list(itertools.islice(data.iter_role(0), int((~tie).sum()))))
    untied = frame[~tie]
    expected = np.where(untied["label_0"] == 1, untied["prob_0"], 1 - untied["prob_0"])
    assert batch.labels.numpy() == pytest.approx(expected, abs=1e-6)
    assert (batch.labels > 0.5).all()  # the chosen side is the higher combined score


def test_resume_after_an_interruption_gives_the_same_output(tmp_path):
    write_pairs(tmp_path / "in" / "a.parquet", 10, row_group=3)  # 4 units
    args = ["--data", str(tmp_path / "in"), "--scorer", "toy_warm", "--scorer", "tiny"]
    whole = relabel([*args, "--out", str(tmp_path / "whole")],
                    scorers=[ToyRewardScorer("warm"), TinyRandomScorer()])  # fmt: skip
    cut = [*args, "--out", str(tmp_path / "cut")]
    first = relabel(
        [*cut, "--max_units", "2"], scorers=[ToyRewardScorer("warm"), TinyRandomScorer()]
    )
    assert (first.scored_now, first.complete) == (2, False)
    assert not list((tmp_path / "cut").glob("train-*.parquet"))
    second_scorer = TinyRandomScorer()
    rest = relabel(cut, scorers=[ToyRewardScorer("warm"), second_scorer])
    assert rest.scored_now == 2 and sum(second_scorer.calls) == 2 * (3 + 1)  # units 3 and 4 only
    assert rest.complete and whole.labels == rest.labels
    pd.testing.assert_frame_equal(read_out(tmp_path / "whole"), read_out(tmp_path / "cut"))
    with pytest.raises(Exception, match="other settings"):
        relabel([*args, "--weights", "1,2", "--out", str(tmp_path / "cut")],
                scorers=[ToyRewardScorer("warm"), TinyRandomScorer()])  # fmt: skip


def test_memory_is_flat_across_input_sizes(tmp_path):
    """Peak Python allocations (image bytes included) do not grow with the input: one unit of
    work in memory at a time."""
    peaks = []
    for n in (4, 8, 48):  # the first run warms up one-time allocations (imports, caches)
        write_pairs(tmp_path / f"in{n}" / "a.parquet", n, size=48, row_group=4)
        tracemalloc.start()
        args = ["--data", str(tmp_path / f"in{n}"), "--scorer", "toy_warm"]
        relabel([*args, "--out", str(tmp_path / f"out{n}")], scorers=[ToyRewardScorer("warm")])
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    input_growth = (tmp_path / "in48" / "a.parquet").stat().st_size - (
        tmp_path / "in8" / "a.parquet").stat().st_size  # fmt: skip
    assert peaks[2] - peaks[1] < 0.25 * input_growth, (peaks, input_growth)


def test_per_image_csv_gets_scores_and_labels(tmp_path):
    root = tmp_path / "img"
    root.mkdir()
    rows = []
    for i in range(10):
        image(i).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "caption": f"c{i}", "split": "intersections"})
    pd.DataFrame(rows).to_csv(tmp_path / "kto.csv", index=False)
    common = ["--csv", str(tmp_path / "kto.csv"), "--images", str(root), "--scorer", "tiny",
              "--chunk_rows", "3"]  # fmt: skip
    relabel([*common, "--quantile", "0.7", "--out", str(tmp_path / "q")],
            scorers=[TinyRandomScorer()])  # fmt: skip
    frame = pd.read_csv(tmp_path / "q" / "kto.csv")
    outputs = [str(tmp_path / "q" / "kto.csv"), str(tmp_path / "q" / "relabel.json")]
    assert json.loads((tmp_path / "q" / "relabel.json").read_text())["outputs"] == outputs
    assert frame["file_name"].tolist() == [f"{i}.png" for i in range(10)]
    raw = np.array(TinyRandomScorer().score([image(i) for i in range(10)], [""] * 10))
    assert frame["score_tiny"].to_numpy() == pytest.approx(raw, abs=1e-4)
    assert frame["score_combined"].to_numpy() == pytest.approx(z(raw), abs=1e-6)
    top = z(raw) >= np.quantile(z(raw), 0.7)
    assert frame["label"].tolist() == top.astype(int).tolist() and top.sum() == 3
    assert set(frame["split"][top]) == {"exclusive_win"}
    assert set(frame["split"][~top]) == {"exclusive_lose"}
    assert (frame["split_human"] == "intersections").all()
    relabel([*common, "--threshold", "0.5", "--out", str(tmp_path / "t")],
            scorers=[TinyRandomScorer()])  # fmt: skip
    frame = pd.read_csv(tmp_path / "t" / "kto.csv")
    assert frame["label"].tolist() == (z(raw) >= 0.5).astype(int).tolist()


def warm_and_cool_pairs(tmp_path: Path) -> tuple[Path, Path]:
    """4 own pairs (manifest, image root): warm then cool image on odd rows, cool then warm on
    even ones."""
    root = tmp_path / "img"
    root.mkdir()
    warm, cool = Image.new("RGB", (8, 8), (230, 90, 40)), Image.new("RGB", (8, 8), (40, 90, 230))
    rows = []
    for i in range(4):
        first, second = (warm, cool) if i % 2 else (cool, warm)
        first.save(root / f"{i}a.png")
        second.save(root / f"{i}b.png")
        rows.append({"caption": f"c{i}", "chosen": f"{i}a.png", "rejected": f"{i}b.png"})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "m.jsonl", root


def test_own_pairs_and_the_registered_toy_rule_from_the_command_line(tmp_path, capsys):
    manifest, root = warm_and_cool_pairs(tmp_path)
    assert relabel_main(["--pairs", str(manifest), "--images", str(root),
                         "--scorer", "toy_warm", "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    frame = read_out(tmp_path / "out")
    # The rule prefers the warm image: the human "chosen" side only on odd rows.
    assert frame["label_0"].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert frame["chosen"].tolist() == [f"{i}a.png" for i in range(4)]
    printed = capsys.readouterr().out
    assert "relabelled 4 rows" in printed
    out = tmp_path / "out"
    assert printed.splitlines()[-1] == f"wrote {out / 'train-*.parquet'}, {out / 'relabel.json'}"


# ---------------------------------------------------------------- disk use


def tree_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def shard_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("train-*.parquet"))


def written_bytes() -> int:
    """Bytes this process has passed to write() so far (Linux)."""
    text = Path("/proc/self/io").read_text()
    return int(next(line for line in text.splitlines() if line.startswith("wchar:")).split()[1])


def toy_rules() -> list[ToyRewardScorer]:
    return [ToyRewardScorer("warm"), ToyRewardScorer("colour")]


def test_the_scratch_holds_scores_alone_and_the_output_is_the_one_copy(toy_data_dir, tmp_path):
    """Issue 25 (6): pass 1 wrote every row with its image bytes to OUT/.scored/ and pass 2 a
    second copy: on the toy Pick-a-Pic parquet, 1.96x the output's bytes were written and held
    under OUT at the peak (2.9x the dataset with the input). Now 1.03x."""
    data = toy_data_dir / "pickapic"  # 2 shards of 8 row groups: 16 units, 256 pairs
    args = ["--data", str(data), "--scorer", "toy_warm", "--scorer", "toy_colour"]
    out = tmp_path / "cut"
    relabel([*args, "--out", str(out), "--max_units", "8"],
            scorers=toy_rules())  # fmt: skip
    scratch = sorted((out / ".scored").glob("*.parquet"))
    assert len(scratch) == 8 and not (out / ".rows").exists()
    for path in scratch:  # keys and scores, no image bytes
        schema = pq.read_schema(path)
        assert schema.names == ["row_checksum", "score_toy_warm_0", "score_toy_colour_0",
                                "score_toy_warm_1", "score_toy_colour_1"]  # fmt: skip
    half_input = sum(f.stat().st_size for f in data.glob("*.parquet")) / 2
    assert tree_bytes(out) < 0.1 * half_input, (tree_bytes(out), half_input)  # 5.5%: footers
    relabel([*args, "--out", str(out)], scorers=toy_rules())
    # The same output as one uninterrupted run, whose writes are the output and little more.
    whole = tmp_path / "whole"
    before = written_bytes() if os.path.exists("/proc/self/io") else None
    relabel([*args, "--out", str(whole)], scorers=toy_rules())
    if before is not None:
        assert written_bytes() - before < 1.1 * shard_bytes(whole), (before, shard_bytes(whole))
    pd.testing.assert_frame_equal(read_out(out), read_out(whole))
    assert len(read_out(whole)) == 256 and isinstance(read_out(whole)["jpg_0"][0], bytes)
    left = sorted(p.name for p in whole.iterdir() if not p.name.startswith("train-"))
    assert left == [".relabel_args.json", "relabel.json"]  # the scratch is gone


def test_no_room_for_the_output_stops_before_scoring_in_one_line(toy_data_dir, tmp_path, capsys):
    data = toy_data_dir / "pickapic"
    argv = ["--data", str(data), "--scorer", "toy_warm", "--out", str(tmp_path / "out")]
    # 256 pairs: the input's bytes plus 9 added values (2 x (checksum + 1 score), 2 combined,
    # 2 labels, prob_0) of 24 bytes per pair, and 10% spare.
    input_bytes = sum(f.stat().st_size for f in data.glob("*.parquet"))
    estimate = output_estimate(Source([], input_bytes=input_bytes, rows=256), scorers=1)
    assert estimate == int(np.ceil(1.1 * (input_bytes + 256 * 9 * 24)))
    scorer = ToyRewardScorer("warm")
    with pytest.raises(SystemExit) as exit_:
        cli.run(lambda a: relabel(a, scorers=[scorer], free_bytes=estimate - 1), argv, "relabel")
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--out {tmp_path / 'out'}: the relabelled data needs about" in err[0]
    assert not (tmp_path / "out").exists()  # nothing scored, nothing written
    relabel(argv, scorers=[scorer], free_bytes=estimate)  # just enough
    assert estimate > tree_bytes(tmp_path / "out") > 0.95 * estimate / 1.1
    # A killed run needs only what it has not written yet.
    cut = ["--data", str(data), "--scorer", "toy_warm", "--out", str(tmp_path / "cut")]
    relabel([*cut, "--max_units", "4"], scorers=[scorer], free_bytes=estimate)
    relabel(cut, scorers=[scorer], free_bytes=estimate - tree_bytes(tmp_path / "cut"))


def test_input_changed_between_the_passes_is_named(tmp_path):
    write_pairs(tmp_path / "in" / "a.parquet", 10, row_group=3)  # 4 units
    args = ["--data", str(tmp_path / "in"), "--scorer", "toy_warm", "--out", str(tmp_path / "o")]
    relabel([*args, "--max_units", "2"], scorers=[ToyRewardScorer("warm")])
    table = pq.read_table(tmp_path / "in" / "a.parquet")
    swapped = table.column("jpg_0").to_pylist()
    swapped[4], swapped[5] = swapped[5], swapped[4]  # row group 1, rows 1 and 2
    table = table.set_column(1, "jpg_0", pa.array(swapped, pa.binary()))
    pq.write_table(table, tmp_path / "in" / "a.parquet", row_group_size=3)
    with pytest.raises(DataError, match=r"a\.parquet, row group 1: the input changed .*row 1"):
        relabel(args, scorers=[ToyRewardScorer("warm")])


def test_the_model_card_names_the_relabelling_it_trained_on(tmp_path):
    """--data OUT of a relabelling: the card's data row says what was relabelled, and how."""
    from training.config import TrainConfig
    from training.model_card import data_source

    manifest, root = warm_and_cool_pairs(tmp_path)
    out = tmp_path / "out"
    relabel(["--pairs", str(manifest), "--images", str(root), "--scorer", "toy_warm",
             "--weights", "1", "--out", str(out)])  # fmt: skip
    config = TrainConfig(data=str(out), soft_labels=True).to_dict()
    assert data_source(config) == (
        f"`--data {out}`; labels from `python -m evaluation.relabel` on `--pairs {manifest}` with "
        "`toy_warm`, weights 1"
    )
    shard = str(sorted(out.glob("train-*.parquet"))[0])  # a file of the folder names it too
    assert "`--pairs " in data_source({**config, "data": shard})
    assert data_source(TrainConfig(data=str(root)).to_dict()) == f"`--data {root}`"  # not one


# ---------------------------------------------------------------- a hub dataset, offline

MAPPING = {"caption": "prompt", "jpg_0": "image_a", "jpg_1": "image_b", "label_0": "a_wins",
           "label_1": "b_wins"}  # fmt: skip
COLUMNS_FLAG = ",".join(f"{k}={v}" for k, v in MAPPING.items())


def mapped_copy(source: Path, target: Path) -> None:
    """The same shard (row groups kept) in another schema: MAPPING's column names."""
    shard = pq.ParquetFile(source)
    table = shard.read()
    table = table.rename_columns([MAPPING.get(n, n) for n in table.column_names])
    target.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, target, row_group_size=shard.metadata.row_group(0).num_rows)


def test_a_hub_dataset_relabels_like_its_local_shards_and_resumes(tmp_path, offline_hub):
    """owner/pairs, in another schema with Image features, read by name through datasets'
    offline cache: the same output as the local Pick-a-Pic shards; a killed run resumes."""
    write_pairs(tmp_path / "in" / "a.parquet", 10, row_group=3)
    mapped_copy(tmp_path / "in" / "a.parquet", tmp_path / "mapped" / "a.parquet")
    offline_hub("owner/pairs", tmp_path / "mapped" / "a.parquet", ["image_a", "image_b"])
    scorers = [ToyRewardScorer("warm"), TinyRandomScorer()]
    common = ["--scorer", "toy_warm", "--scorer", "tiny", "--tie_threshold", "0.2"]
    local = relabel(["--data", str(tmp_path / "in"), *common, "--out", str(tmp_path / "local")],
                    scorers=scorers)  # fmt: skip
    hub_args = ["--data", "owner/pairs", "--columns", COLUMNS_FLAG, "--chunk_rows", "3", *common]
    whole = relabel([*hub_args, "--out", str(tmp_path / "whole")],
                    scorers=[ToyRewardScorer("warm"), TinyRandomScorer()])  # fmt: skip
    assert whole.complete and (whole.units, whole.rows) == (4, 10)
    assert whole.labels == local.labels and whole.stats == local.stats
    expected = read_out(tmp_path / "local")
    assert isinstance(expected["jpg_0"][0], bytes)
    pd.testing.assert_frame_equal(read_out(tmp_path / "whole"), expected)
    cut = [*hub_args, "--out", str(tmp_path / "cut")]
    first = relabel([*cut, "--max_units", "2"],
                    scorers=[ToyRewardScorer("warm"), TinyRandomScorer()])  # fmt: skip
    assert (first.scored_now, first.complete) == (2, False)
    # The stream is not downloaded twice: pass 1 keeps its rows, until their shard is written.
    kept = sorted(p.name for p in (tmp_path / "cut" / ".rows").iterdir())
    assert kept == ["train-00000.parquet", "train-00001.parquet"]
    rest_scorer = TinyRandomScorer()
    rest = relabel(cut, scorers=[ToyRewardScorer("warm"), rest_scorer])
    assert rest.scored_now == 2 and sum(rest_scorer.calls) == 2 * (3 + 1)  # units 3 and 4 only
    pd.testing.assert_frame_equal(read_out(tmp_path / "cut"), expected)
    assert not (tmp_path / "cut" / ".rows").exists()


def test_hub_relabelling_memory_is_flat_and_bad_names_are_named(tmp_path, offline_hub):
    peaks = []
    for n in (4, 8, 48):  # the first run warms up one-time allocations
        write_pairs(tmp_path / f"in{n}" / "a.parquet", n, size=48, row_group=4)
        mapped_copy(tmp_path / f"in{n}" / "a.parquet", tmp_path / f"m{n}" / "a.parquet")
        offline_hub(f"owner/pairs{n}", tmp_path / f"m{n}" / "a.parquet", ["image_a", "image_b"])
        tracemalloc.start()
        relabel(["--data", f"owner/pairs{n}", "--columns", COLUMNS_FLAG, "--chunk_rows", "4",
                 "--scorer", "toy_warm", "--out", str(tmp_path / f"out{n}")],
                scorers=[ToyRewardScorer("warm")])  # fmt: skip
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    input_growth = (tmp_path / "in48" / "a.parquet").stat().st_size - (
        tmp_path / "in8" / "a.parquet").stat().st_size  # fmt: skip
    assert peaks[2] - peaks[1] < 0.25 * input_growth, (peaks, input_growth)
    assert len(read_out(tmp_path / "out48")) == 48
    with pytest.raises(Exception, match="owner/absent"):
        relabel(["--data", "owner/absent", "--scorer", "toy_warm", "--out", str(tmp_path / "x")],
                scorers=[ToyRewardScorer("warm")])  # fmt: skip
    with pytest.raises(Exception, match="missing column caption"):
        relabel(["--data", "owner/pairs4", "--scorer", "toy_warm", "--out", str(tmp_path / "y")],
                scorers=[ToyRewardScorer("warm")])  # fmt: skip
    with pytest.raises(Exception, match="does not apply to --csv"):
        relabel(["--csv", "k.csv", "--images", "i", "--columns", COLUMNS_FLAG,
                 "--scorer", "toy_warm", "--out", str(tmp_path / "z")])  # fmt: skip
