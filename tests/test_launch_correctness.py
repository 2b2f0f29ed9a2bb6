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

from models.loading import load_components
from models.pipeline import load_pipeline
from tests.support import reset_accelerate
from tests.test_train import run
from training.config import TrainConfig, parse_config
from training.distributed import LaunchConfigError, check_backend, configure_deepspeed

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


def test_reference_keeps_fp32_norms_and_half_precision_elsewhere(
    nontrivial_norms_dir, toy_data_dir, tmp_path
):
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
    lora = ("--lora_rank", "4", "--lora_alpha", "16", "--learning_rate", "1e-2")
    result = run(tiny_sd15_dir, toy_data_dir, tmp_path / "out", "dpo", *lora,
                 "--max_train_steps", "1")  # fmt: skip
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


@pytest.mark.parametrize("mode", ["encode", "zeros"])
def test_sdxl_dropped_caption_conditioning(tiny_sdxl_dir, mode):
    config = parse_config(["--pretrained_model", str(tiny_sdxl_dir), "--resolution", "64",
                           "--empty_prompt_embeddings", mode, "--data", "unread"])  # fmt: skip
    family = load_components(config, False, torch.float32, torch.device("cpu")).family
    sizes = [(64, 64)] * 4
    kwargs = family.condition(["a red circle", ""], sizes, sizes)  # a pair batch: k = 2
    hidden = kwargs["encoder_hidden_states"]
    pooled = kwargs["added_cond_kwargs"]["text_embeds"]
    encoded = family.encode_text(["a red circle", ""])
    for rows in ([0, 2], [1, 3]):  # chosen and rejected share their caption's features
        assert torch.equal(hidden[rows[0]], hidden[rows[1]])
    assert torch.equal(hidden[0], encoded["encoder_hidden_states"][0])  # captions unaffected
    assert torch.equal(pooled[0], encoded["text_embeds"][0])
    if mode == "zeros":  # StableDiffusionXLPipeline's unconditional branch
        assert not hidden[1].any() and not pooled[1].any()
    else:  # the released trainers: the encoders' features of ""
        assert torch.equal(hidden[1], encoded["encoder_hidden_states"][1])
        assert hidden[1].abs().sum() > 0 and pooled[1].abs().sum() > 0


def test_implicit_reward_reads_images_with_the_training_transform(tmp_path):
    """A 16 x 24 image at R = 16: the centre 16 x 16 crop as in training, not a squashed copy."""
    import io

    import numpy as np
    import pandas as pd
    from PIL import Image

    from evaluation.implicit_reward import read_pairs

    columns = (np.arange(24, dtype=np.uint8) * 10)[None, :, None]
    image = Image.fromarray(np.tile(columns, (16, 1, 3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless, so grey levels are exact
    row = {"caption": "c", "jpg_0": buffer.getvalue(), "jpg_1": buffer.getvalue(),
           "label_0": 1.0, "label_1": 0.0}  # fmt: skip
    pd.DataFrame([row]).to_parquet(tmp_path / "pairs.parquet")
    pixels, captions = read_pairs(tmp_path / "pairs.parquet", 16)
    assert pixels.shape == (2, 3, 16, 16) and captions == ["c"]
    expected = (torch.arange(4, 20, dtype=torch.float32) * 10) / 127.5 - 1  # columns 4..19
    assert torch.equal(pixels[0, 0], expected.expand(16, 16))
