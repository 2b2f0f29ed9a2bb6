"""data/: transforms, Pick-a-Pic pairs, KTO images, roles and exact resume, bad input.

Fixtures are written here, in tmp_path: tiny parquet shards and CSVs whose images are solid or
half-and-half colours, so which image came out (and whether it was flipped) reads off the pixels.
"""

import io
import itertools
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data import (
    DEFAULT_SPLIT_LABELS,
    DataError,
    ImageTransform,
    LabeledImages,
    PickapicPairs,
    collate_images,
    collate_pairs,
    parse_split_labels,
)
from tests.support import stream_kwargs

RES = 8
WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (128, 128, 128)


# ---------------------------------------------------------------- fixture helpers


def encode_image(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=95)
    return buffer.getvalue()


def halves(left: tuple, right: tuple, size: tuple[int, int] = (12, 10)) -> Image.Image:
    """A (width, height) image: ``left`` colour on the left half, ``right`` on the right."""
    image = Image.new("RGB", size, right)
    image.paste(left, (0, 0, size[0] // 2, size[1]))
    return image


CHOSEN_JPEG = encode_image(halves(WHITE, GREY))  # the brighter image of every pair
REJECTED_JPEG = encode_image(halves(BLACK, GREY))
LABEL_CYCLE = [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)]  # preferred first, preferred second, tie


def pair_rows(prefix: str, n: int) -> list[dict]:
    """n rows cycling through LABEL_CYCLE; the image labelled 1 is always CHOSEN_JPEG."""
    rows = []
    for i in range(n):
        label_0, label_1 = LABEL_CYCLE[i % 3]
        first, second = (
            (REJECTED_JPEG, CHOSEN_JPEG) if label_1 == 1 else (CHOSEN_JPEG, REJECTED_JPEG)
        )
        rows.append(
            {"caption": f"{prefix}-{i}", "jpg_0": first, "jpg_1": second}
            | {"label_0": label_0, "label_1": label_1}
        )
    return rows


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 3, drop: str = "") -> str:
    columns = {
        name: [row[name] for row in rows]
        for name in ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
        if name != drop
    }
    types = {"jpg_0": pa.binary(), "jpg_1": pa.binary(), "caption": pa.string()}
    table = pa.table({k: pa.array(v, type=types.get(k, pa.float64())) for k, v in columns.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """2 shards x 12 rows in row groups of 3: 8 row groups, 16 pairs, 8 ties."""
    root = tmp_path / "pickapic"
    write_parquet(root / "train-0.parquet", pair_rows("a", 12))
    write_parquet(root / "sub" / "train-1.parquet", pair_rows("b", 12))
    return root


def pairs(source, **kwargs) -> PickapicPairs:
    transform = ImageTransform(RES, center_crop=False)
    return PickapicPairs(str(source), **stream_kwargs(transform, **kwargs))


def epoch_examples(dataset, role: int = 0) -> list[dict]:
    """The examples of the first epoch of one role (pickapic states start with the epoch)."""
    return list(itertools.takewhile(lambda e: e["state"][0] == 0, dataset.iter_role(role)))


def brightness(pixels: torch.Tensor) -> float:
    return pixels.mean().item()


# ---------------------------------------------------------------- transforms


def test_transform_shape_range_and_sizes():
    rng = np.random.default_rng(0)
    noise = np.random.default_rng(1).integers(0, 256, (23, 37, 3), dtype=np.uint8)
    images = [Image.fromarray(noise), Image.fromarray(noise).convert("L")]
    out = ImageTransform(16, center_crop=False)(images, rng)
    assert out.pixels.shape == (2, 3, 16, 16) and out.pixels.dtype == torch.float32
    assert out.pixels.min() >= -1 and out.pixels.max() <= 1
    assert out.original_sizes == [(23, 37), (23, 37)]
    # 23 x 37 -> 16 x int(37 * 16 / 23) = 16 x 25: only the width has slack
    assert all(top == 0 and 0 <= left <= 9 for top, left in out.crop_top_lefts)


@pytest.mark.parametrize(
    ("size", "resized", "corner"),
    [
        # torchvision: Resize(16): long side int(16 * 37 / 23) = int(25.74) = 25 (round: 26);
        # CenterCrop(16): int(round(9 / 2)) = int(4.5 -> 4), round half to even.
        ((23, 37), (16, 25), (0, 4)),
        ((37, 23), (25, 16), (4, 0)),
        # 16 x 19: slack 3 -> int(round(1.5)) = 2 (floor division would give 1).
        ((16, 19), (16, 19), (0, 2)),
        # 16 x 23: slack 7 -> round(3.5) = 4; 30 x 20 -> 24 x 16, slack 8 -> 4.
        ((16, 23), (16, 23), (0, 4)),
        ((30, 20), (24, 16), (4, 0)),
    ],
)
def test_resize_and_centre_crop_round_as_torchvision(size, resized, corner):
    transform = ImageTransform(16, random_flip=False)
    assert transform.crop_corner(*size, False, 0.0, 0.0) == (resized, corner)
    image = Image.new("RGB", (size[1], size[0]))
    assert transform([image], np.random.default_rng(0)).crop_top_lefts == [corner]


def test_center_crop_by_hand():
    # 4 x 8 (H x W), column c has grey level 10 * c: no resize at R = 4, crop columns 2..5.
    array = np.tile((np.arange(8, dtype=np.uint8) * 10)[None, :, None], (4, 1, 3))
    out = ImageTransform(4, random_flip=False)([Image.fromarray(array)], np.random.default_rng(0))
    expected = torch.tensor([20, 30, 40, 50], dtype=torch.float32) / 127.5 - 1
    assert torch.allclose(out.pixels[0, 1], expected.expand(4, 4))
    assert out.crop_top_lefts == [(0, 2)] and out.original_sizes == [(4, 8)]


def test_resize_shorter_side_bilinear():
    transform = ImageTransform(5, random_flip=False)
    # A constant image stays constant under any filter: 51 -> 51 / 127.5 - 1 = -0.6.
    portrait = Image.new("RGB", (10, 20), (51, 51, 51))
    out = transform([portrait], np.random.default_rng(0))
    assert torch.allclose(out.pixels, torch.full((1, 3, 5, 5), -0.6))
    assert out.original_sizes == [(20, 10)] and out.crop_top_lefts == [(2, 0)]  # 10 x 5, (10-5)//2
    # A textured one equals PIL's antialiased bilinear resize to 5 x 10, then the centre crop.
    noise = np.random.default_rng(2).integers(0, 256, (10, 20, 3), dtype=np.uint8)
    image = Image.fromarray(noise)
    out = transform([image], np.random.default_rng(0))
    reference = np.asarray(image.resize((10, 5), Image.Resampling.BILINEAR))[:, 2:7]
    expected = torch.from_numpy(reference.copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(out.pixels[0], expected)


def test_pair_shares_one_flip_and_one_crop_draw():
    transform = ImageTransform(RES, center_crop=False)
    flips = set()
    for seed in range(20):
        out = transform([gradient(16, 8), gradient(32, 8)], np.random.default_rng(seed))
        # brighter to the right unless flipped, wherever the crop falls
        rising = [bool(p[:, :, 0].mean() < p[:, :, -1].mean()) for p in out.pixels]
        assert rising[0] == rising[1]
        flips.add(rising[0])
        # one crop draw v: round(v * 8) and round(v * 24) (the two width slacks) stay in ratio
        (_, left_a), (_, left_b) = out.crop_top_lefts
        assert abs(left_b - 3 * left_a) <= 2
    assert flips == {True, False}


def gradient(width: int, height: int) -> Image.Image:
    """Grey level rising from left to right, so a flip shows whatever the crop."""
    row = np.linspace(0, 255, width).astype(np.uint8)
    return Image.fromarray(np.tile(row[None, :, None], (height, 1, 3)))


def test_crop_left_is_measured_in_the_flipped_image():
    # 8 x 11: slack 3, centre left = 1; a flipped image lost 2 columns on its (new) left.
    transform = ImageTransform(RES)
    corners = {
        transform([halves(WHITE, BLACK, (11, 8))], np.random.default_rng(s)).crop_top_lefts[0]
        for s in range(10)
    }
    assert corners == {(0, 1), (0, 2)}


# ---------------------------------------------------------------- Pick-a-Pic pairs


def test_chosen_first_ties_dropped_captions_kept(shards):
    dataset = pairs(shards, caption_dropout=0.0, shuffle=False)
    assert (dataset.num_pairs, dataset.num_files, dataset.num_row_groups) == (16, 2, 8)
    examples = epoch_examples(dataset)
    expected = {f"{p}-{i}" for p in "ab" for i in range(12) if i % 3 != 2}
    assert sorted(e["caption"] for e in examples) == sorted(expected)
    for example in examples:
        assert example["pixels"].shape == (2, 3, RES, RES)
        chosen, rejected = example["pixels"]
        assert brightness(chosen) > 0.1 > -0.1 > brightness(rejected)  # incl. swapped rows
    batch = collate_pairs(examples[:3])
    assert batch.pixels.shape == (6, 3, RES, RES) and len(batch.captions) == 3
    assert torch.equal(batch.pixels[:3], torch.stack([e["pixels"][0] for e in examples[:3]]))
    assert torch.equal(batch.pixels[3:], torch.stack([e["pixels"][1] for e in examples[:3]]))
    assert batch.positions == {0: examples[2]["state"]} and batch.skipped == 0


def test_caption_dropout_frequency(shards):
    examples = list(itertools.islice(pairs(shards, caption_dropout=0.3).iter_role(0), 480))
    dropped = np.mean([e["caption"] == "" for e in examples])
    assert 0.24 < dropped < 0.36
    # One caption per pair: the collated batch holds B captions for 2B images.
    assert len(collate_pairs(examples[:4]).captions) == 4


def test_winners_only(shards):
    dataset = pairs(shards, winners_only=True)
    examples = epoch_examples(dataset)
    assert len(examples) == 16
    for example in examples:
        assert example["pixels"].shape == (1, 3, RES, RES) and example["label"] == 1.0
        assert brightness(example["pixels"]) > 0.1
    batch = collate_images(examples[:5])
    assert batch.pixels.shape == (5, 3, RES, RES) and batch.labels.tolist() == [1.0] * 5


@pytest.mark.parametrize("per_block", [1, 2])
def test_roles_are_disjoint_and_cover_an_epoch(shards, per_block):
    seen = []
    for rank in range(2):
        dataset = pairs(
            shards,
            caption_dropout=0.0,
            row_groups_per_block=per_block,
            rank=rank,
            world_size=2,
            num_workers=2,
        )
        assert dataset.num_roles == 4
        for worker in range(2):
            seen += [e["caption"] for e in epoch_examples(dataset, rank * 2 + worker)]
    assert len(seen) == len(set(seen)) == 16


def test_pickapic_resume_continues_exactly(shards):
    kwargs = {"caption_dropout": 0.5, "row_groups_per_block": 2, "world_size": 1, "num_workers": 2}
    reference = list(itertools.islice(pairs(shards, **kwargs).iter_role(1), 20))  # ~2.5 epochs
    states = [e["state"] for e in reference]
    new_block = next(k for k in range(1, 20) if states[k][1] != states[k - 1][1])
    new_epoch = next(k for k in range(1, 20) if states[k][0] != states[k - 1][0])
    for k in sorted({1, new_block, 7, new_epoch}):  # resume at a block's end, an epoch's end
        resumed = pairs(shards, **kwargs)
        resumed.resume_from({"1": reference[k - 1]["state"]})  # JSON turns keys into str
        continuation = list(itertools.islice(resumed.iter_role(1), 20 - k))
        assert_same_examples(continuation, reference[k:])


def assert_same_examples(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a["pixels"], b["pixels"])
        assert (a["caption"], a["state"], a["crop_top_lefts"]) == (
            b["caption"],
            b["state"],
            b["crop_top_lefts"],
        )


def test_undecodable_jpeg_is_skipped_counted_and_logged(tmp_path, caplog):
    rows = pair_rows("a", 6)
    rows[3]["jpg_1"] = b"not a jpeg"  # row 3 is (1, 0): its rejected image is broken
    path = write_parquet(tmp_path / "bad.parquet", rows, row_group_size=6)
    with caplog.at_level(logging.WARNING, logger="data.pickapic"):
        examples = epoch_examples(pairs(path, shuffle=False))
    assert [e["skipped"] for e in examples] == [0, 0, 1]  # rows 0, 1, (2 tie, 3 bad), 4
    assert [e["state"][2] for e in examples] == [1, 2, 5]
    assert path in caplog.text and "row 4" in caplog.text and "jpg_1" in caplog.text  # from 1


def test_unreadable_row_group_is_skipped(shards, monkeypatch, caplog):
    read = pq.ParquetFile.read_row_group

    def broken_group_1(self, index, columns=None):
        if index == 1:
            raise OSError("disk on fire")
        return read(self, index, columns=columns)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", broken_group_1)
    with caplog.at_level(logging.WARNING, logger="data.pickapic"):
        examples = epoch_examples(pairs(shards, shuffle=False))
    # group 1 of each shard (rows 3-5: two pairs and a tie) is lost: 3 rows skipped per shard
    assert len(examples) == 16 - 4 and sum(e["skipped"] for e in examples) == 6
    assert (
        "disk on fire" in caplog.text
        and "train-0.parquet (rows 4-6, numbered from 1)" in caplog.text
    )

    def broken(self, index, columns=None):
        raise OSError("disk on fire")

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", broken)
    with pytest.raises(DataError, match="whole epoch"):
        next(pairs(shards).iter_role(0))  # nothing readable: fails after an epoch, never hangs


def test_hub_source_streams_and_resumes(monkeypatch):
    import datasets

    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
    columns = {k: [row[k] for row in pair_rows("h", 12)] for k in pair_rows("h", 1)[0]}
    calls = []

    def fake_load(name, **kwargs):
        calls.append((name, kwargs))
        return datasets.Dataset.from_dict(columns).to_iterable_dataset(num_shards=2)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    kwargs = {"world_size": 2, "rank": 1, "caption_dropout": 0.0}
    dataset = pairs("owner/pairs", hub_revision="abc", shuffle=False, **kwargs)
    assert calls == [("owner/pairs", {"split": "train", "revision": "abc", "streaming": True})]
    assert dataset.num_pairs is None
    # role 1 of 2 reads shard 1 = rows 6..11, of which 8 and 11 are ties
    first = list(itertools.islice(dataset.iter_role(1), 6))
    assert [e["state"] for e in first] == [[0, 1], [0, 2], [0, 4], [0, 5], [1, 1], [1, 2]]
    assert [e["caption"] for e in first[:4]] == ["h-6", "h-7", "h-9", "h-10"]
    assert all(brightness(e["pixels"][0]) > brightness(e["pixels"][1]) for e in first)
    for shuffle in (False, True):
        reference = list(
            itertools.islice(pairs("owner/pairs", shuffle=shuffle, **kwargs).iter_role(1), 7)
        )
        resumed = pairs("owner/pairs", shuffle=shuffle, **kwargs)
        resumed.resume_from({1: reference[2]["state"]})
        assert_same_examples(list(itertools.islice(resumed.iter_role(1), 4)), reference[3:])


def test_hub_name_that_cannot_be_opened(monkeypatch):
    import datasets

    def offline(name, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="owner/missing"):
        pairs("owner/missing")


# ---------------------------------------------------------------- KTO images

SPLITS = ["exclusive_win", "intersections", "exclusive_lose", "exclusive_lose"]


def write_kto(tmp_path: Path, rows: list[tuple[str, str, str]] | None = None) -> tuple[str, str]:
    """A CSV (file_name, caption, split) and an image root; by default 16 rows cycling SPLITS,
    desirable images white and undesirable ones black (under the default mapping)."""
    root = tmp_path / "images"
    (root / "train").mkdir(parents=True, exist_ok=True)
    if rows is None:
        rows = [(f"train/{i}.jpg", f"caption {i}", SPLITS[i % 4]) for i in range(16)]
        for i, (name, _, split) in enumerate(rows):
            colour = WHITE if DEFAULT_SPLIT_LABELS[split] else BLACK
            halves(colour, colour if i % 2 else GREY).save(root / name, quality=95)
    lines = ["file_name,caption,split"] + [",".join(row) for row in rows]
    csv = tmp_path / "train.csv"
    csv.write_text("\n".join(lines) + "\n")
    return str(csv), str(root)


def images(csv: str, root: str, **kwargs) -> LabeledImages:
    transform = ImageTransform(RES, center_crop=False)
    return LabeledImages(csv, root, **stream_kwargs(transform, **kwargs))


def test_kto_default_mapping_and_labels(tmp_path):
    dataset = images(*write_kto(tmp_path), caption_dropout=0.0)
    assert (dataset.num_images, dataset.num_desirable, dataset.num_undesirable) == (16, 8, 8)
    examples = list(itertools.islice(dataset.iter_role(0), 40))
    for example in examples:
        assert example["pixels"].shape == (1, 3, RES, RES)
        assert (example["label"] == 1.0) == (brightness(example["pixels"]) > 0)
        assert example["caption"].startswith("caption ")
    batch = collate_images(examples[:4])
    assert batch.labels.dtype == torch.float32
    assert batch.labels.tolist() == [e["label"] for e in examples[:4]]
    assert batch.positions == {0: [4]}


def test_kto_custom_mapping(tmp_path):
    csv, root = write_kto(tmp_path)
    mapping = parse_split_labels("exclusive_win=1, intersections=0,exclusive_lose=0")
    assert mapping == {"exclusive_win": 1, "intersections": 0, "exclusive_lose": 0}
    dataset = images(csv, root, split_labels=mapping)
    assert (dataset.num_desirable, dataset.num_undesirable) == (4, 12)


@pytest.mark.parametrize("text", ["", "a", "a=2", "=1", "a=1,a=0", "a=1;b=0"])
def test_parse_split_labels_rejects_bad_syntax(text):
    with pytest.raises(ValueError, match="split labels"):
        parse_split_labels(text)


@pytest.mark.parametrize(("prob", "expected"), [(0.8, 0.8), (None, 0.25), (1.0, 1.0)])
def test_kto_desirable_fraction(tmp_path, prob, expected):
    mapping = {"exclusive_win": 1, "intersections": 0, "exclusive_lose": 0}  # 4 of 16 desirable
    dataset = images(*write_kto(tmp_path), split_labels=mapping, desirable_prob=prob)
    labels = [e["label"] for e in itertools.islice(dataset.iter_role(0), 1500)]
    assert np.mean(labels) == pytest.approx(expected, abs=0.04)


def test_kto_caption_dropout_frequency(tmp_path):
    dataset = images(*write_kto(tmp_path), caption_dropout=0.2)
    captions = [e["caption"] for e in itertools.islice(dataset.iter_role(0), 800)]
    assert np.mean([c == "" for c in captions]) == pytest.approx(0.2, abs=0.04)


def test_kto_roles_interleave_into_the_single_stream(tmp_path):
    csv, root = write_kto(tmp_path)
    single = list(itertools.islice(images(csv, root).iter_role(0), 12))
    split = [images(csv, root, rank=rank, world_size=2, num_workers=2) for rank in range(2)]
    streams = [list(itertools.islice(split[r // 2].iter_role(r), 3)) for r in range(4)]
    # draw i of role r is global draw i * 4 + r: disjoint, and together every draw once
    interleaved = [streams[r][i] for i in range(3) for r in range(4)]
    for got, want in zip(interleaved, single, strict=True):
        assert torch.equal(got["pixels"], want["pixels"])
        assert (got["caption"], got["label"]) == (want["caption"], want["label"])


def test_kto_resume_continues_exactly(tmp_path):
    csv, root = write_kto(tmp_path)
    reference = list(itertools.islice(images(csv, root).iter_role(0), 12))
    resumed = images(csv, root)
    resumed.resume_from({0: reference[4]["state"]})
    assert_same_examples(list(itertools.islice(resumed.iter_role(0), 7)), reference[5:])


def test_kto_missing_image_is_skipped_counted_and_logged(tmp_path, caplog):
    csv, root = write_kto(tmp_path)
    Path(root, "train/0.jpg").unlink()
    Path(root, "train/4.jpg").write_bytes(b"garbage")
    dataset = images(csv, root)
    with caplog.at_level(logging.WARNING, logger="data.kto_csv"):
        examples = list(itertools.islice(dataset.iter_role(0), 200))
    assert len(examples) == 200
    skipped = sum(e["skipped"] for e in examples)
    assert skipped == examples[-1]["state"][0] - 200 > 0  # every draw either yields or skips
    assert "train/0.jpg" in caplog.text and "train/4.jpg" in caplog.text and csv in caplog.text


# ---------------------------------------------------------------- DataLoader resume


def pickapic_factory(shards):
    return lambda: pairs(shards, num_workers=2), collate_pairs


def kto_factory(tmp_path):
    csv, root = write_kto(tmp_path)
    return lambda: images(csv, root, num_workers=2), collate_images


@pytest.mark.parametrize("kind", ["pickapic", "kto"])
def test_dataloader_resume_with_two_workers(kind, shards, tmp_path):
    build, collate = pickapic_factory(shards) if kind == "pickapic" else kto_factory(tmp_path)

    def batches(dataset, n: int) -> list:
        loader = DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collate)
        return list(itertools.islice(loader, n))

    reference = batches(build(), 8)
    assert {r for b in reference for r in b.positions} == {0, 1}
    consumed = 3  # workers alternate: batches 0 and 2 from worker 0, batch 1 from worker 1
    positions = {}
    for batch in reference[:consumed]:
        positions |= batch.positions
    resumed = build()
    resumed.resume_from(positions, role_offset=consumed % 2)
    for got, want in zip(batches(resumed, 5), reference[consumed:], strict=True):
        assert torch.equal(got.pixels, want.pixels)
        assert (got.captions, got.positions) == (want.captions, want.positions)


def test_dataset_and_loader_worker_counts_must_match(shards, monkeypatch):
    # Faked in-process: a real DataLoader whose workers fail at start-up takes 10 s to shut down.
    fake = SimpleNamespace(id=1, num_workers=2)
    monkeypatch.setattr("data.roles.get_worker_info", lambda: fake)
    assert next(iter(pairs(shards, num_workers=2, caption_dropout=0)))["role"] == 1
    with pytest.raises(RuntimeError, match="num_workers=0"):
        iter(pairs(shards))


# ---------------------------------------------------------------- bad input at start-up


def test_missing_paths(tmp_path):
    for source in (
        str(tmp_path / "nowhere"),
        "nowhere/train-0.parquet",
        str(tmp_path / "*.parquet"),
    ):
        with pytest.raises(DataError, match=r"nowhere|\*"):
            pairs(source)
    csv, root = write_kto(tmp_path)
    with pytest.raises(DataError, match=r"missing\.csv"):
        images(str(tmp_path / "missing.csv"), root)
    with pytest.raises(DataError, match="no_root"):
        images(csv, str(tmp_path / "no_root"))


def test_parquet_missing_column(tmp_path):
    path = write_parquet(tmp_path / "x.parquet", pair_rows("a", 6), drop="label_1")
    with pytest.raises(DataError) as error:
        pairs(path)
    assert path in str(error.value) and "label_1" in str(error.value)


def test_parquet_bad_label(tmp_path):
    rows = pair_rows("a", 6)
    rows[4]["label_0"] = 0.3
    path = write_parquet(tmp_path / "x.parquet", rows)
    with pytest.raises(DataError) as error:
        pairs(path)
    message = str(error.value)
    assert path in message and "row 5 (rows numbered from 1)" in message and "label_0" in message
    assert "0.3" in message


def test_parquet_only_ties(tmp_path):
    path = write_parquet(tmp_path / "ties.parquet", [pair_rows("a", 3)[2]] * 4)
    with pytest.raises(DataError, match="ties") as error:
        pairs(path)
    assert path in str(error.value)


def test_fewer_row_groups_than_streams_are_split_into_row_slices(tmp_path):
    # pandas and pyarrow write a small table as one row group; 2 processes x 2 workers read it.
    path = write_parquet(tmp_path / "x.parquet", pair_rows("a", 9), row_group_size=9)
    untied = {f"a-{i}" for i, (l0, l1) in enumerate(LABEL_CYCLE * 3) if l0 != l1}
    seen = []
    for rank in (0, 1):
        dataset = pairs(path, rank=rank, world_size=2, num_workers=2, shuffle=False,
                        caption_dropout=0)  # fmt: skip
        for role in (2 * rank, 2 * rank + 1):
            seen.append({e["caption"] for e in epoch_examples(dataset, role)})
    assert all(seen) and set.union(*seen) == untied
    assert sum(map(len, seen)) == len(untied)  # disjoint: no pair read twice per epoch
    with pytest.raises(DataError, match="rows cannot feed 16") as error:
        pairs(path, world_size=2, num_workers=8)  # 9 rows, 16 streams
    assert path in str(error.value)


def test_kto_missing_column(tmp_path):
    csv, root = write_kto(tmp_path)
    Path(csv).write_text("file_name,text,split\ntrain/0.jpg,a cat,exclusive_win\n")
    with pytest.raises(DataError) as error:
        images(csv, root)
    assert csv in str(error.value) and "caption" in str(error.value)


def test_kto_split_outside_mapping(tmp_path):
    rows = [("train/0.jpg", "a", "exclusive_win"), ("train/1.jpg", "b", "maybe")]
    csv, root = write_kto(tmp_path, rows)
    with pytest.raises(DataError) as error:
        images(csv, root)
    message = str(error.value)
    assert csv in message and "row 2" in message and "split" in message and "'maybe'" in message


@pytest.mark.parametrize("name", ["../x.jpg", "/abs.jpg", "train/../../x.jpg", ""])
def test_kto_file_name_escaping_root(tmp_path, name):
    rows = [("train/0.jpg", "a", "exclusive_win"), (name, "b", "exclusive_lose")]
    csv, root = write_kto(tmp_path, rows)
    with pytest.raises(DataError) as error:
        images(csv, root)
    message = str(error.value)
    assert csv in message and "row 2" in message and "file_name" in message


def test_kto_empty_csv_and_empty_class(tmp_path):
    csv, root = write_kto(tmp_path, [])
    with pytest.raises(DataError, match="no data rows") as error:
        images(csv, root)
    assert csv in str(error.value)
    Path(csv).write_text("")
    with pytest.raises(DataError, match="empty"):
        images(csv, root)
    csv, root = write_kto(tmp_path, [("train/0.jpg", "a", "exclusive_win")])
    halves(WHITE, WHITE).save(Path(root) / "train/0.jpg")
    with pytest.raises(DataError, match="no undesirable rows") as error:
        images(csv, root)
    assert csv in str(error.value)
    assert images(csv, root, desirable_prob=1.0).num_undesirable == 0


def test_kto_nan_caption_becomes_empty(tmp_path):
    csv, root = write_kto(tmp_path)
    Path(csv).write_text("file_name,caption,split\ntrain/0.jpg,,exclusive_win\n")
    dataset = images(csv, root, desirable_prob=1.0, caption_dropout=0.0)
    assert next(dataset.iter_role(0))["caption"] == ""
