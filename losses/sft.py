"""Supervised fine-tuning baseline: the plain denoising loss on preferred images only.

No reference model is used (none is loaded). With labels, only desirable images count; without
labels the errors are a pair batch and only the chosen half counts.
"""

from losses.common import LossFn, LossInputs, LossResult, loss_function, split_pairs
from losses.registry import register


@register(
    "sft",
    pairwise=False,
    needs_reference=False,
    help="denoising loss on chosen / desirable images only (no reference model)",
)
def sft_loss() -> LossFn:
    @loss_function
    def loss_fn(inputs: LossInputs) -> LossResult:
        """policy_err: [B] with labels [B], or [2B] chosen first without labels."""
        policy_err, labels = inputs.policy_err, inputs.labels
        kept = split_pairs(policy_err)[0] if labels is None else policy_err[labels > 0.5]
        # A batch without any desirable image contributes a zero loss that still keeps the
        # graph connected (so distributed gradient sync sees every parameter).
        loss = kept.mean() if kept.numel() else policy_err.sum() * 0.0
        metrics = {"err/policy": policy_err.mean().item(), "err/chosen": loss.item()}
        return loss, metrics

    return loss_fn
