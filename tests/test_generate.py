"""generate.py on the tiny random SD1.5-shaped model: counts, sizes, determinism, outputs."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import generate
from common.cli import UsageError
from models import generation
from models.family import ModelFamily
from tests.support import reset_accelerate

PROMPTS = ["a red circle on a white background", "a blue square on a black background"]


@pytest.fixture(scope="module")
def pipe(tiny_sd15_dir: Path):
    return generation.load_pipeline(str(tiny_sd15_dir), scheduler="ddim")


def pixels(g: generation.Generation) -> np.ndarray:
    return np.asarray(g.image)


def test_prompts_times_seeds_images_of_the_requested_size(pipe):
    out = generation.generate(pipe, PROMPTS, [0, 1, 2], steps=2, resolution=32, batch_size=4)
    assert [(g.prompt, g.seed) for g in out] == [(p, s) for p in PROMPTS for s in (0, 1, 2)]
    assert {g.image.size for g in out} == {(32, 32)}


def test_an_image_depends_on_its_seed_not_on_its_batch(pipe):
    kwargs = {"steps": 2, "resolution": 32, "guidance_scale": 3.0}
    alone = generation.generate(pipe, PROMPTS[:1], [5], batch_size=1, **kwargs)
    batched = generation.generate(pipe, PROMPTS, [4, 5], batch_size=4, **kwargs)
    np.testing.assert_allclose(pixels(alone[0]), pixels(batched[1]), atol=1)
    assert np.abs(pixels(batched[0]).astype(int) - pixels(batched[1])).max() > 0
    again = generation.generate(pipe, PROMPTS[:1], [5], batch_size=1, **kwargs)
    assert np.array_equal(pixels(alone[0]), pixels(again[0]))


def test_distinct_seeds_shift_each_prompt_past_the_last_and_keep_the_grid_columns(pipe):
    kwargs = {"steps": 2, "resolution": 32, "progress": False}
    out = generation.generate(pipe, [*PROMPTS, "a cat"], [0, 2], distinct_seeds=True, **kwargs)
    # max seed 2 -> a shift of 3 per prompt: (0, 2), (3, 5), (6, 8)
    assert [g.seed for g in out] == [0, 2, 3, 5, 6, 8]
    assert [g.column for g in out] == [0, 1, 0, 1, 0, 1]
    direct = generation.generate(pipe, PROMPTS[1:], [5], **kwargs)[0]
    assert np.array_equal(pixels(out[3]), pixels(direct))  # the image is its seed's
    grid = generation.labelled_grid(out)
    assert grid.size == (240 + 2 * 96, 16 + 3 * 96)


@pytest.mark.parametrize("name", ModelFamily.samplers)
def test_every_scheduler_samples(tiny_sd15_dir, name):
    pipe = generation.load_pipeline(str(tiny_sd15_dir), scheduler=name)
    out = generation.generate(pipe, PROMPTS[:1], [0, 1], steps=3, resolution=32, progress=False)
    assert len(out) == 2 and all(np.isfinite(pixels(g)).all() for g in out)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_models_sample_with_their_flow_sampler_only(family, request, tmp_path):
    model = str(request.getfixturevalue(f"tiny_{family}_dir"))
    pipe = generation.load_pipeline(model)  # the family's default sampler: flow_euler
    assert isinstance(pipe.scheduler, generation.SCHEDULERS["flow_euler"])
    out = generation.generate(pipe, PROMPTS[:1], [0], steps=2, resolution=32, progress=False)
    assert out[0].image.size == (32, 32) and np.isfinite(pixels(out[0])).all()
    with pytest.raises(UsageError, match="flow_euler"):
        generation.load_pipeline(model, scheduler="ddim")


def test_cli_writes_images_csv_and_grid(tiny_sd15_dir, tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text(PROMPTS[0] + "\n\n" + PROMPTS[1] + "\n")
    out = tmp_path / "gen"
    generate.main(
        [
            "--model",
            str(tiny_sd15_dir),
            "--prompts",
            str(prompt_file),
            "--prompt",
            "a cat",
            "--seeds",
            "3",
            "7",
            "--steps",
            "2",
            "--resolution",
            "32",
            "--out",
            str(out),
        ]
    )
    with open(out / generation.METADATA_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["prompt"], r["seed"]) for r in rows] == [
        (p, s) for p in [*PROMPTS, "a cat"] for s in ("3", "7")
    ]
    for row in rows:
        assert Image.open(out / row["file_name"]).size == (32, 32)
    grid = Image.open(out / generation.GRID_PNG)
    assert grid.size == (240 + 2 * 96, 16 + 3 * 96)


def test_a_trained_unet_is_swapped_in(tiny_sd15_dir, tmp_path, pipe):
    """A perturbed copy of the UNet, saved like the trainer's export, changes the images."""
    unet = pipe.unet
    changed = type(unet).from_config(unet.config)
    changed.load_state_dict(unet.state_dict())
    with torch.no_grad():
        changed.conv_out.bias.add_(0.5)
    changed.save_pretrained(tmp_path / "run" / "unet")
    swapped = generation.load_pipeline(str(tiny_sd15_dir), unet=tmp_path / "run")
    kwargs = {"steps": 2, "resolution": 32, "progress": False}
    base = generation.generate(pipe, PROMPTS[:1], [0], **kwargs)[0]
    new = generation.generate(swapped, PROMPTS[:1], [0], **kwargs)[0]
    assert not np.array_equal(pixels(base), pixels(new))
    with pytest.raises(UsageError, match="no diffusers UNet2DConditionModel"):
        generation.load_pipeline(str(tiny_sd15_dir), unet=tmp_path)


def test_trained_lora_is_loaded_with_the_lora_flag(tiny_sd15_dir, toy_data_dir, tmp_path):

    import train

    reset_accelerate()
    run = tmp_path / "run"
    train.main(["--pretrained_model", str(tiny_sd15_dir), "--data", str(toy_data_dir / "pickapic"),
                "--output_dir", str(run), "--resolution", "64", "--train_batch_size", "2",
                "--max_train_steps", "1", "--learning_rate", "1e-2", "--lr_warmup_steps", "0",
                "--lora_rank", "4", "--dataloader_num_workers", "0",
                "--report_to", "none"])  # fmt: skip
    reset_accelerate()
    args = ["--model", str(tiny_sd15_dir), "--prompt", PROMPTS[0], "--seeds", "0",
            "--steps", "2", "--resolution", "32"]  # fmt: skip
    base = generate.main([*args, "--out", str(tmp_path / "base")])[0]
    adapted = generate.main([*args, "--out", str(tmp_path / "lora"), "--lora", str(run)])[0]
    assert not np.array_equal(pixels(base), pixels(adapted))
    with pytest.raises(UsageError, match="no LoRA weights"):
        generation.load_pipeline(str(tiny_sd15_dir), lora=tmp_path)
