"""Sampling with log-probabilities, for online RL (Flow-GRPO, DDPO, DiffusionNFT).

A ``Schedule`` holds a sampler's timesteps and takes one step of it with the pure step functions
of ``losses/online.py``: ``FlowSchedule`` (SD3, Flux: the Flow-GRPO SDE, or the Euler ODE at
noise level 0) and ``DDIMSchedule`` (SD1.5, SDXL: DDIM with eta > 0, as DDPO). The model family
builds the one its noise process needs (``ModelFamily.sampling_schedule``); nothing here asks
which family it runs.

``sample_rollout`` draws images from a policy under ``no_grad`` and keeps, for the steps to be
trained, the latents before and after the step and the step's log-probability (fp32): the same
steps for every sample, or each sample's own (DanceGRPO's shuffled subset), stored slot by slot.
``step_log_prob`` recomputes a stored step's log-probability through the same code path
(``guided_output`` then ``Schedule.step`` with the stored next latent), so before any update it
equals the stored value bit for bit in fp32: a ratio of exactly 1. A slot whose samples sit at
different steps is recomputed with per-sample step indices ([B] tensors): the step functions
broadcast a [B] sigma exactly as a scalar one, element by element, so the values are the same.

Randomness comes from per-sample generators the caller passes (``sample_generator``): the
initial noise, which the caller may share within a prompt's group, and one stream of SDE noise
per sample, so a sample does not depend on the batch it was drawn in.
"""

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from PIL import Image

from diffusion.denoising import Forward, predict
from losses.online import ddim_sde_step, flow_sde_step

Autocast = Callable[[], AbstractContextManager]
Index = int | torch.Tensor  # one step for the whole batch, or [B] long: each sample's own
# Flow-GRPO's noise level a (config/grpo.py, the headline "sde" recipes) and DDPO's eta
# (config/base.py, sample.eta): the released values of the two stochastic samplers.
FLOW_GRPO_NOISE_LEVEL = 0.7
DDPO_ETA = 1.0


@dataclass(frozen=True)
class StepResult:
    """One sampler step: next latent [B, *D], log-prob [B], Gaussian mean [B, *D] and std."""

    x_next: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


