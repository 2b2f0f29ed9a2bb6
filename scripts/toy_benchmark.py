"""The toy benchmark: every registered loss on two toy tasks, one protocol, one table.

For each task (`colour`: prompt alignment; `warm`: a global taste) on-policy preference data are
generated from the toy base and labelled by the task's rule (scripts/build_toy_prefs.py). Every
registered loss is fine-tuned on them with several training seeds at its toy settings; every run
then generates images for one split of the held-out prompts (``--split``: ``test``, reported, or
``validation``, for choosing settings; scripts/build_toy_prefs.py ``toy_eval_split``), each image
from its own seed, and the table reports per loss and task: reward rate, points over the base,
shape agreement, diversity and drift against the base (evaluation/distribution.py), implicit
reward accuracy on the split's held-out pairs and seconds per step. Plus a reward-vs-drift
frontier over betas for DPO and KTO and a noisy-label column (the colour task with a share of
pair labels flipped). Runs execute PARALLEL at a time, one thread each.

Online losses (GRPO, NFT) train on the training prompts with the task's rule as their reward, the
rule that labelled the offline pairs. Their budgets are matched to the offline runs' two ways
(``budget_steps``): images the reward scored (offline: the training prompts' images scored when
the pairs were built; online: group x prompts x steps) and user CPU seconds (offline: the data
build's training-prompt share plus the run's training; online: the run's training, sampling
included). An online run saves a checkpoint every ``eval_every`` steps; after every run has
finished, the checkpoints nearest each matched budget are evaluated like a run.

Run through exps/toy_benchmark.sh, which holds the settings; the report is
scripts/toy_benchmark_report.py's.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

# Run as a script, the repo root is not on sys.path.
if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.suites import TOY_GUIDANCE, read_prompts
from scripts.build_toy_prefs import EVAL_SPLITS, TRAIN_PROMPTS, split_prompt_file
from scripts.toy_benchmark_report import COMPARED_OFFLINE, RULE_OF_TASK
from training.config import CAPTION_DROPOUT

logger = logging.getLogger(__name__)

TASKS = ("colour", "warm")
NOISY_TASK = "colour-noisy"  # the colour task's pairs with a share of labels flipped
SCORERS = ("toy_colour", "toy_shape", "toy_warm")
BASE = "base"
CHECKPOINT_MARK = "@"  # "grpo-s0@21": run grpo-s0's checkpoint at step 21, evaluated


@dataclass(frozen=True)
class Variant:
    """A named loss setting: train.py flags (without the leading --)."""

    name: str
    loss: str
    flags: dict[str, str]
    tasks: tuple[str, ...] = ()  # empty: every main task
    eval_every: int | None = None  # online: a checkpoint every this many steps (budget_steps)

    @property
    def steps(self) -> int:
        return int(self.flags["max_train_steps"])


@dataclass(frozen=True)
class Job:
    """One fine-tune (or the base, variant None) and its held-out generations."""

    task: str  # the data it trains on: colour, warm or colour-noisy
    name: str  # run name, unique within the task
    variant: Variant | None
    seed: int = 0
    overrides: dict[str, str] = field(default_factory=dict)


def parse_variants(text: str) -> dict[str, Variant]:
    """Settings lines `NAME key=value ...`: `loss=` names the registered loss (default: NAME),
    `tasks=a,b` limits the variant to those main tasks, `eval_every=K` saves (online losses) a
    checkpoint every K steps for the matched budgets, every other key is a train.py flag.
    Blank lines and # comments are skipped."""
    variants = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, *pairs = line.split()
        flags = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key or not value:
                raise ValueError(f"settings line {number} ({name}): {pair!r} is not key=value")
            flags[key] = value
        if "max_train_steps" not in flags:
            raise ValueError(f"settings line {number} ({name}): max_train_steps is required")
        loss = flags.pop("loss", name)
        tasks = tuple(flags.pop("tasks").split(",")) if "tasks" in flags else ()
        eval_every = flags.pop("eval_every", None)
        if eval_every is not None and not (eval_every.isdigit() and int(eval_every) > 0):
            raise ValueError(f"settings line {number} ({name}): eval_every={eval_every} is not "
                             "a positive integer")  # fmt: skip
        if name in variants:
            raise ValueError(f"settings line {number}: {name} is defined twice")
        variants[name] = Variant(name, loss, flags, tasks, eval_every and int(eval_every))
    return variants


