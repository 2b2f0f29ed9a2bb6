"""DSPO (Zhu et al., ICLR 2025): score matching of the chosen sample towards a preference-shifted
score, the SD1.5 form of the released code (huaishengzhu/DSPO; the same in AIDC-AI/Diffusion-SDPO
``train.py``).

    u(k) = beta / 2 * ( g(chosen k) - g(rejected k) )
    r_k  = (policy_pred_w - target_w) - beta (1 - sigmoid(u(k))) (policy_pred_w - ref_pred_w)
    L    = mean_k mean_CHW r_k^2

Over the chosen half only; no stop-gradient anywhere, as released. The rejected sample enters
through u alone, so at policy == reference (policy_pred_w = ref_pred_w) it has no effect. The
released SDXL launcher uses beta 5000 with a different branch (a threshold on the policy-reference
gap); only the SD1.5 form is implemented here.
"""

import torch

from losses.common import (
    LossFn,
    LossInputs,
    LossResult,
    loss_function,
    no_labels,
    pair_metrics,
    pair_rewards,
    require,
)
from losses.registry import register

DSPO_BETA = 0.001  # released SD1.5 launcher (AIDC-AI/Diffusion-SDPO scripts/train/sd15_dspo.sh)


@register(
    "dspo",
    pairwise=True,
    needs_reference=True,
    needs_predictions=True,
    help="DSPO (SD1.5 form): regresses the chosen prediction to a preference-shifted score",
)
def dspo_loss(beta: float = DSPO_BETA) -> LossFn:
    @loss_function
    def loss_fn(inputs: LossInputs) -> LossResult:
        """policy_err, ref_err: [2B]; policy_pred, ref_pred, target: [2B, C, h, w]; chosen first."""
        policy_err, ref_err, labels, policy_pred, ref_pred, target = inputs
        no_labels(labels, "dspo")
        ref_err = require(ref_err, "reference errors", "dspo")
        what = "per-pixel predictions (policy_pred, ref_pred, target)"
        policy_w = chosen_half(require(policy_pred, what, "dspo"))
        ref_w = chosen_half(require(ref_pred, what, "dspo"))
        target_w = chosen_half(require(target, what, "dspo"))
        chosen, rejected, margin = pair_rewards(policy_err, ref_err, beta)
        shift = beta * (1 - torch.sigmoid(margin)).view(-1, 1, 1, 1)
        residual = (policy_w.float() - target_w.float()) - shift * (
            policy_w.float() - ref_w.float()
        )
        loss = residual.pow(2).mean(dim=(1, 2, 3)).mean()
        return loss, pair_metrics(chosen, rejected, margin, policy_err, ref_err)

    return loss_fn


def chosen_half(values: torch.Tensor) -> torch.Tensor:
    """[2B, C, h, w] -> the chosen half [B, C, h, w]."""
    if values.ndim != 4 or values.shape[0] % 2:
        raise ValueError(f"per-pixel predictions must be [2B, C, h, w], got {tuple(values.shape)}")
    return values.chunk(2)[0]
