"""Every registered loss against hand-computed values, plus the DPO invariants."""

import math

import pytest
import torch

from losses import build_loss, get_loss, get_spec, loss_names

LOG2 = math.log(2.0)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# name -> (hyperparameters, policy_err, ref_err, labels, expected loss), each worked by hand.
HAND_CASES = {
    # g = ref - policy = [1, 0 | -1, 1]; rewards beta/2*g = [.5, 0 | -.5, .5]; margins [1, -.5]
    # L = (log(1 + e^-1) + log(1 + e^.5)) / 2 = (0.313262 + 0.974077) / 2
    "dpo": ({"beta": 1.0}, t(1, 2, 3, 1), t(2, 2, 2, 2), None, 0.6436693),
    # g = [2, -1, 1], z = 2/3; x = [4/3, 5/3, 1/3]; L = mean(sigmoid(-x))
    "kto": ({"beta": 1.0}, t(0, 3, 1), t(2, 2, 2), t(1, 0, 1), 0.2616358),
    # chosen half of [1, 2 | 3, 4] -> mean(1, 2)
    "sft": ({}, t(1, 2, 3, 4), None, None, 1.5),
}


def test_every_registered_loss_has_a_hand_computed_case():
    assert set(loss_names()) == set(HAND_CASES)


@pytest.mark.parametrize("name", loss_names())
def test_hand_computed_value(name):
    hyper, policy, ref, labels, expected = HAND_CASES[name]
    loss, metrics = get_loss(name, **hyper)(policy, ref, labels=labels)
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert all(isinstance(v, float) for v in metrics.values())


@pytest.mark.parametrize("name", loss_names())
def test_gradients_reach_policy_errors(name):
    # The reference errors come from a no_grad forward (tests/test_diffusion.py checks that).
    hyper, policy, ref, labels, _ = HAND_CASES[name]
    policy = policy.clone().requires_grad_(True)
    loss, _ = get_loss(name, **hyper)(policy, ref, labels=labels)
    loss.backward()
    assert policy.grad is not None and torch.isfinite(policy.grad).all()
    assert policy.grad.abs().sum() > 0


def test_dpo_metrics_by_hand():
    _, metrics = get_loss("dpo", beta=1.0)(t(1, 2, 3, 1), t(2, 2, 2, 2))
    assert metrics["rewards/chosen"] == pytest.approx(0.25)  # mean(.5, 0)
    assert metrics["rewards/rejected"] == pytest.approx(0.0)  # mean(-.5, .5)
    assert metrics["rewards/margins"] == pytest.approx(0.25)  # mean(1, -.5)
    assert metrics["rewards/accuracies"] == pytest.approx(0.5)
    assert metrics["err/policy"] == pytest.approx(1.75)
    assert metrics["err/ref"] == pytest.approx(2.0)


def test_dpo_is_log2_when_policy_equals_reference():
    err = torch.rand(8)
    loss, metrics = get_loss("dpo", beta=5000.0)(err, err.clone())
    assert loss.item() == pytest.approx(LOG2, abs=1e-7)
    assert metrics["rewards/accuracies"] == 0.5  # every pair is a tie


def test_dpo_sign_policy_better_on_chosen():
    ref = t(0.5, 0.5, 0.5, 0.5)
    policy = t(0.4, 0.45, 0.6, 0.55)  # lower error on chosen, higher on rejected
    policy.requires_grad_(True)
    loss, metrics = get_loss("dpo", beta=10.0)(policy, ref)
    loss.backward()
    assert loss.item() < LOG2
    assert metrics["rewards/accuracies"] == 1.0
    # Lowering a chosen error lowers the loss; lowering a rejected error raises it.
    assert (policy.grad[:2] > 0).all() and (policy.grad[2:] < 0).all()


def test_dpo_mean_is_outside_logsigmoid():
    # Two pairs with margins +2 and -2: -mean(logsigmoid) = log(1+e^-2)/2 + log(1+e^2)/2,
    # not -logsigmoid(mean) = log 2 (the bug of some forks).
    loss, _ = get_loss("dpo", beta=2.0)(t(0, 2, 2, 0), t(1, 1, 1, 1))
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() > LOG2 + 0.1


