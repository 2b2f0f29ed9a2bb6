"""Resumable checkpoints and the final export, both written atomically.

A checkpoint is ``OUTPUT_DIR/checkpoint-<step>/`` holding accelerate's state (optimizer, LR
schedule, RNG states), the policy as ``unet/`` in diffusers format (with LoRA: ``lora/``, the
adapters only, see ``models/lora.py``), ``trainer_state.json`` (step
and data positions) and ``train_config.json`` (config, library versions, git SHA). It is written
under a temporary name and renamed into place, so ``latest`` never picks a half-written one.
"""

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from models.lora import FullUNetIO, LoraIO

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TMP_SUFFIX = ".tmp"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "train_config.json"


@dataclass
class TrainerState:
    """What, beyond accelerate's own state, a resumed run needs to continue exactly."""

    global_step: int = 0  # optimizer steps taken
    micro_batches: int = 0  # batches consumed by each process
    positions: dict[str, list] = field(default_factory=dict)  # data stream role -> state
    skipped_rows: int = 0  # undecodable / missing rows skipped so far, all processes

    def save(self, directory: Path) -> None:
        (directory / STATE_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "TrainerState":
        return cls(**json.loads((directory / STATE_FILE).read_text()))


def register_unet_hooks(accelerator: Accelerator, io: FullUNetIO | LoraIO | None = None) -> None:
    """Make save_state/load_state write and read the policy as diffusers ``unet/`` (full
    fine-tuning) or as ``lora/`` (LoRA adapters only)."""
    io = io or FullUNetIO()

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            for model in models:
                io.save(accelerator.unwrap_model(model), Path(output_dir) / io.subfolder)
        weights.clear()  # accelerate would otherwise save the same weights again

    def load_hook(models: list, input_dir: str) -> None:
        while models:
            model = accelerator.unwrap_model(models.pop())
            io.load(model, Path(input_dir) / io.subfolder)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Completed checkpoints, oldest first (temporary, half-written ones are ignored)."""
    found = [
        p
        for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*")
        if p.is_dir() and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def resolve_resume(output_dir: Path, resume_from: str | None) -> Path | None:
    """``latest`` -> newest checkpoint (None if there is none yet); otherwise the given path."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {path}: no {STATE_FILE} there")
    return path


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    state: TrainerState,
    provenance: dict[str, Any],
    total_limit: int | None,
) -> Path:
    """Write checkpoint-<step> atomically, then drop the oldest beyond ``total_limit``."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{state.global_step}"
    tmp = output_dir / f"{final.name}{TMP_SUFFIX}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)  # left over from a crash during an earlier save
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        state.save(tmp)
        (tmp / CONFIG_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if total_limit is not None:
            for old in checkpoint_dirs(output_dir)[:-total_limit]:
                shutil.rmtree(old)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final


def export_unet(
    accelerator: Accelerator,
    policy: Any,
    output_dir: Path,
    provenance: dict[str, Any],
    io: FullUNetIO | LoraIO | None = None,
) -> Path:
    """Write ``OUTPUT_DIR/unet`` (diffusers format, safetensors), or ``OUTPUT_DIR/lora`` with
    LoRA, atomically; main process only."""
    io = io or FullUNetIO()
    target = output_dir / io.subfolder
    if accelerator.is_main_process:
        tmp = output_dir / f"{io.subfolder}{TMP_SUFFIX}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        io.save(accelerator.unwrap_model(policy), tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        (output_dir / CONFIG_FILE).write_text(
            json.dumps(provenance, indent=2, sort_keys=True) + "\n"
        )
    accelerator.wait_for_everyone()
    return target
