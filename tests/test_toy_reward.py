"""The toy reward rules on hand-made images: a satisfying and a failing example for each."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from evaluation.toy_reward import (
    RULES,
    background_colour,
    colour_reward,
    foreground_colour,
    foreground_mask,
    foreground_shape,
    named_colour,
    named_shape,
    shape_reward,
    toy_reward,
    warm_reward,
)
from scripts.build_toy_data import BACKGROUNDS, COLOURS


def scene(colour: str, background: str = "white", size: int = 32) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    ImageDraw.Draw(image).ellipse((8, 8, 23, 23), fill=COLOURS[colour])
    return image


@pytest.mark.parametrize("background", list(BACKGROUNDS))
@pytest.mark.parametrize("colour", list(COLOURS))
def test_every_palette_colour_is_recognised_on_every_background(colour, background):
    assert foreground_colour(scene(colour, background)) == colour


def test_colour_rule_accepts_the_named_colour_and_rejects_another():
    caption = "a red circle on a white background"
    assert colour_reward(scene("red"), caption) == 1.0
    assert colour_reward(scene("blue"), caption) == 0.0
    assert colour_reward(scene("blue"), "a blue circle on a white background") == 1.0


def test_colour_rule_survives_blur_and_noise():
    """Generated images are soft-edged and noisy; the median foreground colour still decides."""
    from PIL import ImageFilter

    blurred = scene("orange", "gray").filter(ImageFilter.GaussianBlur(1.5))
    noisy = Image.effect_noise((32, 32), 20).convert("RGB")
    image = Image.blend(blurred, noisy, 0.15)
    assert colour_reward(image, "an orange square on a gray background") == 1.0
    assert colour_reward(image, "a yellow square on a gray background") == 0.0


def test_colour_rule_fails_an_image_with_no_object():
    empty = Image.new("RGB", (32, 32), BACKGROUNDS["black"])
    assert foreground_colour(empty) is None
    assert colour_reward(empty, "a green circle on a black background") == 0.0


def test_a_caption_naming_no_colour_is_an_error():
    assert named_colour("A Purple triangle") == "purple"
    with pytest.raises(ValueError, match="names no palette colour"):
        colour_reward(scene("red"), "a circle on a white background")


def test_warm_rule_accepts_a_warm_tint_and_rejects_a_cool_one():
    warm = Image.new("RGB", (32, 32), (200, 150, 100))  # red - blue = 100
    cool = Image.new("RGB", (32, 32), (100, 150, 200))
    barely = Image.new("RGB", (32, 32), (119, 100, 100))  # red - blue = 19 < 20
    assert warm_reward(warm) == 1.0
    assert warm_reward(cool) == 0.0
    assert warm_reward(barely) == 0.0


def test_rules_are_looked_up_by_name():
    assert set(RULES) == {"colour", "shape", "warm"}
    assert toy_reward("warm") is warm_reward
    with pytest.raises(ValueError, match="unknown toy reward rule"):
        toy_reward("cold")


def shape_scene(shape: str, size: int = 32, box: tuple[int, int, int, int] = (8, 8, 23, 23)):
    image = Image.new("RGB", (size, size), BACKGROUNDS["gray"])
    draw, fill = ImageDraw.Draw(image), COLOURS["green"]
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((left + right) // 2, top), (right, bottom), (left, bottom)], fill=fill)
    return image


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
@pytest.mark.parametrize("box", [(8, 8, 23, 23), (2, 12, 14, 24), (10, 3, 29, 22)])
def test_shape_rule_accepts_the_named_shape_and_rejects_the_others(shape, box):
    image = shape_scene(shape, box=box)
    assert foreground_shape(image) == shape
    assert shape_reward(image, f"a green {shape} on a gray background") == 1.0
    for other_shape in {"circle", "square", "triangle"} - {shape}:
        assert shape_reward(image, f"a green {other_shape} on a gray background") == 0.0


def test_shape_rule_survives_blur_noise_and_a_stray_speck():
    from PIL import ImageFilter

    for shape in ("circle", "square", "triangle"):
        image = shape_scene(shape).filter(ImageFilter.GaussianBlur(1.0))
        image.paste(COLOURS["green"], (27, 2, 29, 4))  # a speck: not the largest region
        noisy = Image.effect_noise((32, 32), 20).convert("RGB")
        assert foreground_shape(Image.blend(image, noisy, 0.1)) == shape


def scene_images(scenes) -> list[Image.Image]:
    return [
        Image.fromarray(((p.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype("uint8"))
        for p in scenes.pixels
    ]


def test_shape_rule_reads_every_training_scene_of_the_toy_base():
    """The scenes the base trains on (square canvas, 32 px): every shape whole, every one read."""
    from scripts.train_toy_base import toy_scenes

    scenes = toy_scenes(150, seed=3, wrong_colour_share=0.0)
    images = scene_images(scenes)
    assert all(shape_reward(i, c) for i, c in zip(images, scenes.captions, strict=True))


def test_shape_rule_on_the_first_bases_cropped_scenes():
    """The first base's scenes (non-square canvases centre-cropped): every whole shape is read
    right; the crop cuts some at the border, and those may not be."""
    from scripts.train_toy_base import toy_scenes

    scenes = toy_scenes(150, seed=3, wrong_colour_share=0.0, square_canvas=False)
    images = scene_images(scenes)
    agreement = [shape_reward(i, c) for i, c in zip(images, scenes.captions, strict=True)]
    assert 0.9 <= sum(agreement) / len(agreement) < 1.0
    for image, caption, agrees in zip(images, scenes.captions, agreement, strict=True):
        pixels = np.asarray(image, dtype=np.float64)
        mask = foreground_mask(pixels, background_colour(pixels))
        if not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()):
            assert agrees == 1.0, caption


def test_shape_rule_fails_an_image_with_no_object_and_needs_a_shape_word():
    empty = Image.new("RGB", (32, 32), BACKGROUNDS["white"])
    assert foreground_shape(empty) is None
    assert shape_reward(empty, "a red circle on a white background") == 0.0
    assert named_shape("A red TRIANGLE") == "triangle"
    with pytest.raises(ValueError, match="names no toy shape"):
        shape_reward(shape_scene("circle"), "a red blob")
