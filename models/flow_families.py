"""The flow-matching transformer families: SD3 / SD3.5 (``SD3Transformer2DModel``) and Flux.1
(``FluxTransformer2DModel``). Their noise process is ``flow_matching.FlowMatching``; the text
stacks and the denoiser calls follow diffusers' ``StableDiffusion3Pipeline`` and
``FluxPipeline`` (``encode_prompt``, the transformer call of the sampling loop), so that what a
model is trained on is what it is sampled with.
"""

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers.models import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.pipelines import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
from peft.utils import get_peft_model_state_dict
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

from diffusion.flow_matching import FlowMatching, resolution_shift
from diffusion.sampling import FlowSchedule, Schedule
from models.family import (
    NO_GUIDANCE,
    EncoderClasses,
    ModelFamily,
    TextFeatures,
    TextFolders,
    text_folders,
)

# The released VAEs downsample 8x and both transformers see 2x2 latent patches: one image token
# per 16 x 16 pixels (SD3's patch embedding, Flux's packing). Only for callers without loaded
# models: models.loading passes the loaded VAE's and transformer's own (``check_resolution``).
PIXELS_PER_TOKEN = 16
# FluxPipeline packs 2x2 latent patches into one token (``pack_latents``); Flux's transformer
# config says patch_size 1, as its input layer sees the packed tokens.
FLUX_PACKING = 2


