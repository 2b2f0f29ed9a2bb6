"""Online RL for diffusion and flow models as pure torch functions: stochastic sampler steps that
return log-probabilities, group-normalised advantages, the clipped GRPO objective and the
DiffusionNFT loss, as the released code of Flow-GRPO (arXiv 2505.05470, yifan123/flow_grpo),
DiffusionNFT (arXiv 2509.16117, NVlabs/DiffusionNFT), DDPO (arXiv 2305.13301,
kvablack/ddpo-pytorch) and DanceGRPO (XueZeyue/DanceGRPO) compute them.

Conventions (those of ``flow_matching.py``):

- ``sigma`` in [0, 1] and ``x_sigma = (1 - sigma) x0 + sigma eps``; the velocity is
  ``v = eps - x0``; sampling runs with sigma descending, ``sigma -> sigma_next < sigma``, so
  ``dt = sigma_next - sigma < 0``. Epsilon / v models (SD1.5, SDXL) use ``alpha_bar``
  (``alphas_cumprod``) instead: ``x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps``.
- ``B`` = batch, ``D`` = all non-batch dims; ``mean_D`` averages over them, so a log-probability
  is one number per sample, ``[B]``, on the scale of one dimension (as the released code).
- Every function upcasts its tensor inputs to fp32 and returns fp32 (``group_advantages``: fp64
  inside, returned in the rewards' dtype): the SDE arithmetic overflows or drifts in bf16.
- ``sigma``, ``sigma_next``, ``alpha_bar*``, ``noise_level``, ``eta`` may be Python floats, 0-d
  tensors or ``[B]`` tensors (broadcast to ``[B, 1, ..., 1]``).
- The step functions return the sample detached and compute the log-probability from the detached
  sample: the gradient flows through the Gaussian mean only, and recomputing the log-prob of a
  stored sample with the same inputs gives the bit-identical value (importance ratio exactly 1
  before the first update).

Nothing here knows of models, data or accelerate; ``losses/registry.py`` does not list these
functions (the trainer calls them directly).
"""

import math

import torch

__all__ = [
    "ADV_CLIP_MAX",
    "GROUP_STD_EPS",
    "NFT_DECAY_SCHEDULES",
    "NFT_LOSS_SCALE",
    "NFT_WEIGHT_MIN",
    "ddim_sde_step",
    "flow_sde_step",
    "group_advantages",
    "grpo_loss",
    "nft_loss",
    "nft_old_decay",
    "nft_optimality",
]

# log sqrt(2 pi): the Gaussian normalising constant per dimension.
LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
# Flow-GRPO flow_grpo/stat_tracking.py (also used by DiffusionNFT): A = (r - mean) / (std + 1e-4).
GROUP_STD_EPS = 1e-4
# Flow-GRPO / DDPO / DanceGRPO / DiffusionNFT ``train.adv_clip_max``: advantages clamped to +-5.
ADV_CLIP_MAX = 5.0
# DiffusionNFT scripts/train_nft_sd3.py: the policy loss is multiplied by train.adv_clip_max (5).
NFT_LOSS_SCALE = 5.0
# DiffusionNFT scripts/train_nft_sd3.py: adaptive weight mean_D |x0_hat - x0| clipped at 1e-5.
NFT_WEIGHT_MIN = 1e-5
# DiffusionNFT scripts/train_nft_sd3.py ``return_decay``: schedule -> (flat steps, rate per
# optimizer step after them, cap). Decay d = 0 before ``flat``, then min(rate (step - flat), cap).
NFT_DECAY_SCHEDULES: dict[int, tuple[int, float, float]] = {
    0: (0, 0.0, 0.0),  # hard copy every epoch (on-policy)
    1: (0, 0.001, 0.5),  # the released default
    2: (75, 0.0075, 0.999),  # the OCR recipe
}
SDE_TYPES = ("sde", "dance", "cps")
PREDICTION_TYPES = ("epsilon", "v_prediction")

Scalar = float | torch.Tensor
Tensor, Generator = torch.Tensor, torch.Generator
# (next latent [B, *D], log-prob [B], mean [B, *D], std broadcastable to the latent), all fp32
StepResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _per_sample(value: Scalar, x: torch.Tensor, name: str) -> torch.Tensor:
    """``value`` as fp32 on x's device, shaped ``[B, 1, ..., 1]`` or ``[1, ..., 1]``."""
    tensor = torch.as_tensor(value, dtype=torch.float32, device=x.device)
    if tensor.numel() == 1 and tensor.ndim <= 1:
        return tensor.reshape((1,) * x.ndim)
    if tensor.ndim == 1 and tensor.shape[0] == x.shape[0]:
        return tensor.reshape((-1,) + (1,) * (x.ndim - 1))
    raise ValueError(
        f"{name} must be a float, a 0-d tensor or a [B] = [{x.shape[0]}] tensor, "
        f"got shape {tuple(tensor.shape)}"
    )


