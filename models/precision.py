"""How the training backend presents the policy to its own forward pass, so that the frozen
reference can be given the same dtypes and compute exactly what the policy computes at step 0.

Three ways a backend can change what the policy's forward sees, besides autocast:
- its parameters, norms included, cast to a half dtype for the forward (FSDP's
  ``MixedPrecision.param_dtype``; DeepSpeed's engine, which holds the module in bf16/fp16);
- its floating buffers cast likewise (FSDP's ``buffer_dtype``; DeepSpeed's engine);
- the floating arguments of the call cast likewise (FSDP's root module casts its forward inputs
  to ``param_dtype``: ``cast_root_forward_inputs``, on by default), which rounds e.g. the flow
  timestep ``sigma * 1000`` (bf16: steps of 4 above 512).
"""

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ForwardCasts:
    """What the policy's forward sees, beyond autocast. None: left as loaded (fp32)."""

    params: torch.dtype | None = None  # every parameter, norms included
    buffers: torch.dtype | None = None  # every floating buffer (SD3's positional table)
    inputs: torch.dtype | None = None  # every floating argument of the denoiser's call


def cast_floating(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors in nested tuples, lists and dicts cast to ``dtype`` (as FSDP casts a
    root module's inputs: integer tensors such as DDPM timesteps are left alone)."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: cast_floating(v, dtype) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(cast_floating(v, dtype) for v in value)
    return value


def cast_inputs_on_call(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast every floating argument of ``module``'s calls to ``dtype`` from now on, at the same
    boundary where FSDP casts the wrapped policy's (the denoiser call, after the family's own
    arithmetic such as Flux's ``t / 1000``)."""

    def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return cast_floating(args, dtype), cast_floating(kwargs, dtype)

    module.register_forward_pre_hook(hook, with_kwargs=True)