def check_every_loss(variants: dict[str, Variant], registered: list[str]) -> None:
    """The table must hold every registered loss: a new loss without settings stops the run."""
    missing = sorted(set(registered) - set(variants))
    if missing:
        raise ValueError(
            f"no toy settings for registered loss(es) {missing}: add a line to VARIANTS in "
            "exps/toy_benchmark.sh"
        )
    for variant in variants.values():
        if variant.loss not in registered:
            raise ValueError(f"{variant.name}: loss={variant.loss} is not a registered loss")


def run_name(variant: str, seed: int, beta: str | None = None) -> str:
    return f"{variant}-b{beta}-s{seed}" if beta else f"{variant}-s{seed}"


def is_online(loss: str) -> bool:
    """Whether a registered loss samples from prompts (GRPO, NFT) instead of reading data."""
    from losses import get_spec

    return getattr(get_spec(loss), "online", None) is not None


def train_argv(
    args: argparse.Namespace, job: Job, data: Path, out: Path, online: bool = False
) -> list[str]:
    """train.py flags of one fine-tune: pairwise losses and SFT read the pairs, KTO the CSV; an
    online loss samples from the training prompts and is rewarded by the task's rule, with a
    checkpoint every eval_every steps (all kept: the matched budgets pick among them). The
    common batch and caption dropout are the offline data's: an online line sets its own batch
    (prompts per step)."""
    assert job.variant is not None
    flags = {**job.variant.flags, **job.overrides}
    steps = flags["max_train_steps"]
    if online:
        source = ["--prompts", str(TRAIN_PROMPTS), "--reward", RULE_OF_TASK[job.task]]
        checkpoints = ["--checkpointing_steps", str(job.variant.eval_every or steps)]
    else:
        kto = ["--csv", str(data / "kto" / "train_processed_v3.csv"), "--images", str(data / "kto")]
        source = [
            *(kto if job.variant.loss == "kto" else ["--data", str(data / "pickapic")]),
            "--train_batch_size", str(args.batch), "--caption_dropout", str(args.caption_dropout),
        ]  # fmt: skip
        checkpoints = ["--checkpointing_steps", steps, "--checkpoints_total_limit", "1"]
    argv = [
        "--pretrained_model", args.model, *source, "--output_dir", str(out),
        "--loss", job.variant.loss, "--resolution", str(args.resolution),
        "--lr_warmup_steps", str(args.warmup), "--dataloader_num_workers", "0", *checkpoints,
        "--report_to", "none", "--seed", str(job.seed),
        "--overwrite_output_dir", "true",  # re-runs replace
    ]  # fmt: skip
    for key, value in flags.items():
        argv += [f"--{key}", value]
    return argv


def implicit_accuracy(
    model: str, unet_dir: Path, pairs: Path, resolution: int, prompts: list[str]
) -> tuple[float, int]:
    """DPO implicit reward accuracy of a trained denoiser (UNet, or SD3 / Flux transformer)
    against the base, on the held-out pairs of ``prompts`` (the evaluated split); and how many
    pairs that is."""
    import torch
    from diffusers import AutoencoderKL

    from evaluation.implicit_reward import accuracy, implicit_margins, read_pairs
    from models.families import denoiser_config, family_for
    from models.loading import load_family
    from training.config import TrainConfig

    pixels, captions = read_pairs(pairs, resolution)  # [2B] chosen first, [B]
    keep = torch.tensor([i for i, c in enumerate(captions) if c in set(prompts)], dtype=torch.long)
    pixels = torch.cat([pixels[keep], pixels[len(captions) + keep]])
    captions = [captions[i] for i in keep.tolist()]
    load = {"dtype": torch.float32}
    config = TrainConfig(pretrained_model=model, resolution=resolution)
    family_cls = family_for(denoiser_config(model))
    family = load_family(config, family_cls, torch.float32, torch.device("cpu"))
    scheduler = family_cls.scheduler_class.from_pretrained(model, subfolder="scheduler")
    margins = implicit_margins(
        family_cls.denoiser_class.from_pretrained(unet_dir, **load),
        family_cls.denoiser_class.from_pretrained(
            model, subfolder=family_cls.denoiser_folder, **load
        ),
        AutoencoderKL.from_pretrained(model, subfolder="vae", **load),
        family_cls.noise_process(scheduler, config, resolution),
        family,
        pixels,
        captions,
    )
    return accuracy(margins), len(captions)


