"""scripts/train_toy_base.py: the share of captions naming a wrong colour, the recipe's weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.toy_reward import colour_reward
from scripts.train_toy_base import ema_decay_at, min_snr_weights, toy_scenes, train_toy_base


def caption_colour_agreement(share: float, num: int = 120) -> float:
    scenes = toy_scenes(num, seed=0, wrong_colour_share=share)
    images = [
        Image.fromarray(((p.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))
        for p in scenes.pixels
    ]
    pairs = zip(images, scenes.captions, strict=True)
    return float(np.mean([colour_reward(image, caption) for image, caption in pairs]))


def test_wrong_colour_share_sets_how_often_captions_name_the_drawn_colour():
    assert caption_colour_agreement(0.0) == 1.0
    assert caption_colour_agreement(1.0) == 0.0
    # 0.3 of 120: 36 expected wrong; binomial sd 5.0, so 0.55-0.85 agreement is > 3 sd wide
    assert 0.55 <= caption_colour_agreement(0.3) <= 0.85


def test_a_share_outside_zero_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--wrong_colour_share"):
        train_toy_base(tmp_path / "out", num_images=4, wrong_colour_share=1.5)


def test_min_snr_weights_by_hand():
    snr = torch.tensor([0.5, 5.0, 20.0])
    # min(SNR, 5) / SNR: 1 below gamma, gamma / SNR above it.
    assert torch.allclose(min_snr_weights(snr, 5.0), torch.tensor([1.0, 1.0, 0.25]))


def test_ema_decay_warms_up_to_its_value():
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.999) == pytest.approx(0.91)
    assert ema_decay_at(100_000, 0.999) == 0.999
