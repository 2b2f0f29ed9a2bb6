"""The online phase of training: collect (sample, score, advantages), then update.

A collection takes ``collect_batches`` prompt batches from the prompt stream; each batch of P
prompts becomes one micro-batch of ``N = P * G`` images (``--group_size`` G), laid out group
member first (image ``n = g * P + p`` is member g of prompt p), drawn from the old policy under
``no_grad`` with the online sampler (``diffusion/sampling.py``), decoded and scored by the reward. A
prompt's whole group is sampled on one process, so group means need no communication; the
rewards of every process are gathered for the global std (Flow-GRPO's ``global_std``) and the
reward statistics, in rank order, so 2 processes and 1 process reading the same prompt batches
compute the same advantages.

Then the trainer consumes the collection's micro-batches (``inner_epochs`` passes, each in a
seeded order), ``gradient_accumulation_steps`` per optimizer step: the loss of every trained
step of a micro-batch is backpropagated on its own (activations freed step by step), scaled by
1 / trained steps (accelerate scales by 1 / accumulation), with gradients synchronised only at
the last backward of an optimizer step, the only one DeepSpeed's engine takes as the boundary
at which it steps (``training.distributed.gradient_sync``). Sampling and training use the same
micro-batches, so the recomputed log-probabilities of the first optimizer step after a
collection equal the stored ones exactly in fp32 (``online/ratio_at_first_step`` = 1).

- GRPO (``trajectory`` collection; Flow-GRPO / DDPO): per stored step, the policy's log-prob of
  the stored next latent, the clipped ratio objective, and the KL of the step's mean to the
  reference's (the frozen base; adapters off under LoRA) when ``kl_coef`` > 0. The steps kept
  are the first ones, a window (Flow-GRPO-Fast's random or MixGRPO's progressive one, a
  function of the collection index: ``window``) or each image's shuffled share (DanceGRPO:
  ``shuffled_steps``); images of zero advantage can be left out (``grpo_micro_batch``).
- NFT (``endpoint`` collection; DiffusionNFT): only the clean latents and advantages are kept;
  per sample a seeded permutation of the sampler's timesteps, fresh noise per trained step, the
  NFT loss against the old policy, which samples the next collection and is soft-updated before
  it (``nft_old_decay``). Under LoRA the old policy is a copy of the adapter weights only; under
  FSDP of this process's flat shards (``OldPolicy``).

With ``--cache`` (``scripts/build_cache.py --prompts``) the prompts' text features are read from
the cache and the text encoders never load; the VAE still decodes the samples for the reward.
Each optimizer step logs its wall time split into ``time/collect`` and ``time/update``.

Randomness derives from ``(seed, stream, prompt draw, member, ...)`` only (``sample_generator``):
a sample is independent of its batch, its process and of resuming. A checkpoint holds the
collection in progress (per process) and the old policy, so a run resumed between two optimizer
steps of one collection continues exactly.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file

from common.cli import UsageError
from data.prompts import PromptBatch
from diffusion.sampling import (
    Sampler,
    decode_images,
    draw_noise,
    guided_output,
    sample_generator,
    sample_rollout,
    step_log_prob,
)
from evaluation.reward_client import RemoteReward
from evaluation.rewards import Reward, RewardScores, ScorerReward, reward_stats
from losses import get_spec
from losses.common import LossFn
from losses.online import group_advantages, nft_old_decay
from models.configs import vae_scale_factor
from training.config import TrainConfig
from training.distributed import drop_gathered_params, fsdp_flat_params, gradient_sync

logger = logging.getLogger("prefdiff")

TRAJECTORY, ENDPOINT = "trajectory", "endpoint"  # LossSpec.online: what a collection keeps
# Keys of the per-sample random streams (sample_generator(seed, KEY, draw, member, ...)).
INIT_NOISE, SDE_NOISE, NFT_NOISE, WINDOW, ORDER, TRAINED_STEPS = 1, 2, 3, 4, 5, 6
# Flow-GRPO's advantage epsilon (flow_grpo/stat_tracking.py), also DiffusionNFT's.
ADVANTAGE_EPS = 1e-4
STATE_DIR = "online"  # inside a checkpoint: the collection in progress and the old policy
OLD_POLICY_FILE = "old_policy.safetensors"
SAMPLES_FILE = "online_samples.jsonl"  # in the output dir: one line per scored image
# Metrics that must be exactly 1 (the exactness check before a collection's first update):
# train.reduce_metrics keeps the value furthest from 1 over micro-batches and processes, since
# a mean would let a 0.998 in one micro-batch offset a 1.002 in another.
FURTHEST_FROM_ONE = ("online/ratio_at_first_step",)
OLD_POLICY_SHARD = "old_policy-rank-{rank}.safetensors"  # under FSDP: each process's shards


def trained_count(num_steps: int, fraction: float) -> int:
    """Flow-GRPO's ``int(num_steps * timestep_fraction)``, at least one step."""
    return max(1, int(num_steps * fraction))


