"""Build tiny, randomly initialised SD1.5-, SDXL-, SD3.5- and Flux-shaped pipelines, offline, in
diffusers format.

They have the real architecture families (CLIP text encoders with the real 49408-token vocabulary,
a 4-level VAE giving 8x downsampling, a cross-attention UNet, SD's training noise schedule; for
SD3.5 and Flux an MMDiT transformer, a 16-channel VAE with its shift and scale, a T5 encoder and
a flow-matching scheduler) at a size that builds, trains and samples in about a second on a CPU,
so tests and examples run the same code paths as the real models. T5's tokenizer is a small
stand-in the project builds (scripts/t5_tokenizer.py): the real vocabulary cannot be had offline.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)

# Run as a script, the repo root is not on sys.path, and `scripts.*` needs it.
if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.atomic_dir import atomic_directory
from scripts.clip_tokenizer import default_tokenizer_cache, ensure_clip_tokenizer
from scripts.t5_tokenizer import build_t5_tokenizer

logger = logging.getLogger(__name__)

Family = Literal["sd15", "sdxl", "sd3", "flux"]
FAMILIES: tuple[Family, ...] = ("sd15", "sdxl", "sd3", "flux")
PREDICTION_TYPES = ("epsilon", "v_prediction")

IMAGE_SIZE = 64  # pixels; the VAE's 3 downsamplings give 8x8 latents, like SD at 1/8 scale
TEXT_HIDDEN = 32
TEXT_PROJECTION = 32  # SDXL's pooled embedding width (1280 in the real model)
TIME_EMBED = 8  # SDXL's addition_time_embed_dim (256 in the real model)
NUM_TIME_IDS = 6  # SDXL time_ids: original H, W, crop top, left, target H, W
# VAE latent scale (and shift) per family, as in the real VAE configs (SD3.5's and Flux.1's
# 16-channel VAEs normalise latents as (z - shift) * scale).
VAE_SCALING = {"sd15": 0.18215, "sdxl": 0.13025, "sd3": 1.5305, "flux": 0.3611}
VAE_SHIFT = {"sd3": 0.0609, "flux": 0.1159}
LATENT_CHANNELS = {"sd15": 4, "sdxl": 4, "sd3": 16, "flux": 16}
T5_HIDDEN = 48  # wider than SD3's two CLIPs together (2 x 32), so their padding is exercised
T5_VOCAB = 256  # >= the stand-in tokenizer's 207 pieces


def clip_text_encoder(
    hidden: int, layers: int, heads: int, projection: bool, **config: Any
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A CLIP text encoder with the real 49408-token vocabulary and 77 positions, the pooled
    projection when ``projection`` (SDXL's second encoder, SD3's two); ``config``: the rest of
    CLIPTextConfig (hidden_act, projection_dim, pad_token_id)."""
    text_config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        # The pooled output is read at the first eos_token_id; the legacy default (2) is a real
        # token, so it must be CLIP's <|endoftext|> id.
        bos_token_id=49406,
        eos_token_id=49407,
        **config,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(text_config)


