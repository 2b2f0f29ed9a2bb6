"""Start-up checks of ``train.py`` and what a run tells its user at the start and the end.

Everything here runs before any weights load and reads only small files: the model's configs
(for its native resolution, and to report a wrong ``--pretrained_model`` at once), the output
directory (a finished run is not overwritten by accident), the launcher's environment (a launch
that runs fewer processes than it was asked for), the tracker's credentials and
``metrics.jsonl`` (one run per file). Problems a user can fix raise ``cli.UsageError`` naming
the flag.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common import cli
from common.cli import UsageError
from models.configs import check_local_path, denoiser_model_config, model_config, native_resolution
from training.config import TrainConfig, parse_args, parse_config

logger = logging.getLogger("prefdiff")

# One JSON line per optimizer step, appended as it is logged, with the step's validation score
# when it validates (step 0's validation: a line of its own).
METRICS_FILE = "metrics.jsonl"
# A finished run's exported policy (checkpointing.export_unet): transformer/ for SD3 and Flux.
EXPORT_DIRS = ("unet", "transformer", "lora")
# What train.py writes into OUTPUT_DIR, removed by --overwrite_output_dir so that two runs'
# curves and grids never mix: the export, metrics, config, model card (hub.CARD_FILE), the
# validation grids (validation.VALIDATION_DIR) and the trackers' logs/ (TensorBoard's events).
RUN_FILES = (*EXPORT_DIRS, METRICS_FILE, "train_config.json", "README.md", "validation", "logs")
# A resolution this many times above or below the native one is announced as a warning: the
# cost of a step grows with the square of the side, and a model trained at one size draws
# poorly at a very different one.
FAR_FROM_NATIVE = 2.0


@dataclasses.dataclass
class Startup:
    """What the checks found, for the start-up block."""

    native_resolution: int
    notes: list[str] = dataclasses.field(default_factory=list)  # shown in the start-up block
    warnings: list[str] = dataclasses.field(default_factory=list)  # logged as warnings too


def model_flags(config: TrainConfig) -> list[tuple[str, str]]:
    """(flag, value) of every model the config names."""
    named = (
        ("--pretrained_model", config.pretrained_model),
        ("--reference_model", config.reference_model),
        ("--pretrained_vae", config.pretrained_vae),
    )
    return [(flag, value) for flag, value in named if value]


def check_local_paths(config: TrainConfig) -> None:
    """A model flag naming a local path that does not exist: UsageError at once (no imports)."""
    for flag, source in model_flags(config):
        check_local_path(source, flag)


def check_models(config: TrainConfig) -> int:
    """Read the configs of every model flag (a mistake surfaces here, in one line); returns the
    native resolution of the policy with its VAE."""
    unet = denoiser_model_config(config.pretrained_model, "--pretrained_model", config.revision)
    if config.reference_model:
        denoiser_model_config(config.reference_model, "--reference_model", config.revision)
    if config.pretrained_vae:
        vae = model_config(config.pretrained_vae, None, "--pretrained_vae", None)
    else:
        vae = model_config(config.pretrained_model, "vae", "--pretrained_model", config.revision)
    return native_resolution(unet, vae)


def resolution_notes(resolution: int, native: int) -> tuple[str, str | None]:
    """(the start-up block's resolution line, a warning when far from native)."""
    if resolution == native:
        return f"resolution: {resolution} px (the model's native size)", None
    ratio = resolution / native
    line = f"resolution: {resolution} px (the model's native size is {native} px)"
    if 1 / FAR_FROM_NATIVE < ratio < FAR_FROM_NATIVE:
        return line, None
    warning = (
        f"--resolution {resolution} is {ratio:g}x the model's native {native} px: a step costs "
        f"about {ratio**2:.3g}x the native one, and the model draws poorly far from its size; "
        "omit --resolution to train at the native size"
    )
    return line, warning


def warmup_warning(config: TrainConfig) -> str | None:
    """Warm-up that does not end before the run does: the learning rate never reaches its peak."""
    if config.lr_scheduler == "constant" or config.lr_warmup_steps < config.max_train_steps:
        return None
    reached = config.learning_rate * config.max_train_steps / max(1, config.lr_warmup_steps)
    return (
        f"--lr_warmup_steps {config.lr_warmup_steps} >= --max_train_steps "
        f"{config.max_train_steps}: the learning rate never reaches its peak "
        f"{config.learning_rate:g} (it ends near {reached:.3g}); lower --lr_warmup_steps"
    )


def finished_run(output_dir: Path) -> list[Path]:
    """The files that mark a finished run in ``output_dir``: its export and its metrics."""
    exports = [output_dir / name for name in EXPORT_DIRS if (output_dir / name).is_dir()]
    metrics = output_dir / METRICS_FILE
    return [*exports, metrics] if exports and metrics.is_file() else []


def check_output_dir(config: TrainConfig) -> None:
    """Refuse to train over a finished run unless asked; resuming is not overwriting."""
    if config.resume_from_checkpoint or config.overwrite_output_dir:
        return
    found = finished_run(Path(config.output_dir))
    if found:
        raise UsageError(
            f"--output_dir {config.output_dir} holds a finished run "
            f"({', '.join(str(p) for p in found)}): pass --overwrite_output_dir true to replace "
            "it, --resume_from_checkpoint latest to continue it, or choose another --output_dir"
        )


def clear_previous_run(output_dir: Path) -> list[str]:
    """--overwrite_output_dir: remove what an earlier run wrote (checkpoints, export, metrics,
    validation grids, tracker logs), so no checkpoint of it is resumed later and its metrics,
    curves and grids do not mix with the new ones."""
    from training.checkpointing import CHECKPOINT_PREFIX

    removed = []
    for path in [*output_dir.glob(f"{CHECKPOINT_PREFIX}*"), *(output_dir / n for n in RUN_FILES)]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(path.name)
    return removed


def is_main_launch_process() -> bool:
    """Rank 0 of a launch, from the environment (before accelerate is set up)."""
    return os.environ.get("RANK", "0") == "0"


def launched_alone(environ: Mapping[str, str], launcher_environ: Mapping[str, str]) -> bool:
    """True when ``accelerate launch`` was asked for more than one process but started only this
    one. Its single-process launcher (no ``--multi_gpu``, no multi-GPU ``--config_file``, at
    most one GPU visible) exports no process count; it sets ``MASTER_ADDR`` for its child only
    when asked for more than one process or machine, and never ``WORLD_SIZE`` (accelerate 1.16,
    utils/launch.py, ``prepare_simple_launcher_cmd_env``). Compared with the launcher's own
    environment, so a ``MASTER_ADDR`` the user exported does not count."""
    return (
        "ACCELERATE_MIXED_PRECISION" in environ  # set by every accelerate launcher
        and "WORLD_SIZE" not in environ
        and "MASTER_ADDR" in environ
        and "MASTER_ADDR" not in launcher_environ
    )


def launcher_problem() -> str | None:
    """A launch that runs one process where more were asked for trains at a fraction of the
    global batch the recipe computed; None when the launch is as asked (or cannot be told)."""
    try:
        import psutil  # accelerate's own dependency

        launcher_environ = psutil.Process(os.getppid()).environ()
    except Exception:  # another platform, or the launcher's environment is not readable
        return None
    if not launched_alone(os.environ, launcher_environ):
        return None
    return (
        "accelerate launch was asked for more than one process (--num_processes or "
        "--num_machines > 1) but started only this one: add --multi_gpu (on a CPU machine "
        "also ACCELERATE_USE_CPU=1) or a multi-GPU --config_file, or launch --num_processes 1"
    )


# wandb modes that need no account (WANDB_MODE or a wandb settings file).
WANDB_LOCAL_MODES = ("offline", "disabled", "dryrun")


def tracker_problem(config: TrainConfig) -> str | None:
    """``--report_to wandb`` without an account would fail after the models load, inside
    wandb.init: the credentials are looked up now the way wandb looks them up (WANDB_API_KEY,
    a settings file, .netrc), without prompting and without the network."""
    if config.report_to != "wandb":
        return None
    try:
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib.wbauth import authenticate
    except ImportError:  # a wandb other than requirements' lock: wandb.init decides later
        return None
    try:
        settings = wandb_setup.singleton().settings
        if settings.mode in WANDB_LOCAL_MODES:
            return None
        found = authenticate.authenticate_session(
            host=settings.base_url, source="train.py", prompt=False, update_session=False
        )
    except Exception as exc:  # wandb's own errors: a malformed key, an invalid WANDB_MODE
        return f"--report_to wandb: {str(exc).splitlines()[0]}"
    if found is not None:
        return None
    return (
        "--report_to wandb: no W&B API key (WANDB_API_KEY, `wandb login`, or a wandb settings "
        "file): log in, set WANDB_MODE=offline to log locally (wandb sync later), or use "
        "--report_to tensorboard"
    )


def prepare(config: TrainConfig) -> tuple[TrainConfig, Startup]:
    """Check the model flags, the output directory, the launch and the tracker; fill in the
    native resolution; collect the start-up block's notes and warnings. Call before any weights
    or data load; it removes nothing (``clear_previous_run`` does, once the data is checked)."""
    native = check_models(config)
    if config.resolution is None:
        config = dataclasses.replace(config, resolution=native)
    startup = Startup(native)
    line, far = resolution_notes(config.resolution, native)
    startup.notes.append(line)
    startup.warnings += [w for w in (far, warmup_warning(config)) if w]
    check_output_dir(config)
    for problem in (launcher_problem(), tracker_problem(config)):
        if problem:
            raise UsageError(problem)
    return config, startup


def overwrite(config: TrainConfig) -> str | None:
    """--overwrite_output_dir on the main process: clear the earlier run; the start-up note."""
    output_dir = Path(config.output_dir)
    if not (config.overwrite_output_dir and is_main_launch_process() and output_dir.is_dir()):
        return None
    removed = clear_previous_run(output_dir)
    return f"--overwrite_output_dir: removed {', '.join(sorted(removed))}" if removed else None


def start_metrics(path: Path, resumed_step: int) -> None:
    """Keep one run's metrics per file: a fresh run starts an empty file; a resumed one keeps
    the lines up to its checkpoint's step (later ones are redone and logged again)."""
    if not path.exists():
        return
    if resumed_step == 0:
        path.unlink()
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= resumed_step
    ]
    path.write_text("".join(f"{line}\n" for line in kept))


