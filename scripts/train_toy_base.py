"""Train the toy base model from scratch: a tiny SD1.5-shaped pipeline that draws toy scenes.

The scenes are scripts/build_toy_data.py's (one coloured shape on a plain background) at 32 px.
The VAE (2 downsamplings: 32 px -> 8x8x4 latents) is trained first as an autoencoder, then the
UNet on its latents with SD's noise schedule and epsilon target, with the text encoder
(scripts/build_tiny_model.py's tiny CLIP with the real CLIP tokenizer) trained jointly for the
first TEXT_ENCODER_STEPS on captions that name the colour drawn, then frozen. With the text
encoder frozen at random init, the UNet learned to draw but not to read captions within the budget.

So that the base follows the caption's colour only part of the time (the toy preference task's
room for improvement), a share TYPICAL_COLOUR_SCENES of scenes shows the shape in its typical
colour whatever the caption names (WRONG_COLOUR_CAPTIONS, captions naming a random wrong colour,
was the second base's mechanism). With FAITHFUL_FIRST, the UNet learns that habit only after the
text encoder is frozen: before, it trains on as many scenes again, each drawn in the colour its
caption names, so it learns to draw every shape in every colour first (the fourth base; the third
learned the habit throughout and drew shapes in non-typical colours badly). Same seed and step
counts, same weights (on one machine's torch).
"""

from __future__ import annotations

import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

# Run as a script, the repo root is not on sys.path, and `scripts.*` needs it.
if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts import build_toy_data as toy_data
from scripts import toy_base_training as toy
from scripts.build_tiny_model import tiny_text_encoder, training_scheduler

logger = logging.getLogger(__name__)

LATENT_CHANNELS = 4
# Share of captions naming another colour than the one drawn (the second base's mechanism for
# partial colour following: 0.3; the first base's 0.6 left the colour word unread). The shipped
# base uses none: its partial colour following comes from TYPICAL_COLOUR_SCENES.
WRONG_COLOUR_CAPTIONS = 0.0
# Share of scenes drawn in their shape's TYPICAL_COLOUR whatever colour the caption names: at
# 0.5, the base draws the named colour on held-out prompts only part of the time
# (docs/toy-benchmark.md, "The toy base").
TYPICAL_COLOUR_SCENES = 0.5
# The UNet's first phase (while the text encoder trains) on scenes drawn in the named colour, the
# habit's scenes only after it: pretraining on faithful data, then fine-tuning on biased data.
# The third base (False, share 0.6) learned the habit from the start: it drew the caption's shape
# in 78% of held-out images, but in only 68% of its images in the caption's colour, and tuning it
# toward the colour cost 6-19 points of shape agreement (assets/readme_history.md, "How the toy
# base's prompt following was obtained").
FAITHFUL_FIRST = True
# The text encoder trains (jointly, on captions naming the colour drawn) for the first half of
# the UNet's steps, then stays frozen: it learns the colour words as a separately trained
# encoder would, and the UNet alone learns the typical-colour habit. With the text encoder
# trained throughout on the mistaken captions, it separated colours 4x less than shapes, and
# tuning the UNet could not raise colour following on held-out prompts (README, "Toy benchmark").
TEXT_ENCODER_STEPS = 1600
UNET_STEPS = 3200  # ~22 CPU-minutes with --threads 1 (the budget: 30)
SQUARE_CANVAS = (64, 64)
# Min-SNR-gamma loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
# Weighting Strategy", gamma 5 as in the paper): epsilon-MSE weighted by min(SNR, gamma) / SNR,
# so the easy low-noise steps stop dominating and the UNet learns shapes sooner.
MIN_SNR_GAMMA = 5.0
# Exponential moving average of the weights, saved instead of the last iterate: small diffusion
# models sample cleaner shapes from averaged weights.
EMA_DECAY = 0.999
# A shape's usual colour, which the base draws in place of the named one for a share of scenes:
# the "blue banana" failure of text-to-image models, a prior that overrides the caption. Chosen so
# that no held-out prompt (assets/toy_prompts_heldout.txt) names its shape's typical colour: there,
# every image in the typical colour is a failure to follow the caption.
TYPICAL_COLOUR = {"circle": "yellow", "square": "red", "triangle": "green"}


@dataclass
class ToyScenes:
    pixels: torch.Tensor  # [N, 3, R, R] in [-1, 1]
    captions: list[str]  # [N]
    true_captions: list[str] | None = None  # [N], naming the colour drawn


