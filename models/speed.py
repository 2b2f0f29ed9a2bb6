"""Speed switches that do not change the maths: attention kernel, TF32 matmuls, torch.compile."""

import logging

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

logger = logging.getLogger(__name__)

# sdpa: torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient kernels on
# GPU); eager: the explicit softmax(QK^T)V, for comparison and debugging.
ATTENTION_PROCESSORS = {"sdpa": AttnProcessor2_0, "eager": AttnProcessor}


def apply_attention(unet: torch.nn.Module, mode: str) -> None:
    """The UNets' attention kernel. The flow transformers' own processors (joint attention,
    Flux's rotary embeddings) already use sdpa, and have no eager twin here."""
    from diffusers import UNet2DConditionModel

    if isinstance(unet, UNet2DConditionModel):
        unet.set_attn_processor(ATTENTION_PROCESSORS[mode]())
    elif mode != "sdpa":
        raise ValueError(f"--attention {mode}: only sdpa for {type(unet).__name__}")


def allow_tf32(enabled: bool) -> None:
    """TF32 tensor-core matmuls and convolutions on Ampere+ GPUs (no effect on CPU)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def compile_unet(unet: torch.nn.Module, backend: str) -> None:
    """Compile in place (``nn.Module.compile``): parameter names, and so checkpoints, stay the
    same as without compiling."""
    logger.info("compiling the UNet with torch.compile(backend=%r)", backend)
    unet.compile(backend=backend)
