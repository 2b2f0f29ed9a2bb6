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
# What an online method's collection reads (training/online.py): every online loss uses them,
# no offline loss does.
ONLINE_OPTIONS = (
    "prompts",
    "reward",
    "reward_weights",
    "reward_url",
    "group_size",
    "sampling_steps",
    "noise_level",
    "sde_type",
    "guidance_scale",
    "trained_steps_fraction",
    "sde_window_size",
    "sde_window_range",
    "share_initial_noise",
    "advantage_std",
    "collect_batches",
    "inner_epochs",
)
# An online loss's KL option: with it at 0 no reference model is loaded.
KL_OPTION = "kl_coef"


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
    # Online methods train on prompts and a reward instead of data: what a collection keeps,
    # "trajectory" (the trained steps' latents and log-probs: GRPO) or "endpoint" (the clean
    # latents: NFT); None for the offline losses.
    online: str | None = None

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
    online: str | None = None,
) -> Callable[[Callable[..., LossFn]], Callable[..., LossFn]]:
    """Decorator registering a loss builder (hyperparameters -> loss function)."""

    def wrap(builder: Callable[..., LossFn]) -> Callable[..., LossFn]:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        _LOSSES[name] = LossSpec(
            name, builder, pairwise, needs_reference, help, needs_predictions, soft_labels, online
        )
        return builder

    return wrap


def loss_names(online: bool | None = None) -> list[str]:
    """Every registered loss, or only the online (``True``) or offline (``False``) ones."""
    if online is None:
        return sorted(_LOSSES)
    return sorted(n for n, spec in _LOSSES.items() if (spec.online is not None) == online)


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
    reference = spec.needs_reference
    if spec.online is not None and KL_OPTION in spec.hyperparameters:
        kl = options.get(KL_OPTION)
        reference = (spec.hyperparameters[KL_OPTION] if kl is None else kl) > 0
    return Requirements(reference, predictions, spec.pairwise)


def loss_options() -> set[str]:
    """Every option some registered loss (or the safeguard) reads."""
    names = {SAFEGUARD_OPTION, *ONLINE_OPTIONS}
    for spec in _LOSSES.values():
        names |= set(spec.hyperparameters)
    return names


def unused_options(name: str, given: set[str]) -> list[str]:
    """Loss options in ``given`` (set explicitly by the user) that loss ``name`` ignores."""
    spec = get_spec(name)
    used = set(spec.hyperparameters) | ({SAFEGUARD_OPTION} if spec.takes_safeguard else set())
    if spec.online is not None:
        used |= set(ONLINE_OPTIONS)
    return sorted((given & loss_options()) - used)
