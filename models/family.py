"""Model-family adapters: everything that differs between SD-family models lives here.

A family turns captions (and, for SDXL later, image sizes and crops) into the UNet's
conditioning keyword arguments. It is chosen from the UNet's own config, never by an ``if`` in
the training loop.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class ModelFamily:
    """SD1.5-style conditioning: one CLIP text encoder's last hidden states."""

    tokenizers: list[PreTrainedTokenizerBase]
    text_encoders: list[PreTrainedModel]

    name = "sd15"
    # diffusers subfolders of the text stack, in order.
    text_subfolders: tuple[tuple[str, str], ...] = (("tokenizer", "text_encoder"),)

    @staticmethod
    def matches(unet_config: dict) -> bool:
        return unet_config.get("addition_embed_type") is None

    def _tokenize(self, tokenizer: PreTrainedTokenizerBase, captions: list[str]) -> torch.Tensor:
        return tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """captions [B] -> text features [B, ...] (frozen encoders, no gradient)."""
        encoder = self.text_encoders[0]
        ids = self._tokenize(self.tokenizers[0], captions).to(encoder.device)
        return {"encoder_hidden_states": encoder(ids)[0]}

    def condition(
        self,
        captions: list[str],
        original_sizes: Sequence[tuple[int, int]],
        crop_top_lefts: Sequence[tuple[int, int]],
    ) -> dict[str, torch.Tensor]:
        """UNet keyword arguments for N = k * B samples whose captions are ``captions`` [B]
        repeated k times (a pair batch: k = 2, chosen then rejected, sharing their caption).

        The text encoders run once per caption, not once per image."""
        repeats, remainder = divmod(len(original_sizes), len(captions))
        if remainder:
            raise ValueError(f"{len(original_sizes)} images for {len(captions)} captions")
        text = self.encode_text(captions)
        return {
            name: value.repeat(repeats, *[1] * (value.ndim - 1)) for name, value in text.items()
        }


FAMILIES: tuple[type[ModelFamily], ...] = (ModelFamily,)


def family_for(unet_config: dict) -> type[ModelFamily]:
    """The family whose conditioning the UNet was built for."""
    for family in FAMILIES:
        if family.matches(unet_config):
            return family
    raise ValueError(
        f"no model family for a UNet with addition_embed_type="
        f"{unet_config.get('addition_embed_type')!r}; supported: {[f.name for f in FAMILIES]}"
    )
