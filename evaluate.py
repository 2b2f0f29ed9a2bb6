"""Score generations with a registry of scorers; summarise and compare models.

    # folders written by generate.py (images/ + generations.csv)
    python evaluate.py --run base=outputs/gen/base --run dpo=outputs/gen/dpo \
        --scorer pickscore=/models/PickScore_v1 --out outputs/eval

    # or generate first: base alone, and the base with a trained run (full or LoRA) loaded
    python evaluate.py --model assets/toy-sd15 --generate base --generate dpo=outputs/dpo \
        --prompts assets/toy_prompts_heldout.txt --num_seeds 8 --distinct_seeds \
        --scorer toy_warm --out outputs/eval

    # a standard suite with a written-down protocol (evaluation/suites.py)
    python evaluate.py --suite hpsv2 --protocol sd15 --model runwayml/stable-diffusion-v1-5 \
        --generate base --generate dpo=outputs/sd15_dpo --scorer hpsv2=/models/hpsv2 --out OUT

Writes OUT/scores.csv (one row per image, one column per scorer), OUT/summary.md (mean and 95%
interval per model and scorer, per style for suites with styles; win rates of every model
against the baseline, the first run unless --baseline; the protocol; published reference rows,
marked as not measured here), OUT/protocol.json and OUT/summary.png (bar charts). With more than
one run, OUT/distribution.csv and the summary also hold each model's diversity and drift against
the baseline's images for the same prompts and seeds (evaluation/distribution.py). There is no
default scorer: a toy rule means nothing on a real model, and a learned scorer needs its weights.

Images that share a seed across prompts are not independent draws when the noise decides most
of the picture: a run with shared seeds gets a warning (use --distinct_seeds), since its
intervals come out too narrow.
"""

from __future__ import annotations

# ruff: noqa: E402  (third-party noise filters go in before transformers imports)
import argparse
import hashlib
import json
import logging
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from common import cli

cli.quiet_third_party()

import pandas as pd
import torch
from PIL import Image

from evaluation.distribution import compare_runs, distribution_markdown
from evaluation.references import metric_reference_markdown, references_for
from evaluation.scorers import SCORERS, Scorer, build_scorer, scorer_problem, unreadable_prompt
from evaluation.stats import WinRate, summary, win_rate
from evaluation.suites import PROTOCOLS, SUITES, load_suite, read_prompts

logger = logging.getLogger(__name__)

SCORES_CSV = "scores.csv"
SUMMARY_MD = "summary.md"
SUMMARY_PNG = "summary.png"
PROTOCOL_JSON = "protocol.json"
DISTRIBUTION_CSV = "distribution.csv"
# Generation flags whose default comes from --protocol (an explicit flag wins).
PROTOCOL_FLAGS = {
    "scheduler": "scheduler",
    "steps": "steps",
    "guidance_scale": "guidance_scale",
    "resolution": "resolution",
    "num_seeds": "images_per_prompt",
    "dtype": "dtype",
}


