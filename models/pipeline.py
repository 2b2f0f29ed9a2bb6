"""Load a trained result into the family's diffusers pipeline (for generation and evaluation).

    pipe = load_pipeline("runwayml/stable-diffusion-v1-5", unet_dir="outputs/run/unet")
    pipe = load_pipeline("stabilityai/stable-diffusion-xl-base-1.0", lora_dir="outputs/run/lora")

The pipeline class (StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline
or FluxPipeline) comes from the model family, chosen from the base denoiser's config, so callers
never branch on the family. For SD3 and Flux ``unet_dir`` is the run's ``transformer/``.
"""

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline

from models.families import denoiser_config, family_for


def load_pipeline(
    base: str | Path,
    unet_dir: str | Path | None = None,
    lora_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    pretrained_vae: str | Path | None = None,
    **from_pretrained_kwargs,
) -> DiffusionPipeline:
    """The base model's pipeline, with a fully fine-tuned ``unet_dir`` (``OUTPUT_DIR/unet``)
    swapped in and/or LoRA adapters from ``lora_dir`` (``OUTPUT_DIR/lora``) loaded."""
    family = family_for(denoiser_config(base))
    pipeline_class = family.pipeline_class
    parts = {}
    if unet_dir is not None:
        parts[family.denoiser_folder] = family.denoiser_class.from_pretrained(
            unet_dir, dtype=dtype, use_safetensors=True
        )
    if pretrained_vae is not None:
        parts["vae"] = AutoencoderKL.from_pretrained(
            pretrained_vae, dtype=dtype, use_safetensors=True
        )
    pipe = pipeline_class.from_pretrained(
        base, dtype=dtype, use_safetensors=True, **parts, **from_pretrained_kwargs
    )
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir))
    return pipe
