"""The offline builders: real CLIP tokenizer, tiny SD1.5 / SDXL pipelines, toy preference data."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from scripts.atomic_dir import atomic_directory
from scripts.build_toy_data import (
    COLOURS,
    KTO_CSV,
    KTO_SPLITS,
    SIZES,
    build_toy_data,
    encode_jpeg,
    write_pairs_parquet,
)
from scripts.clip_tokenizer import (
    CHECK_IDS,
    byte_symbols,
    default_tokenizer_cache,
    ensure_clip_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]


# --- CLIP tokenizer ---


def test_byte_symbols_are_printable_and_unique() -> None:
    symbols = byte_symbols()
    assert len(symbols) == len(set(symbols)) == 256
    assert not any(s.isspace() or not s.isprintable() for s in symbols)
    assert symbols[0] == "!"  # token id 0, as in SD's vocab.json


@pytest.fixture(scope="module")
def clip_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(ensure_clip_tokenizer(default_tokenizer_cache()))


def test_tokenizer_matches_sd_ids(clip_tokenizer) -> None:
    assert len(clip_tokenizer) == 49408
    assert clip_tokenizer("a photo of a cat").input_ids == CHECK_IDS
    astronaut = [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]
    assert clip_tokenizer("a photograph of an astronaut riding a horse").input_ids == astronaut


def test_tokenizer_pads_and_truncates_like_sd(clip_tokenizer) -> None:
    ids = clip_tokenizer(
        ["a photo of a cat", "cat " * 100],
        padding="max_length",
        max_length=clip_tokenizer.model_max_length,
        truncation=True,
    ).input_ids
    assert clip_tokenizer.model_max_length == 77
    assert ids[0] == CHECK_IDS + [49407] * (77 - len(CHECK_IDS))  # SD1.5 pads with eos
    assert len(ids[1]) == 77 and ids[1][0] == 49406 and ids[1][-1] == 49407


def test_ensure_clip_tokenizer_reuses_cache() -> None:
    cache = default_tokenizer_cache()
    ensure_clip_tokenizer(cache)
    mtime = (cache / "tokenizer.json").stat().st_mtime_ns
    assert ensure_clip_tokenizer(cache) == cache
    assert (cache / "tokenizer.json").stat().st_mtime_ns == mtime


# --- Tiny models ---


@pytest.fixture(params=["sd15", "sdxl"])
def tiny_model(request: pytest.FixtureRequest) -> tuple[str, Path]:
    return request.param, request.getfixturevalue(f"tiny_{request.param}_dir")


def test_tiny_model_components_load(tiny_model: tuple[str, Path]) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    family, path = tiny_model
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder")]
    tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")]
    if family == "sdxl":
        encoders.append(
            CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2")
        )
        tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"))
        assert tokenizers[1].pad_token_id == 0  # SDXL's second tokenizer pads with "!"
    assert sum(e.config.hidden_size for e in encoders) == unet.config.cross_attention_dim
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.prediction_type == "epsilon"

    latents = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert (
        latents.shape
        == (1, 4, 8, 8)
        == (1, unet.config.in_channels, *[unet.config.sample_size] * 2)
    )
    for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
        assert tokenizer.model_max_length == 77
        assert encoder.config.eos_token_id == tokenizer.eos_token_id == 49407
        ids = tokenizer(["a photo of a cat"], padding="max_length", return_tensors="pt").input_ids
        out = encoder(ids)
        # The pooled state is the one at the first eos; a wrong eos_token_id picks another token.
        hidden = out.last_hidden_state[0, len(CHECK_IDS) - 1]
        if family == "sdxl" and encoder is encoders[1]:
            torch.testing.assert_close(out.text_embeds[0], encoder.text_projection(hidden))
        else:
            torch.testing.assert_close(out.pooler_output[0], hidden)


def test_tiny_pipeline_generates_64px(tiny_model: tuple[str, Path]) -> None:
    from diffusers import DiffusionPipeline

    _, path = tiny_model
    pipe = DiffusionPipeline.from_pretrained(path)
    images = pipe(
        ["a red circle on a white background"],
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    ).images
    assert len(images) == 1 and images[0].size == (64, 64)
    assert np.asarray(images[0]).std() > 0


def test_tiny_build_is_deterministic(tmp_path: Path, tiny_sd15_dir: Path) -> None:
    from diffusers import UNet2DConditionModel

    from scripts.build_tiny_model import build_tiny_model

    def unet_state(path: Path) -> dict[str, torch.Tensor]:
        return UNet2DConditionModel.from_pretrained(path, subfolder="unet").state_dict()

    first = unet_state(tiny_sd15_dir)
    again = unet_state(build_tiny_model(tmp_path / "again", seed=0))
    other = unet_state(build_tiny_model(tmp_path / "other", seed=1, prediction_type="v_prediction"))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    assert '"v_prediction"' in (tmp_path / "other/scheduler/scheduler_config.json").read_text()


# --- Toy data ---


def read_pairs(data_dir: Path) -> pd.DataFrame:
    files = sorted((data_dir / "pickapic").glob("train-*.parquet"))
    return pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)


def test_toy_parquet_schema_and_row_groups(toy_data_dir: Path) -> None:
    files = sorted((toy_data_dir / "pickapic").glob("train-*.parquet"))
    assert [f.name for f in files] == [
        "train-00000-of-00002.parquet",
        "train-00001-of-00002.parquet",
    ]
    expected = {
        "caption": pa.string(),
        "jpg_0": pa.binary(),
        "jpg_1": pa.binary(),
        "label_0": pa.float64(),
        "label_1": pa.float64(),
        "image_0_uid": pa.string(),
        "image_1_uid": pa.string(),
    }
    for f in files:
        meta = pq.ParquetFile(f)
        assert dict(zip(meta.schema_arrow.names, meta.schema_arrow.types, strict=True)) == expected
        assert meta.metadata.num_rows == 128 and meta.num_row_groups == 8


def test_toy_labels_ties_and_signal(toy_data_dir: Path) -> None:
    df = read_pairs(toy_data_dir)
    labels = set(zip(df.label_0, df.label_1, strict=True))
    assert labels == {(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)}
    assert 0.05 < (df.label_0 == 0.5).mean() < 0.2
    assert 0.3 < (df.label_0 == 1.0).mean() < 0.7  # winners on both sides

    def shows_caption_colour(jpeg: bytes, caption: str) -> bool:
        pixels = np.asarray(Image.open(io.BytesIO(jpeg)), dtype=np.float32)
        colour = next(c for name, c in COLOURS.items() if f" {name} " in caption)
        return bool((np.linalg.norm(pixels - colour, axis=-1) < 40).sum() > 50)

    # An image with the caption's colour never loses to one without it (the labelling rule).
    for row in df[df.label_0 != 0.5].itertuples():
        winner, loser = (row.jpg_0, row.jpg_1) if row.label_0 == 1.0 else (row.jpg_1, row.jpg_0)
        assert shows_caption_colour(winner, row.caption) >= shows_caption_colour(loser, row.caption)


def test_toy_images_decode_at_varied_sizes(toy_data_dir: Path) -> None:
    df = read_pairs(toy_data_dir)
    sizes = set()
    for jpeg in [*df.jpg_0, *df.jpg_1]:
        image = Image.open(io.BytesIO(jpeg))
        image.load()
        assert image.format == "JPEG" and image.mode == "RGB"
        sizes.add(image.size)
    assert sizes == set(SIZES)


def test_toy_kto_splits_match_pairs(toy_data_dir: Path) -> None:
    df = read_pairs(toy_data_dir)
    kto = pd.read_csv(toy_data_dir / "kto" / KTO_CSV)
    assert list(kto.columns) == ["file_name", "caption", "split"]

    # Recompute each image's record from the pairs: wins and losses, ties ignored.
    decided = df[df.label_0 != df.label_1]
    win_0 = decided.label_0 > decided.label_1
    winners = pd.concat([decided.image_0_uid[win_0], decided.image_1_uid[~win_0]])
    losers = pd.concat([decided.image_1_uid[win_0], decided.image_0_uid[~win_0]])
    expected = {}
    for uid in set(winners) | set(losers):
        won, lost = uid in set(winners), uid in set(losers)
        expected[uid] = (
            "intersections" if won and lost else ("exclusive_win" if won else "exclusive_lose")
        )

    got = dict(
        zip(
            kto.file_name.str.removeprefix("train/").str.removesuffix(".jpg"),
            kto.split,
            strict=True,
        )
    )
    assert got == expected
    assert set(kto.split) == set(KTO_SPLITS)

    captions = dict(zip(df.image_0_uid, df.caption, strict=True)) | dict(
        zip(df.image_1_uid, df.caption, strict=True)
    )
    jpegs = dict(zip(df.image_0_uid, df.jpg_0, strict=True)) | dict(
        zip(df.image_1_uid, df.jpg_1, strict=True)
    )
    for row in kto.itertuples():
        uid = row.file_name.removeprefix("train/").removesuffix(".jpg")
        assert row.caption == captions[uid]
        assert (toy_data_dir / "kto" / row.file_name).read_bytes() == jpegs[uid]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_toy_data_rebuild_is_byte_identical(tmp_path: Path, toy_data_dir: Path) -> None:
    build_toy_data(tmp_path / "again", seed=0)
    build_toy_data(tmp_path / "other", seed=1)
    reference = tree_bytes(toy_data_dir)
    assert tree_bytes(tmp_path / "again") == reference
    assert tree_bytes(tmp_path / "other") != reference
    assert sum(len(b) for b in reference.values()) < 2_000_000


def test_write_pairs_parquet_casts_and_groups(tmp_path: Path) -> None:
    jpeg = encode_jpeg(Image.new("RGB", (8, 8), (255, 0, 0)))
    rows = [
        {"caption": f"c{i}", "jpg_0": jpeg, "jpg_1": jpeg, "label_0": 1, "label_1": 0}
        for i in range(5)
    ]
    write_pairs_parquet(tmp_path / "a.parquet", rows, rows_per_group=2)
    meta = pq.ParquetFile(tmp_path / "a.parquet")
    assert meta.num_row_groups == 3
    assert meta.schema_arrow.field("label_0").type == pa.float64()
    write_pairs_parquet(tmp_path / "empty.parquet", [], rows_per_group=2)
    assert pq.read_table(tmp_path / "empty.parquet").num_rows == 0


def test_atomic_directory_replaces_or_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_directory(out) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError
    assert (out / "a").read_text() == "1"
    with atomic_directory(out) as tmp:
        (tmp / "b").write_text("3")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["b"]


def test_toy_data_cli_skips_existing(tmp_path: Path) -> None:
    cmd = [sys.executable, str(REPO / "scripts/build_toy_data.py"), "--out", str(tmp_path / "d")]
    first = subprocess.run([*cmd, "--pairs", "8"], capture_output=True, text=True, check=True)
    again = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "built 8" in first.stdout and "already" in again.stdout
