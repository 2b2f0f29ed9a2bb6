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


# Inductor fuses half-precision ops and skips the rounding to bf16/fp16 between them that eager
# does, but the policy (a training graph: values saved for backward are rounded) and the frozen
# reference (an inference graph) fuse differently, so they disagree at step 0 (+0.35 on the DPO
# loss at beta 5000, tiny SD1.5 on CPU). Rounding as eager does makes both graphs compute the
# same (torch._inductor.config.emulate_precision_casts; exactly log 2 again on that run).
INDUCTOR_OPTIONS = {"emulate_precision_casts": True}


def compile_unet(unet: torch.nn.Module, backend: str) -> None:
    """Compile in place (``nn.Module.compile``): parameter names, and so checkpoints, stay the
    same as without compiling."""
    logger.info("compiling the UNet with torch.compile(backend=%r)", backend)
    options = INDUCTOR_OPTIONS if backend == "inductor" else None
    unet.compile(backend=backend, options=options)
