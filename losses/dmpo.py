"""DMPO (arXiv 2507.07510): the KL divergence from the implied preference probability to a
target probability 1 - alpha, on the common diffusion margin.

    u(k) = beta / 2 * ( g(chosen k) - g(rejected k) ),   p = sigmoid(u)
    L    = mean_k [ p (log p - log(1 - alpha)) + (1 - p) (log(1 - p) - log alpha) ]
         = mean_k KL( Bern(p) || Bern(1 - alpha) )

The loss is zero, with zero gradient, at u* = log((1 - alpha) / alpha); log p and log(1 - p) are
-softplus(-u) and -softplus(u), exact for large |u|. Defaults from the released launcher
(AIDC-AI/Diffusion-SDPO, scripts/train/sd15_dmpo.sh): beta 2000, alpha 0.01.
"""

import math

import torch
import torch.nn.functional as F

from losses.common import LossFn, margin_loss
from losses.registry import Option, register

DMPO_BETA = 2000.0  # released launcher: --beta_dpo 2000 (same beta/2 convention as ours)
DMPO_ALPHA = 0.01  # released launcher: --dmpo_alpha 0.01, i.e. target probability 0.99


def dmpo_target_margin(alpha: float) -> float:
    """The margin u* at which p = 1 - alpha: the loss's minimum."""
    return math.log((1.0 - alpha) / alpha)


@register(
    "dmpo",
    pairwise=True,
    needs_reference=True,
    help="DMPO: KL(Bern(sigmoid(u)) || Bern(1 - dmpo_alpha)) on the DPO margin u",
    options={
        "dmpo_alpha": Option(
            "dmpo: the target preference probability is 1 - alpha; in (0, 1), released 0.01",
            lambda alpha: 0.0 < alpha < 1.0,
            "in (0, 1)",
        )
    },
)
def dmpo_loss(beta: float = DMPO_BETA, dmpo_alpha: float = DMPO_ALPHA) -> LossFn:
    if not 0.0 < dmpo_alpha < 1.0:
        raise ValueError(f"dmpo_alpha must be in (0, 1), got {dmpo_alpha}")
    log_target, log_other = math.log1p(-dmpo_alpha), math.log(dmpo_alpha)

    def kl_to_target(margin: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(margin)
        log_p, log_1mp = -F.softplus(-margin), -F.softplus(margin)
        return p * (log_p - log_target) + (1 - p) * (log_1mp - log_other)

    return margin_loss("dmpo", beta, kl_to_target)
