"""Load the policy, reference, VAE, text stack and noise scheduler with the right dtypes.

Placement follows the diffusers training examples: the trainable policy stays fp32 (mixed
precision casts on the fly); everything frozen is stored in the compute dtype and runs under
no_grad. Weights are read from safetensors only.
"""

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

from config import TrainConfig
from models.family import ModelFamily, family_for

TEXT_ENCODER_CLASSES = {
    "text_encoder": CLIPTextModel,
    "text_encoder_2": CLIPTextModelWithProjection,
}


@dataclass
class Components:
    policy: UNet2DConditionModel
    reference: UNet2DConditionModel | None  # None: the loss needs no reference (SFT)
    vae: AutoencoderKL
    family: ModelFamily
    noise_scheduler: DDPMScheduler


def _hub_args(config: TrainConfig) -> dict:
    return {"revision": config.revision, "variant": config.variant, "use_safetensors": True}


def load_unet(
    source: str, config: TrainConfig, dtype: torch.dtype = torch.float32
) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(
        source, subfolder="unet", dtype=dtype, **_hub_args(config)
    )


def load_components(
    config: TrainConfig, needs_reference: bool, weight_dtype: torch.dtype, device: torch.device
) -> Components:
    source = config.pretrained_model
    hub = _hub_args(config)
    policy = load_unet(source, config)
    policy.train().requires_grad_(True)
    if config.gradient_checkpointing:
        policy.enable_gradient_checkpointing()

    reference = None
    if needs_reference:
        reference = load_unet(config.reference_model or source, config, weight_dtype)
        reference.requires_grad_(False).eval().to(device)

    if config.pretrained_vae:
        vae = AutoencoderKL.from_pretrained(
            config.pretrained_vae, dtype=weight_dtype, use_safetensors=True
        )
    else:
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", dtype=weight_dtype, **hub)
    vae.requires_grad_(False).eval().to(device)

    family_cls = family_for(policy.config)
    tokenizers, encoders = [], []
    for tokenizer_folder, encoder_folder in family_cls.text_subfolders:
        tokenizers.append(
            AutoTokenizer.from_pretrained(
                source, subfolder=tokenizer_folder, revision=config.revision
            )
        )
        encoder = TEXT_ENCODER_CLASSES[encoder_folder].from_pretrained(
            source, subfolder=encoder_folder, dtype=weight_dtype, **hub
        )
        encoders.append(encoder.requires_grad_(False).eval().to(device))

    scheduler = DDPMScheduler.from_pretrained(
        source, subfolder="scheduler", revision=config.revision
    )
    return Components(policy, reference, vae, family_cls(tokenizers, encoders), scheduler)