@dataclass
class FlowFamily(ModelFamily):
    """What SD3 and Flux share: a transformer under ``transformer/``, a flow-matching scheduler,
    a T5 encoder whose features are padded to ``max_sequence_length`` tokens."""

    denoiser_folder: ClassVar[str] = "transformer"
    scheduler_class: ClassVar[type] = FlowMatchEulerDiscreteScheduler
    text_feature_names: ClassVar[tuple[str, ...]] = ("encoder_hidden_states", "pooled_projections")
    max_sequence_length: ClassVar[int] = 256
    samplers: ClassVar[tuple[str, ...]] = ("flow_euler",)

    def configure(self, denoiser_config: Any, train_config: Any) -> None:
        self.patch = denoiser_config["patch_size"]

    @staticmethod
    def noise_process(
        scheduler: Any, train_config: Any, resolution: int, pixels_per_token: int | None = None
    ) -> FlowMatching:
        """Flow matching with the run's sigma sampling and the scheduler's shift at this
        resolution's image-token count (``--flow_shift`` overrides it); ``pixels_per_token``:
        the loaded VAE's scale times the transformer's patch (checked by ``check_resolution``)."""
        tokens = (resolution // (pixels_per_token or PIXELS_PER_TOKEN)) ** 2
        shift = train_config.flow_shift
        return FlowMatching(
            scheduler,
            sampling=train_config.timestep_sampling,
            logit_mean=train_config.logit_mean,
            logit_std=train_config.logit_std,
            mode_scale=train_config.mode_scale,
            shift=resolution_shift(scheduler.config, tokens) if shift is None else shift,
        )

    @staticmethod
    def sampling_schedule(noise_process: Any, num_steps: int, sde_type: str = "sde") -> Schedule:
        """The stochastic sampler of online training: the scheduler's inference sigmas at the
        run's shift, with the Flow-GRPO SDE (``sde_type``: sde, dance or cps)."""
        return FlowSchedule.from_config(noise_process.config, num_steps, noise_process.shift,
                                        sde_type)  # fmt: skip

    @staticmethod
    def lora_layers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        # peft's own key layout, as diffusers' SD3 / Flux LoRA training scripts save it.
        return get_peft_model_state_dict(model)

    def _t5(self, captions: list[str]) -> torch.Tensor:
        """T5's last hidden states [B, max_sequence_length, D] (padding included: the
        pipelines pass no attention mask)."""
        tokenizer, encoder = self.tokenizers[-1], self.text_encoders[-1]
        ids = self._tokenize(tokenizer, captions, self.max_sequence_length).to(encoder.device)
        return encoder(ids)[0]


@dataclass
class SD3Family(FlowFamily):
    """SD3 / SD3.5 (Esser et al. 2024, 2.1 and B.1): the penultimate hidden states of CLIP-L and
    CLIP-G concatenated on the channel axis, zero-padded to T5's width and concatenated with T5's
    on the token axis; the two CLIP pooled (projected) embeddings concatenated as the pooled
    projection. The transformer reads the timestep t = sigma * 1000."""

    name: ClassVar[str] = "sd3"
    pipeline_class: ClassVar[type[DiffusionPipeline]] = StableDiffusion3Pipeline
    denoiser_class: ClassVar[type] = SD3Transformer2DModel
    text_subfolders: ClassVar[TextFolders] = text_folders(3)
    text_encoder_classes: ClassVar[EncoderClasses] = (
        CLIPTextModelWithProjection,
        CLIPTextModelWithProjection,
        T5EncoderModel,
    )
    max_sequence_length: ClassVar[int] = 256  # StableDiffusion3Pipeline's default

    @staticmethod
    def matches(unet_config: dict) -> bool:
        return "caption_projection_dim" in unet_config and "pos_embed_max_size" in unet_config

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> TextFeatures:
        return self.encode_with_grad(captions)

    def encode_with_grad(self, captions: list[str], t5: torch.Tensor | None = None) -> TextFeatures:
        """``encode_text`` with autograd on (training text encoders: the toy flow base); ``t5``:
        the captions' T5 states when already computed (a frozen T5)."""
        hidden, pooled = [], []
        for tokenizer, encoder in zip(self.tokenizers[:2], self.text_encoders[:2], strict=True):
            out = encoder(self._tokenize(tokenizer, captions).to(encoder.device),
                          output_hidden_states=True)  # fmt: skip
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])  # text_embeds: the projected pooled output
        t5 = self._t5(captions) if t5 is None else t5
        clip = torch.cat(hidden, dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1])).to(t5)
        return {
            "encoder_hidden_states": torch.cat([clip, t5], dim=-2),
            "pooled_projections": torch.cat(pooled, dim=-1),
        }

    def unet_kwargs(self, text: TextFeatures, original_sizes, crop_top_lefts) -> dict:
        return {
            "encoder_hidden_states": text["encoder_hidden_states"],
            "pooled_projections": text["pooled_projections"],
        }

    def forward(
        self, model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict
    ) -> torch.Tensor:
        return model(hidden_states=noisy, timestep=timesteps, **cond).sample


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[N, C, h, w] -> [N, (h/2)(w/2), 4C]: each 2x2 patch one token, channels outermost in
    the token (C, then the patch's row, then column), as FluxPipeline packs."""
    n, c, h, w = latents.shape
    patches = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack_latents``: [N, (h/2)(w/2), 4C] -> [N, C, h, w]."""
    n, _, channels = tokens.shape
    patches = tokens.view(n, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(n, channels // 4, height, width)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[(h/2)(w/2), 3] position ids of the packed tokens: (0, row, column)."""
    rows, cols = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


# FluxPipeline's default guidance_scale, which guidance-distilled checkpoints (Flux.1-dev) feed to
# their guidance embedding; diffusers' Flux DreamBooth script trains at the same value.
FLUX_DEFAULT_GUIDANCE = 3.5


@dataclass
class FluxFamily(FlowFamily):
    """Flux.1 (Black Forest Labs; diffusers' FluxPipeline): CLIP-L's pooled output as the pooled
    projection, T5's hidden states as the text tokens (text position ids all zero), the latents
    packed into 2x2 patches with (0, row, column) position ids, the timestep passed as sigma,
    and, for guidance-distilled checkpoints (``guidance_embeds``), a guidance value per sample."""

    name: ClassVar[str] = "flux"
    pipeline_class: ClassVar[type[DiffusionPipeline]] = FluxPipeline
    denoiser_class: ClassVar[type] = FluxTransformer2DModel
    text_subfolders: ClassVar[TextFolders] = text_folders(2)
    text_encoder_classes: ClassVar[EncoderClasses] = (CLIPTextModel, T5EncoderModel)
    max_sequence_length: ClassVar[int] = 512  # FluxPipeline's default
    guidance: float | None = None  # set by ``configure`` for guidance-distilled transformers

    @staticmethod
    def matches(unet_config: dict) -> bool:
        return "axes_dims_rope" in unet_config

    def configure(self, denoiser_config: Any, train_config: Any) -> None:
        self.patch = FLUX_PACKING
        if denoiser_config.get("guidance_embeds", False):
            self.guidance = train_config.flux_guidance

    @property
    def default_guidance(self) -> float:
        # FluxPipeline feeds guidance_scale to a guidance-distilled transformer's guidance
        # embedding (it is not CFG there): sample at the value trained with, not at 1.
        return NO_GUIDANCE if self.guidance is None else self.guidance

    @classmethod
    def sampling_guidance(cls, denoiser_config: dict) -> float:
        # A guidance-distilled checkpoint (Flux.1-dev) at 1 would be told "no guidance" through
        # its embedding: FluxPipeline's own default instead. Flux.1-schnell has no embedding.
        distilled = denoiser_config.get("guidance_embeds", False)
        return FLUX_DEFAULT_GUIDANCE if distilled else NO_GUIDANCE

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> TextFeatures:
        tokenizer, clip = self.tokenizers[0], self.text_encoders[0]
        pooled = clip(self._tokenize(tokenizer, captions).to(clip.device)).pooler_output
        return {"encoder_hidden_states": self._t5(captions), "pooled_projections": pooled}

    def unet_kwargs(self, text: TextFeatures, original_sizes, crop_top_lefts) -> dict:
        hidden = text["encoder_hidden_states"]
        return {
            "encoder_hidden_states": hidden,
            "pooled_projections": text["pooled_projections"],
            "txt_ids": torch.zeros(hidden.shape[1], 3, device=hidden.device, dtype=hidden.dtype),
        }

    def forward(
        self, model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict
    ) -> torch.Tensor:
        n, _, height, width = noisy.shape
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((n,), self.guidance, device=noisy.device, dtype=torch.float32)
        out = model(
            hidden_states=pack_latents(noisy),
            timestep=timesteps / 1000,  # the pipeline's t / 1000: the transformer scales back
            img_ids=image_ids(height, width, noisy.device, noisy.dtype),
            guidance=guidance,
            **cond,
        ).sample
        return unpack_latents(out, height, width)
