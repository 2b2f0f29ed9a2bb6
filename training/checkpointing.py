"""Resumable checkpoints and the final export, both written atomically.

A checkpoint is ``OUTPUT_DIR/checkpoint-<step>/`` holding accelerate's state (optimizer, LR
schedule, RNG states), the policy as ``unet/`` in diffusers format (with LoRA: ``lora/``, the
adapters only, see ``models/lora.py``), ``trainer_state.json`` (step
and data positions) and ``train_config.json`` (config, library versions, git SHA). It is written
under a temporary name, sealed by ``manifest.json`` (size and SHA-256 of every file, written
last) and renamed into place, so ``latest`` never picks a half-written one; on resume a checkpoint
whose files do not match its manifest is reported and the previous one is used.

Fault injection (tests only): ``PREFDIFF_KILL_DURING_SAVE=<step>`` makes the process SIGKILL
itself in the middle of writing checkpoint-<step>, after accelerate's state is on disk and before
the manifest and the rename, the widest window a real crash could hit.
"""

import hashlib
import json
import logging
import os
import shutil
import signal
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, init_empty_weights
from accelerate.utils import DistributedType

from common.cli import UsageError
from models.loading import FP32_NORMS
from models.lora import FullUNetIO, LoraIO
from training.distributed import fp32_state_dict

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TMP_SUFFIX = ".tmp"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "train_config.json"
MANIFEST_FILE = "manifest.json"
KILL_DURING_SAVE_ENV = "PREFDIFF_KILL_DURING_SAVE"
_HASH_CHUNK = 1 << 22


class DamagedCheckpoint(RuntimeError):
    """A checkpoint directory whose files do not match its manifest (or that has none)."""