def read_generations(name: str, folder: Path) -> pd.DataFrame:
    """A generate.py folder's generations.csv (file_name, prompt[, seed]) with paths resolved."""
    from models.generation import METADATA_CSV

    path = folder / METADATA_CSV
    if not path.is_file():
        raise cli.UsageError(
            f"--run {name}={folder}: {path} not found (expected a folder written by generate.py)"
        )
    table = pd.read_csv(path, dtype={"prompt": str}, keep_default_na=False)
    missing = {"file_name", "prompt"} - set(table.columns)
    if missing:
        raise cli.UsageError(f"--run {name}={folder}: {path} lacks column(s) {sorted(missing)}")
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
        # Clipped at 0: a constant score's interval can sit a rounding error inside its mean.
        error = [(part["mean"] - part["ci_low"]).clip(lower=0),
                 (part["ci_high"] - part["mean"]).clip(lower=0)]  # fmt: skip
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
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device for generation and the scorer models",
    )
    gen = parser.add_argument_group("generation (with --generate)")
    gen.add_argument("--model", default="assets/toy-sd15", help="base model dir or hub name")
    gen.add_argument("--prompts", default=None, help="file with one prompt per line")
    gen.add_argument("--suite", choices=sorted(SUITES), default=None, help="a shipped prompt suite")
    gen.add_argument("--limit", type=int, default=None, help="first N prompts (of each style)")
    gen.add_argument(
        "--protocol",
        choices=sorted(PROTOCOLS),
        default="toy",
        help="preset for the flags below (explicit flags override; all recorded in the summary)",
    )
    gen.add_argument("--num_seeds", type=int, default=None, help="images per prompt (seeds 0..k-1)")
    gen.add_argument(
        "--distinct_seeds",
        action="store_true",
        help="no two prompts share a seed (generate.py): independent images for the intervals",
    )
    gen.add_argument("--scheduler", default=None, help="sampler (see generate.py)")
    gen.add_argument("--steps", type=int, default=None, help="inference steps")
    gen.add_argument("--guidance_scale", type=float, default=None, help="CFG scale (<=1: off)")
    gen.add_argument("--resolution", type=int, default=None, help="pixels (default: native)")
    gen.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="precision")
    gen.add_argument("--batch_size", type=int, default=32, help="images per pipeline call")
    args = parser.parse_args(argv)
    if not args.run and not args.generate:
        parser.error("give --run NAME=DIR and/or --generate NAME[=UNET]")
    if args.prompts and args.suite:
        parser.error("give --prompts or --suite, not both")
    if args.generate and not (args.prompts or args.suite):
        parser.error("--generate needs --prompts or --suite")
    protocol = PROTOCOLS[args.protocol]
    args.scheduler_given = args.scheduler is not None  # a preset may not suit SD3 / Flux
    for flag, preset in PROTOCOL_FLAGS.items():
        if getattr(args, flag) is None:
            setattr(args, flag, getattr(protocol, preset))
    args.distinct_seeds = args.distinct_seeds or protocol.distinct_seeds
    for flag in ("num_seeds", "steps", "batch_size", "limit", "resolution"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1")
    if not args.scorer:
        parser.error(
            "give at least one --scorer (toy_warm / toy_colour only mean something on the toy "
            "model; a real model needs a learned scorer such as pickscore=PATH)"
        )
    return args


def run_prompts(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(prompts, styles) from --suite or --prompts (styles "" when the source has none)."""
    try:
        if args.suite:
            suite = load_suite(args.suite, args.limit)
            return suite.prompts, suite.styles
        prompts = read_prompts(args.prompts)[: args.limit]
    except FileNotFoundError:
        raise cli.UsageError(f"--prompts {args.prompts}: no such file") from None
    except ValueError as exc:  # an empty prompt file, a --limit below 1
        raise cli.UsageError(f"{prompt_source(args)}: {exc}") from None
    return prompts, [""] * len(prompts)


def prompt_source(args: argparse.Namespace) -> str:
    return f"--suite {args.suite}" if args.suite else f"--prompts {args.prompts}"


def check_arguments(args: argparse.Namespace) -> None:
    """Everything that can be told before the first image is drawn, so that no mistake surfaces
    after minutes of generating: unique names, the --run folders, --baseline, the model, the
    sampler and each --generate run, the prompts, the scorers, and whether each scorer can
    score every prompt (a toy rule needs the toy task's colour or shape words)."""
    given = cli.parse_named(args.run, "--run")
    generated = cli.parse_named(args.generate, "--generate")
    names = [name for name, _ in (*given, *generated)]
    if len(set(names)) != len(names):
        raise cli.UsageError(f"--run and --generate: names must be unique, got {names}")
    if args.baseline is not None and args.baseline not in names:
        raise cli.UsageError(f"--baseline {args.baseline!r} is not one of the runs {names}")
    for name, folder in given:
        if not folder:
            raise cli.UsageError(f"--run {name}: give NAME=DIR (a folder written by generate.py)")
    sources = [
        (f"--run {name}={folder}", read_generations(name, Path(folder))["prompt"].tolist())
        for name, folder in given
    ]
    if generated:
        from models import generation

        generation.choose_sampler(args.model, args.scheduler, strict=args.scheduler_given)
        for _, run in generated:
            if run:
                generation.trained_weights(run, "--generate")
        sources.append((prompt_source(args), run_prompts(args)[0]))
    for name, path in cli.parse_named(args.scorer, "--scorer"):
        problem = scorer_problem(name, path)
        if problem:
            raise cli.UsageError(f"--scorer {problem}")
        for where, prompts in sources:
            found = unreadable_prompt(name, prompts)
            if found:
                index, reason = found
                raise cli.UsageError(
                    f"--scorer {name} cannot score prompt {index + 1} of {where}: {reason}"
                )


def generate_runs(args: argparse.Namespace) -> list[tuple[str, Path]]:
    if not args.generate:
        return []
    from models import generation  # diffusers loads only when there is something to generate

    prompts, styles = run_prompts(args)
    runs = []
    for name, run in cli.parse_named(args.generate, "--generate"):
        weights = generation.trained_weights(run, "--generate") if run else {}
        pipe = generation.load_pipeline(args.model, scheduler=args.scheduler,
                                      strict=args.scheduler_given,
                                      dtype=generation.DTYPES[args.dtype], device=args.device,
                                      **weights)  # fmt: skip
        # What actually sampled (a preset's DDIM becomes flow_euler for SD3 / Flux): recorded.
        args.scheduler = next(n for n, c in generation.SCHEDULERS.items()
                              if type(pipe.scheduler) is c)  # fmt: skip
        images = generation.generate(
            pipe,
            prompts,
            list(range(args.num_seeds)),
            args.steps,
            args.guidance_scale,
            args.resolution,
            args.batch_size,
            distinct_seeds=args.distinct_seeds,
        )
        path = generation.save_generations(args.out / name, images)
        table = pd.read_csv(path, dtype={"prompt": str}, keep_default_na=False)
        table["style"] = [styles[g.prompt_index] for g in images]
        table.to_csv(path, index=False)
        runs.append((name, args.out / name))
    return runs


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def scorer_version(name: str, path: str | None) -> dict:
    """What a scorer was: its source and, for a local directory, the SHA-256 of its weights."""
    source = path or SCORERS[name][1] or "rules in evaluation/toy_reward.py"
    record: dict = {"scorer": name, "source": source}
    if path and Path(path).is_dir():
        record["weights_sha256"] = {
            p.name: file_sha256(p) for p in sorted(Path(path).glob("*.safetensors"))
        }
    return record


def protocol_record(args: argparse.Namespace, runs: Sequence[tuple[str, Path]]) -> dict:
    """Every choice that moves the numbers, for the summary and protocol.json."""
    from training.config import git_sha

    record: dict = {
        "scorers": [scorer_version(n, p) for n, p in cli.parse_named(args.scorer, "--scorer")],
        "runs": {name: str(folder) for name, folder in runs},
        "versions": {lib: metadata.version(lib) for lib in ("torch", "diffusers", "transformers")},
        "git_sha": git_sha(),
    }
    if not args.generate:
        record["generation"] = "not done here: folders given with --run"
        return record
    prompts, _ = run_prompts(args)
    if args.suite:
        suite = load_suite(args.suite, args.limit)
        record["prompts"] = {"suite": args.suite, "file": SUITES[args.suite].file,
                             "sha256": suite.sha256, "limit_per_style": args.limit,
                             "count": len(prompts)}  # fmt: skip
    else:
        record["prompts"] = {"file": args.prompts, "sha256": file_sha256(Path(args.prompts)),
                             "limit": args.limit, "count": len(prompts)}  # fmt: skip
    record["generation"] = {
        "protocol": args.protocol,
        "model": args.model,
        "unets": dict(cli.parse_named(args.generate, "--generate")),
        "scheduler": args.scheduler,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "resolution": args.resolution or "native",
        "images_per_prompt": args.num_seeds,
        "seeds": (
            f"prompt i, image j: seed i * {args.num_seeds} + j"
            if args.distinct_seeds
            else f"0..{args.num_seeds - 1} for every prompt"
        ),
        "dtype": args.dtype,
        "device": args.device,
    }
    return record


def add_styles(scores: pd.DataFrame, suite: str | None) -> pd.DataFrame:
    """A style column for suites with styles (from generation, or by prompt for --run)."""
    if not suite or not SUITES[suite].styles:
        return scores
    full = load_suite(suite)
    style_of = dict(zip(reversed(full.prompts), reversed(full.styles), strict=True))
    if "style" not in scores.columns:
        scores["style"] = ""
    missing = scores["style"].fillna("").eq("")
    scores.loc[missing, "style"] = scores.loc[missing, "prompt"].map(style_of).fillna("")
    return scores


def style_markdown(scores: pd.DataFrame, scorers: Sequence[str]) -> str:
    """Mean and 95% interval per model, style and scorer."""
    lines = [
        "| model | style | scorer | images | mean | 95% interval |",
        "|---|---|---|---|---|---|",
    ]
    for style in sorted(s for s in scores["style"].unique() if s):
        part = summary(scores[scores["style"] == style], scorers)
        lines += [
            f"| {r.model} | {style} | {r.scorer} | {r.n} | {r.mean:.4g} | "
            f"[{r.ci_low:.4g}, {r.ci_high:.4g}] |"
            for r in part.itertuples()
        ]
    return "\n".join(lines) + "\n"


def reference_markdown(suite: str, scores: pd.DataFrame, scorers: Sequence[str]) -> str:
    """Measured rows beside the published ones (on the published scale), for suites that have
    published figures (evaluation/references.py)."""
    by_model = {m: {s: part[s].mean() for s in scorers} for m, part in scores.groupby("model")}
    per_suite = metric_reference_markdown(suite, by_model)
    refs = references_for(suite)
    if not refs:
        return per_suite
    styles = list(refs[0].by_style)
    lines = [
        "| model | " + " | ".join(styles) + " | average | measured here | source |",
        "|---" * (len(styles) + 4) + "|",
    ]
    for ref in refs:
        if ref.scorer in scorers:
            for model in scores["model"].unique():
                part = scores[scores["model"] == model]
                means = [
                    ref.scale * part.loc[part["style"] == s, ref.scorer].mean() for s in styles
                ]
                total = ref.scale * part[ref.scorer].mean()
                cells = " | ".join(f"{m:.2f}" for m in means)
                lines.append(f"| {model} | {cells} | {total:.2f} | yes | this run |")
            break
    for ref in refs:
        cells = " | ".join(f"{ref.by_style[s]:.2f}" for s in styles)
        lines.append(
            f"| {ref.model} | {cells} | {ref.average:.2f} | **no: published** | "
            f"[source]({ref.source}) |"
        )
    scale = f"{refs[0].scale:g} x the `{refs[0].scorer}` scorer's mean"
    harnesses = sorted({r.harness for r in refs})
    return per_suite + (
        f"Figures on the published scale ({scale}):\n\n" + "\n".join(lines) + "\n\n"
        f"Published rows are NOT measured here; their harness: {'; '.join(harnesses)}.\n"
    )


def protocol_markdown(record: dict) -> str:
    lines = ["| choice | value |", "|---|---|"]
    for section in ("prompts", "generation"):
        value = record.get(section)
        if isinstance(value, dict):
            lines += [f"| {section}: {k} | {v} |" for k, v in value.items()]
        elif value is not None:
            lines.append(f"| {section} | {value} |")
    for scorer in record["scorers"]:
        weights = scorer.get("weights_sha256")
        digest = "; ".join(f"{k} sha256 {v[:16]}" for k, v in weights.items()) if weights else ""
        lines.append(f"| scorer {scorer['scorer']} | {scorer['source']} {digest} |")
    lines.append(f"| versions | {record['versions']}, prefdiff {record['git_sha'][:12]} |")
    return "\n".join(lines) + "\n"


def evaluate(args: argparse.Namespace) -> tuple[pd.DataFrame, pd.DataFrame, list[WinRate]]:
    check_arguments(args)
    runs = [(n, Path(d)) for n, d in cli.parse_named(args.run, "--run")] + generate_runs(args)
    scorers = [build_scorer(n, p, args.device) for n, p in cli.parse_named(args.scorer, "--scorer")]
    names = [s.name for s in scorers]
    generations = pd.concat([read_generations(n, d) for n, d in runs])
    warning = shared_seeds(generations)
    if warning:
        logger.warning(warning)
    scores = add_styles(score_table(generations, scorers), args.suite)
    baseline = args.baseline or runs[0][0]
    table = summary(scores, names)
    rates = win_rates(scores, names, baseline)
    record = protocol_record(args, runs)
    args.out.mkdir(parents=True, exist_ok=True)
    scores.drop(columns="path").to_csv(args.out / SCORES_CSV, index=False)
    text = markdown(table, rates)
    if len(runs) > 1 and (distribution := compare_runs(scores, baseline)):
        pd.DataFrame(distribution).to_csv(args.out / DISTRIBUTION_CSV, index=False)
        text += "\nDiversity and drift:\n\n" + distribution_markdown(distribution)
    if "style" in scores.columns and scores["style"].ne("").any():
        text += "\nPer style:\n\n" + style_markdown(scores, names)
    if args.suite and (refs := reference_markdown(args.suite, scores, names)):
        text += "\n" + refs
    text += "\nProtocol (also in protocol.json):\n\n" + protocol_markdown(record)
    (args.out / SUMMARY_MD).write_text(text, encoding="utf-8")
    (args.out / PROTOCOL_JSON).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    bar_chart(table, rates, args.out / SUMMARY_PNG)
    return scores, table, rates


def main(argv: Sequence[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame, list[WinRate]]:
    args = parse_args(argv)
    cli.setup_logging("%(levelname)s %(name)s: %(message)s")
    result = evaluate(args)
    print((args.out / SUMMARY_MD).read_text(encoding="utf-8"), end="")
    written = [args.out / name for name in (SCORES_CSV, SUMMARY_MD, PROTOCOL_JSON, SUMMARY_PNG)]
    generated = [str(args.out / name) for name, _ in cli.parse_named(args.generate, "--generate")]
    if generated:
        print(f"generated images: {', '.join(generated)}")
    print(f"wrote {', '.join(str(p) for p in written)}")
    return result


if __name__ == "__main__":
    cli.run(main)
