"""Preference fine-tuning of SD-family UNets with any registered loss (``losses/``: Diffusion-DPO,
IPO, hinge, DMPO, DSPO, MaPO, Diffusion-KTO, SFT; the Diffusion-SDPO safeguard).

    accelerate launch train.py --loss dpo --pretrained_model DIR_OR_HUB --data PARQUET_DIR
    python train.py --help

``main``: ``setup`` (config, data, models, loss, optimizer) -> loop (``accumulate_gradients``,
``optimizer_step``, ``log_step``, ``checkpoint_due``) -> ``finish`` (export ``OUTPUT_DIR/unet``).
What a loss needs (a reference model, per-pixel predictions) comes from its registry entry.
"""

# ruff: noqa: E402  (--help and flag mistakes are answered before torch and diffusers load)
from training.startup import answer_help_early

answer_help_early(__name__)

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    DistributedType,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    gather_object,
    set_seed,
)
from tqdm.auto import tqdm

from common import cli
from data import LabeledImages, PickapicPairs
from diffusion.denoising import denoise, first_group_index
from losses import Requirements, build_loss, get_spec, requirements
from losses.common import LossFn
from losses.health import health_metrics
from models.loading import Components, load_components
from models.speed import allow_tf32
from training import checkpointing, hub, startup
from training.build import build_dataloader, build_dataset, build_optimizer, dataset_size
from training.config import TrainConfig, given_flags, parse_config, provenance, unused_flag_notes
from training.distributed import (
    configure_backend,
    deepspeed_step_outcome,
    forward_casts,
)
from training.model_card import data_source, label_text, write_model_card
from training.online import FURTHEST_FROM_ONE, SAMPLES_FILE, OnlineTrainer, build_reward
from training.validation import ValidationResult, Validator

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
    validation: list = field(default_factory=list)  # validation.ValidationResult (main process)


def reduce_metrics(accelerator: Accelerator, micro_metrics: list[dict[str, float]]) -> dict:
    """Average over micro-batches, then over processes; nan entries (a class absent from a
    batch) are left out of the average rather than poisoning it. A metric named ``..._min`` or
    ``..._max`` is an extreme: the min or max over every micro-batch of every process; one of
    ``FURTHEST_FROM_ONE`` the value furthest from 1 over them."""
    names = sorted(micro_metrics[0])
    local = torch.tensor([[m[n] for n in names] for m in micro_metrics], dtype=torch.float64)
    gathered = accelerator.gather(local.to(accelerator.device)).cpu()  # [micro x processes, M]
    seen = ~gathered.isnan()
    lowest = torch.where(seen, gathered, math.inf).amin(dim=0)
    highest = torch.where(seen, gathered, -math.inf).amax(dim=0)
    reduced = gathered.nanmean(dim=0)
    for i, name in enumerate(names):
        if not seen[:, i].any():
            continue
        if name.endswith(("_min", "_max")):
            reduced[i] = lowest[i] if name.endswith("_min") else highest[i]
        elif name in FURTHEST_FROM_ONE:
            reduced[i] = max(lowest[i], highest[i], key=lambda value: abs(value - 1))
    return dict(zip(names, reduced.tolist(), strict=True))