@dataclass
class TrainerState:
    """What, beyond accelerate's own state, a resumed run needs to continue exactly."""

    global_step: int = 0  # optimizer steps taken
    micro_batches: int = 0  # batches consumed by each process
    positions: dict[str, list] = field(default_factory=dict)  # data stream role -> state
    skipped_rows: int = 0  # undecodable / missing rows skipped so far, all processes
    nonfinite_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient

    def save(self, directory: Path) -> None:
        (directory / STATE_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "TrainerState":
        return cls(**json.loads((directory / STATE_FILE).read_text()))


def full_model(
    accelerator: Accelerator,
    model: Any,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Any:
    """The model as a plain diffusers module holding all its weights, on the main process
    (None elsewhere). Call it on EVERY process: under FSDP, gathering the shards is collective,
    and under DeepSpeed so is assembling the fp32 master weights (the engine's module holds
    half-precision copies when training in fp16/bf16). Plain and DDP runs get the live module;
    the others a copy (``rebuilt``) in fp32 on the CPU, or on ``device`` in ``dtype``."""
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type == DistributedType.FSDP:
        state = accelerator.get_state_dict(model)  # full state dict on rank 0 (FULL_STATE_DICT)
    elif accelerator.distributed_type == DistributedType.DEEPSPEED:
        state = fp32_state_dict(accelerator, model)
    else:
        return unwrapped if accelerator.is_main_process else None
    if not accelerator.is_main_process:
        return None
    return rebuilt(unwrapped, state, device or torch.device("cpu"), dtype)


def rebuilt(
    module: Any, state: dict[str, Any], device: torch.device, dtype: torch.dtype | None = None
) -> Any:
    """A copy of ``module`` (same class, config and LoRA adapters) holding ``state``, on
    ``device``. ``state``'s entries are replaced one by one by the moved tensors, so the
    gathered CPU copy is freed as the new one fills (never two whole copies at once).

    Built with its parameters on the meta device, then given the state's tensors in place
    (``load_state_dict(assign=True)``): no memory for a random init, and none of the global RNG
    drawn (training's random stream must not depend on when checkpoints or validations run).
    With ``dtype`` (validation), everything but the norms' weights and the floating buffers is
    cast to it, as for the frozen reference: under autocast the copy then computes exactly
    what the fp32 policy computes, in about half the memory."""
    with torch.random.fork_rng(devices=[]), init_empty_weights():
        full = type(module).from_config(module.config)
        for name, adapter in getattr(module, "peft_config", {}).items():
            full.add_adapter(adapter, adapter_name=name)
    keep = set() if dtype is None else fp32_names(full)
    for name in list(state):
        value = state.pop(name)
        cast = dtype is not None and value.is_floating_point() and name not in keep
        state[name] = value.to(device=device, dtype=dtype if cast else value.dtype)
    full.load_state_dict(state, assign=True)
    return full.to(device)  # buffers left out of the state dict (non-persistent) too


def fp32_names(module: torch.nn.Module) -> set[str]:
    """State-dict names that stay fp32 in a half-precision copy (``rebuilt``): the weights of
    the norms (``models.loading.FP32_NORMS``) and every buffer."""
    names = {name for name, _ in module.named_buffers()}
    for prefix, sub in module.named_modules():
        if isinstance(sub, FP32_NORMS):
            names.update(f"{prefix}.{n}" if prefix else n for n, _ in sub.named_parameters())
    return names


def register_unet_hooks(accelerator: Accelerator, io: FullUNetIO | LoraIO | None = None) -> None:
    """Make save_state/load_state write and read the policy as diffusers ``unet/`` (full
    fine-tuning) or as ``lora/`` (LoRA adapters only).

    Under FSDP and DeepSpeed accelerate saves and loads the model in its own format and hands
    the load hook no models; ``unet/`` is still written, for export and inspection. (LoRA is
    not supported under FSDP: the gathered copy has no adapters.)"""
    io = io or FullUNetIO()

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        for model in models:
            full = full_model(accelerator, model)
            if full is not None:
                io.save(full, Path(output_dir) / io.subfolder)
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Record size and SHA-256 of every file under ``directory``; written last, it seals it."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    entries = {
        str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in files
    }
    tmp = directory / f"{MANIFEST_FILE}{TMP_SUFFIX}"
    tmp.write_text(json.dumps({"files": entries}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, directory / MANIFEST_FILE)


def verify_checkpoint(directory: Path) -> None:
    """Raise DamagedCheckpoint naming the first file that is missing or differs."""
    try:
        entries = json.loads((directory / MANIFEST_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError) as exc:
        raise DamagedCheckpoint(f"{directory}: no readable {MANIFEST_FILE} ({exc})") from exc
    for name, expected in entries.items():
        path = directory / name
        if not path.is_file():
            raise DamagedCheckpoint(f"{directory}: {name} is missing")
        if path.stat().st_size != expected["size"]:
            raise DamagedCheckpoint(
                f"{directory}: {name} has {path.stat().st_size} bytes, manifest says "
                f"{expected['size']}"
            )
        if _sha256(path) != expected["sha256"]:
            raise DamagedCheckpoint(f"{directory}: {name} does not match its SHA-256")


def resolve_resume(output_dir: Path, resume_from: str | None) -> Path | None:
    """``latest`` -> newest checkpoint that verifies (None if there is none yet), falling back
    past damaged ones with a warning; otherwise the given path, which must verify."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        for candidate in reversed(checkpoint_dirs(output_dir)):
            try:
                verify_checkpoint(candidate)
            except DamagedCheckpoint as exc:
                logger.warning("not resuming from damaged checkpoint: %s; trying an older one", exc)
                continue
            return candidate
        logger.info(
            "--resume_from_checkpoint latest: no checkpoint found in %s, starting fresh", output_dir
        )
        return None
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise UsageError(f"--resume_from_checkpoint {path}: no {STATE_FILE} there")
    verify_checkpoint(path)
    return path


def _maybe_kill_during_save(step: int) -> None:
    if os.environ.get(KILL_DURING_SAVE_ENV) == str(step):
        logger.warning("%s=%d: killing this process mid-save", KILL_DURING_SAVE_ENV, step)
        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    state: TrainerState,
    provenance: dict[str, Any],
    total_limit: int | None,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoint-<step> atomically, then drop the oldest beyond ``total_limit``;
    ``write_extra(directory)`` adds files (the model card) before the manifest seals it."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{state.global_step}"
    tmp = output_dir / f"{final.name}{TMP_SUFFIX}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)  # left over from a crash during an earlier save
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every rank's RNG state is in tmp before it is sealed
    if accelerator.is_main_process:
        state.save(tmp)
        _maybe_kill_during_save(state.global_step)
        (tmp / CONFIG_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
        if write_extra is not None:
            write_extra(tmp)
        write_manifest(tmp)
        old = output_dir / f"{final.name}.old"
        if final.exists():  # moved aside, not deleted, until the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
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
    LoRA, atomically; call on every process (the main one writes)."""
    io = io or FullUNetIO()
    target = output_dir / io.subfolder
    full = full_model(accelerator, policy)
    if accelerator.is_main_process:
        tmp = output_dir / f"{io.subfolder}{TMP_SUFFIX}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        io.save(full, tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        (output_dir / CONFIG_FILE).write_text(
            json.dumps(provenance, indent=2, sort_keys=True) + "\n"
        )
    accelerator.wait_for_everyone()
    return target
