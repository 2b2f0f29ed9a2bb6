"""Rectified-flow noising for flow-matching backbones (SD3 / SD3.5, Flux.1).

A sample at noise level sigma in [0, 1] is the straight line between data and noise,

    x_sigma = (1 - sigma) x0 + sigma eps,        target v = eps - x0,

(Esser et al. 2024, "Scaling Rectified Flow Transformers", arXiv 2403.03206, 2 and 3.1: the
choice a_t = 1 - t, b_t = t), and the transformer regresses v. The errors the losses read are the
per-sample mean squared errors of v, exactly as the epsilon / v errors of SD1.5 and SDXL.

sigma is drawn per group (a pair shares it) from the group's own generator
(``diffusion.group_generator``): first u in (0, 1) by ``--timestep_sampling``, then the
scheduler's shift ``sigma = s u / (1 + (s - 1) u)`` (Esser et al. 2024, 5.3.2), which is how
``FlowMatchEulerDiscreteScheduler`` shifts its sigmas. The model sees ``t = sigma * T`` (T =
``num_train_timesteps``, 1000), the timestep convention of the diffusers flow pipelines.
"""

import math
from dataclasses import dataclass
from typing import Any

import torch

# How sigma is drawn before the shift (Esser et al. 2024, arXiv 2403.03206, 3.1).
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode")


def sample_u(
    sampling: str,
    generator: torch.Generator,
    logit_mean: float,
    logit_std: float,
    mode_scale: float,
) -> torch.Tensor:
    """One u in (0, 1), [1] fp32, from ``generator``.

    uniform: U(0, 1). logit_normal: sigmoid(N(mean, std)) (Esser et al. 2024, 3.1; their best
    setting is mean 0, std 1). mode: f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u) on uniform u
    (3.1; s = ``mode_scale``, 1.29 in diffusers' SD3 / Flux training scripts)."""
    if sampling == "uniform":
        return torch.rand(1, generator=generator)
    if sampling == "logit_normal":
        return torch.sigmoid(torch.randn(1, generator=generator) * logit_std + logit_mean)
    if sampling == "mode":
        u = torch.rand(1, generator=generator)
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    raise ValueError(f"--timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, got {sampling!r}")


def shifted(u: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma = s u / (1 + (s - 1) u): more weight on high noise for s > 1 (large images)."""
    return shift * u / (1 + (shift - 1) * u)


def resolution_shift(scheduler_config: Any, image_seq_len: int) -> float:
    """The shift a scheduler applies at this many image tokens: its static ``shift``, or, with
    ``use_dynamic_shifting`` (Flux.1-dev), exp(mu) with mu linear in the sequence length between
    ``base_shift`` at ``base_image_seq_len`` and ``max_shift`` at ``max_image_seq_len``, as the
    Flux pipeline computes it for sampling (its exponential time shift equals the shift formula
    above with s = exp(mu))."""
    get = scheduler_config.get
    if not get("use_dynamic_shifting", False):
        return float(get("shift", 1.0))
    base_len, max_len = get("base_image_seq_len", 256), get("max_image_seq_len", 4096)
    base, top = get("base_shift", 0.5), get("max_shift", 1.15)
    mu = base + (top - base) * (image_seq_len - base_len) / (max_len - base_len)
    return math.exp(mu)


@dataclass
class FlowMatching:
    """The noise process of flow-matching models; stands where SD's ``DDPMScheduler`` stands
    (``diffusion.denoise``), and carries the diffusers scheduler's ``config`` for samplers."""

    scheduler: Any  # FlowMatchEulerDiscreteScheduler: its config (T, shift) and sampling
    sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0

    def __post_init__(self) -> None:
        if self.sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(
                f"--timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, got {self.sampling!r}"
            )

    @property
    def config(self) -> Any:
        return self.scheduler.config

    def draw_timestep(self, generator: torch.Generator) -> torch.Tensor:
        """[1] fp32: t = sigma * T for one group."""
        u = sample_u(self.sampling, generator, self.logit_mean, self.logit_std, self.mode_scale)
        return shifted(u, self.shift) * self.config.num_train_timesteps

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps.float() / self.config.num_train_timesteps

    def noisy_and_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x_sigma = (1 - sigma) x0 + sigma eps and v = eps - x0, in fp32."""
        x0, eps = latents.float(), noise.float()
        sigma = self.sigmas(timesteps).to(x0.device).view(-1, *[1] * (x0.ndim - 1))
        return (1 - sigma) * x0 + sigma * eps, eps - x0
