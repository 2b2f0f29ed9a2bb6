"""Prompts x seeds -> images, a metadata CSV and a labelled grid, from a diffusers model: the
library behind ``generate.py``, validation grids and the toy benchmark.

Each image's randomness comes from its own generator seeded with its seed, so an image depends
on (prompt, seed, settings) only, never on the batch it was drawn in (``prompt_seeds``).
A trained UNet (full fine-tune; transformer/ for SD3 and Flux) or LoRA adapters replace the
base's; the pipeline class comes from the model family (models/pipeline.py).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# ruff: noqa: E402  (third-party noise filters go in before diffusers and transformers import)
from common import cli

cli.quiet_third_party()

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from models.configs import FLUX_LATENT_SIZE, denoiser_model_config
from models.families import DENOISER_FOLDERS, denoiser_config, family_for
from models.lora import LORA_WEIGHTS
from models.pipeline import load_pipeline as load_family_pipeline

logger = logging.getLogger(__name__)

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "flow_euler": FlowMatchEulerDiscreteScheduler,  # SD3 / Flux (their pipelines' own sampler)
}
METADATA_CSV = "generations.csv"
GRID_PNG = "grid.png"
IMAGE_DIR = "images"


@dataclass(frozen=True)
class Generation:
    prompt_index: int
    prompt: str
    seed: int
    image: Image.Image
    column: int = 0  # position of the seed in the prompt's seeds (the grid column)

    @property
    def file_name(self) -> str:
        return f"{IMAGE_DIR}/p{self.prompt_index:04d}_s{self.seed}.png"


def trained_dir(path: str | Path, subfolder: str, marker: str, what: str) -> Path:
    """The trainer's OUTPUT_DIR (holding ``subfolder``) or that folder itself."""
    path = Path(path)
    for candidate in (path / subfolder, path):
        if (candidate / marker).is_file():
            return candidate
    raise cli.UsageError(f"{path}: no {what} ({marker}) in {path} or {path / subfolder}")


def trained_weights(path: str | Path, flag: str) -> dict[str, Path]:
    """``{"unet": dir}`` for a full fine-tune or ``{"lora": dir}`` for LoRA adapters, from the
    trainer's OUTPUT_DIR or its unet/ (transformer/ for SD3, Flux) or lora/ folder (whichever the
    run wrote)."""
    path = Path(path)
    found = [("unet", folder, "config.json") for folder in DENOISER_FOLDERS]
    for key, subfolder, marker in (*found, ("lora", "lora", LORA_WEIGHTS)):
        for candidate in (path / subfolder, path):
            if (candidate / marker).is_file():
                return {key: candidate}
    raise cli.UsageError(
        f"{flag} {path}: neither a trained UNet (unet/config.json) nor LoRA adapters "
        f"(lora/{LORA_WEIGHTS}) there"
    )


def choose_sampler(model: str, scheduler: str | None, strict: bool = True) -> tuple[type, str]:
    """(the model's family, the sampler it samples with): ``scheduler``, or the family's default
    when None or, not ``strict``, when the family cannot sample with it. Reads configs only, so
    a wrong --model or --scheduler is answered before any weights load."""
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise cli.UsageError(f"--scheduler {scheduler}: choose from {sorted(SCHEDULERS)}")
    denoiser_model_config(str(model), "--model", None)  # a wrong path: one line, at once
    family = family_for(denoiser_config(str(model)))
    scheduler = scheduler or family.samplers[0]
    if scheduler not in family.samplers and not strict:
        logger.info("%s samples with %s, not %s", family.name, family.samplers[0], scheduler)
        scheduler = family.samplers[0]
    if scheduler not in family.samplers:
        allowed = ", ".join(family.samplers)
        raise cli.UsageError(f"--scheduler {scheduler}: {family.name} samples with {allowed}")
    return family, scheduler


def default_guidance(model: str) -> float:
    """The guidance scale ``model`` samples with when none is given: its family's
    (``sampling_guidance``: 1, no CFG, but FluxPipeline's 3.5 for guidance-distilled Flux)."""
    config = denoiser_config(str(model))
    return family_for(config).sampling_guidance(config)


