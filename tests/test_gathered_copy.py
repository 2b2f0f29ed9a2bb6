"""The full model gathered under FSDP and DeepSpeed (``checkpointing.rebuilt``), simulated on the
CPU: what rank 0 receives is a state dict of fp32 CPU tensors (FSDP's FULL_STATE_DICT with
CPU offload; DeepSpeed's fp32 masters), from which the copy that checkpoints save and that
validation samples with is built; and the process-group timeout the other ranks wait under."""

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from diffusers.models.normalization import RMSNorm

import train
from models.loading import FP32_NORMS, load_components
from training.checkpointing import rebuilt
from training.config import parse_config
from training.validation import Validator

CPU = torch.device("cpu")


def gathered_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What FSDP's full state dict gives rank 0: fp32 copies on the CPU."""
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def randomise_norms(module: torch.nn.Module) -> None:
    """Checkpoint-like norm weights (a fresh model's 1 and 0 are exact in bf16)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm, RMSNorm)):
                for param in sub.parameters():
                    param.add_(0.3 * torch.randn(param.shape, generator=generator))


@pytest.fixture(scope="module")
def sd3(tiny_sd3_dir, tmp_path_factory):
    """The tiny SD3 (it has a floating buffer: the positional-embedding table), bf16 run."""
    out = tmp_path_factory.mktemp("gathered")
    config = parse_config([
        "--pretrained_model", str(tiny_sd3_dir), "--resolution", "64", "--mixed_precision", "bf16",
        "--output_dir", str(out), "--validation_prompt", "a red circle",
        "--validation_prompt", "a cat", "--validation_images", "2",
        "--validation_inference_steps", "2", "--data", "unread",
    ])  # fmt: skip
    models = load_components(config, False, torch.bfloat16, CPU)
    config.resolve_family_defaults(models.family.default_guidance)  # as train.setup does
    randomise_norms(models.policy)
    return config, models


def test_the_copy_draws_no_random_numbers_and_is_cast_like_the_reference(sd3):
    _, models = sd3
    policy = models.policy
    state = gathered_state(policy)
    before = torch.random.get_rng_state()
    copy = rebuilt(policy, state, CPU, torch.bfloat16)
    assert torch.equal(torch.random.get_rng_state(), before)  # training's stream unchanged
    norms = {f"{m}.{n}" for m, sub in copy.named_modules() if isinstance(sub, FP32_NORMS)
             for n, _ in sub.named_parameters()}  # fmt: skip
    assert norms  # the qk RMSNorms
    for name, param in copy.named_parameters():
        assert param.device == CPU, name
        assert param.dtype == (torch.float32 if name in norms else torch.bfloat16), name
        assert torch.equal(param, policy.get_parameter(name).to(param.dtype)), name
    (buffer,) = [b for n, b in copy.named_buffers() if n == "pos_embed.pos_embed"]
    assert buffer.dtype == torch.float32 and torch.equal(buffer, policy.pos_embed.pos_embed)
    # A checkpoint's copy (no dtype): fp32 throughout, equal to the policy.
    full = rebuilt(policy, gathered_state(policy), CPU)
    assert all(torch.equal(p, policy.get_parameter(n)) for n, p in full.named_parameters())


def test_the_copy_samples_the_plain_runs_grid(sd3):
    """Validation with the gathered copy draws the images a plain run draws from its live fp32
    policy under the same autocast, pixel for pixel (the norms' rounding shows otherwise)."""
    config, models = sd3
    validator = Validator(config, models, Accelerator(mixed_precision="bf16", cpu=True),
                          torch.bfloat16)  # fmt: skip

    def images(unet: torch.nn.Module) -> np.ndarray:
        return np.stack([np.asarray(g.image) for g in validator.images(unet)])

    plain = images(models.policy)
    copy = rebuilt(models.policy, gathered_state(models.policy), CPU, torch.bfloat16)
    assert np.array_equal(images(copy), plain)
    whole = rebuilt(models.policy, gathered_state(models.policy), CPU).to(torch.bfloat16)
    assert not np.array_equal(images(whole), plain)  # the check can fail


def test_the_process_group_timeout_reaches_the_accelerator(tmp_path: Path):
    config = parse_config(["--output_dir", str(tmp_path), "--process_group_timeout", "90",
                           "--data", "unread"])  # fmt: skip
    accelerator = train.build_accelerator(config)
    assert accelerator.init_handler.to_kwargs() == {"timeout": timedelta(minutes=90)}
    assert (
        parse_config(["--output_dir", str(tmp_path), "--data", "unread"]).process_group_timeout
        == 60
    )