class Schedule(Protocol):
    """A sampler's timesteps and its stochastic step."""

    num_steps: int
    default_noise_level: float  # the released noise level of this kind of step

    def model_timesteps(self, index: torch.Tensor) -> torch.Tensor:
        """Step indices [B] -> the timestep the denoiser reads [B]."""
        ...

    def step(
        self,
        index: Index,
        x: torch.Tensor,
        output: torch.Tensor,
        noise_level: float,
        x_next: torch.Tensor,
    ) -> StepResult:
        """Step ``index`` from ``x`` given the denoiser's output, evaluated at ``x_next``."""
        ...

    def has_noise(self, index: int, noise_level: float) -> bool:
        """Whether step ``index`` is stochastic (a positive std) at this noise level."""
        ...

    def kl_std(self, index: Index, std: torch.Tensor) -> torch.Tensor:
        """The std the GRPO KL term divides by at step ``index``."""
        ...

    def noised(
        self, x0: torch.Tensor, noise: torch.Tensor, index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Clean latents [B, *D] noised to the steps ``index`` [B] -> (x_t, the denoiser's
        regression target, the per-sample factor [B] from output error to x0 error)."""
        ...


def _as_column(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, torch.float32).reshape(-1, *[1] * (like.ndim - 1))


@dataclass
class FlowSchedule:
    """Flow models: sigmas [N + 1] descending to 0 (the scheduler's own inference sigmas, with
    its shift); the denoiser reads t = sigma * T."""

    sigmas: torch.Tensor  # [N + 1] fp32, sigmas[-1] == 0
    num_train_timesteps: int = 1000
    sde_type: str = "sde"
    default_noise_level: float = FLOW_GRPO_NOISE_LEVEL

    @classmethod
    def from_config(
        cls, scheduler_config: Any, num_steps: int, shift: float, sde_type: str = "sde"
    ) -> "FlowSchedule":
        """The sigmas ``FlowMatchEulerDiscreteScheduler`` samples with at this shift (dynamic
        shifting: mu = log(shift), as the Flux pipeline passes it)."""
        dynamic = scheduler_config.get("use_dynamic_shifting", False)
        overrides = {} if dynamic else {"shift": shift}
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config, **overrides)
        kwargs = {"mu": float(np.log(shift))} if dynamic else {}
        scheduler.set_timesteps(num_steps, **kwargs)
        sigmas = scheduler.sigmas.float().cpu()
        return cls(sigmas, scheduler_config["num_train_timesteps"], sde_type)

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    def model_timesteps(self, index: torch.Tensor) -> torch.Tensor:
        return self.sigmas[index.cpu()] * self.num_train_timesteps

    def sigma_pair(self, index: Index) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """sigma and sigma_next of step ``index``: floats, or [B] tensors for [B] indices."""
        if isinstance(index, torch.Tensor):
            index = index.cpu()
            return self.sigmas[index], self.sigmas[index + 1]
        return float(self.sigmas[index]), float(self.sigmas[index + 1])

    def step(self, index, x, output, noise_level, x_next) -> StepResult:
        sigma, sigma_next = self.sigma_pair(index)
        result = flow_sde_step(x, output, sigma, sigma_next, noise_level, x_next=x_next,
                               sigma_max=float(self.sigmas[1]), sde_type=self.sde_type)  # fmt: skip
        return StepResult(*result)

    def has_noise(self, index: int, noise_level: float) -> bool:
        # cps's std is sigma_next sin(a pi / 2): the last step (to sigma 0) has none.
        return noise_level > 0 and not (self.sde_type == "cps" and self.sigmas[index + 1] == 0)

    def kl_std(self, index: Index, std: torch.Tensor) -> torch.Tensor:
        # Flow-GRPO divides by s^2 = std^2 / (sigma - sigma_next) (its KL is |dt| x the exact one).
        if isinstance(index, torch.Tensor):
            sigma, sigma_next = self.sigma_pair(index)
            return std / _as_column((sigma - sigma_next).sqrt(), std)
        return std / float(self.sigmas[index] - self.sigmas[index + 1]) ** 0.5

    def noised(self, x0, noise, index):
        t = _as_column(self.sigmas[index.cpu()], x0)
        return (1 - t) * x0 + t * noise, noise - x0, t.flatten()


@dataclass
class DDIMSchedule:
    """Epsilon / v models: DDIM timesteps [N] descending, ``alphas_cumprod`` [T]; the previous
    alpha is ``alphas_cumprod[max(t - T // N, 0)]`` (DDPO's clamp)."""

    alphas_cumprod: torch.Tensor  # [T] fp32
    timesteps: torch.Tensor  # [N] long
    prediction_type: str = "epsilon"
    default_noise_level: float = DDPO_ETA

    @classmethod
    def from_scheduler(cls, scheduler: Any, num_steps: int) -> "DDIMSchedule":
        ddim = DDIMScheduler.from_config(scheduler.config)
        ddim.set_timesteps(num_steps)
        return cls(scheduler.alphas_cumprod.float().cpu(), ddim.timesteps.long().cpu(),
                   scheduler.config.prediction_type)  # fmt: skip

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def alphas(self, index: Index) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """alpha_bar and the previous alpha_bar of step ``index`` (floats, or [B] tensors)."""
        if isinstance(index, torch.Tensor):
            t = self.timesteps[index.cpu()]
            prev = (t - len(self.alphas_cumprod) // self.num_steps).clamp(min=0)
            return self.alphas_cumprod[t], self.alphas_cumprod[prev]
        t = int(self.timesteps[index])
        prev = max(t - len(self.alphas_cumprod) // self.num_steps, 0)
        return float(self.alphas_cumprod[t]), float(self.alphas_cumprod[prev])

    def model_timesteps(self, index: torch.Tensor) -> torch.Tensor:
        return self.timesteps[index.cpu()]

    def step(self, index, x, output, noise_level, x_next) -> StepResult:
        alpha_bar, alpha_bar_prev = self.alphas(index)
        result = ddim_sde_step(x, output, alpha_bar, alpha_bar_prev, noise_level, x_prev=x_next,
                               prediction_type=self.prediction_type)  # fmt: skip
        return StepResult(*result)

    def has_noise(self, index: int, noise_level: float) -> bool:
        alpha_bar, alpha_bar_prev = self.alphas(index)
        return noise_level > 0 and alpha_bar_prev > alpha_bar

    def kl_std(self, index: Index, std: torch.Tensor) -> torch.Tensor:
        return std  # the exact per-dimension KL (DDPO has no KL term)

    def noised(self, x0, noise, index):
        ab = _as_column(self.alphas_cumprod[self.timesteps[index.cpu()]], x0)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        if self.prediction_type == "v_prediction":
            return x_t, ab.sqrt() * noise - (1 - ab).sqrt() * x0, (1 - ab).sqrt().flatten()
        return x_t, noise, ((1 - ab) / ab).sqrt().flatten()


def sample_generator(seed: int, *keys: int) -> torch.Generator:
    """A generator unique to ``(seed, *keys)``, derived without state (e.g. a sample's SDE
    noise stream from (seed, stream id, prompt draw, group member))."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def draw_noise(generators: Sequence[torch.Generator], shape: Sequence[int]) -> torch.Tensor:
    """One fp32 standard normal [*shape] per generator -> [len(generators), *shape]."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])


def guided_output(
    model: torch.nn.Module,
    forward: Forward | None,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    cond: dict[str, Any],
    uncond: dict[str, Any] | None,
    guidance_scale: float,
) -> torch.Tensor:
    """The denoiser's output [B, *D] in fp32, classifier-free guided when ``guidance_scale``
    != 1: u + w (c - u), the two branches as two calls (no family-specific batching)."""
    conditional = predict(model, x, timesteps, cond, forward)
    if guidance_scale == 1.0:
        return conditional
    if uncond is None:
        raise ValueError(f"guidance scale {guidance_scale} needs the unconditional conditioning")
    unconditional = predict(model, x, timesteps, uncond, forward)
    return unconditional + guidance_scale * (conditional - unconditional)


@dataclass(frozen=True)
class Sampler:
    """How a rollout is drawn: the schedule, the noise level of each step (0: deterministic),
    the steps whose transitions are kept for training, the guidance scale."""

    schedule: Schedule
    noise_levels: tuple[float, ...]  # [N]
    trained_steps: tuple[int, ...]  # ascending step indices, each with noise
    guidance_scale: float = 1.0
    # 0: every sample keeps all ``trained_steps``; k > 0: each keeps its own k of them, chosen by
    # the caller (``sample_rollout``'s ``kept``: DanceGRPO's per-sample shuffled subset).
    steps_per_sample: int = 0

    def level(self, index: Index) -> float:
        """The noise level of step ``index``; per-sample indices must share one."""
        if not isinstance(index, torch.Tensor):
            return self.noise_levels[index]
        levels = {self.noise_levels[i] for i in index.tolist()}
        if len(levels) != 1:
            raise ValueError(f"per-sample steps {index.tolist()} have noise levels {levels}")
        return levels.pop()


@dataclass
class Rollout:
    """What a batch of B samples leaves for training."""

    final: torch.Tensor  # [B, *D] fp32 clean latents
    x_t: torch.Tensor  # [S, B, *D] fp32: the latent before each trained step
    x_next: torch.Tensor  # [S, B, *D] fp32: the latent the step drew
    log_probs: torch.Tensor  # [S, B] fp32
    # [S, B] long: the step each slot holds per sample (None: slot s is trained_steps[s] for all)
    steps: torch.Tensor | None = None


def denoiser_output(
    model: torch.nn.Module,
    forward: Forward | None,
    sampler: Sampler,
    index: Index,
    x: torch.Tensor,
    cond: dict[str, Any],
    uncond: dict[str, Any] | None,
    autocast: Autocast,
) -> torch.Tensor:
    """The (guided) denoiser output [B, *D] fp32 at step ``index`` (or each sample's) for ``x``."""
    if not isinstance(index, torch.Tensor):
        index = torch.full((x.shape[0],), index)
    timesteps = sampler.schedule.model_timesteps(index)
    with autocast():
        return guided_output(model, forward, x, timesteps.to(x.device), cond, uncond,
                             sampler.guidance_scale)  # fmt: skip


def step_log_prob(
    model: torch.nn.Module,
    forward: Forward | None,
    sampler: Sampler,
    index: Index,
    x: torch.Tensor,
    x_next: torch.Tensor,
    cond: dict[str, Any],
    uncond: dict[str, Any] | None,
    autocast: Autocast,
) -> StepResult:
    """The model's log-probability [B] of the stored ``x_next`` at step ``index`` (an int, or
    [B] per-sample steps) with grad when called with grad, and the step's mean and std: the
    sampler's own code path."""
    output = denoiser_output(model, forward, sampler, index, x, cond, uncond, autocast)
    return sampler.schedule.step(index, x, output, sampler.level(index), x_next)


@torch.no_grad()
def sample_rollout(
    model: torch.nn.Module,
    forward: Forward | None,
    sampler: Sampler,
    noise: torch.Tensor,
    sde_generators: Sequence[torch.Generator],
    cond: dict[str, Any],
    uncond: dict[str, Any] | None,
    autocast: Autocast,
    kept: torch.Tensor | None = None,
) -> Rollout:
    """Run the sampler from ``noise`` [B, *D] (fp32); a stochastic step draws its noise from
    each sample's generator in ``sde_generators`` [B]; deterministic steps go to the mean.
    ``kept`` [B, k] (``sampler.steps_per_sample`` = k): the steps each sample keeps, slot j of
    the rollout holding each sample's ``kept[:, j]``; default: ``sampler.trained_steps``."""
    schedule = sampler.schedule
    batch = len(noise)
    if (kept is None) != (sampler.steps_per_sample == 0):
        raise ValueError(
            "sample_rollout: pass kept exactly when the sampler keeps per-sample steps"
        )
    slots = kept if kept is not None else torch.tensor(sampler.trained_steps).expand(batch, -1)
    slots = slots.reshape(batch, -1)
    x = noise.float()
    kept_x = x.new_zeros((slots.shape[1], *x.shape))
    kept_next = torch.zeros_like(kept_x)
    kept_logp = x.new_zeros((slots.shape[1], batch))
    for index in range(schedule.num_steps):
        level = sampler.noise_levels[index]
        output = denoiser_output(model, forward, sampler, index, x, cond, uncond, autocast)
        probe = schedule.step(index, x, output, level, x)  # its mean and std
        x_next = probe.mean
        if schedule.has_noise(index, level):
            eps = draw_noise(sde_generators, x.shape[1:]).to(x.device)
            x_next = probe.mean + probe.std * eps
        rows, slot = (slots == index).nonzero(as_tuple=True)
        if len(rows):
            # Evaluated at the drawn latent exactly as step_log_prob recomputes it.
            result = schedule.step(index, x, output, level, x_next)
            rows, slot = rows.to(x.device), slot.to(x.device)
            kept_x[slot, rows] = x[rows]
            kept_next[slot, rows] = result.x_next[rows]
            kept_logp[slot, rows] = result.log_prob[rows]
        x = x_next.detach().float()
    steps = kept.T.contiguous() if kept is not None else None
    return Rollout(final=x, x_t=kept_x, x_next=kept_next, log_probs=kept_logp, steps=steps)


def decode_images(vae: Any, latents: torch.Tensor) -> list[Image.Image]:
    """Scaled latents [B, C, h, w] -> PIL images through the VAE (the inverse of
    ``diffusion.scaled_latents``: divide by the scaling factor, add the shift), rounded to
    8 bits as the diffusers pipelines do."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    z = latents / vae.config.scaling_factor + shift
    pixels = vae.decode(z.to(vae.device, vae.dtype)).sample.float()
    array = ((pixels / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)  # as the pipelines
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in array]
