"""LoRA: only the adapters train, the reference is the base UNet exactly, the saved adapters
load into a pipeline and reproduce the trained policy's images, and resume is exact."""

import math

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from models.lora import LORA_WEIGHTS, TRAINABLE_STATE
from models.pipeline import load_pipeline
from tests.support import reset_accelerate
from tests.test_train import run

LORA = ("--lora_rank", "4", "--learning_rate", "1e-2")


@pytest.fixture(scope="module")
def trained(tiny_sd15_dir, toy_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "out"
    reset_accelerate()
    result = run(tiny_sd15_dir, toy_data_dir, out, "dpo", *LORA)
    reset_accelerate()
    return result


def test_only_adapter_weights_change(trained, tiny_sd15_dir):
    base = dict(UNet2DConditionModel.from_pretrained(tiny_sd15_dir, subfolder="unet")
                .named_parameters())  # fmt: skip
    assert trained.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # B = 0 at start
    adapters = 0
    for name, param in trained.models.policy.named_parameters():
        if "lora_" in name:
            adapters += 1
            assert param.requires_grad and param.dtype == torch.float32
            if "lora_B" in name:
                assert param.abs().sum() > 0, f"{name} did not move from zero"
        else:
            assert not param.requires_grad
            key = name.replace(".base_layer", "")
            assert torch.equal(param, base[key]), f"base parameter {name} moved"
    assert adapters > 0


def test_reference_path_equals_the_base_unet_exactly(trained, tiny_sd15_dir):
    base = UNet2DConditionModel.from_pretrained(tiny_sd15_dir, subfolder="unet")
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 4, 8, 8, generator=generator)
    hidden = torch.randn(2, 77, base.config.cross_attention_dim, generator=generator)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        expected = base(noisy, t, encoder_hidden_states=hidden).sample
        reference = trained.models.reference(noisy, t, encoder_hidden_states=hidden).sample
        policy = trained.models.policy(noisy, t, encoder_hidden_states=hidden).sample
    assert torch.equal(reference, expected)
    assert not torch.allclose(policy, expected)  # the adapters are back on after the call


def test_saved_adapters_load_into_a_pipeline_and_give_the_same_images(trained, tiny_sd15_dir):
    lora_dir = trained.unet_dir
    assert lora_dir.name == "lora" and (lora_dir / LORA_WEIGHTS).is_file()
    assert not (lora_dir.parent / "unet").exists()  # no full UNet copy is written

    def images(pipe):
        generator = torch.Generator().manual_seed(1)
        return pipe("a red circle", num_inference_steps=3, height=64, width=64,
                    generator=generator, output_type="np").images  # fmt: skip

    loaded = load_pipeline(tiny_sd15_dir, lora_dir=lora_dir)
    in_memory = load_pipeline(tiny_sd15_dir)
    in_memory.unet = trained.models.policy.eval()
    try:
        np.testing.assert_allclose(images(loaded), images(in_memory), atol=1e-5)
        base = load_pipeline(tiny_sd15_dir)
        assert np.abs(images(base) - images(loaded)).max() > 1e-4  # the adapters matter
    finally:
        trained.models.policy.train()


def test_lora_resume_reproduces_an_uninterrupted_run(tiny_sd15_dir, toy_data_dir, tmp_path):
    model = tiny_sd15_dir
    common = (*LORA, "--train_batch_size", "1", "--checkpointing_steps", "1")
    full = run(model, toy_data_dir, tmp_path / "full", "dpo", *common, "--max_train_steps", "2")
    reset_accelerate()
    part = tmp_path / "part"
    run(model, toy_data_dir, part, "dpo", *common, "--max_train_steps", "1")
    assert (part / "checkpoint-1" / "lora" / TRAINABLE_STATE).is_file()
    reset_accelerate()
    resumed = run(model, toy_data_dir, part, "dpo", *common, "--max_train_steps", "2",
                  "--resume_from_checkpoint", "latest")  # fmt: skip
    assert len(resumed.history) == 1
    assert resumed.history[0]["loss"] == full.history[1]["loss"]
    assert resumed.history[0]["loss"] != full.history[0]["loss"]  # step 1 moved the adapters
    for (name, a), b in zip(
        full.models.policy.named_parameters(), resumed.models.policy.parameters(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("loss", "extra"),
    [("dspo", ()), ("mapo", ()), ("dpo", ("--winner_preserving_mu", "0.9"))],
    ids=["dspo", "mapo", "dpo-safeguard"],
)
def test_every_kind_of_loss_trains_the_adapters_only(loss, extra, tiny_sd15_dir, toy_data_dir,
                                                     tmp_path):  # fmt: skip
    """Per-pixel (dspo), reference-free (mapo) and safeguarded losses on LoRA."""
    result = run(tiny_sd15_dir, toy_data_dir, tmp_path / "out", loss, *LORA, *extra)
    assert all(math.isfinite(step["loss"]) for step in result.history)
    base = dict(UNet2DConditionModel.from_pretrained(tiny_sd15_dir, subfolder="unet")
                .named_parameters())  # fmt: skip
    for name, param in result.models.policy.named_parameters():
        if "lora_B" in name:
            assert param.abs().sum() > 0, f"{name} did not move from zero"
        elif "lora_" not in name:
            assert torch.equal(param, base[name.replace(".base_layer", "")]), name
    assert (result.models.reference is None) == (loss == "mapo")  # mapo: no reference at all
    assert load_pipeline(tiny_sd15_dir, lora_dir=result.unet_dir) is not None


def test_lora_dropout_runs_are_reproducible(tiny_sd15_dir, toy_data_dir, tmp_path):
    """LoRA dropout draws from the global RNG, which the trainer seeds from --seed."""
    args = (*LORA, "--lora_dropout", "0.5", "--train_batch_size", "1", "--max_train_steps", "2")
    first = run(tiny_sd15_dir, toy_data_dir, tmp_path / "a", "dpo", *args)
    reset_accelerate()
    torch.manual_seed(12345)  # whatever the caller did to the global RNG before
    second = run(tiny_sd15_dir, toy_data_dir, tmp_path / "b", "dpo", *args)
    assert [h["loss"] for h in first.history] == [h["loss"] for h in second.history]
    for a, b in zip(first.models.policy.parameters(), second.models.policy.parameters(),
                    strict=True):  # fmt: skip
        assert torch.equal(a, b)
