"""Can tuning the toy base's UNet raise its colour following on held-out prompts at all?

The toy benchmark's colour task asks preference tuning on the 42 training prompts to make the base
draw the caption's colour more often on the 12 held-out prompts. This script asks the easier
question first, with the best data there is: it continues the base's own denoising training
(UNet only, text encoder frozen, as train.py tunes) on freshly drawn toy scenes whose captions all
name the drawn colour, optionally only the training prompts' scenes (``--train_prompts_only``),
then measures the colour rate on the held-out prompts exactly as the benchmark does (DDIM 20
steps, the toy guidance, every image from its own seed). If perfect supervision on the training
prompts cannot move the held-out rate, no preference loss on those prompts is expected to.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline

# Run as a script, the repo root is not on sys.path, and `scripts.*` needs it.
if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluation.suites import TOY_GUIDANCE, read_prompts
from evaluation.toy_reward import colour_reward
from models import generation
from scripts.build_toy_prefs import HELDOUT_PROMPTS
from scripts.toy_base_training import batches, latent_moments
from scripts.train_toy_base import ToyScenes, caption_token_ids, denoising_loss, toy_scenes
from training.config import CAPTION_DROPOUT

SCENE_SEED = 123  # not the base's scene seed (0): new drawings of the same captions


def training_only(scenes: ToyScenes, heldout: set[str]) -> ToyScenes:
    """The scenes whose caption is not a held-out prompt."""
    keep = [i for i, caption in enumerate(scenes.captions) if caption not in heldout]
    return ToyScenes(scenes.pixels[keep], [scenes.captions[i] for i in keep])


def continue_training(
    pipe: StableDiffusionPipeline,
    scenes: ToyScenes,
    batch_size: int,
    lr: float,
    steps: int,
    min_snr_gamma: float | None,
    seed: int = 0,
) -> list[float]:
    """Epsilon MSE on the scenes' latents (the base's objective), UNet only; the losses."""
    unet, vae = pipe.unet, pipe.vae
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    mean, std = latent_moments(vae, scenes.pixels)
    token_ids, caption_ids, empty_id = caption_token_ids(pipe.tokenizer, scenes.captions)
    with torch.no_grad():  # frozen, as train.py keeps it
        text = pipe.text_encoder(token_ids)[0]
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    unet.train()
    for idx in batches(len(mean), batch_size, steps, gen):
        loss = denoising_loss(
            unet, scheduler, (mean[idx], std[idx], vae.config.scaling_factor), text,
            caption_ids[idx], empty_id, gen, CAPTION_DROPOUT, min_snr_gamma,
        )  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    unet.eval()
    return losses


def heldout_colour_rate(pipe: StableDiffusionPipeline, prompts: list[str], seeds: int) -> float:
    images = generation.generate(
        pipe, prompts, list(range(seeds)), 20, TOY_GUIDANCE, 32,
        batch_size=64, progress=False, distinct_seeds=True,
    )  # fmt: skip
    return sum(colour_reward(g.image, g.prompt) for g in images) / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="assets/toy-sd15", help="toy base")
    parser.add_argument("--scenes", type=int, default=4096, help="scenes drawn (before filtering)")
    parser.add_argument("--train_prompts_only", action="store_true", help="drop held-out captions")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--min_snr_gamma", type=float, default=0.0, help="0: uniform weights")
    parser.add_argument("--eval_seeds", type=int, default=16, help="images per held-out prompt")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also save the tuned UNet here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = generation.load_pipeline(args.model)
    prompts = read_prompts(HELDOUT_PROMPTS)
    base = heldout_colour_rate(pipe, prompts, args.eval_seeds)
    scenes = toy_scenes(args.scenes, SCENE_SEED, wrong_colour_share=0.0)
    if args.train_prompts_only:
        scenes = training_only(scenes, set(prompts))
    losses = continue_training(
        pipe, scenes, args.batch_size, args.learning_rate, args.steps, args.min_snr_gamma or None
    )
    tuned = heldout_colour_rate(pipe, prompts, args.eval_seeds)
    if args.out:
        pipe.unet.save_pretrained(args.out)
    print(json.dumps({
        "scenes": len(scenes.captions), "train_prompts_only": args.train_prompts_only,
        "batch_size": args.batch_size, "learning_rate": args.learning_rate, "steps": args.steps,
        "min_snr_gamma": args.min_snr_gamma, "heldout_images": len(prompts) * args.eval_seeds,
        "base_colour": round(base, 4), "tuned_colour": round(tuned, 4),
        "first_loss": round(losses[0], 5), "last_loss": round(losses[-1], 5),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
