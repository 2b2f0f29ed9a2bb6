"""scripts/toy_benchmark.py's pieces: settings lines, the every-loss check, label flipping, the
run plan, and the report's per-loss row against hand-computed numbers; the validation / test
split of the held-out prompts and the report reading the test split; the online arms' flags,
matched budgets, comparison table and plot; and (once the online losses are registered) one
online arm end to end on the tiny model."""

from __future__ import annotations

import argparse
import random

import pandas as pd
import pytest

from losses import loss_names
from models.generation import Generation, save_generations
from scripts.build_toy_data import draw_scene
from scripts.build_toy_prefs import (
    HELDOUT_PROMPTS,
    TEST_PROMPTS,
    TRAIN_PROMPTS,
    VALIDATION_PROMPTS,
    caption_colour,
    split_prompt_file,
    toy_eval_split,
    toy_prompt_split,
)
from scripts.toy_benchmark import (
    NOISY_TASK,
    Job,
    budget_steps,
    check_every_loss,
    checkpoint_evals,
    eval_dir,
    flip_labels,
    full_benchmark_variants,
    offline_budgets,
    parse_args,
    parse_variants,
    plan_jobs,
    run_checkpoint_eval,
    run_job,
    score_task,
    store_record,
    stored_record,
    train_argv,
)
from scripts.toy_benchmark_report import (
    RunMetrics,
    loss_row,
    stalled_share,
    training_signal_row,
    write_report,
)
from training.config import CAPTION_DROPOUT

SETTINGS = """
dpo  beta=1000 learning_rate=1e-4 max_train_steps=300   # released 5000
kto  beta=1000 max_train_steps=600 kto_desirable_prob=0.5
kto_b16 loss=kto tasks=warm beta=1000 max_train_steps=600 train_batch_size=16
dpo_smoothed loss=dpo beta=1000 label_smoothing=0.3 max_train_steps=300
"""


def test_settings_lines_become_variants_with_train_flags():
    variants = parse_variants(SETTINGS)
    assert list(variants) == ["dpo", "kto", "kto_b16", "dpo_smoothed"]
    assert variants["kto_b16"].tasks == ("warm",) and variants["dpo"].tasks == ()
    assert "tasks" not in variants["kto_b16"].flags
    assert variants["dpo"].flags == {
        "beta": "1000", "learning_rate": "1e-4", "max_train_steps": "300"
    }  # fmt: skip
    assert variants["dpo_smoothed"].loss == "dpo"
    assert variants["dpo_smoothed"].flags["label_smoothing"] == "0.3"
    assert variants["kto"].steps == 600


@pytest.mark.parametrize(
    "text, message",
    [
        ("dpo beta 1000 max_train_steps=3", "is not key=value"),
        ("dpo beta=1000", "max_train_steps is required"),
        ("dpo max_train_steps=3\ndpo max_train_steps=4", "defined twice"),
    ],
)
def test_bad_settings_lines_are_named(text, message):
    with pytest.raises(ValueError, match=message):
        parse_variants(text)


def test_a_registered_loss_without_settings_stops_the_benchmark():
    variants = parse_variants(SETTINGS)
    with pytest.raises(ValueError, match=r"registered loss\(es\) \['sft'\]"):
        check_every_loss(variants, ["dpo", "kto", "sft"])
    check_every_loss(variants, ["dpo", "kto"])  # extra variants of registered losses are fine
    with pytest.raises(ValueError, match="loss=nope is not a registered loss"):
        check_every_loss(
            parse_variants("x max_train_steps=1\ny loss=nope max_train_steps=1"), ["x"]
        )


