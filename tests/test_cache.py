"""The latent and text-embedding cache: built once, resumable, deduplicated, and a cached run
trains like an uncached one without loading the VAE or the text encoders."""

import pytest
import torch
from safetensors.torch import load_file

from data import DataError
from data.cache import LATENT_PREFIX, CachedLatentEncoder
from scripts.build_cache import main as build_cache_main
from tests.support import reset_accelerate
from tests.test_train import run
from training.config import parse_config


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """A few pairs (the tiny VAE costs ~50 ms per image at 64 px on 2 cores), laid out like the
    toy data: ``<dir>/pickapic/*.parquet``."""
    from scripts.build_toy_data import make_pair_rows, write_pairs_parquet

    root = tmp_path_factory.mktemp("small-data")
    rows = [row for row in make_pair_rows(16, seed=2) if row["label_0"] != row["label_1"]]
    write_pairs_parquet(root / "pickapic" / "train.parquet", rows[:10], rows_per_group=2)
    return root


def build(model, data, out, *extra):
    return build_cache_main(["--pretrained_model", str(model), "--data", str(data / "pickapic"),
                             "--resolution", "64", "--cache", str(out), *extra])  # fmt: skip


@pytest.fixture(scope="module")
def sdxl_cache(tiny_sdxl_dir, small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "sdxl-64"
    build(tiny_sdxl_dir, small_data, out)
    return out


def latent_entries(directory, prefix=LATENT_PREFIX):
    entries = {}
    for shard in sorted(directory.glob(f"{prefix}*.safetensors")):
        entries.update(load_file(shard))
    return entries


@pytest.mark.parametrize(
    "loss", [("dpo",), ("dspo", "--winner_preserving_mu", "0.2")], ids=["dpo", "dspo-safeguard"]
)
def test_cached_run_equals_uncached_run(loss, tiny_sdxl_dir, small_data, sdxl_cache, tmp_path):
    # Adam with epsilon >> |g| steps along the gradient, so float rounding of the VAE (batched
    # differently when the cache was built) is not blown up to full-size updates.
    # dspo with the safeguard: the per-pixel predictions come from cached latents too.
    common = ("--learning_rate", "0.1", "--adam_epsilon", "1", "--max_train_steps", "2",
              "--time_ids", "original", *loss[1:])  # fmt: skip
    plain = run(tiny_sdxl_dir, small_data, tmp_path / "plain", loss[0], *common)
    reset_accelerate()
    cached = run(tiny_sdxl_dir, small_data, tmp_path / "cached", loss[0], *common,
                 "--cache", str(sdxl_cache))  # fmt: skip
    assert isinstance(cached.models.latent_encoder, CachedLatentEncoder)
    assert cached.models.family.text_encoders == []  # neither the VAE nor text encoders loaded
    assert abs(plain.history[1]["loss"] - plain.history[0]["loss"]) > 1e-3  # training moved
    for a, b in zip(plain.history, cached.history, strict=True):
        assert a["err/policy"] == pytest.approx(b["err/policy"], rel=1e-5)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
    base = torch.cat([p.detach().flatten() for p in plain.models.reference.parameters()])
    plain_update, cached_update = (
        torch.cat([p.detach().flatten() for p in r.models.policy.parameters()]) - base
        for r in (plain, cached)
    )
    assert (plain_update - cached_update).abs().max() < 1e-2 * plain_update.abs().mean()


def test_build_deduplicates_and_resumes_after_an_interruption(tiny_sd15_dir, small_data,
                                                              tmp_path):  # fmt: skip
    out = tmp_path / "cache"
    first = build(tiny_sd15_dir, small_data, out, "--entries_per_shard", "4")
    assert first.duplicate_images > 0  # the toy data reuses images across pairs
    assert first.captions_encoded > 1  # every distinct caption, plus ""
    complete = latent_entries(out)
    assert len(complete) == 4 * first.images_encoded  # mean and std, both flips, per image
    shards = sorted(out.glob(f"{LATENT_PREFIX}*.safetensors"))
    lost = len(load_file(shards[-1])) // 4
    shards[-1].unlink()  # as if the build had been killed while writing its last shard
    second = build(tiny_sd15_dir, small_data, out, "--entries_per_shard", "4")
    assert second.images_encoded == lost
    assert second.images_already_cached == first.images_encoded - lost
    assert second.captions_encoded == 0
    rebuilt = latent_entries(out)
    assert rebuilt.keys() == complete.keys()
    for name, tensor in complete.items():
        torch.testing.assert_close(rebuilt[name], tensor, rtol=1e-5, atol=1e-6)


def test_a_mismatched_cache_stops_the_run_at_startup(tiny_sdxl_dir, small_data, sdxl_cache,
                                                     tmp_path):  # fmt: skip
    with pytest.raises(ValueError, match="--random_crop cannot be cached"):
        parse_config(["--cache", str(sdxl_cache), "--random_crop", "true"])
    with pytest.raises(DataError, match="resolution"):
        run(tiny_sdxl_dir, small_data, tmp_path / "out", "dpo", "--cache", str(sdxl_cache),
            "--resolution", "32")  # fmt: skip


def test_kto_csv_cache_trains_like_the_images(tiny_sd15_dir, toy_data_dir, tmp_path):
    """The per-image CSV source caches too: a cached KTO run sees the same latents."""
    import pandas as pd

    table = pd.read_csv(toy_data_dir / "kto" / "train_processed_v3.csv")
    small = pd.concat([table[table.split == s].head(3) for s in table.split.unique()])
    csv = tmp_path / "small.csv"
    small.to_csv(csv, index=False)
    images = str(toy_data_dir / "kto")
    source = ("--loss", "kto", "--csv", str(csv), "--images", images)
    cache = str(tmp_path / "cache")
    stats = build_cache_main(["--pretrained_model", str(tiny_sd15_dir), *source,
                              "--resolution", "64", "--cache", cache])  # fmt: skip
    assert stats.images_encoded == len(small)
    common = ("--learning_rate", "0.1", "--adam_epsilon", "1", "--train_batch_size", "4",
              "--csv", str(csv))  # fmt: skip
    plain = run(tiny_sd15_dir, toy_data_dir, tmp_path / "plain", "kto", *common)
    reset_accelerate()
    cached = run(tiny_sd15_dir, toy_data_dir, tmp_path / "cached", "kto", *common,
                 "--cache", cache)  # fmt: skip
    assert isinstance(cached.models.latent_encoder, CachedLatentEncoder)
    for a, b in zip(plain.history, cached.history, strict=True):
        assert a["err/policy"] == pytest.approx(b["err/policy"], rel=1e-5)


def test_validation_with_the_cache_loads_its_own_vae_and_text_encoders(
    tiny_sdxl_dir, small_data, sdxl_cache, tmp_path
):
    import numpy as np
    from PIL import Image

    val = ("--max_train_steps", "1", "--validation_prompt", "a red circle",
           "--validation_images", "2", "--validation_inference_steps", "2")  # fmt: skip
    plain = run(tiny_sdxl_dir, small_data, tmp_path / "plain", "dpo", *val)
    reset_accelerate()
    cached = run(tiny_sdxl_dir, small_data, tmp_path / "cached", "dpo", *val,
                 "--cache", str(sdxl_cache))  # fmt: skip
    assert cached.models.family.text_encoders == []  # training itself still loads none
    assert [v.step for v in cached.validation] == [0, 1]
    grids = [np.asarray(Image.open(r.validation[0].grid)) for r in (plain, cached)]
    assert np.array_equal(*grids)  # step 0: the same policy, VAE and text encoders
