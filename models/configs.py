"""A model's configs read without its weights: where a model path or hub name is wrong, the
user hears it in one line naming the flag, before anything heavy loads."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.cli import UsageError

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_local(source: str) -> bool:
    """A hub name is exactly ``owner/name`` whose owner is not a local directory; anything
    else that does not exist (``./x``, ``/x``, ``a/b/c``, ``assets/typo``, ``name``) is a
    local path that is missing."""
    if not _HUB_NAME.match(source):
        return True
    return Path(source.split("/", 1)[0]).is_dir()


def check_local_path(source: str, flag: str) -> None:
    path = Path(source).expanduser()
    if not path.exists() and _looks_local(source):
        raise UsageError(f"{flag} {source}: no such directory (a hub name has the form owner/name)")
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {source}: not a directory (give a diffusers model directory)")


def model_config(source: str, subfolder: str | None, flag: str, revision: str | None) -> dict:
    """The config.json of a model part, read without any weights; UsageError naming ``flag``
    when ``source`` is a missing local path, not a diffusers model, or a hub name that cannot be
    reached (with ``HF_HUB_OFFLINE=1`` only the local cache is looked at, with no retries)."""
    check_local_path(source, flag)
    path = Path(source).expanduser()
    from diffusers import ConfigMixin
    from huggingface_hub import constants

    class _Config(ConfigMixin):
        config_name = "config.json"

    where = f"{subfolder}/config.json" if subfolder else "config.json"
    try:
        return dict(_Config.load_config(source, subfolder=subfolder, revision=revision))
    except (OSError, ValueError) as exc:
        if path.exists():
            reason = f"no {where} there: not a diffusers model directory"
        elif constants.HF_HUB_OFFLINE:
            reason = "not in the local hub cache, and HF_HUB_OFFLINE=1 (nothing is downloaded)"
        else:
            reason = f"could not be read from the hub ({str(exc).splitlines()[0]})"
        raise UsageError(f"{flag} {source}: {reason}") from exc


# Flux's transformer config has no sample_size: FluxPipeline's default_sample_size (1024 px).
FLUX_LATENT_SIZE = 128


def vae_scale_factor(vae: Mapping[str, Any]) -> int:
    """Pixels per latent pixel: 2 per VAE down block after the first (SD, SDXL, SD3, Flux: 8),
    as diffusers' pipelines compute their ``vae_scale_factor``."""
    return 2 ** (len(vae["block_out_channels"]) - 1)


def native_resolution(unet: dict, vae: dict) -> int:
    """The pixel size the model was trained at: the UNet's latent ``sample_size`` times the
    VAE's downsampling factor (SD1.5: 64 x 8 = 512)."""
    latent = unet.get("sample_size", FLUX_LATENT_SIZE)
    return int(latent) * vae_scale_factor(vae)


def denoiser_model_config(source: str, flag: str, revision: str | None) -> dict:
    """``model_config`` of the denoiser: ``unet/`` (SD1.5, SDXL) or ``transformer/`` (SD3, Flux)."""
    try:
        return model_config(source, "unet", flag, revision)
    except UsageError as missing_unet:
        try:
            return model_config(source, "transformer", flag, revision)
        except UsageError:
            raise missing_unet from None
