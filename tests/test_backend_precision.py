"""Step 0 is log 2 under the backends' own casts, not only under autocast.

FSDP runs on the CPU here for real: one gloo process wraps the policy in torch's
``FullyShardedDataParallel`` (version 1, as configs/fsdp*.yaml; one unit per transformer block)
with the ``MixedPrecision`` accelerate builds for ``--mixed_precision`` (its plugin's
``set_mixed_precision``), under CPU autocast as accelerate adds. DeepSpeed is simulated: its
engine holds the whole module in the compute dtype and accelerate turns autocast off. The model
is the tiny SD3 with checkpoint-like RMSNorm weights (a fresh model's 1.0 is exact in bf16), so
the norms, the positional-embedding buffer and the flow timestep ``sigma * 1000`` all round.
"""

import contextlib
import functools
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.normalization import RMSNorm
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

from diffusion.denoising import denoise
from losses import build_loss
from models.loading import load_components
from models.pipeline import load_pipeline
from models.precision import ForwardCasts
from training.config import parse_config
from training.distributed import LaunchConfigError, forward_casts

LOG2 = math.log(2)
BETA = 1000.0
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sd3_norms_dir(tiny_sd3_dir: Path, tmp_path_factory) -> Path:
    """The tiny SD3 with random norm weights, like a trained checkpoint's."""
    out = tmp_path_factory.mktemp("sd3-norms") / "model"
    pipe = load_pipeline(tiny_sd3_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in pipe.transformer.modules():
            if isinstance(module, (torch.nn.LayerNorm, RMSNorm)) and module.weight is not None:
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=generator))
    pipe.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """One gloo process: enough for FSDP to wrap, cast and run (it shards nothing)."""
    store = tmp_path_factory.mktemp("gloo") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def accelerate_fsdp_plugin(precision: str) -> FullyShardedDataParallelPlugin:
    """The plugin `accelerate launch --config_file configs/fsdp_sd3.yaml` gives train.py."""
    plugin = FullyShardedDataParallelPlugin(fsdp_version=1, use_orig_params=True)
    plugin.set_mixed_precision(precision)  # what AcceleratorState does with --mixed_precision
    return plugin


def step0_loss(model_dir: Path, precision: str, backend: str, casts: ForwardCasts) -> float:
    """DPO's step-0 loss with the policy run as ``backend`` runs it, the reference per ``casts``."""
    dtype = HALF[precision]
    config = parse_config(["--pretrained_model", str(model_dir), "--resolution", "64",
                           "--mixed_precision", precision, "--data", "unread"])  # fmt: skip
    models = load_components(config, True, dtype, CPU, casts)
    policy = models.policy
    autocast = functools.partial(torch.autocast, "cpu", dtype)
    if backend == "fsdp":
        wrap = functools.partial(transformer_auto_wrap_policy,
                                 transformer_layer_cls={JointTransformerBlock})  # fmt: skip
        policy = FullyShardedDataParallel(
            policy, device_id=CPU, auto_wrap_policy=wrap, use_orig_params=True,
            mixed_precision=accelerate_fsdp_plugin(precision).mixed_precision_policy,
        )  # fmt: skip
    else:  # DeepSpeed's engine: module.bfloat16() / .half(), no autocast
        policy.to(dtype)
        autocast = contextlib.nullcontext
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(4, 3, 64, 64, generator=generator) * 2 - 1
    condition = models.family.condition(["a red circle", "a blue square"], [(64, 64)] * 4,
                                        [(0, 0)] * 4)  # fmt: skip
    out = denoise(policy, models.reference, models.latent_encoder, models.noise_scheduler,
                  condition, pixels, 2, 0, 0, autocast, forward=models.family.forward)  # fmt: skip
    assert (out.timesteps > 512).any()  # where bf16 rounds sigma * 1000 in steps of 4
    loss, _ = build_loss("dpo", {"beta": BETA})(out.policy_err, out.ref_err)
    return loss.item()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_fsdp_step0_is_log2(sd3_norms_dir, process_group, precision):
    plugin = accelerate_fsdp_plugin(precision)
    casts = forward_casts(DistributedType.FSDP, HALF[precision], plugin)
    dtype = HALF[precision]
    assert casts == ForwardCasts(params=dtype, buffers=dtype, inputs=dtype)
    assert step0_loss(sd3_norms_dir, precision, "fsdp", casts) == pytest.approx(LOG2, abs=1e-6)
    # The reference of a plain autocast run (what FSDP runs got before): a random margin.
    plain = step0_loss(sd3_norms_dir, precision, "fsdp", ForwardCasts())
    assert abs(plain - LOG2) > 1e-2


def test_deepspeed_step0_is_log2(sd3_norms_dir):
    casts = forward_casts(DistributedType.DEEPSPEED, torch.bfloat16)
    assert casts == ForwardCasts(params=torch.bfloat16, buffers=torch.bfloat16)
    loss = step0_loss(sd3_norms_dir, "bf16", "deepspeed", casts)
    assert loss == pytest.approx(LOG2, abs=1e-6)


def test_plain_runs_cast_nothing_and_fsdp2_is_refused():
    for backend in (DistributedType.NO, DistributedType.MULTI_GPU):
        assert forward_casts(backend, torch.bfloat16) == ForwardCasts()
    fp32 = FullyShardedDataParallelPlugin(fsdp_version=1)  # --mixed_precision no: no policy
    assert forward_casts(DistributedType.FSDP, torch.float32, fp32) == ForwardCasts()
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    plugin.set_mixed_precision("bf16")
    with pytest.raises(LaunchConfigError, match="fsdp_version 2 with --mixed_precision"):
        forward_casts(DistributedType.FSDP, torch.bfloat16, plugin)
