"""What the two toy-base trainers share: scripts/train_toy_base.py (SD1.5-shaped, a UNet with the
epsilon target) and scripts/train_toy_flow_base.py (SD3-shaped, an MMDiT trained by rectified
flow).

Both train the VAE first on the scenes (train_vae, then the latent moments the denoiser samples
from), then the denoiser jointly with its text encoders under one AdamW with linear warm-up and
cosine decay (CosineAdamW), with caption dropout on indexed unique captions; both log the same
progress lines, save the pipeline with the CLIP tokenizer's own files and take the same settings
and flags (ToyBaseRun, toy_base_parser). Every random draw comes from the generator passed in, in
the trainers' order.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline

from scripts.atomic_dir import atomic_directory
from scripts.build_tiny_model import kl_vae
from scripts.clip_tokenizer import default_tokenizer_cache, ensure_clip_tokenizer

logger = logging.getLogger(__name__)

RESOLUTION = 32
CAPTION_DROPOUT = 0.1  # empty captions, so classifier-free guidance works
VAE_BATCH = 32
VAE_LR = 2e-3
KL_WEIGHT = 1e-6  # SD's VAE: a tiny KL term, latents rescaled afterwards by scaling_factor
WARMUP_SHARE = 20  # the learning rate warms up over the first 1/20 of the steps
GRAD_CLIP = 1.0
LOG_EVERY = 100  # steps between progress lines (and the last step)


def toy_vae(latent_channels: int, quant_convs: bool = True) -> AutoencoderKL:
    """3 levels, 2 downsamplings: 32 px -> 8x8 latents (SD's 1/8 latent grid at 1/16 the size);
    SD3's 16-channel VAE has no quant convs."""
    return kl_vae(
        (16, 32, 32),  # flat-coloured scenes need little capacity
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=RESOLUTION,
        use_quant_conv=quant_convs,
        use_post_quant_conv=quant_convs,
    )


def batches(num: int, batch_size: int, steps: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """steps index batches, reshuffling every epoch."""
    order = torch.randperm(num, generator=gen)
    position = 0
    for _ in range(steps):
        if position + batch_size > num:
            order, position = torch.randperm(num, generator=gen), 0
        yield order[position : position + batch_size]
        position += batch_size


def log_progress(phase: str, step: int, steps: int, loss: torch.Tensor) -> None:
    """The step's loss every LOG_EVERY steps (step is 0-based) and at the last one."""
    if step % LOG_EVERY == 0 or step == steps - 1:
        logger.info("%s step %d/%d loss %.5f", phase, step + 1, steps, loss.item())


def train_vae(
    vae: AutoencoderKL, pixels: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int
) -> None:
    """Reconstruction MSE + KL_WEIGHT * KL, AdamW."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    for step, idx in enumerate(batches(len(pixels), batch_size, steps, gen)):
        x = pixels[idx]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        loss = F.mse_loss(vae.decode(z).sample, x) + KL_WEIGHT * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        log_progress("vae", step, steps, loss)
    vae.eval()


@torch.no_grad()
def latent_moments(vae: AutoencoderKL, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for chunk in pixels.split(256):
        dist = vae.encode(chunk).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def log_sizes(num_images: int, vae: AutoencoderKL, name: str, denoiser: torch.nn.Module) -> None:
    millions = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (vae, denoiser)]
    logger.info("%d scenes; vae %.2fM, %s %.2fM params", num_images, millions[0], name, millions[1])


def fit_vae(
    vae: AutoencoderKL, pixels: torch.Tensor, steps: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train the VAE on the scenes (VAE_BATCH, VAE_LR) and return the mean and std of its
    posterior on every scene, [N, C, 8, 8] each."""
    train_vae(vae, pixels, steps, VAE_BATCH, VAE_LR, seed)
    return latent_moments(vae, pixels)


def sample_latents(mean: torch.Tensor, std: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One draw from the VAE posterior N(mean, std^2) per scene (a fresh draw each step)."""
    return mean + std * torch.randn(mean.shape, generator=gen)


def caption_index(captions: list[str]) -> tuple[list[str], torch.Tensor, int]:
    """The unique captions (sorted, then the empty one for caption dropout), each caption's row
    in them [N], and the empty caption's row: text is encoded once per unique caption."""
    unique = [*sorted(set(captions)), ""]
    index = {caption: i for i, caption in enumerate(unique)}
    return unique, torch.tensor([index[c] for c in captions]), index[""]


def drop_captions(
    ids: torch.Tensor, empty_id: int, share: float, gen: torch.Generator
) -> torch.Tensor:
    """The caption rows with a share of them (one draw per row) replaced by the empty one."""
    ids = ids.clone()
    ids[torch.rand(len(ids), generator=gen) < share] = empty_id
    return ids


class CosineAdamW:
    """AdamW over parameter groups (parameters, weight decay), the learning rate warmed up
    linearly over the first 1/WARMUP_SHARE of the steps and decayed by a half cosine to 0, the
    gradients clipped to norm GRAD_CLIP: both toy bases' denoiser recipe."""

    def __init__(
        self, groups: list[tuple[Iterable[torch.nn.Parameter], float]], lr: float, steps: int
    ):
        groups = [(list(params), decay) for params, decay in groups]
        self.params = [p for params, _ in groups for p in params]
        self.optimizer = torch.optim.AdamW(
            [{"params": params, "weight_decay": decay} for params, decay in groups], lr=lr
        )
        warmup = max(1, steps // WARMUP_SHARE)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * s / steps)),
        )

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
        self.optimizer.step()
        self.schedule.step()


def save_toy_pipeline(
    pipe: DiffusionPipeline, out_dir: Path, tokenizer_dir: Path, clip_folders: tuple[str, ...]
) -> Path:
    """Save the pipeline to out_dir atomically; the CLIP tokenizers in clip_folders keep only
    vocab.json + merges.txt, which fully define them (tokenizer.json repeats them: 3.6 MB)."""
    with atomic_directory(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for folder in clip_folders:
            (tmp / folder / "tokenizer.json").unlink(missing_ok=True)
            for name in ("vocab.json", "merges.txt"):
                shutil.copyfile(tokenizer_dir / name, tmp / folder / name)
    return Path(out_dir)


@dataclass(frozen=True)
class ToyBaseRun:
    """The settings both trainers take, and take as flags (toy_base_parser); each trainer's
    DEFAULTS hold its own defaults."""

    out_dir: Path
    steps: int  # the denoiser's optimizer steps
    batch_size: int  # scenes per denoiser step
    wrong_colour_share: float  # share of training captions naming another colour than drawn
    seed: int = 0  # of the scenes and of training
    num_images: int = 4096  # training scenes
    vae_steps: int = 400
    tokenizer_cache: Path | None = None  # where the CLIP tokenizer is built (default: build/)

    def clip_tokenizer(self) -> Path:
        """The folder of the real CLIP tokenizer, built there on first use."""
        return ensure_clip_tokenizer(self.tokenizer_cache or default_tokenizer_cache())


def toy_base_parser(doc: str, defaults: ToyBaseRun) -> argparse.ArgumentParser:
    """The flags of a ToyBaseRun, with a trainer's defaults, but for the denoiser's steps: each
    trainer names that flag (``--unet_steps``, ``--steps``), with ``dest="steps"``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=defaults.out_dir, help="output dir")
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed for scenes and training"
    )
    parser.add_argument("--images", type=int, default=defaults.num_images, help="training scenes")
    parser.add_argument(
        "--vae_steps", type=int, default=defaults.vae_steps, help="VAE optimizer steps"
    )
    parser.add_argument(
        "--batch_size", type=int, default=defaults.batch_size, help="images per step"
    )
    parser.add_argument(
        "--wrong_colour_share",
        type=float,
        default=defaults.wrong_colour_share,
        help="share of training captions naming another colour than the one drawn",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--tokenizer_cache",
        type=Path,
        default=defaults.tokenizer_cache,
        help="CLIP tokenizer cache",
    )
    return parser


def run_trainer(args: argparse.Namespace, what: str, train: Callable[[ToyBaseRun], Path]) -> None:
    """Log to stderr, set the CPU threads (--threads), train the run the flags give, and say
    where the base went."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    run = ToyBaseRun(
        args.out, args.steps, args.batch_size, args.wrong_colour_share, args.seed, args.images,
        args.vae_steps, args.tokenizer_cache,
    )  # fmt: skip
    out = train(run)
    print(f"trained the {what} into {out} in {time.perf_counter() - start:.0f} s")
