"""The toy benchmark's report: tables (markdown) and plots from its benchmark.json and the
per-task score folders that evaluate.py wrote (scores.csv, distribution.csv), all of one split
of the held-out prompts (test unless the benchmark ran with --split validation)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

# Run as a script, the repo root is not on sys.path, and `evaluation` needs it.
if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluation.stats import wilson_interval

MACHINE = "2-core CPU dev machine, no GPU"
BASE = "base"
RULE_OF_TASK = {"colour": "toy_colour", "warm": "toy_warm", "colour-noisy": "toy_colour"}
TASK_TEXT = {
    "colour": "`colour` (prompt alignment: the image shows the colour its caption names)",
    "warm": "`warm` (a global taste: mean red - mean blue >= 20 on the 0-255 scale)",
    "colour-noisy": "`colour` with a share of the training pairs' labels flipped",
}
# A step whose gradient norm is below this share of the run's largest moves nothing: Adam's
# second moment still remembers the large gradients. Per-image sigmoid losses (KTO at a large
# beta) saturate this way and stop learning (README, "Toy benchmark").
STALL_RATIO = 1e-6
# Issue 27's bar for an online method on the toy task: at least this many points of reward over
# the base in every seed, with shape agreement within SHAPE_MARGIN of the base's.
TARGET_GAIN, SHAPE_MARGIN = 40.0, 0.10
# The offline methods the online ones are compared with, budget for budget (issue 27).
COMPARED_OFFLINE = ("dpo", "kto")


@dataclass
class RunMetrics:
    task: str
    name: str
    variant: str
    seed: int
    images: int
    reward: float
    hits: int
    shape: float
    diversity: float
    drift: float
    implicit: float | None
    seconds_per_step: float | None
    stalled: float | None = None  # share of steps without gradient (stalled_share)
    checkpoint: int | None = None  # an online run's earlier checkpoint (its step); None: final


def stalled_share(history: list[dict]) -> float | None:
    """Share of training steps whose gradient norm is below STALL_RATIO of the run's largest."""
    norms = [h["grad_norm"] for h in history if "grad_norm" in h]
    if not norms or max(norms) <= 0:
        return None
    return sum(n < STALL_RATIO * max(norms) for n in norms) / len(norms)


def variant_of(name: str) -> str:
    """dpo-s0 -> dpo; dpo-b300-s0 -> dpo-b300."""
    return name.rsplit("-s", 1)[0]


def run_metrics(result: dict) -> list[RunMetrics]:
    records = {(r["task"], r["name"]): r for r in result["records"]}
    rows = []
    for task, folder in result["scores"].items():
        scores = pd.read_csv(Path(folder) / "scores.csv", keep_default_na=False)
        spread = pd.read_csv(Path(folder) / "distribution.csv").set_index("model")
        rule = RULE_OF_TASK[task]
        for model, part in scores.groupby("model", sort=False):
            record = records.get((task, model), {})
            steps = record.get("steps")
            rows.append(
                RunMetrics(
                    task=task,
                    name=model,
                    variant=BASE if model == BASE else variant_of(model),
                    seed=int(record.get("seed", 0)),
                    images=len(part),
                    reward=float(part[rule].mean()),
                    hits=int(part[rule].sum()),
                    shape=float(part["toy_shape"].mean()),
                    diversity=float(spread.loc[model, "diversity"]),
                    drift=float(spread.loc[model, "drift"]),
                    implicit=record.get("implicit_accuracy"),
                    seconds_per_step=record["train_s"] / steps if steps else None,
                    stalled=stalled_share(record.get("history", [])),
                    checkpoint=record.get("step") if "parent" in record else None,
                )
            )
    return rows


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def loss_row(variant: str, runs: list[RunMetrics], base: RunMetrics) -> str:
    """Mean over seeds, worst seed, and the Wilson interval of all the variant's images."""
    rates = [r.reward for r in runs]
    gains = [100 * (r - base.reward) for r in rates]
    n, hits = sum(r.images for r in runs), sum(r.hits for r in runs)
    low, high = wilson_interval(hits / n, n)
    implicit = [r.implicit for r in runs if r.implicit is not None]
    seconds = [r.seconds_per_step for r in runs if r.seconds_per_step]
    stalled = [r.stalled for r in runs if r.stalled is not None]
    return (
        f"| {variant} | {len(runs)} | {pct(mean(rates))} | {pct(min(rates))} | "
        f"[{100 * low:.1f}, {100 * high:.1f}] | {mean(gains):+.1f} (worst {min(gains):+.1f}) | "
        f"{pct(mean([r.shape for r in runs]))} | {mean([r.diversity for r in runs]):.2f} | "
        f"{mean([r.drift for r in runs]):.2f} | "
        f"{pct(mean(implicit)) if implicit else ''} | "
        f"{pct(mean(stalled)) if stalled else ''} | {mean(seconds):.2f} |"
    )


