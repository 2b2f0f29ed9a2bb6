"""What a GPU launch depends on, checked as far as a CPU can: step 0 is log 2 in half precision
with real (non-trivial) norm weights, train.py's accumulation and clipping hold under what the
launcher exports, DeepSpeed's "auto" values are filled before prepare, LoRA under FSDP is
refused, the exported LoRA keeps its alpha, SDXL's zero-embedding dropout option."""

import math
from pathlib import Path

import pytest
import torch
from accelerate.utils import DeepSpeedPlugin, DistributedType
from diffusers import UNet2DConditionModel

from config import TrainConfig
from distributed import LaunchConfigError, check_backend, configure_deepspeed
from models import load_pipeline
from tests.support import reset_accelerate
from tests.test_train import run

LOG2 = math.log(2)


@pytest.fixture(scope="module")
def nontrivial_norms_dir(tiny_sd15_dir: Path, tmp_path_factory) -> Path:
    """The tiny model with random GroupNorm/LayerNorm weights and biases, like a real
    checkpoint's (a fresh model has exactly 1 and 0, which bf16 represents exactly)."""
    out = tmp_path_factory.mktemp("norms") / "model"
    pipe = load_pipeline(tiny_sd15_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in pipe.unet.modules():
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                shape = module.weight.shape
                module.weight.copy_(1 + 0.3 * torch.randn(shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(shape, generator=generator))
    pipe.save_pretrained(out, safe_serialization=True)
    return out


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_bf16_step0_is_log2_with_nontrivial_norm_weights(
    nontrivial_norms_dir, toy_data_dir, tmp_path, lora
):
    extra = ("--lora_rank", "4") if lora else ()
    result = run(nontrivial_norms_dir, toy_data_dir, tmp_path / "out", "dpo",
                 "--max_train_steps", "1", "--mixed_precision", "bf16", "--beta", "5000",
                 *extra)  # fmt: skip
    first = result.history[0]
    assert first["rewards/margins"] == 0.0
    assert first["loss"] == pytest.approx(LOG2, abs=1e-6)


def test_reference_keeps_fp32_norms_and_half_precision_elsewhere(nontrivial_norms_dir,
                                                                 toy_data_dir, tmp_path):  # fmt: skip
    result = run(nontrivial_norms_dir, toy_data_dir, tmp_path / "out", "dpo",
                 "--max_train_steps", "1", "--mixed_precision", "bf16")  # fmt: skip
    reference = result.models.reference
    dtypes = {
        isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)): m.weight.dtype
        for m in reference.modules()
        if getattr(m, "weight", None) is not None
    }
    assert dtypes == {True: torch.float32, False: torch.bfloat16}
    base = UNet2DConditionModel.from_pretrained(nontrivial_norms_dir, subfolder="unet")
    for name, param in reference.named_parameters():
        assert torch.equal(param.float(), base.get_parameter(name).to(param.dtype).float())


def zero2_plugin() -> DeepSpeedPlugin:
    """The plugin `accelerate launch --config_file configs/deepspeed_zero2.yaml` builds: its
    micro-batch size is "auto" and its accumulation and clipping come from the yaml."""
    return DeepSpeedPlugin(zero_stage=2, gradient_accumulation_steps=1, gradient_clipping=1.0)


def test_deepspeed_autos_are_filled_before_prepare():
    plugin = zero2_plugin()
    assert plugin.is_auto("train_micro_batch_size_per_gpu")  # accelerate would raise at prepare
    config = TrainConfig(train_batch_size=3, gradient_accumulation_steps=4, max_grad_norm=0.5)
    configure_deepspeed(plugin, config, num_processes=2)
    ds = plugin.deepspeed_config
    assert not plugin.is_auto("train_micro_batch_size_per_gpu")
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["train_batch_size"] == 3 * 4 * 2
    assert ds["gradient_accumulation_steps"] == 4  # the flag holds, not the yaml's 1
    assert ds["gradient_clipping"] == 0.5
    assert plugin.get_value("gradient_accumulation_steps") == 4


def test_launcher_accumulation_does_not_override_the_flag(
    tiny_sd15_dir, toy_data_dir, tmp_path, monkeypatch
):
    """`accelerate launch` exports ACCELERATE_GRADIENT_ACCUMULATION_STEPS (from its yaml or
    flag), which accelerate lets override the Accelerator's argument. With Adam's epsilon at 1
    and no clipping, the update depends on the gradient's scale, so a run whose backward was
    scaled for accumulation 1 (gradients summed, not averaged) ends elsewhere."""
    args = ("--train_batch_size", "1", "--gradient_accumulation_steps", "2",
            "--max_train_steps", "1", "--adam_epsilon", "1", "--max_grad_norm", "0")  # fmt: skip
    plain = run(tiny_sd15_dir, toy_data_dir, tmp_path / "plain", "dpo", *args)
    reset_accelerate()
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    launched = run(tiny_sd15_dir, toy_data_dir, tmp_path / "launched", "dpo", *args)
    assert launched.history[0]["loss"] == plain.history[0]["loss"]
    for (name, a), b in zip(plain.models.policy.named_parameters(),
                            launched.models.policy.parameters(), strict=True):  # fmt: skip
        assert torch.equal(a, b), name


def test_lora_under_fsdp_is_refused_at_startup():
    with pytest.raises(LaunchConfigError, match="--lora_rank is not supported under FSDP"):
        check_backend(DistributedType.FSDP, TrainConfig(lora_rank=4))
    check_backend(DistributedType.FSDP, TrainConfig())  # full fine-tuning is fine
    check_backend(DistributedType.DEEPSPEED, TrainConfig(lora_rank=4))


def test_exported_lora_keeps_alpha(tiny_sd15_dir, toy_data_dir, tmp_path):
    """rank 4, alpha 16: scale 4. diffusers' load_lora_weights must restore the alpha from the
    file, or the loaded adapter is 4x weaker than the trained one."""
    result = run(tiny_sd15_dir, toy_data_dir, tmp_path / "out", "dpo", "--lora_rank", "4",
                 "--lora_alpha", "16", "--learning_rate", "1e-2", "--max_train_steps", "1")  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 4, 8, 8, generator=generator)
    hidden = torch.randn(2, 77, 32, generator=generator)
    t = torch.tensor([10, 700])
    pipe = load_pipeline(tiny_sd15_dir)
    pipe.load_lora_weights(str(result.unet_dir))
    policy = result.models.policy.eval()
    with torch.no_grad():
        trained = policy(noisy, t, encoder_hidden_states=hidden).sample
        loaded = pipe.unet(noisy, t, encoder_hidden_states=hidden).sample
        base = load_pipeline(tiny_sd15_dir).unet(noisy, t, encoder_hidden_states=hidden).sample
    assert (trained - base).abs().max() > 1e-4  # the adapter matters
    torch.testing.assert_close(loaded, trained, rtol=0, atol=1e-6)
