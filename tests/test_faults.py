"""Surviving faults: SIGKILL during training and during a save, damaged checkpoints, NaN losses.

The SIGKILL tests run ``train.main`` in a forked process (SIGKILL from outside, or the
checkpoint writer's fault-injection hook mid-save) and compare the per-step losses it
appends to ``metrics.jsonl`` with an uninterrupted run's (same seed, same environment).
"""

import json
import math
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

import train
from tests.support import reset_accelerate
from training import checkpointing

STEPS = 6


def train_argv(model: Path, toy: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model", str(model), "--data", str(toy / "pickapic"),
        "--output_dir", str(out), "--resolution", "64", "--train_batch_size", "1",
        "--max_train_steps", str(STEPS), "--learning_rate", "1e-3", "--lr_warmup_steps", "2",
        "--checkpointing_steps", "2", "--dataloader_num_workers", "0", "--report_to", "none",
        "--beta", "500", *extra,
    ]  # fmt: skip


def _run_main(args: list[str], env: dict[str, str]) -> None:
    reset_accelerate()
    os.environ.update(env)
    torch.set_num_threads(1)
    train.main(args)


def start(args: list[str], **env: str) -> multiprocessing.Process:
    """train.main in a forked process (no re-import), which a real SIGKILL can hit."""
    process = multiprocessing.get_context("fork").Process(target=_run_main, args=(args, env))
    process.start()
    return process


def finish(process: multiprocessing.Process) -> int:
    process.join(timeout=300)
    if process.exitcode not in (0, -signal.SIGKILL):
        pytest.fail(f"train.main failed with exit code {process.exitcode} (see the log above)")
    return process.exitcode


def losses_by_step(out: Path) -> dict[int, float]:
    """The last record of each step (a killed run may have logged steps that were redone)."""
    lines = (out / train.METRICS_FILE).read_text().splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines)}


def wait_for_step(out: Path, step: int, process: multiprocessing.Process) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.is_alive():
        path = out / train.METRICS_FILE
        if path.exists() and len(path.read_text().splitlines()) >= step:
            return
        time.sleep(0.05)
    pytest.fail(f"train.py never logged step {step}")


