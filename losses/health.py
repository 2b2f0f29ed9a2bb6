"""Training-health metrics beside the loss: where in the noise schedule preference is learned.

From the per-sample errors and the timesteps they were drawn at (``diffusion.batch_errors(...,
return_timesteps=True)``), with the implicit reward g = ref_err - policy_err:

- pairs (chosen first): margin m_k = g_w(k) - g_l(k);
- labelled images: the signed reward m_i = g_i (desirable) or -g_i (undesirable);

``health/negative_margins`` is the share of margins below 0, and for each quarter of the
timestep range [0, T) (q1: the least noisy quarter, t < T/4; q4: the noisiest)
``health/margin_qN`` is the mean margin and ``health/accuracy_qN`` the share above 0 (a tie
counts half, as ``rewards/accuracies``); nan when no sample of the batch fell in that quarter.
Margins are in error units (not scaled by beta), so they compare across losses. Without a
reference (SFT, MaPO) there is no implicit reward and no health metric.
"""

import torch

QUARTERS = 4


def health_metrics(
    policy_err: torch.Tensor,
    ref_err: torch.Tensor | None,
    timesteps: torch.Tensor,
    num_train_timesteps: int,
    pairwise: bool,
    labels: torch.Tensor | None = None,
) -> dict[str, float]:
    """policy_err, ref_err, timesteps: [2B] (pairs, chosen first, a pair sharing its timestep)
    or [B] with labels [B] in {0, 1} -> the metrics above as Python floats."""
    if ref_err is None:
        return {}
    reward = (ref_err - policy_err).detach().float()
    if pairwise:
        half = reward.shape[0] // 2
        margin, t = reward[:half] - reward[half:], timesteps[:half]
    else:
        if labels is None:
            raise ValueError("per-image health metrics need labels")
        margin, t = torch.where(labels.bool(), reward, -reward), timesteps
    correct = (margin > 0).float() + 0.5 * (margin == 0).float()
    quarter = (t.to(margin.device).long() * QUARTERS // num_train_timesteps).clamp(0, QUARTERS - 1)
    metrics = {"health/negative_margins": float((margin < 0).float().mean())}
    for q in range(QUARTERS):
        inside = quarter == q
        empty = not bool(inside.any())
        metrics[f"health/margin_q{q + 1}"] = float("nan") if empty else float(margin[inside].mean())
        metrics[f"health/accuracy_q{q + 1}"] = (
            float("nan") if empty else float(correct[inside].mean())
        )
    return metrics
