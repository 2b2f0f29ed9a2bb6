"""Train a toy flow-matching base from scratch: a tiny SD3-shaped pipeline that draws toy scenes.

The SD3 counterpart of scripts/train_toy_base.py (same scenes at 32 px, same wrong-colour
captions and caption dropout, same VAE recipe): a 16-channel VAE (2 downsamplings: 32 px ->
8x8x16 latents, shift and scale set so the latents have zero mean and unit variance), then an
MMDiT (``SD3Transformer2DModel``) trained by rectified flow on those latents (x = (1 - s) x0 +
s eps, target eps - x0, s = sigmoid(N(0, 1)): diffusion/flow_matching.py), jointly with its
CLIP-L and CLIP-G shaped tiny CLIPs (the real CLIP tokenizer). The tiny T5 (the project's stand-in
tokenizer, scripts/build_tiny_model.py) stays at its random init unless --train_t5: its 256
padded tokens per caption cost more CPU than the budget allows (measured at batch 64: 0.7 of
2.1 CPU-s per step; the transformer, over 16 image + 333 text tokens, most of the rest). The text
features are the SD3
family's own (models/flow_families.SD3Family), so the base trains on what its pipeline feeds it.
Same seed and step counts, same weights (on one machine's torch).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTokenizer

# Run as a script, the repo root is not on sys.path, and `scripts.*` needs it.
if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffusion.flow_matching import FlowMatching
from models.flow_families import SD3Family
from scripts.atomic_dir import atomic_directory
from scripts.build_tiny_model import T5_HIDDEN, TEXT_PROJECTION, tiny_t5, tiny_text_encoder
from scripts.clip_tokenizer import default_tokenizer_cache, ensure_clip_tokenizer
from scripts.t5_tokenizer import build_t5_tokenizer
from scripts.train_toy_base import (
    CAPTION_DROPOUT,
    RESOLUTION,
    VAE_BATCH,
    batches,
    latent_moments,
    toy_scenes,
    train_vae,
)

# The shipped toy-sd3's share of wrong-colour captions (the first SD1.5 toy base's recipe; the
# SD1.5 base now uses 0.3 on square canvases: docs/toy-benchmark.md, "The toy base").
FLOW_WRONG_COLOUR_CAPTIONS = 0.6
logger = logging.getLogger(__name__)

LATENT_CHANNELS = 16  # SD3's VAE width
# At 32 px (16 image tokens) no resolution shift: SD3's 3.0 is for 1024 px (Esser et al. 5.3.2).
TOY_SHIFT = 1.0


def toy_flow_vae() -> AutoencoderKL:
    """train_toy_base.toy_vae with SD3's 16 latent channels and no quant convs."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=RESOLUTION,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def toy_transformer() -> SD3Transformer2DModel:
    """A 4-layer MMDiT of 4 heads x 16 on 8x8x16 latents in 2x2 patches (16 image tokens)."""
    return SD3Transformer2DModel(
        sample_size=RESOLUTION // 4,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        num_layers=4,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=T5_HIDDEN,
        caption_projection_dim=64,
        pooled_projection_dim=2 * TEXT_PROJECTION,
        out_channels=LATENT_CHANNELS,
        pos_embed_max_size=8,
        qk_norm="rms_norm",
    )


def toy_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=TOY_SHIFT)


