"""Every registered loss against hand-computed values, at and away from policy == reference,
with the gradient signs and targets each one's form implies; the safeguard; the registry."""

import math

import pytest
import torch

from losses import build_loss, get_loss, get_spec, loss_names, requirements, unused_options
from losses.dmpo import dmpo_target_margin
from losses.ipo import IPO_TARGET_MARGIN
from losses.safeguard import winner_preserving, winner_preserving_lambda

LOG2 = math.log(2.0)
E = math.e


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def pix(*values: float) -> torch.Tensor:
    """One number per sample as a [N, 1, 1, 1] per-pixel tensor."""
    return t(*values).view(-1, 1, 1, 1)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# Pairs used by several cases: policy [1, 2 | 3, 1], reference [2, 2 | 2, 2], beta 1.
# g = ref - policy = [1, 0 | -1, 1]; rewards beta/2 g = [.5, 0 | -.5, .5]; margins u = [1, -.5].
PAIRS = {"policy_err": t(1, 2, 3, 1), "ref_err": t(2, 2, 2, 2)}
P1, P2 = 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(0.5))  # sigmoid(u) of the two pairs
MAPO_MARGIN = 1 / (1 + E)  # s(1) - s(2) = 1/(e-1) - 2/(e^2-1) = 1/(e+1) with gamma = 1

# name -> (hyperparameters, inputs, expected loss), each worked by hand.
HAND_CASES = {
    # L = (log(1 + e^-1) + log(1 + e^.5)) / 2 = (0.313262 + 0.974077) / 2
    "dpo": ({"beta": 1.0}, PAIRS, 0.6436693),
    # L = ((1 - .5)^2 + (-.5 - .5)^2) / 2 = (.25 + 1) / 2
    "ipo": ({"beta": 1.0}, PAIRS, 0.625),
    # L = (max(0, 1 - 1) + max(0, 1 + .5)) / 2
    "hinge": ({"beta": 1.0}, PAIRS, 0.75),
    # alpha = 1/2: KL(Bern(p) || Bern(1/2)) = log 2 + p log p + (1 - p) log(1 - p) per pair
    "dmpo": (
        {"beta": 1.0, "dmpo_alpha": 0.5},
        PAIRS,
        sum(LOG2 + p * math.log(p) + (1 - p) * math.log(1 - p) for p in (P1, P2)) / 2,
    ),
    # One pair, one pixel: target 0, policy [1 | 1], reference [2 | 0]; errors [1 | 1], [4 | 0];
    # g = [3 | -1], u = 2/2 * 4 = 4; r = (1 - 0) - 2 (1 - sigmoid(4)) (1 - 2); L = r^2
    "dspo": (
        {"beta": 2.0},
        {
            "policy_err": t(1, 1),
            "ref_err": t(4, 0),
            "policy_pred": pix(1, 1),
            "ref_pred": pix(2, 0),
            "target": pix(0, 0),
        },
        (1 + 2 * (1 - 1 / (1 + math.exp(-4)))) ** 2,
    ),
    # err_w = [1, 2], err_l = [2, 1], gamma 1, T 1: margins +-1/(e+1);
    # L = mean(err_w) - mean log sigmoid(m) = 1.5 + (softplus(-m) + softplus(m)) / 2
    "mapo": (
        {"beta": 1.0, "snr_value": 1.0, "num_train_timesteps": 1},
        {"policy_err": t(1, 2, 2, 1)},
        1.5 + (softplus(-MAPO_MARGIN) + softplus(MAPO_MARGIN)) / 2,
    ),
    # g = [2, -1, 1], z = 2/3; x = [4/3, 5/3, 1/3]; L = mean(sigmoid(-x))
    "kto": (
        {"beta": 1.0},
        {"policy_err": t(0, 3, 1), "ref_err": t(2, 2, 2), "labels": t(1, 0, 1)},
        0.2616358,
    ),
    # chosen half of [1, 2 | 3, 4] -> mean(1, 2)
    "sft": ({}, {"policy_err": t(1, 2, 3, 4)}, 1.5),
}


def call(name: str, hyper: dict, inputs: dict):
    inputs = dict(inputs)
    return get_loss(name, **hyper)(inputs.pop("policy_err"), inputs.pop("ref_err", None), **inputs)


def test_every_registered_loss_has_a_hand_computed_case():
    assert set(loss_names(online=False)) == set(HAND_CASES) == set(AT_REFERENCE)


