"""The one training config: defaults, help text, validation and the command line.

Every field is a ``--flag`` of ``train.py`` with the field's help text. The model defaults to
the shipped toy base; the data has no default (a run names what it trains on: ``--data``,
``--csv``, ``--pairs`` or ``--pairs_dirs``); the ``exps/*.sh`` scripts set published settings.
"""

import argparse
import dataclasses
import importlib.util
import json
import math
import platform
import subprocess
import sys
import types
import typing
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from common.cli import Parser, UsageError
from diffusion.flow_matching import TIMESTEP_SAMPLINGS
from losses import get_spec, loss_names, unused_options
from losses.online import SDE_TYPES
from losses.registry import BETA_OPTION, OptionField, option_fields
from models.modes import EMPTY_PROMPT_MODES, TIME_IDS_MODES
from training.hub import hub_problems
from training.validation_checks import validation_problems

REPO_ROOT = Path(__file__).resolve().parents[1]
# The shipped toy base (scripts/train_toy_base.py).
EMBEDDED_MODEL = REPO_ROOT / "assets" / "toy-sd15"

# Released Diffusion-KTO trainer: images labelled by their Pick-a-Pic comparison record.
DEFAULT_SPLIT_LABELS = "exclusive_win=1,intersections=1,exclusive_lose=0"
# Diffusion-KTO paper: each drawn sample is desirable with probability gamma = 0.8 (best).
KTO_DESIRABLE_PROB = 0.8
# Both released trainers replace the caption by "" with probability 0.2 (classifier-free guidance).
CAPTION_DROPOUT = 0.2

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")
# Online methods: advantages normalised by the std of the whole collection (Flow-GRPO's and
# DiffusionNFT's global_std) or of each prompt's group (DDPO's per-prompt tracker).
ADVANTAGE_STDS = ("global", "group")
# grpo's SDE window: its start drawn per collection (Flow-GRPO-Fast, scripts/train_sd3_fast.py) or
# sliding from the range's start (MixGRPO, fastvideo/utils/grpo_states.py "progressive").
WINDOW_SCHEDULES = ("random", "progressive")
# MixGRPO's released progressive window (scripts/finetune/finetune_flux_grpo_MixGRPO.sh at e5cdd6a):
# it moves by prog_overlap_step = 1 every iters_per_group = 25 iterations (= collections here).
MIXGRPO_WINDOW_SHIFT = 1
MIXGRPO_WINDOW_EVERY = 25
# grpo's trained steps: the first ones in order (Flow-GRPO, DDPO) or, per image, a shuffled subset
# of the steps before the last (DanceGRPO fastvideo/train_grpo_flux.py, --ignore_last).
TRAINED_STEP_ORDERS = ("first", "shuffled")

LIBRARIES = (
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "datasets",
    "peft",
    "safetensors",
    "bitsandbytes",
)


def arg(default: Any, help: str, **extra: Any) -> Any:
    """A config field with its help text (shown by ``train.py --help``)."""
    return field(default=default, metadata={"help": help, **extra})


def unset(help: str) -> Any:
    """An optional text field (a path, a name): None unless the flag is given."""
    return arg(None, help)