def window_bounds(config: TrainConfig) -> tuple[int, int]:
    """``--sde_window_range LO,HI`` (half-open): the steps the window may cover; default
    [0, steps - 1), the last step (to the clean image) never stochastic."""
    if config.sde_window_range:
        low, high = (int(v) for v in config.sde_window_range.split(","))
        return low, high
    return 0, config.sampling_steps - 1


def progressive_starts(config: TrainConfig) -> list[int]:
    """MixGRPO's progressive window starts (fastvideo/utils/grpo_states.py, ``roll_back``): LO,
    LO + shift, ... while the window still covers a step below HI, then LO again."""
    low, high = window_bounds(config)
    return list(range(low, high, config.sde_window_shift))


def window(config: TrainConfig, collection: int) -> range:
    """The SDE window of collection ``collection`` (a function of the index alone, so a resumed
    run continues the schedule). random: Flow-GRPO-Fast's start k ~ U{LO .. HI - size}, seeded by
    the collection; progressive: MixGRPO's start moves by --sde_window_shift every
    --sde_window_every collections (its "iterations": one rollout of a prompt batch and the
    updates on it), the end clipped at HI. The release clips at HI = steps - 2 exclusive and
    also holds the start HI for a round, where its window is empty and nothing trains; here the
    start goes back to LO after the last start that leaves a step to train."""
    low, high = window_bounds(config)
    size = config.sde_window_size
    if config.sde_window_schedule == "progressive":
        starts = progressive_starts(config)
        start = starts[(collection // config.sde_window_every) % len(starts)]
        return range(start, min(start + size, high))
    rng = np.random.default_rng([config.seed, WINDOW, collection])
    start = int(rng.integers(low, high - size + 1))
    return range(start, start + size)


def build_sampler(config: TrainConfig, schedule: Any, kind: str, collection: int) -> Sampler:
    """The sampler of one collection: GRPO's SDE (every step, or a window, random per collection
    as Flow-GRPO-Fast or progressive as MixGRPO) with the steps to train (DanceGRPO: each image
    trains its own shuffled share of the steps before the last, ``shuffled_steps``); NFT's ODE
    (noise 0 unless --noise_level says otherwise), keeping no steps."""
    steps = schedule.num_steps
    level = config.noise_level
    if level is None:
        level = schedule.default_noise_level if kind == TRAJECTORY else 0.0
    per_sample = 0
    if config.sde_window_size:
        span = window(config, collection)
        levels = tuple(level if i in span else 0.0 for i in range(steps))
        candidates = list(span)
    else:
        levels = (level,) * steps
        candidates = list(range(trained_count(steps, config.trained_steps_fraction)))
        if config.trained_steps_order == "shuffled":
            candidates = list(range(steps - 1))  # --ignore_last
            per_sample = trained_count(steps - 1, config.trained_steps_fraction)
    trained = tuple(i for i in candidates if schedule.has_noise(i, levels[i]))
    if kind == TRAJECTORY and (not trained or len(trained) < per_sample):
        raise UsageError(
            f"no stochastic step to train (noise level {level}, steps {candidates}): raise "
            "--noise_level or --trained_steps_fraction"
        )
    if kind != TRAJECTORY:
        trained, per_sample = (), 0
    return Sampler(schedule, levels, trained, config.guidance_scale, per_sample)


def shuffled_steps(config: TrainConfig, sampler: Sampler, draws: list[int]) -> torch.Tensor:
    """DanceGRPO's per-image steps [N, k], member-major: a permutation of the sampler's candidate
    steps from the image's own stream (seed, TRAINED_STEPS, draw, member), its first k in that
    order; the same image gets the same steps on any process count and after a resume."""
    candidates = torch.tensor(sampler.trained_steps)
    count = sampler.steps_per_sample
    rows = []
    for g in range(config.group_size):
        for d in draws:
            gen = sample_generator(config.seed, TRAINED_STEPS, d, g)
            rows.append(candidates[torch.randperm(len(candidates), generator=gen)[:count]])
    return torch.stack(rows)


def take(rows: torch.Tensor, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The ``rows`` of each per-sample tensor; None and broadcast ([1, ...]) ones as given."""
    return [t if t is None or t.shape[0] == 1 else t[rows] for t in tensors]


@dataclass
class Collected:
    """One micro-batch of a collection: P prompts x G images (member-major)."""

    prompts: list[str]  # [P]
    metadata: list[dict[str, Any]]  # [P]
    draws: list[int]  # [P] global draw index of each prompt: its group id
    final: torch.Tensor  # [N, *D] fp32 clean latents
    x_t: torch.Tensor  # [S, N, *D] the latents before each trained step (GRPO)
    x_next: torch.Tensor  # [S, N, *D]
    log_probs: torch.Tensor  # [S, N] fp32 at sampling
    rewards: torch.Tensor  # [N] fp32
    advantages: torch.Tensor | None = None  # [N] fp32, after the gather
    steps: torch.Tensor | None = None  # [S, N] long: each image's step per slot (shuffled order)

    @property
    def group_ids(self) -> torch.Tensor:
        """[N]: the draw index of each image's prompt."""
        return torch.tensor(self.draws * (self.final.shape[0] // len(self.draws)))

    TENSORS: ClassVar[tuple[str, ...]] = (
        "final", "x_t", "x_next", "log_probs", "rewards", "advantages", "steps"
    )  # fmt: skip

    def index(self, slot: int, sampler: Sampler) -> int | torch.Tensor:
        """The step of stored slot ``slot``: shared, or each image's own ([N] long)."""
        return sampler.trained_steps[slot] if self.steps is None else self.steps[slot]


@dataclass
class Collection:
    """A collection in progress: its micro-batches, the order they are trained in, how far."""

    index: int  # collections before this one (its sampler's window derives from it)
    batches: list[Collected]
    order: list[int]  # micro-batch indices over all inner epochs
    cursor: int = 0  # entries of ``order`` consumed
    metrics: dict[str, float] = field(default_factory=dict)  # reward statistics

    @property
    def exhausted(self) -> bool:
        return self.cursor >= len(self.order)


class OldPolicy:
    """DiffusionNFT's old policy: an fp32 copy of the trainable weights this process holds (the
    LoRA adapters or the whole denoiser; under FSDP the local shards of its flat parameters),
    put in the policy's place for its forwards and soft-updated elementwise."""

    def __init__(self, policy: torch.nn.Module, module: torch.nn.Module):
        """``policy`` as prepared by accelerate, ``module`` the denoiser inside it."""
        flat = fsdp_flat_params(policy)
        self.policy, self.sharded = policy, flat is not None
        self.params = flat if flat is not None else [p for p in module.parameters()
                                                     if p.requires_grad]  # fmt: skip
        # fp32 whatever the parameters hold (DeepSpeed's engine: bf16 / fp16 copies), so that
        # soft updates with a decay near 1 are not rounded away.
        self.weights = [p.detach().float().clone() for p in self.params]

    @contextmanager
    def active(self) -> Iterator[None]:
        """Inside: the policy computes with the old weights (no autograd graph may be open on
        its parameters: call before the policy's own forward)."""
        if self.sharded:  # FSDP gathers from shards it holds pointers to: write them in place
            current = [p.detach().clone() for p in self.params]
            self.copy_into(self.weights)
            try:
                yield
            finally:
                self.copy_into(current)
            return
        current = [p.data for p in self.params]
        for param, old in zip(self.params, self.weights, strict=True):
            param.data = old.to(param.dtype)
        try:
            yield
        finally:
            for param, data in zip(self.params, current, strict=True):
                param.data = data

    @torch.no_grad()
    def copy_into(self, values: list[torch.Tensor]) -> None:
        for param, value in zip(self.params, values, strict=True):
            param.copy_(value)
        drop_gathered_params(self.policy)

    @torch.no_grad()
    def soft_update(self, decay: float) -> None:
        """theta_old <- decay theta_old + (1 - decay) theta."""
        for param, old in zip(self.params, self.weights, strict=True):
            old.mul_(decay).add_(param.detach().to(old.dtype), alpha=1 - decay)


def build_reward(config: TrainConfig, device: torch.device, prompts: list[str]) -> Reward:
    """The run's reward (``evaluation.rewards.Reward``): the --reward scorers in this process, or
    the server at --reward_url (unreachable: one line at start-up); every prompt is checked
    against what the rewards read from it."""
    if config.reward_url:
        reward = RemoteReward(config.reward_url, config.reward, config.reward_weights)
        reward.check()
    else:
        where = config.reward_device or str(device)
        reward = ScorerReward.from_flags(config.reward, config.reward_weights, where)
    reward.check_prompts(prompts)
    return reward


def log_samples(
    path: Path,
    step: int,
    collection: int,
    prompts: list[str],
    group_ids: torch.Tensor,
    rewards: torch.Tensor,
    components: dict[str, torch.Tensor],
    advantages: torch.Tensor,
) -> None:
    """One JSON line per scored image (every process's, in rank order): its prompt and group,
    each reward component, the combined reward and the advantage it is trained with."""
    with open(path, "a") as f:
        for i, prompt in enumerate(prompts):
            row = {"step": step, "collection": collection, "prompt": prompt,
                   "group": int(group_ids[i]), "reward": float(rewards[i]),
                   **{name: float(v[i]) for name, v in components.items()},
                   "advantage": float(advantages[i])}  # fmt: skip
            f.write(json.dumps(row) + "\n")


class OnlineTrainer:
    """Collects and trains; ``accumulate`` is the online counterpart of train.py's
    ``accumulate_gradients`` (one optimizer step's micro-batches)."""

    def __init__(
        self,
        config: TrainConfig,
        accelerator: Accelerator,
        models: Any,  # models.Components
        policy: torch.nn.Module,  # as prepared by accelerate
        loss_fn: LossFn,
        reward: Reward,
    ):
        self.config, self.accelerator, self.models = config, accelerator, models
        self.policy, self.loss_fn, self.reward = policy, loss_fn, reward
        self.kind = get_spec(config.loss).online
        family, process = models.family, models.noise_scheduler
        self.schedule = family.sampling_schedule(process, config.sampling_steps, config.sde_type)
        build_sampler(config, self.schedule, self.kind, 0)  # a bad setting fails at start-up
        vae_config = models.latent_encoder.config
        side = config.resolution // vae_scale_factor(vae_config)
        self.latent_shape = (vae_config["latent_channels"], side, side)
        self.batches_per_collection = config.collect_batches or config.gradient_accumulation_steps
        self.collections = 0
        self.current: Collection | None = None
        self.collect_seconds = 0.0  # of the optimizer step in progress (``timed``)
        self.samples_path: Path | None = None  # train.py: OUTPUT_DIR/SAMPLES_FILE
        self.old = OldPolicy(policy, models.policy) if self.kind == ENDPOINT else None
        self.register_checkpoint_hooks()

    def describe(self) -> list[str]:
        """The start-up block's lines on collection and updates."""
        config = self.config
        sampler = build_sampler(config, self.schedule, self.kind, 0)
        noisy = [i for i, level in enumerate(sampler.noise_levels) if level > 0]
        images = config.train_batch_size * config.group_size
        batches = self.batches_per_collection
        steps = batches * config.inner_epochs // config.gradient_accumulation_steps
        if self.kind == TRAJECTORY:
            trained = f"trained steps {list(sampler.trained_steps)}{self.describe_steps(sampler)}"
        else:
            count = trained_count(self.schedule.num_steps, config.trained_steps_fraction)
            trained = f"{count} re-noised timesteps per image trained"
        lines = [
            f"online: {config.group_size} images per prompt, {self.schedule.num_steps} sampler "
            f"steps (noise {max(sampler.noise_levels)} at steps {noisy}), guidance "
            f"{config.guidance_scale}; {trained}",
            f"collection: {batches} batches x {images} images per process, {config.inner_epochs} "
            f"inner epoch(s) = {steps} optimizer step(s) per collection",
        ]
        if config.filter_zero_advantages:
            lines.append(
                "images whose advantage is exactly 0 are left out of training (their KL term "
                "too); each optimizer step averages over the images it keeps on each process"
            )
        return lines

    def describe_steps(self, sampler: Sampler) -> str:
        """How the trained steps change between collections or images (grpo)."""
        config = self.config
        if sampler.steps_per_sample:
            return (
                f": each image trains {sampler.steps_per_sample} of them, its own seeded shuffle "
                "(DanceGRPO)"
            )
        if not config.sde_window_size:
            return ""
        if config.sde_window_schedule == "random":
            return f" (a window of {config.sde_window_size}, drawn per collection)"
        low, high = window_bounds(config)
        starts = progressive_starts(config)
        return (
            f" (first collection; a window of {config.sde_window_size} moving by "
            f"{config.sde_window_shift} every {config.sde_window_every} collections over steps "
            f"{low}..{high - 1}, starts {starts[0]}..{starts[-1]}, then back to {low}: MixGRPO)"
        )

    # ------------------------------------------------------------------ collection
    def condition(self, prompts: list[str], repeats: int) -> tuple[dict, dict | None]:
        """The denoiser's conditioning for ``prompts`` [P] repeated ``repeats`` times
        (member-major), and the unconditional one when guidance is on."""
        res = self.config.resolution
        n = len(prompts) * repeats
        geometry = ([(res, res)] * n, [(0, 0)] * n)
        cond = self.models.family.condition(prompts, *geometry)
        uncond = None
        if self.config.guidance_scale != 1.0:
            uncond = self.models.family.condition([""] * len(prompts), *geometry)
        return cond, uncond

    def initial_noise(self, draws: list[int]) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Initial latents [N, *D] (shared by a group with --share_initial_noise) and each
        sample's SDE noise generator, member-major."""
        seed, members = self.config.seed, range(self.config.group_size)
        if self.config.share_initial_noise:
            starts = [sample_generator(seed, INIT_NOISE, d) for g in members for d in draws]
        else:
            starts = [sample_generator(seed, INIT_NOISE, d, g) for g in members for d in draws]
        sde = [sample_generator(seed, SDE_NOISE, d, g) for g in members for d in draws]
        return draw_noise(starts, self.latent_shape), sde

    def sample(self, batch: PromptBatch, sampler: Sampler) -> tuple[Collected, RewardScores]:
        """One prompt batch -> its images' rollouts and rewards, and the reward's scores (total
        and components)."""
        device = self.accelerator.device
        group = self.config.group_size
        cond, uncond = self.condition(batch.prompts, group)
        noise, generators = self.initial_noise(batch.draws)
        kept = None
        if sampler.steps_per_sample:
            kept = shuffled_steps(self.config, sampler, batch.draws)
        with self.old.active() if self.old is not None else nullcontext():
            rollout = sample_rollout(self.policy, self.models.family.forward, sampler,
                                     noise.to(device), generators, cond, uncond,
                                     self.accelerator.autocast, kept)  # fmt: skip
        with torch.no_grad():
            images = decode_images(self.models.latent_encoder.vae, rollout.final)
        scores = self.reward.score(images, batch.prompts * group, batch.metadata * group)
        return Collected(batch.prompts, batch.metadata, batch.draws, rollout.final,
                         rollout.x_t, rollout.x_next, rollout.log_probs,
                         scores.total.float(), None, rollout.steps), scores  # fmt: skip

    def collect(self, batches: Iterator[PromptBatch], state: Any) -> None:
        """Sample, score and normalise a collection (NFT: after soft-updating the old policy
        with the decay of the optimizer steps so far)."""
        config = self.config
        if self.old is not None and self.collections > 0:
            self.old.soft_update(nft_old_decay(state.global_step, config.nft_decay))
        sampler = build_sampler(config, self.schedule, self.kind, self.collections)
        records, scores = [], []
        for _ in range(self.batches_per_collection):
            batch = next(batches)
            state.micro_batches += 1
            state.positions.update({str(k): v for k, v in batch.positions.items()})
            record, score = self.sample(batch, sampler)
            records.append(record)
            scores.append(score)
        metrics = self.normalise(records, scores, state.global_step + 1)
        rng = np.random.default_rng([config.seed, ORDER, self.collections,
                                     self.accelerator.process_index])  # fmt: skip
        order = [int(i) for _ in range(config.inner_epochs)
                 for i in rng.permutation(len(records))]  # fmt: skip
        self.current = Collection(self.collections, records, order, 0, metrics)
        self.collections += 1

    def normalise(
        self, records: list[Collected], scores: list[RewardScores], step: int
    ) -> dict[str, float]:
        """Group advantages over the rewards of every process (gathered in rank order) and the
        step's reward statistics; with ``samples_path`` set, the main process appends every
        image's scores there under ``step``, the optimizer step the collection first feeds."""
        accelerator = self.accelerator
        device = accelerator.device
        local = torch.cat([r.rewards for r in records]).to(device)
        ids = torch.cat([r.group_ids for r in records]).to(device)
        every = accelerator.gather(local).cpu()
        every_ids = accelerator.gather(ids).cpu()
        global_std = self.config.advantage_std == "global"
        advantages = group_advantages(every, every_ids, ADVANTAGE_EPS, global_std)
        start = accelerator.process_index * local.numel()
        mine = advantages[start : start + local.numel()].split([r.rewards.numel() for r in records])
        for record, adv in zip(records, mine, strict=True):
            record.advantages = adv.clone()
        components = {
            name: accelerator.gather(torch.cat([s.components[name] for s in scores]).to(device))
            .cpu()
            for name in scores[0].components
        }  # fmt: skip
        if self.samples_path is not None:  # every process gathers; the main one writes
            prompts = gather_object([r.prompts[n % len(r.prompts)] for r in records
                                     for n in range(r.rewards.numel())])  # fmt: skip
            if accelerator.is_main_process:
                log_samples(self.samples_path, step, self.collections, prompts, every_ids, every,
                            components, advantages)  # fmt: skip
        metrics = reward_stats(RewardScores(every, components), every_ids)
        metrics["online/advantage_std"] = advantages.std(correction=0).item()
        metrics["online/images_scored"] = float((self.collections + 1) * every.numel())
        return metrics

    # ------------------------------------------------------------------ updates
    def accumulate(self, batches: Iterator[PromptBatch], state: Any) -> list[dict[str, float]]:
        """The micro-batches of one optimizer step (collecting first when the last collection
        is used up) -> their metrics; gradients are synchronised at the last backward."""
        accumulation = self.config.gradient_accumulation_steps
        micro_metrics = []
        self.collect_seconds = 0.0
        # A step never spans two collections (config: whole optimizer steps per collection).
        if self.current is None or self.current.exhausted:
            started = time.perf_counter()
            self.collect(batches, state)
            self.collect_seconds += time.perf_counter() - started
        collection = self.current
        first_step = collection.cursor < accumulation
        step_batches = collection.order[collection.cursor : collection.cursor + accumulation]
        kept = sum(int(self.kept(collection.batches[i]).sum()) for i in step_batches)
        for m in range(accumulation):
            record = collection.batches[collection.order[collection.cursor]]
            epoch = collection.cursor // len(collection.batches)
            collection.cursor += 1
            last = m == accumulation - 1
            if self.kind == TRAJECTORY:
                sampler = self.collection_sampler(collection)
                metrics = self.grpo_micro_batch(record, sampler, last, first_step, kept)
            else:
                metrics = self.nft_micro_batch(record, epoch, last, state.global_step)
            micro_metrics.append({**metrics, **collection.metrics})
        return micro_metrics

    def kept(self, record: Collected) -> torch.Tensor:
        """[N] bool: the images that train. With --filter_zero_advantages those whose advantage
        is not exactly 0 (Flow-GRPO's scripts/train_sd3.py "Filter out samples"), a group of
        equal rewards always out: the mean of equal floats can be an ulp off them, which leaves
        an advantage of ~1e-13 instead of 0 (a group lies whole in one micro-batch)."""
        if not self.config.filter_zero_advantages:
            return torch.ones_like(record.advantages, dtype=torch.bool)
        ids = torch.unique(record.group_ids, return_inverse=True)[1]
        low = torch.full((int(ids.max()) + 1,), math.inf).scatter_reduce(
            0, ids, record.rewards.float(), "amin"
        )
        high = torch.full_like(low, -math.inf).scatter_reduce(
            0, ids, record.rewards.float(), "amax"
        )
        return (record.advantages != 0) & (high > low)[ids]

    def timed(
        self, micro_metrics: list[dict[str, float]], seconds: float
    ) -> list[dict[str, float]]:
        """The step's metrics with its wall time (``seconds``: accumulation to the optimizer
        step's end) split into ``time/collect`` (sampling, decoding, scoring, advantages) and
        ``time/update`` (the rest: forwards, backwards, clipping, the optimizer step). Step
        totals, repeated in every micro-batch's metrics so that their average is the total."""
        timing = {"time/collect": self.collect_seconds,
                  "time/update": seconds - self.collect_seconds}  # fmt: skip
        return [{**metrics, **timing} for metrics in micro_metrics]

    def collection_sampler(self, collection: Collection) -> Sampler:
        return build_sampler(self.config, self.schedule, self.kind, collection.index)

    def sync_context(self, last_backward: bool):
        return gradient_sync(self.accelerator, self.policy, last_backward)

    def grpo_micro_batch(
        self, record: Collected, sampler: Sampler, last: bool, first_step: bool, step_kept: int
    ) -> dict[str, float]:
        """Per trained step: ratio of the recomputed to the stored log-prob, the clipped
        objective and the KL to the reference; one backward per step.

        With --filter_zero_advantages the loss (its KL term too) is the mean over this
        micro-batch's kept images, weighted so that the optimizer step's gradient is the mean
        over the ``step_kept`` images its micro-batches keep on this process (the release's
        loop, whose filtered micro-batches are equal in size, averages over them the same way);
        the whole micro-batch still runs through the policy, so the ratios stay those of the
        sampling batch. A micro-batch that keeps no image runs no forward, unless it holds the
        step's last backward: then one zero-valued backward so that every process reaches the
        gradient synchronisation."""
        accelerator, models = self.accelerator, self.models
        device = accelerator.device
        kept = self.kept(record)
        if not kept.any():
            return self.filtered_micro_batch(record, sampler, last)
        rows = None if kept.all() else kept.nonzero().squeeze(1).to(device)
        # Over the step: each kept image weighs 1 / step_kept (accelerate divides by accumulation).
        scale = 1.0
        if self.config.filter_zero_advantages:
            scale = self.config.gradient_accumulation_steps * int(kept.sum()) / step_kept
        cond, uncond = self.condition(record.prompts, self.config.group_size)
        advantages = record.advantages.to(device)
        slots = record.x_t.shape[0]
        totals: dict[str, float] = {}
        ratios = []
        for s in range(slots):
            index = record.index(s, sampler)
            x, x_next = record.x_t[s].to(device), record.x_next[s].to(device)
            old = record.log_probs[s].to(device)
            ref_mean = None
            if models.reference is not None:
                with torch.no_grad():
                    ref_mean = step_log_prob(models.reference, models.family.forward, sampler,
                                             index, x, x_next, cond, uncond,
                                             accelerator.autocast).mean  # fmt: skip
            with self.sync_context(last and s == slots - 1):
                out = step_log_prob(self.policy, models.family.forward, sampler, index, x, x_next,
                                    cond, uncond, accelerator.autocast)  # fmt: skip
                std = sampler.schedule.kl_std(index, out.std)
                kl_mean = out.mean if ref_mean is not None else None
                if rows is None:
                    loss, metrics = self.loss_fn(out.log_prob, old, advantages, kl_mean=kl_mean,
                                                 ref_mean=ref_mean, std=std)  # fmt: skip
                else:
                    loss, metrics = self.loss_fn(*take(rows, out.log_prob, old, advantages),
                                                 kl_mean=take(rows, kl_mean)[0],
                                                 ref_mean=take(rows, ref_mean)[0],
                                                 std=take(rows, std)[0])  # fmt: skip
                accelerator.backward(loss * scale / slots)
            ratios.append(torch.exp(out.log_prob.detach() - old))
            metrics["loss"] *= scale  # what this micro-batch adds to the step's loss
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + value / slots
        ratio = torch.stack(ratios)
        worst = ratio.flatten()[(ratio - 1).abs().argmax()].item()
        return {
            "loss": totals.pop("loss"),
            **{f"online/{name}": value for name, value in totals.items()},
            # Extremes over this micro-batch's samples and trained steps; train.reduce_metrics
            # takes the min / max of them over the step's micro-batches and the processes.
            "online/ratio_min": ratio.min().item(),
            "online/ratio_max": ratio.max().item(),
            # Before the collection's first update every ratio must be exactly 1 (fp32).
            "online/ratio_at_first_step": worst if first_step else math.nan,
            "online/filtered": 1.0 - kept.float().mean().item(),
        }

    def filtered_micro_batch(self, record: Collected, sampler: Sampler, last: bool) -> dict:
        """A micro-batch whose every image is left out: no loss. Holding the step's last
        backward, it still runs one (zero-valued, through the policy's first trained step) so
        that every process reaches the gradient synchronisation (DDP, FSDP: the all-reduce;
        DeepSpeed: the step boundary). Its metrics: loss 0, the loss's own nan (left out of
        the step's averages), 1 image in 1 filtered."""
        accelerator, device = self.accelerator, self.accelerator.device
        if last:
            cond, uncond = self.condition(record.prompts, self.config.group_size)
            with self.sync_context(True):
                out = step_log_prob(self.policy, self.models.family.forward, sampler,
                                    record.index(0, sampler), record.x_t[0].to(device),
                                    record.x_next[0].to(device), cond, uncond,
                                    accelerator.autocast)  # fmt: skip
                accelerator.backward(out.log_prob.sum() * 0.0)
        empty = torch.zeros(0)
        kl = dict(kl_mean=empty[:, None], ref_mean=empty[:, None], std=torch.ones(1, 1))
        _, metrics = self.loss_fn(empty, empty, empty,
                                  **(kl if self.models.reference is not None else {}))  # fmt: skip
        metrics.pop("loss")
        return {
            "loss": 0.0,
            **{f"online/{name}": math.nan for name in metrics},
            "online/ratio_min": math.nan,
            "online/ratio_max": math.nan,
            "online/ratio_at_first_step": math.nan,
            "online/filtered": 1.0,
        }

    def nft_micro_batch(
        self, record: Collected, epoch: int, last: bool, global_step: int
    ) -> dict[str, float]:
        """Per trained step: the clean latents re-noised at a seeded, per-sample permutation of
        the sampler's timesteps; the policy (conditional), the old policy and the reference
        at the same input; one backward per step."""
        accelerator, models, config = self.accelerator, self.models, self.config
        device = accelerator.device
        forward = models.family.forward
        cond, _ = self.condition(record.prompts, config.group_size)
        steps = self.schedule.num_steps
        count = trained_count(steps, config.trained_steps_fraction)
        members = [(d, g) for g in range(config.group_size) for d in record.draws]
        gens = [sample_generator(config.seed, NFT_NOISE, d, g, epoch) for d, g in members]
        order = torch.stack([torch.randperm(steps, generator=gen) for gen in gens])  # [N, steps]
        noise = draw_noise(gens, (count, *record.final.shape[1:]))  # [N, count, *D]
        x0 = record.final.to(device)
        advantages = record.advantages.to(device)
        totals: dict[str, float] = {}
        for j in range(count):
            index = order[:, j]
            x_t, target, scale = self.schedule.noised(x0, noise[:, j].to(device), index)
            t = self.schedule.model_timesteps(index).to(device)
            with torch.no_grad(), accelerator.autocast():
                with self.old.active():
                    v_old = guided_output(self.policy, forward, x_t, t, cond, None, 1.0)
                v_ref = None
                if models.reference is not None:
                    v_ref = guided_output(models.reference, forward, x_t, t, cond, None, 1.0)
            with self.sync_context(last and j == count - 1):
                with accelerator.autocast():
                    v_theta = guided_output(self.policy, forward, x_t, t, cond, None, 1.0)
                loss, metrics = self.loss_fn(v_theta, v_old, target, advantages, scale,
                                             v_ref=v_ref)  # fmt: skip
                accelerator.backward(loss / count)
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + value / count
        decay = nft_old_decay(global_step, config.nft_decay)
        return {
            "loss": totals.pop("loss"),
            **{f"online/{name}": value for name, value in totals.items()},
            "online/old_decay": decay,
        }

    # ------------------------------------------------------------------ checkpoints
    def state_files(self, directory: Path) -> tuple[Path, Path]:
        rank = self.accelerator.process_index
        folder = Path(directory) / STATE_DIR
        return folder / f"rank-{rank}.json", folder / f"rank-{rank}.safetensors"

    def old_policy_name(self) -> str:
        """The old policy's file: one, saved by the main process, or under FSDP one per process
        (each holds its own shards)."""
        if self.old is not None and self.old.sharded:
            return OLD_POLICY_SHARD.format(rank=self.accelerator.process_index)
        return OLD_POLICY_FILE

    def save(self, directory: Path) -> None:
        """This process's collection in progress (and the old policy: ``old_policy_name``)."""
        info_path, tensor_path = self.state_files(directory)
        info_path.parent.mkdir(parents=True, exist_ok=True)
        info: dict[str, Any] = {"collections": self.collections, "collection": None}
        current = self.current
        if current is not None and not current.exhausted:
            tensors = {}
            for i, record in enumerate(current.batches):
                for name in Collected.TENSORS:
                    if getattr(record, name) is not None:  # steps: only when shuffled
                        tensors[f"{i}.{name}"] = getattr(record, name).contiguous().cpu()
            save_file(tensors, str(tensor_path))
            info["collection"] = {
                "index": current.index,
                "order": current.order,
                "cursor": current.cursor,
                "metrics": current.metrics,
                "batches": [
                    {"prompts": r.prompts, "metadata": r.metadata, "draws": r.draws}
                    for r in current.batches
                ],
            }
        info_path.write_text(json.dumps(info) + "\n")
        old = self.old
        if old is not None and (old.sharded or self.accelerator.is_main_process):
            weights = {str(i): w.contiguous().cpu() for i, w in enumerate(old.weights)}
            save_file(weights, str(info_path.parent / self.old_policy_name()))

    def load(self, directory: Path) -> None:
        info_path, tensor_path = self.state_files(directory)
        info = json.loads(info_path.read_text())
        self.collections = info["collections"]
        self.current = None
        saved = info["collection"]
        if saved is not None:
            tensors = load_file(str(tensor_path))
            batches = [
                Collected(
                    **meta, **{name: tensors.get(f"{i}.{name}") for name in Collected.TENSORS}
                )
                for i, meta in enumerate(saved.pop("batches"))
            ]
            self.current = Collection(batches=batches, **saved)
        if self.old is not None:
            weights = load_file(str(info_path.parent / self.old_policy_name()))
            for i, old in enumerate(self.old.weights):
                old.copy_(weights[str(i)])

    def register_checkpoint_hooks(self) -> None:
        """Every process saves and loads its own part with accelerate's state (the hooks run
        on every process; the model hooks registered before run first)."""

        def save_hook(models: list, weights: list, output_dir: str) -> None:
            self.save(Path(output_dir))

        def load_hook(models: list, input_dir: str) -> None:
            self.load(Path(input_dir))

        self.accelerator.register_save_state_pre_hook(save_hook)
        self.accelerator.register_load_state_pre_hook(load_hook)