TABLE_HEAD = [
    "| loss | seeds | reward rate (mean) | worst seed | 95% interval (all images) | "
    "points over base (mean, worst) | shape agreement | diversity vs base | drift | "
    "implicit accuracy (held-out pairs) | stalled steps | s / step |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
]


def task_table(task: str, metrics: list[RunMetrics], base: RunMetrics, order: list[str]) -> list:
    by_variant: dict[str, list[RunMetrics]] = {}
    for m in metrics:
        if m.task == task and m.name != BASE and m.checkpoint is None:
            by_variant.setdefault(m.variant, []).append(m)
    names = [v for v in order if v in by_variant] + sorted(set(by_variant) - set(order))
    base_row = (
        f"| base | - | {pct(base.reward)} | - | "
        f"[{100 * wilson_interval(base.reward, base.images)[0]:.1f}, "
        f"{100 * wilson_interval(base.reward, base.images)[1]:.1f}] | - | {pct(base.shape)} | "
        "1.00 | 0 | - | - | - |"
    )
    return [*TABLE_HEAD, base_row, *(loss_row(v, by_variant[v], base) for v in names)]


def plot_frontier(result: dict, metrics: list[RunMetrics], path: Path) -> None:
    """Reward vs drift per beta for the frontier's variants: seeds as dots, means joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task, specs = result["settings"]["frontier_task"], result["settings"]["frontier"]
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for colour, spec in zip(("tab:blue", "tab:orange", "tab:green"), specs, strict=False):
        name, betas = spec.split(":")
        points = []
        for beta in betas.split(","):
            runs = frontier_runs(result, metrics, name, beta)
            if not runs:
                continue
            ax.scatter([r.drift for r in runs], [100 * r.reward for r in runs], s=10,
                       color=colour, alpha=0.5)  # fmt: skip
            points.append(
                (mean([r.drift for r in runs]), 100 * mean([r.reward for r in runs]), beta)
            )
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], "-o", color=colour, label=name)
        for x, y, beta in points:
            ax.annotate(
                f"beta {beta}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
    ax.set_xlabel("drift from the base (Frechet, evaluation/distribution.py)")
    ax.set_ylabel(f"{task} reward rate (%)")
    ax.legend()
    ax.set_title("reward vs drift over beta (dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def frontier_names(name: str, beta: str, default_beta: str | None) -> set[str]:
    """The run names' variant part at this beta: the main table's run is the default beta's."""
    return {f"{name}-b{beta}", *([name] if beta == default_beta else [])}


def frontier_runs(result: dict, metrics: list[RunMetrics], name: str, beta: str) -> list:
    """A frontier point's runs on the frontier's task, with the frontier's seeds only (so every
    point has the same seeds)."""
    settings = result["settings"]
    names = frontier_names(name, beta, result["variants"][name]["flags"].get("beta"))
    return [
        m for m in metrics
        if m.task == settings["frontier_task"] and m.variant in names
        and m.seed in settings["frontier_seeds"] and m.checkpoint is None
    ]  # fmt: skip


