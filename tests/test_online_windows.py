"""Which sampler steps grpo stores and trains beyond Flow-GRPO's first ones, and which samples:
MixGRPO's progressive window (fastvideo/utils/grpo_states.py), DanceGRPO's per-image shuffled
subset (fastvideo/train_grpo_flux.py) and Flow-GRPO's zero-advantage filter (scripts/
train_sd3.py "Filter out samples"): the steps each collection and image gets, the start-up
lines, exact ratios through per-image step indices, the gradient a filtered group leaves (none,
not even its KL's; unfiltered, its KL's only), and resumes that continue exactly."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import debug_launcher

import train
from common.cli import UsageError
from diffusion.sampling import FlowSchedule, Sampler, sample_rollout, step_log_prob
from evaluation.rewards import RewardScores
from tests.support import one_thread_per_rank
from tests.test_online_trainer import (
    BrightnessReward,
    base_params,
    flat,
    online_args,
    rank_main,
    resumed_mid_collection,
    setup_run,
)
from training.config import TrainConfig, parse_config
from training.online import build_sampler, shuffled_steps

RED, BLUE = "a red circle on a white background", "a blue square on a black background"


class RedOnlyReward(BrightnessReward):
    """Brightness for prompts naming red; every other prompt's images all score 0.1 (not exact
    in binary: its group mean may be an ulp off, the advantage ~1e-13 rather than 0)."""

    def score(self, images, prompts, metadata=None) -> RewardScores:
        bright = super().score(images, prompts).total
        total = torch.where(torch.tensor(["red" in p for p in prompts]), bright, 0.1)
        return RewardScores(total, {"brightness": total})


@pytest.fixture
def two_prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text(f"{RED}\n{BLUE}\n")
    return path


@pytest.fixture
def red_only(monkeypatch):
    monkeypatch.setattr(train, "build_reward", lambda config, device, prompts: RedOnlyReward())


# --------------------------------------------------------------------------- no model


def test_the_progressive_window_follows_mixgrpo():
    """MixGRPO's released run: 25 steps, a window of 4 from step 0 moving by 1 every 25
    iterations (collections), its end clipped at steps - 2 = 23, back to 0 after start 22;
    noise only inside. Moving by the window's size (no overlap): starts 0, 4, ..., 20."""
    schedule = FlowSchedule(torch.linspace(1, 0, 26))
    config = TrainConfig(sampling_steps=25, sde_window_size=4, sde_window_range="0,23",
                         sde_window_schedule="progressive")  # fmt: skip
    expected = {0: [0, 1, 2, 3], 24: [0, 1, 2, 3], 25: [1, 2, 3, 4], 20 * 25: [20, 21, 22],
                22 * 25 + 24: [22], 23 * 25: [0, 1, 2, 3], 24 * 25: [1, 2, 3, 4]}  # fmt: skip
    for collection, steps in expected.items():
        sampler = build_sampler(config, schedule, "trajectory", collection)
        assert list(sampler.trained_steps) == steps, collection
        assert [i for i, a in enumerate(sampler.noise_levels) if a > 0] == steps
    apart = TrainConfig(sampling_steps=25, sde_window_size=4, sde_window_range="0,23",
                        sde_window_schedule="progressive", sde_window_shift=4,
                        sde_window_every=1)  # fmt: skip
    starts = [build_sampler(apart, schedule, "trajectory", c).trained_steps[0] for c in range(7)]
    assert starts == [0, 4, 8, 12, 16, 20, 0]


def test_shuffled_steps_are_each_images_own_seeded_subset():
    """DanceGRPO's FLUX run: 16 steps, the last never trained, int(15 x 0.6) = 9 of the other
    15 per image in a shuffled order; drawn from the image's own stream (seed, draw, member), so
    an image gets the same steps in any batch (on any process) and on every call."""
    schedule = FlowSchedule(torch.linspace(1, 0, 17))
    config = TrainConfig(sampling_steps=16, trained_steps_order="shuffled",
                         trained_steps_fraction=0.6, group_size=2)  # fmt: skip
    sampler = build_sampler(config, schedule, "trajectory", 0)
    assert sampler.trained_steps == tuple(range(15)) and sampler.steps_per_sample == 9
    assert sampler.noise_levels == (0.7,) * 16  # every step samples with noise, as released
    steps = shuffled_steps(config, sampler, [3, 7])  # [4 images (member-major), 9]
    assert steps.shape == (4, 9)
    for row in steps.tolist():
        assert len(set(row)) == 9 and set(row) <= set(range(15)) and row != sorted(row)
    assert len({tuple(r) for r in steps.tolist()}) == 4
    alone = shuffled_steps(config, sampler, [7])  # draw 7 of members 0 and 1: rows 1 and 3
    assert torch.equal(alone, steps[[1, 3]])
    assert torch.equal(shuffled_steps(config, sampler, [3, 7]), steps)


