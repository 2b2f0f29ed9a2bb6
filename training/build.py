"""Turn the config into the data stream and the optimizer (the model side is ``models/``)."""

import torch
from diffusers.optimization import get_scheduler
from torch.utils.data import DataLoader, IterableDataset

from data.batches import collate_images, collate_pairs
from data.cache import (
    CachedImageTransform,
    cache_identity,
    check_manifest,
    check_prompt_cache,
    text_cache_identity,
)
from data.columns import parse_columns
from data.examples import PairOptions
from data.kto_csv import LabeledImages, parse_split_labels
from data.pair_table import PairTable, load_manifest, load_pair_dirs
from data.pickapic import PickapicPairs
from data.prompts import PromptStream, collate_prompts, load_prompts, report_bad_lines
from data.roles import StreamSettings
from data.table_pairs import TablePairs
from data.transforms import ImageTransform
from losses import LossSpec
from training.config import TrainConfig

Dataset = PickapicPairs | TablePairs | LabeledImages | PromptStream


def build_dataset(config: TrainConfig, spec: LossSpec, rank: int, world_size: int) -> Dataset:
    """Pairs for pairwise losses; labelled images (the CSV, or the chosen half of pairs) otherwise.

    Validates the data at start-up: a bad path, column or label stops the run here. Online
    losses read prompts (``--prompts``) instead, and a ``--cache`` is checked to hold their text
    features."""
    if spec.online is not None:
        table = load_prompts(config.prompts)
        if rank == 0:
            report_bad_lines(table)
        if config.cache:  # the prompts' text features (build_cache.py --prompts), checked now
            identity = text_cache_identity(config.pretrained_model, config.revision,
                                           config.variant)  # fmt: skip
            check_prompt_cache(config.cache, identity, table, config.guidance_scale != 1.0)
        return PromptStream(table, config.seed, rank, world_size, config.dataloader_num_workers)
    if config.cache:  # cached posterior moments stand in for pixels (data/cache.py)
        identity = cache_identity(config.pretrained_model, config.pretrained_vae,
                                  config.revision, config.variant, config.resolution)  # fmt: skip
        check_manifest(config.cache, identity, needs_flips=config.random_flip)
        transform = CachedImageTransform(config.cache, config.resolution, config.random_flip)
    else:
        transform = ImageTransform(config.resolution, not config.random_crop, config.random_flip)
    settings = StreamSettings(
        transform,
        caption_dropout=config.caption_dropout,
        seed=config.seed,
        rank=rank,
        world_size=world_size,
        num_workers=config.dataloader_num_workers,
    )
    if config.csv:
        # A loss without a reference (SFT) learns from desirable images only: draw only those.
        desirable_prob = config.kto_desirable_prob if spec.needs_reference else 1.0
        return LabeledImages(
            config.csv,
            config.images,
            settings,
            split_labels=parse_split_labels(config.split_labels),
            desirable_prob=desirable_prob,
        )
    pairs = PairOptions(winners_only=not spec.pairwise, soft_labels=config.soft_labels)
    if config.pairs or config.pairs_dirs:
        return TablePairs(load_pair_table(config), settings, pairs)
    return PickapicPairs(
        config.data,
        settings,
        pairs,
        row_groups_per_block=config.row_groups_per_block,
        hub_split=config.hub_split,
        columns=parse_columns(config.columns),
    )


def load_pair_table(config: TrainConfig) -> PairTable:
    """Your own pairs: ``--pairs`` + ``--images``, or ``--pairs_dirs W,L`` (+ ``--captions``)."""
    if config.pairs:
        return load_manifest(config.pairs, config.images)
    chosen, rejected = config.pairs_dirs.split(",")
    return load_pair_dirs(chosen, rejected, config.captions)


def dataset_size(dataset: Dataset) -> str:
    """For the start-up block: exact counts where the source allows, else 'streaming'."""
    if isinstance(dataset, LabeledImages):
        return (
            f"{dataset.num_images} images ({dataset.num_desirable} desirable, "
            f"{dataset.num_undesirable} undesirable)"
        )
    if isinstance(dataset, TablePairs):
        return f"{dataset.num_pairs} pairs from {dataset.table.source}"
    if isinstance(dataset, PromptStream):
        bad = dataset.table.bad_lines
        skipped = f" ({len(bad)} bad lines skipped, see the warnings)" if bad else ""
        return f"{dataset.num_prompts} prompts from {dataset.table.source}{skipped}"
    if dataset.num_pairs is None:
        return "streaming (size unknown)"
    size = f"{dataset.num_pairs} pairs after dropping ties, {dataset.num_row_groups} row groups"
    if dataset.unreadable_files:
        size += f" ({len(dataset.unreadable_files)} unreadable parquet files skipped)"
    return size


def build_dataloader(config: TrainConfig, dataset: IterableDataset) -> DataLoader:
    pairs = isinstance(dataset, PickapicPairs | TablePairs) and not dataset.pairs.winners_only
    collate = collate_pairs if pairs else collate_images
    workers = config.dataloader_num_workers
    return DataLoader(
        dataset,
        batch_size=config.train_batch_size,
        collate_fn=collate_prompts if isinstance(dataset, PromptStream) else collate,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
    )


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW, 8-bit AdamW (bitsandbytes: optimizer state in 8 bits, ~4x less than fp32 Adam's
    two moments) or Adafactor (factored second moment, no first moment by default)."""
    adam = {
        "lr": config.learning_rate,
        "betas": (config.adam_beta1, config.adam_beta2),
        "eps": config.adam_epsilon,
        "weight_decay": config.weight_decay,
    }
    if config.optimizer == "adamw":
        # The fused kernel updates every tensor in one multithreaded pass (CPU and CUDA); the
        # default for-each loop was about half of a full SD1.5 step on CPU.
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.AdamW(params, **adam, fused=fused)
    if config.optimizer == "adamw8bit":
        import bitsandbytes  # optional extra (requirements-8bit.txt); checked by validate()

        return bitsandbytes.optim.AdamW8bit(params, **adam)
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed learning rate driven by our scheduler, not Adafactor's relative step size.
        return Adafactor(
            params,
            lr=config.learning_rate,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
            weight_decay=config.weight_decay,
        )
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


def build_optimizer(
    config: TrainConfig, params: list[torch.nn.Parameter]
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = make_optimizer(config, [p for p in params if p.requires_grad])
    # Stepped once per optimizer step by the trainer (not prepared by accelerate, which would
    # step it once per process), so warm-up counts optimizer steps exactly.
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_train_steps,
    )
    return optimizer, lr_scheduler
