"""Small helpers shared by the loss modules."""

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist

LossResult = tuple[torch.Tensor, dict[str, float]]  # (scalar loss, metrics as floats)
# A configured loss: per-sample errors (and labels, predictions) -> (loss, metrics).
LossFn = Callable[..., LossResult]


class LossInputs(NamedTuple):
    """One call's arguments under the loss contract (the README's loss table, losses/__init__)."""

    policy_err: torch.Tensor  # [2B] chosen first (pairwise) or [B]
    ref_err: torch.Tensor | None = None
    labels: torch.Tensor | None = None  # [B]
    policy_pred: torch.Tensor | None = None  # [2B, C, h, w], for needs_predictions losses
    ref_pred: torch.Tensor | None = None
    target: torch.Tensor | None = None


def loss_function(body: Callable[[LossInputs], LossResult]) -> LossFn:
    """Gives a loss body the contract's signature ``loss_fn(policy_err, ref_err=None,
    labels=None, policy_pred=None, ref_pred=None, target=None)``; the body reads them bundled."""

    def loss_fn(*args: torch.Tensor | None, **kwargs: torch.Tensor | None) -> LossResult:
        return body(LossInputs(*args, **kwargs))

    loss_fn.__doc__ = body.__doc__
    return loss_fn


def split_pairs(errors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[2B] -> ([B] chosen, [B] rejected); the batch layout puts every chosen sample first."""
    if errors.ndim != 1 or errors.numel() % 2:
        raise ValueError(f"pairwise errors must be a 1-D tensor of even length, got {errors.shape}")
    return errors.chunk(2)


def win_rate(margins: torch.Tensor) -> float:
    """Fraction of positive margins, a tie (exactly 0, e.g. at initialisation) counting 0.5."""
    return ((margins > 0).float() + 0.5 * (margins == 0).float()).mean().item()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over ``mask``; nan when the mask is empty, so the caller can nan-average it away."""
    return values[mask].mean().item() if bool(mask.any()) else float("nan")


def global_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over all samples of all processes (sum and count reduced, so unequal shards are
    weighted correctly). Detached: used only for reference points, which carry no gradient."""
    stats = torch.stack([values.detach().sum(), values.new_tensor(float(values.numel()))])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    return stats[0] / stats[1]


def require(value: torch.Tensor | None, what: str, loss: str) -> torch.Tensor:
    """A clear error when the trainer (or a caller) did not pass what a loss needs."""
    if value is None:
        raise ValueError(f"{loss} needs {what}")
    return value


def pair_rewards(
    policy_err: torch.Tensor, ref_err: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[2B] errors (chosen first) -> rewards beta/2 * g of the chosen [B] and rejected [B] halves,
    and the common pairwise margin u = beta/2 * (g_chosen - g_rejected) [B] that every pairwise
    loss with a reference is a function of (README, "Losses")."""
    if ref_err.shape != policy_err.shape:
        raise ValueError(f"ref_err {tuple(ref_err.shape)} != policy_err {policy_err.shape}")
    reward_chosen, reward_rejected = split_pairs(0.5 * beta * (ref_err - policy_err))
    return reward_chosen, reward_rejected, reward_chosen - reward_rejected


def pair_metrics(
    reward_chosen: torch.Tensor,
    reward_rejected: torch.Tensor,
    margin: torch.Tensor,
    policy_err: torch.Tensor,
    ref_err: torch.Tensor,
) -> dict[str, float]:
    """The DPO metric vocabulary, from the common margin: curves of every pairwise loss with a
    reference share one chart."""
    return {
        "rewards/chosen": reward_chosen.mean().item(),
        "rewards/rejected": reward_rejected.mean().item(),
        "rewards/margins": margin.mean().item(),
        "rewards/accuracies": win_rate(margin.detach()),
        "err/policy": policy_err.mean().item(),
        "err/ref": ref_err.mean().item(),
    }


def no_labels(labels: torch.Tensor | None, loss: str) -> None:
    if labels is not None:
        raise ValueError(f"{loss} is pairwise: it takes no labels")


MarginFn = Callable[[torch.Tensor], torch.Tensor]  # u [B] -> per-pair loss [B]


def margin_loss(name: str, beta: float, of_margin: MarginFn) -> LossFn:
    """A pairwise loss that is a function of the common margin u alone (IPO, hinge, DMPO):
    ``mean_k of_margin(u_k)``, with the DPO metric vocabulary. Takes the full contract; these
    losses use no labels and no per-pixel predictions."""

    @loss_function
    def loss_fn(inputs: LossInputs) -> LossResult:
        """policy_err, ref_err: [2B] chosen first."""
        policy_err, ref_err, labels = inputs.policy_err, inputs.ref_err, inputs.labels
        no_labels(labels, name)
        ref_err = require(ref_err, "reference errors", name)
        chosen, rejected, margin = pair_rewards(policy_err, ref_err, beta)
        loss = of_margin(margin).mean()
        return loss, pair_metrics(chosen, rejected, margin, policy_err, ref_err)

    return loss_fn
