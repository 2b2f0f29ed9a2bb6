"""Timesteps, noise and per-sample denoising errors for policy and reference.

Randomness is drawn per *group* (a pair, or a single image) from a generator seeded by
``(seed, global group index)`` only. The global index numbers the groups of the whole run across
processes (``first_group_index``), so the draws of a sample do not depend on how samples are
batched or spread over processes: batch 2 x accumulation 1 sees exactly the noise of batch 1 x
accumulation 2, 2 processes x batch 1 the noise of 1 process x batch 1 x accumulation 2, and a
resumed run re-derives its draws from the step count alone.
"""

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from diffusion.flow_matching import FlowMatching

# How the denoiser is called: (model, noisy, timesteps, condition) -> model output [N, C, h, w].
# None: a UNet, model(noisy, timesteps, **condition).sample; families with another calling
# convention (the flow transformers) pass their own (models.family.ModelFamily.forward).
Forward = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, dict[str, Any]], torch.Tensor]
NoiseProcess = DDPMScheduler | FlowMatching  # SD's scheduler, or flow matching


@dataclass
class GroupDraws:
    """Random draws for N = group_size * G samples laid out as [group member][group index]
    (pairs: all chosen first, then all rejected), matching the batch layout."""

    latent_eps: torch.Tensor  # [N, C, h, w] VAE posterior sample noise (one per image)
    timesteps: torch.Tensor  # [N] long (DDPM) or fp32 t = sigma * T (flow), shared in a group
    noise: torch.Tensor  # [N, C, h, w], shared within a group


def first_group_index(micro_batches: int, world_size: int, rank: int, batch_size: int) -> int:
    """Global index of the first group of a micro-batch: micro-batch m of rank r holds groups
    ``((m * world_size) + r) * batch_size + i``, the order in which one process with
    accumulation would consume the same roles' batches (its micro-batch ``m * world_size + r``
    comes from DataLoader worker, i.e. stream role, r)."""
    return (micro_batches * world_size + rank) * batch_size