def _non_batch_dims(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


def _check_latents(x: torch.Tensor, other: torch.Tensor, other_name: str) -> None:
    if x.ndim < 2:
        raise ValueError(f"latents must be [B, *D] with at least one non-batch dim, got {x.shape}")
    if other.shape != x.shape:
        raise ValueError(f"{other_name} must have the latents' shape {x.shape}, got {other.shape}")


def _check_nonnegative(value: Scalar, name: str, upper: float | None = None) -> None:
    """Range check for Python floats only (a tensor check would sync the device every step)."""
    if isinstance(value, torch.Tensor):
        return
    if value < 0 or (upper is not None and value > upper):
        bound = f"in [0, {upper}]" if upper is not None else ">= 0"
        raise ValueError(f"{name} must be {bound}, got {value}")


def _sample_and_log_prob(
    x_t: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    generator: torch.Generator | None,
    given: torch.Tensor | None,
    normalised: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``mean + std * N(0, I)`` unless ``given``; log-prob [B] of the detached sample.

    The noise is always drawn when no sample is given (even at std 0), so a generator's stream
    does not depend on the noise level. ``normalised=False`` is CPS's released form
    ``-mean_D (x - mean)^2``."""
    if given is None:
        noise = torch.randn(x_t.shape, generator=generator, dtype=torch.float32, device=x_t.device)
        sample = (mean + std * noise).detach()
    else:
        _check_latents(x_t, given, "the given next latent")
        sample = given.detach().float()
    neg_sq = -((sample - mean) ** 2)
    per_dim = neg_sq / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI if normalised else neg_sq
    return sample, per_dim.mean(dim=_non_batch_dims(x_t))


def flow_sde_step(x_t: Tensor, velocity: Tensor, sigma: Scalar, sigma_next: Scalar,
                  noise_level: Scalar, generator: Generator | None = None,
                  x_next: Tensor | None = None, sigma_max: Scalar | None = None,
                  sde_type: str = "sde") -> StepResult:  # fmt: skip
    """One stochastic step of a flow model, sigma -> sigma_next, with its log-probability.

    x_t, velocity: [B, *D]; x_next: [B, *D] to score a stored sample instead of drawing one.
    Returns (x_next [B, *D] detached, log_prob [B], mean [B, *D], std broadcastable to x_t), all
    fp32; std is the true step std.

    ``sde_type`` (a = ``noise_level``, dt = sigma_next - sigma):

    - "sde" (Flow-GRPO ``sde_step_with_logprob``): s = a sqrt(sigma / (1 - sigma')), sigma' =
      ``sigma_max`` where sigma == 1 (the schedule's second entry, required then) else sigma;
      mean = x (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt;
      std = s sqrt(-dt). a = 0 is the Euler step x + v dt.
    - "dance" (DanceGRPO ``flux_step``): the same mean and std with s = a.
    - "cps" (Coefficients-Preserving Sampling, arXiv 2509.05952, as in Flow-GRPO):
      std = sigma_next sin(a pi / 2), mean = (1 - sigma_next) (x - sigma v)
      + sqrt(sigma_next^2 - std^2) (x + (1 - sigma) v); its released "log-prob" is
      -mean_D (x_next - mean)^2 (constants and 1 / (2 std^2) dropped).

    log_prob is undefined (inf / nan) where std == 0 ("sde" / "dance" with a = 0)."""
    if sde_type not in SDE_TYPES:
        raise ValueError(f"sde_type must be one of {SDE_TYPES}, got {sde_type!r}")
    _check_latents(x_t, velocity, "velocity")
    _check_nonnegative(noise_level, "noise_level")
    x = x_t.float()
    v = velocity.float()
    sig = _per_sample(sigma, x, "sigma")
    sig_next = _per_sample(sigma_next, x, "sigma_next")
    dt = sig_next - sig

    if sde_type == "cps":
        if isinstance(noise_level, torch.Tensor):
            sin_term = torch.sin(_per_sample(noise_level, x, "noise_level") * (math.pi / 2))
        else:
            sin_term = math.sin(noise_level * math.pi / 2)
        std = sig_next * sin_term
        x0_hat = x - sig * v
        x1_hat = x + (1 - sig) * v
        # Clamped: at a = 1, sigma_next^2 - std^2 is 0 up to rounding.
        mean = (1 - sig_next) * x0_hat + torch.sqrt((sig_next**2 - std**2).clamp(min=0)) * x1_hat
        sample, log_prob = _sample_and_log_prob(x, mean, std, generator, x_next, normalised=False)
        return sample, log_prob, mean, std

    a = _per_sample(noise_level, x, "noise_level")
    if sde_type == "dance":
        s = a
    else:
        if sigma_max is None:
            at_one = sigma == 1 if not isinstance(sigma, torch.Tensor) else (sig == 1).any()
            if bool(at_one):
                raise ValueError(
                    "flow_sde_step(sde_type='sde') at sigma == 1 needs sigma_max (the schedule's "
                    "second sigma): the noise scale sqrt(sigma / (1 - sigma)) is infinite there"
                )
            denominator_sigma = sig
        else:
            denominator_sigma = torch.where(sig == 1, _per_sample(sigma_max, x, "sigma_max"), sig)
        s = torch.sqrt(sig / (1 - denominator_sigma)) * a
    mean = x * (1 + s**2 / (2 * sig) * dt) + v * (1 + s**2 * (1 - sig) / (2 * sig)) * dt
    std = s * torch.sqrt(-dt)
    sample, log_prob = _sample_and_log_prob(x, mean, std, generator, x_next)
    return sample, log_prob, mean, std


def ddim_sde_step(x_t: Tensor, model_output: Tensor, alpha_bar: Scalar, alpha_bar_prev: Scalar,
                  eta: Scalar, generator: Generator | None = None, x_prev: Tensor | None = None,
                  prediction_type: str = "epsilon") -> StepResult:  # fmt: skip
    """One DDIM step with eta > 0 and its log-probability (DDPO ``ddim_step_with_logprob``).

    x_t, model_output: [B, *D], the output being eps ("epsilon") or v ("v_prediction");
    alpha_bar = alphas_cumprod[t], alpha_bar_prev = alphas_cumprod[prev t] (the final alpha past
    the schedule's start). Returns (x_prev [B, *D] detached, log_prob [B], mean, std), fp32:

        x0_hat = (x - sqrt(1 - ab) eps) / sqrt(ab)    (v: x0_hat = sqrt(ab) x - sqrt(1 - ab) v,
                                                          eps = sqrt(ab) v + sqrt(1 - ab) x)
        std    = eta sqrt((1 - abp) / (1 - ab) (1 - ab / abp))
        mean   = sqrt(abp) x0_hat + sqrt(1 - abp - std^2) eps

    No clipping of x0_hat (the SD configs set clip_sample=False). eta = 0 is the deterministic
    DDIM step (log_prob undefined there); eta is limited to [0, 1], where 1 - abp - std^2 >= 0."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}"
        )
    _check_latents(x_t, model_output, "model_output")
    _check_nonnegative(eta, "eta", upper=1.0)
    x = x_t.float()
    out = model_output.float()
    ab = _per_sample(alpha_bar, x, "alpha_bar")
    ab_prev = _per_sample(alpha_bar_prev, x, "alpha_bar_prev")
    if prediction_type == "epsilon":
        eps = out
        x0_hat = (x - torch.sqrt(1 - ab) * eps) / torch.sqrt(ab)
    else:
        x0_hat = torch.sqrt(ab) * x - torch.sqrt(1 - ab) * out
        eps = torch.sqrt(ab) * out + torch.sqrt(1 - ab) * x
    variance = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
    std = _per_sample(eta, x, "eta") * torch.sqrt(variance)
    mean = torch.sqrt(ab_prev) * x0_hat + torch.sqrt(1 - ab_prev - std**2) * eps
    sample, log_prob = _sample_and_log_prob(x, mean, std, generator, x_prev)
    return sample, log_prob, mean, std


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    eps: float = GROUP_STD_EPS,
    global_std: bool = False,
    unbiased: bool = False,
) -> torch.Tensor:
    """A_i = (r_i - mean of i's group) / (std + eps), rewards [N] -> advantages [N].

    group_ids: [N] integer labels (any order, unequal group sizes). std is the group's, or that
    of all N rewards when ``global_std`` (Flow-GRPO's and DiffusionNFT's recipes); population std
    (numpy's ddof 0, Flow-GRPO) or, with ``unbiased``, the sample std (torch's default,
    DanceGRPO / MixGRPO with eps 1e-8). A singleton group gets 0. Computed in fp64, returned in
    rewards.dtype."""
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be [N], got {tuple(rewards.shape)} and "
            f"{tuple(group_ids.shape)}"
        )
    r = rewards.detach().double()
    _, index = torch.unique(group_ids, return_inverse=True)
    num_groups = int(index.max()) + 1 if index.numel() else 0
    count = torch.zeros(num_groups, dtype=torch.float64, device=r.device)
    count.index_add_(0, index, torch.ones_like(r))
    total = torch.zeros_like(count).index_add_(0, index, r)
    deviation = r - (total / count)[index]
    if global_std:
        centred = r - r.mean()
        dof = r.numel() - 1 if unbiased else r.numel()
        std = (centred.square().sum() / max(dof, 1)).sqrt().expand_as(r)
    else:
        squares = torch.zeros_like(count).index_add_(0, index, deviation.square())
        dof = (count - 1).clamp(min=1) if unbiased else count
        std = (squares / dof).sqrt()[index]
    advantages = deviation / (std + eps)
    # Singleton groups: deviation is 0 already; made explicit for an eps of 0 and any std.
    advantages = torch.where(count[index] > 1, advantages, torch.zeros_like(advantages))
    return advantages.to(rewards.dtype)


def grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    kl_mean: torch.Tensor | None = None,
    ref_mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    adv_clip_max: float = ADV_CLIP_MAX,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Flow-GRPO's clipped objective for one trained step (scripts/train_sd3.py), also DDPO's.

    log_prob [B] (through the policy), old_log_prob [B] (stored at sampling), advantages [B];
    optional kl_mean / ref_mean [B, *D] (policy and reference step means) with ``std``
    broadcastable to them:

        A      = clamp(A, -adv_clip_max, adv_clip_max),   ratio = exp(log_prob - old_log_prob)
        L_pol  = mean_B max(-A ratio, -A clamp(ratio, 1 - clip_range, 1 + clip_range))
        L_KL   = mean_B mean_D (kl_mean - ref_mean)^2 / (2 std^2)
        loss   = L_pol + kl_coef L_KL

    Flow-GRPO's KL divides by its s^2 = step_std^2 / (sigma - sigma_next): pass
    ``std = step_std / sqrt(sigma - sigma_next)`` to match its numbers; the step std gives the
    exact per-dimension KL. old_log_prob, advantages and ref_mean are detached here.
    Metrics (floats): policy_loss, kl_loss (nan without kl_mean), loss, approx_kl
    (0.5 mean (log_prob - old_log_prob)^2), clipfrac (|ratio - 1| > clip_range), clipfrac_gt_one,
    clipfrac_lt_one, ratio_mean."""
    if not log_prob.shape == old_log_prob.shape == advantages.shape or log_prob.ndim != 1:
        raise ValueError(
            "log_prob, old_log_prob and advantages must all be [B], got "
            f"{tuple(log_prob.shape)}, {tuple(old_log_prob.shape)}, {tuple(advantages.shape)}"
        )
    if kl_mean is None and kl_coef > 0:
        raise ValueError("grpo_loss with kl_coef > 0 needs kl_mean, ref_mean and std")
    log_ratio = log_prob.float() - old_log_prob.detach().float()
    adv = advantages.detach().float().clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.maximum(unclipped, clipped).mean()

    loss = policy_loss
    kl_value = float("nan")
    if kl_mean is not None:
        if ref_mean is None or std is None:
            raise ValueError("grpo_loss with kl_mean needs ref_mean and std too")
        if ref_mean.shape != kl_mean.shape or kl_mean.shape[0] != log_prob.shape[0]:
            raise ValueError(
                f"kl_mean and ref_mean must both be [B = {log_prob.shape[0]}, *D], got "
                f"{tuple(kl_mean.shape)} and {tuple(ref_mean.shape)}"
            )
        policy_mean = kl_mean.float()
        per_dim = (policy_mean - ref_mean.detach().float()) ** 2 / (2 * std.detach().float() ** 2)
        kl_loss = per_dim.mean(dim=_non_batch_dims(policy_mean)).mean()
        loss = policy_loss + kl_coef * kl_loss
        kl_value = kl_loss.item()

    with torch.no_grad():
        metrics = {
            "policy_loss": policy_loss.item(),
            "kl_loss": kl_value,
            "loss": loss.item(),
            "approx_kl": (0.5 * log_ratio**2).mean().item(),
            "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean().item(),
            "clipfrac_gt_one": (ratio - 1.0 > clip_range).float().mean().item(),
            "clipfrac_lt_one": (1.0 - ratio > clip_range).float().mean().item(),
            "ratio_mean": ratio.mean().item(),
        }
    return loss, metrics


def nft_optimality(advantages: torch.Tensor, adv_clip_max: float = ADV_CLIP_MAX) -> torch.Tensor:
    """DiffusionNFT's optimality probability r = clamp(clamp(A, -c, c) / (2c) + 0.5, 0, 1), [B]
    fp32 (c = ``adv_clip_max``; A = +-c maps to 1 / 0, A = 0 to 1/2)."""
    c = adv_clip_max
    clipped = advantages.detach().float().clamp(-c, c)
    return (clipped / (2 * c) + 0.5).clamp(0.0, 1.0)


def _nft_branch_loss(error: torch.Tensor) -> torch.Tensor:
    """mean_D e^2 / sg(max(mean_D |e|, 1e-5)) per sample, [B] fp64 (the released weight is fp64)."""
    dims = _non_batch_dims(error)
    weight = error.detach().double().abs().mean(dim=dims, keepdim=True).clamp(min=NFT_WEIGHT_MIN)
    return (error**2 / weight).mean(dim=dims)


def nft_loss(
    v_policy: torch.Tensor,
    v_old: torch.Tensor,
    target: torch.Tensor,
    r: torch.Tensor,
    beta: float,
    sigma: Scalar,
    v_ref: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    scale: float = NFT_LOSS_SCALE,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DiffusionNFT's loss (scripts/train_nft_sd3.py) for one trained timestep.

    v_policy, v_old (detached here), target = eps - x0: [B, *D]; r [B] from ``nft_optimality``;
    sigma: the training t (float, 0-d or [B]); beta: the NFT beta (``config.beta``, > 0);
    v_ref: the reference velocity for the KL term (``train.beta`` = ``kl_coef``):

        v+ = beta v + (1 - beta) v_old,    v- = (1 + beta) v_old - beta v
        e+- = sigma (v+- - target)         (= the x0-prediction error x_t - sigma v+- - x0)
        L+- = mean_D e+-^2 / sg(max(mean_D |e+-|, 1e-5))
        loss = scale mean_B (r L+ + (1 - r) L-) / beta + kl_coef mean_B mean_D (v - v_ref)^2

    Metrics (floats), as the released script logs them: policy_loss (the scaled term),
    unweighted_policy_loss (the same before ``scale``), kl_div (mean_B mean_D (v - v_ref)^2
    before kl_coef, nan without v_ref), old_deviate (mean of (v - v_old)^2 over all elements),
    loss."""
    _check_latents(v_policy, v_old, "v_old")
    _check_latents(v_policy, target, "target")
    if r.shape != (v_policy.shape[0],):
        raise ValueError(f"r must be [B] = [{v_policy.shape[0]}], got {tuple(r.shape)}")
    if beta <= 0:
        raise ValueError(f"the NFT beta must be > 0 (the loss divides by it), got {beta}")
    if v_ref is None and kl_coef > 0:
        raise ValueError("nft_loss with kl_coef > 0 needs v_ref")
    v = v_policy.float()
    old = v_old.detach().float()
    tgt = target.detach().float()
    t = _per_sample(sigma, v, "sigma")
    positive = beta * v + (1 - beta) * old
    negative = (1 + beta) * old - beta * v
    loss_pos = _nft_branch_loss(t * (positive - tgt))
    loss_neg = _nft_branch_loss(t * (negative - tgt))
    weight = r.detach().float()
    unweighted = (weight * loss_pos + (1 - weight) * loss_neg) / beta
    policy_loss = (scale * unweighted).mean().float()

    loss = policy_loss
    kl_value = float("nan")
    if v_ref is not None:
        _check_latents(v_policy, v_ref, "v_ref")
        kl_div = ((v - v_ref.detach().float()) ** 2).mean(dim=_non_batch_dims(v)).mean()
        loss = policy_loss + kl_coef * kl_div
        kl_value = kl_div.item()

    with torch.no_grad():
        metrics = {
            "policy_loss": policy_loss.item(),
            "unweighted_policy_loss": unweighted.mean().item(),
            "kl_div": kl_value,
            "old_deviate": ((v - old) ** 2).mean().item(),
            "loss": loss.item(),
        }
    return loss, metrics


def nft_old_decay(step: int, schedule: int) -> float:
    """Decay d of DiffusionNFT's old-policy update theta_old <- d theta_old + (1 - d) theta after
    ``step`` optimizer steps: schedule 0: 0 (hard copy); 1: min(0.001 step, 0.5); 2: 0 before
    step 75, then min(0.0075 (step - 75), 0.999)."""
    if schedule not in NFT_DECAY_SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(NFT_DECAY_SCHEDULES)}, got {schedule!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    flat, rate, cap = NFT_DECAY_SCHEDULES[schedule]
    if step < flat:
        return 0.0
    return float(min((step - flat) * rate, cap))
