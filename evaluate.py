"""Score generations with a registry of scorers; summarise and compare models.

    # folders written by generate.py (images/ + generations.csv)
    python evaluate.py --run base=outputs/gen/base --run dpo=outputs/gen/dpo \
        --scorer pickscore=/models/PickScore_v1 --out outputs/eval

    # or generate first: base alone, and the base with a trained run (full or LoRA) loaded
    python evaluate.py --model assets/toy-sd15 --generate base --generate dpo=outputs/dpo \
        --prompts assets/toy_prompts_heldout.txt --num_seeds 8 --distinct_seeds \
        --scorer toy_warm --out outputs/eval

Writes OUT/scores.csv (one row per image, one column per scorer), OUT/summary.md (mean and 95%
interval per model and scorer; win rates of every model against the baseline, the first run
unless --baseline) and OUT/summary.png (the same as bar charts). There is no default scorer:
a toy rule means nothing on a real model, and a learned scorer needs its weights.

Images that share a seed across prompts are not independent draws when the noise decides most
of the picture: a run with shared seeds gets a warning (use --distinct_seeds), since its
intervals come out too narrow.
"""

from __future__ import annotations

# ruff: noqa: E402  (third-party noise filters go in before transformers imports)
import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import cli

cli.quiet_third_party()

import pandas as pd
from PIL import Image

from evaluation.scorers import SCORERS, Scorer, build_scorer
from evaluation.stats import WinRate, summary, win_rate

logger = logging.getLogger(__name__)

SCORES_CSV = "scores.csv"
SUMMARY_MD = "summary.md"
SUMMARY_PNG = "summary.png"