@pytest.mark.parametrize("name", loss_names(online=False))
def test_hand_computed_value(name):
    hyper, inputs, expected = HAND_CASES[name]
    loss, metrics = call(name, hyper, inputs)
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert all(isinstance(v, float) for v in metrics.values())


# At policy == reference (MaPO has no reference: at err_w == err_l), per-pair errors
# [.5, .3 | .4, .6], beta 2, B = 2 pairs: -> (hyperparameters, extra inputs, value, dL/dpolicy_err)
# For the losses of u: dL/dpolicy_w = (1/B) dL/du (-beta/2) = -dL/du / 2, and the opposite on
# the rejected side.
ERR = t(0.5, 0.3, 0.4, 0.6)
DMPO_ALPHA_E = 1 / (1 + E)  # u* = log((1 - a)/a) = 1
GAMMA = 0.5


def score_slope(e: float, gamma: float) -> float:
    """d s / d e for s(e) = x / (e^x - 1), x = gamma e."""
    x = gamma * e
    return gamma * ((math.exp(x) - 1) - x * math.exp(x)) / (math.exp(x) - 1) ** 2


AT_REFERENCE = {
    # dL/du = -sigmoid(0) = -1/2
    "dpo": ({"beta": 2.0}, {}, LOG2, t(0.25, 0.25, -0.25, -0.25)),
    # L = (0 - 1/2)^2, dL/du = 2 (0 - 1/2) = -1
    "ipo": ({"beta": 2.0}, {}, 0.25, t(0.5, 0.5, -0.5, -0.5)),
    # L = 1 - 0, dL/du = -1
    "hinge": ({"beta": 2.0}, {}, 1.0, t(0.5, 0.5, -0.5, -0.5)),
    # p = 1/2: L = log(1/2) - log(a (1 - a)) / 2; dL/du = (u - u*) p (1 - p) = -1/4
    "dmpo": (
        {"beta": 2.0, "dmpo_alpha": DMPO_ALPHA_E},
        {},
        -LOG2 - 0.5 * math.log(DMPO_ALPHA_E * (1 - DMPO_ALPHA_E)),
        t(0.125, 0.125, -0.125, -0.125),
    ),
    # policy_pred_w = ref_pred_w: r = policy_pred_w - target_w, L = mean chosen error, and
    # dL/du carries the factor (policy_pred_w - ref_pred_w) = 0: no gradient through the errors.
    "dspo": ({"beta": 0.5}, "preds", (0.5 + 0.3) / 2, t(0, 0, 0, 0)),
    # err_w == err_l: m = 0; L = mean err_w + beta log 2;
    # dL/de_w = 1/B - beta T sigmoid(0) s'(e_w) / B, dL/de_l = beta T sigmoid(0) s'(e_l) / B
    "mapo": (
        {"beta": 0.1, "snr_value": GAMMA, "num_train_timesteps": 10},
        "same",
        (0.5 + 0.3) / 2 + 0.1 * LOG2,
        t(
            *(0.5 - 0.1 * 10 * 0.5 * score_slope(e, GAMMA) / 2 for e in (0.5, 0.3)),
            *(0.1 * 10 * 0.5 * score_slope(e, GAMMA) / 2 for e in (0.5, 0.3)),
        ),
    ),
    # g = 0, z = 0: L = 1 - sigmoid(0); dL/dpolicy_i = s_i beta sigmoid'(0) / B = s_i / 4
    "kto": ({"beta": 2.0}, {"labels": t(1, 0)}, 0.5, t(0.25, -0.25)),
    # mean of the chosen half
    "sft": ({}, {}, 0.4, t(0.5, 0.5, 0, 0)),
}


def at_reference_inputs(name: str) -> tuple[dict, torch.Tensor | None]:
    """Inputs at policy == reference; for dspo also the per-pixel policy prediction."""
    _, extra, _, _ = AT_REFERENCE[name]
    if extra == "same":  # mapo: chosen and rejected errors equal, no reference
        return {"policy_err": t(0.5, 0.3, 0.5, 0.3).requires_grad_(True)}, None
    if extra == "preds":  # per-pixel: 1 pixel per sample, error = pred^2 with target 0
        pred = pix(*(math.sqrt(e) for e in ERR.tolist())).requires_grad_(True)
        policy_err = pred.pow(2).mean(dim=(1, 2, 3))
        inputs = {"policy_err": policy_err, "ref_err": policy_err.detach().clone(),
                  "policy_pred": pred, "ref_pred": pred.detach().clone(),
                  "target": torch.zeros_like(pred)}  # fmt: skip
        return inputs, pred
    n = 2 if "labels" in extra else 4
    err = ERR[:n].clone()
    return {"policy_err": err.clone().requires_grad_(True), "ref_err": err, **extra}, None


