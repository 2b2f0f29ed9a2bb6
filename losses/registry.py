"""Name -> loss builder registry; the CLI's ``--loss`` choices, the trainer's decisions (which
models to load, what to compute per step) and the tests come from it."""

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

LossFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]

# The Diffusion-SDPO safeguard's option name (losses/safeguard.py); None = not applied.
SAFEGUARD_OPTION = "winner_preserving_mu"


@dataclass(frozen=True)
class LossSpec:
    """What the trainer must know about a loss, decided once at build time."""

    name: str
    builder: Callable[..., LossFn]
    pairwise: bool  # consumes [2B] errors (chosen first) instead of labelled images
    needs_reference: bool  # False: no reference UNet is loaded and no reference forward runs
    help: str
    # True: the loss also reads the per-pixel predictions and target ([2B, C, h, w]).
    needs_predictions: bool = False
    # True: the loss reads per-pair preference probabilities (``labels`` [B]) for --soft_labels.
    soft_labels: bool = False

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """The builder's keyword arguments and their (released) defaults."""
        params = inspect.signature(self.builder).parameters.values()
        return {p.name: p.default for p in params}

    @property
    def takes_safeguard(self) -> bool:
        """The Diffusion-SDPO safeguard rescales the rejected half of a pair batch against a
        reference margin: it applies to pairwise losses with a reference only."""
        return self.pairwise and self.needs_reference


@dataclass(frozen=True)
class Requirements:
    """What the trainer computes per step for one configured loss."""

    reference: bool  # load a reference model and run its forward
    predictions: bool  # keep per-pixel predictions and the target for the loss
    pairwise: bool


_LOSSES: dict[str, LossSpec] = {}


def register(
    name: str,
    *,
    pairwise: bool,
    needs_reference: bool,
    help: str,
    needs_predictions: bool = False,
    soft_labels: bool = False,
) -> Callable[[Callable[..., LossFn]], Callable[..., LossFn]]:
    """Decorator registering a loss builder (hyperparameters -> loss function)."""

    def wrap(builder: Callable[..., LossFn]) -> Callable[..., LossFn]:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        _LOSSES[name] = LossSpec(
            name, builder, pairwise, needs_reference, help, needs_predictions, soft_labels
        )
        return builder

    return wrap


def loss_names() -> list[str]:
    return sorted(_LOSSES)


def get_spec(name: str) -> LossSpec:
    if name not in _LOSSES:
        raise KeyError(f"unknown loss {name!r}; registered: {', '.join(loss_names())}")
    return _LOSSES[name]


def get_loss(name: str, **hyperparameters: Any) -> LossFn:
    """Build loss ``name`` with explicit hyperparameters (unknown ones are an error)."""
    return get_spec(name).builder(**hyperparameters)


def safeguard_mu(name: str, options: Mapping[str, Any]) -> float | None:
    """The safeguard's mu when it is asked for and applies to loss ``name``, else None."""
    mu = options.get(SAFEGUARD_OPTION)
    return mu if mu is not None and get_spec(name).takes_safeguard else None


def build_loss(name: str, options: Mapping[str, Any]) -> LossFn:
    """Build loss ``name`` taking, from ``options``, only the hyperparameters it accepts (a None
    value leaves the loss's own released default), wrapped in the Diffusion-SDPO safeguard when
    ``options["winner_preserving_mu"]`` is set and the loss takes it.

    Lets the trainer hand over its whole config without knowing which loss uses what.
    """
    accepted = get_spec(name).hyperparameters
    loss_fn = get_loss(
        name, **{k: v for k, v in options.items() if k in accepted and v is not None}
    )
    mu = safeguard_mu(name, options)
    if mu is None:
        return loss_fn
    from losses.safeguard import with_winner_preserving  # deferred: it imports this module

    return with_winner_preserving(loss_fn, mu)


def requirements(name: str, options: Mapping[str, Any]) -> Requirements:
    """What loss ``name`` under ``options`` needs computed each step."""
    spec = get_spec(name)
    predictions = spec.needs_predictions or safeguard_mu(name, options) is not None
    return Requirements(spec.needs_reference, predictions, spec.pairwise)


def loss_options() -> set[str]:
    """Every option some registered loss (or the safeguard) reads."""
    names = {SAFEGUARD_OPTION}
    for spec in _LOSSES.values():
        names |= set(spec.hyperparameters)
    return names


def unused_options(name: str, given: set[str]) -> list[str]:
    """Loss options in ``given`` (set explicitly by the user) that loss ``name`` ignores."""
    spec = get_spec(name)
    used = set(spec.hyperparameters) | ({SAFEGUARD_OPTION} if spec.takes_safeguard else set())
    return sorted((given & loss_options()) - used)
