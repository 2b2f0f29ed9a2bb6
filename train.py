"""Preference fine-tuning of SD-family UNets: Diffusion-DPO, Diffusion-KTO and SFT.

    accelerate launch train.py --loss dpo --pretrained_model DIR_OR_HUB --data PARQUET_DIR
    python train.py --help

config -> build (models, data, optimizer) -> loop -> export ``OUTPUT_DIR/unet``.
"""

# ruff: noqa: E402  (--help and flag mistakes are answered before torch and diffusers load)
import cli

cli.answer_help_early(__name__)

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, gather_object
from tqdm.auto import tqdm

import checkpointing
import startup
from build import build_dataloader, build_dataset, build_optimizer, dataset_size
from config import TrainConfig, parse_config, provenance
from diffusion import batch_errors, first_group_index
from losses import build_loss, get_spec
from models import Components, load_components
from models.speed import allow_tf32

logger = get_logger("prefdiff")

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
METRICS_FILE = startup.METRICS_FILE


class NonFiniteTraining(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


@dataclass
class TrainResult:
    """What a run leaves behind, for callers that drive ``main`` in-process (tests, notebooks)."""

    unet_dir: Path  # OUTPUT_DIR/unet, or OUTPUT_DIR/lora when training LoRA adapters
    models: Components
    history: list[dict[str, float]] = field(default_factory=list)  # logged metrics, one per step
    skipped_rows: int = 0
    nonfinite_steps: int = 0
    unreadable_files: list[str] = field(default_factory=list)  # parquet shards skipped whole


def reduce_metrics(accelerator: Accelerator, micro_metrics: list[dict[str, float]]) -> dict:
    """Average over micro-batches, then over processes; nan entries (a class absent from a
    batch) are left out of the average rather than poisoning it."""
    names = sorted(micro_metrics[0])
    local = torch.tensor([[m[n] for n in names] for m in micro_metrics], dtype=torch.float64)
    gathered = accelerator.gather(local.to(accelerator.device)).cpu()
    return dict(zip(names, gathered.nanmean(dim=0).tolist(), strict=True))


def gradient_norm(accelerator: Accelerator, policy: torch.nn.Module, max_norm: float) -> float:
    """Total gradient norm after synchronisation (same on every rank), clipping to ``max_norm``
    when it is > 0; NaN/inf when any gradient is non-finite. DeepSpeed clips (its
    ``gradient_clipping``) and handles overflow inside its engine step, and only reports the
    previous step's norm, so 0 stands in there."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return 0.0
    norm = accelerator.clip_grad_norm_(policy.parameters(), max_norm if max_norm > 0 else math.inf)
    return float(norm)


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one."""
    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device)) > 0)


def append_metrics(path: Path, step: int, logs: dict[str, float]) -> None:
    """A crash-proof plain-text record of every step (the trackers buffer theirs)."""
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, **logs}) + "\n")


def tracker_config(config: TrainConfig) -> dict:
    """Trackers accept only scalars and strings."""
    return {k: ("none" if v is None else v) for k, v in config.to_dict().items()}


def log_startup(
    config: TrainConfig, accelerator: Accelerator, size: str, trainable: int, notes: list[str]
) -> None:
    unit = "pairs" if get_spec(config.loss).pairwise and not config.csv else "images"
    total = config.train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    lines = [
        f"loss: {config.loss} (beta {config.beta})",
        f"model: {config.pretrained_model}",
        f"dataset: {size}",
        f"batch: {config.train_batch_size} {unit} per device x {config.gradient_accumulation_steps}"
        f" accumulation x {accelerator.num_processes} processes = {total} {unit} per step",
        f"steps: {config.max_train_steps}, learning rate {config.learning_rate}"
        f" ({config.lr_scheduler}, {config.lr_warmup_steps} warm-up)",
        f"precision: {config.mixed_precision} compute, trainable weights fp32",
        f"policy: {f'LoRA rank {config.lora_rank}' if config.lora_rank else 'full UNet'}, "
        f"optimizer {config.optimizer}, latents and text from "
        f"{config.cache or 'the VAE and text encoders'}",
        f"trainable parameters: {trainable:,}",
        f"output: {config.output_dir}",
        *notes,
    ]
    logger.info("***** training *****\n  " + "\n  ".join(lines), main_process_only=True)