def generate_heldout(args: argparse.Namespace, unet_dir: Path | None, out_dir: Path) -> None:
    """The split's held-out prompts x eval_seeds images, every image from its own seed."""
    from models import generation

    weights = {} if unet_dir is None else {"unet": unet_dir}
    pipe = generation.load_pipeline(args.model, **weights)  # the family's sampler: DDIM, flow Euler
    images = generation.generate(
        pipe,
        read_prompts(split_prompt_file(args.split)),
        list(range(args.eval_seeds)),
        args.sample_steps,
        args.guidance_scale,
        args.resolution,
        batch_size=48,
        progress=False,
        distinct_seeds=True,
    )
    generation.save_generations(out_dir, images)


def init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # PARALLEL processes share the cores
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")


# What a run's result depends on besides its variant, seed and task (--resume compares them).
RUN_SETTINGS = (
    "model", "batch", "warmup", "caption_dropout", "resolution", "eval_seeds", "sample_steps",
    "guidance_scale", "images_per_prompt", "pairs_per_prompt", "no_shape_match", "split",
)  # fmt: skip
DATA_SETTINGS = ("model", "images_per_prompt", "pairs_per_prompt", "sample_steps",
                 "guidance_scale", "no_shape_match")  # fmt: skip
RECORD = "record.json"  # a finished run's record, beside its held-out images


def run_key(args: argparse.Namespace, job: Job) -> dict:
    """Everything that decides a run's result: a stored record with another key is stale."""
    key = {name: str(getattr(args, name)) for name in RUN_SETTINGS}
    if job.task == NOISY_TASK:
        key["noise"] = str(args.noise)
    variant = None if job.variant is None else asdict(job.variant)
    key |= {"task": job.task, "seed": job.seed, "variant": variant, "overrides": job.overrides}
    return json.loads(json.dumps(key))  # as stored: tuples become lists


def eval_dir(args: argparse.Namespace, task: str, name: str) -> Path:
    """Where a run's (or the base's, task BASE) images of the evaluated split go."""
    return args.out / "eval" / args.split / task / name


def cpu_seconds() -> tuple[float, float]:
    """(user, system) CPU seconds of this process so far (its threads included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def stored_record(args: argparse.Namespace, job: Job) -> dict | None:
    """The record a finished run left, if its settings are this run's (--resume)."""
    path = eval_dir(args, job.task, job.name) / RECORD
    if not path.is_file():
        return None
    stored = json.loads(path.read_text(encoding="utf-8"))
    return stored["record"] if stored.get("key") == run_key(args, job) else None


def store_record(args: argparse.Namespace, job: Job, record: dict) -> None:
    path = eval_dir(args, job.task, job.name) / RECORD
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"key": run_key(args, job), "record": record}) + "\n")
    partial.replace(path)  # atomic: a killed run leaves no record


def saved_steps(steps: int, eval_every: int | None) -> list[int]:
    """The steps an online run leaves a checkpoint at: every eval_every, and the last."""
    every = eval_every or steps
    return sorted({*range(every, steps + 1, every), steps})


