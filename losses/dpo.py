"""Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908), released-code convention.

    u(k) = beta / 2 * ( g(chosen k) - g(rejected k) ),   g = ref_err - policy_err
    L    = - mean_k log sigmoid(u(k))

The 1/2 is explicit, as in the released training script (forks that drop it use beta = 2500 for
the same loss). The batch mean is outside the log-sigmoid (one term per pair).
"""

import torch
import torch.nn.functional as F

from losses.common import split_pairs, win_rate
from losses.registry import LossFn, register

# Released Diffusion-DPO code, SD1.5 and SDXL: --beta_dpo 5000.
DPO_BETA = 5000.0
# Released code: the loss is -logsigmoid(-0.5 * beta * (model_diff - ref_diff)).
DPO_HALF = 0.5


@register(
    "dpo",
    pairwise=True,
    needs_reference=True,
    help="Diffusion-DPO on chosen/rejected pairs (beta/2 convention of the released code)",
)
def dpo_loss(beta: float = DPO_BETA) -> LossFn:
    def loss_fn(
        policy_err: torch.Tensor, ref_err: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """policy_err, ref_err: [2B] chosen first. Returns the scalar loss and metrics."""
        if labels is not None:
            raise ValueError("dpo is pairwise: it takes no labels")
        reward = DPO_HALF * beta * (ref_err - policy_err)  # [2B]
        reward_chosen, reward_rejected = split_pairs(reward)
        margin = reward_chosen - reward_rejected  # [B]
        loss = -F.logsigmoid(margin).mean()
        metrics = {
            "rewards/chosen": reward_chosen.mean().item(),
            "rewards/rejected": reward_rejected.mean().item(),
            "rewards/margins": margin.mean().item(),
            "rewards/accuracies": win_rate(margin.detach()),
            "err/policy": policy_err.mean().item(),
            "err/ref": ref_err.mean().item(),
        }
        return loss, metrics

    return loss_fn