@dataclass
class _Settings:
    """The run's settings except the losses' own options (added from the registry below)."""

    # Model
    pretrained_model: str = arg(
        str(EMBEDDED_MODEL), "diffusers-format model: local directory or hub name"
    )
    revision: str | None = unset("hub revision of --pretrained_model")
    variant: str | None = unset("weight variant to load, e.g. fp16")
    reference_model: str | None = unset(
        "frozen reference UNet's model (default: the same weights as --pretrained_model)"
    )
    pretrained_vae: str | None = unset(
        "a separate VAE (directory or hub name), e.g. madebyollin/sdxl-vae-fp16-fix for SDXL"
    )
    time_ids: str = arg(
        "constant",
        "SDXL time_ids: 'constant' (R, R, 0, 0, R, R) as the released code, or 'original' "
        "(true original size and crop of each image, then R, R); ignored by SD1.5",
        choices=list(TIME_IDS_MODES),
    )

    # LoRA (peft): 0 = full fine-tuning. The reference is then the same UNet, adapters disabled.
    lora_rank: int = arg(0, "LoRA rank on the UNet (0: full fine-tuning)")
    lora_alpha: float | None = arg(None, "LoRA alpha (default: the rank, i.e. scale 1)")
    lora_target_modules: str = arg(
        "to_q,to_k,to_v,to_out.0", "comma-separated UNet module names that get LoRA adapters"
    )
    lora_dropout: float = arg(0.0, "dropout on the LoRA branch")

    # Loss
    loss: str = arg(
        "dpo",
        "preference loss (README: the loss table): "
        + "; ".join(f"{name}: {get_spec(name).help}" for name in loss_names()),
        choices=loss_names(),
    )
    beta: float | None = arg(
        None,
        f"{BETA_OPTION.help} (default: the loss's released value: "
        + ", ".join(
            f"{name} {get_spec(name).hyperparameters['beta']:g}"
            for name in loss_names()
            if "beta" in get_spec(name).hyperparameters
        )
        + ")",
    )
    # Each loss's own options (losses/: its registry entry) join here, after --beta: see
    # ``_with_loss_options`` below.

    # Online methods (--loss grpo, nft): prompts and a reward instead of data (training/online.py)
    prompts: str | None = unset(
        'online losses: prompt file, one prompt per line, or JSONL (.jsonl) with a "prompt" '
        "key and any metadata a reward reads",
    )
    reward: list[str] = field(  # repeat=True: one flag per value
        default_factory=list,
        metadata={
            "help": "online losses: a reward, NAME or NAME=PATH of evaluation/scorers.py "
            "(repeatable; summed with --reward_weights)",
            "repeat": True,
        },
    )
    reward_weights: str | None = unset("weights of the --reward flags, comma-separated")
    reward_url: str | None = unset(
        "online losses: a reward server's URL, instead of scoring in this process"
    )
    reward_device: str | None = unset(
        "device of in-process reward models (default: the training device)"
    )
    group_size: int = arg(8, "online: images sampled per prompt (advantages are per group)")
    sampling_steps: int = arg(10, "online: sampler steps per image (Flow-GRPO: 10)")
    noise_level: float | None = arg(
        None,
        "online: sampler noise, flow models' a (Flow-GRPO 0.7) or SD1.5 / SDXL's DDIM eta (DDPO "
        "1.0); default: those for grpo, 0 (deterministic sampling) for nft",
    )
    sde_type: str = arg(
        "sde",
        "online, flow models: the stochastic step: sde (Flow-GRPO), dance (DanceGRPO, s = a), "
        "cps (coefficients-preserving)",
        choices=list(SDE_TYPES),
    )
    guidance_scale: float = arg(
        1.0,
        "online: classifier-free guidance while sampling (grpo also trains the guided output); "
        "1: conditional only",
    )
    trained_steps_fraction: float = arg(
        0.99,
        "online: grpo trains the first int(steps x this) sampler steps (Flow-GRPO 0.99, DDPO "
        "1.0), or with --trained_steps_order shuffled int((steps - 1) x this) of each image's "
        "(DanceGRPO 0.6); nft trains as many of each image's shuffled timesteps",
    )
    sde_window_size: int = arg(
        0,
        "grpo: noise and training only in a window of this many steps, deterministic elsewhere "
        "(Flow-GRPO-Fast 3, MixGRPO 4); 0: every step",
    )
    sde_window_range: str | None = unset(
        "grpo: LO,HI: the window lies in steps LO .. HI - 1 (random: its start drawn in LO .. "
        "HI - size; progressive: its end clipped at HI) (default: 0,sampling_steps-1)"
    )  # fmt: skip
    sde_window_schedule: str = arg(
        "random",
        "grpo: how the --sde_window_size window moves: random (Flow-GRPO-Fast: its start drawn "
        "per collection) or progressive (MixGRPO: it starts at LO and moves by "
        "--sde_window_shift every --sde_window_every collections, back to LO once past HI - 1)",
        choices=list(WINDOW_SCHEDULES),
    )
    sde_window_shift: int = arg(
        MIXGRPO_WINDOW_SHIFT, "grpo, progressive window: steps it moves by (MixGRPO: 1)"
    )
    sde_window_every: int = arg(
        MIXGRPO_WINDOW_EVERY,
        "grpo, progressive window: collections between two moves (MixGRPO: 25 iterations)",
    )
    trained_steps_order: str = arg(
        "first",
        "grpo: which sampler steps train: first (the first int(steps x "
        "--trained_steps_fraction), in order: Flow-GRPO, DDPO) or shuffled (DanceGRPO: per "
        "image int((steps - 1) x fraction) of the steps before the last, in a seeded random "
        "order)",
        choices=list(TRAINED_STEP_ORDERS),
    )
    filter_zero_advantages: bool = arg(
        False,
        "grpo: leave samples whose advantage is exactly 0 (groups with equal rewards) out of "
        "training, their KL term included (Flow-GRPO); each optimizer step averages over the "
        "samples it keeps",
    )
    share_initial_noise: bool = arg(
        False, "online: a prompt's images share their initial noise (SDE noise stays per image)"
    )
    advantage_std: str = arg(
        "global",
        "online: advantages are (r - group mean) / std, the std of the whole collection "
        "(Flow-GRPO, DiffusionNFT) or of each group (DDPO)",
        choices=list(ADVANTAGE_STDS),
    )
    collect_batches: int | None = arg(
        None,
        "online: prompt batches (--train_batch_size prompts x --group_size images each) sampled "
        "per process per collection (default: --gradient_accumulation_steps: one optimizer step "
        "per collection)",
    )
    inner_epochs: int = arg(1, "online: passes over each collection (Flow-GRPO: 1)")
    kl_coef: float | None = arg(
        None,
        "online: weight of the KL to the reference (default: grpo 0.04 (Flow-GRPO), nft 1e-4 "
        "(DiffusionNFT)); 0: no reference model is loaded",
    )

    # Data
    data: str | None = unset(
        "Pick-a-Pic pairs: parquet directory, glob or file, or a hub dataset name (a run names "
        "its data: this, --csv, --pairs or --pairs_dirs)",
    )
    csv: str | None = unset(
        "per-image CSV (file_name, caption, split) for KTO/SFT; replaces --data"
    )
    images: str | None = unset("image root that --csv file_name entries are relative to")
    split_labels: str = arg(DEFAULT_SPLIT_LABELS, "CSV split -> label (1 desirable, 0 not)")
    kto_desirable_prob: float = arg(
        KTO_DESIRABLE_PROB, "probability that a drawn CSV sample is desirable (gamma)"
    )
    hub_split: str = arg("train", "split of a hub dataset given as --data")
    columns: str | None = unset(
        "--data column mapping for parquet/hub pairs in another schema, e.g. "
        "caption=prompt,jpg_0=image_a,jpg_1=image_b,label_0=a_wins,label_1=b_wins,prob_0=p",
    )
    pairs: str | None = unset(
        "your own pairs: a JSONL or CSV manifest (caption, chosen, rejected, optional prob) "
        "with paths relative to --images; replaces --data",
    )
    pairs_dirs: str | None = unset(
        "your own pairs: two folders W,L of chosen/rejected images with the same file names"
    )
    captions: str | None = unset(
        "--pairs_dirs captions: a JSONL (file_name, caption) or a folder of <stem>.txt"
    )
    soft_labels: bool = arg(
        False, "train on the per-pair preference probability (prob / prob_0) instead of 1"
    )
    cache: str | None = unset(
        "latent/text cache from scripts/build_cache.py: train without loading the VAE or text "
        "encoders (needs centre crop); online losses: the --prompts' text features "
        "(build_cache.py --prompts FILE), the VAE still loads to decode samples",
    )
    resolution: int | None = arg(
        None,
        "training resolution: shorter side resized, then square crop (default: the model's "
        "native size, from its UNet and VAE configs)",
    )
    random_crop: bool = arg(False, "random instead of centre crop (shared by a pair)")
    random_flip: bool = arg(True, "horizontal flip with p=0.5 (one coin per pair)")
    caption_dropout: float = arg(CAPTION_DROPOUT, "probability a caption is replaced by ''")
    empty_prompt_embeddings: str = arg(
        "encode",
        "conditioning of a dropped caption: 'encode' the empty string (the released trainers) or "
        "all-'zeros' hidden and pooled embeddings (what SDXL pipelines use for the unconditional "
        "branch, force_zeros_for_empty_prompt)",
        choices=list(EMPTY_PROMPT_MODES),
    )
    # Flow-matching models only (SD3 / SD3.5, Flux.1): see diffusion/flow_matching.py.
    timestep_sampling: str = arg(
        "logit_normal",
        "flow models: how sigma is drawn, before the scheduler's shift (SD3 paper: logit_normal)",
        choices=list(TIMESTEP_SAMPLINGS),
    )
    logit_mean: float = arg(0.0, "flow models: logit_normal's mean (SD3 paper: 0)")
    logit_std: float = arg(1.0, "flow models: logit_normal's std (SD3 paper: 1)")
    mode_scale: float = arg(1.29, "flow models: the scale s of 'mode' sampling (SD3 paper, 3.1)")
    flow_shift: float | None = arg(
        None, "flow models: sigma shift (default: the scheduler's, at the training resolution)"
    )
    flux_guidance: float = arg(
        3.5, "guidance-distilled Flux (guidance_embeds): the guidance value fed while training"
    )
    row_groups_per_block: int = arg(1, "parquet row groups shuffled together")
    dataloader_num_workers: int = arg(2, "DataLoader worker processes per training process")

    # Optimisation
    train_batch_size: int = arg(
        1, "per-device batch: pairs (dpo), images (kto, sft) or prompts (grpo, nft; x --group_size)"
    )
    gradient_accumulation_steps: int = arg(1, "micro-batches per optimizer step")
    max_train_steps: int = arg(2000, "optimizer steps")
    learning_rate: float = arg(2.048e-5, "peak learning rate (no hidden batch scaling)")
    lr_scheduler: str = arg(
        "constant_with_warmup",
        "learning-rate schedule",
        choices=["constant", "constant_with_warmup", "linear", "cosine"],
    )
    lr_warmup_steps: int = arg(500, "warm-up optimizer steps")
    adam_beta1: float = arg(0.9, "AdamW beta1")
    adam_beta2: float = arg(0.999, "AdamW beta2")
    adam_epsilon: float = arg(1e-8, "AdamW epsilon")
    weight_decay: float = arg(1e-2, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient clipping norm (0 disables)")
    optimizer: str = arg(
        "adamw",
        "adamw (torch); adamw8bit (bitsandbytes, optional extra); adafactor (transformers)",
        choices=list(OPTIMIZERS),
    )
    seed: int = arg(0, "seed for data order, augmentation, timesteps and noise")
    max_consecutive_nonfinite: int = arg(
        10,
        "optimizer steps with a non-finite loss or gradient are skipped and counted; after "
        "this many in a row the run saves a checkpoint and stops",
    )

    # Precision and speed
    mixed_precision: str = arg(
        "no",
        "compute precision of the UNets (trainable weights stay fp32)",
        choices=["no", "fp16", "bf16"],
    )
    gradient_checkpointing: bool = arg(False, "recompute UNet activations in backward")
    attention: str = arg(
        "sdpa", "attention kernel: sdpa (fused) or eager", choices=["sdpa", "eager"]
    )
    torch_compile: bool = arg(
        False,
        "torch.compile the UNet(s); inductor keeps eager's half-precision rounding, so the "
        "compiled policy and reference agree at step 0 (README, Checking the GPU paths)",
    )
    compile_backend: str = arg("inductor", "torch.compile backend")
    allow_tf32: bool = arg(True, "TF32 matmuls/convolutions on Ampere+ GPUs (no effect on CPU)")

    # Output and checkpoints
    output_dir: str = arg("outputs/run", "where checkpoints, logs and the final unet/ go")
    overwrite_output_dir: bool = arg(
        False, "replace a finished run in --output_dir (without it, such a run stops at start-up)"
    )
    checkpointing_steps: int = arg(500, "save a resumable checkpoint every N optimizer steps")
    checkpoints_total_limit: int | None = arg(None, "keep at most this many checkpoints")
    resume_from_checkpoint: str | None = unset("'latest' or a checkpoint directory")
    check_only: bool = arg(
        False,
        "run the start-up checks (flags, model configs, output directory, launcher, tracker, "
        "data) and exit: no weights load, nothing is written (exps/*.sh run it before launching)",
    )
    process_group_timeout: float = arg(
        60.0,
        "minutes the other processes of a multi-GPU run wait for the main one (validating, "
        "saving a checkpoint) before the job is stopped (NCCL's own limit: 10); raise it for "
        "long validations",
    )

    # Logging
    report_to: str = arg("tensorboard", "metrics tracker", choices=["tensorboard", "wandb", "none"])
    tracker_project: str = arg("prefdiff", "tracker project name")

    # Validation during training (training/validation.py), sharing (model_card.py, hub.py)
    validation_prompts: str | None = unset("file of validation prompts, one per line")
    validation_prompt: list[str] = field(  # repeat=True: one flag per value
        default_factory=list,
        metadata={"help": "a validation prompt (repeatable, after the file's)", "repeat": True},
    )
    validation_steps: int = arg(100, "validate at step 0, every N optimizer steps and at the end")
    validation_images: int = arg(2, "images per validation prompt, each from its own fixed seed")
    validation_inference_steps: int = arg(20, "sampler steps of the validation pipeline")
    validation_guidance_scale: float | None = arg(
        None,
        "guidance scale of validation images: CFG (<= 1: off), or the guidance embedding's value "
        "of guidance-distilled Flux (default: what the family trains with: --flux_guidance for "
        "guidance-distilled Flux, else 1)",
    )
    validation_scheduler: str = arg(
        "ddim",
        "validation sampler (SD3 / Flux sample with flow_euler whatever this names)",
        choices=["ddim", "ddpm", "euler", "euler_a", "dpmpp_2m", "flow_euler"],
    )
    validation_scorer: str | None = unset(
        "scorer NAME or NAME=PATH (evaluate.py's registry) logged as validation/NAME"
    )
    model_card_datasets: str | None = unset(
        "comma-separated hub dataset ids for the model card (default: --data if a hub name)"
    )
    push_to_hub: bool = arg(False, "upload the export and its model card to --hub_model_id")
    hub_model_id: str | None = unset("hub repository (owner/name) that --push_to_hub writes")

    def validate(self) -> None:
        """Fail at start-up, not hours in."""
        spec = get_spec(self.loss)
        problems = []
        if spec.pairwise and self.csv:
            problems.append(f"--loss {self.loss} trains on pairs: give --data, not --csv")
        if self.loss == "kto" and not self.csv:
            problems.append("--loss kto needs per-image labels: give --csv and --images")
        if self.csv and not self.images:
            problems.append("--csv needs --images (the image root of its file_name entries)")
        problems += self.pair_source_problems(spec)
        problems += self.online_problems(spec)
        positive = (
            "train_batch_size",
            "gradient_accumulation_steps",
            "max_train_steps",
            "checkpointing_steps",
            "learning_rate",
            "max_consecutive_nonfinite",
            "process_group_timeout",
        )
        problems += [f"--{n} must be > 0" for n in positive if not getattr(self, n) > 0]
        problems += self.loss_problems()
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            problems.append("--resolution must be a positive multiple of 8 (the VAE downsamples)")
        for name in ("caption_dropout", "kto_desirable_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"--{name} must be in [0, 1]")
        if self.lr_warmup_steps < 0 or self.dataloader_num_workers < 0:
            problems.append("--lr_warmup_steps and --dataloader_num_workers must be >= 0")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            problems.append("--checkpoints_total_limit must be >= 1")
        if not math.isfinite(self.max_grad_norm) or self.max_grad_norm < 0:
            problems.append("--max_grad_norm must be finite and >= 0")
        if self.logit_std <= 0 or (self.flow_shift is not None and self.flow_shift <= 0):
            problems.append("--logit_std and --flow_shift must be > 0")
        if self.cache and self.random_crop:
            problems.append("--cache stores centre crops: --random_crop cannot be cached")
        if self.lora_rank < 0:
            problems.append("--lora_rank must be >= 0 (0: full fine-tuning)")
        if self.lora_rank and self.reference_model:
            problems.append("--lora_rank uses the base UNet as reference: drop --reference_model")
        if self.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
            problems.append(
                "--optimizer adamw8bit needs bitsandbytes: pip install -r requirements-8bit.txt"
            )
        problems += validation_problems(self) + hub_problems(self)
        if problems:
            raise UsageError("invalid config:\n  " + "\n  ".join(problems))

    def pair_source_problems(self, spec: Any) -> list[str]:
        """Your own pairs and soft labels (data/pair_table.py, data/columns.py)."""
        from data.columns import column_problems

        sources = [f"--{n}" for n in ("csv", "pairs", "pairs_dirs") if getattr(self, n)]
        problems = column_problems(self.columns, sources)
        if not (self.data or sources or spec.online):  # the online losses read --prompts
            problems.append(
                "no training data: give --data (Pick-a-Pic parquet or a hub dataset), "
                "--csv and --images (per-image labels), --pairs and --images, or --pairs_dirs W,L"
            )
        if len(sources) > 1:
            problems.append(f"give one data source, not {' and '.join(sources)}")
        if self.pairs and not self.images:
            problems.append("--pairs needs --images (the image root of its paths)")
        if self.pairs_dirs and len(self.pairs_dirs.split(",")) != 2:
            problems.append("--pairs_dirs takes two folders: W,L (chosen, rejected)")
        if self.captions and not self.pairs_dirs:
            problems.append("--captions goes with --pairs_dirs")
        if self.soft_labels and not spec.soft_labels:
            problems.append(f"--soft_labels: --loss {self.loss} does not train on soft labels")
        return problems

    def online_problems(self, spec: Any) -> list[str]:
        """Online losses read prompts and a reward; their sampler settings' ranges."""
        if spec.online is None:
            return ["--prompts is for the online losses (grpo, nft)"] if self.prompts else []
        name = f"--loss {self.loss}"
        problems = []
        if not self.prompts:
            problems.append(f"{name} samples from prompts: give --prompts FILE")
        elif not Path(self.prompts).is_file():
            problems.append(f"--prompts {self.prompts}: no such file")
        if not (self.reward or self.reward_url):
            problems.append(f"{name} needs --reward NAME[=PATH] (repeatable) or --reward_url")
        for flag in ("csv", "pairs", "pairs_dirs"):
            if getattr(self, flag):
                problems.append(f"{name} samples its own images: drop --{flag}")
        steps = self.sampling_steps
        checks = [
            (self.group_size >= 2, "--group_size must be >= 2 (advantages compare a group)"),
            (steps >= 1, "--sampling_steps must be >= 1"),
            (self.noise_level is None or self.noise_level >= 0, "--noise_level must be >= 0"),
            (0 < self.trained_steps_fraction <= 1, "--trained_steps_fraction must be in (0, 1]"),
            (0 <= self.sde_window_size <= steps, "--sde_window_size must be in [0, steps]"),
            (self.guidance_scale >= 1, "--guidance_scale must be >= 1 (1: no guidance)"),
            (self.inner_epochs >= 1, "--inner_epochs must be >= 1"),
            (self.kl_coef is None or self.kl_coef >= 0, "--kl_coef must be >= 0"),
        ]
        problems += [message for ok, message in checks if not ok]
        problems += self.step_choice_problems(spec)
        if self.sde_window_range:
            problems += self.window_problems()
        elif self.sde_window_size >= steps:
            problems.append(
                f"--sde_window_size {self.sde_window_size}: at most --sampling_steps - 1 (the "
                "default --sde_window_range 0,steps-1 keeps the last step deterministic)"
            )
        batches = self.collect_batches or self.gradient_accumulation_steps
        if batches < 1 or (batches * self.inner_epochs) % self.gradient_accumulation_steps:
            problems.append(
                f"--collect_batches {batches} x --inner_epochs {self.inner_epochs} must be a "
                f"positive multiple of --gradient_accumulation_steps "
                f"{self.gradient_accumulation_steps} (whole optimizer steps per collection)"
            )
        return problems

    def step_choice_problems(self, spec: Any) -> list[str]:
        """The progressive window's moves, the shuffled steps and the advantage filter: grpo's
        (nft keeps no sampler step and re-noises each image at shuffled timesteps itself)."""
        problems = []
        grpo = spec.online == "trajectory"
        progressive = self.sde_window_schedule == "progressive"
        if progressive and not self.sde_window_size:
            problems.append("--sde_window_schedule progressive needs --sde_window_size > 0")
        if progressive and (self.sde_window_shift < 1 or self.sde_window_every < 1):
            problems.append("--sde_window_shift and --sde_window_every must be >= 1")
        if self.trained_steps_order == "shuffled":
            if not grpo:
                problems.append(
                    f"--trained_steps_order shuffled is grpo's: --loss {self.loss} re-noises "
                    "each image at its own shuffled timesteps already"
                )
            if self.sde_window_size:
                problems.append(
                    "--trained_steps_order shuffled draws from every step before the last: drop "
                    "--sde_window_size (a window trains all its steps)"
                )
            if self.sampling_steps < 2:
                problems.append("--trained_steps_order shuffled needs --sampling_steps >= 2")
        if self.filter_zero_advantages and not grpo:
            problems.append(f"--filter_zero_advantages is grpo's, not --loss {self.loss}'s")
        return problems

    def window_problems(self) -> list[str]:
        flag = f"--sde_window_range {self.sde_window_range}"
        try:
            low, high = (int(v) for v in self.sde_window_range.split(","))
        except ValueError:
            return [f"{flag}: expected LO,HI (two integers)"]
        if not 0 <= low < high <= self.sampling_steps or high - low < self.sde_window_size:
            return [
                f"{flag}: need 0 <= LO < HI <= --sampling_steps {self.sampling_steps} and room "
                f"for --sde_window_size {self.sde_window_size}"
            ]
        if not self.sde_window_size:
            return [f"{flag} needs --sde_window_size > 0"]
        return []

    def loss_problems(self) -> list[str]:
        """The loss hyperparameters' ranges (each loss checks its own again when built)."""
        problems = []
        if self.beta is not None and not BETA_OPTION.valid(self.beta):
            problems.append(f"--beta must be {BETA_OPTION.rule}")
        for option in option_fields():
            problem = option.problem(getattr(self, option.name))
            if problem:
                problems.append(problem)
        return problems

    def resolve_loss_defaults(self) -> None:
        """An unset --beta (--kl_coef) takes the chosen loss's released value, so the saved
        config says which value a run used."""
        defaults = get_spec(self.loss).hyperparameters
        if self.beta is None:
            self.beta = defaults.get("beta")
        if self.kl_coef is None:
            self.kl_coef = defaults.get("kl_coef")

    def resolve_family_defaults(self, default_guidance: float) -> None:
        """An unset --validation_guidance_scale takes the model family's default (models/
        family.py ``default_guidance``), so the saved config, the card and the start-up block
        say what validation sampled with. Called once the family is known (train.setup)."""
        if self.validation_guidance_scale is None:
            self.validation_guidance_scale = default_guidance

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _loss_option_field(option: OptionField) -> tuple[str, Any, Any]:
    extra = {"choices": list(option.option.choices)} if option.option.choices else {}
    kind = option.type if option.default is not None else option.type | None
    return option.name, kind, arg(option.default, option.option.help, **extra)


# The config: ``_Settings`` plus one field per option that a registered loss declares.
TrainConfig = dataclasses.make_dataclass(
    "TrainConfig",
    [_loss_option_field(option) for option in option_fields()],
    bases=(_Settings,),
)
TrainConfig.__module__ = __name__  # make_dataclass names its own module otherwise (pickling)
LOSS_OPTIONS = tuple(option.name for option in option_fields())


def _field_type(annotation: Any) -> type:
    """The scalar type behind ``X | None``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    return annotation


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _optional(scalar: type) -> Any:
    """Parser that maps 'none' to None, so a script variable can unset an optional flag."""

    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "") else scalar(text)

    return parse


# --help groups: each starts at its first field in TrainConfig's order and holds the fields up
# to the next group's first, so a field added inside a section joins that section's group.
HELP_GROUPS = {
    "model": "pretrained_model",
    "loss": "loss",
    "online (grpo, nft)": "prompts",
    "data": "data",
    "optimisation": "train_batch_size",
    "precision and speed": "mixed_precision",
    "checkpoints and output": "output_dir",
    "logging": "report_to",
    "validation and sharing": "validation_prompts",
}
# The order --help shows them in.
HELP_ORDER = (
    "model",
    "data",
    "loss",
    "online (grpo, nft)",
    "optimisation",
    "precision and speed",
    "checkpoints and output",
    "logging",
    "validation and sharing",
)


def field_groups() -> dict[str, list[str]]:
    """HELP_GROUPS' name -> the names of its fields, in TrainConfig's order."""
    # The losses' own options are shown with --loss and --beta, though declared last.
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in LOSS_OPTIONS]
    after_beta = names.index("beta") + 1
    names[after_beta:after_beta] = LOSS_OPTIONS
    starts = sorted((names.index(first), group) for group, first in HELP_GROUPS.items())
    groups: dict[str, list[str]] = {group: [] for group in HELP_ORDER}
    for position, name in enumerate(names):
        group = next((g for start, g in reversed(starts) if start <= position), starts[0][1])
        groups[group].append(name)
    return groups


class _HelpFormatter(argparse.HelpFormatter):
    """Appends the default once: not when the help text already explains it, nor for None."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: {action.default})"


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The CLI, flags grouped for --help; with ``suppress_defaults`` only the flags given
    appear in the parsed result."""
    parser = Parser(
        description="Preference fine-tuning of SD1.5 / SDXL UNets with any loss of --loss. "
        "Every flag takes one value (--flag VALUE or --flag=VALUE); abbreviations are refused.",
        usage="%(prog)s [--flag VALUE ...]",
        formatter_class=_HelpFormatter,
    )
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for group, names in field_groups().items():
        section = parser.add_argument_group(group)
        for name in names:
            f = fields[name]
            if f.metadata.get("repeat"):  # a repeatable flag collects its values in a list
                empty = argparse.SUPPRESS if suppress_defaults else []
                section.add_argument(
                    f"--{f.name}", action="append", default=empty, help=f.metadata["help"]
                )
                continue
            scalar = _field_type(f.type)
            optional = scalar is not f.type
            parse = _parse_bool if scalar is bool else scalar
            section.add_argument(
                f"--{f.name}",
                type=_optional(parse) if optional else parse,
                default=argparse.SUPPRESS if suppress_defaults else f.default,
                choices=f.metadata.get("choices"),
                metavar="BOOL" if scalar is bool else None,
                help=f.metadata["help"],
            )
    return parser


def join_negative_numbers(argv: list[str]) -> list[str]:
    """``--flag -1e-4`` -> ``--flag=-1e-4``: argparse takes ``-1e-4`` for an option (it only
    recognises plain negative integers and decimals), and every flag here takes one value."""
    joined: list[str] = []
    for arg in argv:
        if joined and joined[-1].startswith("--") and "=" not in joined[-1] and arg[:1] == "-":
            try:
                float(arg)
            except ValueError:
                pass
            else:
                joined[-1] = f"{joined[-1]}={arg}"
                continue
        joined.append(arg)
    return joined


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The command line as a config, not yet validated."""
    argv = join_negative_numbers(list(sys.argv[1:] if argv is None else argv))
    return TrainConfig(**vars(build_parser().parse_args(argv)))


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    config = parse_args(argv)
    config.validate()
    config.resolve_loss_defaults()
    return config


def given_flags(argv: list[str] | None = None) -> set[str]:
    """Names of the flags set on the command line to a value (``none`` counts as unset)."""
    argv = join_negative_numbers(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser(suppress_defaults=True)
    return {k for k, v in vars(parser.parse_args(argv)).items() if v is not None}


def unused_flag_notes(config: TrainConfig, given: set[str]) -> list[str]:
    """One line per loss flag set explicitly that the chosen loss does not use."""
    return [
        f"--{name} is not used by --loss {config.loss}: ignored"
        for name in unused_options(config.loss, given)
    ]


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def provenance(config: TrainConfig) -> dict[str, Any]:
    """What is saved with every checkpoint: the resolved config, versions and code revision."""
    return {"config": config.to_dict(), "versions": library_versions(), "git_sha": git_sha()}


def write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