def run_job(args: argparse.Namespace, job: Job) -> dict:
    """Train (unless the base), generate the split's held-out images, measure the implicit
    accuracy (pairwise losses: a pairwise margin is what they optimise). Training's user CPU
    seconds are recorded (the budget online runs are matched on). With --resume, a run that
    finished with the same settings is not run again."""
    import train
    from losses import get_spec

    if args.resume and (stored := stored_record(args, job)) is not None:
        logger.warning("reused %s/%s", job.task, job.name)
        return {**stored, "reused": True}
    record: dict = {"task": job.task, "name": job.name, "seed": job.seed, "history": []}
    out_dir = eval_dir(args, job.task, job.name)
    (out_dir / RECORD).unlink(missing_ok=True)
    unet_dir = None
    if job.variant is not None:
        online = is_online(job.variant.loss)
        run_dir = args.out / "runs" / job.task / job.name
        argv = train_argv(args, job, args.out / "data" / job.task, run_dir, online)
        start, (user, system) = time.perf_counter(), cpu_seconds()
        result = train.main(argv)
        record["train_s"] = time.perf_counter() - start
        record["train_cpu_s"] = cpu_seconds()[0] - user
        record["train_sys_s"] = cpu_seconds()[1] - system
        record["steps"] = int({**job.variant.flags, **job.overrides}["max_train_steps"])
        record["history"] = result.history
        record["online"] = online
        if online:
            record["saved_steps"] = saved_steps(record["steps"], job.variant.eval_every)
        unet_dir = result.unet_dir
    start = time.perf_counter()
    generate_heldout(args, unet_dir, out_dir)
    record["generate_s"] = time.perf_counter() - start
    if unet_dir is not None and get_spec(job.variant.loss).pairwise:
        start = time.perf_counter()
        pairs = args.out / "data" / job.task / "heldout" / "pairs.parquet"
        prompts = split_prompt_file(args.split).read_text(encoding="utf-8").splitlines()
        record["implicit_accuracy"], record["implicit_pairs"] = implicit_accuracy(
            args.model, unet_dir, pairs, args.resolution, prompts
        )
        record["implicit_s"] = time.perf_counter() - start
    store_record(args, job, record)
    logger.warning("done %s/%s", job.task, job.name)
    return record


