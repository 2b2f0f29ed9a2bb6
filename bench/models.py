"""Real model configs with random weights (no download) for tiny, SD1.5 and SDXL sizes.

SD1.5: UNet 859.5M parameters (diffusers' UNet2DConditionModel defaults with cross-attention
dim 768), CLIP ViT-L/14 text encoder, the 4-level KL VAE. SDXL: UNet 2.57B (three levels,
transformer depths 1/2/10, text_time added conditioning), CLIP ViT-L + OpenCLIP ViT-bigG/14.
"""

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from scripts.build_tiny_model import tiny_text_encoder, tiny_unet, tiny_vae, training_scheduler

SIZES = ("tiny", "sd15", "sdxl")


@dataclass
class RandomModel:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list[torch.nn.Module]
    scheduler: DDPMScheduler


def _clip(hidden: int, layers: int, heads: int, act: str, projection: bool) -> torch.nn.Module:
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _kl_vae(scaling_factor: float, sample_size: int) -> AutoencoderKL:
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
    )


def sd15_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)


def sdxl_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=128,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


def build_unet(size: str) -> UNet2DConditionModel:
    if size == "tiny":
        return tiny_unet("sd15")
    return sd15_unet() if size == "sd15" else sdxl_unet()


def build_random_model(size: str, with_vae_and_text: bool = True) -> RandomModel:
    """Random-init model of ``size``; the VAE and text encoders only when asked (a cached run
    never builds them)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}")
    # Random init on the GPU when there is one: seconds for SDXL instead of a minute on the CPU.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        unet = build_unet(size)
        vae, encoders = _vae_and_text(size) if with_vae_and_text else (None, [])
    return RandomModel(unet, vae, encoders, training_scheduler("epsilon"))


def _vae_and_text(size: str) -> tuple[AutoencoderKL, list[torch.nn.Module]]:
    if size == "tiny":
        return tiny_vae("sd15"), [tiny_text_encoder(with_projection=False)]
    clip_l = _clip(768, 12, 12, "quick_gelu", False)
    if size == "sd15":
        return _kl_vae(0.18215, 512), [clip_l]
    return _kl_vae(0.13025, 1024), [clip_l, _clip(1280, 32, 20, "gelu", True)]


def vae_config(size: str) -> dict:
    """The VAE's config without building it (what a cached run needs: the scaling factor)."""
    if size == "tiny":
        return dict(tiny_vae("sd15").config)
    return {"scaling_factor": 0.18215 if size == "sd15" else 0.13025, "shift_factor": None}