def test_dpo_rejects_odd_batches_and_labels():
    with pytest.raises(ValueError, match="even"):
        get_loss("dpo")(t(1, 2, 3), t(1, 2, 3))
    with pytest.raises(ValueError, match="labels"):
        get_loss("dpo")(t(1, 2), t(1, 2), labels=t(1, 0))


@pytest.mark.parametrize(
    ("utility", "expected"),
    [
        ("kahneman_tversky", 0.2616358),  # mean sigmoid(-x), x = [4/3, 5/3, 1/3]
        ("loss_averse", 0.3157587),  # mean -log sigmoid(x)
        ("risk_seeking", -1.4268698),  # mean log sigmoid(-x)
    ],
)
def test_kto_utilities_by_hand(utility, expected):
    loss_fn = get_loss("kto", beta=1.0, kto_utility=utility)
    loss, _ = loss_fn(t(0, 3, 1), t(2, 2, 2), labels=t(1, 0, 1))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_kto_reference_point_is_clamped_and_lambda_weighted():
    # g = [-1, -1]: the batch mean is negative, so z_ref = 0; x = [-1, +1].
    # L = (2 * sigmoid(1) + 1 * sigmoid(-1)) / 2
    loss_fn = get_loss("kto", beta=1.0, lambda_desirable=2.0, lambda_undesirable=1.0)
    loss, metrics = loss_fn(t(3, 3), t(2, 2), labels=t(1, 0))
    assert loss.item() == pytest.approx(0.8655293, abs=1e-6)
    assert metrics["kl"] == 0.0
    assert metrics["rewards/desirable"] == pytest.approx(-1.0)
    assert metrics["rewards/undesirable"] == pytest.approx(-1.0)


def test_kto_reference_point_carries_no_gradient():
    beta = 1.0
    policy = t(0, 3, 1).requires_grad_(True)
    loss, metrics = get_loss("kto", beta=beta)(policy, t(2, 2, 2), labels=t(1, 0, 1))
    loss.backward()
    assert metrics["kl"] == pytest.approx(2 / 3)
    # With z_ref constant: dL/dpolicy_i = (1/3) * sigmoid'(x_i) * s_i * beta, since
    # L_i = sigmoid(-x_i), x_i = s_i * beta * (ref_i - policy_i - z).
    z = 2 / 3
    x = torch.tensor([2 - z, 1 + z, 1 - z])
    s = torch.tensor([1.0, -1.0, 1.0])
    expected = torch.sigmoid(x) * torch.sigmoid(-x) * s * beta / 3
    torch.testing.assert_close(policy.grad, expected)


def test_kto_metrics_nan_for_missing_class():
    _, metrics = get_loss("kto", beta=1.0)(t(1, 1), t(2, 2), labels=t(1, 1))
    assert metrics["rewards/desirable"] == pytest.approx(1.0)
    assert math.isnan(metrics["rewards/undesirable"])


def test_sft_uses_desirable_images_only():
    loss, _ = get_loss("sft")(t(1, 5, 3), labels=t(1, 0, 1))
    assert loss.item() == pytest.approx(2.0)
    loss, _ = get_loss("sft")(t(1, 5).requires_grad_(True), labels=t(0, 0))
    assert loss.item() == 0.0 and loss.requires_grad


def test_build_loss_takes_only_accepted_options():
    options = {"beta": 2.0, "kto_utility": "loss_averse", "lambda_desirable": 1.0, "lr": 1e-5}
    loss, _ = build_loss("dpo", options)(t(1, 2, 3, 1), t(2, 2, 2, 2))
    assert loss.item() == pytest.approx(
        (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1))) / 2, abs=1e-6
    )
    with pytest.raises(TypeError):
        get_loss("dpo", lr=1e-5)
    with pytest.raises(KeyError, match="registered"):
        get_spec("ipo")
