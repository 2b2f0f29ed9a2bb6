"""Hinge (SLiC-style, Zhao et al. 2023, arXiv 2305.10425) on the common diffusion margin.

    u(k) = beta / 2 * ( g(chosen k) - g(rejected k) )
    L    = mean_k max(0, 1 - u(k))

The diffusers research example (examples/research_projects/diffusion_dpo) writes
relu(1 - beta' dg) with beta' = beta/2: identical.
"""

import torch

from losses.common import no_labels, pair_metrics, pair_rewards, require
from losses.dpo import DPO_BETA
from losses.registry import LossFn, register

# The hinge's margin: pairs with u >= 1 contribute no gradient.
HINGE_MARGIN = 1.0


@register(
    "hinge",
    pairwise=True,
    needs_reference=True,
    help="hinge (SLiC): max(0, 1 - u) on the DPO margin u (beta/2 convention)",
)
def hinge_loss(beta: float = DPO_BETA) -> LossFn:
    def loss_fn(
        policy_err: torch.Tensor,
        ref_err: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        policy_pred: torch.Tensor | None = None,
        ref_pred: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """policy_err, ref_err: [2B] chosen first."""
        no_labels(labels, "hinge")
        ref_err = require(ref_err, "reference errors", "hinge")
        chosen, rejected, margin = pair_rewards(policy_err, ref_err, beta)
        loss = torch.relu(HINGE_MARGIN - margin).mean()
        return loss, pair_metrics(chosen, rejected, margin, policy_err, ref_err)

    return loss_fn