def train_transformer(
    transformer: SD3Transformer2DModel,
    family: SD3Family,
    latents: tuple[torch.Tensor, torch.Tensor],
    captions: list[str],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    train_t5: bool = False,
) -> None:
    """Velocity MSE on normalised latents, logit-normal sigmas, caption dropout; the CLIPs (and
    T5 with ``train_t5``) train with the transformer (every unique caption encoded each step)."""
    mean, std = latents
    process = FlowMatching(toy_scheduler(), sampling="logit_normal", shift=TOY_SHIFT)
    gen = torch.Generator().manual_seed(seed)
    unique = [*sorted(set(captions)), ""]
    index = {caption: i for i, caption in enumerate(unique)}
    caption_ids = torch.tensor([index[c] for c in captions])
    encoders = family.text_encoders if train_t5 else family.text_encoders[:2]
    frozen_t5 = None
    if not train_t5:
        family.text_encoders[2].requires_grad_(False).eval()
        with torch.no_grad():
            frozen_t5 = family._t5(unique)
    params = [*transformer.parameters(), *(p for e in encoders for p in e.parameters())]
    optimizer = torch.optim.AdamW(
        [
            {"params": list(transformer.parameters()), "weight_decay": 1e-2},
            {"params": [p for e in encoders for p in e.parameters()], "weight_decay": 0.0},
        ],
        lr=lr,
    )
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * s / steps))
    )
    transformer.train()
    for encoder in encoders:
        encoder.train()
    for step, idx in enumerate(batches(len(mean), batch_size, steps, gen)):
        text = family.encode_with_grad(unique, frozen_t5)
        x0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.cat([process.draw_timestep(gen) for _ in idx])
        noisy, target = process.noisy_and_target(x0, noise, t)
        ids = caption_ids[idx].clone()
        ids[torch.rand(len(idx), generator=gen) < CAPTION_DROPOUT] = index[""]
        cond = {name: value[ids] for name, value in text.items()}
        prediction = family.forward(transformer, noisy, t, cond)
        loss = F.mse_loss(prediction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("transformer step %d/%d loss %.5f", step + 1, steps, loss.item())
    transformer.eval()
    for encoder in encoders:
        encoder.eval()


def train_toy_flow_base(
    out_dir: Path,
    seed: int = 0,
    num_images: int = 4096,
    vae_steps: int = 400,
    steps: int = 1500,
    batch_size: int = 32,
    tokenizer_cache: Path | None = None,
    wrong_colour_share: float = FLOW_WRONG_COLOUR_CAPTIONS,
    train_t5: bool = False,
) -> Path:
    """Train the toy flow base and save it to out_dir (transformer and VAE in fp16)."""
    tokenizer_dir = ensure_clip_tokenizer(tokenizer_cache or default_tokenizer_cache())
    torch.manual_seed(seed)
    start = time.perf_counter()
    # The first SD1.5 base's scenes (cropped canvases), on which assets/toy-sd3 was trained.
    scenes = toy_scenes(num_images, seed, wrong_colour_share, square_canvas=False)
    tokenizers = [
        CLIPTokenizer.from_pretrained(tokenizer_dir),
        CLIPTokenizer.from_pretrained(tokenizer_dir, pad_token="!"),
        build_t5_tokenizer(),
    ]
    encoders = [
        tiny_text_encoder(with_projection=True, hidden_act="quick_gelu"),
        tiny_text_encoder(with_projection=True),
        tiny_t5(),
    ]
    vae, transformer = toy_flow_vae(), toy_transformer()
    logger.info(
        "%d scenes; vae %.2fM, transformer %.2fM params",
        num_images,
        sum(p.numel() for p in vae.parameters()) / 1e6,
        sum(p.numel() for p in transformer.parameters()) / 1e6,
    )
    train_vae(vae, scenes.pixels, vae_steps, VAE_BATCH, 2e-3, seed)
    mean, std = latent_moments(vae, scenes.pixels)
    # SD3's convention, (z - shift) * scale: zero-mean, unit-variance latents.
    shift, scaling = float(mean.mean()), float(1.0 / mean.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scaling)
    logger.info("vae done at %.0f s, shift %.4f, scale %.4f", time.perf_counter() - start,
                shift, scaling)  # fmt: skip
    family = SD3Family(tokenizers, encoders, RESOLUTION)
    latents = ((mean - shift) * scaling, std * scaling)
    train_transformer(transformer, family, latents, scenes.captions, steps, batch_size, 1e-3, seed,
                      train_t5)  # fmt: skip
    logger.info("transformer done at %.0f s", time.perf_counter() - start)

    pipe = StableDiffusion3Pipeline(
        transformer=transformer.half(),
        vae=vae.half(),
        text_encoder=encoders[0],
        tokenizer=tokenizers[0],
        text_encoder_2=encoders[1],
        tokenizer_2=tokenizers[1],
        text_encoder_3=encoders[2],
        tokenizer_3=tokenizers[2],
        scheduler=toy_scheduler(),
    )
    with atomic_directory(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for folder in ("tokenizer", "tokenizer_2"):  # vocab.json + merges.txt define CLIP's
            (tmp / folder / "tokenizer.json").unlink(missing_ok=True)
            for name in ("vocab.json", "merges.txt"):
                shutil.copyfile(tokenizer_dir / name, tmp / folder / name)
    return Path(out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("assets/toy-sd3"), help="output dir")
    parser.add_argument("--seed", type=int, default=0, help="seed for scenes and training")
    parser.add_argument("--images", type=int, default=4096, help="training scenes")
    parser.add_argument("--vae_steps", type=int, default=400, help="VAE optimizer steps")
    parser.add_argument("--steps", type=int, default=1500, help="transformer optimizer steps")
    parser.add_argument("--batch_size", type=int, default=32, help="images per step")
    parser.add_argument("--train_t5", action="store_true", help="train T5 too (slower)")
    parser.add_argument(
        "--wrong_colour_share",
        type=float,
        default=FLOW_WRONG_COLOUR_CAPTIONS,
        help="share of training captions naming another colour than the one drawn",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--tokenizer_cache", type=Path, default=None, help="CLIP tokenizer cache")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    train_toy_flow_base(args.out, args.seed, args.images, args.vae_steps, args.steps,
                        args.batch_size, args.tokenizer_cache, args.wrong_colour_share,
                        args.train_t5)  # fmt: skip
    print(f"trained the toy flow base into {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
