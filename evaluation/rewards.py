"""Rewards for online training: the scorers of evaluation/scorers.py, weighted and summed.

A run names its rewards with ``--reward NAME[=PATH]`` (repeatable; NAME from the scorer
registry, PATH the model directory or hub name of a learned scorer) and ``--reward_weights``
(a comma list or one value per flag, as many as rewards; default all 1). Each reward maps
(images, prompts, metadata) to ``RewardScores``: every component's score and their weighted sum
``total = sum_k w_k * component_k``, one float32 per image. The same object is served over HTTP
by evaluation/reward_server.py and read back by evaluation/reward_client.py.

``check_prompts`` fails at start-up on a prompt a reward cannot read (the toy colour rule on a
caption naming no colour), not at the first scoring after minutes of sampling.

``reward_stats`` gives the per-step metrics: ``reward/mean``, ``reward/std`` (of the total),
``reward/zero_spread_groups`` (share of prompt groups whose totals are all equal, so their
group-normalised advantages are 0 and they teach nothing) and ``reward/<component>`` (each
component's mean).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from common.cli import UsageError
from evaluation.scorers import NEEDS_NO_MODEL, SCORERS, Images, Prompts, Scorer, build_scorer

Metadata = Sequence[dict] | None  # per-image tags, for rewards that read them

REWARD_NAMES = tuple(sorted(SCORERS))


@dataclass(frozen=True)
class RewardSpec:
    name: str
    path: str | None  # model directory or hub name; None: the scorer's default (or no model)
    weight: float


def parse_weights(values: Sequence[str | float] | str | None, count: int) -> list[float]:
    """``--reward_weights`` as floats: a comma list, one value per flag, or both mixed;
    all 1 when not given. Exactly ``count`` values, each finite."""
    if values is None or (not isinstance(values, str) and len(values) == 0):
        return [1.0] * count
    items = [values] if isinstance(values, str) else list(values)
    texts = [part.strip() for item in items for part in str(item).split(",")]
    weights = []
    for text in texts:
        try:
            weight = float(text)
        except ValueError:
            raise UsageError(f"--reward_weights: {text!r} is not a number") from None
        if not math.isfinite(weight):
            raise UsageError(f"--reward_weights: {text!r} is not a finite number")
        weights.append(weight)
    if len(weights) != count:
        raise UsageError(
            f"--reward_weights: {len(weights)} weights {weights} for {count} --reward flags; "
            "give one weight per reward"
        )
    return weights


def split_reward(value: str) -> tuple[str, str | None]:
    """``NAME[=PATH]`` -> (NAME, PATH or None); UsageError listing the choices for an unknown
    NAME."""
    name, _, path = value.partition("=")
    name = name.strip()
    if name not in SCORERS:
        raise UsageError(f"--reward {value!r}: unknown reward; choose from {list(REWARD_NAMES)}")
    return name, path.strip() or None


def parse_reward_specs(
    rewards: Sequence[str], weights: Sequence[str | float] | str | None = None
) -> list[RewardSpec]:
    """``--reward NAME[=PATH]`` values and ``--reward_weights`` into specs; every mistake is one
    UsageError line naming the flag."""
    if not rewards:
        raise UsageError(f"give at least one --reward NAME[=PATH], NAME in {list(REWARD_NAMES)}")
    pairs = []
    for value in rewards:
        name, path = split_reward(value)
        if name in NEEDS_NO_MODEL and path is not None:
            raise UsageError(f"--reward {value!r}: {name} is a rule and takes no model path")
        if name not in NEEDS_NO_MODEL and path is None and SCORERS[name][1] is None:
            raise UsageError(
                f"--reward {name} needs its model: --reward {name}=DIR "
                "(see docs/online.md: Rewards)"
            )
        pairs.append((name, path))
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise UsageError(f"--reward: each reward at most once, got {names}")
    values = parse_weights(weights, len(pairs))
    return [RewardSpec(n, p, w) for (n, p), w in zip(pairs, values, strict=True)]


def add_reward_arguments(parser: argparse.ArgumentParser, device_flag: str = "--device") -> None:
    """``--reward`` (repeat), ``--reward_weights`` and the scorers' device flag."""
    parser.add_argument(
        "--reward",
        action="append",
        default=[],
        help=f"NAME or NAME=PATH (repeat), NAME in {list(REWARD_NAMES)}",
    )
    parser.add_argument(
        "--reward_weights",
        action="append",
        default=None,
        help="weights of the rewards in --reward order: a comma list or one per flag (default 1)",
    )
    parser.add_argument(
        device_flag,
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device of the reward models",
    )


