"""Name -> loss builder registry; the CLI's ``--loss`` choices and per-loss flags, the trainer's
decisions (which models to load, what to compute per step) and the tests come from it.

A loss declares its own hyperparameters (``Option``: help, valid range, choices); their names
and defaults are the builder's keyword arguments. The config adds one flag per declared option,
so adding a loss touches ``losses/`` and its tests only.
"""

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from losses.common import LossFn
from losses.safeguard import SAFEGUARD_MU_HELP, with_winner_preserving

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
class Option:
    """A loss hyperparameter as ``--help`` and the config show it; the name, type and default
    are the builder's keyword argument."""

    help: str
    valid: Callable[[Any], bool] | None = None  # the range check; None: any value of the type
    rule: str = ""  # the valid range in words, for the start-up error ("in (0, 1)")
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class OptionField:
    """A declared option resolved against its builder: what the config turns into a flag."""

    name: str
    type: type
    default: Any
    option: Option

    def problem(self, value: Any) -> str | None:
        """The start-up error for ``value``, or None when it is in range."""
        if value is None or self.option.valid is None or self.option.valid(value):
            return None
        return f"--{self.name} must be {self.option.rule}"


def positive_finite(value: float) -> bool:
    return math.isfinite(value) and value > 0


# Shared by every loss with a strength: declared here once, resolved per loss (None = the
# loss's released default, see ``LossSpec.hyperparameters``).
BETA_OPTION = Option(
    "strength beta, in our convention u = beta/2 (g_chosen - g_rejected) for pairwise losses",
    positive_finite,
    "finite and > 0",
)
SAFEGUARD = OptionField(
    SAFEGUARD_OPTION,
    float,
    None,
    Option(SAFEGUARD_MU_HELP, lambda mu: 0.0 <= mu <= 1.0, "in [0, 1]"),
)


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
    options: Mapping[str, Option] = field(default_factory=dict)
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
    options: Mapping[str, Option] | None = None,
    online: str | None = None,
) -> Callable[[Callable[..., LossFn]], Callable[..., LossFn]]:
    """Decorator registering a loss builder (hyperparameters -> loss function). ``options``
    declares the builder's user-facing keyword arguments besides ``beta`` (others, like MaPO's
    ``num_train_timesteps``, are set by the trainer)."""

    def wrap(builder: Callable[..., LossFn]) -> Callable[..., LossFn]:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        spec = LossSpec(
            name, builder, pairwise, needs_reference, help, needs_predictions, soft_labels,
            dict(options or {}), online,
        )  # fmt: skip
        for option in _option_fields(spec):
            _check_same_declaration(option)
        _LOSSES[name] = spec
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
    return loss_fn if mu is None else with_winner_preserving(loss_fn, mu)


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


def _option_fields(spec: LossSpec) -> list[OptionField]:
    params = inspect.signature(spec.builder).parameters
    unknown = set(spec.options) - set(params)
    if unknown:
        raise ValueError(f"loss {spec.name!r} declares options its builder lacks: {unknown}")
    return [
        OptionField(n, type(params[n].default), params[n].default, o)
        for n, o in spec.options.items()
    ]


def _check_same_declaration(new: OptionField) -> None:
    """Two losses may share an option only with one default and one help text (one flag)."""
    for spec in _LOSSES.values():
        for old in _option_fields(spec):
            if old.name == new.name and old != new:
                raise ValueError(f"option {new.name!r} is declared twice, differently")


def option_fields() -> list[OptionField]:
    """Every declared loss option, once, in registration order, then the safeguard's mu:
    the flags ``training/config.py`` adds after ``--beta``."""
    seen: dict[str, OptionField] = {}
    for spec in _LOSSES.values():
        for option in _option_fields(spec):
            seen.setdefault(option.name, option)
    return [*seen.values(), SAFEGUARD]
