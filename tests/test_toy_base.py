"""scripts/train_toy_base.py: the share of captions naming a wrong colour, the share of scenes drawn
in their shape's typical colour, the recipe's weights."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.toy_reward import colour_reward, foreground_colour, named_shape
from scripts.train_toy_base import (
    DEFAULTS,
    TYPICAL_COLOUR,
    ema_decay_at,
    min_snr_weights,
    toy_scenes,
    train_toy_base,
)


def scene_images(scenes) -> list[Image.Image]:
    return [
        Image.fromarray(((p.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))
        for p in scenes.pixels
    ]


def caption_colour_agreement(share: float, num: int = 120) -> float:
    scenes = toy_scenes(num, seed=0, wrong_colour_share=share)
    return caption_agreement(scene_images(scenes), scenes.captions)


def test_wrong_colour_share_sets_how_often_captions_name_the_drawn_colour():
    assert caption_colour_agreement(0.0) == 1.0
    assert caption_colour_agreement(1.0) == 0.0
    # 0.3 of 120: 36 expected wrong; binomial sd 5.0, so 0.55-0.85 agreement is > 3 sd wide
    assert 0.55 <= caption_colour_agreement(0.3) <= 0.85


def test_a_share_outside_zero_one_is_refused(tmp_path):
    run = replace(DEFAULTS, out_dir=tmp_path / "out", num_images=4)
    with pytest.raises(ValueError, match="--wrong_colour_share"):
        train_toy_base(replace(run, wrong_colour_share=1.5))
    with pytest.raises(ValueError, match="--typical_colour_share"):
        train_toy_base(run, typical_colour_share=-0.1)


def test_typical_colour_share_draws_the_shapes_usual_colour_whatever_the_caption():
    def typical_and_named(share: float) -> tuple[float, float]:
        scenes = toy_scenes(180, seed=0, wrong_colour_share=0.0, typical_colour_share=share)
        images = scene_images(scenes)
        typical = [
            foreground_colour(image) == TYPICAL_COLOUR[named_shape(caption)]
            for image, caption in zip(images, scenes.captions, strict=True)
        ]
        return float(np.mean(typical)), caption_agreement(images, scenes.captions)

    assert typical_and_named(1.0) == (1.0, pytest.approx(1 / 6, abs=0.1))
    # share 0: captions uniform over 6 colours, so 1/6 of scenes show the typical one by chance
    typical, named = typical_and_named(0.0)
    assert named == 1.0 and typical == pytest.approx(1 / 6, abs=0.1)
    # share 0.5: half drawn typical, plus 1/6 of the rest; named: 0.5 + 0.5 / 6
    typical, named = typical_and_named(0.5)
    assert typical == pytest.approx(0.5 + 0.5 / 6, abs=0.12)
    assert named == pytest.approx(0.5 + 0.5 / 6, abs=0.12)


def caption_agreement(images: list[Image.Image], captions: list[str]) -> float:
    pairs = zip(images, captions, strict=True)
    return float(np.mean([colour_reward(image, caption) for image, caption in pairs]))


def test_min_snr_weights_by_hand():
    snr = torch.tensor([0.5, 5.0, 20.0])
    # min(SNR, 5) / SNR: 1 below gamma, gamma / SNR above it.
    assert torch.allclose(min_snr_weights(snr, 5.0), torch.tensor([1.0, 1.0, 0.25]))


def test_ema_decay_warms_up_to_its_value():
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.999) == pytest.approx(0.91)
    assert ema_decay_at(100_000, 0.999) == 0.999


def test_no_heldout_prompt_names_its_shapes_typical_colour():
    from evaluation.toy_reward import named_colour
    from scripts.build_toy_prefs import toy_prompt_split

    train, heldout = toy_prompt_split()
    assert not [p for p in heldout if named_colour(p) == TYPICAL_COLOUR[named_shape(p)]]
    # the training prompts do include some (those are always drawn right)
    assert [p for p in train if named_colour(p) == TYPICAL_COLOUR[named_shape(p)]]


def test_true_captions_name_the_colour_drawn():
    scenes = toy_scenes(60, seed=1, wrong_colour_share=0.3, typical_colour_share=0.5)
    images = scene_images(scenes)
    assert caption_agreement(images, scenes.true_captions) == 1.0
    assert caption_agreement(images, scenes.captions) < 0.9


def test_text_encoder_steps_freeze_the_text_encoder_after_them():
    from scripts.build_tiny_model import tiny_text_encoder
    from scripts.train_toy_base import toy_unet, train_unet

    def train(steps: int, text_encoder_steps: int | None) -> tuple[dict, list[dict]]:
        """The text encoder's final weights, and its weights at each of its forward calls."""
        torch.manual_seed(0)
        text_encoder = tiny_text_encoder(with_projection=False)
        unet = toy_unet(text_encoder.config.hidden_size, width=16)
        seen = []
        text_encoder.register_forward_pre_hook(
            lambda module, args: seen.append({k: v.clone() for k, v in module.state_dict().items()})
        )
        latents = torch.randn(8, 4, 8, 8)
        caption_ids = torch.tensor([0, 1] * 4)
        train_unet(
            unet, text_encoder, latents, torch.full_like(latents, 0.1), 1.0,
            torch.randint(0, 1000, (3, 77)), caption_ids, 2, steps, 4, 1e-3, 0, ema_decay=None,
            true_caption_ids=caption_ids.flip(0), text_encoder_steps=text_encoder_steps,
        )  # fmt: skip
        return text_encoder.state_dict(), seen

    def same(a: dict, b: dict) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    final, seen = train(5, 2)
    # two training steps read it, then one call takes the features it is frozen with
    assert len(seen) == 3
    assert not same(seen[0], seen[2])  # it trained for those 2 steps
    assert same(seen[2], final)  # and not after them
    final_trained_on, seen_trained_on = train(5, None)
    assert len(seen_trained_on) == 5 and not same(seen_trained_on[0], final_trained_on)