def plot_rewards(
    metrics: list[RunMetrics], tasks: list[str], order: list[str], path: Path, split: str = "test"
):
    """Per task, one bar per loss (mean over seeds) with its seeds as dots; base dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        base = next(m for m in metrics if m.task == task and m.name == BASE)
        for x, variant in enumerate(order):
            runs = [
                m for m in metrics
                if m.task == task and m.variant == variant and m.checkpoint is None
            ]  # fmt: skip
            if not runs:
                continue
            ax.bar(x, 100 * mean([r.reward for r in runs]), color="tab:blue", alpha=0.7)
            ax.scatter([x] * len(runs), [100 * r.reward for r in runs], color="black", s=8)
        ax.axhline(100 * base.reward, linestyle="--", color="grey", label="base")
        ax.set_xticks(range(len(order)), order, rotation=45)
        ax.set_ylim(0, 100)
        ax.set_title(f"{task} reward rate, held-out prompts ({split})")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def before_after_grid(result: dict, task: str, names: list[str], path: Path) -> None:
    """Rows: the first held-out prompts; column blocks: base and one run per listed name."""
    from PIL import Image, ImageDraw, ImageFont

    out = Path(result["settings"]["out"])
    split = result["settings"].get("split")  # absent: a benchmark from before the splits
    evals = out / "eval" / split if split else out / "eval"
    folders = {n: evals / (BASE if n == BASE else task) / n for n in names}
    tables = {n: pd.read_csv(f / "generations.csv") for n, f in folders.items()}
    prompts, seeds, cell, label, header = 6, 4, 48, 230, 16
    chosen = list(dict.fromkeys(tables[BASE]["prompt"]))[:prompts]
    width = label + len(names) * (seeds * cell + 8)
    grid = Image.new("RGB", (width, header + prompts * cell), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for b, name in enumerate(names):
        draw.text((label + b * (seeds * cell + 8) + 4, 2), name, fill="black", font=font)
    for r, prompt in enumerate(chosen):
        draw.text((4, header + r * cell + 4), prompt.replace(" on ", "\non "), fill="black",
                  font=font)  # fmt: skip
        for b, name in enumerate(names):
            rows = tables[name][tables[name]["prompt"] == prompt].head(seeds)
            for c, file_name in enumerate(rows["file_name"]):
                tile = Image.open(folders[name] / file_name).convert("RGB").resize((cell, cell))
                grid.paste(tile, (label + b * (seeds * cell + 8) + c * cell, header + r * cell))
    grid.save(path)


def budget_label(key: str, budget: dict) -> str:
    """A matched budget's row label (keys of scripts/toy_benchmark.py budget_steps)."""
    if key == "images":
        return f"images = offline's ({budget['images']})"
    if key.startswith("cpu:"):
        variant = key.split(":", 1)[1]
        return f"CPU = {variant}'s ({budget['cpu_s'][variant]:.0f} s)"
    return key


def method_points(result: dict, task: str, variant: str) -> dict[str, list[dict]]:
    """A main-table variant's evaluated points on a task, per budget key: the run (offline:
    ``final`` only) or its matched checkpoint, per seed, as its record (images_scored, cpu_s,
    seed, name)."""
    records = {r["name"]: r for r in result["records"] if r["task"] == task}
    runs = [
        r for r in records.values()
        if "train_cpu_s" in r and "parent" not in r and variant_of(r["name"]) == variant
    ]  # fmt: skip
    points: dict[str, list[dict]] = {}
    for run in sorted(runs, key=lambda r: r["seed"]):
        for key, step in run.get("budget_steps", {"final": run["steps"]}).items():
            name = run["name"] if step == run["steps"] else f"{run['name']}@{step}"
            points.setdefault(key, []).append(records[name])
    return points


def budget_row(variant: str, label: str, points: list[dict], by_name: dict, base) -> str:
    runs = [by_name[p["name"]] for p in points]
    rates, shapes = [r.reward for r in runs], [r.shape for r in runs]
    gains = [100 * (r - base.reward) for r in rates]
    return (
        f"| {variant} | {label} | {len(runs)} | "
        f"{mean([p['images_scored'] for p in points]):.0f} | "
        f"{mean([p['cpu_s'] for p in points]):.0f} | {pct(mean(rates))} | {pct(min(rates))} | "
        f"{mean(gains):+.1f} (worst {min(gains):+.1f}) | "
        f"{pct(mean(shapes))} (worst {pct(min(shapes))}) | "
        f"{mean([r.diversity for r in runs]):.2f} | {mean([r.drift for r in runs]):.2f} |"
    )


