"""IPO (Azar et al. 2023, arXiv 2310.12036) on the common diffusion margin.

    u(k) = beta / 2 * ( g(chosen k) - g(rejected k) )
    L    = mean_k ( u(k) - 1/2 )^2

IPO regresses the margin to a fixed target instead of pushing it up without bound: the paper's
(h - 1/(2 tau))^2, h the log-ratio margin, is (u - 1/2)^2 / tau^2 with u = tau h (tau playing
DPO's beta). The diffusers research
example (examples/research_projects/diffusion_dpo) writes (dg - 1/(2 beta'))^2 with beta' = beta/2:
the same optimum u = 1/2, scaled by 1/beta'^2.
"""

from losses.common import LossFn, margin_loss
from losses.dpo import DPO_BETA
from losses.registry import register

# IPO's target margin in our units: h = 1/(2 tau) in the paper's (Azar et al. 2023, eq. 17).
IPO_TARGET_MARGIN = 0.5


IPO_HELP = "IPO: regresses the DPO margin u to 1/2 (beta/2 convention)"


@register("ipo", pairwise=True, needs_reference=True, help=IPO_HELP)
def ipo_loss(beta: float = DPO_BETA) -> LossFn:
    return margin_loss("ipo", beta, lambda margin: (margin - IPO_TARGET_MARGIN).pow(2))
