"""Memory and speed options run on the tiny model and leave the maths alone where they should."""

import math

import pytest
import torch
from diffusers import UNet2DConditionModel

from tests.support import reset_accelerate
from tests.test_train import run

ONE_PAIR = ("--train_batch_size", "1", "--max_train_steps", "2", "--learning_rate", "1e-2")


def moved(result, model_dir) -> bool:
    base = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    return all(
        not torch.equal(a.detach(), b)
        for a, b in zip(result.models.policy.parameters(), base.parameters(), strict=True)
    )


def test_gradient_checkpointing_trains_the_same_weights(tiny_sd15_dir, toy_data_dir, tmp_path):
    plain = run(tiny_sd15_dir, toy_data_dir, tmp_path / "a", "dpo", *ONE_PAIR)
    reset_accelerate()
    ckpt = run(tiny_sd15_dir, toy_data_dir, tmp_path / "b", "dpo", *ONE_PAIR,
               "--gradient_checkpointing", "true")  # fmt: skip
    assert ckpt.models.policy.is_gradient_checkpointing
    assert [h["loss"] for h in plain.history] == [h["loss"] for h in ckpt.history]
    for a, b in zip(plain.models.policy.parameters(), ckpt.models.policy.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["adamw8bit", "adafactor"])
def test_optimizer_steps_every_parameter(optimizer, tiny_sd15_dir, toy_data_dir, tmp_path):
    if optimizer == "adamw8bit":
        pytest.importorskip("bitsandbytes", reason="optional extra: requirements-8bit.txt")
    result = run(tiny_sd15_dir, toy_data_dir, tmp_path / "out", "dpo", *ONE_PAIR,
                 "--optimizer", optimizer)  # fmt: skip
    assert all(math.isfinite(h["loss"]) for h in result.history)
    assert moved(result, tiny_sd15_dir)


def test_eager_attention_matches_sdpa(tiny_sd15_dir, toy_data_dir, tmp_path):
    sdpa = run(tiny_sd15_dir, toy_data_dir, tmp_path / "a", "dpo", *ONE_PAIR)
    reset_accelerate()
    eager = run(tiny_sd15_dir, toy_data_dir, tmp_path / "b", "dpo", *ONE_PAIR,
                "--attention", "eager")  # fmt: skip
    # Step 1 runs both attention kernels on identical weights: only rounding may differ. (Later
    # steps would compare Adam updates, which normalise that rounding up to full-size steps.)
    assert sdpa.history[0]["err/policy"] == pytest.approx(eager.history[0]["err/policy"], rel=1e-6)


# bf16 with full fine-tuning: tests/test_train.py::test_bf16_policy_and_reference_agree_at_start.
@pytest.mark.parametrize("precision", ["fp16"])
def test_mixed_precision_keeps_trainable_weights_fp32(precision, tiny_sd15_dir, toy_data_dir,
                                                      tmp_path):  # fmt: skip
    result = run(tiny_sd15_dir, toy_data_dir, tmp_path / "out", "dpo", *ONE_PAIR,
                 "--mixed_precision", precision, "--lora_rank", "4")  # fmt: skip
    dtypes = {p.dtype for p in result.models.policy.parameters() if p.requires_grad}
    assert dtypes == {torch.float32}
    frozen = {p.dtype for p in result.models.policy.parameters() if not p.requires_grad}
    assert frozen == {getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[precision])}
    assert all(math.isfinite(h["loss"]) for h in result.history)


def test_torch_compile_trains(tiny_sd15_dir, toy_data_dir, tmp_path):
    # The eager backend captures graphs like inductor but skips code generation (fast on CPU).
    result = run(tiny_sd15_dir, toy_data_dir, tmp_path / "out", "dpo", *ONE_PAIR,
                 "--torch_compile", "true", "--compile_backend", "eager")  # fmt: skip
    assert all(math.isfinite(h["loss"]) for h in result.history)
    assert moved(result, tiny_sd15_dir)
    saved = UNet2DConditionModel.from_pretrained(tmp_path / "out", subfolder="unet")
    assert torch.equal(saved.conv_in.weight, result.models.policy.conv_in.weight)
