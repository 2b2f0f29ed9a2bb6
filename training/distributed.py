"""What differs between plain DDP, DeepSpeed and FSDP, kept out of the training loop.

- ``configure_backend``: before ``accelerator.prepare``, make train.py's flags the ones that hold
  (accumulation, clipping, micro-batch size) whatever ``accelerate launch`` exported, and refuse
  combinations that cannot work (LoRA under FSDP; NFT under ZeRO-3 or FSDP version 2).
- ``deepspeed_step_outcome``: under DeepSpeed the engine steps inside ``accelerator.backward``;
  its own signals say whether that step was applied and what the gradient norm was.
- ``fp32_state_dict``: the trainable weights as fp32 masters (ZeRO keeps them in its optimizer;
  the module it runs holds half-precision copies).
- ``forward_casts``: what the backend does to the policy's weights and inputs in its forward,
  which the frozen reference must copy to compute the same at step 0.
- ``gradient_sync``: a backward that reduces gradients across processes (and lets DeepSpeed's
  engine step) or one that only accumulates, for loops that backpropagate several times per
  optimizer step outside ``accelerator.accumulate`` (the online trainer).
- ``fsdp_flat_params`` / ``drop_gathered_params``: FSDP's local shards, for code that writes
  weights itself (NFT's old policy).
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, DistributedType

from common.cli import UsageError
from losses import get_spec
from models.precision import ForwardCasts
from training.config import TrainConfig

logger = logging.getLogger(__name__)


class LaunchConfigError(UsageError):
    """The launcher's settings and train.py's flags cannot both hold."""


def configure_deepspeed(plugin: DeepSpeedPlugin, config: TrainConfig, num_processes: int) -> None:
    """Write train.py's batch, accumulation and clipping values into the DeepSpeed config.

    train.py steps its own DataLoader, so accelerate cannot infer the micro-batch size from one
    passed to ``prepare`` (it raises when the config says "auto"); a value in the yaml that
    differs from the flag would silently change what an optimizer step is, so the flag wins
    and the change is announced."""
    ds = plugin.deepspeed_config
    wanted = {
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        # DeepSpeed clips inside its engine step; 0 disables clipping there as here.
        "gradient_clipping": float(config.max_grad_norm),
    }
    for key, value in wanted.items():
        given = ds.get(key, "auto")
        if given != "auto" and float(given) != float(value):
            logger.warning(
                "DeepSpeed config has %s=%s; train.py's --%s=%s holds (written into the config)",
                key,
                given,
                "max_grad_norm" if key == "gradient_clipping" else key,
                value,
            )
        ds[key] = value
    ds["train_micro_batch_size_per_gpu"] = config.train_batch_size
    ds["train_batch_size"] = (
        config.train_batch_size * config.gradient_accumulation_steps * num_processes
    )
    if config.optimizer != "adamw":
        # ZeRO refuses optimizers it has not tested (8-bit AdamW, Adafactor) unless told; both
        # step ZeRO's flat fp32 partitions like any other parameters.
        ds.setdefault("zero_allow_untested_optimizer", True)
    plugin.gradient_accumulation_steps = config.gradient_accumulation_steps
    plugin.gradient_clipping = float(config.max_grad_norm)


def check_backend(
    backend: DistributedType,
    config: TrainConfig,
    zero_stage: int | None = None,
    fsdp_version: int | None = None,
) -> None:
    """Refuse what the launch backend cannot do, before any model loads."""
    if backend == DistributedType.FSDP and config.lora_rank:
        raise LaunchConfigError(
            "--lora_rank is not supported under FSDP (its sharded parameters and the adapters' "
            "frozen base do not mix): launch LoRA with configs/multi_gpu.yaml (DDP) or DeepSpeed"
        )
    # NFT's old policy is put into the parameters each process holds: whole tensors (DDP,
    # ZeRO-1/2) or FSDP version 1's flat shards. ZeRO-3 partitions parameters and FSDP version
    # 2 gathers from buffers of its own: there the old policy would silently be the policy.
    if get_spec(config.loss).online != "endpoint":
        return
    if backend == DistributedType.DEEPSPEED and zero_stage == 3:
        raise LaunchConfigError(
            "--loss nft does not run under DeepSpeed ZeRO-3 (its old policy needs whole "
            "parameters): use ZeRO-2 (configs/deepspeed_zero2.yaml), FSDP or DDP"
        )
    if backend == DistributedType.FSDP and fsdp_version == 2:
        raise LaunchConfigError(
            "--loss nft does not run under FSDP version 2 (its old policy writes version 1's "
            "flat shards): use fsdp_version 1 as in configs/fsdp.yaml"
        )


def configure_backend(accelerator: Accelerator, config: TrainConfig) -> None:
    """Call right after building the Accelerator, before ``prepare``."""
    plugin = accelerator.state.deepspeed_plugin
    check_backend(accelerator.distributed_type, config,
                  zero_stage=None if plugin is None else plugin.zero_stage,
                  fsdp_version=2 if accelerator.is_fsdp2 else 1)  # fmt: skip
    # `accelerate launch` exports ACCELERATE_GRADIENT_ACCUMULATION_STEPS (from its flag or the
    # yaml), which overrides the Accelerator's argument; the loop counts micro-batches with
    # config.gradient_accumulation_steps, so that value must be accelerate's too.
    if accelerator.gradient_accumulation_steps != config.gradient_accumulation_steps:
        logger.warning(
            "the launcher set gradient accumulation to %d; train.py's "
            "--gradient_accumulation_steps=%d holds",
            accelerator.gradient_accumulation_steps,
            config.gradient_accumulation_steps,
        )
        accelerator.gradient_accumulation_steps = config.gradient_accumulation_steps
    if plugin is not None:
        configure_deepspeed(plugin, config, accelerator.num_processes)


def forward_casts(
    backend: DistributedType, weight_dtype: torch.dtype, fsdp_plugin: Any = None
) -> ForwardCasts:
    """What ``backend`` casts in the policy's forward beyond autocast (``models.precision``).

    - DeepSpeed: the engine holds the whole module, norms and buffers included, in the compute
      dtype and accelerate runs it without autocast (``diffusion.predict`` then casts the
      inputs of policy and reference alike).
    - FSDP (version 1, as configs/fsdp*.yaml): accelerate builds ``MixedPrecision`` with
      ``param_dtype`` = ``buffer_dtype`` = the compute dtype (``set_mixed_precision``, unless the
      yaml gives its own policy) and torch's defaults ``cast_root_forward_inputs=True``,
      ``cast_forward_inputs=False``: every parameter and buffer is cast for the forward, and the
      root module's floating arguments; accelerate's autocast runs on top.
    - plain and DDP runs: autocast alone (fp32 weights; norms use them unrounded).
    """
    if backend == DistributedType.DEEPSPEED:
        return ForwardCasts(params=weight_dtype, buffers=weight_dtype)
    policy = getattr(fsdp_plugin, "mixed_precision_policy", None)
    if backend != DistributedType.FSDP or policy is None:
        return ForwardCasts()
    if getattr(fsdp_plugin, "fsdp_version", 1) != 1:
        # FSDP2 casts the inputs of every sharded block, not only the root's.
        raise LaunchConfigError(
            "fsdp_version 2 with --mixed_precision is not supported (the reference cannot copy "
            "its per-block input casts): use fsdp_version 1 as in configs/fsdp.yaml"
        )
    inputs = policy.param_dtype if policy.cast_root_forward_inputs else None
    return ForwardCasts(params=policy.param_dtype, buffers=policy.buffer_dtype, inputs=inputs)


@dataclass
class StepOutcome:
    grad_norm: float | None  # total norm before clipping; None when the config disables it
    applied: bool  # whether the optimizer changed the weights


def deepspeed_step_outcome(engine: Any) -> StepOutcome:
    """After the engine's step at an accumulation boundary: was it applied (DeepSpeed skips a
    step whose gradients overflow or whose norm is not finite) and the norm it measured."""
    norm = engine.get_global_grad_norm()
    norm = None if norm is None else float(norm)
    return StepOutcome(grad_norm=norm, applied=bool(engine.was_step_applied()))


def fp32_state_dict(accelerator: Accelerator, model: Any) -> dict[str, torch.Tensor] | None:
    """All weights of ``model`` with the trainable ones taken from DeepSpeed's fp32 masters,
    on the CPU, on the main process (None elsewhere). Collective: call on every process (ZeRO
    assembles each master from its partitions)."""
    from deepspeed.utils import safe_get_full_fp32_param

    module = accelerator.unwrap_model(model)
    state = {}
    for name, param in module.named_parameters():
        master = safe_get_full_fp32_param(param) if param.requires_grad else None
        value = master if master is not None else param.detach()
        state[name] = value.float().cpu()
    for name, buffer in module.named_buffers():
        state[name] = buffer.detach().cpu()
    return state if accelerator.is_main_process else None


@contextmanager
def gradient_sync(accelerator: Accelerator, model: Any, sync: bool) -> Iterator[None]:
    """Around one ``accelerator.backward``: with ``sync``, gradients are reduced across processes
    and, under DeepSpeed, the engine clips and steps (the optimizer step's last backward);
    without, they only accumulate (DDP / FSDP ``no_sync``; DeepSpeed: no accumulation boundary,
    which accelerate passes on from ``sync_gradients``). The engine steps at the boundary it is
    told, not after a count of micro-steps, so any number of backwards may make one step; it
    scales each loss by 1 / ``gradient_accumulation_steps`` as accelerate does elsewhere."""
    accelerator.sync_gradients = sync
    try:
        with nullcontext() if sync else accelerator.no_sync(model):
            yield
    finally:
        accelerator.sync_gradients = True  # outside accumulate(), accelerate's default


def fsdp_flat_params(model: Any) -> list[torch.nn.Parameter] | None:
    """The trainable flat parameters of an FSDP (version 1) module, each this process's local
    shard outside a forward (with ``use_orig_params`` the original parameters are views into
    them); None for any other module."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if not isinstance(model, FullyShardedDataParallel):
        return None
    handles = [unit._handle for unit in FullyShardedDataParallel.fsdp_modules(model)]
    return [h.flat_param for h in handles if h is not None and h.flat_param.requires_grad]


def drop_gathered_params(model: Any) -> None:
    """After writing FSDP (version 1) shards in place: free the full parameters FSDP keeps
    gathered after a forward without backward (the root's always; every unit's under
    SHARD_GRAD_OP), which its next forward would otherwise reuse without gathering the new
    values. Outside any forward and backward only."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    for unit in FullyShardedDataParallel.fsdp_modules(model):
        handle = unit._handle
        if handle is not None and handle.uses_sharded_strategy:
            handle.reshard(True)
            handle.post_reshard()
