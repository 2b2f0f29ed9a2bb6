"""scripts/toy_colour_transfer.py: the probe that tunes the toy base on correct-caption scenes."""

from __future__ import annotations

import torch

from evaluation.suites import read_prompts
from models import generation
from scripts.build_toy_prefs import HELDOUT_PROMPTS
from scripts.toy_colour_transfer import continue_training, training_only
from scripts.train_toy_base import toy_scenes


def test_training_only_drops_exactly_the_heldout_captions():
    heldout = set(read_prompts(HELDOUT_PROMPTS))
    scenes = toy_scenes(300, seed=5, wrong_colour_share=0.0)
    kept = training_only(scenes, heldout)
    dropped = sum(c in heldout for c in scenes.captions)
    assert dropped > 0  # 12 of 54 captions: ~67 of 300 scenes
    assert len(kept.captions) == len(scenes.captions) - dropped == kept.pixels.shape[0]
    assert not heldout & set(kept.captions)


def test_continue_training_moves_the_unet_and_not_the_text_encoder():
    torch.manual_seed(0)
    pipe = generation.load_pipeline("assets/toy-sd15")
    unet_before = [p.detach().clone() for p in pipe.unet.parameters()]
    text_before = [p.detach().clone() for p in pipe.text_encoder.parameters()]
    scenes = toy_scenes(16, seed=5, wrong_colour_share=0.0)
    losses = continue_training(pipe, scenes, batch_size=4, lr=1e-3, steps=2, min_snr_gamma=5.0)
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    unet_after = pipe.unet.parameters()
    moved = [not torch.equal(a, b) for a, b in zip(unet_before, unet_after, strict=True)]
    assert sum(moved) > len(moved) // 2
    text_after = pipe.text_encoder.parameters()
    assert all(torch.equal(a, b) for a, b in zip(text_before, text_after, strict=True))
