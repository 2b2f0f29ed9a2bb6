"""Real model configs with random weights (no download) for tiny, SD1.5, SDXL, SD3.5-medium and
Flux.1-dev sizes.

SD1.5: UNet 859.5M parameters (diffusers' UNet2DConditionModel defaults with cross-attention
dim 768), CLIP ViT-L/14 text encoder, the 4-level KL VAE. SDXL: UNet 2.57B (three levels,
transformer depths 1/2/10, text_time added conditioning), CLIP ViT-L + OpenCLIP ViT-bigG/14.
SD3.5-medium: the MMDiT-X transformer (24 layers of 24 heads x 64, qk RMSNorm, dual attention in
layers 0-12); Flux.1-dev: 19 double + 38 single blocks of 24 heads x 128, guidance embedding
(FluxTransformer2DModel's defaults). The flow sizes run cached only (no VAE, CLIP or T5 built):
their text features are random tensors of the real shapes (``text_shapes``). The online cases
(``bench.online_case``) decode their samples, so they build the VAE alone (``random_vae``).
"""

from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)

from scripts.build_tiny_model import (
    T5_HIDDEN,
    TEXT_HIDDEN,
    TEXT_PROJECTION,
    VAE_SCALING,
    VAE_SHIFT,
    clip_text_encoder,
    flow_scheduler,
    kl_vae,
    sd3_transformer,
    tiny_flux_transformer,
    tiny_sd3_transformer,
    tiny_text_encoder,
    tiny_unet,
    tiny_vae,
    training_scheduler,
)

# The real flow models' text widths: T5-XXL's hidden size (SD3.5's and Flux.1's text tokens) and
# SD3's pooled projection, CLIP-L's and CLIP-G's pooled embeddings concatenated.
T5_XXL_HIDDEN = 4096
SD3_POOLED = 768 + 1280
FLOW_SIZES = ("sd35m", "flux", "tiny_sd3", "tiny_flux")
SIZES = ("tiny", "sd15", "sdxl", *FLOW_SIZES)


@dataclass
class RandomModel:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list[torch.nn.Module]
    scheduler: DDPMScheduler


def _clip(hidden: int, layers: int, heads: int, act: str, projection: bool) -> torch.nn.Module:
    return clip_text_encoder(
        hidden, layers, heads, projection, hidden_act=act, projection_dim=hidden, pad_token_id=49407
    )


def _kl_vae(scaling_factor: float, sample_size: int) -> AutoencoderKL:
    return kl_vae(
        (128, 256, 512, 512),
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


def sd35_medium_transformer() -> SD3Transformer2DModel:
    return sd3_transformer(
        128,
        layers=24,
        heads=24,
        head_dim=64,
        joint_attention_dim=T5_XXL_HIDDEN,
        pooled_projection_dim=SD3_POOLED,
        pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),
    )


def build_unet(size: str) -> torch.nn.Module:
    builders = {
        "tiny": lambda: tiny_unet("sd15"),
        "sd15": sd15_unet,
        "sdxl": sdxl_unet,
        "sd35m": sd35_medium_transformer,
        "flux": lambda: FluxTransformer2DModel(guidance_embeds=True),
        "tiny_sd3": tiny_sd3_transformer,
        "tiny_flux": tiny_flux_transformer,
    }
    return builders[size]()


def _family(size: str) -> str:
    return "flux" if "flux" in size else "sd3"


def build_random_model(
    size: str, with_vae_and_text: bool = True, dtype: torch.dtype = torch.float32
) -> RandomModel:
    """Random-init model of ``size`` in ``dtype`` (a frozen LoRA base need never exist in fp32:
    Flux's would take 48 GB); the VAE and text encoders only when asked (a cached run never
    builds them; the flow sizes are always cached)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}")
    if size in FLOW_SIZES and with_vae_and_text:
        raise ValueError(f"{size}: the flow sizes run cached only (--cache on)")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        # Random init on the GPU when there is one: seconds for SDXL instead of a minute on CPU.
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            unet = build_unet(size)
            vae, encoders = _vae_and_text(size) if with_vae_and_text else (None, [])
    finally:
        torch.set_default_dtype(previous)
    scheduler = flow_scheduler(_family(size)) if size in FLOW_SIZES else None
    return RandomModel(unet, vae, encoders, scheduler or training_scheduler("epsilon"))


def text_shapes(size: str) -> dict[str, tuple[int, ...]]:
    """Per-caption text feature shapes of a cached flow run (the family's text_feature_names):
    SD3: 77 CLIP + 256 T5 tokens of T5-XXL's 4096, pooled CLIP-L + CLIP-G (768 + 1280);
    Flux: 512 T5 tokens, pooled CLIP-L (768)."""
    tiny = size.startswith("tiny")
    width = T5_HIDDEN if tiny else T5_XXL_HIDDEN
    if _family(size) == "sd3":
        pooled = 2 * TEXT_PROJECTION if tiny else SD3_POOLED
        return {"encoder_hidden_states": (77 + 256, width), "pooled_projections": (pooled,)}
    pooled = TEXT_HIDDEN if tiny else 768
    return {"encoder_hidden_states": (512, width), "pooled_projections": (pooled,)}


def _vae_and_text(size: str) -> tuple[AutoencoderKL, list[torch.nn.Module]]:
    if size == "tiny":
        return random_vae(size), [tiny_text_encoder(with_projection=False)]
    clip_l = _clip(768, 12, 12, "quick_gelu", False)
    if size == "sd15":
        return random_vae(size), [clip_l]
    return random_vae(size), [clip_l, _clip(1280, 32, 20, "gelu", True)]


def random_vae(size: str) -> AutoencoderKL:
    """The VAE of ``size`` alone, random init (what online sampling decodes with): the 4-level
    KL VAE, 4 latent channels for SD1.5 / SDXL; 16 channels with a shift and no quant convs for
    SD3.5 and Flux (their released vae/ configs)."""
    if size in FLOW_SIZES:
        family = _family(size)
        if size.startswith("tiny"):
            return tiny_vae(family)
        return AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=16,
            sample_size=1024,
            scaling_factor=VAE_SCALING[family],
            shift_factor=VAE_SHIFT[family],
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    if size == "tiny":
        return tiny_vae("sd15")
    return _kl_vae(0.18215, 512) if size == "sd15" else _kl_vae(0.13025, 1024)


def vae_config(size: str) -> dict:
    """The VAE's config without building it (what a cached run needs: the scaling factor)."""
    if size in FLOW_SIZES:  # the 16-channel VAEs' shift and scale (tiny ones use the real values)
        family = _family(size)
        return {"scaling_factor": VAE_SCALING[family], "shift_factor": VAE_SHIFT[family]}
    if size == "tiny":
        return dict(tiny_vae("sd15").config)
    return {"scaling_factor": 0.18215 if size == "sd15" else 0.13025, "shift_factor": None}