def describe_config(run_info: dict[str, Any]) -> str:
    """The resolved config for the log: one value per line, the values that differ from the
    defaults first (the full record is saved with every checkpoint as train_config.json)."""
    values = run_info["config"]
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    changed = [k for k in values if values[k] != defaults.get(k)]
    lines = [f"{k}: {values[k]}" for k in changed]
    lines.append(f"(other {len(values) - len(changed)} values at their defaults: see --help)")
    versions = ", ".join(f"{k} {v}" for k, v in run_info["versions"].items())
    lines += [f"versions: {versions}", f"git: {run_info['git_sha']}"]
    return "config:\n  " + "\n  ".join(lines)


def results(config: TrainConfig, model_dir: Path) -> str:
    """The last lines of a run: where everything it wrote is."""
    out = Path(config.output_dir)
    denoiser = "UNet" if model_dir.name == "unet" else "transformer"  # transformer/: SD3, Flux
    what = "LoRA adapters" if config.lora_rank else denoiser
    load = "lora_dir" if config.lora_rank else "unet_dir"
    lines = [
        f"{what}: {model_dir} (models.pipeline.load_pipeline({config.pretrained_model!r}, "
        f"{load}={str(model_dir)!r}); generate.py --{'lora' if config.lora_rank else 'unet'} "
        f"{out})",
        f"config, versions, git SHA: {out / 'train_config.json'}",
        f"metrics, one line per step (validation scores included): {out / METRICS_FILE}",
    ]
    lines.append(f"model card: {out / 'README.md'}")
    if (out / "validation").is_dir():
        lines.append(f"validation grids: {out / 'validation'}")
    if config.report_to == "tensorboard":
        lines.append(f"TensorBoard logs: {out / 'logs'}")
    elif config.report_to == "wandb":
        lines.append("wandb run: see wandb's lines above (offline runs: wandb sync)")
    from training.checkpointing import checkpoint_dirs

    checkpoints = checkpoint_dirs(out)
    if checkpoints:
        lines.append(f"checkpoints: {', '.join(str(p) for p in checkpoints)}")
    return "results:\n  " + "\n  ".join(lines)


def answer_help_early(module_name: str) -> None:
    """``train.py --help``, flag mistakes and missing local model paths, answered before the
    heavy imports that follow this call in ``train.py`` (only when it runs as a script)."""
    if module_name != "__main__":
        return
    cli.quiet_third_party()
    # A missing local model first: validating the rest may read files (prompts, data paths).
    cli.run(lambda argv: check_local_paths(parse_args(argv)), sys.argv[1:])
    cli.run(parse_config, sys.argv[1:])
