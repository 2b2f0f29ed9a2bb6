"""Implicit reward accuracy of a trained policy on held-out preference pairs.

Diffusion-DPO's implicit reward of an image is g = ref_err - policy_err (docs/losses.md,
Conventions); a pair is ranked right when g(chosen) > g(rejected). One (timestep, noise) draw is
a noisy estimate, so each image's errors are averaged over several draws, shared by the pair as
in training, before the margin's sign is read.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image

from data.transforms import ImageTransform
from diffusion.denoising import VaeEncoder, batch_errors
from models.family import ModelFamily


def read_pairs(path: Path, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """Pick-a-Pic parquet -> (pixels [2B, 3, R, R] in [-1, 1], chosen first; captions [B]).
    Ties are dropped."""
    table = pd.read_parquet(path, columns=["caption", "jpg_0", "jpg_1", "label_0", "label_1"])
    table = table[table["label_0"] != table["label_1"]]
    chosen, rejected = [], []
    for row in table.itertuples():
        first, second = (
            (row.jpg_0, row.jpg_1) if row.label_0 > row.label_1 else (row.jpg_1, row.jpg_0)
        )
        chosen.append(_pixels(first, resolution))
        rejected.append(_pixels(second, resolution))
    return torch.stack(chosen + rejected), table["caption"].tolist()


def _pixels(jpeg: bytes, resolution: int) -> torch.Tensor:
    """The training transform without its random parts: shorter side resized, centre crop, no
    flip (a non-square image is cropped as in training, not squashed to a square)."""
    transform = ImageTransform(resolution, center_crop=True, random_flip=False)
    image = Image.open(io.BytesIO(jpeg))
    return transform([image], np.random.default_rng(0)).pixels[0]


@torch.no_grad()
def implicit_margins(
    policy: UNet2DConditionModel,
    reference: UNet2DConditionModel,
    vae: AutoencoderKL,
    scheduler: DDPMScheduler,
    family: ModelFamily,
    pixels: torch.Tensor,
    captions: list[str],
    draws: int = 16,
    batch_pairs: int = 32,
    seed: int = 0,
) -> torch.Tensor:
    """[B] margins g(chosen) - g(rejected), errors averaged over `draws` (timestep, noise) draws."""
    num = len(captions)
    margins = []
    for start in range(0, num, batch_pairs):
        stop = min(num, start + batch_pairs)
        batch = torch.cat([pixels[start:stop], pixels[num + start : num + stop]])
        condition = family.condition(
            captions[start:stop], [(0, 0)] * len(batch), [(0, 0)] * len(batch)
        )
        reward = torch.zeros(len(batch))
        for d in range(draws):
            policy_err, ref_err = batch_errors(
                policy,
                reference,
                VaeEncoder(vae),
                scheduler,
                condition,
                batch,
                group_size=2,
                first_group=d * num + start,
                seed=seed,
                autocast=contextlib.nullcontext,
                forward=family.forward,
            )
            reward += (ref_err - policy_err).cpu()
        reward /= draws
        half = stop - start
        margins.append(reward[:half] - reward[half:])
    return torch.cat(margins)


def accuracy(margins: torch.Tensor) -> float:
    """Share of pairs with a positive margin; a tie counts half (as rewards/accuracies does)."""
    return float(((margins > 0).float() + 0.5 * (margins == 0).float()).mean())
