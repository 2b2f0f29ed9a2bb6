"""GRPO for diffusion and flow models (Flow-GRPO, arXiv 2505.05470; DDPO, arXiv 2305.13301):
the clipped importance-ratio objective on the log-probabilities of stored sampler steps, plus a
KL of each step's Gaussian mean to the reference's.

Online: the trainer collects images from prompts and scores them (``training/online.py``); this
entry only binds the loss's hyperparameters to ``losses.online.grpo_loss``.
"""

import torch

from losses.common import LossFn
from losses.online import ADV_CLIP_MAX, grpo_loss
from losses.registry import Option, positive_finite, register

# Flow-GRPO's released settings (config/grpo.py, the GenEval / OCR SD3.5-M recipes; the
# advantage clip, losses.online.ADV_CLIP_MAX, is also theirs):
GRPO_CLIP_RANGE = 1e-4  # train.clip_range (also DDPO's)
GRPO_KL_COEF = 0.04  # train.beta (0.01 for PickScore; DDPO has no KL: 0)

# Shared by grpo and nft (one flag): Flow-GRPO's train.adv_clip_max, DiffusionNFT's scale.
ADV_CLIP_OPTION = Option(
    "online: advantages are clipped to +-this (Flow-GRPO, DiffusionNFT: 5)",
    positive_finite,
    "finite and > 0",
)


def check_coefficients(
    loss: str, scale: str, value: float, kl_coef: float, adv_clip: float
) -> None:
    """ValueError unless the loss's own scale ``scale`` = ``value`` (grpo's clip_range, nft's
    nft_beta) and adv_clip_max are > 0 and kl_coef >= 0 (shared by grpo and nft)."""
    if not value > 0 or kl_coef < 0 or not adv_clip > 0:
        raise ValueError(
            f"{loss}: {scale} ({value}) and adv_clip_max ({adv_clip}) must be > 0, "
            f"kl_coef ({kl_coef}) >= 0"
        )


@register(
    "grpo",
    pairwise=False,
    needs_reference=True,
    online="trajectory",
    help="online: group-relative policy optimisation on the sampler's steps (Flow-GRPO, DDPO); "
    "needs --prompts and --reward",
    options={
        "clip_range": Option(
            "grpo: ratio clip range (Flow-GRPO, DDPO: 1e-4)", positive_finite, "finite and > 0"
        ),
        "adv_clip_max": ADV_CLIP_OPTION,
    },
)
def grpo(
    clip_range: float = GRPO_CLIP_RANGE,
    kl_coef: float = GRPO_KL_COEF,
    adv_clip_max: float = ADV_CLIP_MAX,
) -> LossFn:
    check_coefficients("grpo", "clip_range", clip_range, kl_coef, adv_clip_max)

    def loss_fn(
        log_prob: torch.Tensor,
        old_log_prob: torch.Tensor,
        advantages: torch.Tensor,
        kl_mean: torch.Tensor | None = None,
        ref_mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """One trained step of B samples: log-probs [B] (policy, with grad; stored), the
        advantages [B]; the policy's and the reference's step means [B, *D] and the KL's std
        when the KL term is on."""
        return grpo_loss(log_prob, old_log_prob, advantages, clip_range, kl_mean=kl_mean,
                         ref_mean=ref_mean, std=std, kl_coef=kl_coef,
                         adv_clip_max=adv_clip_max)  # fmt: skip

    return loss_fn
