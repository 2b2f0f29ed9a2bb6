"""Which family adapter a model gets: chosen from its denoiser's own config, never by name."""

from __future__ import annotations

from pathlib import Path

from diffusers import UNet2DConditionModel

from models.family import ModelFamily, SDXLFamily
from models.flow_families import FluxFamily, SD3Family

# Checked in order: the flow transformers first (their configs have no addition_embed_type).
FAMILIES: tuple[type[ModelFamily], ...] = (SD3Family, FluxFamily, SDXLFamily, ModelFamily)

# The denoiser subfolders a diffusers model directory may have, in the order they are tried
# (unet/ first: the UNet families were there first).
DENOISER_FOLDERS = tuple(dict.fromkeys(f.denoiser_folder for f in reversed(FAMILIES)))


def denoiser_config(source: str | Path, revision: str | None = None) -> dict:
    """The config.json of a model's denoiser (``unet/`` or ``transformer/``), no weights read."""
    errors = []
    for folder in DENOISER_FOLDERS:
        try:
            return dict(UNet2DConditionModel.load_config(source, subfolder=folder,
                                                         revision=revision))  # fmt: skip
        except (OSError, ValueError) as exc:
            errors.append(f"{folder}/: {str(exc).splitlines()[0]}")
    raise OSError(f"{source}: no denoiser config ({'; '.join(errors)})")


def family_for(unet_config: dict) -> type[ModelFamily]:
    """The family whose conditioning the denoiser (UNet or transformer) was built for."""
    for family in FAMILIES:
        if family.matches(unet_config):
            return family
    raise ValueError(
        f"no model family for a UNet with addition_embed_type="
        f"{unet_config.get('addition_embed_type')!r}; supported: {[f.name for f in FAMILIES]}"
    )