def toy_scenes(
    num: int,
    seed: int,
    wrong_colour_share: float,
    square_canvas: bool = True,
    typical_colour_share: float = 0.0,
) -> ToyScenes:
    """num scenes at toy.RESOLUTION px; a share of captions names a wrong colour. square_canvas
    draws on a square canvas, so the centre crop never cuts a shape at the border (cut shapes
    taught the first base to draw fragments: 6% of cropped scenes fail the shape rule).
    typical_colour_share: the share of scenes drawn in their shape's TYPICAL_COLOUR whatever
    colour the caption names."""
    rng = random.Random(seed)
    pixels, captions, true_captions = [], [], []
    for _ in range(num):
        colour, shape = rng.choice(list(toy_data.COLOURS)), rng.choice(toy_data.SHAPES)
        background = rng.choice(list(toy_data.BACKGROUNDS))
        sizes = (SQUARE_CANVAS,) if square_canvas else toy_data.SIZES
        drawn = colour
        if typical_colour_share and rng.random() < typical_colour_share:
            drawn = TYPICAL_COLOUR[shape]
        image = toy_data.draw_scene(rng, drawn, shape, background, sizes)
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        size = (toy.RESOLUTION, toy.RESOLUTION)
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2)
        wrong = rng.random() < wrong_colour_share  # drawn before the wrong colour, if any
        named = toy_data.other(rng, toy_data.COLOURS, drawn) if wrong else colour
        captions.append(toy_data.scene_caption(named, shape, background))
        true_captions.append(toy_data.scene_caption(drawn, shape, background))
        pixels.append(torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1))
    return ToyScenes(torch.stack(pixels) / 127.5 - 1.0, captions, true_captions)


def toy_unet(cross_attention_dim: int, width: int = 32) -> UNet2DConditionModel:
    """A 2-level cross-attention UNet on 8x8x4 latents, width and 2 x width channels."""
    return UNet2DConditionModel(
        sample_size=toy.RESOLUTION // 4,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(width, 2 * width),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=32 if width % 32 == 0 else 16,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
    )


def min_snr_weights(snr: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample weights of the epsilon MSE under Min-SNR-gamma: min(SNR, gamma) / SNR."""
    return snr.clamp(max=gamma) / snr


def caption_token_ids(
    tokenizer: CLIPTokenizer, captions: list[str]
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each unique caption (and the empty one) tokenized once: token ids [U, 77], each scene's
    row in them [N], and the empty caption's row (for caption dropout)."""
    unique, caption_ids, empty_id = toy.caption_index(captions)
    token_ids = tokenizer(unique, padding="max_length", max_length=77, return_tensors="pt")
    return token_ids.input_ids, caption_ids, empty_id


def denoising_loss(
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    latent_dist: tuple[torch.Tensor, torch.Tensor, float],
    text: torch.Tensor,
    caption_ids: torch.Tensor,
    empty_id: int,
    gen: torch.Generator,
    caption_dropout: float,
    min_snr_gamma: float | None,
) -> torch.Tensor:
    """The base's objective on one batch: epsilon MSE on latents sampled from the VAE posterior
    (latent_dist: mean, std [B, 4, 8, 8] and the scaling factor), a share of captions replaced by
    the empty one, Min-SNR-gamma weights if given. text: [U, L, D] for the unique captions."""
    mean, std, scaling = latent_dist
    latents = toy.sample_latents(mean, std, gen) * scaling
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(mean),), generator=gen)
    ids = toy.drop_captions(caption_ids, empty_id, caption_dropout, gen)
    prediction = unet(scheduler.add_noise(latents, noise, t), t, text[ids]).sample
    per_sample = (prediction - noise).pow(2).mean(dim=(1, 2, 3))
    if min_snr_gamma:
        snr = scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])
        per_sample = per_sample * min_snr_weights(snr, min_snr_gamma)
    return per_sample.mean()


def ema_decay_at(step: int, decay: float) -> float:
    """The moving average's decay at an optimizer step (0-based), warmed up so the first steps'
    weights are not averaged with the random init for long."""
    return min(decay, (1 + step) / (10 + step))