def test_flipping_swaps_the_labels_of_the_asked_share_and_nothing_else(tmp_path):
    source = tmp_path / "colour"
    (source / "pickapic").mkdir(parents=True)
    (source / "heldout").mkdir()
    rows = pd.DataFrame(
        {"caption": [f"c{i}" for i in range(10)], "label_0": [1.0, 0.0] * 5,
         "label_1": [0.0, 1.0] * 5, "jpg_0": [b"a"] * 10, "jpg_1": [b"b"] * 10}
    )  # fmt: skip
    rows.to_parquet(source / "pickapic" / "train.parquet", index=False)
    rows.to_parquet(source / "heldout" / "pairs.parquet", index=False)
    assert flip_labels(source, tmp_path / "noisy", 0.3, seed=0) == 3
    flipped = pd.read_parquet(tmp_path / "noisy" / "pickapic" / "train.parquet")
    changed = flipped["label_0"] != rows["label_0"]
    assert changed.sum() == 3
    assert (flipped["label_0"] + flipped["label_1"] == 1.0).all()
    assert flipped[["caption", "jpg_0", "jpg_1"]].equals(rows[["caption", "jpg_0", "jpg_1"]])
    held = pd.read_parquet(tmp_path / "noisy" / "heldout" / "pairs.parquet")
    assert held.equals(rows)  # evaluation pairs stay clean
    again = flip_labels(source, tmp_path / "noisy2", 0.3, seed=0)
    assert again == 3 and pd.read_parquet(
        tmp_path / "noisy2" / "pickapic" / "train.parquet"
    ).equals(flipped)


def test_the_plan_holds_every_table_once():
    args = argparse.Namespace(
        tasks=["colour", "warm"], main=["dpo", "kto", "kto_b16"], train_seeds=[0, 1], wide=["dpo"],
        wide_seeds=[0, 1, 2], frontier=["dpo:300,1000"], frontier_task="colour",
        frontier_seeds=[0, 1], noisy=["dpo", "dpo_smoothed"], noisy_seeds=[0, 1],
    )  # fmt: skip
    jobs = plan_jobs(args, parse_variants(SETTINGS))
    names = {(j.task, j.name) for j in jobs}
    assert len(names) == len(jobs)  # no run twice
    assert jobs[0].variant is None  # the base first
    assert {("colour", f"dpo-s{s}") for s in (0, 1, 2)} <= names  # wide seeds
    assert ("colour", "kto-s2") not in names and ("warm", "kto-s1") in names
    assert ("warm", "kto_b16-s0") in names and ("colour", "kto_b16-s0") not in names
    # The frontier adds beta 300 only: beta 1000 is the main table's run.
    assert {n for t, n in names if "-b" in n} == {"dpo-b300-s0", "dpo-b300-s1"}
    assert next(j for j in jobs if j.name == "dpo-b300-s0").overrides == {"beta": "300"}
    assert {("colour-noisy", "dpo-s0"), ("colour-noisy", "dpo_smoothed-s1")} <= names
    assert ("colour", "dpo_smoothed-s0") in names  # its clean runs, for the drop noise causes
    assert NOISY_TASK == "colour-noisy"


def test_the_full_command_runs_every_loss_and_the_wide_variants():
    variants = parse_variants(SETTINGS)
    registered = ["dpo", "grpo", "kto", "nft", "sft"]
    main = full_benchmark_variants(registered, ["dpo", "kto_b16", "absent"], variants)
    # kto_b16 is a WIDE variant, not a loss: the full command runs it too (it was skipped
    # before: the plan runs only the main table's names); a name without a line is not added.
    # The online losses are COMPARE=1's: they sample instead of reading the pairs.
    assert main == ["dpo", "kto", "sft", "kto_b16"]


def test_runs_drop_captions_as_the_released_trainers_unless_told():
    """Without dropped captions, DPO never trains the unconditional branch that guidance
    subtracts (README, "Toy benchmark"); a variant's own flag still wins (argparse: last)."""
    variants = parse_variants(SETTINGS + "dpo_cd0 loss=dpo max_train_steps=3 caption_dropout=0\n")

    def dropout(argv_extra, variant):
        args = parse_args(["--variants", "v.txt", *argv_extra])
        argv = train_argv(args, Job("colour", "x", variants[variant]), args.out, args.out)
        return [argv[i + 1] for i, flag in enumerate(argv) if flag == "--caption_dropout"]

    assert CAPTION_DROPOUT == 0.2
    assert dropout([], "dpo") == ["0.2"]
    assert dropout(["--caption_dropout", "0.1"], "dpo") == ["0.1"]
    assert dropout([], "dpo_cd0") == ["0.2", "0"]