@dataclass
class RewardScores:
    """Scores of N images: the weighted ``total`` and each component, float32 ``[N]``."""

    total: torch.Tensor
    components: dict[str, torch.Tensor]


def combine(components: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> RewardScores:
    """The weighted sum of the float32 components, added in float64 and rounded once to
    float32, so the total depends only on the components: the server's and the client's agree
    bit for bit."""
    parts = {name: components[name].to(torch.float32) for name in weights}
    first = next(iter(parts.values()))
    total = torch.zeros(first.shape, dtype=torch.float64)
    for name, weight in weights.items():
        total += weight * parts[name].cpu().double()
    return RewardScores(total.to(torch.float32), parts)


class Reward(Protocol):
    """Anything that scores images for the trainer: in process or behind a server."""

    names: list[str]

    def score(
        self, images: Images, prompts: Prompts, metadata: Metadata = None
    ) -> RewardScores: ...

    def check_prompts(self, prompts: Prompts) -> None:
        """UsageError naming the first prompt a component cannot read."""
        ...


def check_lengths(images: Sequence, prompts: Sequence, metadata: Sequence | None) -> None:
    if len(images) != len(prompts) or (metadata is not None and len(metadata) != len(images)):
        counts = f"{len(images)} images, {len(prompts)} prompts"
        if metadata is not None:
            counts += f", {len(metadata)} metadata entries"
        raise ValueError(f"reward inputs differ in length: {counts}")


class ScorerReward:
    """The scorers of ``specs`` in this process, weighted.

    ``metadata`` is accepted and length-checked for rewards that read per-prompt tags; none of
    the registered scorers reads it yet."""

    def __init__(self, specs: Sequence[RewardSpec], device: str = "cpu"):
        self.specs = list(specs)
        self.names = [s.name for s in self.specs]
        self.weights = {s.name: s.weight for s in self.specs}
        self.scorers: dict[str, Scorer] = {
            s.name: build_scorer(s.name, s.path, device) for s in self.specs
        }

    @classmethod
    def from_flags(
        cls,
        rewards: Sequence[str],
        weights: Sequence[str | float] | str | None = None,
        device: str = "cpu",
    ) -> ScorerReward:
        return cls(parse_reward_specs(rewards, weights), device)

    def check_prompts(self, prompts: Prompts) -> None:
        """UsageError naming the first prompt a reward cannot read, and the reward; scorers
        that read no structure from the caption (every learned one) accept any prompt."""
        checks = {
            name: check
            for name, scorer in self.scorers.items()
            if (check := getattr(scorer, "check_prompt", None)) is not None
        }
        for index, prompt in enumerate(prompts):
            for name, check in checks.items():
                try:
                    check(prompt)
                except ValueError as exc:
                    raise UsageError(f"--reward {name}: prompt {index}: {exc}") from None

    def score(self, images: Images, prompts: Prompts, metadata: Metadata = None) -> RewardScores:
        check_lengths(images, prompts, metadata)
        images = [image.convert("RGB") for image in images]  # what a PNG on the wire carries
        components = {
            name: torch.tensor(scorer.score(images, list(prompts)), dtype=torch.float32)
            for name, scorer in self.scorers.items()
        }
        return combine(components, self.weights)


def reward_stats(scores: RewardScores, group_ids: Sequence[Hashable] | torch.Tensor) -> dict:
    """Per-step reward metrics over N images in prompt groups (any labels, any order).

    ``reward/std`` is the population std (ddof 0, as Flow-GRPO's advantages use);
    ``reward/zero_spread_groups`` counts a group as zero-spread when all its totals are equal,
    a single-image group included (its advantage is 0 too)."""
    total = scores.total.detach().double().cpu()
    ids = group_ids.tolist() if isinstance(group_ids, torch.Tensor) else list(group_ids)
    if len(ids) != total.numel() or not ids:
        raise ValueError(f"{len(ids)} group ids for {total.numel()} rewards")
    groups: dict[Hashable, list[float]] = {}
    for group, value in zip(ids, total.tolist(), strict=True):
        groups.setdefault(group, []).append(value)
    flat = sum(max(v) == min(v) for v in groups.values())
    stats = {
        "reward/mean": total.mean().item(),
        "reward/std": total.std(correction=0).item(),
        "reward/zero_spread_groups": flat / len(groups),
    }
    for name, values in scores.components.items():
        stats[f"reward/{name}"] = values.detach().double().mean().item()
    return stats