@pytest.mark.parametrize("name", loss_names(online=False))
def test_value_and_gradient_at_policy_equals_reference(name):
    hyper, _, expected_value, expected_grad = AT_REFERENCE[name]
    inputs, pred = at_reference_inputs(name)
    policy_err = inputs["policy_err"]
    if pred is not None:
        policy_err.retain_grad()
    loss, metrics = call(name, hyper, inputs)
    loss.backward()
    assert loss.item() == pytest.approx(expected_value, abs=1e-6)
    torch.testing.assert_close(policy_err.grad, expected_grad, atol=1e-6, rtol=1e-5)
    if get_spec(name).pairwise and get_spec(name).needs_reference:
        assert metrics["rewards/accuracies"] == 0.5  # every pair a tie
        assert metrics["rewards/margins"] == 0.0


PAIRWISE = [n for n in loss_names(online=False) if get_spec(n).pairwise]


@pytest.mark.parametrize("name", PAIRWISE)
def test_gradient_signs_at_policy_equals_reference(name):
    """Lowering a chosen error lowers the loss; lowering a rejected error raises it. DSPO's
    rejected side has no effect there, and its chosen prediction moves towards the target."""
    hyper, _, _, _ = AT_REFERENCE[name]
    inputs, pred = at_reference_inputs(name)
    policy_err = inputs["policy_err"]
    if pred is not None:
        policy_err.retain_grad()
    call(name, hyper, inputs)[0].backward()
    chosen, rejected = policy_err.grad.chunk(2)
    if name == "dspo":
        assert torch.equal(rejected, torch.zeros_like(rejected))
        grad_w, grad_l = pred.grad.chunk(2)
        pred_w = pred.detach().chunk(2)[0]
        # dL/dpred_w = 2 r (1 - beta (1 - sigmoid(0))) / B with r = pred_w - 0, beta 1/2
        torch.testing.assert_close(grad_w, 2 * pred_w * (1 - 0.25) / 2)
        assert (grad_w * pred_w > 0).all()  # descending moves pred_w towards the target 0
        assert torch.equal(grad_l, torch.zeros_like(grad_l))
    else:
        assert (chosen > 0).all() and (rejected < 0).all()


@pytest.mark.parametrize(
    ("name", "hyper", "target_margin"),
    [
        ("ipo", {"beta": 2.0}, IPO_TARGET_MARGIN),
        ("dmpo", {"beta": 2.0, "dmpo_alpha": 0.01}, dmpo_target_margin(0.01)),
    ],
)
def test_regression_losses_stop_at_their_target_margin(name, hyper, target_margin):
    """Zero gradient at the target margin; below it the chosen error is pushed down, beyond it
    back up (IPO and DMPO regress the margin instead of pushing it without bound)."""

    def chosen_gradient(margin: float) -> float:
        # beta 2, one pair: u = g_w - g_l = margin with ref [1, 1], policy [1 - margin, 1]
        policy = t(1 - margin, 1).requires_grad_(True)
        get_loss(name, **hyper)(policy, t(1, 1))[0].backward()
        return policy.grad[0].item()

    assert chosen_gradient(target_margin) == pytest.approx(0.0, abs=1e-5)
    assert chosen_gradient(target_margin - 0.3) > 1e-3
    assert chosen_gradient(target_margin + 0.3) < -1e-3


def test_hinge_has_no_gradient_past_its_margin():
    policy = t(0, 1).requires_grad_(True)  # g = [1 | 0], u = 3/2 * 1 = 1.5 > 1
    get_loss("hinge", beta=3.0)(policy, t(1, 1))[0].backward()
    assert torch.equal(policy.grad, torch.zeros(2))


@pytest.mark.parametrize("name", loss_names(online=False))
def test_gradients_reach_policy_errors(name):
    # The reference errors come from a no_grad forward (tests/test_diffusion.py checks that).
    hyper, inputs, _ = HAND_CASES[name]
    inputs = dict(inputs)
    policy = inputs["policy_err"].clone().requires_grad_(True)
    inputs["policy_err"] = policy
    loss, _ = call(name, hyper, inputs)
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


