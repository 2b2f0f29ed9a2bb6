"""The accelerate configs in configs/ parse, and name what the trainer and models have.

DeepSpeed ZeRO-2 and FSDP cannot run on this CPU-only machine (accelerate's FSDP needs a GPU;
DeepSpeed is an optional extra): these checks are what can be verified here. See
docs/multi-gpu.md.
"""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from training.config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize(
    ("name", "kind"),
    [("multi_gpu", "MULTI_GPU"), ("deepspeed_zero2", "DEEPSPEED"), ("fsdp", "FSDP")],
)
def test_config_parses(name, kind):
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert config.distributed_type == kind
    assert config.num_machines == 1 and config.num_processes >= 2


def test_deepspeed_is_zero2_and_matches_the_trainer_defaults():
    ds = load_config_from_file(str(CONFIGS / "deepspeed_zero2.yaml")).deepspeed_config
    defaults = TrainConfig()
    assert ds["zero_stage"] == 2
    assert ds["gradient_accumulation_steps"] == defaults.gradient_accumulation_steps
    assert ds["gradient_clipping"] == defaults.max_grad_norm


def test_fsdp_wraps_blocks_that_exist_in_the_unet(tiny_sd15_dir):
    from diffusers import UNet2DConditionModel

    fsdp = load_config_from_file(str(CONFIGS / "fsdp.yaml")).fsdp_config
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15_dir, subfolder="unet")
    present = {type(m).__name__ for m in unet.modules()}
    wrapped = set(fsdp["fsdp_transformer_layer_cls_to_wrap"].split(","))
    assert wrapped <= present, wrapped - present
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # checkpointing.full_model needs it


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_fsdp_configs_wrap_blocks_that_exist_in_the_transformer(family, request):
    from models.families import family_for

    model_dir = request.getfixturevalue(f"tiny_{family}_dir")
    config = load_config_from_file(str(CONFIGS / f"fsdp_{family}.yaml"))
    assert config.distributed_type == "FSDP"
    fsdp = config.fsdp_config
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
    transformer = cls.from_pretrained(model_dir, subfolder="transformer")
    assert family_for(transformer.config).name == family
    present = {type(m).__name__ for m in transformer.modules()}
    wrapped = set(fsdp["fsdp_transformer_layer_cls_to_wrap"].split(","))
    assert wrapped <= present, wrapped - present
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