@pytest.mark.parametrize(
    "extra,message",
    [
        (("--sde_window_schedule", "progressive"), "progressive needs --sde_window_size > 0"),
        (("--trained_steps_order", "shuffled", "--sde_window_size", "2"),
         "drop --sde_window_size"),
        (("--loss", "nft", "--filter_zero_advantages", "true"), "--filter_zero_advantages is grpo"),
        (("--loss", "nft", "--trained_steps_order", "shuffled"), "shuffled is grpo's"),
    ],
)  # fmt: skip
def test_step_choice_mistakes_stop_at_start_up(extra, message, two_prompts):
    args = ["--loss", "grpo", "--prompts", str(two_prompts), "--reward", "toy_warm", *extra]
    with pytest.raises(UsageError, match=message):
        parse_config(args)


# --------------------------------------------------------------------------- tiny models


def test_shuffled_steps_are_stored_per_image_and_recompute_exactly(
    tiny_sd3_dir, red_only, two_prompts, tmp_path
):
    """4 steps, int(3 x 0.7) = 2 of steps 0..2 per image: slot j of image n holds the latents
    and log-prob that a rollout keeping every step has at step steps[j, n]; recomputed with
    per-image step indices, the first update's ratios are exactly 1."""
    run = setup_run(online_args(tiny_sd3_dir, two_prompts, tmp_path / "out", "grpo",
                                "--trained_steps_order", "shuffled", "--sampling_steps", "4",
                                "--trained_steps_fraction", "0.7", "--max_train_steps", "1",
                                "--guidance_scale", "2"))  # fmt: skip
    online = run.online
    assert "trained steps [0, 1, 2]: each image trains 2 of them" in online.describe()[0]
    online.collect(run.batches, run.state)
    (record,) = online.current.batches
    sampler = online.collection_sampler(online.current)
    assert torch.equal(record.steps, shuffled_steps(run.config, sampler, record.draws).T)
    assert record.steps.shape == (2, 6) and len({tuple(c) for c in record.steps.T.tolist()}) > 1
    every = Sampler(sampler.schedule, sampler.noise_levels, (0, 1, 2), sampler.guidance_scale)
    noise, generators = online.initial_noise(record.draws)
    cond, uncond = online.condition(record.prompts, run.config.group_size)
    full = sample_rollout(run.policy, run.models.family.forward, every, noise, generators, cond,
                          uncond, run.accelerator.autocast)  # fmt: skip
    images = torch.arange(6)
    for slot in range(2):
        at = record.steps[slot]
        assert torch.equal(record.x_t[slot], full.x_t[at, images])
        assert torch.equal(record.x_next[slot], full.x_next[at, images])
        assert torch.equal(record.log_probs[slot], full.log_probs[at, images])
    assert torch.equal(record.final, full.final)
    (metrics,) = online.accumulate(run.batches, run.state)
    assert metrics["online/ratio_at_first_step"] == 1.0
    assert metrics["online/ratio_min"] == metrics["online/ratio_max"] == 1.0


def test_progressive_window_samples_and_trains_only_its_steps(
    tiny_sd15_dir, red_only, two_prompts, tmp_path
):
    """4 DDIM steps, a window of 2 moving by 1 every collection over steps 0..2 (clipped at 3):
    collections 0, 1, 2, 3 store steps [0, 1], [1, 2], [2], [0, 1]; noise only there."""
    run = setup_run(online_args(tiny_sd15_dir, two_prompts, tmp_path / "out", "grpo",
                                "--sampling_steps", "4", "--sde_window_size", "2",
                                "--sde_window_schedule", "progressive", "--sde_window_every", "1",
                                "--train_batch_size", "1"))  # fmt: skip
    online = run.online
    assert online.describe()[0].endswith(
        "trained steps [0, 1] (first collection; a window of 2 moving by 1 every 1 collections "
        "over steps 0..2, starts 0..2, then back to 0: MixGRPO)"
    )
    for expected in ([0, 1], [1, 2], [2], [0, 1]):
        online.collect(run.batches, run.state)
        sampler = online.collection_sampler(online.current)
        assert list(sampler.trained_steps) == expected
        assert [i for i, a in enumerate(sampler.noise_levels) if a > 0] == expected
        assert online.current.batches[0].x_t.shape[0] == len(expected)


