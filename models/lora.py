"""LoRA on the UNet (peft), the reference as the same UNet with its adapters disabled, and how a
trained policy is saved: a full ``unet/`` or a ``lora/`` folder that pipelines load.

With LoRA there is no second UNet in memory: the base weights are frozen (stored in the compute
dtype), the adapters train in fp32, and the reference is the base model itself. The adapters'
B matrices start at zero, so the policy equals the reference at step 0 (DPO loss = log 2).
"""

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from models.family import ModelFamily

# The attention projections, as in diffusers' LoRA training examples.
DEFAULT_LORA_TARGETS = "to_q,to_k,to_v,to_out.0"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the name pipe.load_lora_weights(dir) reads
TRAINABLE_STATE = "trainable_params.safetensors"  # exact fp32 adapter state, for resuming


def add_lora(
    unet: UNet2DConditionModel,
    rank: int,
    alpha: float,
    targets: str,
    dropout: float = 0.0,
    seed: int = 0,
) -> None:
    """Attach a trainable LoRA adapter; everything else in ``unet`` is frozen. The random A
    matrices are drawn from ``seed``, so two runs with one config start from the same adapter."""
    unet.requires_grad_(False)
    modules = [m.strip() for m in targets.split(",") if m.strip()]
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        init_lora_weights="gaussian",  # A ~ N(0, 1/r), B = 0: the adapter starts as a no-op
        target_modules=modules,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG stream alone
        torch.manual_seed(seed)
        unet.add_adapter(config)
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # trainable weights in fp32, whatever the base dtype


class AdaptersDisabled(torch.nn.Module):
    """The reference model: the policy's UNet with its LoRA adapters switched off for the call.

    Its outputs equal the base UNet's exactly (peft skips the adapter branch entirely)."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet

    def forward(self, *args, **kwargs):
        self.unet.disable_adapters()
        try:
            return self.unet(*args, **kwargs)
        finally:
            self.unet.enable_adapters()


def trainable_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in unet.named_parameters() if p.requires_grad}


class FullUNetIO:
    """Full fine-tuning: the policy is saved as a diffusers ``unet/`` folder (``transformer/``
    for the flow transformers: the name of the pipeline component it replaces)."""

    def __init__(self, subfolder: str = "unet"):
        self.subfolder = subfolder

    def save(self, unet: UNet2DConditionModel, directory: Path) -> None:
        unet.save_pretrained(directory, safe_serialization=True)

    def load(self, unet: UNet2DConditionModel, directory: Path) -> None:
        saved = type(unet).from_pretrained(directory, use_safetensors=True)
        unet.load_state_dict(saved.state_dict())


class LoraIO:
    """LoRA: ``lora/`` holds the adapter in the format ``pipe.load_lora_weights(dir)`` reads,
    plus the exact trainable tensors that a resumed run loads back."""

    subfolder = "lora"

    def __init__(self, family: type[ModelFamily]):
        self.family = family

    def save(self, unet: UNet2DConditionModel, directory: Path) -> None:
        prefix = self.family.denoiser_folder  # unet_lora_layers / transformer_lora_layers
        # The adapter's config (rank, lora_alpha, targets) goes into the safetensors metadata:
        # without it load_lora_weights assumes alpha = rank, a weaker adapter when alpha != rank.
        self.family.pipeline_class.save_lora_weights(
            directory,
            weight_name=LORA_WEIGHTS,
            **{
                f"{prefix}_lora_layers": self.family.lora_layers(unet),
                f"{prefix}_lora_adapter_metadata": unet.peft_config["default"].to_dict(),
            },
        )
        save_file({k: v.contiguous() for k, v in trainable_state(unet).items()},
                  str(directory / TRAINABLE_STATE))  # fmt: skip

    def load(self, unet: UNet2DConditionModel, directory: Path) -> None:
        state = load_file(str(directory / TRAINABLE_STATE))
        expected = set(trainable_state(unet))
        if set(state) != expected:
            raise ValueError(
                f"{directory / TRAINABLE_STATE}: adapter tensors do not match this run's LoRA "
                f"(missing {sorted(expected - set(state))[:3]}, "
                f"unexpected {sorted(set(state) - expected)[:3]})"
            )
        unet.load_state_dict(state, strict=False)
