"""The Diffusion-SDPO safeguard (Safe-guarded DPO, arXiv 2511.03317; released as
``get_adaptive_lose_l_scale`` in AIDC-AI/Diffusion-SDPO ``train.py``), for any pairwise loss
with a reference.

Over a micro-batch, in output space (chosen half w, rejected half l of the pair batch):

    A = mean over all chosen elements of (policy_pred_w - target_w)^2
    B = mean over all rejected elements of (policy_pred_l - target_l)^2
    gA = dA/dpolicy_pred_w,  gB = dB/dpolicy_pred_l
    lambda = clamp((1 - mu) |gA|^2 / (gB . gA + 1e-9), 0, 1)  if gB . gA > 0,  else 1   (detached)
    err_l' = stopgrad(err_l) + lambda (err_l - stopgrad(err_l))

Forward values are unchanged; only the gradient through the rejected errors shrinks, so that to
first order the chosen samples' error does not rise. mu = 0 still caps lambda at
min(1, |gA|^2 / gB . gA); "off" is not applying the wrapper.
"""

import torch

from losses.common import LossFn, LossInputs, LossResult, loss_function, require, split_pairs

# Released code: the denominator's epsilon and the cap on lambda.
SAFEGUARD_EPS = 1e-9
SAFEGUARD_MAX_LAMBDA = 1.0
# Released launchers' mu: 0.9 for Diffusion-DPO and DMPO, 0.2 for DSPO (SD1.5).
SAFEGUARD_MU_DPO = 0.9
SAFEGUARD_MU_DSPO = 0.2
SAFEGUARD_MU_HELP = (
    "the Diffusion-SDPO safeguard on any pairwise loss with a reference: mu in [0, 1] "
    f"(released launchers: {SAFEGUARD_MU_DPO} for dpo and dmpo, {SAFEGUARD_MU_DSPO} for dspo); "
    "none: off"
)


@torch.no_grad()
def winner_preserving_lambda(
    policy_pred: torch.Tensor, target: torch.Tensor, mu: float
) -> torch.Tensor:
    """policy_pred, target: [2B, C, h, w] chosen first -> lambda, a detached fp32 scalar."""
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"winner_preserving_mu must be in [0, 1], got {mu}")
    diff_w, diff_l = (policy_pred.float() - target.float()).chunk(2)
    grad_a = 2.0 * diff_w / diff_w.numel()  # d mean(diff_w^2) / d pred_w
    grad_b = 2.0 * diff_l / diff_l.numel()
    num = grad_a.pow(2).sum()
    den = (grad_b * grad_a).sum()
    cap = (1.0 - mu) * num / (den + SAFEGUARD_EPS)
    lam = torch.where(den > 0, cap, torch.full_like(cap, SAFEGUARD_MAX_LAMBDA))
    return lam.clamp(0.0, SAFEGUARD_MAX_LAMBDA)


def scale_rejected_gradient(policy_err: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """[2B] -> [2B], same values; the rejected half's gradient is multiplied by ``lam``."""
    chosen, rejected = split_pairs(policy_err)
    frozen = rejected.detach()
    return torch.cat([chosen, frozen + lam * (rejected - frozen)])


def winner_preserving(
    policy_err: torch.Tensor, policy_pred: torch.Tensor, target: torch.Tensor, mu: float
) -> torch.Tensor:
    """policy_err [2B] -> policy_err' [2B]: equal values, rejected gradient scaled by lambda."""
    return scale_rejected_gradient(policy_err, winner_preserving_lambda(policy_pred, target, mu))


def with_winner_preserving(loss_fn: LossFn, mu: float) -> LossFn:
    """``loss_fn`` on safeguarded policy errors; logs ``safeguard/lambda``."""

    @loss_function
    def guarded(inputs: LossInputs) -> LossResult:
        policy_pred, target = inputs.policy_pred, inputs.target
        what = "per-pixel predictions (policy_pred, target)"
        lam = winner_preserving_lambda(
            require(policy_pred, what, "the safeguard"), require(target, what, "the safeguard"), mu
        )
        loss, metrics = loss_fn(
            **inputs._replace(policy_err=scale_rejected_gradient(inputs.policy_err, lam))._asdict()
        )
        return loss, {**metrics, "safeguard/lambda": lam.item()}

    return guarded