def read_generations(name: str, folder: Path) -> pd.DataFrame:
    """A generate.py folder's generations.csv (file_name, prompt[, seed]) with paths resolved."""
    from generate import METADATA_CSV

    path = folder / METADATA_CSV
    if not path.is_file():
        raise cli.UsageError(
            f"--run {name}={folder}: {path} not found (expected a folder written by generate.py)"
        )
    table = pd.read_csv(path, dtype={"prompt": str}, keep_default_na=False)
    missing = {"file_name", "prompt"} - set(table.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
    if "seed" not in table.columns:
        table["seed"] = range(len(table))
    table["path"] = [str(folder / f) for f in table["file_name"]]
    table.insert(0, "model", name)
    return table


def shared_seeds(table: pd.DataFrame) -> str | None:
    """A warning when one model's images share seeds across prompts, else None."""
    prompts_per_seed = table.groupby(["model", "seed"])["prompt"].nunique()
    shared = prompts_per_seed[prompts_per_seed > 1]
    if shared.empty:
        return None
    (model, seed), count = next(iter(shared.items()))
    return (
        f"{len(shared)} seeds are shared across prompts (e.g. {model}: seed {seed} in {count} "
        "prompts): images with the same seed share their noise, so when the noise decides most "
        "of the picture they are not independent and the intervals are too narrow; generate "
        "with --distinct_seeds"
    )


def score_table(table: pd.DataFrame, scorers: Sequence[Scorer], batch: int = 64) -> pd.DataFrame:
    """Adds one column per scorer; images are opened batch by batch."""
    table = table.reset_index(drop=True).copy()
    columns: dict[str, list[float]] = {s.name: [] for s in scorers}
    for start in range(0, len(table), batch):
        rows = table.iloc[start : start + batch]
        images = []
        for path in rows["path"]:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        prompts = rows["prompt"].tolist()
        for scorer in scorers:
            columns[scorer.name] += scorer.score(images, prompts)
    for name, values in columns.items():
        table[name] = values
    return table


def win_rates(scores: pd.DataFrame, scorers: Sequence[str], baseline: str) -> list[WinRate]:
    return [
        win_rate(scores, model, baseline, scorer)
        for model in scores["model"].unique()
        if model != baseline
        for scorer in scorers
    ]


def markdown(table: pd.DataFrame, rates: Sequence[WinRate]) -> str:
    """The summary and win-rate tables as markdown."""
    lines = ["| model | scorer | images | mean | 95% interval |", "|---|---|---|---|---|"]
    for row in table.itertuples():
        lines.append(
            f"| {row.model} | {row.scorer} | {row.n} | {row.mean:.4g} | "
            f"[{row.ci_low:.4g}, {row.ci_high:.4g}] |"
        )
    if rates:
        lines += [
            "",
            "Win rate per prompt (median-scoring image of each model decides; a tie counts half):",
            "",
            "| model | vs | scorer | prompts | wins | ties | losses | win rate |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r.model} | {r.baseline} | {r.scorer} | {r.prompts} | {r.wins} | {r.ties} | "
            f"{r.losses} | {r.rate:.1%} |"
            for r in rates
        ]
    return "\n".join(lines) + "\n"


def bar_chart(table: pd.DataFrame, rates: Sequence[WinRate], path: Path) -> None:
    """One panel per scorer (mean with 95% interval per model), plus win rates vs the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scorers = list(table["scorer"].unique())
    panels = len(scorers) + bool(rates)
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.2), squeeze=False)
    for ax, scorer in zip(axes[0], scorers, strict=False):
        part = table[table["scorer"] == scorer]
        error = [part["mean"] - part["ci_low"], part["ci_high"] - part["mean"]]
        ax.bar(part["model"], part["mean"], yerr=error, capsize=4, color="tab:blue")
        ax.set_title(scorer)
        ax.tick_params(axis="x", rotation=30)
    if rates:
        ax = axes[0][-1]
        labels = [f"{r.model}\n{r.scorer}" for r in rates]
        ax.bar(labels, [r.rate for r in rates], color="tab:orange")
        ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
        ax.set_ylim(0, 1)
        ax.set_title(f"win rate vs {rates[0].baseline}")
        ax.tick_params(axis="x", rotation=30, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_named(values: Sequence[str], flag: str) -> list[tuple[str, str | None]]:
    """NAME or NAME=VALUE entries, names unique."""
    pairs = [(v.split("=", 1)[0], v.split("=", 1)[1] if "=" in v else None) for v in values]
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise cli.UsageError(f"{flag}: names must be unique, got {names}")
    return pairs


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cli.Parser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run", action="append", default=[], help="NAME=DIR of a generate.py folder (repeat)"
    )
    parser.add_argument(
        "--generate",
        action="append",
        default=[],
        help="NAME (the base) or NAME=RUN (a trained run: OUTPUT_DIR, or its unet/ or lora/): "
        "generate into OUT/NAME first",
    )
    parser.add_argument(
        "--scorer",
        action="append",
        default=[],
        help=f"NAME or NAME=PATH, NAME in {sorted(SCORERS)} (repeat; at least one)",
    )
    parser.add_argument("--baseline", default=None, help="run the others are compared with")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--device", default="cpu", help="device for the scorer models")
    gen = parser.add_argument_group("generation (with --generate)")
    gen.add_argument("--model", default="assets/toy-sd15", help="base model dir or hub name")
    gen.add_argument("--prompts", default=None, help="file with one prompt per line")
    gen.add_argument("--num_seeds", type=int, default=8, help="images per prompt (seeds 0..k-1)")
    gen.add_argument(
        "--distinct_seeds",
        action="store_true",
        help="no two prompts share a seed (generate.py): independent images for the intervals",
    )
    gen.add_argument("--scheduler", default="ddim", help="sampler (see generate.py)")
    gen.add_argument("--steps", type=int, default=20, help="inference steps")
    gen.add_argument("--guidance_scale", type=float, default=1.0, help="CFG scale (<=1: off)")
    gen.add_argument("--resolution", type=int, default=None, help="pixels (default: native)")
    gen.add_argument("--batch_size", type=int, default=32, help="images per pipeline call")
    args = parser.parse_args(argv)
    if not args.run and not args.generate:
        parser.error("give --run NAME=DIR and/or --generate NAME[=UNET]")
    if args.generate and not args.prompts:
        parser.error("--generate needs --prompts")
    if not args.scorer:
        parser.error(
            "give at least one --scorer (toy_warm / toy_colour only mean something on the toy "
            "model; a real model needs a learned scorer such as pickscore=PATH)"
        )
    return args


def generate_runs(args: argparse.Namespace) -> list[tuple[str, Path]]:
    if not args.generate:
        return []
    import generate

    prompts = generate.read_prompts(args.prompts)
    runs = []
    for name, run in parse_named(args.generate, "--generate"):
        weights = generate.trained_weights(run, "--generate") if run else {}
        pipe = generate.load_pipeline(args.model, scheduler=args.scheduler, **weights)
        images = generate.generate(
            pipe,
            prompts,
            list(range(args.num_seeds)),
            args.steps,
            args.guidance_scale,
            args.resolution,
            args.batch_size,
            distinct_seeds=args.distinct_seeds,
        )
        generate.save_generations(args.out / name, images)
        runs.append((name, args.out / name))
    return runs


def evaluate(args: argparse.Namespace) -> tuple[pd.DataFrame, pd.DataFrame, list[WinRate]]:
    runs = [(n, Path(d)) for n, d in parse_named(args.run, "--run") if d] + generate_runs(args)
    scorers = [build_scorer(n, p, args.device) for n, p in parse_named(args.scorer, "--scorer")]
    names = [s.name for s in scorers]
    generations = pd.concat([read_generations(n, d) for n, d in runs])
    warning = shared_seeds(generations)
    if warning:
        logger.warning(warning)
    scores = score_table(generations, scorers)
    baseline = args.baseline or runs[0][0]
    if baseline not in scores["model"].unique():
        given = [n for n, _ in runs]
        raise cli.UsageError(f"--baseline {baseline!r} is not one of the runs {given}")
    table = summary(scores, names)
    rates = win_rates(scores, names, baseline)
    args.out.mkdir(parents=True, exist_ok=True)
    scores.drop(columns="path").to_csv(args.out / SCORES_CSV, index=False)
    (args.out / SUMMARY_MD).write_text(markdown(table, rates), encoding="utf-8")
    bar_chart(table, rates, args.out / SUMMARY_PNG)
    return scores, table, rates


def main(argv: Sequence[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame, list[WinRate]]:
    args = parse_args(argv)
    cli.setup_logging("%(levelname)s %(name)s: %(message)s")
    result = evaluate(args)
    print(markdown(result[1], result[2]), end="")
    written = [args.out / name for name in (SCORES_CSV, SUMMARY_MD, SUMMARY_PNG)]
    generated = [str(args.out / name) for name, _ in parse_named(args.generate, "--generate")]
    if generated:
        print(f"generated images: {', '.join(generated)}")
    print(f"wrote {', '.join(str(p) for p in written)}")
    return result


if __name__ == "__main__":
    cli.run(main)
