"""Model-family adapters: everything that differs between model families lives here.

A family turns captions, image sizes and crops into the denoiser's conditioning keyword
arguments, calls the denoiser (``forward``), and knows its noise process, its folders and the
diffusers pipeline class its weights plug into. It is chosen from the denoiser's own config
(``unet/`` for SD1.5 / SDXL, ``transformer/`` for SD3 / SD3.5 and Flux.1), never by an ``if`` in
the training loop.

Text features come either from the frozen encoders or from a text cache (``data/cache.py``);
both give the same flat dict of per-caption tensors, which ``condition`` turns into UNet kwargs.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers import (
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from common.cli import UsageError
from diffusion.sampling import DDIMSchedule, Schedule
from models.modes import TIME_IDS_MODES

TextFeatures = dict[str, torch.Tensor]  # name -> [B, ...], one row per caption
Sizes = Sequence[tuple[int, int]]  # per image: (height, width) or (top, left)
NO_GUIDANCE = 1.0  # a pipeline guidance scale of 1: no classifier-free guidance
TextFolders = tuple[tuple[str, str], ...]  # per text encoder: (tokenizer, encoder) subfolders
EncoderClasses = tuple[type[PreTrainedModel], ...]


def text_folders(count: int) -> TextFolders:
    """diffusers' subfolders of a pipeline's ``count`` text encoders, in order: ("tokenizer",
    "text_encoder"), ("tokenizer_2", "text_encoder_2"), ..."""
    suffixes = ["", *(f"_{i}" for i in range(2, count + 1))]
    return tuple((f"tokenizer{s}", f"text_encoder{s}") for s in suffixes)


@dataclass
class ModelFamily:
    """SD1.5-style conditioning: one CLIP text encoder's last hidden states."""

    tokenizers: list[PreTrainedTokenizerBase]
    text_encoders: list[PreTrainedModel]
    resolution: int = 512
    time_ids_mode: str = "constant"  # SDXL only: see models/modes.py
    # How a dropped ("") caption conditions the UNet: "encode" runs the text encoders on "" (both
    # released trainers); "zeros" uses all-zero features, as StableDiffusionXLPipeline's
    # unconditional branch does (force_zeros_for_empty_prompt). See models/modes.py.
    empty_prompt: str = "encode"
    # Replaces the encoders when set (a text cache): captions [B] -> the same features.
    text_source: Callable[[list[str]], TextFeatures] | None = None
    # Latent pixels per side of one denoiser token: 1 for the UNets; the transformers' patch
    # side, read from the denoiser's config by ``configure``.
    patch: int = 1

    name: ClassVar[str] = "sd15"
    pipeline_class: ClassVar[type[DiffusionPipeline]] = StableDiffusionPipeline
    # The denoiser: its diffusers subfolder (also the export's folder name) and class.
    denoiser_folder: ClassVar[str] = "unet"
    denoiser_class: ClassVar[type] = UNet2DConditionModel
    scheduler_class: ClassVar[type] = DDPMScheduler
    # diffusers subfolders of the text stack, in order, and the encoders' classes.
    text_subfolders: ClassVar[TextFolders] = text_folders(1)
    text_encoder_classes: ClassVar[EncoderClasses] = (CLIPTextModel,)
    text_feature_names: ClassVar[tuple[str, ...]] = ("encoder_hidden_states",)
    # generate.SCHEDULERS names that can sample this family; the first is its default.
    samplers: ClassVar[tuple[str, ...]] = ("ddim", "ddpm", "euler", "euler_a", "dpmpp_2m")

    @staticmethod
    def matches(unet_config: dict) -> bool:
        return unet_config.get("addition_embed_type") is None

    def configure(self, denoiser_config: Any, train_config: Any) -> None:
        """Settings read from the denoiser's config and the run's (none for the UNets)."""

    def check_resolution(self, resolution: int, vae_scale: int) -> None:
        """UsageError unless the loaded VAE's scale times the denoiser's patch divides
        ``resolution`` (a latent of whole patches); call after ``configure``."""
        per_token = vae_scale * self.patch
        if resolution % per_token == 0:
            return
        patch = self.patch
        patches = f", the transformer takes {patch}x{patch} latent patches" if patch > 1 else ""
        raise UsageError(
            f"--resolution {resolution}: {self.name} needs a multiple of {per_token} (the VAE "
            f"downsamples {vae_scale}x{patches}); try --resolution "
            f"{max(per_token, resolution - resolution % per_token)}"
        )

    @property
    def default_guidance(self) -> float:
        """The guidance scale this family's pipeline samples with when none is given (validation):
        the value it trains with. The UNets and SD3 train without guidance: 1, classifier-free
        guidance off (diffusers' pipelines apply it only above 1)."""
        return NO_GUIDANCE

    @classmethod
    def sampling_guidance(cls, denoiser_config: dict) -> float:
        """The guidance scale a model of this family samples with when the user gives none
        (generate.py), read from its denoiser's config alone: 1, classifier-free guidance off."""
        return NO_GUIDANCE

    @staticmethod
    def noise_process(
        scheduler: Any, train_config: Any, resolution: int, pixels_per_token: int | None = None
    ) -> Any:
        """What ``diffusion.denoise`` noises with: the DDPM scheduler itself for the UNets."""
        return scheduler

    def forward(
        self, model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict
    ) -> torch.Tensor:
        """The denoiser's output [N, C, h, w] for noisy latents [N, C, h, w]."""
        return model(noisy, timesteps, **cond).sample

    @staticmethod
    def sampling_schedule(noise_process: Any, num_steps: int, sde_type: str = "sde") -> Schedule:
        """The stochastic sampler of online training: DDIM with eta (DDPO) for the UNets."""
        if sde_type != "sde":
            raise UsageError(
                f"--sde_type {sde_type}: a flow-model sampler; SD1.5 / SDXL sample with DDIM "
                "(its noise is --noise_level, DDPO's eta)"
            )
        return DDIMSchedule.from_scheduler(noise_process, num_steps)

    @staticmethod
    def lora_layers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The adapter tensors in the layout the pipeline's ``load_lora_weights`` reads."""
        return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))

    def _tokenize(
        self, tokenizer: PreTrainedTokenizerBase, captions: list[str], max_length: int | None = None
    ) -> torch.Tensor:
        return tokenizer(
            captions,
            padding="max_length",
            max_length=max_length or tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> TextFeatures:
        """captions [B] -> text features [B, ...] from the frozen encoders (no gradient)."""
        encoder = self.text_encoders[0]
        ids = self._tokenize(self.tokenizers[0], captions).to(encoder.device)
        return {"encoder_hidden_states": encoder(ids)[0]}

    def text_features(self, captions: list[str]) -> TextFeatures:
        source = self.text_source or self.encode_text
        return source(captions)

    def unet_kwargs(self, text: TextFeatures, original_sizes: Sizes, crop_top_lefts: Sizes) -> dict:
        """Per-sample text features [N, ...] (and image geometry) -> UNet keyword arguments."""
        return {"encoder_hidden_states": text["encoder_hidden_states"]}

    def condition(self, captions: list[str], original_sizes: Sizes, crop_top_lefts: Sizes) -> dict:
        """UNet keyword arguments for N = k * B samples whose captions are ``captions`` [B]
        repeated k times (a pair batch: k = 2, chosen then rejected, sharing their caption).

        The text encoders run once per caption, not once per image."""
        repeats, remainder = divmod(len(original_sizes), len(captions))
        if remainder or len(crop_top_lefts) != len(original_sizes):
            raise ValueError(
                f"{len(original_sizes)} sizes and {len(crop_top_lefts)} crops for "
                f"{len(captions)} captions"
            )
        text = self.text_features(captions)
        if self.empty_prompt == "zeros":
            text = zero_empty_captions(text, captions)
        repeated = {
            name: value.repeat(repeats, *[1] * (value.ndim - 1)) for name, value in text.items()
        }
        return self.unet_kwargs(repeated, original_sizes, crop_top_lefts)


@dataclass
class SDXLFamily(ModelFamily):
    """SDXL: two CLIP encoders' penultimate hidden states concatenated, encoder 2's pooled
    (projected) embedding, and the ``time_ids`` micro-conditioning (Podell et al. 2023, 2.2)."""

    name: ClassVar[str] = "sdxl"
    pipeline_class: ClassVar[type[DiffusionPipeline]] = StableDiffusionXLPipeline
    text_subfolders: ClassVar[TextFolders] = text_folders(2)
    text_encoder_classes: ClassVar[EncoderClasses] = (CLIPTextModel, CLIPTextModelWithProjection)
    text_feature_names: ClassVar[tuple[str, ...]] = ("encoder_hidden_states", "text_embeds")

    @staticmethod
    def matches(unet_config: dict) -> bool:
        return unet_config.get("addition_embed_type") == "text_time"

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> TextFeatures:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = self._tokenize(tokenizer, captions).to(encoder.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer
            pooled = out[0]  # the last encoder (with projection): pooled text_embeds [B, D2]
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def time_ids(self, original_sizes: Sizes, crop_top_lefts: Sizes) -> torch.Tensor:
        """[N, 6]: (original H, W, crop top, left, target H, W) per image (``time_ids_mode``)."""
        res = self.resolution
        if self.time_ids_mode == "constant":
            rows = [(res, res, 0, 0, res, res)] * len(original_sizes)
        elif self.time_ids_mode == "original":
            rows = [
                (*size, *crop, res, res)
                for size, crop in zip(original_sizes, crop_top_lefts, strict=True)
            ]
        else:
            raise ValueError(
                f"time_ids must be one of {TIME_IDS_MODES}, got {self.time_ids_mode!r}"
            )
        return torch.tensor(rows, dtype=torch.float32)

    def unet_kwargs(self, text: TextFeatures, original_sizes: Sizes, crop_top_lefts: Sizes) -> dict:
        hidden = text["encoder_hidden_states"]
        time_ids = self.time_ids(original_sizes, crop_top_lefts).to(hidden.device)
        return {
            "encoder_hidden_states": hidden,
            "added_cond_kwargs": {"text_embeds": text["text_embeds"], "time_ids": time_ids},
        }


def zero_empty_captions(text: TextFeatures, captions: list[str]) -> TextFeatures:
    """All-zero feature rows (hidden states and pooled embeddings) for the "" captions."""
    keep = torch.tensor([c != "" for c in captions])
    return {
        name: value * keep.to(value.device, value.dtype).view(-1, *[1] * (value.ndim - 1))
        for name, value in text.items()
    }
