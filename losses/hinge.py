"""Hinge (SLiC-style, Zhao et al. 2023, arXiv 2305.10425) on the common diffusion margin.

    u(k) = beta / 2 * ( g(chosen k) - g(rejected k) )
    L    = mean_k max(0, 1 - u(k))

The diffusers research example (examples/research_projects/diffusion_dpo) writes
relu(1 - beta' dg) with beta' = beta/2: identical.
"""

import torch

from losses.common import LossFn, margin_loss
from losses.dpo import DPO_BETA
from losses.registry import register

# The hinge's margin: pairs with u >= 1 contribute no gradient.
HINGE_MARGIN = 1.0


HINGE_HELP = "hinge (SLiC): max(0, 1 - u) on the DPO margin u (beta/2 convention)"


@register("hinge", pairwise=True, needs_reference=True, help=HINGE_HELP)
def hinge_loss(beta: float = DPO_BETA) -> LossFn:
    return margin_loss("hinge", beta, lambda margin: torch.relu(HINGE_MARGIN - margin))