def target_rows(result: dict, task: str, by_name: dict, base, order: list[str]) -> list[str]:
    """Per online variant, issue 27's bar: +TARGET_GAIN points in every seed (final) with shape
    agreement within SHAPE_MARGIN of the base's in every seed; and whether it beats offline DPO
    at equal images scored (mean reward rate)."""
    dpo = method_points(result, task, "dpo").get("final", [])
    dpo_rate = mean([by_name[p["name"]].reward for p in dpo]) if dpo else None
    rows = [
        f"| online method | +{TARGET_GAIN:.0f} points in every seed (final) | shape within "
        f"{100 * SHAPE_MARGIN:.0f} points of the base in every seed (final) | beats dpo at equal "
        "images scored (mean) |",
        "|---|---|---|---|",
    ]
    for variant in order:
        points = method_points(result, task, variant)
        if "images" not in points:
            continue
        final = [by_name[p["name"]] for p in points["final"]]
        matched = mean([by_name[p["name"]].reward for p in points["images"]])
        gain = min(100 * (m.reward - base.reward) for m in final)
        shape = min(m.shape for m in final)
        beats = "-"
        if dpo_rate is not None:
            beats = f"{matched > dpo_rate} ({pct(matched)} vs {pct(dpo_rate)})"
        rows.append(
            f"| {variant} | {gain >= TARGET_GAIN} (worst {gain:+.1f}) | "
            f"{shape >= base.shape - SHAPE_MARGIN} (worst {pct(shape)}, base {pct(base.shape)}) | "
            f"{beats} |"
        )
    return rows


def step_mean(history: list[dict], key: str) -> float | None:
    """The mean of a logged metric over the steps that have it (nan values skipped)."""
    values = [h[key] for h in history if h.get(key) == h.get(key) and key in h]
    return mean(values) if values else None


def online_runs(result: dict, task: str) -> list[dict]:
    """The task's online runs (their final records, not the evaluated checkpoints)."""
    return [r for r in result["records"]
            if r.get("online") and r["task"] == task and "parent" not in r]  # fmt: skip


