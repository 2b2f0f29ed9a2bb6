"""The diffusion step: shared per-pair draws, targets, and which errors carry gradient."""

from contextlib import nullcontext

import pytest
import torch
from diffusers import DDPMScheduler

from diffusion.denoising import (
    batch_errors,
    denoise,
    denoising_errors,
    draw_groups,
    first_group_index,
    noisy_inputs_and_target,
)
from losses import build_loss, get_spec, loss_names, requirements
from models.loading import load_components
from training.config import parse_config

SHAPE = (4, 8, 8)


def draws(first: int, num: int, group_size: int = 2):
    return draw_groups(SHAPE, group_size, first, num, 1000, seed=3)


def test_a_pair_shares_timestep_and_noise_but_not_vae_noise():
    d = draws(0, 3)
    assert torch.equal(d.timesteps[:3], d.timesteps[3:])
    assert torch.equal(d.noise[:3], d.noise[3:])
    assert not torch.equal(d.latent_eps[:3], d.latent_eps[3:])
    assert len(set(d.timesteps[:3].tolist())) > 1 or not torch.equal(d.noise[0], d.noise[1])


def test_draws_do_not_depend_on_batching():
    whole = draws(0, 2)
    first, second = draws(0, 1), draws(1, 1)
    # Layout [chosen 0, chosen 1, rejected 0, rejected 1] vs two single-pair batches.
    order = [first, second, first, second]
    for i, (part, j) in enumerate(zip(order, [0, 0, 1, 1], strict=True)):
        assert torch.equal(whole.noise[i], part.noise[j])
        assert torch.equal(whole.latent_eps[i], part.latent_eps[j])
        assert whole.timesteps[i] == part.timesteps[j]


def test_global_group_index_matches_one_process_with_accumulation():
    # 2 processes x batch 1: micro-batch m of rank r is group 2m + r, the group one process
    # x batch 1 x accumulation 2 gives its micro-batch 2m + r; every group is used once.
    two = [first_group_index(m, 2, r, 1) for m in range(3) for r in range(2)]
    one = [first_group_index(m, 1, 0, 1) for m in range(6)]
    assert two == one == list(range(6))
    # batch 2 per process: groups 4m + 2r and 4m + 2r + 1.
    assert [first_group_index(m, 2, r, 2) for m in range(2) for r in range(2)] == [0, 2, 4, 6]
    a, b = draws(0, 1), draws(1, 1)
    assert not torch.equal(a.noise, b.noise)  # different ranks' groups draw different noise


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_targets_by_hand(prediction_type):
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        prediction_type=prediction_type,
    )  # fmt: skip
    x0, eps = torch.randn(2, *SHAPE), torch.randn(2, *SHAPE)
    t = torch.tensor([10, 900])
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy, target = noisy_inputs_and_target(scheduler, x0, eps, t)
    torch.testing.assert_close(noisy, abar.sqrt() * x0 + (1 - abar).sqrt() * eps)
    expected = eps if prediction_type == "epsilon" else abar.sqrt() * eps - (1 - abar).sqrt() * x0
    torch.testing.assert_close(target, expected)


@pytest.fixture(scope="module")
def tiny(tiny_sd15_dir):
    return load_components(
        parse_config(["--pretrained_model", str(tiny_sd15_dir), "--data", "unread"]), True,
        torch.float32,
        torch.device("cpu"),
    )  # fmt: skip


def test_denoising_errors_are_per_sample_mse(tiny):
    noisy, target = torch.randn(2, *SHAPE), torch.randn(2, *SHAPE)
    t = torch.tensor([5, 500])
    cond = tiny.family.condition(["a", "b"], [(64, 64)] * 2, [(0, 0)] * 2)
    errors = denoising_errors(tiny.reference, noisy, t, cond, target)
    prediction = tiny.reference(noisy, t, **cond).sample
    torch.testing.assert_close(errors, ((prediction - target) ** 2).mean(dim=(1, 2, 3)))
    assert errors.dtype == torch.float32 and errors.shape == (2,)