def test_resume_keeps_a_finished_run_only_while_its_settings_hold(tmp_path):
    variants = parse_variants(SETTINGS)
    args = parse_args(["--variants", "v.txt", "--out", str(tmp_path), "--resume"])
    job = Job("warm", "dpo-s0", variants["dpo"], 0)
    eval_dir(args, "warm", "dpo-s0").mkdir(parents=True)
    assert stored_record(args, job) is None  # never finished
    record = {"task": "warm", "name": "dpo-s0", "seed": 0, "history": [], "train_s": 1.0}
    store_record(args, job, record)
    assert stored_record(args, job) == record
    # Reused: no training (there is no data to train on), and marked so for the report.
    assert run_job(args, job) == {**record, "reused": True}
    changed = [
        Job("warm", "dpo-s0", variants["dpo"], 1),  # another seed
        Job("warm", "dpo-s0", variants["dpo"], 0, {"beta": "300"}),  # the frontier's override
        Job("warm", "dpo-s0", parse_variants("dpo beta=5 max_train_steps=300")["dpo"], 0),
    ]
    assert all(stored_record(args, other) is None for other in changed)
    args.caption_dropout = 0.0  # a common setting
    assert stored_record(args, job) is None
    args.caption_dropout, args.split = CAPTION_DROPOUT, "validation"  # the other split's images
    assert stored_record(args, job) is None
    args.split = "test"
    assert stored_record(args, job) == record


def test_a_loss_row_by_hand():
    def run(seed, hits, shape, drift, implicit):
        return RunMetrics("colour", f"dpo-s{seed}", "dpo", seed, 100, hits / 100, hits, shape,
                          0.9, drift, implicit, 0.5, stalled=0.1 * seed)  # fmt: skip

    base = RunMetrics("colour", "base", "base", 0, 100, 0.3, 30, 0.7, 1.0, 0.0, None, None)
    row = loss_row("dpo", [run(0, 50, 0.6, 1.0, 0.8), run(1, 70, 0.8, 3.0, 0.9)], base)
    cells = [c.strip() for c in row.strip("|").split("|")]
    # mean 60%, worst 50%; Wilson interval of 120 / 200; gains +20 and +40.
    assert cells[:4] == ["dpo", "2", "60.0%", "50.0%"]
    assert cells[4] == "[53.1, 66.5]"
    assert cells[5] == "+30.0 (worst +20.0)"
    assert cells[6:] == ["70.0%", "0.90", "2.00", "85.0%", "5.0%", "0.50"]


def test_stalled_steps_are_those_without_gradient_relative_to_the_largest():
    history = [{"grad_norm": g} for g in (100.0, 5.0, 1e-3, 1e-5, 0.0)] + [{"loss": 1.0}]
    # threshold 1e-6 x 100 = 1e-4: 1e-5 and 0 stall, 1e-3 still moves; rows without a norm skip.
    assert stalled_share(history) == 2 / 5
    assert stalled_share([{"loss": 1.0}]) is None
    assert stalled_share([{"grad_norm": 0.0}]) is None  # never any gradient: not a ratio


# --------------------------------------------------------------------------- the splits


def test_validation_and_test_are_disjoint_seeded_halves_of_the_heldout_prompts():
    train, heldout = toy_prompt_split()
    splits = toy_eval_split(heldout)
    validation, test = splits["validation"], splits["test"]
    assert not set(validation) & set(test)
    assert sorted(validation + test) == sorted(heldout)
    # One prompt per colour in each: the base's colour rate differs by colour.
    for prompts in (validation, test):
        assert sorted(caption_colour(c) for c in prompts) == sorted(
            {caption_colour(c) for c in heldout}
        )
    assert toy_eval_split(heldout) == splits  # deterministic
    assert any(toy_eval_split(heldout, seed)["test"] != test for seed in range(1, 5))  # seeded
    # The shipped files are these lists; training prompts (and so the offline pairs) untouched.
    assert split_prompt_file("validation") == VALIDATION_PROMPTS
    assert TEST_PROMPTS.read_text().splitlines() == test
    assert VALIDATION_PROMPTS.read_text().splitlines() == validation
    assert HELDOUT_PROMPTS.read_text().splitlines() == heldout
    assert TRAIN_PROMPTS.read_text().splitlines() == train and not set(train) & set(heldout)


