"""Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908), released-code convention, with
conservative DPO's label smoothing and soft preference labels.

    u(k) = beta / 2 * ( g(chosen k) - g(rejected k) ),   g = ref_err - policy_err
    q(k) = (1 - eps) p(k) + eps (1 - p(k))
    L    = - mean_k [ q log sigmoid(u(k)) + (1 - q) log sigmoid(-u(k)) ]

p(k) is the probability that the chosen image of pair k is preferred (1 when no labels are
given); eps is cDPO's label smoothing (Mitchell 2023; TRL's ``label_smoothing``). With p = 1 and
eps = 0 this is plain Diffusion-DPO. The 1/2 is explicit, as in the released training script
(forks that drop it use beta = 2500 for the same loss). The batch mean is outside the
log-sigmoid (one term per pair).
"""

import torch
import torch.nn.functional as F

from losses.common import (
    LossFn,
    LossInputs,
    LossResult,
    loss_function,
    pair_metrics,
    pair_rewards,
    require,
)
from losses.registry import Option, register

# Released Diffusion-DPO code, SD1.5 and SDXL: --beta_dpo 5000.
DPO_BETA = 5000.0
# Released code: the loss is -logsigmoid(-0.5 * beta * (model_diff - ref_diff)).
DPO_HALF = 0.5
# Plain DPO: no label smoothing.
DPO_LABEL_SMOOTHING = 0.0


def preference_targets(
    labels: torch.Tensor | None, num_pairs: int, label_smoothing: float
) -> torch.Tensor | float:
    """q(k): soft labels p [B] in [0, 1] (None: 1), smoothed towards 1/2 by ``label_smoothing``."""
    if labels is None:
        return 1.0 - label_smoothing
    if labels.shape != (num_pairs,):
        raise ValueError(f"soft labels must be [B] = [{num_pairs}], got {tuple(labels.shape)}")
    if bool(((labels < 0) | (labels > 1)).any()):
        raise ValueError("soft labels are preference probabilities: each must be in [0, 1]")
    return (1.0 - label_smoothing) * labels + label_smoothing * (1.0 - labels)


@register(
    "dpo",
    pairwise=True,
    needs_reference=True,
    soft_labels=True,
    help="Diffusion-DPO on chosen/rejected pairs (beta/2 convention of the released code; "
    "--label_smoothing: conservative DPO; soft labels p per pair)",
    options={
        "label_smoothing": Option(
            "dpo: conservative-DPO label smoothing eps in [0, 0.5) "
            "(cDPO, Mitchell 2023; 0: plain DPO)",
            lambda eps: 0.0 <= eps < 0.5,
            "in [0, 0.5)",
        )
    },
)
def dpo_loss(beta: float = DPO_BETA, label_smoothing: float = DPO_LABEL_SMOOTHING) -> LossFn:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")

    @loss_function
    def loss_fn(inputs: LossInputs) -> LossResult:
        """policy_err, ref_err: [2B] chosen first; labels: optional soft preferences p [B]."""
        policy_err, ref_err, labels = inputs.policy_err, inputs.ref_err, inputs.labels
        ref_err = require(ref_err, "reference errors", "dpo")
        chosen, rejected, margin = pair_rewards(policy_err, ref_err, beta)
        q = preference_targets(labels, margin.numel(), label_smoothing)
        if isinstance(q, float) and q == 1.0:
            loss = -F.logsigmoid(margin).mean()
        else:
            loss = -(q * F.logsigmoid(margin) + (1 - q) * F.logsigmoid(-margin)).mean()
        return loss, pair_metrics(chosen, rejected, margin, policy_err, ref_err)

    return loss_fn