def test_a_filtered_group_leaves_no_gradient_and_unfiltered_only_its_kl(
    tiny_sd15_dir, red_only, two_prompts, tmp_path
):
    """Two micro-batches of one step: the red group (rewards spread) and the blue one (all 0.1).
    The policy is moved off the reference first, so the KL term has a gradient. Filtered, the
    step's gradient is the red group's own loss gradient (the mean over the 3 images kept), the
    blue micro-batch, last, running only its zero backward; unfiltered, it is half of that plus
    half the gradient of the blue group's KL term, written out here by hand."""
    args = ("--train_batch_size", "1", "--gradient_accumulation_steps", "2", "--kl_coef", "0.5",
            "--filter_zero_advantages", "true")  # fmt: skip
    run = setup_run(online_args(tiny_sd15_dir, two_prompts, tmp_path / "out", "grpo", *args))
    online, policy, config = run.online, run.policy, run.config
    assert "images whose advantage is exactly 0 are left out" in online.describe()[2]
    online.collect(run.batches, run.state)
    collection = online.current
    red = next(i for i, r in enumerate(collection.batches) if r.prompts == [RED])
    blue = 1 - red
    assert collection.batches[blue].prompts == [BLUE]
    assert collection.batches[red].advantages.abs().min() > 0
    collection.order = [red, blue]  # the filtered micro-batch holds the step's last backward
    params = [p for p in policy.parameters() if p.requires_grad]
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for p in params:
            p.add_(1e-2 * torch.randn(p.shape, generator=generator))
    sampler = online.collection_sampler(collection)

    def by_hand(record, kl_only: bool) -> torch.Tensor:
        """The gradient of the micro-batch's mean loss over its trained steps."""
        policy.zero_grad(set_to_none=True)
        cond, uncond = online.condition(record.prompts, config.group_size)
        forward, autocast = run.models.family.forward, run.accelerator.autocast
        for s, index in enumerate(sampler.trained_steps):
            args = (index, record.x_t[s], record.x_next[s], cond, uncond, autocast)
            with torch.no_grad():
                ref = step_log_prob(run.models.reference, forward, sampler, *args)
            out = step_log_prob(policy, forward, sampler, *args)
            std = sampler.schedule.kl_std(index, out.std)
            if kl_only:  # kl_coef mean_B mean_D (mean - mean_ref)^2 / (2 std^2)
                loss = 0.5 * ((out.mean - ref.mean) ** 2 / (2 * std**2)).mean()
            else:
                loss, _ = online.loss_fn(out.log_prob, record.log_probs[s], record.advantages,
                                         kl_mean=out.mean, ref_mean=ref.mean, std=std)  # fmt: skip
            (loss / len(sampler.trained_steps)).backward()
        return flat(p.grad for p in params).clone()

    red_grad = by_hand(collection.batches[red], kl_only=False)
    blue_kl = by_hand(collection.batches[blue], kl_only=True)
    assert blue_kl.abs().max() > 0

    for filtering, expected in ((True, red_grad), (False, (red_grad + blue_kl) / 2)):
        config.filter_zero_advantages = filtering
        collection.cursor = 0
        policy.zero_grad(set_to_none=True)
        first, second = online.accumulate(run.batches, run.state)
        got = flat(p.grad for p in params)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6 * expected.abs().max())
        assert first["online/filtered"] == 0.0
        assert second["online/filtered"] == (1.0 if filtering else 0.0)
        if filtering:
            assert second["loss"] == 0.0 and np.isnan(second["online/kl_loss"])
            assert first["loss"] == pytest.approx(2 * first["online/policy_loss"]
                                                  + 2 * 0.5 * first["online/kl_loss"])  # fmt: skip


@pytest.mark.parametrize(
    "extra",
    [
        ("--sde_window_size", "2", "--sde_window_schedule", "progressive",
         "--sde_window_every", "1", "--sampling_steps", "4"),
        ("--trained_steps_order", "shuffled", "--sampling_steps", "4",
         "--trained_steps_fraction", "0.7", "--filter_zero_advantages", "true"),
    ],
    ids=["progressive", "shuffled-filtered"],
)  # fmt: skip
def test_resume_mid_collection_equals_an_uninterrupted_run(extra, tiny_sd15_dir, red_only,
                                                           two_prompts, tmp_path):  # fmt: skip
    """Two optimizer steps per collection, three steps: resumed after step 1 (mid-collection),
    steps 2 and 3 (the 2nd collection: the window moved, new images and their own steps) match
    the uninterrupted run exactly."""
    resumed_mid_collection(tiny_sd15_dir, two_prompts, tmp_path, "grpo", *extra)


def test_a_process_whose_samples_are_all_filtered_still_reaches_the_gradient_sync(
    tiny_sd15_dir, two_prompts, tmp_path, monkeypatch
):
    """2 processes, one prompt each per step: the one with the blue group keeps no image, runs
    its zero backward only, and the all-reduce completes (no hang); both end on the same
    weights, which moved (the red group's gradient, averaged with the other's zero)."""
    with one_thread_per_rank(monkeypatch):
        report = tmp_path / "report"
        report.mkdir()
        extra = ("--train_batch_size", "1", "--filter_zero_advantages", "true")
        args = online_args(tiny_sd15_dir, two_prompts, tmp_path / "two", "grpo", *extra)
        debug_launcher(rank_main, args=(args, str(report), RedOnlyReward), num_processes=2)
    ranks = [json.loads((report / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [step["online/filtered"] for step in ranks[0]] == [0.5, 0.5]
    params = [torch.load(report / f"params-{r}.pt") for r in range(2)]
    assert torch.equal(params[0], params[1]), "ranks diverged"
    assert not torch.equal(params[0], flat(base_params(tiny_sd15_dir).values()))