def scene(prompt: str, right: bool, rng: random.Random):
    """A toy scene of the caption's shape, in its colour or (right=False) in another."""
    words = prompt.split()
    colour, shape, background = words[1], words[2], words[5]
    if not right:
        colour = "blue" if colour != "blue" else "red"
    return draw_scene(rng, colour, shape, background)


def write_eval(args, task: str, name: str, split: str, right: int) -> None:
    """The split's prompts, one image each, the first ``right`` in the caption's colour."""
    rng = random.Random(0)
    prompts = split_prompt_file(split).read_text().splitlines()
    images = [
        Generation(i, p, i, scene(p, i < right, rng)) for i, p in enumerate(prompts)
    ]  # fmt: skip
    save_generations(eval_dir(argparse.Namespace(out=args.out, split=split), task, name), images)


def fake_benchmark(tmp_path, split: str) -> dict:
    """A finished benchmark without training: eval folders of drawn scenes for both splits
    (the validation split's all in the wrong colour), records as run_job and the budget phase
    leave them, scored with evaluate.py for ``split``."""
    args = parse_args(["--variants", "v.txt", "--out", str(tmp_path), "--split", split])
    test_right = {"base": 1, "dpo-s0": 3, "grpo-s0@21": 4, "grpo-s0": 6}
    for name, right in test_right.items():
        task = "base" if name == "base" else "colour"
        write_eval(args, task, name, "test", right)
        write_eval(args, task, name, "validation", 0)
    history = [{"online/images_scored": 32.0 * (i + 1), "reward/mean": 0.5} for i in range(42)]
    records = [
        {"task": "base", "name": "base", "seed": 0, "history": []},
        {"task": "colour", "name": "dpo-s0", "seed": 0, "history": [], "steps": 400,
         "train_s": 64.0, "train_cpu_s": 60.0, "online": False},
        {"task": "colour", "name": "grpo-s0", "seed": 0, "history": history, "steps": 42,
         "train_s": 200.0, "train_cpu_s": 210.0, "online": True,
         "saved_steps": [7, 14, 21, 28, 35, 42]},
    ]  # fmt: skip
    stats = {"colour": {"train_prompts": 42, "heldout_prompts": 12, "images_per_prompt": 16,
                        "build_cpu_s": 54.0, "train_reward_rate": 0.3, "train_pairs": 266,
                        "heldout_pairs": 74}}  # fmt: skip
    budgets = offline_budgets(records, stats)
    evals = checkpoint_evals(records, budgets)
    assert [e.name for e in evals] == ["grpo-s0@21"]
    records.append(
        {"task": "colour", "name": "grpo-s0@21", "seed": 0, "parent": "grpo-s0", "step": 21,
         "images_scored": evals[0].images_scored, "cpu_s": evals[0].cpu_s, "history": []}
    )  # fmt: skip
    scores = score_task(args, "colour", ["dpo-s0", "grpo-s0", "grpo-s0@21"])
    settings = {k: str(v) if k == "out" else v for k, v in vars(args).items()}
    settings |= {"main": ["dpo", "grpo"], "eval_seeds": 1}
    return {"settings": settings, "variants": {}, "data": stats, "budgets": budgets,
            "records": records, "scores": {"colour": str(scores)},
            "timings": {"data_s": 1.0, "runs_s": 1.0, "total_s": 2.0}}  # fmt: skip


