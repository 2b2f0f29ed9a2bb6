"""Small helpers shared by the loss modules."""

import torch
import torch.distributed as dist


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
