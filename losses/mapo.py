"""MaPO (Hong et al. 2024, arXiv 2406.06424): margin-aware preference optimisation without a
reference model, as computed by the released code (mapo-t2i/mapo ``utils.py:compute_loss``).

    s(e) = gamma e / (exp(gamma e) - 1)                 a decreasing score of an error e >= 0
    m(k) = s(err_w(k)) - s(err_l(k))                    > 0: the chosen image is denoised better
    L    = mean_k err_w(k) - beta * mean_k log sigmoid( T m(k) )

T is the scheduler's ``num_train_timesteps`` (the released code multiplies by it "to maximise the
margin throughout the denoising process"). Defaults from the released ``args.py``: beta 0.1,
gamma (``snr_value``) 0.5; its recipe is LoRA on SDXL with lr 5e-4. One UNet pass per step: no
reference.
"""

import torch
import torch.nn.functional as F

from losses.common import (
    LossFn,
    LossInputs,
    LossResult,
    loss_function,
    no_labels,
    split_pairs,
    win_rate,
)
from losses.registry import Option, positive_finite, register

MAPO_BETA = 0.1  # released args.py: --beta_mapo 0.1
MAPO_SNR_VALUE = 0.5  # released args.py: --snr_value 0.5
# SD1.5 and SDXL schedulers; the trainer passes the loaded scheduler's value.
NUM_TRAIN_TIMESTEPS = 1000


def error_score(errors: torch.Tensor, gamma: float) -> torch.Tensor:
    """s(e) = x / (exp(x) - 1) with x = gamma e, continued by its limit 1 at x = 0."""
    x = gamma * errors
    zero = x == 0
    safe = torch.where(zero, torch.ones_like(x), x)
    return torch.where(zero, torch.ones_like(x), safe / torch.expm1(safe))


@register(
    "mapo",
    pairwise=True,
    needs_reference=False,
    help="MaPO: chosen denoising loss + beta * log-odds margin; no reference model",
    options={
        "snr_value": Option(
            "mapo: gamma of the error score gamma e / (exp(gamma e) - 1) (released 0.5)",
            positive_finite,
            "finite and > 0",
        )
    },
)
def mapo_loss(
    beta: float = MAPO_BETA,
    snr_value: float = MAPO_SNR_VALUE,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> LossFn:
    @loss_function
    def loss_fn(inputs: LossInputs) -> LossResult:
        """policy_err: [2B] chosen first; ref_err is not used (None)."""
        policy_err, labels = inputs.policy_err, inputs.labels
        no_labels(labels, "mapo")
        err_w, err_l = split_pairs(policy_err)
        margin = error_score(err_w, snr_value) - error_score(err_l, snr_value)  # [B]
        ratio = F.logsigmoid(num_train_timesteps * margin)
        loss = err_w.mean() - beta * ratio.mean()
        metrics = {
            "mapo/margins": margin.mean().item(),
            "mapo/ratio_loss": (-beta * ratio).mean().item(),
            "rewards/accuracies": win_rate(margin.detach()),
            "err/policy": policy_err.mean().item(),
            "err/chosen": err_w.mean().item(),
            "err/rejected": err_l.mean().item(),
        }
        return loss, metrics

    return loss_fn
