"""SDXL through the same train.py: the family adapter's conditioning and end-to-end runs."""

import math

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

from diffusion.denoising import denoising_errors
from losses import get_spec, loss_names
from models.family import SDXLFamily
from models.loading import load_components
from models.pipeline import load_pipeline
from tests.test_train import run
from training.config import parse_config


def test_time_ids_constant_is_the_released_codes():
    family = SDXLFamily([], [], resolution=64, time_ids_mode="constant")
    ids = family.time_ids([(100, 200), (50, 80)], [(0, 36), (3, 0)])
    assert ids.tolist() == [[64, 64, 0, 0, 64, 64]] * 2


def test_time_ids_original_are_size_crop_and_target():
    family = SDXLFamily([], [], resolution=64, time_ids_mode="original")
    ids = family.time_ids([(100, 200), (50, 80)], [(0, 36), (3, 0)])
    assert ids.tolist() == [[100, 200, 0, 36, 64, 64], [50, 80, 3, 0, 64, 64]]
    assert ids.dtype == torch.float32


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir):
    config = parse_config(["--pretrained_model", str(tiny_sdxl_dir), "--resolution", "64",
                           "--time_ids", "original", "--data", "unread"])  # fmt: skip
    return load_components(config, True, torch.float32, torch.device("cpu"))


def test_condition_is_penultimate_states_of_both_encoders_and_pooled_of_the_second(sdxl):
    family = sdxl.family
    assert isinstance(family, SDXLFamily) and family.pipeline_class is StableDiffusionXLPipeline
    captions = ["a red circle", ""]
    cond = family.condition(captions, [(64, 96), (70, 64), (64, 64), (80, 64)],
                            [(0, 16), (3, 0), (0, 0), (8, 0)])  # fmt: skip
    hidden = []
    for tokenizer, encoder in zip(family.tokenizers, family.text_encoders, strict=True):
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids  # fmt: skip
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    pooled = out.text_embeds  # encoder 2 (CLIPTextModelWithProjection): the projected pooling
    expected = torch.cat(hidden, dim=-1).repeat(2, 1, 1)  # pairs: chosen then rejected
    torch.testing.assert_close(cond["encoder_hidden_states"], expected, rtol=0, atol=0)
    added = cond["added_cond_kwargs"]
    torch.testing.assert_close(added["text_embeds"], pooled.repeat(2, 1), rtol=0, atol=0)
    assert added["time_ids"][1].tolist() == [70, 64, 3, 0, 64, 64]
    assert cond["encoder_hidden_states"].shape[-1] == sdxl.policy.config.cross_attention_dim


def test_half_precision_unet_casts_the_nested_condition(sdxl, tiny_sdxl_dir):
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet",
                                                dtype=torch.bfloat16)  # fmt: skip
    cond = sdxl.family.condition(["a cat"], [(64, 64)], [(0, 0)])
    errors = denoising_errors(unet, torch.randn(1, 4, 8, 8), torch.tensor([10]), cond,
                              torch.randn(1, 4, 8, 8))  # fmt: skip
    assert errors.dtype == torch.float32 and math.isfinite(errors.item())


@pytest.mark.parametrize("loss", loss_names(online=False))
def test_sdxl_end_to_end(loss, tiny_sdxl_dir, toy_data_dir, tmp_path):
    out = tmp_path / "out"
    result = run(tiny_sdxl_dir, toy_data_dir, out, loss, "--time_ids", "original")
    assert all(math.isfinite(step["loss"]) for step in result.history)
    base = dict(UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
                .named_parameters())  # fmt: skip
    trained = dict(UNet2DConditionModel.from_pretrained(out, subfolder="unet").named_parameters())
    moved = [n for n, p in trained.items() if not torch.equal(p, base[n])]
    # add_embedding: SDXL's pooled-text + time_ids projection must be trained too.
    assert any(n.startswith("add_embedding") for n in moved)
    assert len(moved) == len(trained), "every parameter should move"
    if get_spec(loss).needs_reference:
        for name, param in result.models.reference.named_parameters():
            assert torch.equal(param, base[name]), f"reference parameter {name} moved"

    pipe = load_pipeline(tiny_sdxl_dir, unet_dir=out / "unet")
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert torch.equal(pipe.unet.conv_in.weight, trained["conv_in.weight"])
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)
