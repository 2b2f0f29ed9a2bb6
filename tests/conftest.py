"""Shared pytest fixtures. Each section is owned by the module named in its header."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

# Tests never reach a model hub; set before anything imports huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# --- Tiny models and toy data (scripts/build_tiny_model.py, scripts/build_toy_data.py) ---
# The CLIP tokenizer is cached in $PREFDIFF_TOKENIZER_CACHE (default build/clip-tokenizer).
# Builders are imported inside the fixtures so only tests that use them pay for diffusers' import.


def _tiny_model_fixture(family: str) -> Any:
    """A session fixture ``tiny_<family>_dir``: a tiny random pipeline of ``family`` in diffusers
    format (seed 0; epsilon for the UNets)."""

    @pytest.fixture(scope="session", name=f"tiny_{family}_dir")
    def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
        """A tiny random pipeline in diffusers format (seed 0), built once per session."""
        from scripts.build_tiny_model import build_tiny_model

        return build_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}") / "model", family)

    return tiny_model_dir


# SD1.5 (UNet, CLIP), SDXL (two CLIPs, pooled embedding, time_ids), SD3.5 (MMDiT, CLIP-L/G + T5,
# 16-channel VAE), Flux.1-dev (guidance-distilled, CLIP-L + T5).
tiny_sd15_dir = _tiny_model_fixture("sd15")
tiny_sdxl_dir = _tiny_model_fixture("sdxl")
tiny_sd3_dir = _tiny_model_fixture("sd3")
tiny_flux_dir = _tiny_model_fixture("flux")


@pytest.fixture(scope="session")
def toy_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Toy Pick-a-Pic data: pickapic/train-*.parquet and kto/train_processed_v3.csv + images."""
    from scripts.build_toy_data import build_toy_data

    out = tmp_path_factory.mktemp("toy-data") / "data"
    build_toy_data(out)
    return out


# --- accelerate state: every test starts and ends without an Accelerator's singletons ---


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from tests.support import reset_accelerate

    reset_accelerate()
    yield
    reset_accelerate()


# --- Hub datasets, offline (data/pickapic_hub.py, data/hub_chunks.py) ---


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """``register(name, shard, image_columns=())``: afterwards ``datasets.load_dataset(name,
    streaming=True)`` reads ``shard`` by name. The hub is unreachable (offline), so datasets falls
    back to the latest cached version in its cache, which this fills from the shard as a first,
    online load would; ``image_columns`` become hub ``Image`` features."""
    import shutil

    import datasets
    import pyarrow.parquet as pq
    from datasets.packaged_modules.parquet.parquet import Parquet

    cache = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)

    def register(name: str, shard: Path, image_columns=()) -> None:
        owner, dataset = name.split("/")
        features = datasets.Features.from_arrow_schema(pq.read_schema(shard))
        for column in image_columns:
            features[column] = datasets.Image()
        builder = Parquet(
            cache_dir=str(cache / ".build"),
            dataset_name=dataset,
            hash="0" * 16,
            config_id="default",
            data_files={"train": [str(shard)]},
            features=features,
        )
        builder.download_and_prepare()
        shutil.move(cache / ".build" / dataset, cache / f"{owner}___{dataset}")

    return register
