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

import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTokenizer

# Run as a script, the repo root is not on sys.path, and `scripts.*` needs it.
if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffusion.flow_matching import FlowMatching
from models.flow_families import SD3Family
from scripts import build_tiny_model as tiny
from scripts import toy_base_training as toy
from scripts.t5_tokenizer import build_t5_tokenizer
from scripts.train_toy_base import toy_scenes

# The shipped toy-sd3's share of wrong-colour captions (the first SD1.5 toy base's recipe; the
# SD1.5 base now uses 0.3 on square canvases: docs/toy-benchmark.md, "The toy base").
FLOW_WRONG_COLOUR_CAPTIONS = 0.6
logger = logging.getLogger(__name__)

LATENT_CHANNELS = 16  # SD3's VAE width
# At 32 px (16 image tokens) no resolution shift: SD3's 3.0 is for 1024 px (Esser et al. 5.3.2).
TOY_SHIFT = 1.0


def toy_transformer() -> SD3Transformer2DModel:
    """A 4-layer MMDiT of 4 heads x 16 on 8x8x16 latents in 2x2 patches (16 image tokens)."""
    return tiny.sd3_transformer(
        toy.RESOLUTION // 4,
        layers=4,
        heads=4,
        head_dim=16,
        joint_attention_dim=tiny.T5_HIDDEN,
        pooled_projection_dim=2 * tiny.TEXT_PROJECTION,
        pos_embed_max_size=8,
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
    unique, caption_ids, empty_id = toy.caption_index(captions)
    encoders = family.text_encoders if train_t5 else family.text_encoders[:2]
    frozen_t5 = None
    if not train_t5:
        family.text_encoders[2].requires_grad_(False).eval()
        with torch.no_grad():
            frozen_t5 = family._t5(unique)
    encoder_params = [p for e in encoders for p in e.parameters()]
    optimizer = toy.CosineAdamW(
        [(transformer.parameters(), 1e-2), (encoder_params, 0.0)], lr, steps
    )
    transformer.train()
    for encoder in encoders:
        encoder.train()
    for step, idx in enumerate(toy.batches(len(mean), batch_size, steps, gen)):
        text = family.encode_with_grad(unique, frozen_t5)
        x0 = toy.sample_latents(mean[idx], std[idx], gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.cat([process.draw_timestep(gen) for _ in idx])
        noisy, target = process.noisy_and_target(x0, noise, t)
        ids = toy.drop_captions(caption_ids[idx], empty_id, toy.CAPTION_DROPOUT, gen)
        cond = {name: value[ids] for name, value in text.items()}
        prediction = family.forward(transformer, noisy, t, cond)
        loss = F.mse_loss(prediction, target)
        optimizer.step(loss)
        toy.log_progress("transformer", step, steps, loss)
    transformer.eval()
    for encoder in encoders:
        encoder.eval()


DEFAULTS = toy.ToyBaseRun(Path("assets/toy-sd3"), 1500, 32, FLOW_WRONG_COLOUR_CAPTIONS)


def train_toy_flow_base(run: toy.ToyBaseRun = DEFAULTS, train_t5: bool = False) -> Path:
    """Train the toy flow base and save it to run.out_dir (transformer and VAE in fp16)."""
    tokenizer_dir = run.clip_tokenizer()
    torch.manual_seed(run.seed)
    start = time.perf_counter()
    # The first SD1.5 base's scenes (cropped canvases), on which assets/toy-sd3 was trained.
    scenes = toy_scenes(run.num_images, run.seed, run.wrong_colour_share, square_canvas=False)
    tokenizers = [
        CLIPTokenizer.from_pretrained(tokenizer_dir),
        CLIPTokenizer.from_pretrained(tokenizer_dir, pad_token="!"),
        build_t5_tokenizer(),
    ]
    encoders = [
        tiny.tiny_text_encoder(with_projection=True, hidden_act="quick_gelu"),
        tiny.tiny_text_encoder(with_projection=True),
        tiny.tiny_t5(),
    ]
    vae, transformer = toy.toy_vae(LATENT_CHANNELS, quant_convs=False), toy_transformer()
    toy.log_sizes(run.num_images, vae, "transformer", transformer)
    mean, std = toy.fit_vae(vae, scenes.pixels, run.vae_steps, run.seed)
    # SD3's convention, (z - shift) * scale: zero-mean, unit-variance latents.
    shift, scaling = float(mean.mean()), float(1.0 / mean.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scaling)
    logger.info("vae done at %.0f s, shift %.4f, scale %.4f", time.perf_counter() - start,
                shift, scaling)  # fmt: skip
    family = SD3Family(tokenizers, encoders, toy.RESOLUTION)
    latents = ((mean - shift) * scaling, std * scaling)
    train_transformer(transformer, family, latents, scenes.captions, run.steps, run.batch_size,
                      1e-3, run.seed, train_t5)  # fmt: skip
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
    return toy.save_toy_pipeline(pipe, run.out_dir, tokenizer_dir, ("tokenizer", "tokenizer_2"))


def main() -> None:
    parser = toy.toy_base_parser(__doc__, DEFAULTS)
    parser.add_argument(
        "--steps", type=int, default=DEFAULTS.steps, help="transformer optimizer steps"
    )
    parser.add_argument("--train_t5", action="store_true", help="train T5 too (slower)")
    args = parser.parse_args()
    toy.run_trainer(args, "toy flow base", lambda run: train_toy_flow_base(run, args.train_t5))


if __name__ == "__main__":
    main()