def test_gradient_reaches_the_policy_only(tiny):
    pixels = torch.rand(4, 3, 64, 64) * 2 - 1
    cond = tiny.family.condition(["a red circle", "a cat"], [(64, 64)] * 4, [(0, 0)] * 4)
    assert torch.equal(cond["encoder_hidden_states"][0], cond["encoder_hidden_states"][2])
    policy_err, ref_err = batch_errors(
        tiny.policy, tiny.reference, tiny.latent_encoder, tiny.noise_scheduler, cond, pixels,
        2, 0, 0, nullcontext,
    )  # fmt: skip
    assert policy_err.requires_grad and not ref_err.requires_grad
    torch.testing.assert_close(policy_err.detach(), ref_err)  # same weights, same inputs
    policy_err.sum().backward()
    assert all(p.grad is None for p in tiny.reference.parameters())
    assert sum(p.grad.abs().sum() for p in tiny.policy.parameters() if p.grad is not None) > 0


def test_batch_errors_can_return_the_timesteps_it_drew(tiny):
    pixels = torch.rand(4, 3, 64, 64) * 2 - 1
    cond = tiny.family.condition(["a", "b"], [(64, 64)] * 4, [(0, 0)] * 4)
    args = (tiny.policy, tiny.reference, tiny.latent_encoder, tiny.noise_scheduler, cond, pixels,
            2, 5, 0, nullcontext)  # fmt: skip
    policy_err, ref_err, timesteps = batch_errors(*args, return_timesteps=True)
    plain_policy, plain_ref = batch_errors(*args)
    assert torch.equal(policy_err, plain_policy) and torch.equal(ref_err, plain_ref)
    latent_shape = tuple(tiny.latent_encoder.moments(pixels)[0].shape[1:])
    expected = draw_groups(latent_shape, 2, 5, 2, 1000, seed=0).timesteps
    assert torch.equal(timesteps, expected)  # one per pair, shared by chosen and rejected


def test_predictions_are_kept_only_when_asked(tiny):
    pixels = torch.rand(4, 3, 64, 64) * 2 - 1
    cond = tiny.family.condition(["a", "b"], [(64, 64)] * 4, [(0, 0)] * 4)
    args = (tiny.policy, tiny.reference, tiny.latent_encoder, tiny.noise_scheduler, cond, pixels,
            2, 0, 0, nullcontext)  # fmt: skip
    lean, full = denoise(*args), denoise(*args, keep_predictions=True)
    assert lean.policy_pred is None and lean.ref_pred is None and lean.target is None
    torch.testing.assert_close(full.policy_err, lean.policy_err, rtol=0, atol=0)
    expected = (full.policy_pred - full.target).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(full.policy_err, expected, rtol=0, atol=0)
    assert full.policy_pred.requires_grad and not full.ref_pred.requires_grad
    assert full.target.shape == full.policy_pred.shape == (4, 4, 8, 8)


@pytest.mark.parametrize("name", loss_names(online=False))
def test_every_loss_sends_gradient_to_the_policy_only(tiny, name):
    """Through the real UNets (with the safeguard where it applies): the policy gets gradient,
    the reference none; losses without a reference get no reference forward."""
    spec = get_spec(name)
    options = {"beta": 10.0, "winner_preserving_mu": 0.5}
    needs = requirements(name, options)
    group = 2 if spec.pairwise else 1
    pixels = torch.rand(2 * group, 3, 64, 64) * 2 - 1
    cond = tiny.family.condition(["a", "b"], [(64, 64)] * 2 * group, [(0, 0)] * 2 * group)
    reference = tiny.reference if needs.reference else None
    out = denoise(tiny.policy, reference, tiny.latent_encoder, tiny.noise_scheduler, cond,
                  pixels, group, 0, 0, nullcontext, keep_predictions=needs.predictions)  # fmt: skip
    assert (out.ref_err is None) == (not spec.needs_reference)
    labels = None if spec.pairwise else torch.tensor([1.0, 0.0])
    tiny.policy.zero_grad(set_to_none=True)
    loss, _ = build_loss(name, options)(out.policy_err, out.ref_err, labels=labels,
                                        policy_pred=out.policy_pred, ref_pred=out.ref_pred,
                                        target=out.target)  # fmt: skip
    loss.backward()
    assert all(p.grad is None for p in tiny.reference.parameters())
    assert sum(p.grad.abs().sum() for p in tiny.policy.parameters() if p.grad is not None) > 0
