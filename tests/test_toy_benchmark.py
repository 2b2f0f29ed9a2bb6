"""scripts/toy_benchmark.py's pieces: settings lines, the every-loss check, label flipping, the
run plan, and the report's per-loss row against hand-computed numbers."""

from __future__ import annotations

import argparse

import pandas as pd
import pytest

from scripts.toy_benchmark import (
    NOISY_TASK,
    Job,
    check_every_loss,
    flip_labels,
    full_benchmark_variants,
    parse_args,
    parse_variants,
    plan_jobs,
    run_job,
    store_record,
    stored_record,
    train_argv,
)
from scripts.toy_benchmark_report import RunMetrics, loss_row, stalled_share
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
    registered = ["dpo", "kto", "sft"]
    main = full_benchmark_variants(registered, ["dpo", "kto_b16", "absent"], variants)
    # kto_b16 is a WIDE variant, not a loss: the full command runs it too (it was skipped
    # before: the plan runs only the main table's names); a name without a line is not added.
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
    (tmp_path / "eval" / "warm" / "dpo-s0").mkdir(parents=True)
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
