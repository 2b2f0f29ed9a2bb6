"""scripts/train_toy_flow_base.py, a few steps: an SD3 pipeline that loads, is small enough to
ship, normalises its latents as SD3 does, and trains with prefdiff's own flow family."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from diffusers import StableDiffusion3Pipeline

from models.flow_families import SD3Family
from scripts.train_toy_base import toy_scenes
from scripts.train_toy_flow_base import DEFAULTS, FLOW_WRONG_COLOUR_CAPTIONS, train_toy_flow_base


def test_a_few_steps_give_a_small_sd3_pipeline_that_draws(tmp_path):
    run = replace(DEFAULTS, out_dir=tmp_path / "toy-sd3", steps=2, batch_size=8, num_images=64,
                  vae_steps=2)  # fmt: skip
    out = train_toy_flow_base(run)
    size = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    assert size <= 25 * 2**20  # the toy base limit
    pipe = StableDiffusion3Pipeline.from_pretrained(out)
    vae = pipe.vae.config
    assert vae.latent_channels == 16 and vae.shift_factor is not None
    # (z - shift) * scale: zero mean, unit std on the training scenes (SD3's convention; the
    # VAE is stored in fp16, so to rounding).
    pixels = toy_scenes(64, 0, FLOW_WRONG_COLOUR_CAPTIONS, square_canvas=False).pixels
    with torch.no_grad():
        z = pipe.vae.float().encode(pixels).latent_dist.mean
    normalised = (z - vae.shift_factor) * vae.scaling_factor
    assert abs(normalised.mean().item()) < 1e-2 and abs(normalised.std().item() - 1) < 1e-2
    tokenizers = [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3]
    family = SD3Family(tokenizers, [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3])
    embeds, _, pooled, _ = pipe.encode_prompt("a red circle", None, None,
                                              do_classifier_free_guidance=False)  # fmt: skip
    assert torch.allclose(family.encode_text(["a red circle"])["pooled_projections"], pooled)
    assert embeds.shape[1] == 77 + 256
    image = pipe("a red circle on a white background", num_inference_steps=2, height=32, width=32,
                 guidance_scale=1.0, output_type="np").images[0]  # fmt: skip
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