def tiny_text_encoder(
    with_projection: bool, hidden_act: str | None = None
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A 2-layer CLIP text encoder; SDXL's second encoder adds the pooled projection (SD3's
    CLIP-L too, with its quick_gelu)."""
    return clip_text_encoder(
        TEXT_HIDDEN,
        layers=2,
        heads=4,
        projection=with_projection,
        projection_dim=TEXT_PROJECTION,
        # SD1.5's encoder (OpenAI CLIP) uses quick_gelu, SDXL's second (OpenCLIP bigG) plain gelu.
        hidden_act=hidden_act or ("gelu" if with_projection else "quick_gelu"),
        pad_token_id=1,
    )


def tiny_unet(family: Family) -> UNet2DConditionModel:
    """A 2-level cross-attention UNet on 8x8x4 latents (~1M params)."""
    sdxl = family == "sdxl"
    extra = {}
    if sdxl:
        # SDXL conditions on pooled text + time_ids through an added embedding (SDXL paper, 2.2).
        extra = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": TIME_EMBED,
            "projection_class_embeddings_input_dim": NUM_TIME_IDS * TIME_EMBED + TEXT_PROJECTION,
        }
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=32,
        # SDXL attends to both encoders' hidden states concatenated.
        cross_attention_dim=2 * TEXT_HIDDEN if sdxl else TEXT_HIDDEN,
        attention_head_dim=8,
        use_linear_projection=sdxl,  # as in the real configs
        **extra,
    )


def kl_vae(block_out_channels: tuple[int, ...], **config: Any) -> AutoencoderKL:
    """SD's KL autoencoder on RGB with one encoder and decoder level per entry of
    ``block_out_channels`` (so one downsampling fewer); ``config``: AutoencoderKL's other
    arguments (latent_channels, sample_size, scaling and shift factors, ...)."""
    levels = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=block_out_channels,
        **config,
    )


def tiny_vae(family: Family) -> AutoencoderKL:
    """A 4-level VAE (3 downsamplings: 64 px -> 8x8 latents) with 4 latent channels (16, with
    a shift and without the quant convs, for SD3 and Flux, as their real VAEs)."""
    flow = family in VAE_SHIFT
    return kl_vae(
        (32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS[family],
        norm_num_groups=32,
        sample_size=IMAGE_SIZE,
        scaling_factor=VAE_SCALING[family],
        shift_factor=VAE_SHIFT.get(family),
        use_quant_conv=not flow,
        use_post_quant_conv=not flow,
    )


def tiny_t5() -> T5EncoderModel:
    """A 2-layer T5 v1.1-style encoder (gated GELU), the shape of SD3's and Flux's text_encoder_3
    / text_encoder_2 (T5-XXL, d_model 4096)."""
    config = T5Config(
        vocab_size=T5_VOCAB,
        d_model=T5_HIDDEN,
        d_kv=8,
        d_ff=2 * T5_HIDDEN,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )
    return T5EncoderModel(config)


def sd3_transformer(
    latent_size: int, layers: int, heads: int, head_dim: int, **config: Any
) -> SD3Transformer2DModel:
    """An SD3-style MMDiT on 16-channel latents in 2x2 patches, with SD3.5's qk RMSNorm and a
    caption projection heads x head_dim wide (as in the released configs); ``config``: the rest
    of SD3Transformer2DModel's arguments (text widths, positions, dual-attention layers)."""
    return SD3Transformer2DModel(
        sample_size=latent_size,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        caption_projection_dim=heads * head_dim,
        qk_norm="rms_norm",
        **config,
    )


def tiny_sd3_transformer() -> SD3Transformer2DModel:
    """An SD3.5-medium-shaped MMDiT (qk RMSNorm, one dual-attention layer) on 8x8x16 latents."""
    return sd3_transformer(
        IMAGE_SIZE // 8,
        layers=2,
        heads=2,
        head_dim=8,
        joint_attention_dim=T5_HIDDEN,
        pooled_projection_dim=2 * TEXT_PROJECTION,  # CLIP-L and CLIG-G pooled, concatenated
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
    )


def tiny_flux_transformer() -> FluxTransformer2DModel:
    """A Flux.1-dev-shaped transformer (one double and one single block, guidance embedding) on
    packed 2x2 patches of 16-channel latents (64 inputs per token)."""
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_HIDDEN,
        pooled_projection_dim=TEXT_HIDDEN,  # CLIP-L's pooled output (not projected)
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),  # sums to the head dim, as (16, 56, 56) does to 128
    )