def freeze_text_encoder(
    text_encoder: CLIPTextModel,
    params: list[torch.nn.Parameter],
    ema: list[torch.Tensor] | None,
    token_ids: torch.Tensor,
) -> torch.Tensor:
    """Stop training the text encoder: it takes its moving average (if any) for good, so the
    UNet trains from here on against the text features it will be saved with. Returns those
    features for every unique caption."""
    text_encoder_params = {id(p) for p in text_encoder.parameters()}
    with torch.no_grad():
        if ema is not None:
            for param, average in zip(params, ema, strict=True):
                if id(param) in text_encoder_params:
                    param.copy_(average)
        text_encoder.requires_grad_(False)
        text_encoder.eval()
        return text_encoder(token_ids)[0]


def train_unet(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    mean: torch.Tensor,
    std: torch.Tensor,
    scaling: float,
    token_ids: torch.Tensor,
    caption_ids: torch.Tensor,
    empty_id: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    min_snr_gamma: float | None = MIN_SNR_GAMMA,
    ema_decay: float | None = EMA_DECAY,
    true_caption_ids: torch.Tensor | None = None,
    text_encoder_steps: int | None = None,
    faithful_rows: int = 0,
) -> None:
    """Epsilon-prediction MSE on scaled latents, SD's training schedule, caption dropout; the
    text encoder (token_ids: [unique captions, 77]) trains with the UNet. With ema_decay, both
    models end holding their weights' moving average.

    With text_encoder_steps, the text encoder trains for those first steps only, on the captions
    that name the drawn colour (true_caption_ids), then is frozen (at its moving average) while
    the UNet goes on with caption_ids: a text encoder that learned the colour words, and a UNet
    that learned the captions' mistakes, as SD's CLIP was trained apart from its UNet's data.

    faithful_rows > 0: the last rows of mean, std and the ids are as many scenes again, drawn in
    the colour their caption names; the UNet trains on them while the text encoder trains and on
    the others afterwards (the same batch draws, offset)."""
    scheduler = training_scheduler("epsilon")
    gen = torch.Generator().manual_seed(seed)
    optimizer = toy.CosineAdamW(
        [(unet.parameters(), 1e-2), (text_encoder.parameters(), 0.0)], lr, steps
    )
    unet.train()
    text_encoder.train()
    params = optimizer.params
    ema = [p.detach().clone() for p in params] if ema_decay else None
    frozen_text = None
    habit_rows = len(mean) - faithful_rows
    if faithful_rows not in (0, habit_rows):
        raise ValueError(f"faithful_rows {faithful_rows}: 0 or half of the {len(mean)} rows")
    for step, idx in enumerate(toy.batches(habit_rows, batch_size, steps, gen)):
        text_encoder_trains = text_encoder_steps is None or step < text_encoder_steps
        if faithful_rows and text_encoder_trains:
            idx = idx + habit_rows
        if not text_encoder_trains and frozen_text is None:
            frozen_text = freeze_text_encoder(text_encoder, params, ema, token_ids)
        text = text_encoder(token_ids)[0] if frozen_text is None else frozen_text
        ids = true_caption_ids if text_encoder_trains and text_encoder_steps else caption_ids
        loss = denoising_loss(
            unet, scheduler, (mean[idx], std[idx], scaling), text, ids[idx], empty_id,
            gen, toy.CAPTION_DROPOUT, min_snr_gamma,
        )  # fmt: skip
        optimizer.step(loss)
        if ema is not None:
            decay = ema_decay_at(step, ema_decay)
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        toy.log_progress("unet", step, steps, loss)
    if ema is not None:
        with torch.no_grad():
            for param, average in zip(params, ema, strict=True):
                param.copy_(average)
    unet.eval()
    text_encoder.eval()


DEFAULTS = toy.ToyBaseRun(Path("assets/toy-sd15"), UNET_STEPS, 64, WRONG_COLOUR_CAPTIONS)


