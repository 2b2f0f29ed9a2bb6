"""Preference losses as pure functions of per-sample denoising errors.

Every loss maps ``(policy_err, ref_err, labels, policy_pred, ref_pred, target)`` to
``(loss, metrics)`` (the table in the README, "Losses"):

- ``policy_err`` / ``ref_err``: float32 tensors of per-sample mean-squared denoising errors
  (see ``diffusion/denoising.py``). Pairwise losses take ``[2B]`` with the B chosen samples
  first and the B rejected samples second; per-image losses take ``[B]``.
  ``ref_err`` is None for losses without a reference (``mapo``, ``sft``).
- ``labels``: ``[B]`` in {0, 1} (1 = desirable) for per-image losses; for pairwise ``dpo``, an
  optional soft preference p in [0, 1] per pair (None: 1).
- ``policy_pred``, ``ref_pred``, ``target``: ``[2B, C, h, w]`` per-pixel predictions, passed only
  to losses whose registry entry says ``needs_predictions`` (``dspo``) and to the safeguard.
- ``loss``: a scalar tensor; ``metrics``: a dict of Python floats (``nan`` when undefined for
  this batch, e.g. no undesirable sample), reduced by the caller across steps and processes.

Convention used everywhere: implicit reward g = ref_err - policy_err (positive when the policy
denoises a sample better than the reference).
"""

import importlib
import pkgutil

from losses.registry import (
    LossSpec,
    Requirements,
    build_loss,
    get_loss,
    get_spec,
    loss_names,
    requirements,
    unused_options,
)
from losses.safeguard import winner_preserving

# Importing a module registers the losses it declares: every module of this package is
# imported, so a new loss is one new file here (and its tests), nothing else.
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = [
    "LossSpec",
    "Requirements",
    "build_loss",
    "get_loss",
    "get_spec",
    "loss_names",
    "requirements",
    "unused_options",
    "winner_preserving",
]