def load_pipeline(
    model: str,
    unet: str | Path | None = None,
    scheduler: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    lora: str | Path | None = None,
    strict: bool = True,
) -> DiffusionPipeline:
    """The base pipeline (local directory or hub name), with an optional trained UNet (or SD3 /
    Flux transformer) swapped in and/or LoRA adapters loaded; ``scheduler`` None: the family's
    default sampler (ddim; flow_euler for SD3 and Flux). A ``scheduler`` the family cannot
    sample with is an error, or, not ``strict`` (a protocol's preset, not the user's flag),
    replaced by the family's default.

    Weights load from safetensors only and are cast to dtype (shipped fp16 weights upcast)."""
    family, scheduler = choose_sampler(model, scheduler, strict)
    folder = family.denoiser_folder
    pipe = load_family_pipeline(
        model,
        unet_dir=None
        if unet is None
        else trained_dir(
            unet, folder, "config.json", f"diffusers {family.denoiser_class.__name__}"
        ),
        lora_dir=None if lora is None else trained_dir(lora, "lora", LORA_WEIGHTS, "LoRA weights"),
        dtype=dtype,
    )
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None  # scored generations must never be blanked
    pipe.scheduler = SCHEDULERS[scheduler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def prompt_seeds(prompt_index: int, seeds: Sequence[int], distinct: bool) -> list[int]:
    """The seeds of one prompt: the shared list, or shifted past every earlier prompt's."""
    shift = prompt_index * (max(seeds) + 1) if distinct else 0
    return [s + shift for s in seeds]


def native_resolution(pipe: DiffusionPipeline) -> int:
    """The denoiser's latent sample_size (Flux's pipeline default where it has none) x the VAE's
    downsampling."""
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    return denoiser.config.get("sample_size", FLUX_LATENT_SIZE) * pipe.vae_scale_factor


@torch.no_grad()
def generate(
    pipe: DiffusionPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 20,
    guidance_scale: float = 1.0,
    resolution: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
    distinct_seeds: bool = False,
) -> list[Generation]:
    """Every prompt with every seed (see prompt_seeds), in prompt-major order, batch_size images
    per pipeline call."""
    resolution = resolution or native_resolution(pipe)
    jobs = [
        (i, p, s, c)
        for i, p in enumerate(prompts)
        for c, s in enumerate(prompt_seeds(i, seeds, distinct_seeds))
    ]
    results = []
    for start in tqdm(range(0, len(jobs), batch_size), desc="generate", disable=not progress):
        batch = jobs[start : start + batch_size]
        images = pipe(
            [p for _, p, _, _ in batch],
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=resolution,
            width=resolution,
            generator=[torch.Generator().manual_seed(s) for _, _, s, _ in batch],
        ).images
        results += [
            Generation(i, p, s, img, c) for (i, p, s, c), img in zip(batch, images, strict=True)
        ]
    return results


def save_generations(out_dir: Path, generations: Sequence[Generation]) -> Path:
    """PNG files under out_dir/images/ and out_dir/generations.csv (file_name, prompt, seed)."""
    (out_dir / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    for g in generations:
        g.image.save(out_dir / g.file_name)
    path = out_dir / METADATA_CSV
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["file_name", "prompt", "seed"])
        writer.writerows([g.file_name, g.prompt, g.seed] for g in generations)
    return path


def labelled_grid(
    generations: Sequence[Generation], cell: int = 96, label_width: int = 240
) -> Image.Image:
    """One row per prompt (its text on the left), one column per seed position (the seed on top
    when every prompt shares it, "#c" when prompts have distinct seeds)."""
    prompts = sorted({(g.prompt_index, g.prompt) for g in generations})
    row = {index: r for r, (index, _) in enumerate(prompts)}
    seeds_of: dict[int, set[int]] = {}
    for g in generations:
        seeds_of.setdefault(g.column, set()).add(g.seed)
    header = 16
    grid = Image.new(
        "RGB", (label_width + cell * len(seeds_of), header + cell * len(prompts)), "white"
    )
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for c, seeds in seeds_of.items():
        title = f"seed {next(iter(seeds))}" if len(seeds) == 1 else f"#{c}"
        draw.text((label_width + c * cell + 4, 2), title, fill="black", font=font)
    for r, (_, prompt) in enumerate(prompts):
        chars = max(8, label_width // 6)
        lines = [prompt[i : i + chars] for i in range(0, len(prompt), chars)]
        draw.multiline_text((4, header + r * cell + 4), "\n".join(lines), fill="black", font=font)
    for g in generations:
        tile = g.image.resize((cell, cell), Image.Resampling.NEAREST)
        grid.paste(tile, (label_width + g.column * cell, header + row[g.prompt_index] * cell))
    return grid


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
