"""Load the policy, reference, latent encoder, text stack and noise scheduler with the right
dtypes, for full fine-tuning or LoRA, with or without the latent/text cache.

Placement follows the diffusers training examples: trainable weights stay fp32 (mixed precision
casts on the fly); everything frozen is stored in the compute dtype and runs under no_grad.
Weights are read from safetensors only.
"""

from dataclasses import dataclass
from typing import Protocol

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.normalization import RMSNorm
from transformers import AutoTokenizer

from data.cache import CachedLatentEncoder, TextCache
from diffusion.denoising import LatentEncoder, NoiseProcess, VaeEncoder
from models.configs import vae_scale_factor
from models.families import denoiser_config, family_for
from models.family import ModelFamily
from models.lora import AdaptersDisabled, FullUNetIO, LoraIO, add_lora
from models.precision import ForwardCasts, cast_inputs_on_call
from models.speed import apply_attention, compile_unet


class LoadSettings(Protocol):
    """The run settings loading reads (``training.config.TrainConfig`` has them all)."""

    pretrained_model: str
    revision: str | None
    variant: str | None
    reference_model: str | None
    pretrained_vae: str | None
    time_ids: str
    empty_prompt_embeddings: str
    resolution: int | None
    cache: str | None
    seed: int
    lora_rank: int
    lora_alpha: float | None
    lora_target_modules: str
    lora_dropout: float
    attention: str
    gradient_checkpointing: bool
    torch_compile: bool
    compile_backend: str


@dataclass
class Components:
    policy: UNet2DConditionModel
    # None: the loss needs no reference (mapo, sft); a frozen UNet; or, with LoRA, the policy's UNet
    # with its adapters disabled (models.lora.AdaptersDisabled).
    reference: torch.nn.Module | None
    latent_encoder: LatentEncoder  # the VAE, or the latent cache
    family: ModelFamily
    # DDPMScheduler (SD1.5, SDXL), or flow_matching.FlowMatching (SD3, Flux): what denoise noises
    # with; both carry the diffusers scheduler's ``config``.
    noise_scheduler: NoiseProcess | DDPMScheduler
    policy_io: FullUNetIO | LoraIO  # how checkpoints and the export save the policy


def _hub_args(config: LoadSettings) -> dict:
    return {"revision": config.revision, "variant": config.variant, "use_safetensors": True}


def load_unet(
    source: str, config: LoadSettings, dtype: torch.dtype = torch.float32
) -> UNet2DConditionModel:
    """The model's denoiser: ``unet/`` (SD1.5, SDXL) or ``transformer/`` (SD3, Flux)."""
    family_cls = family_for(denoiser_config(source, config.revision))
    return family_cls.denoiser_class.from_pretrained(
        source, subfolder=family_cls.denoiser_folder, dtype=dtype, **_hub_args(config)
    )


# Layers that autocast runs in fp32 with the module's own weights (torch's fp32 op list), and
# diffusers' RMSNorm (SD3.5's and Flux's qk norms), which computes in fp32 unless its weight is
# half precision, when it rounds its output to the weight's dtype first.
FP32_NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm, RMSNorm)