@pytest.mark.parametrize("name", [n for n in PAIRWISE if get_spec(n).needs_reference])
def test_every_pairwise_loss_logs_the_dpo_vocabulary_from_the_common_margin(name):
    hyper = {"beta": 1.0}
    inputs = {**PAIRS, "policy_pred": pix(0, 0, 0, 0), "ref_pred": pix(0, 0, 0, 0),
              "target": pix(0, 0, 0, 0)}  # fmt: skip
    _, metrics = call(name, hyper, inputs)
    _, dpo_metrics = get_loss("dpo", **hyper)(PAIRS["policy_err"], PAIRS["ref_err"])
    assert metrics == dpo_metrics


def test_mapo_metrics_by_hand():
    hyper, inputs, _ = HAND_CASES["mapo"]
    _, metrics = call("mapo", hyper, inputs)
    assert metrics["mapo/margins"] == pytest.approx(0.0, abs=1e-7)  # +m and -m
    assert metrics["rewards/accuracies"] == 0.5  # one pair each way
    assert metrics["err/chosen"] == 1.5 and metrics["err/rejected"] == 1.5


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


def test_dpo_label_smoothing_and_soft_labels_by_hand():
    # u = [1, -.5]; q = 1 - eps = .9: L_k = -.9 log sigmoid(u) - .1 log sigmoid(-u)
    loss, _ = get_loss("dpo", beta=1.0, label_smoothing=0.1)(**PAIRS)
    expected = sum(0.9 * softplus(-u) + 0.1 * softplus(u) for u in (1.0, -0.5)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # Soft labels p = [1, 0]: the second pair counts as preferring its "rejected" image.
    loss, _ = get_loss("dpo", beta=1.0)(**PAIRS, labels=t(1, 0))
    assert loss.item() == pytest.approx((softplus(-1.0) + softplus(-0.5)) / 2, abs=1e-6)
    # Smoothing applies to soft labels too: p = .8, eps = .25 -> q = .75 * .8 + .25 * .2 = .65
    loss, _ = get_loss("dpo", beta=1.0, label_smoothing=0.25)(**PAIRS, labels=t(0.8, 0.8))
    expected = sum(0.65 * softplus(-u) + 0.35 * softplus(u) for u in (1.0, -0.5)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # p = 1/2 (no preference): no gradient at policy == reference.
    err = t(0.5, 0.3, 0.4, 0.6).requires_grad_(True)
    get_loss("dpo", beta=2.0)(err, err.detach().clone(), labels=t(0.5, 0.5))[0].backward()
    assert torch.equal(err.grad, torch.zeros(4))


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="even"):
        get_loss("dpo")(t(1, 2, 3), t(1, 2, 3))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        get_loss("dpo")(t(1, 2), t(1, 2), labels=t(2))
    with pytest.raises(ValueError, match="soft labels must be"):
        get_loss("dpo")(t(1, 2), t(1, 2), labels=t(1, 0))
    for name in ("ipo", "hinge", "dmpo", "dspo", "mapo"):
        with pytest.raises(ValueError, match="labels"):
            get_loss(name)(t(1, 2), t(1, 2), labels=t(1))
    with pytest.raises(ValueError, match="per-pixel predictions"):
        get_loss("dspo")(t(1, 2), t(1, 2))
    with pytest.raises(ValueError, match="reference errors"):
        get_loss("ipo")(t(1, 2))
    with pytest.raises(ValueError, match="label_smoothing"):
        get_loss("dpo", label_smoothing=0.5)
    with pytest.raises(ValueError, match="dmpo_alpha"):
        get_loss("dmpo", dmpo_alpha=1.0)


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


# --- The Diffusion-SDPO safeguard ---
# One pair of two pixels, target 0. Chosen prediction [1, 1]; gA = 2 [1, 1] / 2 = [1, 1],
# |gA|^2 = 2. Rejected [1, 0]: gB = [1, 0], gB . gA = 1 > 0, so lambda = (1 - mu) 2 / (1 + 1e-9).
CHOSEN = [1.0, 1.0]


def safeguard_inputs(rejected: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pred = t(*CHOSEN, *rejected).view(2, 1, 1, 2).requires_grad_(True)
    target = torch.zeros_like(pred)
    return pred, target, (pred - target).pow(2).mean(dim=(1, 2, 3))


@pytest.mark.parametrize(
    ("rejected", "mu", "expected_lambda"),
    [
        ([1.0, 0.0], 0.9, 0.1 * 2 / (1 + 1e-9)),  # lambda < 1
        ([1.0, 0.0], 0.25, 1.0),  # (1 - mu) 2 = 1.5: clamped to 1
        ([-1.0, 0.0], 0.9, 1.0),  # gB . gA = -1 <= 0: unconstrained
    ],
)
def test_safeguard_keeps_values_and_scales_the_rejected_gradient(rejected, mu, expected_lambda):
    pred, target, policy_err = safeguard_inputs(rejected)
    lam = winner_preserving_lambda(pred, target, mu)
    assert lam.item() == pytest.approx(expected_lambda, rel=1e-6)
    guarded = winner_preserving(policy_err, pred, target, mu)
    assert torch.equal(guarded, policy_err)  # forward values unchanged
    err = policy_err.detach().requires_grad_(True)
    winner_preserving(err, pred, target, mu).backward(t(1.0, 1.0))
    torch.testing.assert_close(err.grad, t(1.0, expected_lambda))


def test_safeguarded_dpo_equals_dpo_forward_and_rescales_its_rejected_gradient():
    pred, target, policy_err = safeguard_inputs([1.0, 0.0])  # lambda = 0.2
    ref_err = policy_err.detach() + t(0.1, -0.2)
    options = {"beta": 2.0, "winner_preserving_mu": 0.9}
    guarded, plain = build_loss("dpo", options), get_loss("dpo", beta=2.0)
    loss_g, metrics_g = guarded(policy_err, ref_err, policy_pred=pred, target=target)
    (grad_g,) = torch.autograd.grad(loss_g, pred, retain_graph=True)
    loss_p, metrics_p = plain(policy_err, ref_err)
    (grad_p,) = torch.autograd.grad(loss_p, pred)
    assert loss_g.item() == loss_p.item()
    assert metrics_g.pop("safeguard/lambda") == pytest.approx(0.2)
    assert metrics_g == metrics_p
    torch.testing.assert_close(grad_g[0], grad_p[0])  # the chosen half is untouched
    torch.testing.assert_close(grad_g[1], 0.2 * grad_p[1])
    assert grad_p[1].abs().sum() > 0


def test_safeguard_rejects_mu_outside_0_1():
    pred, target, _ = safeguard_inputs([1.0, 0.0])
    with pytest.raises(ValueError, match="winner_preserving_mu"):
        winner_preserving_lambda(pred, target, 1.5)


# --- The registry ---


def test_requirements_come_from_the_registry_entry():
    assert requirements("dpo", {}) == requirements("dpo", {"winner_preserving_mu": None})
    assert not requirements("dpo", {}).predictions
    assert requirements("dpo", {"winner_preserving_mu": 0.9}).predictions
    assert requirements("dspo", {}).predictions
    for name in ("mapo", "sft"):
        assert not requirements(name, {}).reference
    # The safeguard applies to pairwise losses with a reference only.
    assert not requirements("mapo", {"winner_preserving_mu": 0.9}).predictions
    assert not requirements("kto", {"winner_preserving_mu": 0.9}).predictions


def test_unused_options_name_the_flags_a_loss_ignores():
    given = {"beta", "label_smoothing", "dmpo_alpha", "winner_preserving_mu", "learning_rate"}
    assert unused_options("dpo", given) == ["dmpo_alpha"]
    ignored_by_mapo = ["dmpo_alpha", "label_smoothing", "winner_preserving_mu"]
    assert unused_options("mapo", given) == ignored_by_mapo
    assert unused_options("sft", {"beta"}) == ["beta"]


def test_build_loss_takes_only_accepted_options():
    options = {"beta": 2.0, "kto_utility": "loss_averse", "lambda_desirable": 1.0, "lr": 1e-5}
    loss, _ = build_loss("dpo", options)(t(1, 2, 3, 1), t(2, 2, 2, 2))
    assert loss.item() == pytest.approx(
        (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1))) / 2, abs=1e-6
    )
    # None leaves the loss's released default: ipo's beta 5000, so g_w = 4e-4 gives u = 1.
    loss, _ = build_loss("ipo", {"beta": None})(t(1, 2), t(1.0004, 2))
    assert loss.item() == pytest.approx((1 - 0.5) ** 2, rel=1e-3)
    with pytest.raises(TypeError):
        get_loss("dpo", lr=1e-5)
    with pytest.raises(KeyError, match="registered"):
        get_spec("orpo")
