"""Preference losses as pure functions of per-sample denoising errors.

Every loss maps ``(policy_err, ref_err, labels)`` to ``(loss, metrics)``:

- ``policy_err`` / ``ref_err``: float32 tensors of per-sample mean-squared denoising errors
  (see ``diffusion.py``). Pairwise losses take ``[2B]`` with the B chosen samples first and the
  B rejected samples second; per-image losses take ``[B]``.
- ``labels``: ``[B]`` in {0, 1} (1 = desirable) for per-image losses.
- ``loss``: a scalar tensor; ``metrics``: a dict of Python floats (``nan`` when undefined for
  this batch, e.g. no undesirable sample), reduced by the caller across steps and processes.

Convention used everywhere: implicit reward g = ref_err - policy_err (positive when the policy
denoises a sample better than the reference).
"""

from losses.registry import LossSpec, build_loss, get_loss, get_spec, loss_names

# Importing the modules registers their losses.
from losses import dpo, kto, sft  # noqa: F401  isort: skip

__all__ = ["LossSpec", "build_loss", "get_loss", "get_spec", "loss_names"]