def test_the_report_reads_the_test_split_and_compares_methods_at_matched_budgets(tmp_path):
    result = fake_benchmark(tmp_path, "test")
    scored = pd.read_csv(tmp_path / "scores" / "test" / "colour" / "scores.csv")
    assert set(scored["prompt"]) == set(TEST_PROMPTS.read_text().splitlines())
    text = write_report(result, tmp_path / "results")
    assert "The **test** split of the held-out prompts" in text
    assert "Training seeds: [0, 1, 2] (dpo, kto: [0, 1, 2, 3, 4])." in text
    assert "| colour | base | 6 | 16.7% |" in text  # 1 of the 6 test images: not validation's 0
    assert "| grpo | 1 | 100.0% |" in text  # the main table: the final weights, not checkpoints
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line
            for line in text.splitlines() if line.startswith(("| dpo |", "| grpo |"))}  # fmt: skip
    # Offline: 672 images (42 x 16), CPU 54 x 42 / 54 + 60 = 102 s. GRPO: 32 images a step, its
    # 210 s spread over 42 steps: 672 images at step 21 (105 s), also the nearest to dpo's CPU.
    cells = [c.strip() for c in rows[("dpo", "final")].strip("|").split("|")]
    assert cells[2:9] == ["1", "672", "102", "50.0%", "50.0%", "+33.3 (worst +33.3)",
                          "100.0% (worst 100.0%)"]  # fmt: skip
    for label in ("images = offline's (672)", "CPU = dpo's (102 s)"):
        cells = [c.strip() for c in rows[("grpo", label)].strip("|").split("|")]
        assert cells[2:6] == ["1", "672", "105", "66.7%"]
    cells = [c.strip() for c in rows[("grpo", "final")].strip("|").split("|")]
    assert cells[2:6] == ["1", "1344", "210", "100.0%"]
    bar = "| grpo | True (worst +83.3) | True (worst 100.0%, base 100.0%) | True (66.7% vs 50.0%) |"
    assert bar in text  # +40 in every seed, shapes kept, beats dpo at equal images
    assert "| colour | grpo-s0@21 | 6 | 66.7% |" in text  # every evaluated checkpoint is listed
    assert (tmp_path / "results" / "toy_online_vs_offline.png").stat().st_size > 5000
    validation = fake_benchmark(tmp_path / "v", "validation")
    validation["settings"]["wide"] = []  # as COMPARE=1: no variant gets more seeds
    text = write_report(validation, tmp_path / "v" / "results")
    assert "The **validation** split" in text and "| colour | base | 6 | 0.0% |" in text
    assert "Training seeds: [0, 1, 2].\n" in text


# --------------------------------------------------------------------------- online arms


def test_online_lines_sample_the_training_prompts_rewarded_by_the_tasks_rule():
    variants = parse_variants(
        "grpo group_size=8 train_batch_size=4 max_train_steps=42 eval_every=7\n"
        "dpo beta=1000 max_train_steps=400\n"
    )
    assert variants["grpo"].eval_every == 7 and "eval_every" not in variants["grpo"].flags
    args = parse_args(["--variants", "v.txt"])
    for task, rule in (("colour", "toy_colour"), ("warm", "toy_warm")):
        argv = train_argv(args, Job(task, "grpo-s0", variants["grpo"]), args.out, args.out, True)
        flag = dict(zip(argv[::2], argv[1:][::2], strict=False))
        assert flag["--prompts"] == str(TRAIN_PROMPTS) and flag["--reward"] == rule
        assert flag["--checkpointing_steps"] == "7" and flag["--train_batch_size"] == "4"
        assert not {"--data", "--csv", "--caption_dropout", "--checkpoints_total_limit"} & set(argv)
    offline = train_argv(args, Job("colour", "dpo-s0", variants["dpo"]), args.out, args.out)
    assert "--prompts" not in offline and "--checkpoints_total_limit" in offline
    with pytest.raises(ValueError, match="eval_every=0 is not a positive integer"):
        parse_variants("grpo max_train_steps=4 eval_every=0")


def test_matched_budgets_by_hand():
    """32 images and 5 CPU s a step: 672 images first at step 21; dpo's 115 s nearest at 21
    (105 s, against 140 s at 28); kto's 189 s at 35 (175 s, against 210 s at 42)."""
    record = {"steps": 42, "saved_steps": [7, 14, 21, 28, 35, 42], "train_cpu_s": 210.0,
              "history": [{"online/images_scored": 32.0 * (i + 1)} for i in range(42)]}  # fmt: skip
    budget = {"images": 672, "cpu_s": {"dpo": 115.0, "kto": 189.0}}
    assert budget_steps(record, budget) == {"images": 21, "cpu:dpo": 21, "cpu:kto": 35, "final": 42}
    assert record["images_scored"] == 1344 and record["cpu_s"] == 210.0
    assert budget_steps(record, {"images": 5000, "cpu_s": {}}) == {"images": 42, "final": 42}
    runs = [{"task": "colour", "name": "grpo-s1", "seed": 1, "online": True, **record}]
    evals = checkpoint_evals(runs, {"colour": budget})
    assert [(e.name, e.images_scored, e.cpu_s) for e in evals] == [
        ("grpo-s1@21", 672.0, 105.0), ("grpo-s1@35", 1120.0, 175.0)
    ]  # fmt: skip