def group_generator(seed: int, group_index: int) -> torch.Generator:
    """A generator unique to one group of the run, derived without any state."""
    state = np.random.SeedSequence([seed, group_index]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def draw_groups(
    latent_shape: tuple[int, int, int],
    group_size: int,
    first_group: int,
    num_groups: int,
    num_train_timesteps: int | Callable[[torch.Generator], torch.Tensor],
    seed: int,
) -> GroupDraws:
    """Draw, for groups ``first_group .. first_group + num_groups - 1``, one VAE sample noise per
    image and one timestep and diffusion noise per group (Diffusion-DPO: a pair shares both).

    ``num_train_timesteps``: T for a uniform integer timestep in [0, T) (DDPM), or a function
    drawing one timestep [1] from the group's generator (flow matching's sigma sampling)."""
    if isinstance(num_train_timesteps, int):
        steps = num_train_timesteps

        def draw_timestep(gen: torch.Generator) -> torch.Tensor:
            return torch.randint(0, steps, (1,), generator=gen)
    else:
        draw_timestep = num_train_timesteps
    latent_eps, timesteps, noise = [], [], []
    for g in range(first_group, first_group + num_groups):
        gen = group_generator(seed, g)
        latent_eps.append(torch.randn((group_size, *latent_shape), generator=gen))
        timesteps.append(draw_timestep(gen))
        noise.append(torch.randn(latent_shape, generator=gen))
    # [G, group_size, ...] -> [group_size * G, ...] with group members outermost.
    eps = torch.stack(latent_eps, dim=1).flatten(0, 1)
    return GroupDraws(
        latent_eps=eps,
        timesteps=torch.cat(timesteps).repeat(group_size),
        noise=torch.stack(noise).repeat(group_size, 1, 1, 1),
    )


@torch.no_grad()
def posterior_moments(
    vae: AutoencoderKL, pixels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """pixels [N, 3, H, W] in [-1, 1] -> (mean, std) of the VAE posterior, each [N, C, h, w]."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


class LatentEncoder(Protocol):
    """Images -> VAE posterior moments: the VAE itself, or a latent cache (``data/cache.py``)."""

    config: Any  # the VAE's config: scaling_factor (and shift_factor, for VAEs that have one)

    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [N, ...] -> (mean, std) of the posterior, each [N, C, h, w] fp32."""
        ...


class VaeEncoder:
    """The live VAE as a ``LatentEncoder``: images are pixels [N, 3, H, W] in [-1, 1]."""

    def __init__(self, vae: AutoencoderKL):
        self.vae = vae
        self.config = vae.config

    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return posterior_moments(self.vae, images)


def scaled_latents(
    vae: AutoencoderKL | LatentEncoder, mean: torch.Tensor, std: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """A posterior sample times the VAE scaling factor (minus its shift, for VAEs that have one)."""
    latents = mean + std * eps.to(mean)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def timestep_draw(scheduler: NoiseProcess) -> int | Callable[[torch.Generator], torch.Tensor]:
    """What ``draw_groups`` draws timesteps with for this noise process."""
    if isinstance(scheduler, FlowMatching):
        return scheduler.draw_timestep
    return scheduler.config.num_train_timesteps


def noisy_inputs_and_target(
    scheduler: NoiseProcess, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, and the model's regression target (flow
    matching: ``flow_matching.FlowMatching.noisy_and_target``)."""
    if isinstance(scheduler, FlowMatching):
        return scheduler.noisy_and_target(latents, noise, timesteps)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noisy, noise
    if prediction_type == "v_prediction":
        return noisy, scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def cast_floats(value: Any, dtype: torch.dtype) -> Any:
    """Cast the floating tensors of nested dicts (SDXL's ``added_cond_kwargs``) to ``dtype``."""
    if isinstance(value, dict):
        return {k: cast_floats(v, dtype) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value


def predict(
    unet: UNet2DConditionModel | torch.nn.Module,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    condition: dict[str, Any],
    forward: Forward | None = None,
) -> torch.Tensor:
    """The UNet's prediction [N, C, h, w], upcast to fp32 (half-precision UNets give fp32)."""
    dtype = (
        next(unet.parameters()).dtype if not torch.is_autocast_enabled(noisy.device.type) else None
    )
    inputs = noisy if dtype is None else noisy.to(dtype)
    cond = condition if dtype is None else cast_floats(condition, dtype)
    if forward is not None:
        return forward(unet, inputs, timesteps, cond).float()
    return unet(inputs, timesteps, **cond).sample.float()


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[N, C, h, w] -> [N]: mean over C, H, W of the squared error, in fp32."""
    return (prediction.float() - target.float()).pow(2).mean(dim=(1, 2, 3))


def denoising_errors(
    unet: UNet2DConditionModel,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    condition: dict[str, Any],
    target: torch.Tensor,
) -> torch.Tensor:
    """Per-sample mean over C, H, W of the squared error, in fp32 -> [N].

    The prediction is upcast before subtracting, so half-precision UNets give fp32 errors."""
    return per_sample_mse(predict(unet, noisy, timesteps, condition), target)


@dataclass
class Denoised:
    """One micro-batch through policy and reference: what a loss may read (losses/)."""

    policy_err: torch.Tensor  # [N] fp32, with grad
    ref_err: torch.Tensor | None  # [N] fp32, no grad; None without a reference
    timesteps: torch.Tensor | None = None  # [N] long, shared within a group (health metrics)
    # Per-pixel [N, C, h, w] fp32, kept only when the loss needs them (else None).
    policy_pred: torch.Tensor | None = None  # with grad
    ref_pred: torch.Tensor | None = None
    target: torch.Tensor | None = None


def denoise(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    encoder: LatentEncoder,
    scheduler: NoiseProcess,
    condition: dict[str, Any],
    images: torch.Tensor,
    group_size: int,
    first_group: int,
    seed: int,
    autocast: Callable[[], AbstractContextManager],
    keep_predictions: bool = False,
    forward: Forward | None = None,
) -> Denoised:
    """images [N = group_size * G, ...] (pixels, or cached moments) -> per-sample errors of the
    policy (with grad) and of the reference (no grad, when there is one), the timesteps drawn,
    and the per-pixel predictions and target when ``keep_predictions``.

    Policy and reference see the same noisy latents, timesteps and conditioning and run under
    the same autocast, so their errors are equal (margin 0) while the weights are equal.
    ``forward``: the family's way of calling its denoiser (None: a UNet)."""
    mean, std = encoder.moments(images)
    draws = draw_groups(
        tuple(mean.shape[1:]),
        group_size,
        first_group,
        mean.shape[0] // group_size,
        timestep_draw(scheduler),
        seed,
    )
    device = mean.device
    latents = scaled_latents(encoder, mean, std, draws.latent_eps.to(device))
    timesteps = draws.timesteps.to(device)
    noisy, target = noisy_inputs_and_target(scheduler, latents, draws.noise.to(device), timesteps)
    with autocast():
        policy_pred = predict(policy, noisy, timesteps, condition, forward)
        ref_pred = None
        if reference is not None:
            with torch.no_grad():
                ref_pred = predict(reference, noisy, timesteps, condition, forward)
    return Denoised(
        policy_err=per_sample_mse(policy_pred, target),
        ref_err=None if ref_pred is None else per_sample_mse(ref_pred, target),
        timesteps=timesteps,
        policy_pred=policy_pred if keep_predictions else None,
        ref_pred=ref_pred if keep_predictions else None,
        target=target.float() if keep_predictions else None,
    )


def batch_errors(*args: Any, return_timesteps: bool = False, **kwargs: Any) -> tuple:
    """``denoise`` (same arguments) without predictions: (policy_err [N] with grad, ref_err [N]
    or None), and the timesteps [N] with ``return_timesteps``."""
    out = denoise(*args, **{**kwargs, "keep_predictions": False})
    if return_timesteps:
        return out.policy_err, out.ref_err, out.timesteps
    return out.policy_err, out.ref_err
