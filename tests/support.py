"""Helpers shared by the test modules."""

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from data.examples import PairOptions
from data.roles import StreamSettings
from data.transforms import ImageTransform

# A one-layer transformer of width 32: each tower (text, vision) of the tiny scorer models.
TINY_TOWER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
}


def reset_accelerate() -> None:
    """Each in-process training run builds its own Accelerator; accelerate keeps singletons."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def stream_kwargs(default_transform: ImageTransform, /, **kwargs: Any) -> dict[str, Any]:
    """A data stream's keyword arguments from flat names: StreamSettings' fields (the transform
    ``default_transform`` unless named) become ``settings``, PairOptions' become ``pairs``, the
    rest stay."""

    def take(cls: type) -> dict[str, Any]:
        return {f.name: kwargs.pop(f.name) for f in dataclasses.fields(cls) if f.name in kwargs}

    settings = StreamSettings(**{"transform": default_transform, **take(StreamSettings)})
    pairs = take(PairOptions)
    return {"settings": settings, **kwargs, **({"pairs": PairOptions(**pairs)} if pairs else {})}


@contextlib.contextmanager
def one_thread_per_rank(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Two launched ranks on two cores without oversubscription: OMP_NUM_THREADS=1 for the
    launched processes and one torch thread in this one, its thread count restored after."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def end_wandb_session() -> None:
    """wandb keeps one session per process and then ignores changed WANDB_* variables."""
    import wandb

    wandb.teardown()


def save_tiny_clip(out: Path, projection_dim: int) -> Path:
    """A random CLIPModel (seed 0) with tiny towers, 32 px images and the real CLIP tokenizer,
    saved with its processor to ``out``; ``projection_dim`` is the embedding size scorers read."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    from scripts.clip_tokenizer import default_tokenizer_cache, ensure_clip_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            **TINY_TOWER,
            "vocab_size": 49408,
            "max_position_embeddings": 77,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
        },
        vision_config={**TINY_TOWER, "image_size": 32, "patch_size": 8},
        projection_dim=projection_dim,
    )
    CLIPModel(config).save_pretrained(out)
    tokenizer = CLIPTokenizer.from_pretrained(ensure_clip_tokenizer(default_tokenizer_cache()))
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out
