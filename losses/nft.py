"""DiffusionNFT (arXiv 2509.16117; NVlabs/DiffusionNFT): negative-aware fine-tuning on the
clean samples of an old policy, the reward entering through the optimality probability
r = clamp(A / 2c + 1/2, 0, 1) of each sample's advantage.

Online: the trainer collects, re-noises and keeps the old policy (``training/online.py``); this
entry binds the loss's hyperparameters to ``losses.online.nft_optimality`` and ``nft_loss``.
"""

import torch

from losses.common import LossFn
from losses.grpo import ADV_CLIP_OPTION, check_coefficients
from losses.online import ADV_CLIP_MAX, NFT_DECAY_SCHEDULES, nft_loss, nft_optimality
from losses.registry import Option, positive_finite, register

# DiffusionNFT's released settings (config/nft.py, the SD3.5-M recipes):
NFT_BETA = 1.0  # config.beta (0.1 for OCR and the multi-reward model)
NFT_KL_COEF = 1e-4  # train.beta, the KL to the reference (not NFT's beta)
NFT_DECAY = 1  # decay_type (2 for OCR)


@register(
    "nft",
    pairwise=False,
    needs_reference=True,
    online="endpoint",
    help="online: negative-aware fine-tuning on an old policy's clean samples (DiffusionNFT); "
    "needs --prompts and --reward",
    options={
        "nft_beta": Option(
            "nft: DiffusionNFT's beta (released 1.0; 0.1 for OCR)",
            positive_finite,
            "finite and > 0",
        ),
        "adv_clip_max": ADV_CLIP_OPTION,
        "nft_decay": Option(
            "nft: the old policy's decay: 0 hard copy, 1 min(0.001 step, 0.5), 2 zero for 75 "
            "steps then min(0.0075 (step - 75), 0.999)",
            choices=tuple(sorted(NFT_DECAY_SCHEDULES)),
        ),
    },
)
def nft(
    nft_beta: float = NFT_BETA,
    kl_coef: float = NFT_KL_COEF,
    adv_clip_max: float = ADV_CLIP_MAX,
    nft_decay: int = NFT_DECAY,
) -> LossFn:
    check_coefficients("nft", "nft_beta", nft_beta, kl_coef, adv_clip_max)
    if nft_decay not in NFT_DECAY_SCHEDULES:
        choices = sorted(NFT_DECAY_SCHEDULES)
        raise ValueError(f"nft: nft_decay must be one of {choices}, got {nft_decay}")

    def loss_fn(
        v_policy: torch.Tensor,
        v_old: torch.Tensor,
        target: torch.Tensor,
        advantages: torch.Tensor,
        sigma: torch.Tensor,
        v_ref: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """B re-noised samples: the policy's (with grad), the old policy's and the reference's
        outputs and the target [B, *D], the advantages [B], the output-to-x0 error factor
        ``sigma`` [B] (flow: t)."""
        r = nft_optimality(advantages, adv_clip_max)
        return nft_loss(v_policy, v_old, target, r, nft_beta, sigma, v_ref=v_ref,
                        kl_coef=kl_coef if v_ref is not None else 0.0,
                        scale=adv_clip_max)  # fmt: skip

    return loss_fn
