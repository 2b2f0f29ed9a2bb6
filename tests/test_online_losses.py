"""losses/online.py against values worked by hand on 2-4 numbers: the flow SDE steps ("sde",
"dance", "cps"), the DDIM step (eps and v), group advantages, the clipped GRPO objective with its
KL term, the DiffusionNFT loss and its old-policy decay; plus the properties the trainer relies
on (bit-identical log-prob recomputation, fp32 outputs, gradients through the mean only)."""

import inspect
import math

import pytest
import torch
from diffusers import DDIMScheduler

from losses.online import (
    ddim_sde_step,
    flow_sde_step,
    group_advantages,
    grpo_loss,
    nft_loss,
    nft_old_decay,
    nft_optimality,
)

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def row(*values: float) -> torch.Tensor:
    """One sample, D = len(values): [1, D]."""
    return t(*values).view(1, -1)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The textbook density, averaged over the non-batch dims: an independent check."""
    dist = torch.distributions.Normal(mean.double(), std.double().expand_as(mean))
    return dist.log_prob(x.double()).mean(dim=tuple(range(1, x.ndim)))


X, V = row(1.0, 2.0), row(0.5, -1.0)


def test_contract_signatures():
    expected = {
        flow_sde_step: "(x_t, velocity, sigma, sigma_next, noise_level, generator=None, "
        "x_next=None, sigma_max=None, sde_type='sde')",
        ddim_sde_step: "(x_t, model_output, alpha_bar, alpha_bar_prev, eta, generator=None, "
        "x_prev=None, prediction_type='epsilon')",
        group_advantages: "(rewards, group_ids, eps=0.0001, global_std=False, unbiased=False)",
        grpo_loss: "(log_prob, old_log_prob, advantages, clip_range, kl_mean=None, "
        "ref_mean=None, std=None, kl_coef=0.0, adv_clip_max=5.0)",
        nft_optimality: "(advantages, adv_clip_max=5.0)",
        nft_loss: "(v_policy, v_old, target, r, beta, sigma, v_ref=None, kl_coef=0.0, scale=5.0)",
        nft_old_decay: "(step, schedule)",
    }
    for fn, signature in expected.items():
        bare = inspect.signature(fn).replace(
            parameters=[
                p.replace(annotation=inspect.Parameter.empty)
                for p in inspect.signature(fn).parameters.values()
            ],
            return_annotation=inspect.Signature.empty,
        )
        assert str(bare) == signature, fn.__name__


# ---------------------------------------------------------------- flow_sde_step


def test_flow_sde_hand_values():
    # sigma .5 -> .25, a = .5: s = .5 sqrt(.5 / (1 - .5)) = .5, s^2 / (2 sigma) = .25, dt = -.25.
    # mean = x + [v + .25 (x + .5 v)] dt: x + .5 v = [1.25, 1.5]; v + .25 (..) = [.8125, -.625];
    # times dt: [-.203125, .15625]; mean = [.796875, 2.15625]. std = .5 sqrt(.25) = .25.
    # x_next = mean + .25 [1, 0] = [1.046875, 2.15625]: z = [1, 0];
    # logp = mean_D(-z^2 / 2) - log .25 - log sqrt(2 pi) = -.25 + log 4 - .9189385
    x_next, log_prob, mean, std = flow_sde_step(X, V, 0.5, 0.25, 0.5, x_next=row(1.046875, 2.15625))
    assert torch.equal(mean, row(0.796875, 2.15625))
    assert std.item() == 0.25
    assert torch.equal(x_next, row(1.046875, 2.15625))
    assert log_prob.shape == (1,)
    assert log_prob.item() == pytest.approx(-0.25 + math.log(4) - LOG_SQRT_2PI, rel=1e-6)


def test_flow_sde_zero_noise_is_the_euler_step():
    # a = 0: s = 0, mean = x + v dt = [1, 2] + [.5, -1] (-.25) = [.875, 2.25]; x_next == mean.
    x_next, _, mean, std = flow_sde_step(X, V, 0.5, 0.25, 0.0, generator=seeded())
    assert torch.equal(mean, row(0.875, 2.25))
    assert std.item() == 0.0
    assert torch.equal(x_next, mean)
    for sde_type in ("dance", "cps"):  # cps at a = 0: (1 - .25)(x - .5 v) + .25 (x + .5 v) too
        _, _, other, _ = flow_sde_step(X, V, 0.5, 0.25, 0.0, sde_type=sde_type)
        assert torch.allclose(other, row(0.875, 2.25), atol=1e-7), sde_type


def test_flow_sde_at_sigma_one_uses_sigma_max():
    # sigma 1 -> .75, sigma_max .75, a = .5: s = .5 sqrt(1 / (1 - .75)) = 1; (1 - sigma) = 0, so
    # mean = x + [v + s^2 / 2 x] dt = [1, 2] + [1, 0] (-.25) = [.75, 2]; std = 1 sqrt(.25) = .5.
    _, _, mean, std = flow_sde_step(X, V, 1.0, 0.75, 0.5, generator=seeded(), sigma_max=0.75)
    assert torch.equal(mean, row(0.75, 2.0))
    assert std.item() == 0.5
    with pytest.raises(ValueError, match="sigma_max"):
        flow_sde_step(X, V, 1.0, 0.75, 0.5)
    with pytest.raises(ValueError, match="sigma_max"):  # one sample of a [B] sigma at 1
        flow_sde_step(X.repeat(2, 1), V.repeat(2, 1), t(0.5, 1.0), t(0.25, 0.75), 0.5)
    # sigma_max only replaces sigma == 1: at sigma .5 it changes nothing.
    _, _, plain, _ = flow_sde_step(X, V, 0.5, 0.25, 0.5)
    _, _, with_max, _ = flow_sde_step(X, V, 0.5, 0.25, 0.5, sigma_max=0.75)
    assert torch.equal(plain, with_max)


def test_flow_dance_uses_s_equal_to_noise_level():
    # sigma .75 -> .5, a = .5, s = a = .5: s^2 / (2 sigma) = .25 / 1.5 = 1/6, dt = -.25.
    # x + .25 v = [1.125, 1.75]; v + (..) / 6 = [.6875, -.708333]; times dt: [-.171875, .1770833];
    # mean = [.828125, 2.1770833]; std = .5 sqrt(.25) = .25 (Flow-GRPO's s would be .5 sqrt(3)).
    _, _, mean, std = flow_sde_step(X, V, 0.75, 0.5, 0.5, generator=seeded(), sde_type="dance")
    assert torch.allclose(mean, row(0.828125, 2.0 + 0.25 * (1 - 1.75 / 6)), atol=1e-6)
    assert std.item() == 0.25
    _, _, _, sde_std = flow_sde_step(X, V, 0.75, 0.5, 0.5, generator=seeded())
    assert sde_std.item() == pytest.approx(0.25 * math.sqrt(3), rel=1e-6)


def test_flow_cps_hand_values():
    # sigma .5 -> .25, a = 1/3: std = .25 sin(pi / 6) = .125; x0_hat = x - .5 v = [.75, 2.5];
    # x1_hat = x + .5 v = [1.25, 1.5]; sqrt(.25^2 - .125^2) = sqrt(.046875) = .2165064;
    # mean = .75 x0_hat + .2165064 x1_hat = [.5625 + .2706329, 1.875 + .3247595].
    # Released "log-prob": -mean_D (x_next - mean)^2 = -(.1^2 + .2^2) / 2 = -.025.
    c = math.sqrt(0.046875)
    expected = row(0.5625 + 1.25 * c, 1.875 + 1.5 * c)
    _, _, mean, std = flow_sde_step(X, V, 0.5, 0.25, 1 / 3, sde_type="cps")
    assert torch.allclose(mean, expected, atol=1e-6)
    assert std.item() == pytest.approx(0.125, rel=1e-6)
    _, log_prob, _, _ = flow_sde_step(
        X, V, 0.5, 0.25, 1 / 3, x_next=mean + row(0.1, -0.2), sde_type="cps"
    )
    assert log_prob.item() == pytest.approx(-0.025, rel=1e-5)
    # a = 1: std = sigma_next = .25, no x1_hat term: mean = .75 x0_hat = [.5625, 1.875].
    _, _, mean, std = flow_sde_step(X, V, 0.5, 0.25, 1.0, sde_type="cps")
    assert torch.equal(mean, row(0.5625, 1.875))
    assert std.item() == 0.25


def test_flow_per_sample_sigmas_broadcast():
    # A [B] sigma equals running each sample alone with its float sigma.
    x = torch.randn(2, 3, 2, 2, generator=seeded(1))
    v = torch.randn(2, 3, 2, 2, generator=seeded(2))
    nxt, lp, mean, std = flow_sde_step(x, v, t(0.8, 0.5), t(0.6, 0.25), 0.7, generator=seeded())
    assert std.shape == (2, 1, 1, 1)
    for i, (sigma, sigma_next) in enumerate([(0.8, 0.6), (0.5, 0.25)]):
        one = slice(i, i + 1)
        _, lp_one, m, s = flow_sde_step(x[one], v[one], sigma, sigma_next, 0.7, x_next=nxt[one])
        assert torch.allclose(m, mean[one], atol=1e-6)
        assert torch.allclose(s.flatten(), std[i].flatten())
        assert torch.allclose(lp_one, lp[one], atol=1e-5)
    with pytest.raises(ValueError, match=r"sigma must be a float, a 0-d tensor or a \[B\] = \[2\]"):
        flow_sde_step(x, v, t(0.8, 0.5, 0.3), 0.25, 0.7)


@pytest.mark.parametrize("sde_type", ["sde", "dance", "cps"])
def test_flow_recomputed_log_prob_is_bit_identical(sde_type):
    x = torch.randn(3, 4, 5, 5, generator=seeded(1))
    v = torch.randn(3, 4, 5, 5, generator=seeded(2))
    step = (x, v, t(0.9, 0.6, 0.3), t(0.7, 0.4, 0.0), 0.7)
    x_next, log_prob, _, _ = flow_sde_step(*step, generator=seeded(), sde_type=sde_type)
    _, again, _, _ = flow_sde_step(*step, x_next=x_next, sde_type=sde_type)
    assert torch.equal(again, log_prob)
    assert torch.equal(torch.exp(again - log_prob), torch.ones(3))  # ratio exactly 1


@pytest.mark.parametrize("sde_type", ["sde", "dance"])
def test_flow_log_prob_is_the_gaussian_density(sde_type):
    x = torch.randn(2, 4, 3, 3, generator=seeded(1))
    v = torch.randn(2, 4, 3, 3, generator=seeded(2))
    x_next, log_prob, mean, std = flow_sde_step(
        x, v, t(1.0, 0.5), t(0.8, 0.25), 0.7, generator=seeded(), sigma_max=0.8, sde_type=sde_type
    )
    expected = gaussian_log_prob(x_next, mean, std).float()
    assert torch.allclose(log_prob, expected, rtol=1e-5, atol=1e-5)


def test_flow_noise_is_drawn_as_the_contract_says_and_is_deterministic():
    x, v = (
        torch.randn(2, 3, 4, 4, generator=seeded(1)),
        torch.randn(2, 3, 4, 4, generator=seeded(2)),
    )
    first, _, mean, std = flow_sde_step(x, v, 0.6, 0.4, 0.7, generator=seeded(5))
    second, _, _, _ = flow_sde_step(x, v, 0.6, 0.4, 0.7, generator=seeded(5))
    other, _, _, _ = flow_sde_step(x, v, 0.6, 0.4, 0.7, generator=seeded(6))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    noise = torch.randn(x.shape, generator=seeded(5), dtype=torch.float32)
    assert torch.equal(first, mean + std * noise)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flow_half_precision_inputs_give_fp32(dtype):
    x = torch.randn(2, 3, 4, 4, generator=seeded(1)).to(dtype)
    v = torch.randn(2, 3, 4, 4, generator=seeded(2)).to(dtype)
    outputs = flow_sde_step(x, v, t(0.6, 0.3).to(dtype), 0.2, 0.7, generator=seeded())
    assert all(out.dtype == torch.float32 for out in outputs)
    # The same as feeding the upcast values: the arithmetic itself is fp32.
    upcast = flow_sde_step(
        x.float(), v.float(), t(0.6, 0.3).to(dtype).float(), 0.2, 0.7, generator=seeded()
    )
    assert all(torch.equal(a, b) for a, b in zip(outputs, upcast, strict=True))


def test_flow_gradient_flows_through_the_mean_only():
    # logp = mean_D[-(x_next - mean)^2 / (2 std^2)] + const with x_next detached, so
    # d logp / d v = (x_next - mean) / (std^2 D) * d mean / d v = noise / (std D) * c_v dt,
    # c_v = 1 + s^2 (1 - sigma) / (2 sigma). Were x_next not detached, the gradient would be 0
    # (x_next - mean = std noise does not depend on v).
    x = torch.randn(2, 3, 2, 2, generator=seeded(1))
    v = torch.randn(2, 3, 2, 2, generator=seeded(2), requires_grad=True)
    sigma, sigma_next, a = 0.6, 0.4, 0.7
    x_next, log_prob, _, std = flow_sde_step(x, v, sigma, sigma_next, a, generator=seeded(3))
    assert not x_next.requires_grad
    log_prob.sum().backward()
    noise = torch.randn(x.shape, generator=seeded(3))
    s2 = a**2 * sigma / (1 - sigma)
    c_v = 1 + s2 * (1 - sigma) / (2 * sigma)
    expected = noise / (std * 12) * c_v * (sigma_next - sigma)
    assert torch.allclose(v.grad, expected, rtol=1e-4, atol=1e-6)
    # A stored sample that carries a graph receives no gradient.
    stored = x_next.clone().requires_grad_(True)
    _, log_prob, _, _ = flow_sde_step(x, v.detach(), sigma, sigma_next, a, x_next=stored)
    assert not log_prob.requires_grad


def test_flow_bad_inputs():
    with pytest.raises(ValueError, match="sde_type"):
        flow_sde_step(X, V, 0.5, 0.25, 0.5, sde_type="ode")
    with pytest.raises(ValueError, match="velocity must have the latents' shape"):
        flow_sde_step(X, row(1.0, 2.0, 3.0), 0.5, 0.25, 0.5)
    with pytest.raises(ValueError, match="noise_level must be >= 0"):
        flow_sde_step(X, V, 0.5, 0.25, -0.1)


# ---------------------------------------------------------------- ddim_sde_step

# ab = .36 (sqrt .6; sqrt(1 - ab) = .8), abp = .64 (sqrt .8; sqrt(1 - abp) = .6).
# x0 = [1, -2], eps = [.5, 1]: x = .6 x0 + .8 eps = [1, -.4]; v = .6 eps - .8 x0 = [-.5, 2.2].
AB, ABP = 0.36, 0.64
X0, EPS = row(1.0, -2.0), row(0.5, 1.0)
XT, VPRED = row(1.0, -0.4), row(-0.5, 2.2)


def test_ddim_eta_zero_is_the_deterministic_step():
    # eta 0: mean = sqrt(abp) x0 + sqrt(1 - abp) eps = .8 [1, -2] + .6 [.5, 1] = [1.1, -1].
    x_prev, _, mean, std = ddim_sde_step(XT, EPS, AB, ABP, 0.0, generator=seeded())
    assert torch.allclose(mean, row(1.1, -1.0), atol=1e-6)
    assert std.item() == 0.0
    assert torch.equal(x_prev, mean)


def test_ddim_eta_one_hand_values():
    # var = (1 - .64) / (1 - .36) (1 - .36 / .64) = .5625 * .4375 = .24609375 (= 63 / 256);
    # sqrt(1 - abp - var) = sqrt(.36 - .24609375) = sqrt(.11390625) = .3375;
    # mean = .8 x0 + .3375 eps = [.96875, -1.2625]; std = sqrt(63) / 16.
    # x_prev = mean + std [1, -1]: logp = -1/2 - log std - log sqrt(2 pi).
    std_hand = math.sqrt(63) / 16
    _, _, mean, std = ddim_sde_step(XT, EPS, AB, ABP, 1.0, generator=seeded())
    assert torch.allclose(mean, row(0.96875, -1.2625), atol=1e-6)
    assert std.item() == pytest.approx(std_hand, rel=1e-6)
    _, log_prob, _, _ = ddim_sde_step(XT, EPS, AB, ABP, 1.0, x_prev=mean + std * row(1.0, -1.0))
    assert log_prob.item() == pytest.approx(-0.5 - math.log(std_hand) - LOG_SQRT_2PI, rel=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_v_prediction_matches_epsilon(eta):
    by_eps = ddim_sde_step(XT, EPS, AB, ABP, eta, generator=seeded())
    by_v = ddim_sde_step(
        XT, VPRED, AB, ABP, eta, generator=seeded(), prediction_type="v_prediction"
    )
    for a, b in zip(by_eps, by_v, strict=True):  # the log-prob is nan for both at eta 0
        assert torch.allclose(a, b, atol=1e-5, equal_nan=True)


def test_ddim_matches_diffusers_ddim_scheduler():
    # An independent implementation: diffusers' DDIM step with SD1.5's schedule, 50 steps.
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    scheduler.set_timesteps(50)
    x = torch.randn(2, 4, 3, 3, generator=seeded(1))
    eps = torch.randn(2, 4, 3, 3, generator=seeded(2))
    for timestep in (int(scheduler.timesteps[0]), int(scheduler.timesteps[-1])):
        prev = timestep - 1000 // 50
        ab = scheduler.alphas_cumprod[timestep]
        abp = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
        for eta in (0.0, 1.0):
            x_prev, _, _, _ = ddim_sde_step(x, eps, ab, abp, eta, generator=seeded(3))
            noise = torch.randn(x.shape, generator=seeded(3))
            reference = scheduler.step(eps, timestep, x, eta=eta, variance_noise=noise).prev_sample
            assert torch.allclose(x_prev, reference, atol=1e-5), (timestep, eta)


def test_ddim_log_prob_recomputed_and_gaussian():
    x = torch.randn(3, 4, 3, 3, generator=seeded(1)).half()
    eps = torch.randn(3, 4, 3, 3, generator=seeded(2)).half()
    ab, abp = t(0.3, 0.5, 0.9), t(0.4, 0.6, 0.95)
    x_prev, log_prob, mean, std = ddim_sde_step(x, eps, ab, abp, 1.0, generator=seeded())
    assert all(out.dtype == torch.float32 for out in (x_prev, log_prob, mean, std))
    _, again, _, _ = ddim_sde_step(x, eps, ab, abp, 1.0, x_prev=x_prev)
    assert torch.equal(again, log_prob)
    assert torch.allclose(log_prob, gaussian_log_prob(x_prev, mean, std).float(), atol=1e-5)


def test_ddim_bad_inputs():
    with pytest.raises(ValueError, match="prediction_type"):
        ddim_sde_step(XT, EPS, AB, ABP, 1.0, prediction_type="sample")
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1.0\]"):
        ddim_sde_step(XT, EPS, AB, ABP, 1.5)


# ---------------------------------------------------------------- group_advantages

# Labels 7, 3, -1 in any order; group 7 = rewards 1, 3, 8 (indices 0, 2, 5), group 3 = 2, 6
# (indices 1, 4), group -1 = 10 alone (index 3).
REWARDS = torch.tensor([1.0, 2.0, 3.0, 10.0, 6.0, 8.0], dtype=torch.float64)
GROUPS = torch.tensor([7, 3, 7, -1, 3, 7])


def test_group_advantages_population_std():
    # Group 7: mean 4, deviations [-3, -1, 4], var (9 + 1 + 16) / 3 = 26/3, std 2.9439203.
    # Group 3: mean 4, deviations [-2, 2], std 2. Singleton: 0.
    s7 = math.sqrt(26 / 3)
    adv = group_advantages(REWARDS, GROUPS)
    expected = [-3 / (s7 + 1e-4), -2 / 2.0001, -1 / (s7 + 1e-4), 0.0, 2 / 2.0001, 4 / (s7 + 1e-4)]
    assert adv.dtype == torch.float64
    assert adv.tolist() == pytest.approx(expected, rel=1e-12)


def test_group_advantages_unbiased_std():
    # Group 7: var 26 / 2 = 13; group 3: var 8 / 1 = 8; the singleton (0 dof) still gets 0.
    adv = group_advantages(REWARDS, GROUPS, eps=1e-8, unbiased=True)
    s7, s3 = math.sqrt(13) + 1e-8, math.sqrt(8) + 1e-8
    assert adv.tolist() == pytest.approx(
        [-3 / s7, -2 / s3, -1 / s7, 0.0, 2 / s3, 4 / s7], rel=1e-12
    )


def test_group_advantages_global_std():
    # All six: mean 5, deviations [-4, -3, -2, 5, 1, 3], sum of squares 64; population std
    # sqrt(64 / 6), sample std sqrt(64 / 5). Group means stay per group.
    for unbiased, std in ((False, math.sqrt(64 / 6)), (True, math.sqrt(64 / 5))):
        adv = group_advantages(REWARDS, GROUPS, global_std=True, unbiased=unbiased)
        deviations = [-3, -2, -1, 0, 2, 4]
        assert adv.tolist() == pytest.approx([d / (std + 1e-4) for d in deviations], rel=1e-12)


def test_group_advantages_dtype_order_and_errors():
    adv32 = group_advantages(REWARDS.float(), GROUPS)
    assert adv32.dtype == torch.float32
    # Permuting the samples permutes the advantages.
    perm = torch.tensor([5, 3, 0, 4, 1, 2])
    assert torch.equal(
        group_advantages(REWARDS[perm], GROUPS[perm]), group_advantages(REWARDS, GROUPS)[perm]
    )
    # An all-equal group gets exactly 0.
    assert group_advantages(t(3.0, 3.0, 1.0, 2.0), torch.tensor([0, 0, 1, 1]))[:2].tolist() == [
        0,
        0,
    ]
    with pytest.raises(ValueError, match=r"must both be \[N\]"):
        group_advantages(REWARDS, GROUPS[:5])


# ---------------------------------------------------------------- grpo_loss


def test_grpo_ratio_one_is_minus_the_mean_clamped_advantage():
    # ratio 1 everywhere: L = -mean(clamp(A, -5, 5)) = -(1 - 2 + 5) / 3 = -4/3.
    zeros = torch.zeros(3)
    loss, metrics = grpo_loss(zeros, zeros, t(1.0, -2.0, 7.0), 1e-4)
    assert loss.item() == pytest.approx(-4 / 3)
    assert metrics["ratio_mean"] == 1.0
    assert metrics["clipfrac"] == metrics["approx_kl"] == 0.0
    assert math.isnan(metrics["kl_loss"])
    # adv_clip_max 1: clamp(A) = [1, -1, 1], L = -1/3.
    assert grpo_loss(zeros, zeros, t(1.0, -2.0, 7.0), 1e-4, adv_clip_max=1.0)[
        0
    ].item() == pytest.approx(-1 / 3)


def test_grpo_clipping_on_both_sides():
    # eps .1, ratios [1.5, .5, 1.05, .8], A = [1, 1, -1, -1]; max(-A r, -A clamp(r, .9, 1.1)):
    #   1.5,  A  1: max(-1.5, -1.1) = -1.1 (clipped: no gradient)
    #   .5,   A  1: max(-.5, -.9)   = -.5  (unclipped)
    #   1.05, A -1: max(1.05, 1.05) = 1.05 (inside the range)
    #   .8,   A -1: max(.8, .9)     = .9   (clipped: no gradient)
    # L = (-1.1 - .5 + 1.05 + .9) / 4 = .0875; clipfrac 3/4 (gt one 1/4, lt one 2/4);
    # ratio_mean 3.85 / 4; approx_kl = .5 mean(log r^2).
    ratios = [1.5, 0.5, 1.05, 0.8]
    log_prob = torch.log(t(*ratios)).requires_grad_(True)
    loss, metrics = grpo_loss(log_prob, torch.zeros(4), t(1.0, 1.0, -1.0, -1.0), 0.1)
    assert loss.item() == pytest.approx(0.0875, abs=1e-6)
    assert metrics["policy_loss"] == metrics["loss"] == pytest.approx(0.0875, abs=1e-6)
    assert (metrics["clipfrac"], metrics["clipfrac_gt_one"], metrics["clipfrac_lt_one"]) == (
        0.75,
        0.25,
        0.5,
    )
    assert metrics["ratio_mean"] == pytest.approx(0.9625, rel=1e-6)
    assert metrics["approx_kl"] == pytest.approx(
        0.5 * sum(math.log(r) ** 2 for r in ratios) / 4, rel=1e-5
    )
    # d L / d log_prob = -A r / B where the unclipped term is active, 0 where clipped.
    loss.backward()
    assert log_prob.grad.tolist() == pytest.approx([0.0, -0.5 / 4, 1.05 / 4, 0.0], abs=1e-6)


def test_grpo_kl_term_by_hand():
    # kl_mean [[1, 2], [0, 0]], ref_mean [[0, 0], [0, 1]], std [[.5], [1]]:
    # sample 0: mean_D (1, 4) / (2 .25) = mean(2, 8) = 5; sample 1: mean(0, 1 / 2) = .25;
    # L_KL = 2.625; with kl_coef .04 and ratio 1, A = [1, -1]: L = 0 + .04 * 2.625 = .105.
    kl_mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    ref_mean = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    std = t(0.5, 1.0).view(2, 1)
    zeros = torch.zeros(2)
    loss, metrics = grpo_loss(
        zeros, zeros, t(1.0, -1.0), 1e-4, kl_mean, ref_mean, std, kl_coef=0.04
    )
    assert metrics["kl_loss"] == pytest.approx(2.625)
    assert loss.item() == pytest.approx(0.105)
    # d L / d kl_mean = kl_coef (kl_mean - ref) / (std^2 D B): [[.04 * 1 / .5, .04 * 2 / .5] / 2 ...
    loss.backward()
    expected = 0.04 * (kl_mean.detach() - ref_mean) / (std**2 * 2 * 2)
    assert torch.allclose(kl_mean.grad, expected)


def test_grpo_kl_is_zero_at_the_start_and_needs_its_inputs():
    mean = torch.randn(2, 3, 2, 2, generator=seeded())
    zeros = torch.zeros(2)
    _, metrics = grpo_loss(
        zeros, zeros, t(1.0, -1.0), 1e-4, mean, mean.clone(), t(0.3), kl_coef=0.04
    )
    assert metrics["kl_loss"] == 0.0
    with pytest.raises(ValueError, match="kl_coef > 0 needs kl_mean"):
        grpo_loss(zeros, zeros, t(1.0, -1.0), 1e-4, kl_coef=0.04)
    with pytest.raises(ValueError, match="needs ref_mean and std"):
        grpo_loss(zeros, zeros, t(1.0, -1.0), 1e-4, kl_mean=mean, kl_coef=0.04)
    with pytest.raises(ValueError, match=r"must all be \[B\]"):
        grpo_loss(zeros, torch.zeros(3), t(1.0, -1.0), 1e-4)


def test_grpo_end_to_end_gradient_through_the_step_mean():
    # Sampled under no_grad, recomputed with the stored sample: ratio 1, and the policy gradient
    # reaches the velocity through the step's mean (the term d logp / d v of the test above).
    x = torch.randn(2, 3, 2, 2, generator=seeded(1))
    v = torch.randn(2, 3, 2, 2, generator=seeded(2))
    with torch.no_grad():
        x_next, old, _, _ = flow_sde_step(x, v, 0.6, 0.4, 0.7, generator=seeded(3))
    v.requires_grad_(True)
    _, new, _, _ = flow_sde_step(x, v, 0.6, 0.4, 0.7, x_next=x_next)
    loss, metrics = grpo_loss(new, old, t(1.0, -1.0), 1e-4)
    assert metrics["ratio_mean"] == 1.0
    loss.backward()
    assert v.grad is not None and bool(v.grad.abs().sum() > 0)


# ---------------------------------------------------------------- DiffusionNFT


def test_nft_optimality_by_hand():
    # c = 5: clamp(A, -5, 5) / 10 + .5.
    r = nft_optimality(torch.tensor([-7.0, -5.0, -2.5, 0.0, 1.0, 5.0, 9.0], dtype=torch.float64))
    assert r.dtype == torch.float32
    assert r.tolist() == pytest.approx([0.0, 0.0, 0.25, 0.5, 0.6, 1.0, 1.0])
    assert nft_optimality(t(1.0), adv_clip_max=2.0).item() == 0.75  # 1 / 4 + .5


def test_nft_loss_at_policy_equal_old():
    # v = v_old = [1, 2], target [0, 0], sigma .5, beta .5, r .75: v+ = v- = v_old;
    # e = .5 [1, 2] = [.5, 1]; w = mean |e| = .75; L = mean e^2 / w = .625 / .75 = 5/6 for both;
    # loss = 5 (r + 1 - r) (5/6) / .5 = 25/3; unweighted = 5/3; old_deviate 0; v_ref = v: kl 0.
    v = row(1.0, 2.0).requires_grad_(True)
    loss, metrics = nft_loss(
        v, row(1.0, 2.0), row(0.0, 0.0), t(0.75), 0.5, 0.5, v_ref=row(1.0, 2.0), kl_coef=1e-4
    )
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(25 / 3, rel=1e-6)
    assert metrics["policy_loss"] == metrics["loss"] == pytest.approx(25 / 3, rel=1e-6)
    assert metrics["unweighted_policy_loss"] == pytest.approx(5 / 3, rel=1e-6)
    assert metrics["old_deviate"] == metrics["kl_div"] == 0.0


def test_nft_loss_away_from_old_by_hand():
    # v = [2, 2], v_old = [1, 2], target [0, 0], sigma .5, beta .5, r .75:
    # v+ = .5 v + .5 v_old = [1.5, 2]: e+ = [.75, 1], w+ = .875, mean e+^2 = .78125, L+ = 25/28;
    # v- = 1.5 v_old - .5 v = [.5, 2]: e- = [.25, 1], w- = .625, mean e-^2 = .53125, L- = .85;
    # unweighted = (.75 * 25/28 + .25 * .85) / .5 = 1.7642857; policy = 5 x = 8.8214286.
    # old_deviate = mean(1, 0) = .5; v_ref = v_old: kl_div = .5; loss = policy + .1 * .5.
    unweighted = (0.75 * 25 / 28 + 0.25 * 0.85) / 0.5
    loss, metrics = nft_loss(
        row(2.0, 2.0),
        row(1.0, 2.0),
        row(0.0, 0.0),
        t(0.75),
        0.5,
        0.5,
        v_ref=row(1.0, 2.0),
        kl_coef=0.1,
    )
    assert metrics["unweighted_policy_loss"] == pytest.approx(unweighted, rel=1e-6)
    assert metrics["policy_loss"] == pytest.approx(5 * unweighted, rel=1e-6)
    assert metrics["old_deviate"] == 0.5
    assert metrics["kl_div"] == 0.5
    assert loss.item() == pytest.approx(5 * unweighted + 0.05, rel=1e-6)
    # Without v_ref: no KL, kl_div nan; scale multiplies only the policy term.
    loss, metrics = nft_loss(
        row(2.0, 2.0), row(1.0, 2.0), row(0.0, 0.0), t(0.75), 0.5, 0.5, scale=1.0
    )
    assert loss.item() == pytest.approx(unweighted, rel=1e-6)
    assert math.isnan(metrics["kl_div"])


def test_nft_gradient_direction():
    # At v = v_old: r = 1 keeps only L+ whose gradient is 2 beta sigma^2 (v - target) / (w D beta):
    # descent pulls v towards the target; r = 0 keeps only L-, whose gradient has the opposite
    # sign: descent pushes v away from it. Batch of 2 with per-sample sigmas.
    target = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    v_old = torch.tensor([[1.0, -1.0], [0.5, 0.5]])
    for r, sign in ((1.0, 1.0), (0.0, -1.0)):
        v = v_old.clone().requires_grad_(True)
        loss, _ = nft_loss(v, v_old, target, torch.full((2,), r), 0.5, t(0.3, 0.8))
        loss.backward()
        assert torch.equal(torch.sign(v.grad), sign * torch.sign(v_old - target)), r
    # One gradient step with r = 1 lowers the distance to the target.
    v = v_old.clone().requires_grad_(True)
    nft_loss(v, v_old, target, torch.ones(2), 1.0, 0.5)[0].backward()
    moved = v.detach() - 0.01 * v.grad
    assert bool(((moved - target).abs() < (v_old - target).abs()).all())


def test_nft_gradient_by_hand_with_the_weight_detached():
    # beta 1, r 1: L = 5 mean_D e^2 / sg(w), e = sigma (v - target). v = [1, 2], target [0, 0],
    # sigma .5: e = [.5, 1], w = .75; dL/dv = 5 * 2 e sigma / (w D) = 5 [.5, 1] / 1.5.
    # (Differentiating through w would add -5 mean(e^2) / w^2 * sigma sign(e) / D.)
    v = row(1.0, 2.0).requires_grad_(True)
    nft_loss(v, row(1.0, 2.0), row(0.0, 0.0), t(1.0), 1.0, 0.5)[0].backward()
    assert v.grad.tolist()[0] == pytest.approx([5 / 3, 10 / 3], rel=1e-6)


def test_nft_gradient_skips_v_old_and_v_ref():
    v = torch.randn(2, 3, 2, 2, generator=seeded(1), requires_grad=True)
    v_old = torch.randn(2, 3, 2, 2, generator=seeded(2), requires_grad=True)
    v_ref = torch.randn(2, 3, 2, 2, generator=seeded(3), requires_grad=True)
    target = torch.randn(2, 3, 2, 2, generator=seeded(4))
    loss, _ = nft_loss(v, v_old, target, t(0.2, 0.9), 1.0, 0.5, v_ref=v_ref, kl_coef=1e-4)
    loss.backward()
    assert v.grad is not None and v_old.grad is None and v_ref.grad is None


def test_nft_bad_inputs():
    with pytest.raises(ValueError, match="beta must be > 0"):
        nft_loss(X, X, X, t(0.5), 0.0, 0.5)
    with pytest.raises(ValueError, match="needs v_ref"):
        nft_loss(X, X, X, t(0.5), 1.0, 0.5, kl_coef=1e-4)
    with pytest.raises(ValueError, match=r"r must be \[B\] = \[1\]"):
        nft_loss(X, X, X, t(0.5, 0.5), 1.0, 0.5)


def test_nft_old_decay_schedules():
    # 0: always 0. 1: min(.001 step, .5). 2: 0 before 75, then min(.0075 (step - 75), .999).
    assert [nft_old_decay(s, 0) for s in (0, 10, 1000)] == [0.0, 0.0, 0.0]
    assert [nft_old_decay(s, 1) for s in (0, 100, 499, 600)] == pytest.approx(
        [0.0, 0.1, 0.499, 0.5]
    )
    # 100: .0075 * 25 = .1875; 300: .0075 * 225 = 1.6875 -> capped at .999.
    assert [nft_old_decay(s, 2) for s in (0, 74, 75, 100, 300)] == pytest.approx(
        [0.0, 0.0, 0.0, 0.1875, 0.999]
    )
    with pytest.raises(ValueError, match="schedule must be one of"):
        nft_old_decay(10, 3)


def test_grpo_and_nft_refuse_bad_coefficients_naming_each():
    from losses.grpo import grpo
    from losses.nft import nft

    message = r"grpo: clip_range \(0\) and adv_clip_max \(5.0\) must be > 0, kl_coef \(0.04\) >= 0"
    with pytest.raises(ValueError, match=message):
        grpo(clip_range=0)
    with pytest.raises(ValueError, match=r"nft: nft_beta \(1.0\) .* kl_coef \(-1.0\) >= 0"):
        nft(kl_coef=-1.0)
    with pytest.raises(ValueError, match=r"adv_clip_max \(0.0\) must be > 0"):
        nft(adv_clip_max=0.0)
    assert callable(grpo()) and callable(nft())  # the released defaults pass
