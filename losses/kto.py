"""Diffusion-KTO (Li et al. 2024, arXiv 2404.04465).

    g      = ref_err - policy_err                          per image
    z_ref  = max(0, mean of g over the global batch)        detached, averaged across processes
    L      = mean_i lambda_{y_i} * ( -U( s_i * beta * (g_i - z_ref) ) ),   s = +1 / -1

The loss is the negated utility, shifted by a constant where that keeps it positive (the
Kahneman-Tversky form is written 1 - sigmoid, as in the released code). No 1/2 factor, unlike DPO.
Rewards in the metrics are beta * g, and ``kl`` is beta * z_ref, in the same units.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from losses.common import (
    LossFn,
    LossInputs,
    LossResult,
    global_mean,
    loss_function,
    masked_mean,
    require,
    win_rate,
)
from losses.registry import Option, register

# Diffusion-KTO paper: beta = 5000 (the released code's default is 1000).
KTO_BETA = 5000.0


def _kahneman_tversky(x: torch.Tensor) -> torch.Tensor:
    return 1.0 - torch.sigmoid(x)  # U(x) = sigmoid(x): the paper's default and best


def _loss_averse(x: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(x)  # U(x) = log sigmoid(x)


def _risk_seeking(x: torch.Tensor) -> torch.Tensor:
    return F.logsigmoid(-x)  # U(x) = -log sigmoid(-x)


# Utility variants compared in the Diffusion-KTO paper, as losses of the utility argument.
KTO_UTILITIES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "kahneman_tversky": _kahneman_tversky,
    "loss_averse": _loss_averse,
    "risk_seeking": _risk_seeking,
}


@register(
    "kto",
    pairwise=False,
    needs_reference=True,
    help="Diffusion-KTO on per-image desirable/undesirable labels",
    options={
        "kto_utility": Option("KTO utility function", choices=tuple(sorted(KTO_UTILITIES))),
        "lambda_desirable": Option("KTO weight of desirable samples"),
        "lambda_undesirable": Option("KTO weight of undesirable samples"),
    },
)
def kto_loss(
    beta: float = KTO_BETA,
    kto_utility: str = "kahneman_tversky",
    lambda_desirable: float = 1.0,
    lambda_undesirable: float = 1.0,
) -> LossFn:
    if kto_utility not in KTO_UTILITIES:
        raise ValueError(
            f"unknown kto_utility {kto_utility!r}; choose from {sorted(KTO_UTILITIES)}"
        )
    utility_loss = KTO_UTILITIES[kto_utility]

    @loss_function
    def loss_fn(inputs: LossInputs) -> LossResult:
        """policy_err, ref_err, labels: [B] (labels 1 desirable, 0 undesirable)."""
        policy_err, ref_err, labels = inputs.policy_err, inputs.ref_err, inputs.labels
        labels = require(labels, "per-image labels", "kto")
        ref_err = require(ref_err, "reference errors", "kto")
        desirable = labels > 0.5
        g = ref_err - policy_err  # [B]
        z_ref = global_mean(g).clamp(min=0)  # detached: the reference point gets no gradient
        sign = torch.where(desirable, 1.0, -1.0).to(g)
        x = sign * beta * (g - z_ref)
        weight = torch.where(desirable, lambda_desirable, lambda_undesirable).to(g)
        loss = (weight * utility_loss(x)).mean()
        reward = (beta * g).detach()
        metrics = {
            "rewards/desirable": masked_mean(reward, desirable),
            "rewards/undesirable": masked_mean(reward, ~desirable),
            "rewards/accuracies": win_rate(x.detach()),
            "kl": (beta * z_ref).item(),
            "err/policy": policy_err.mean().item(),
            "err/ref": ref_err.mean().item(),
        }
        return loss, metrics

    return loss_fn