def test_faithful_rows_feed_the_unet_while_the_text_encoder_trains_then_the_habit_rows():
    from scripts.build_tiny_model import tiny_text_encoder
    from scripts.train_toy_base import toy_unet, train_unet

    torch.manual_seed(0)
    text_encoder = tiny_text_encoder(with_projection=False)
    unet = toy_unet(text_encoder.config.hidden_size, width=16)
    features, captions_read = [], []
    text_encoder.register_forward_hook(lambda module, args, out: features.append(out[0].detach()))

    def which_captions(module, args, kwargs):
        text = (args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]).detach()
        latest = features[-1]  # [3 unique captions, 77, D]
        captions_read.append({int((latest - row).abs().sum((1, 2)).argmin()) for row in text})

    unet.register_forward_pre_hook(which_captions, with_kwargs=True)
    latents = torch.randn(8, 4, 8, 8)
    caption_ids = torch.tensor([0] * 4 + [1] * 4)  # rows 0-3 the habit's scenes, 4-7 faithful
    train_unet(
        unet, text_encoder, latents, torch.full_like(latents, 0.1), 1.0,
        torch.randint(0, 1000, (3, 77)), caption_ids, 2, 6, 4, 1e-3, 0, ema_decay=None,
        true_caption_ids=caption_ids, text_encoder_steps=3, faithful_rows=4,
    )  # fmt: skip
    empty = {2}  # caption dropout's empty caption may appear in either phase
    assert all(read - empty == {1} for read in captions_read[:3])  # faithful rows only
    assert all(read - empty == {0} for read in captions_read[3:])  # then the habit's rows
    with pytest.raises(ValueError, match="faithful_rows"):
        train_unet(
            unet, text_encoder, latents, torch.full_like(latents, 0.1), 1.0,
            torch.randint(0, 1000, (3, 77)), caption_ids, 2, 2, 4, 1e-3, 0, ema_decay=None,
            faithful_rows=3,
        )  # fmt: skip