def main(argv: list[str] | None = None) -> TrainResult:
    cli.setup_logging()
    config, checks = startup.prepare(parse_config(argv))
    spec = get_spec(config.loss)
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
    )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    run_info = provenance(config)
    logger.info(startup.describe_config(run_info), main_process_only=True)
    for warning in checks.warnings:
        logger.warning(warning, main_process_only=True)

    # Data first: a bad path, column or label must stop the run before any model loads.
    dataset = build_dataset(config, spec, accelerator.process_index, accelerator.num_processes)
    weight_dtype = WEIGHT_DTYPES[config.mixed_precision]
    allow_tf32(config.allow_tf32)
    models = load_components(config, spec.needs_reference, weight_dtype, accelerator.device)
    loss_fn = build_loss(config.loss, config.to_dict())
    optimizer, lr_scheduler = build_optimizer(config, list(models.policy.parameters()))
    policy, optimizer = accelerator.prepare(models.policy, optimizer)
    deepspeed = accelerator.state.deepspeed_plugin
    if deepspeed is not None:  # we step our own DataLoader, so DeepSpeed cannot read it from one
        deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = config.train_batch_size
    accelerator.register_for_checkpointing(lr_scheduler)
    checkpointing.register_unet_hooks(accelerator, models.policy_io)

    state = checkpointing.TrainerState()
    resume_dir = checkpointing.resolve_resume(output_dir, config.resume_from_checkpoint)
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        state = checkpointing.TrainerState.load(resume_dir)
        workers = max(1, config.dataloader_num_workers)
        dataset.resume_from(state.positions, role_offset=state.micro_batches % workers)
        logger.info("resumed from %s at step %d", resume_dir, state.global_step)
    batches = iter(build_dataloader(config, dataset))

    if accelerator.is_main_process:
        accelerator.init_trackers(config.tracker_project, config=tracker_config(config))
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    log_startup(config, accelerator, dataset_size(dataset), trainable, checks.notes)

    group_size = 2 if spec.pairwise else 1
    history = []
    consecutive_nonfinite = 0
    metrics_path = output_dir / METRICS_FILE
    if accelerator.is_main_process:
        startup.start_metrics(metrics_path, state.global_step)
    progress = tqdm(
        total=config.max_train_steps,
        initial=state.global_step,
        desc="steps",
        disable=not accelerator.is_local_main_process,
    )
    while state.global_step < config.max_train_steps:
        micro_metrics, skipped, grad_norm = [], 0, 0.0
        for _ in range(config.gradient_accumulation_steps):
            batch = next(batches)
            with accelerator.accumulate(policy):
                condition = models.family.condition(
                    batch.captions, batch.original_sizes, batch.crop_top_lefts
                )
                policy_err, ref_err = batch_errors(
                    policy,
                    models.reference,
                    models.latent_encoder,
                    models.noise_scheduler,
                    condition,
                    batch.pixels.to(accelerator.device, non_blocking=True),
                    group_size,
                    first_group=first_group_index(
                        state.micro_batches,
                        accelerator.num_processes,
                        accelerator.process_index,
                        config.train_batch_size,
                    ),
                    seed=config.seed,
                    autocast=accelerator.autocast,
                )
                labels = getattr(batch, "labels", None)
                loss, metrics = loss_fn(
                    policy_err, ref_err, labels=None if labels is None else labels.to(policy_err)
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = gradient_norm(accelerator, policy, config.max_grad_norm)
            micro_metrics.append({"loss": loss.item(), **metrics})
            state.micro_batches += 1
            skipped += batch.skipped
            state.positions.update({str(k): v for k, v in batch.positions.items()})

        # A NaN/inf loss or gradient on any rank skips the update on all of them (gradients
        # are already synchronised, so every rank sees the same norm).
        local_bad = not all(math.isfinite(m["loss"]) for m in micro_metrics)
        nonfinite = any_rank(accelerator, local_bad or not math.isfinite(grad_norm))
        if nonfinite and accelerator.scaler is not None:
            optimizer.step()  # fp16: the grad scaler skips the step and lowers its scale
        elif not nonfinite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not nonfinite and not accelerator.optimizer_step_was_skipped:
            lr_scheduler.step()
        consecutive_nonfinite = consecutive_nonfinite + 1 if nonfinite else 0
        state.nonfinite_steps += int(nonfinite)
        state.global_step += 1
        if nonfinite:
            logger.warning(
                "step %d: non-finite loss or gradient (grad norm %s), optimizer step skipped "
                "(%d in a row, %d in total)",
                state.global_step,
                grad_norm,
                consecutive_nonfinite,
                state.nonfinite_steps,
                main_process_only=True,
            )
        logs = reduce_metrics(accelerator, micro_metrics)
        step_skipped = int(accelerator.reduce(torch.tensor(skipped, device=accelerator.device)))
        state.skipped_rows += step_skipped
        logs.update(
            {
                "lr": lr_scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "data/skipped_rows": state.skipped_rows,
                "nonfinite_steps": state.nonfinite_steps,
            }
        )
        accelerator.log(logs, step=state.global_step)
        if accelerator.is_main_process:
            append_metrics(metrics_path, state.global_step, logs)
        history.append(logs)
        progress.update(1)
        progress.set_postfix(
            loss=f"{logs['loss']:.4f}", acc=f"{logs.get('rewards/accuracies', math.nan):.3f}"
        )

        stop = consecutive_nonfinite >= config.max_consecutive_nonfinite
        final_step = state.global_step == config.max_train_steps
        if state.global_step % config.checkpointing_steps == 0 or final_step or stop:
            merged = checkpointing.TrainerState(**vars(state))
            merged.positions = {
                k: v for d in gather_object([state.positions]) for k, v in d.items()
            }
            checkpointing.save_checkpoint(
                accelerator, output_dir, merged, run_info, config.checkpoints_total_limit
            )
        if stop:
            raise NonFiniteTraining(
                f"{consecutive_nonfinite} optimizer steps in a row had a non-finite loss or "
                f"gradient (last at step {state.global_step}); stopped after saving "
                f"{output_dir / f'checkpoint-{state.global_step}'} (its weights are those of the "
                "last finite step). Lower the learning rate, check the data, or use bf16/fp32"
            )
    progress.close()

    unet_dir = checkpointing.export_unet(
        accelerator, policy, output_dir, run_info, models.policy_io
    )
    if state.skipped_rows:
        logger.warning(
            "skipped %d rows whose images did not decode",
            state.skipped_rows,
            main_process_only=True,
        )
    unreadable = getattr(dataset, "unreadable_files", [])
    if unreadable:
        logger.warning(
            "skipped %d unreadable parquet files: %s",
            len(unreadable),
            ", ".join(unreadable),
            main_process_only=True,
        )
    accelerator.end_training()
    if accelerator.is_main_process:
        print(startup.results(config, unet_dir), flush=True)
    return TrainResult(
        unet_dir, models, history, state.skipped_rows, state.nonfinite_steps, unreadable
    )


if __name__ == "__main__":
    cli.run(main)
