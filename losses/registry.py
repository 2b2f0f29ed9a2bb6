"""Name -> loss builder registry; the CLI's ``--loss`` choices and the tests come from it."""

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

LossFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class LossSpec:
    """What the trainer must know about a loss, decided once at build time."""

    name: str
    builder: Callable[..., LossFn]
    pairwise: bool  # consumes [2B] errors (chosen first) instead of labelled images
    needs_reference: bool  # False: no reference UNet is loaded at all
    help: str


_LOSSES: dict[str, LossSpec] = {}


def register(
    name: str, *, pairwise: bool, needs_reference: bool, help: str
) -> Callable[[Callable[..., LossFn]], Callable[..., LossFn]]:
    """Decorator registering a loss builder (hyperparameters -> loss function)."""

    def wrap(builder: Callable[..., LossFn]) -> Callable[..., LossFn]:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        _LOSSES[name] = LossSpec(name, builder, pairwise, needs_reference, help)
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


def build_loss(name: str, options: Mapping[str, Any]) -> LossFn:
    """Build loss ``name`` taking, from ``options``, only the hyperparameters it accepts.

    Lets the trainer hand over its whole config without knowing which loss uses what.
    """
    accepted = inspect.signature(get_spec(name).builder).parameters
    return get_loss(name, **{k: v for k, v in options.items() if k in accepted})