def flip_pair_labels(table, share: float, seed: int):
    """(pyarrow pairs table with label_0 / label_1 swapped on a seeded random `share` of its
    rows, the number swapped)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = rng.choice(table.num_rows, round(share * table.num_rows), replace=False)
    l0, l1 = table.column("label_0").to_numpy().copy(), table.column("label_1").to_numpy().copy()
    l0[rows], l1[rows] = l1[rows], l0[rows].copy()
    table = table.set_column(table.column_names.index("label_0"), "label_0", [l0])
    table = table.set_column(table.column_names.index("label_1"), "label_1", [l1])
    return table, len(rows)


def flip_labels(source: Path, target: Path, share: float, seed: int) -> int:
    """A copy of the pairs data with `share` of the training pairs' labels swapped (a fixed
    random subset); held-out pairs and the KTO CSV stay clean. Returns the pairs flipped."""
    import shutil

    import pyarrow.parquet as pq

    shutil.copytree(source, target, dirs_exist_ok=True)
    flipped = 0
    for path in sorted((target / "pickapic").glob("*.parquet")):
        rows_per_group = pq.ParquetFile(path).metadata.row_group(0).num_rows
        table, count = flip_pair_labels(pq.read_table(path), share, seed)
        pq.write_table(table, path, row_group_size=rows_per_group)  # the trainer reads by group
        flipped += count
    return flipped


def build_data(args: argparse.Namespace, tasks: list[str]) -> dict[str, dict]:
    """On-policy pairs (both trainer formats) per task, from the base; the noisy copy. A task's
    stats gain the user CPU seconds of its build (``build_cpu_s``: generating and scoring every
    image, training and held-out prompts alike; kept beside the key for --resume)."""
    from scripts.build_toy_prefs import ToyPrefsRecipe, build_toy_prefs

    settings = {"steps": args.sample_steps, "guidance_scale": args.guidance_scale}
    key = {name: str(getattr(args, name)) for name in DATA_SETTINGS}
    stats = {}
    for task in tasks:
        if task == NOISY_TASK:
            continue
        data, key_file = args.out / "data" / task, args.out / "data" / f"{task}.key.json"
        cost_file = args.out / "data" / f"{task}.cost.json"
        if args.resume and key_file.is_file() and json.loads(key_file.read_text()) == key:
            stats[task] = json.loads((data / "stats.json").read_text())
            if cost_file.is_file():
                stats[task] |= json.loads(cost_file.read_text())
            continue
        key_file.unlink(missing_ok=True)
        user = cpu_seconds()[0]
        recipe = ToyPrefsRecipe(args.images_per_prompt, args.pairs_per_prompt, settings,
                                rule=task, match_shape=not args.no_shape_match)  # fmt: skip
        stats[task] = build_toy_prefs(args.model, data, recipe)
        stats[task]["build_cpu_s"] = cpu_seconds()[0] - user
        cost_file.write_text(json.dumps({"build_cpu_s": stats[task]["build_cpu_s"]}) + "\n")
        key_file.write_text(json.dumps(key) + "\n")
    if NOISY_TASK in tasks:
        flipped = flip_labels(
            args.out / "data" / "colour", args.out / "data" / NOISY_TASK, args.noise, seed=0
        )
        stats[NOISY_TASK] = {**stats["colour"], "flipped_pairs": flipped, "noise": args.noise}
    return stats


def full_benchmark_variants(
    registered: list[str], wide: list[str], variants: dict[str, Variant]
) -> list[str]:
    """The full command's main table: every registered offline loss, then each WIDE variant that
    is not a loss itself (kto_batch8: the KTO spread study), so WIDE never names a run it skips.
    The online losses are benchmarked by COMPARE=1, at budgets matched to DPO's and KTO's: at the
    offline losses' settings their 12 runs would double this command's time."""
    offline = [name for name in registered if not is_online(name)]
    return [*offline, *(w for w in wide if w in variants and w not in registered)]


def plan_jobs(args: argparse.Namespace, variants: dict[str, Variant]) -> list[Job]:
    """The main table, the beta frontier and the noisy-label column; the base first."""
    jobs = [Job(BASE, BASE, None)]
    for task in args.tasks:
        for name in args.main:
            if variants[name].tasks and task not in variants[name].tasks:
                continue
            seeds = args.wide_seeds if name in args.wide else args.train_seeds
            jobs += [Job(task, run_name(name, s), variants[name], s) for s in seeds]
    for spec in args.frontier:
        name, betas = spec.split(":")
        for beta in betas.split(","):
            if beta == variants[name].flags.get("beta"):
                continue  # the main table's runs are the frontier's point at this beta
            jobs += [
                Job(args.frontier_task, run_name(name, s, beta), variants[name], s,
                    {"beta": beta})
                for s in args.frontier_seeds
            ]  # fmt: skip
    for name in args.noisy:
        jobs += [Job(NOISY_TASK, run_name(name, s), variants[name], s) for s in args.noisy_seeds]
        if name not in args.main:  # its clean-label runs, for the drop that noise causes
            jobs += [Job("colour", run_name(name, s), variants[name], s) for s in args.noisy_seeds]
    # Longest first, so the two workers finish together: an online step samples and trains a
    # whole group per prompt, far longer than an offline step, so online runs go first.
    return [
        jobs[0],
        *sorted(jobs[1:], key=lambda j: (-is_online(j.variant.loss), -j.variant.steps)),
    ]


def offline_budgets(records: list[dict], stats: dict[str, dict]) -> dict[str, dict]:
    """Per task, what one offline run cost: ``images``, the training prompts' images the rule
    scored when the pairs were built (the held-out prompts' images serve evaluation only), and
    per offline variant of the main table its mean ``cpu_s`` over seeds: the data build's
    training-prompt share (a run needs the data built once) plus its training (COMPARED_OFFLINE
    only: the methods the online ones are matched to). Also writes each offline record's
    ``images_scored`` and ``cpu_s``."""
    budgets: dict[str, dict] = {}
    for task, data in stats.items():
        if task == NOISY_TASK:
            continue
        images = data["train_prompts"] * data["images_per_prompt"]
        prompts = data["train_prompts"] + data["heldout_prompts"]
        share = data.get("build_cpu_s", math.nan) * data["train_prompts"] / prompts
        cpu: dict[str, list[float]] = {}
        for r in records:
            if r["task"] == task and "train_cpu_s" in r and not r.get("online"):
                r["images_scored"], r["cpu_s"] = images, share + r["train_cpu_s"]
                variant = r["name"].rsplit("-s", 1)[0]  # dpo-b300: a frontier run, not dpo
                if variant in COMPARED_OFFLINE:
                    cpu.setdefault(variant, []).append(r["cpu_s"])
        budgets[task] = {
            "images": images,
            "data_cpu_s": share,
            "cpu_s": {v: sum(c) / len(c) for v, c in cpu.items()},
        }
    return budgets


def images_per_step(record: dict) -> float:
    """Images an online run's reward scored per optimizer step (its logged running count)."""
    counted = [h["online/images_scored"] for h in record["history"] if "online/images_scored" in h]
    return counted[-1] / record["steps"]


def budget_steps(record: dict, budget: dict) -> dict[str, int]:
    """The saved step of an online run matching each offline budget: ``images`` (the first
    checkpoint that has scored at least the offline data's images) and ``cpu:VARIANT`` (the
    checkpoint whose CPU seconds are nearest that offline variant's; a run's CPU is taken as
    spread evenly over its steps, which holds for online steps: each samples, scores and trains
    the same number of images), plus ``final``. Writes the record's ``images_scored``,
    ``cpu_s`` and ``budget_steps``."""
    steps, saved = record["steps"], record["saved_steps"]
    per_image, per_cpu = images_per_step(record), record["train_cpu_s"] / steps
    reached = [s for s in saved if s * per_image >= budget["images"]]
    chosen = {"images": min(reached) if reached else steps}
    for variant, cpu in budget["cpu_s"].items():
        chosen[f"cpu:{variant}"] = min(saved, key=lambda s: (abs(s * per_cpu - cpu), s))
    chosen["final"] = steps
    record["images_scored"], record["cpu_s"] = steps * per_image, record["train_cpu_s"]
    record["budget_steps"] = chosen
    return chosen


@dataclass(frozen=True)
class CheckpointEval:
    """One saved checkpoint of an online run, evaluated on the split like a run."""

    task: str
    run: str  # the run's name
    step: int
    seed: int
    images_scored: float
    cpu_s: float

    @property
    def name(self) -> str:
        return f"{self.run}{CHECKPOINT_MARK}{self.step}"


def checkpoint_evals(records: list[dict], budgets: dict[str, dict]) -> list[CheckpointEval]:
    """The matched budgets' checkpoints of every online run (``budget_steps``, which it writes
    into the run's record), except its final step (the run's own evaluation)."""
    evals = []
    for r in records:
        if not r.get("online"):
            continue
        per_image, per_cpu = images_per_step(r), r["train_cpu_s"] / r["steps"]
        for step in sorted(set(budget_steps(r, budgets[r["task"]]).values()) - {r["steps"]}):
            evals.append(CheckpointEval(r["task"], r["name"], step, r["seed"],
                                        step * per_image, step * per_cpu))  # fmt: skip
    return evals


def run_checkpoint_eval(args: argparse.Namespace, item: CheckpointEval) -> dict:
    """Generate the split's images from one saved checkpoint's denoiser."""
    from models.families import denoiser_config, family_for

    checkpoint = args.out / "runs" / item.task / item.run / f"checkpoint-{item.step}"
    denoiser = checkpoint / family_for(denoiser_config(args.model)).denoiser_folder  # unet/ ...
    start = time.perf_counter()
    generate_heldout(args, denoiser, eval_dir(args, item.task, item.name))
    return {
        "task": item.task, "name": item.name, "seed": item.seed, "parent": item.run,
        "step": item.step, "images_scored": item.images_scored, "cpu_s": item.cpu_s,
        "generate_s": time.perf_counter() - start, "history": [],
    }  # fmt: skip


def score_task(args: argparse.Namespace, task: str, names: list[str]) -> Path:
    """evaluate.py over the base and the task's runs: scores.csv, summary, distribution.csv."""
    import evaluate

    runs = ["--run", f"{BASE}={eval_dir(args, BASE, BASE)}"]
    for name in names:
        runs += ["--run", f"{name}={eval_dir(args, task, name)}"]
    scorers = [flag for s in SCORERS for flag in ("--scorer", s)]
    out = args.out / "scores" / args.split / task
    evaluate.main([*runs, *scorers, "--baseline", BASE, "--out", str(out)])
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="assets/toy-sd15", help="toy base model")
    p.add_argument("--out", type=Path, default=Path("outputs/toy_benchmark"), help="work dir")
    p.add_argument("--results", type=Path, default=Path("assets"), help="results md + plots")
    p.add_argument("--variants", required=True, help="settings lines (exps/toy_benchmark.sh)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="main tasks")
    p.add_argument("--main", nargs="*", default=None, help="variants of the main table (all)")
    p.add_argument("--train_seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds")
    p.add_argument("--wide", nargs="*", default=["dpo", "kto"], help="variants with wide seeds")
    p.add_argument("--wide_seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds")
    p.add_argument("--frontier", nargs="*", default=[], help="VARIANT:beta,beta,... (colour)")
    p.add_argument("--frontier_task", choices=TASKS, default="colour", help="frontier's task")
    p.add_argument("--frontier_seeds", type=int, nargs="+", default=[0, 1], help="seeds")
    p.add_argument("--noisy", nargs="*", default=[], help="variants of the noisy-label column")
    p.add_argument("--noise", type=float, default=0.3, help="share of pair labels flipped")
    p.add_argument("--noisy_seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds")
    p.add_argument("--images_per_prompt", type=int, default=16, help="on-policy images/prompt")
    p.add_argument("--pairs_per_prompt", type=int, default=8, help="pairs per training prompt")
    p.add_argument(
        "--no_shape_match",
        action="store_true",
        help="pair images whatever their shapes (default: a pair agrees on the shape rule)",
    )
    p.add_argument(
        "--split", choices=EVAL_SPLITS, default="test",
        help="held-out prompts evaluated: test (reported) or validation (choosing settings)",
    )  # fmt: skip
    p.add_argument("--eval_seeds", type=int, default=20, help="images per held-out prompt")
    p.add_argument("--sample_steps", type=int, default=20, help="sampler steps")
    p.add_argument("--guidance_scale", type=float, default=TOY_GUIDANCE, help="CFG scale")
    p.add_argument("--resolution", type=int, default=32, help="pixels")
    p.add_argument("--batch", type=int, default=8, help="pairs (pairwise, sft) or images (kto)")
    p.add_argument("--warmup", type=int, default=10, help="warm-up steps")
    p.add_argument(
        "--caption_dropout", type=float, default=CAPTION_DROPOUT,
        help="share of training captions replaced by '' (the released trainers' 0.2)",
    )  # fmt: skip
    p.add_argument("--parallel", type=int, default=2, help="training processes at a time")
    p.add_argument(
        "--resume", action="store_true",
        help="keep the data and every run that finished with the same settings (OUT's record.json)",
    )  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    import losses
    from scripts.toy_benchmark_report import write_report

    start = time.perf_counter()
    variants = parse_variants(Path(args.variants).read_text(encoding="utf-8"))
    registered = losses.loss_names()
    if args.main is None:  # the full benchmark: every registered loss, and the wide variants
        check_every_loss(variants, registered)
        args.main = full_benchmark_variants(registered, args.wide, variants)
    unknown = [v for v in [*args.main, *args.noisy] if v not in variants]
    unknown += [s for s in args.frontier if s.split(":")[0] not in variants]
    if unknown:
        raise ValueError(f"no settings line for {unknown}")
    labelled = [*args.noisy, *(s.split(":")[0] for s in args.frontier)]
    if online := [v for v in labelled if is_online(variants[v].loss)]:
        raise ValueError(f"{online}: the noisy-label column and the frontier are offline only")
    tasks = list(args.tasks)
    if args.noisy:  # built from the colour task's pairs
        tasks += [t for t in ("colour", NOISY_TASK) if t not in tasks]
    if args.frontier and args.frontier_task not in tasks:
        tasks.append(args.frontier_task)
    stats = build_data(args, tasks)
    data_s = time.perf_counter() - start

    jobs = plan_jobs(args, variants)
    logger.info("%d runs, %d at a time", len(jobs) - 1, args.parallel)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    context = get_context("spawn")  # fresh interpreters: no torch thread pools inherited
    with ProcessPoolExecutor(args.parallel, mp_context=context, initializer=init_worker) as pool:
        records = list(pool.map(run_job, [args] * len(jobs), jobs))
        budgets = offline_budgets(records, stats)
        evals = checkpoint_evals(records, budgets)
        logger.info("%d online checkpoints at matched budgets", len(evals))
        records += pool.map(run_checkpoint_eval, [args] * len(evals), evals)
    runs_s = time.perf_counter() - start - data_s

    score_dirs = {}
    for task in tasks:
        names = [j.name for j in jobs if j.task == task] + [e.name for e in evals if e.task == task]
        score_dirs[task] = str(score_task(args, task, names))
    total = time.perf_counter() - start
    result = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "variants": {name: asdict(v) for name, v in variants.items()},
        "data": stats,
        "budgets": budgets,
        "records": records,
        "scores": score_dirs,
        "timings": {"data_s": data_s, "runs_s": runs_s, "total_s": total},
    }
    (args.out / "benchmark.json").write_text(json.dumps(result, indent=1) + "\n")
    text = write_report(result, args.results)
    print(text)


if __name__ == "__main__":
    main()