def flow_scheduler(family: Family) -> FlowMatchEulerDiscreteScheduler:
    """The real schedulers' settings: SD3.5 shift 3.0; Flux.1-dev resolution-dependent shift."""
    if family == "sd3":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def build_flow_pipeline(family: Family, tokenizer_dir: Path) -> DiffusionPipeline:
    """SD3.5 (two CLIPs with projection + T5) or Flux.1 (CLIP-L + T5). Call under a seed."""
    common = {
        "vae": tiny_vae(family),
        "scheduler": flow_scheduler(family),
        "tokenizer": CLIPTokenizer.from_pretrained(tokenizer_dir),
    }
    if family == "sd3":
        return StableDiffusion3Pipeline(
            **common,
            transformer=tiny_sd3_transformer(),
            text_encoder=tiny_text_encoder(with_projection=True, hidden_act="quick_gelu"),
            text_encoder_2=tiny_text_encoder(with_projection=True),
            tokenizer_2=CLIPTokenizer.from_pretrained(tokenizer_dir, pad_token="!"),
            text_encoder_3=tiny_t5(),
            tokenizer_3=build_t5_tokenizer(),
        )
    return FluxPipeline(
        **common,
        transformer=tiny_flux_transformer(),
        text_encoder=tiny_text_encoder(with_projection=False),
        text_encoder_2=tiny_t5(),
        tokenizer_2=build_t5_tokenizer(),
    )


def training_scheduler(prediction_type: str) -> DDPMScheduler:
    """SD1.5 / SDXL's training noise schedule (scaled-linear betas, 1000 steps)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=prediction_type,
    )


def build_tiny_pipeline(
    family: Family,
    seed: int = 0,
    prediction_type: str = "epsilon",
    tokenizer_cache: Path | None = None,
) -> DiffusionPipeline:
    """Build (not save) a tiny pipeline of the given family; same seed, same weights.
    (``prediction_type`` applies to the UNet families; the flow ones predict velocity.)"""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}")
    tokenizer_dir = ensure_clip_tokenizer(tokenizer_cache or default_tokenizer_cache())
    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family in ("sd3", "flux"):
            return build_flow_pipeline(family, tokenizer_dir)
        parts = {
            "unet": tiny_unet(family),
            "vae": tiny_vae(family),
            "text_encoder": tiny_text_encoder(with_projection=False),
            "tokenizer": CLIPTokenizer.from_pretrained(tokenizer_dir),
            "scheduler": training_scheduler(prediction_type),
        }
        if family == "sd15":
            return StableDiffusionPipeline(
                **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
            )
        # SDXL's second tokenizer is the same BPE but pads with "!" (id 0), not <|endoftext|>.
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(tokenizer_dir, pad_token="!")
        parts["text_encoder_2"] = tiny_text_encoder(with_projection=True)
        return StableDiffusionXLPipeline(**parts, add_watermarker=False)


def build_tiny_model(
    out_dir: Path,
    family: Family = "sd15",
    seed: int = 0,
    prediction_type: str = "epsilon",
    tokenizer_cache: Path | None = None,
) -> Path:
    """Build a tiny pipeline and save it to out_dir (safetensors), replacing it atomically."""
    pipe = build_tiny_pipeline(family, seed, prediction_type, tokenizer_cache)
    with atomic_directory(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return Path(out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output pipeline directory")
    parser.add_argument("--family", choices=FAMILIES, default="sd15", help="model family")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    parser.add_argument(
        "--prediction_type", choices=PREDICTION_TYPES, default="epsilon", help="UNet target"
    )
    parser.add_argument("--tokenizer_cache", type=Path, default=None, help="CLIP tokenizer cache")
    parser.add_argument("--force", action="store_true", help="rebuild even if out exists")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if (args.out / "model_index.json").is_file() and not args.force:
        print(f"tiny {args.family} model already in {args.out} (use --force to rebuild)")
        return
    start = time.perf_counter()
    build_tiny_model(args.out, args.family, args.seed, args.prediction_type, args.tokenizer_cache)
    print(f"built tiny {args.family} model in {args.out} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