def test_the_training_signal_of_an_online_run_by_hand():
    """42 steps of 32 images: the first 7 at reward 0.25, the last 7 at 0.5: +25.0 points,
    half-width 1.96 sqrt(.25 x .75 / 224 + .5 x .5 / 224) = 8.66; a quarter of the groups flat
    on every step, clip fraction 0.1, approx. KL 0.002 (nan steps skipped)."""
    kl = [float("nan")] + [0.002] * 41
    history = [{"online/images_scored": 32.0 * (i + 1), "reward/mean": 0.25 if i < 21 else 0.5,
                "reward/zero_spread_groups": 0.25, "online/clipfrac": 0.1,
                "online/approx_kl": kl[i]} for i in range(42)]  # fmt: skip
    row = training_signal_row({"name": "grpo-s0", "history": history})
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["grpo-s0", "7 + 7", "25.0%", "50.0%", "+25.0 [+16.3, +33.7]", "25.0%",
                     "10.0%", "0.002"]  # fmt: skip
    nft = [{k: v for k, v in h.items() if k.startswith("reward/") or k.endswith("scored")}
           for h in history]  # fmt: skip
    assert training_signal_row({"name": "nft-s0", "history": nft}).endswith("| 25.0% | - | - |")


def test_offline_budgets_count_the_training_images_and_the_data_builds_share():
    records = [
        {"task": "warm", "name": n, "train_cpu_s": c, "online": False}
        for n, c in (("dpo-s0", 60.0), ("dpo-s1", 80.0), ("dpo-b300-s0", 500.0), ("sft-s0", 9.0))
    ]
    stats = {"warm": {"train_prompts": 42, "heldout_prompts": 12, "images_per_prompt": 16,
                      "build_cpu_s": 54.0}, NOISY_TASK: {}}  # fmt: skip
    budgets = offline_budgets(records, stats)
    # 42 of the 54 prompts' images: 42 s of the 54; dpo (42 + 60 + 42 + 80) / 2; not the frontier
    # run, not sft (not a compared method).
    assert budgets == {"warm": {"images": 672, "data_cpu_s": 42.0, "cpu_s": {"dpo": 112.0}}}
    assert records[0]["images_scored"] == 672 and records[3]["cpu_s"] == 51.0


@pytest.mark.skipif(
    "grpo" not in loss_names(), reason="the online losses (branch online-trainer) are not merged"
)
@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_an_online_arm_runs_end_to_end_on_the_tiny_model(family, request, tmp_path):
    """GRPO through run_job (2 steps, a checkpoint at each), then its matched checkpoint's
    evaluation: CPU recorded, images counted, the test split's prompts generated; on a UNet and
    on a flow base, whose checkpoints hold transformer/, not unet/."""
    model = request.getfixturevalue(f"tiny_{family}_dir")
    line = ("grpo group_size=2 train_batch_size=2 sampling_steps=2 learning_rate=1e-4 "
            "max_train_steps=2 eval_every=1")  # fmt: skip
    variant = parse_variants(line)["grpo"]
    args = parse_args(["--variants", "v.txt", "--model", str(model), "--out",
                       str(tmp_path), "--eval_seeds", "1", "--sample_steps", "2",
                       "--resolution", "32"])  # fmt: skip
    record = run_job(args, Job("colour", "grpo-s0", variant, 0))
    assert record["online"] and record["saved_steps"] == [1, 2] and record["train_cpu_s"] > 0
    assert [h["online/images_scored"] for h in record["history"]] == [4.0, 8.0]
    evals = checkpoint_evals([record], {"colour": {"images": 4, "cpu_s": {}}})
    assert [e.name for e in evals] == ["grpo-s0@1"]
    done = run_checkpoint_eval(args, evals[0])
    assert done["images_scored"] == 4.0 and done["parent"] == "grpo-s0"
    generated = pd.read_csv(eval_dir(args, "colour", "grpo-s0@1") / "generations.csv")
    assert list(generated["prompt"]) == TEST_PROMPTS.read_text().splitlines()