def train_toy_base(
    run: toy.ToyBaseRun = DEFAULTS,
    unet_width: int = 32,
    square_canvas: bool = True,
    min_snr_gamma: float | None = MIN_SNR_GAMMA,
    ema_decay: float | None = EMA_DECAY,
    typical_colour_share: float = TYPICAL_COLOUR_SCENES,
    text_encoder_steps: int | None = TEXT_ENCODER_STEPS,
    faithful_first: bool = FAITHFUL_FIRST,
) -> Path:
    """Train the toy base and save it to run.out_dir (UNet and VAE in fp16), atomically."""
    tokenizer_dir = run.clip_tokenizer()
    seed, num_images, wrong_colour_share = run.seed, run.num_images, run.wrong_colour_share
    torch.manual_seed(seed)
    start = time.perf_counter()
    if not 0.0 <= wrong_colour_share <= 1.0:
        raise ValueError(f"--wrong_colour_share must lie in [0, 1], got {wrong_colour_share}")
    if not 0.0 <= typical_colour_share <= 1.0:
        raise ValueError(f"--typical_colour_share must lie in [0, 1], got {typical_colour_share}")
    scenes = toy_scenes(num_images, seed, wrong_colour_share, square_canvas, typical_colour_share)
    faithful_rows = 0
    if faithful_first:
        if not text_encoder_steps:
            raise ValueError(
                "the faithful first phase needs --text_encoder_steps > 0 (or --no_faithful_first)"
            )
        faithful = toy_scenes(num_images, seed + 1, 0.0, square_canvas, 0.0)
        scenes = ToyScenes(
            torch.cat([scenes.pixels, faithful.pixels]),
            scenes.captions + faithful.captions,
            scenes.true_captions + faithful.true_captions,
        )
        faithful_rows = num_images
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    text_encoder = tiny_text_encoder(with_projection=False)
    vae = toy.toy_vae(LATENT_CHANNELS)
    unet = toy_unet(text_encoder.config.hidden_size, unet_width)
    toy.log_sizes(num_images, vae, "unet", unet)
    mean, std = toy.fit_vae(vae, scenes.pixels, run.vae_steps, seed)
    scaling = float(1.0 / mean.std())  # unit-variance latents, as SD's scaling_factor does
    vae.register_to_config(scaling_factor=scaling)
    logger.info("vae done at %.0f s, scaling_factor %.4f", time.perf_counter() - start, scaling)

    token_ids, caption_ids, empty_id = caption_token_ids(
        tokenizer, scenes.captions + scenes.true_captions
    )
    caption_ids, true_caption_ids = caption_ids.split(len(scenes.captions))
    train_unet(
        unet,
        text_encoder,
        mean,
        std,
        scaling,
        token_ids,
        caption_ids,
        empty_id,
        run.steps,
        run.batch_size,
        1e-3,
        seed,
        min_snr_gamma,
        ema_decay,
        true_caption_ids,
        text_encoder_steps,
        faithful_rows,
    )
    logger.info("unet done at %.0f s", time.perf_counter() - start)

    pipe = StableDiffusionPipeline(
        unet=unet.half(),
        vae=vae.half(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=training_scheduler("epsilon"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return toy.save_toy_pipeline(pipe, run.out_dir, tokenizer_dir, ("tokenizer",))


def main() -> None:
    parser = toy.toy_base_parser(__doc__, DEFAULTS)
    parser.add_argument(
        "--unet_steps",
        dest="steps",  # ToyBaseRun.steps, as the flow trainer's --steps
        metavar="UNET_STEPS",
        type=int,
        default=DEFAULTS.steps,
        help="UNet optimizer steps",
    )
    parser.add_argument(
        "--typical_colour_share",
        type=float,
        default=TYPICAL_COLOUR_SCENES,
        help="share of scenes drawn in their shape's typical colour whatever the caption names",
    )
    parser.add_argument(
        "--text_encoder_steps",
        type=int,
        default=TEXT_ENCODER_STEPS,
        help="train the text encoder for these first UNet steps only, on captions naming the "
        "drawn colour, then freeze it; 0: it trains throughout, on the captions",
    )
    parser.add_argument(
        "--no_faithful_first",
        action="store_true",
        help="the third base's recipe: the UNet trains on the habit's scenes from the start, "
        "not first on scenes drawn in the colour their caption names",
    )
    parser.add_argument("--unet_width", type=int, default=32, help="UNet channels (level 1)")
    parser.add_argument(
        "--cropped_scenes",
        action="store_true",
        help="the first base's scenes: non-square canvases centre-cropped (cuts some shapes)",
    )
    parser.add_argument("--min_snr_gamma", type=float, default=MIN_SNR_GAMMA, help="0: off")
    parser.add_argument("--ema_decay", type=float, default=EMA_DECAY, help="0: off")
    args = parser.parse_args()
    toy.run_trainer(
        args,
        "toy base",
        lambda run: train_toy_base(
            run,
            args.unet_width,
            not args.cropped_scenes,
            args.min_snr_gamma or None,
            args.ema_decay or None,
            args.typical_colour_share,
            args.text_encoder_steps or None,
            not args.no_faithful_first,
        ),
    )


if __name__ == "__main__":
    main()