def gradient_norm(accelerator: Accelerator, policy: torch.nn.Module, max_norm: float) -> float:
    """Total gradient norm after synchronisation (same on every rank), clipping to ``max_norm``
    when it is > 0; NaN/inf when any gradient is non-finite. Under DeepSpeed the engine has
    already clipped (its ``gradient_clipping`` = ``--max_grad_norm``) and stepped inside
    ``accelerator.backward``; the norm it measured is read back, and NaN stands for a step the
    engine skipped (overflow or non-finite norm), so the loop counts it as non-finite."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        outcome = deepspeed_step_outcome(policy)
        if not outcome.applied:
            return math.nan
        # None only where the DeepSpeed config turns zero_optimization.compute_grad_norm off.
        return 0.0 if outcome.grad_norm is None else outcome.grad_norm
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
    values = config.to_dict().items()
    return {k: ("none" if v is None else " | ".join(v) if isinstance(v, list) else v)
            for k, v in values}  # fmt: skip


def describe_loss(config: TrainConfig) -> str:
    """'dpo (beta 5000.0, label_smoothing 0.0)': the loss and the config values it reads."""
    spec = get_spec(config.loss)
    options = config.to_dict()
    used = [f"{k} {options[k]}" for k in spec.hyperparameters if k in options]
    if spec.takes_safeguard and config.winner_preserving_mu is not None:
        used.append(f"winner-preserving safeguard mu {config.winner_preserving_mu}")
    return f"{config.loss} ({', '.join(used)})" if used else config.loss


def describe_sources(config: TrainConfig, online: bool) -> str:
    """Where latents and text features come from: the VAE and encoders, or the cache."""
    if not config.cache:
        return "latents and text from the VAE and text encoders"
    if online:
        return f"text from {config.cache} (no text encoders), samples decoded by the VAE"
    return f"latents and text from {config.cache}"


def describe_policy(config: TrainConfig, denoiser: type) -> str:
    """'full UNet2DConditionModel', 'LoRA rank 16 on FluxTransformer2DModel': what trains."""
    name = denoiser.__name__
    return f"LoRA rank {config.lora_rank} on {name}" if config.lora_rank else f"full {name}"


def log_startup(
    config: TrainConfig,
    accelerator: Accelerator,
    size: str,
    trainable: int,
    notes: list[str],
    denoiser: type,
) -> None:
    spec = get_spec(config.loss)
    unit = "pairs" if spec.pairwise and not config.csv else "images"
    if spec.online is not None:
        unit = f"prompts (x {config.group_size} images)"
    total = config.train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    labels = label_text(config.to_dict(), code=str)
    lines = [
        f"loss: {describe_loss(config)}",
        f"model: {config.pretrained_model}",
        f"data: {data_source(config.to_dict(), code=str)}",
        *([f"labels: {labels}"] if labels else []),
        f"dataset: {size}",
        f"batch: {config.train_batch_size} {unit} per device x {config.gradient_accumulation_steps}"
        f" accumulation x {accelerator.num_processes} processes = {total} {unit} per step",
        f"steps: {config.max_train_steps}, learning rate {config.learning_rate}"
        f" ({config.lr_scheduler}, {config.lr_warmup_steps} warm-up)",
        f"precision: {config.mixed_precision} compute, trainable weights fp32",
        f"policy: {describe_policy(config, denoiser)}, optimizer {config.optimizer}, "
        f"{describe_sources(config, spec.online is not None)}",
        f"trainable parameters: {trainable:,}",
        f"output: {config.output_dir}",
        *notes,
    ]
    if config.validation_prompts or config.validation_prompt:
        lines.append(
            f"validation: every {config.validation_steps} steps, guidance "
            f"{config.validation_guidance_scale}"
        )
    logger.info("***** training *****\n  " + "\n  ".join(lines), main_process_only=True)


def build_accelerator(config: TrainConfig) -> Accelerator:
    output_dir = Path(config.output_dir)
    # The other ranks wait in a collective while the main one validates or saves; NCCL's
    # default timeout (10 min) would stop the job during a long 1024 px validation.
    timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=config.process_group_timeout))
    return Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
        kwargs_handlers=[timeout],
    )


@dataclass
class Run:
    """What the loop works with, built once by ``setup``."""

    config: TrainConfig
    accelerator: Accelerator
    models: Components
    policy: torch.nn.Module  # models.policy as prepared by accelerate
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: LossFn
    needs: Requirements  # what the loss needs computed each step (its registry entry)
    dataset: PickapicPairs | LabeledImages
    batches: Iterator
    state: checkpointing.TrainerState
    run_info: dict
    output_dir: Path
    validator: Validator | None = None  # None without validation prompts
    history: list[dict[str, float]] = field(default_factory=list)
    validations: list[ValidationResult | None] = field(default_factory=list)
    consecutive_nonfinite: int = 0
    online: OnlineTrainer | None = None  # online losses: collection and updates


def check_only(config: TrainConfig) -> None:
    """--check_only: the data's start-up check too, then say so; nothing loads or is written."""
    dataset = build_dataset(config, get_spec(config.loss), 0, 1)
    print(
        f"train.py --check_only: the flags, models' configs, output directory, launcher, "
        f"tracker and data ({dataset_size(dataset)}) pass their start-up checks",
        flush=True,
    )


