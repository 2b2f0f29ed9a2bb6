"""Collate examples into the two batch types the trainer consumes.

``positions`` maps each stream role present in the batch to its resume state after the batch's
last example of that role; the trainer merges these dicts over consumed batches and saves them.
"""

from dataclasses import dataclass

import torch

from data.examples import Example


@dataclass
class PairBatch:
    """Diffusion-DPO: B pairs, every chosen image first (the loss splits ``[2B]`` in halves)."""

    pixels: torch.Tensor  # [2B, 3, R, R]: the B chosen images, then the B rejected, same order
    captions: list[str]  # [B], after caption dropout, shared by the two images of a pair
    original_sizes: list[tuple[int, int]]  # [2B], same order as pixels
    crop_top_lefts: list[tuple[int, int]]  # [2B]
    positions: dict[int, list]  # stream role -> resume state after this batch
    skipped: int  # undecodable or missing rows skipped while producing this batch
    rows: list[tuple[int, ...]]  # [B] source row of each example (Example["row"])
    # [B] soft labels: P(chosen preferred) per pair, only from a source asked for them
    labels: torch.Tensor | None = None


@dataclass
class ImageBatch:
    """Diffusion-KTO and SFT: B single images, each with a binary label."""

    pixels: torch.Tensor  # [B, 3, R, R]
    captions: list[str]  # [B]
    labels: torch.Tensor  # [B] float32, 1.0 desirable / 0.0 undesirable
    original_sizes: list[tuple[int, int]]  # [B]
    crop_top_lefts: list[tuple[int, int]]  # [B]
    positions: dict[int, list]
    skipped: int
    rows: list[tuple[int, ...]]  # [B]


def _positions(examples: list[Example]) -> dict[int, list]:
    positions = {}
    for example in examples:  # later examples of a role overwrite earlier ones
        positions[example["role"]] = list(example["state"])
    return positions


def _check_count(examples: list[Example], n: int, kind: str) -> None:
    if not examples:
        raise ValueError(f"cannot collate an empty list of {kind} examples")
    for example in examples:
        if example["pixels"].shape[0] != n:
            raise ValueError(
                f"{kind} examples need {n} image(s) each, got {example['pixels'].shape[0]}"
            )


def collate_pairs(examples: list[Example]) -> PairBatch:
    """B pair examples (pixels [2, 3, R, R]) -> PairBatch with pixels [2B, 3, R, R]."""
    _check_count(examples, 2, "pair")
    chosen = [e["pixels"][0] for e in examples]
    rejected = [e["pixels"][1] for e in examples]
    return PairBatch(
        pixels=torch.stack(chosen + rejected),
        captions=[e["caption"] for e in examples],
        original_sizes=[e["original_sizes"][0] for e in examples]
        + [e["original_sizes"][1] for e in examples],
        crop_top_lefts=[e["crop_top_lefts"][0] for e in examples]
        + [e["crop_top_lefts"][1] for e in examples],
        positions=_positions(examples),
        skipped=sum(e["skipped"] for e in examples),
        rows=[e["row"] for e in examples],
        labels=_soft_labels(examples),
    )


def _soft_labels(examples: list[Example]) -> torch.Tensor | None:
    """[B] float32 when every example carries a label (a source with soft labels on)."""
    if not all("label" in e for e in examples):
        return None
    return torch.tensor([e["label"] for e in examples], dtype=torch.float32)


def collate_images(examples: list[Example]) -> ImageBatch:
    """B image examples (pixels [1, 3, R, R], ``label``) -> ImageBatch with pixels [B, 3, R, R]."""
    _check_count(examples, 1, "image")
    return ImageBatch(
        pixels=torch.cat([e["pixels"] for e in examples]),
        captions=[e["caption"] for e in examples],
        labels=torch.tensor([e["label"] for e in examples], dtype=torch.float32),
        original_sizes=[e["original_sizes"][0] for e in examples],
        crop_top_lefts=[e["crop_top_lefts"][0] for e in examples],
        positions=_positions(examples),
        skipped=sum(e["skipped"] for e in examples),
        rows=[e["row"] for e in examples],
    )
