"""Turn the config into the data stream and the optimizer (the model side is ``models/``)."""

import torch
from diffusers.optimization import get_scheduler
from torch.utils.data import DataLoader, IterableDataset

from config import TrainConfig
from data import (
    ImageTransform,
    LabeledImages,
    PickapicPairs,
    collate_images,
    collate_pairs,
    parse_split_labels,
)
from losses import LossSpec


def build_dataset(
    config: TrainConfig, spec: LossSpec, rank: int, world_size: int
) -> PickapicPairs | LabeledImages:
    """Pairs for pairwise losses; labelled images (the CSV, or the chosen half of pairs) otherwise.

    Validates the data at start-up: a bad path, column or label stops the run here."""
    transform = ImageTransform(config.resolution, not config.random_crop, config.random_flip)
    common = {
        "transform": transform,
        "caption_dropout": config.caption_dropout,
        "seed": config.seed,
        "rank": rank,
        "world_size": world_size,
        "num_workers": config.dataloader_num_workers,
    }
    if config.csv:
        # A loss without a reference (SFT) learns from desirable images only: draw only those.
        desirable_prob = config.kto_desirable_prob if spec.needs_reference else 1.0
        return LabeledImages(
            config.csv,
            config.images,
            split_labels=parse_split_labels(config.split_labels),
            desirable_prob=desirable_prob,
            **common,
        )
    return PickapicPairs(
        config.data,
        winners_only=not spec.pairwise,
        row_groups_per_block=config.row_groups_per_block,
        hub_split=config.hub_split,
        **common,
    )


def dataset_size(dataset: PickapicPairs | LabeledImages) -> str:
    """For the start-up block: exact counts where the source allows, else 'streaming'."""
    if isinstance(dataset, LabeledImages):
        return (
            f"{dataset.num_images} images ({dataset.num_desirable} desirable, "
            f"{dataset.num_undesirable} undesirable)"
        )
    if dataset.num_pairs is None:
        return "streaming (size unknown)"
    size = f"{dataset.num_pairs} pairs after dropping ties, {dataset.num_row_groups} row groups"
    if dataset.unreadable_files:
        size += f" ({len(dataset.unreadable_files)} unreadable parquet files skipped)"
    return size


def build_dataloader(config: TrainConfig, dataset: IterableDataset) -> DataLoader:
    pairs = isinstance(dataset, PickapicPairs) and not dataset.winners_only
    workers = config.dataloader_num_workers
    return DataLoader(
        dataset,
        batch_size=config.train_batch_size,
        collate_fn=collate_pairs if pairs else collate_images,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
    )


def build_optimizer(
    config: TrainConfig, params: list[torch.nn.Parameter]
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.AdamW(
        params,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        weight_decay=config.weight_decay,
    )
    # Stepped once per optimizer step by the trainer (not prepared by accelerate, which would
    # step it once per process), so warm-up counts optimizer steps exactly.
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_train_steps,
    )
    return optimizer, lr_scheduler