def training_signal_row(record: dict) -> str:
    """An online run's reward on the training prompts as it sampled them: the first and the last
    sixth of its steps (7 of 42), their change with a 95% normal interval for a difference of
    two rates (the toy rules score 0 or 1; images are counted as independent, though a group
    shares its prompt), and the signal the updates saw: zero-spread groups, clip fraction, KL."""
    history = [h for h in record["history"] if "reward/mean" in h]
    k = max(1, len(history) // 6)
    images = k * history[-1]["online/images_scored"] / len(history)
    first = mean([h["reward/mean"] for h in history[:k]])
    last = mean([h["reward/mean"] for h in history[-k:]])
    half = 1.96 * (first * (1 - first) / images + last * (1 - last) / images) ** 0.5
    change = 100 * (last - first)
    extra = []
    for key, scale in (("reward/zero_spread_groups", 100), ("online/clipfrac", 100),
                       ("online/approx_kl", 1)):  # fmt: skip
        value = step_mean(history, key)
        extra.append("-" if value is None else f"{scale * value:.1f}%" if scale == 100
                     else f"{value:.2g}")  # fmt: skip
    return (
        f"| {record['name']} | {k} + {k} | {pct(first)} | {pct(last)} | {change:+.1f} "
        f"[{change - 100 * half:+.1f}, {change + 100 * half:+.1f}] | {' | '.join(extra)} |"
    )


SIGNAL_HEAD = [
    "| run | steps averaged (first + last) | training reward, first steps | last steps | change "
    "(points) [95% interval] | zero-spread groups | clip fraction | approx. KL |",
    "|---|---|---|---|---|---|---|---|",
]


COMPARE_HEAD = [
    "| method | budget | seeds | images scored | CPU s (user) | reward rate (mean) | worst seed | "
    "points over base (mean, worst) | shape agreement (mean, worst) | diversity | drift |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
]


def compare_section(result: dict, task: str, metrics: list, base, order: list[str]) -> list:
    """Offline against online on one task: every method at each matched budget, and the bar."""
    by_name = {m.name: m for m in metrics if m.task == task}
    budget = result["budgets"][task]
    rows = [*COMPARE_HEAD]
    online = {variant_of(r["name"]) for r in result["records"] if r.get("online")}
    for variant in [v for v in order if v in online or v in COMPARED_OFFLINE]:
        for key, points in method_points(result, task, variant).items():
            label = budget_label(key, budget)
            if key == "images" and min(p["images_scored"] for p in points) < budget["images"]:
                label += ": not reached, the last step"
            rows.append(budget_row(variant, label, points, by_name, base))
    return [
        f"### Offline against online ({task})",
        "",
        f"The offline data's reward scored {budget['images']} images (the training prompts' "
        f"on-policy images; the data build's training share cost {budget['data_cpu_s']:.0f} CPU "
        "s, counted in each offline run's CPU). Online rows: the checkpoint that first reached "
        "the offline images, the one nearest each offline method's mean CPU seconds, and the "
        "run's last step. Offline rows: each run's final weights only.",
        "",
        *rows,
        "",
        *target_rows(result, task, by_name, base, order),
        "",
        "Training signal of every online run (the training prompts as the run sampled them: GRPO "
        "with guidance, NFT without, so its rates start lower than the evaluation's):",
        "",
        *SIGNAL_HEAD,
        *[training_signal_row(r) for r in online_runs(result, task)],
        "",
    ]


def plot_budgets(result: dict, metrics: list, tasks: list[str], order: list[str], path: Path):
    """Per task, reward rate on the split against images the reward scored: online runs'
    evaluated checkpoints (mean over seeds, joined; seeds as dots) and their per-step reward on
    their own training samples (thin, mean over seeds); offline runs at their data's images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = result["settings"].get("split", "test")
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.8 * len(tasks), 4.2), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, task in zip(axes[0], tasks, strict=True):
        by_name = {m.name: m for m in metrics if m.task == task}
        base = by_name[BASE]
        ax.axhline(100 * base.reward, linestyle="--", color="grey", label="base")
        online = {variant_of(r["name"]) for r in result["records"] if r.get("online")}
        shown = [v for v in order if v in online or v in COMPARED_OFFLINE]
        for colour, variant in zip(colours, shown, strict=False):
            points = [p for ps in method_points(result, task, variant).values() for p in ps]
            if not points:
                continue
            by_x: dict[float, list[float]] = {}
            for p in {p["name"]: p for p in points}.values():
                by_x.setdefault(p["images_scored"], []).append(100 * by_name[p["name"]].reward)
            xs = sorted(by_x)
            for x in xs:
                ax.scatter([x] * len(by_x[x]), by_x[x], s=9, color=colour, alpha=0.5)
            line = [(x, mean(by_x[x])) for x in xs]
            if variant in online:  # before its first update an online run is the base
                line.insert(0, (0, 100 * base.reward))
            ax.plot(*zip(*line, strict=True), "-o", color=colour, label=variant)
            curves = [r["history"] for r in result["records"] if r.get("online")
                      and r["task"] == task and variant_of(r["name"]) == variant]  # fmt: skip
            if curves:
                length = min(len(c) for c in curves)
                x = [curves[0][i]["online/images_scored"] for i in range(length)]
                y = [100 * mean([c[i]["reward/mean"] for c in curves]) for i in range(length)]
                ax.plot(x, y, "-", color=colour, alpha=0.35, linewidth=1,
                        label=f"{variant}: its training samples")  # fmt: skip
        ax.set_xlabel("images the reward scored")
        ax.set_ylabel(f"{task} reward rate (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{task}: held-out prompts ({split}) vs images scored")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def settings_rows(result: dict) -> list[str]:
    rows = ["| name | loss | train.py flags |", "|---|---|---|"]
    for name, v in result["variants"].items():
        flags = " ".join(f"--{k} {val}" for k, val in v["flags"].items())
        rows.append(f"| {name} | {v['loss']} | {flags} |")
    return rows


def reused_note(result: dict) -> str:
    """Runs --resume took from an earlier invocation: their timings are not this one's."""
    reused = [r["name"] for r in result["records"] if r.get("reused")]
    if not reused:
        return ""
    return (
        f" {len(reused)} of {len(result['records'])} runs (the base included) were kept from an "
        "earlier invocation with the same settings (`RESUME=1`), so the total counts only the "
        f"others; reused: {', '.join(reused)}."
    )


def split_text(settings: dict) -> str:
    """Which held-out prompts the figures are of (benchmarks before the splits: all 12)."""
    split = settings.get("split")
    if split is None:
        return "All 12 held-out prompts (before the validation / test split)"
    if split == "test":
        return (
            "The **test** split of the held-out prompts (`assets/toy_prompts_test.txt`, one "
            "prompt per colour; never used to choose a setting), never in the preference data"
        )
    return (
        "The **validation** split of the held-out prompts (`assets/toy_prompts_validation.txt`:"
        " for choosing settings; report the test split's figures, not these)"
    )


def wide_seeds_note(settings: dict) -> str:
    """The variants given more seeds and theirs, or nothing when none are (COMPARE=1)."""
    if not settings["wide"]:
        return ""
    return f" ({', '.join(settings['wide'])}: {settings['wide_seeds']})"


def write_report(result: dict, results_dir: Path) -> str:
    settings = result["settings"]
    metrics = run_metrics(result)
    tasks = [t for t in result["scores"] if t in RULE_OF_TASK]
    order = list(settings["main"]) + [v for v in settings["noisy"] if v not in settings["main"]]
    results_dir.mkdir(parents=True, exist_ok=True)
    timings = result["timings"]
    lines = [
        "# Toy benchmark results",
        "",
        f"`bash exps/toy_benchmark.sh` on the {MACHINE}: total {timings['total_s'] / 60:.1f} min "
        f"({settings['parallel']} training processes at a time, one thread each). Model: "
        f"`{settings['model']}`. {split_text(settings)}, "
        f"{settings['eval_seeds']} images each, every image from its own seed; the base's "
        f"sampler (DDIM; flow Euler for SD3 / Flux) {settings['sample_steps']} steps, "
        f"guidance {settings['guidance_scale']}, {settings['resolution']} px. "
        f"Training seeds: {settings['train_seeds']}{wide_seeds_note(settings)}."
        f"{reused_note(result)}",
        "",
        "Columns: reward rate = share of held-out images the task's rule accepts, mean over "
        "training seeds, and the worst seed; the 95% Wilson interval pools all the loss's images "
        "(it does not include the seed-to-seed spread: the worst seed shows that); shape agreement "
        "= the `shape` rule (the drawn shape is the caption's); diversity = per-prompt spread "
        "across seeds relative to the base's; drift = Frechet distance to the base's images for "
        "the same prompts and seeds (noise floor ~0.5: two halves of the base's own images); "
        "implicit accuracy = held-out pairs with a positive DPO margin against the base; stalled "
        f"steps = training steps whose gradient norm is below {STALL_RATIO:g} of the run's "
        "largest (a saturated loss: those steps move nothing); s / step "
        "= training wall time over steps (one thread, another run beside it).",
        "",
    ]
    for task in tasks:
        base = next(m for m in metrics if m.task == task and m.name == BASE)
        data = result["data"][task]
        lines += [
            f"## Task: {TASK_TEXT[task]}",
            "",
            f"Preference data: {data['train_prompts']} training prompts x "
            f"{data['images_per_prompt']} on-policy images, base reward rate "
            f"{pct(data['train_reward_rate'])}, {data['train_pairs']} pairs"
            + (
                f" ({data['flipped_pairs']} of them, {pct(data['noise'])}, with labels flipped)"
                if "flipped_pairs" in data
                else ""
            )
            + f"; the split's share of the {data['heldout_pairs']} held-out pairs for the "
            "implicit accuracy.",
            "",
            *task_table(task, metrics, base, order),
            "",
        ]
        if any(r.get("online") and r["task"] == task for r in result["records"]):
            lines += compare_section(result, task, metrics, base, order)
    if settings["frontier"]:
        plot_frontier(result, metrics, results_dir / "toy_frontier.png")
        lines += [
            f"## Reward vs drift over beta ({settings['frontier_task']} task)",
            "",
            "| variant | beta | seeds | reward rate (mean) | worst seed | drift (mean) | "
            "shape agreement | diversity | stalled steps |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for spec in settings["frontier"]:
            name, betas = spec.split(":")
            for beta in betas.split(","):
                runs = frontier_runs(result, metrics, name, beta)
                if runs:
                    stalled = [r.stalled for r in runs if r.stalled is not None]
                    lines.append(
                        f"| {name} | {beta} | {len(runs)} | {pct(mean([r.reward for r in runs]))}"
                        f" | {pct(min(r.reward for r in runs))} | "
                        f"{mean([r.drift for r in runs]):.2f} | "
                        f"{pct(mean([r.shape for r in runs]))} | "
                        f"{mean([r.diversity for r in runs]):.2f} | "
                        f"{pct(mean(stalled)) if stalled else ''} |"
                    )
        lines += ["", "![reward vs drift](toy_frontier.png)", ""]
    plot_rewards(metrics, [t for t in tasks if t != "colour-noisy"], order,
                 results_dir / "toy_reward_by_loss.png", settings.get("split", "test"))  # fmt: skip
    compared = [t for t in tasks if any(r.get("online") and r["task"] == t
                                        for r in result["records"])]  # fmt: skip
    if compared:
        plot_budgets(result, metrics, compared, order, results_dir / "toy_online_vs_offline.png")
        lines += ["![reward vs images scored](toy_online_vs_offline.png)", ""]
    first = settings["train_seeds"][0]
    shown = [BASE, *(f"{v}-s{first}" for v in ("dpo", "kto", "sft") if v in settings["main"])]
    grid_task = "colour" if "colour" in tasks else tasks[0]
    before_after_grid(result, grid_task, shown, results_dir / "toy_before_after.png")
    lines += [
        "![reward by loss](toy_reward_by_loss.png)",
        f"![before / after ({grid_task} task)](toy_before_after.png)",
        "",
        "## Every run",
        "",
        "| task | run | images | reward rate | 95% interval | shape | diversity | drift | "
        "implicit accuracy | stalled steps | s / step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in metrics:
        low, high = wilson_interval(m.reward, m.images)
        lines.append(
            f"| {m.task} | {m.name} | {m.images} | {pct(m.reward)} | "
            f"[{100 * low:.1f}, {100 * high:.1f}] | {pct(m.shape)} | {m.diversity:.2f} | "
            f"{m.drift:.2f} | {'' if m.implicit is None else pct(m.implicit)} | "
            f"{'' if m.stalled is None else pct(m.stalled)} | "
            f"{'' if m.seconds_per_step is None else f'{m.seconds_per_step:.2f}'} |"
        )
    lines += [
        "",
        "## Settings",
        "",
        f"Common: batch {settings['batch']}, warm-up {settings['warmup']} steps, "
        f"caption dropout {settings.get('caption_dropout', 0.0)}, "
        f"{settings['images_per_prompt']} on-policy images and up to "
        f"{settings['pairs_per_prompt']} pairs per training prompt. Per variant:",
        "",
        *settings_rows(result),
        "",
        f"Timings: data {timings['data_s'] / 60:.1f} min, runs {timings['runs_s'] / 60:.1f} min, "
        f"total {timings['total_s'] / 60:.1f} min.",
        "",
    ]
    text = "\n".join(lines)
    (results_dir / "toy_results.md").write_text(text, encoding="utf-8")
    return text


def main() -> None:
    """Re-write the report of a finished benchmark (its benchmark.json) into a results folder."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("benchmark_json", type=Path, help="OUT/benchmark.json")
    parser.add_argument("results", type=Path, help="folder for toy_results.md and the plots")
    args = parser.parse_args()
    result = json.loads(args.benchmark_json.read_text(encoding="utf-8"))
    write_report(result, args.results)
    print(f"wrote {args.results / 'toy_results.md'}")


if __name__ == "__main__":
    main()