@pytest.fixture(scope="module")
def uninterrupted(tiny_sd15_dir, toy_data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "full"
    assert finish(start(train_argv(tiny_sd15_dir, toy_data_dir, out))) == 0
    return out


def test_sigkill_during_training_resumes_exactly(
    uninterrupted, tiny_sd15_dir, toy_data_dir, tmp_path
):
    out = tmp_path / "killed"
    args = train_argv(tiny_sd15_dir, toy_data_dir, out)
    process = start(args)
    wait_for_step(out, 3, process)  # checkpoint-2 is sealed; step 4 (or its save) under way
    os.kill(process.pid, signal.SIGKILL)
    assert finish(process) == -signal.SIGKILL
    sealed = [p.name for p in checkpointing.checkpoint_dirs(out)]
    assert sealed in (["checkpoint-2"], ["checkpoint-2", "checkpoint-4"])  # where the kill hit

    assert finish(start([*args, "--resume_from_checkpoint", "latest"])) == 0
    expected = losses_by_step(uninterrupted)
    assert len(expected) == STEPS
    assert losses_by_step(out) == expected  # bit-identical, every step
    state = checkpointing.TrainerState.load(out / f"checkpoint-{STEPS}")
    assert state == checkpointing.TrainerState.load(uninterrupted / f"checkpoint-{STEPS}")


def test_sigkill_during_a_save_never_leaves_a_checkpoint_latest_would_pick(
    uninterrupted, tiny_sd15_dir, toy_data_dir, tmp_path
):
    out = tmp_path / "killed-saving"
    args = train_argv(tiny_sd15_dir, toy_data_dir, out)
    process = start(args, **{checkpointing.KILL_DURING_SAVE_ENV: "4"})
    assert finish(process) == -signal.SIGKILL
    assert (out / "checkpoint-4.tmp" / "unet").is_dir()  # killed half-way through writing it
    assert checkpointing.resolve_resume(out, "latest") == out / "checkpoint-2"

    assert finish(start([*args, "--resume_from_checkpoint", "latest"])) == 0
    assert losses_by_step(out) == losses_by_step(uninterrupted)
    assert not list(out.glob("*.tmp"))


def test_a_damaged_checkpoint_is_detected_and_the_previous_one_used(
    uninterrupted, tmp_path, caplog
):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(uninterrupted, out)
    latest = out / f"checkpoint-{STEPS}"
    weights = next((latest / "unet").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte, same size
    weights.write_bytes(bytes(data))
    with pytest.raises(checkpointing.DamagedCheckpoint, match="SHA-256"):
        checkpointing.verify_checkpoint(latest)
    assert checkpointing.resolve_resume(out, "latest") == out / f"checkpoint-{STEPS - 2}"
    assert f"checkpoint-{STEPS}" in caplog.text and "damaged" in caplog.text

    (out / f"checkpoint-{STEPS - 2}" / checkpointing.STATE_FILE).write_text("{}")  # truncated
    assert checkpointing.resolve_resume(out, "latest") == out / f"checkpoint-{STEPS - 4}"
    with pytest.raises(checkpointing.DamagedCheckpoint):
        checkpointing.resolve_resume(out, str(latest))  # an explicit path is not replaced


def nan_at(calls: set[int], monkeypatch) -> None:
    """Make the real loss NaN on the given (0-based) micro-batches: NaN loss and gradients."""
    build = train.build_loss
    counter = iter(range(10**6))

    def build_with_nans(name, options):
        loss_fn = build(name, options)

        def loss_with_nans(*args, **kwargs):
            loss, metrics = loss_fn(*args, **kwargs)
            return (loss * math.nan if next(counter) in calls else loss), metrics

        return loss_with_nans

    monkeypatch.setattr(train, "build_loss", build_with_nans)


def unet_params(directory: Path) -> torch.Tensor:
    unet = UNet2DConditionModel.from_pretrained(directory, subfolder="unet")
    return torch.cat([p.detach().flatten() for p in unet.parameters()])


def test_a_nan_loss_skips_that_step_only(tiny_sd15_dir, toy_data_dir, tmp_path, caplog):
    nan_at({1}, monkeypatch := pytest.MonkeyPatch())
    out = tmp_path / "out"
    try:
        result = train.main(train_argv(tiny_sd15_dir, toy_data_dir, out, "--max_train_steps",
                                       "3", "--checkpointing_steps", "1"))  # fmt: skip
    finally:
        monkeypatch.undo()
    assert result.nonfinite_steps == 1
    assert [h["nonfinite_steps"] for h in result.history] == [0, 1, 1]
    assert math.isnan(result.history[1]["loss"]) and math.isfinite(result.history[2]["loss"])
    assert "step 2: non-finite loss or gradient" in caplog.text
    one, two, three = (unet_params(out / f"checkpoint-{s}") for s in (1, 2, 3))
    assert torch.equal(one, two)  # the NaN step changed nothing
    assert not torch.equal(two, three) and torch.isfinite(three).all()
    state = checkpointing.TrainerState.load(out / "checkpoint-3")
    assert state.nonfinite_steps == 1


def test_consecutive_nans_stop_the_run_with_a_checkpoint(tiny_sd15_dir, toy_data_dir, tmp_path):
    nan_at(set(range(1, 100)), monkeypatch := pytest.MonkeyPatch())
    out = tmp_path / "out"
    try:
        with pytest.raises(train.NonFiniteTraining, match="3 optimizer steps in a row"):
            train.main(train_argv(tiny_sd15_dir, toy_data_dir, out, "--checkpointing_steps",
                                  "100", "--max_consecutive_nonfinite", "3"))  # fmt: skip
    finally:
        monkeypatch.undo()
    assert [p.name for p in checkpointing.checkpoint_dirs(out)] == ["checkpoint-4"]
    checkpointing.verify_checkpoint(out / "checkpoint-4")
    assert checkpointing.TrainerState.load(out / "checkpoint-4").nonfinite_steps == 3
    assert torch.isfinite(unet_params(out / "checkpoint-4")).all()