def to_dtype_keeping_norms_fp32(unet: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast an fp32-loaded frozen reference to ``dtype``, except its normalisation weights.

    Under autocast, convolutions and matmuls cast the fp32 policy's weights to the compute
    dtype (the same rounding a half-precision reference's stored weights have), but group and
    layer norms run with each model's own weights: the policy's exact fp32 ones against the
    reference's rounded ones, enough to move the step-0 DPO margin off zero at beta 5000.
    Keeping the reference's norms at their fp32 values makes the two models compute the same
    thing at step 0 (loss exactly log 2) in fp16 and bf16, for a few KB of memory.

    Floating buffers (SD3's positional embedding table) stay fp32 for the same reason: they
    are added, not multiplied, so autocast never rounds the policy's."""
    norms = [m for m in unet.modules() if isinstance(m, FP32_NORMS)]
    kept = [[p.detach().clone() for p in m.parameters()] for m in norms]
    buffers = [(m, n, b) for m in unet.modules() for n, b in m._buffers.items()
               if b is not None and b.is_floating_point()]  # fmt: skip
    unet.to(dtype)
    for module, params in zip(norms, kept, strict=True):
        for param, value in zip(module.parameters(), params, strict=True):
            param.data = value
    for module, name, value in buffers:
        module._buffers[name] = value


def cast_like_policy(reference: torch.nn.Module, dtype: torch.dtype, casts: ForwardCasts) -> None:
    """Give an fp32-loaded frozen reference the dtypes the policy's forward sees.

    ``casts.params`` None (autocast on fp32 weights): ``to_dtype_keeping_norms_fp32``. Otherwise
    the backend casts the policy's every parameter (FSDP's mixed precision, DeepSpeed's engine),
    its norms' weights included, so the reference's are cast the same way; likewise its buffers
    and, where FSDP casts the wrapped policy's call arguments, the reference's."""
    if casts.params is None:
        to_dtype_keeping_norms_fp32(reference, dtype)
    else:
        for param in reference.parameters():
            param.data = param.data.to(casts.params)
    if casts.buffers is not None:
        for module in reference.modules():
            for name, value in module._buffers.items():
                if value is not None and value.is_floating_point():
                    module._buffers[name] = value.to(casts.buffers)
    if casts.inputs is not None:
        cast_inputs_on_call(reference, casts.inputs)


def vae_source(config: LoadSettings) -> tuple[str, dict]:
    """(path, from_pretrained kwargs) of the VAE: --pretrained_vae, else the model's vae/."""
    if config.pretrained_vae:
        return config.pretrained_vae, {"use_safetensors": True}
    return config.pretrained_model, {"subfolder": "vae", **_hub_args(config)}


def load_vae(config: LoadSettings, dtype: torch.dtype, device: torch.device) -> AutoencoderKL:
    source, kwargs = vae_source(config)
    vae = AutoencoderKL.from_pretrained(source, dtype=dtype, **kwargs)
    return vae.requires_grad_(False).eval().to(device)


def load_family(
    config: LoadSettings, family_cls: type[ModelFamily], dtype: torch.dtype, device: torch.device
) -> ModelFamily:
    """The family with its frozen tokenizers and text encoders."""
    tokenizers, encoders = [], []
    for (tokenizer_folder, encoder_folder), encoder_cls in zip(
        family_cls.text_subfolders, family_cls.text_encoder_classes, strict=True
    ):
        tokenizers.append(
            AutoTokenizer.from_pretrained(
                config.pretrained_model, subfolder=tokenizer_folder, revision=config.revision
            )
        )
        encoder = encoder_cls.from_pretrained(
            config.pretrained_model, subfolder=encoder_folder, dtype=dtype, **_hub_args(config)
        )
        encoders.append(encoder.requires_grad_(False).eval().to(device))
    return family_cls(tokenizers, encoders, config.resolution, config.time_ids,
                      empty_prompt=config.empty_prompt_embeddings)  # fmt: skip


def load_components(
    config: LoadSettings,
    needs_reference: bool,
    weight_dtype: torch.dtype,
    device: torch.device,
    casts: ForwardCasts | None = None,
    decodes: bool = False,
) -> Components:
    """``casts``: what the training backend does to the policy's weights and inputs in its
    forward beyond autocast (``distributed.forward_casts``; None: nothing, a plain or DDP run),
    copied onto a frozen reference so that both compute the same at step 0. ``decodes``: the
    run decodes its own samples (the online losses), so the VAE loads even with ``--cache``,
    which then stands in for the text encoders only."""
    source = config.pretrained_model
    lora = config.lora_rank > 0
    # With LoRA the base weights are frozen: stored in the compute dtype like the reference.
    policy = load_unet(source, config, weight_dtype if lora else torch.float32)
    family_cls = family_for(policy.config)
    if lora:
        add_lora(policy, config.lora_rank, config.lora_alpha or config.lora_rank,
                 config.lora_target_modules, config.lora_dropout, config.seed)  # fmt: skip
    else:
        policy.requires_grad_(True)
    policy.train()
    apply_attention(policy, config.attention)
    if config.gradient_checkpointing:
        policy.enable_gradient_checkpointing()

    reference = None
    if needs_reference and lora:
        reference = AdaptersDisabled(policy)
    elif needs_reference:
        # Loaded in fp32, then cast: the norms must keep the checkpoint's exact values.
        reference = load_unet(config.reference_model or source, config)
        cast_like_policy(reference, weight_dtype, casts or ForwardCasts())
        reference.requires_grad_(False).eval().to(device)
        apply_attention(reference, config.attention)
        if config.torch_compile:
            compile_unet(reference, config.compile_backend)
    if config.torch_compile:
        compile_unet(policy, config.compile_backend)

    if config.cache:
        # The text encoders are not loaded: the cache holds every caption's (prompt's) features.
        family = family_cls([], [], config.resolution, config.time_ids,
                            empty_prompt=config.empty_prompt_embeddings)  # fmt: skip
        family.text_source = TextCache(config.cache, family_cls.text_feature_names, device)
    else:
        family = load_family(config, family_cls, weight_dtype, device)
    if config.cache and not decodes:
        # Nor the VAE: only its config (its scale); the cache holds the images' latents.
        path, kwargs = vae_source(config)
        where = {k: v for k, v in kwargs.items() if k in ("subfolder", "revision")}
        latent_encoder = CachedLatentEncoder(AutoencoderKL.load_config(path, **where), device)
    else:
        latent_encoder = VaeEncoder(load_vae(config, weight_dtype, device))

    family.configure(policy.config, config)
    # With the loaded VAE's and denoiser's own geometry, not the released models' 8x and 2x2.
    vae_scale = vae_scale_factor(latent_encoder.config)
    if config.resolution is not None:  # None: a caller that trains nothing (train.py fills it)
        family.check_resolution(config.resolution, vae_scale)
    scheduler = family_cls.scheduler_class.from_pretrained(
        source, subfolder="scheduler", revision=config.revision
    )
    process = family_cls.noise_process(scheduler, config, config.resolution,
                                       vae_scale * family.patch)  # fmt: skip
    policy_io = LoraIO(family_cls) if lora else FullUNetIO(family_cls.denoiser_folder)
    return Components(policy, reference, latent_encoder, family, process, policy_io)