def setup(config: TrainConfig, checks: startup.Startup, argv: list[str] | None) -> Run:
    """Config -> accelerator, data, models, loss, optimizer; resume if asked."""
    spec = get_spec(config.loss)
    output_dir = Path(config.output_dir)
    accelerator = build_accelerator(config)
    configure_backend(accelerator, config)
    # The global RNG drives only dropout (LoRA's included); noise and data draw from their own
    # generators. Seeded per rank, and saved/restored with every checkpoint by accelerate.
    set_seed(config.seed, device_specific=True)
    # Data first: a bad path, column or label must stop the run before any model loads, an old
    # run is removed or the config is logged.
    dataset = build_dataset(config, spec, accelerator.process_index, accelerator.num_processes)
    if accelerator.is_main_process:
        checks.notes += [note for note in [startup.overwrite(config)] if note]
        output_dir.mkdir(parents=True, exist_ok=True)
    run_info = provenance(config)
    logger.info(startup.describe_config(run_info), main_process_only=True)
    for warning in checks.warnings:
        logger.warning(warning, main_process_only=True)
    for note in unused_flag_notes(config, given_flags(argv)):
        logger.warning(note, main_process_only=True)

    weight_dtype = WEIGHT_DTYPES[config.mixed_precision]
    allow_tf32(config.allow_tf32)
    # An online run's reward first: a wrong name, an unreachable server or a prompt the reward
    # cannot read stops the run before any weights load.
    reward = None
    if spec.online is not None:
        reward = build_reward(config, accelerator.device, dataset.table.prompts)
    needs = requirements(config.loss, config.to_dict())
    casts = None
    if needs.reference:  # what the backend casts in the policy's forward, for the reference
        fsdp_plugin = getattr(accelerator.state, "fsdp_plugin", None)  # set only under FSDP
        casts = forward_casts(accelerator.distributed_type, weight_dtype, fsdp_plugin)
    models = load_components(config, needs.reference, weight_dtype, accelerator.device, casts,
                             decodes=spec.online is not None)  # fmt: skip
    config.resolve_family_defaults(models.family.default_guidance)
    run_info["config"] = config.to_dict()  # saved and carded with the resolved values
    # The scheduler's timestep count is a fact some losses read (MaPO's T).
    timesteps = models.noise_scheduler.config.num_train_timesteps
    loss_fn = build_loss(config.loss, {**config.to_dict(), "num_train_timesteps": timesteps})
    optimizer, lr_scheduler = build_optimizer(config, list(models.policy.parameters()))
    # Counted before prepare: FSDP replaces the parameters by this rank's shards.
    trainable = sum(p.numel() for p in models.policy.parameters() if p.requires_grad)
    policy, optimizer = accelerator.prepare(models.policy, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    checkpointing.register_unet_hooks(accelerator, models.policy_io)
    online = None
    if reward is not None:  # before resuming: it saves and loads its own state
        online = OnlineTrainer(config, accelerator, models, policy, loss_fn, reward)
        online.samples_path = output_dir / SAMPLES_FILE

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
    notes = checks.notes + (online.describe() if online is not None else [])
    log_startup(config, accelerator, dataset_size(dataset), trainable, notes,
                models.family.denoiser_class)  # fmt: skip
    if accelerator.is_main_process:  # one run per metrics file: a resumed run keeps its past
        startup.start_metrics(output_dir / METRICS_FILE, state.global_step)
        if online is not None:  # the same rule for its per-image log
            startup.start_metrics(output_dir / SAMPLES_FILE, state.global_step)
    validator = Validator.build(config, models, accelerator, weight_dtype)
    run = Run(config, accelerator, models, policy, optimizer, lr_scheduler, loss_fn, needs,
              dataset, batches, state, run_info, output_dir, validator, online=online)  # fmt: skip
    if run.validator is not None and state.global_step == 0:
        scores = validate(run)
        if scores and accelerator.is_main_process:  # step 0 has no other metrics
            append_metrics(output_dir / METRICS_FILE, 0, scores)
    return run


def validate(run: Run) -> dict[str, float]:
    """Validation images (and scores) at the current step; the score for metrics.jsonl (main
    process; validation.py has already sent it to the trackers)."""
    result = run.validator.run(run.state.global_step, run.policy)
    run.validations.append(result)
    if result is None or result.mean_score is None:
        return {}
    return {f"validation/{result.scorer}": result.mean_score}


def micro_batch_loss(run: Run, batch) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch through the policy (and the reference, when the loss has one) and the
    loss, computing only what the loss's registry entry asks for."""
    accelerator, models = run.accelerator, run.models
    condition = models.family.condition(batch.captions, batch.original_sizes, batch.crop_top_lefts)
    out = denoise(
        run.policy,
        models.reference,
        models.latent_encoder,
        models.noise_scheduler,
        condition,
        batch.pixels.to(accelerator.device, non_blocking=True),
        group_size=2 if run.needs.pairwise else 1,
        first_group=first_group_index(
            run.state.micro_batches,
            accelerator.num_processes,
            accelerator.process_index,
            run.config.train_batch_size,
        ),
        seed=run.config.seed,
        autocast=accelerator.autocast,
        keep_predictions=run.needs.predictions,
        forward=models.family.forward,
    )
    labels = getattr(batch, "labels", None)
    labels = None if labels is None else labels.to(out.policy_err)
    loss, metrics = run.loss_fn(out.policy_err, out.ref_err, labels=labels,
                                policy_pred=out.policy_pred, ref_pred=out.ref_pred,
                                target=out.target)  # fmt: skip
    metrics.update(health_metrics(out.policy_err, out.ref_err, out.timesteps,
                                  models.noise_scheduler.config.num_train_timesteps,
                                  run.needs.pairwise, labels))  # fmt: skip
    return loss, metrics


def accumulate_gradients(run: Run) -> tuple[list[dict[str, float]], int, float]:
    """Forward and backward over the step's micro-batches -> (their metrics, rows skipped by the
    data, gradient norm after synchronisation)."""
    micro_metrics, skipped, grad_norm = [], 0, 0.0
    accelerator, state = run.accelerator, run.state
    for _ in range(run.config.gradient_accumulation_steps):
        batch = next(run.batches)
        with accelerator.accumulate(run.policy):
            loss, metrics = micro_batch_loss(run, batch)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norm = gradient_norm(accelerator, run.policy, run.config.max_grad_norm)
        micro_metrics.append({"loss": loss.item(), **metrics})
        state.micro_batches += 1
        skipped += batch.skipped
        state.positions.update({str(k): v for k, v in batch.positions.items()})
    return micro_metrics, skipped, grad_norm


def online_gradients(run: Run) -> tuple[list[dict[str, float]], int, float]:
    """``accumulate_gradients`` for the online losses: collect when due, then the step's
    micro-batches of updates (training/online.py)."""
    micro_metrics = run.online.accumulate(run.batches, run.state)
    return micro_metrics, 0, gradient_norm(run.accelerator, run.policy, run.config.max_grad_norm)


def optimizer_step(
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    losses: list[float],
    grad_norm: float,
) -> bool:
    """Step the optimizer and the LR schedule, unless a loss or the gradient is non-finite on
    any rank: then the update is skipped on all of them (gradients are already synchronised, so
    every rank sees the same norm). Returns True when the step was skipped as non-finite."""
    local_bad = not all(math.isfinite(x) for x in losses)
    nonfinite = any_rank(accelerator, local_bad or not math.isfinite(grad_norm))
    if nonfinite and accelerator.scaler is not None:
        optimizer.step()  # fp16: the grad scaler skips the step and lowers its scale
    elif not nonfinite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not nonfinite and not accelerator.optimizer_step_was_skipped:
        lr_scheduler.step()
    return nonfinite


def count_nonfinite(run: Run, nonfinite: bool, grad_norm: float) -> None:
    """Count skipped steps (in a row and in total) and say so."""
    state = run.state
    run.consecutive_nonfinite = run.consecutive_nonfinite + 1 if nonfinite else 0
    state.nonfinite_steps += int(nonfinite)
    if nonfinite:
        logger.warning(
            "step %d: non-finite loss or gradient (grad norm %s), optimizer step skipped "
            "(%d in a row, %d in total)",
            state.global_step,
            grad_norm,
            run.consecutive_nonfinite,
            state.nonfinite_steps,
            main_process_only=True,
        )


def log_step(
    run: Run,
    micro_metrics: list[dict[str, float]],
    skipped: int,
    grad_norm: float,
    validation: dict[str, float] | None = None,
) -> dict[str, float]:
    """Reduce the step's metrics over micro-batches and ranks; send them to the trackers and
    the plain-text record (with the step's validation score, which the trackers already have)."""
    accelerator, state = run.accelerator, run.state
    logs = reduce_metrics(accelerator, micro_metrics)
    state.skipped_rows += int(accelerator.reduce(torch.tensor(skipped, device=accelerator.device)))
    logs.update(
        {
            "lr": run.lr_scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "data/skipped_rows": state.skipped_rows,
            "nonfinite_steps": state.nonfinite_steps,
        }
    )
    accelerator.log(logs, step=state.global_step)
    if accelerator.is_main_process:
        append_metrics(run.output_dir / METRICS_FILE, state.global_step,
                       {**logs, **(validation or {})})  # fmt: skip
    run.history.append(logs)
    return logs


def checkpoint_due(step: int, config: TrainConfig, stopping: bool) -> bool:
    """Every ``checkpointing_steps``, at the last step, and before stopping on non-finite steps."""
    return step % config.checkpointing_steps == 0 or step == config.max_train_steps or stopping


def save_checkpoint(run: Run) -> None:
    merged = checkpointing.TrainerState(**vars(run.state))
    merged.positions = {k: v for d in gather_object([run.state.positions]) for k, v in d.items()}
    checkpointing.save_checkpoint(run.accelerator, run.output_dir, merged, run.run_info,
                                  run.config.checkpoints_total_limit,
                                  lambda directory: write_card(run, directory))  # fmt: skip


def write_card(run: Run, directory: Path) -> None:
    """The model card (and the last validation grid) into ``directory``: each checkpoint and
    the output directory at the end."""
    last = run.validations[-1] if run.validations else None
    write_model_card(directory, last and last.grid, provenance=run.run_info,
                     step=run.state.global_step, family=run.models.family.name,
                     denoiser_folder=run.models.family.denoiser_folder,
                     processes=run.accelerator.num_processes,
                     metrics=run.history[-1] if run.history else None, validation=last)  # fmt: skip


def finish(run: Run) -> TrainResult:
    """Export the trained UNet (or LoRA adapters), report what the data skipped."""
    config, accelerator, state = run.config, run.accelerator, run.state
    unet_dir = checkpointing.export_unet(
        accelerator, run.policy, run.output_dir, run.run_info, run.models.policy_io
    )
    if accelerator.is_main_process:
        write_card(run, run.output_dir)
        if config.push_to_hub:
            last = run.validations[-1] if run.validations else None
            grid = last.grid.relative_to(run.output_dir) if last else None
            hub.push(run.output_dir, config.hub_model_id, unet_dir.name, grid)
    if state.skipped_rows:
        logger.warning(
            "skipped %d rows whose images did not decode",
            state.skipped_rows,
            main_process_only=True,
        )
    unreadable = getattr(run.dataset, "unreadable_files", [])
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
    return TrainResult(unet_dir, run.models, run.history, state.skipped_rows,
                       state.nonfinite_steps, unreadable,
                       [v for v in run.validations if v is not None])  # fmt: skip


def main(argv: list[str] | None = None) -> TrainResult | None:
    cli.setup_logging()
    config, checks = startup.prepare(parse_config(argv))
    if config.check_only:
        check_only(config)
        return None
    run = setup(config, checks, argv)
    state = run.state
    progress = tqdm(
        total=config.max_train_steps,
        initial=state.global_step,
        desc="steps",
        disable=not run.accelerator.is_local_main_process,
    )
    while state.global_step < config.max_train_steps:
        gradients = online_gradients if run.online is not None else accumulate_gradients
        started = time.perf_counter()
        micro_metrics, skipped, grad_norm = gradients(run)
        losses = [m["loss"] for m in micro_metrics]
        nonfinite = optimizer_step(run.accelerator, run.optimizer, run.lr_scheduler, losses,
                                   grad_norm)  # fmt: skip
        if run.online is not None:  # time/collect and time/update of the step
            micro_metrics = run.online.timed(micro_metrics, time.perf_counter() - started)
        state.global_step += 1
        count_nonfinite(run, nonfinite, grad_norm)
        stop = run.consecutive_nonfinite >= config.max_consecutive_nonfinite
        final = state.global_step == config.max_train_steps
        due = run.validator is not None and run.validator.due(state.global_step, final)
        logs = log_step(run, micro_metrics, skipped, grad_norm, validate(run) if due else None)
        progress.update(1)
        shown = ("reward", "reward/mean") if run.online else ("acc", "rewards/accuracies")
        progress.set_postfix(
            loss=f"{logs['loss']:.4f}", **{shown[0]: f"{logs.get(shown[1], math.nan):.3f}"}
        )

        if checkpoint_due(state.global_step, config, stop):
            save_checkpoint(run)
        if stop:
            raise NonFiniteTraining(
                f"{run.consecutive_nonfinite} optimizer steps in a row had a non-finite loss or "
                f"gradient (last at step {state.global_step}); stopped after saving "
                f"{run.output_dir / f'checkpoint-{state.global_step}'} (its weights are those of "
                "the last finite step). Lower the learning rate, check the data, or use bf16/fp32"
            )
    progress.close()
    return finish(run)


if __name__ == "__main__":
    cli.run(main)
