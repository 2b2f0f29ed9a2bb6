"""The toy benchmark: on-policy preference data from the toy base, DPO / KTO / SFT fine-tunes,
held-out evaluation with the toy reward, implicit reward accuracy, results table and plots.

Run through exps/toy_benchmark.sh, which holds the settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

# Run as a script, the repo root is not on sys.path.
if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger(__name__)

LOSSES = ("dpo", "kto", "sft")
MACHINE = "2-core CPU dev machine, no GPU"
RULE_TEXT = {
    "warm": "`warm` (a warm-filter taste: mean red - mean blue >= 20 on the 0-255 scale; the "
    "caption is ignored)",
    "colour": "`colour` (the image shows the colour its caption names)",
}


def run_name(loss: str, seed: int) -> str:
    return f"{loss}-s{seed}"


def train_argv(args: argparse.Namespace, loss: str, seed: int, data: Path, out: Path) -> list[str]:
    """train.py flags of one fine-tune; DPO and SFT read the pairs, KTO the per-image CSV."""
    source = (
        ["--csv", str(data / "kto" / "train_processed_v3.csv"), "--images", str(data / "kto"),
         "--kto_desirable_prob", str(args.kto_desirable_prob)]
        if loss == "kto"
        else ["--data", str(data / "pickapic")]
    )  # fmt: skip
    steps = getattr(args, f"{loss}_steps")
    beta = getattr(args, f"{loss}_beta", None)  # SFT has none (train.py would say it is unused)
    return [
        "--pretrained_model", args.model, *source, "--output_dir", str(out / run_name(loss, seed)),
        "--loss", loss, *(["--beta", str(beta)] if beta is not None else []),
        "--learning_rate", str(getattr(args, f"{loss}_lr")), "--max_train_steps", str(steps),
        "--train_batch_size", str(args.batch), "--resolution", str(args.resolution),
        "--lr_warmup_steps", str(args.warmup), "--caption_dropout", "0",
        "--dataloader_num_workers", "0", "--checkpointing_steps", str(steps),
        "--checkpoints_total_limit", "1", "--report_to", "none", "--seed", str(seed),
        "--overwrite_output_dir", "true",  # the benchmark re-runs every fine-tune
    ]  # fmt: skip


def implicit_accuracy(model: str, unet_dir: Path, pairs: Path, resolution: int) -> float:
    """DPO implicit reward accuracy of a trained denoiser (UNet, or SD3 / Flux transformer)
    against the base, on held-out pairs."""
    import torch
    from diffusers import AutoencoderKL

    from config import TrainConfig
    from evaluation.implicit_reward import accuracy, implicit_margins, read_pairs
    from models.family import denoiser_config, family_for
    from models.loading import load_family

    pixels, captions = read_pairs(pairs, resolution)
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
    return accuracy(margins)


def smoothed(values: list[float], window: int) -> list[float]:
    """Trailing moving average (per-step metrics of small batches are noisy)."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def plot_training_curves(histories: dict[str, list[dict]], path: Path) -> None:
    """Loss, accuracy, margins and policy error per step (moving average over ~5% of steps); one
    colour per loss, one line per training seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(LOSSES, ("tab:blue", "tab:orange", "tab:green"), strict=True))
    keys = ["loss", "rewards/accuracies", "rewards/margins", "err/policy"]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.4 * len(keys), 3))
    for ax, key in zip(axes, keys, strict=True):
        labelled = set()
        for name, history in histories.items():
            loss = name.split("-")[0]
            if all(key in h for h in history):
                values = smoothed([h[key] for h in history], max(1, len(history) // 20))
                label = None if loss in labelled else loss
                labelled.add(loss)
                ax.plot(range(1, len(values) + 1), values, label=label, color=colours[loss],
                        linewidth=0.8, alpha=0.8)  # fmt: skip
        ax.set_title(key)
        ax.set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reward_by_model(table, path: Path, rule: str) -> None:
    """One bar per model (every training seed), with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(table), 3.4))
    error = [100 * (table["mean"] - table["ci_low"]), 100 * (table["ci_high"] - table["mean"])]
    ax.bar(table["model"], 100 * table["mean"], yerr=error, capsize=3, color="tab:blue")
    ax.set_ylabel(f"toy {rule} reward rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title("held-out prompts, 95% interval")
    ax.tick_params(axis="x", labelrotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def before_after_grid(eval_dir: Path, names: list[str], path: Path, prompts: int, seeds: int):
    """Rows: the first held-out prompts; column blocks: one per model, `seeds` images each."""
    import pandas as pd
    from PIL import Image, ImageDraw, ImageFont

    cell, label, header = 64, 230, 16
    tables = {n: pd.read_csv(eval_dir / n / "generations.csv") for n in names}
    chosen = list(dict.fromkeys(tables[names[0]]["prompt"]))[:prompts]
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
                tile = Image.open(eval_dir / name / file_name).convert("RGB").resize((cell, cell))
                grid.paste(tile, (label + b * (seeds * cell + 8) + c * cell, header + r * cell))
    grid.save(path)


def per_loss_rows(args, table, accuracies, base: float) -> list[str]:
    """One row per loss: the reward rate over its training seeds (mean, min and max)."""
    rows = []
    for loss in LOSSES:
        names = [run_name(loss, seed) for seed in args.train_seeds]
        rates = [float(table.loc[table["model"] == n, "mean"].iloc[0]) for n in names]
        gains = [100 * (r - base) for r in rates]
        accs = [accuracies[n] for n in names]
        rows.append(
            f"| {loss} | {len(names)} | {100 * sum(rates) / len(rates):.1f}% | "
            f"{sum(gains) / len(gains):+.1f} | {min(gains):+.1f} / {max(gains):+.1f} | "
            f"{100 * sum(accs) / len(accs):.1f}% (min {100 * min(accs):.1f}%) |"
        )
    return rows


def results_markdown(args, stats, table, rates, accuracies, timings, total) -> str:
    base = float(table.loc[table["model"] == "base", "mean"].iloc[0])
    seeds = " ".join(str(s) for s in args.train_seeds)
    lines = [
        "# Toy benchmark results",
        "",
        f"`bash exps/toy_benchmark.sh` on the {MACHINE}; total {total / 60:.1f} min. "
        f"Every loss trained with {len(args.train_seeds)} training seeds ({seeds}: the seed of "
        "the noise and timestep draws, the data order and the KTO sampler). "
        f"Held-out prompts: {stats['heldout_prompts']} (never in the preference data), "
        f"{args.eval_seeds} images each, every image from its own seed (`--distinct_seeds`); "
        f"the base's own sampler (DDIM; flow Euler for SD3 / Flux) {args.sample_steps} steps, "
        f"guidance {args.guidance_scale}, {args.resolution} px. "
        f"Reward: evaluation/toy_reward.py {RULE_TEXT[args.rule]}. "
        f"Base: {100 * base:.1f}%.",
        "",
        "| loss | training seeds | toy reward rate (mean over seeds) | vs base (points, mean) | "
        "vs base (points, worst / best seed) | implicit reward accuracy (held-out pairs) |",
        "|---|---|---|---|---|---|",
        *per_loss_rows(args, table, accuracies, base),
        "",
        "Every model:",
        "",
        "| model | images | toy reward rate | 95% interval | vs base (points) | "
        "win rate vs base (per prompt) | implicit reward accuracy (held-out pairs) |",
        "|---|---|---|---|---|---|---|",
    ]
    rate_of = {r.model: r for r in rates}
    for row in table.itertuples():
        win = rate_of.get(row.model)
        acc = accuracies.get(row.model)
        lines.append(
            f"| {row.model} | {row.n} | {100 * row.mean:.1f}% | "
            f"[{100 * row.ci_low:.1f}, {100 * row.ci_high:.1f}] | "
            f"{'' if row.model == 'base' else f'{100 * (row.mean - base):+.1f}'} | "
            f"{'' if win is None else f'{win.rate:.1%} ({win.wins}/{win.ties}/{win.losses})'} | "
            f"{'' if acc is None else f'{acc:.1%}'} |"
        )
    lines += [
        "",
        "Win rate: per held-out prompt, the median-scoring image of the model against the base's "
        "(wins/ties/losses; a tie counts half). Implicit reward accuracy: share of held-out "
        f"preference pairs ({stats['heldout_pairs']}) with DPO margin > 0, policy vs the base as "
        "reference, errors averaged over 16 (timestep, noise) draws.",
        "",
        f"Preference data (on-policy, from the base, every image from its own seed): "
        f"{stats['train_prompts']} training prompts x {stats['images_per_prompt']} images, base "
        f"reward rate {100 * stats['train_reward_rate']:.1f}%, {stats['train_pairs']} pairs; the "
        "KTO CSV labels the images of those pairs "
        f"(KTO draws a desirable image with probability {args.kto_desirable_prob}).",
        "",
        "| loss | steps | batch | learning rate | beta | time per run (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for loss in LOSSES:
        beta = getattr(args, f"{loss}_beta", None)
        lines.append(
            f"| {loss} | {getattr(args, f'{loss}_steps')} | {args.batch} | "
            f"{getattr(args, f'{loss}_lr')} | {'' if beta is None else beta} | "
            f"{timings[loss] / len(args.train_seeds):.0f} s |"
        )
    lines += [
        "",
        f"Other timings: data {timings['data']:.0f} s, evaluation {timings['eval']:.0f} s, "
        f"implicit accuracy {timings['implicit']:.0f} s.",
        "",
        "![training curves](toy_training_curves.png)",
        "![reward by model](toy_reward_by_model.png)",
        "![before / after](toy_before_after.png)",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="assets/toy-sd15", help="toy base model")
    p.add_argument("--out", type=Path, default=Path("outputs/toy_benchmark"), help="work dir")
    p.add_argument("--results", type=Path, default=Path("assets"), help="results md + plots")
    p.add_argument("--images_per_prompt", type=int, default=16, help="on-policy images/prompt")
    p.add_argument("--pairs_per_prompt", type=int, default=8, help="pairs per training prompt")
    p.add_argument("--eval_seeds", type=int, default=20, help="images per held-out prompt")
    p.add_argument("--sample_steps", type=int, default=20, help="sampler steps")
    p.add_argument("--guidance_scale", type=float, default=1.0, help="CFG scale")
    p.add_argument("--resolution", type=int, default=32, help="pixels")
    p.add_argument("--batch", type=int, default=8, help="pairs (dpo, sft) or images (kto)")
    p.add_argument("--warmup", type=int, default=10, help="warm-up steps")
    p.add_argument("--train_seeds", type=int, nargs="+", default=[0, 1, 2], help="one run each")
    p.add_argument("--rule", choices=sorted(RULE_TEXT), default="warm", help="toy reward rule")
    for loss, lr, steps in (("dpo", 1e-4, 300), ("kto", 1e-4, 600), ("sft", 1e-4, 300)):
        p.add_argument(f"--{loss}_lr", type=float, default=lr, help=f"{loss} learning rate")
        p.add_argument(f"--{loss}_steps", type=int, default=steps, help=f"{loss} steps")
    # Tuned on the toy task (exps/toy_benchmark.sh says why these are not the published values).
    p.add_argument("--dpo_beta", type=float, default=1000.0, help="DPO beta")
    p.add_argument("--kto_beta", type=float, default=1000.0, help="KTO beta")
    p.add_argument("--kto_desirable_prob", type=float, default=0.5, help="KTO sampler gamma")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    import evaluate
    import train
    from generate import trained_weights
    from scripts.build_toy_prefs import HELDOUT_PROMPTS, build_toy_prefs

    start = time.perf_counter()
    timings: dict[str, float] = {}
    data = args.out / "data"
    settings = {"steps": args.sample_steps, "guidance_scale": args.guidance_scale}
    stats = build_toy_prefs(
        args.model, data, args.images_per_prompt, args.pairs_per_prompt, settings, rule=args.rule
    )
    timings["data"] = time.perf_counter() - start

    histories = {}
    names = [run_name(loss, seed) for loss in LOSSES for seed in args.train_seeds]
    for loss in LOSSES:
        t = time.perf_counter()
        for seed in args.train_seeds:
            result = train.main(train_argv(args, loss, seed, data, args.out / "runs"))
            histories[run_name(loss, seed)] = result.history
        timings[loss] = time.perf_counter() - t
    (args.out / "histories.json").write_text(json.dumps(histories))

    t = time.perf_counter()
    eval_dir = args.out / "eval"
    runs = ["--generate", "base"]
    for name in names:
        runs += ["--generate", f"{name}={args.out / 'runs' / name}"]
    _, table, rates = evaluate.main(
        ["--model", args.model, *runs, "--prompts", str(HELDOUT_PROMPTS),
         "--num_seeds", str(args.eval_seeds), "--distinct_seeds", "--steps",
         str(args.sample_steps), "--guidance_scale", str(args.guidance_scale),
         "--scorer", f"toy_{args.rule}", "--out", str(eval_dir)]
    )  # fmt: skip
    timings["eval"] = time.perf_counter() - t

    t = time.perf_counter()
    pairs = data / "heldout" / "pairs.parquet"
    run_dirs = {name: trained_weights(args.out / "runs" / name, "run")["unet"] for name in names}
    accuracies = {
        name: implicit_accuracy(args.model, run_dirs[name], pairs, args.resolution)
        for name in names
    }
    timings["implicit"] = time.perf_counter() - t

    args.results.mkdir(parents=True, exist_ok=True)
    plot_training_curves(histories, args.results / "toy_training_curves.png")
    plot_reward_by_model(table, args.results / "toy_reward_by_model.png", args.rule)
    first = args.train_seeds[0]
    before_after_grid(eval_dir, ["base", *(run_name(loss, first) for loss in LOSSES)],
                      args.results / "toy_before_after.png", prompts=6, seeds=4)  # fmt: skip
    total = time.perf_counter() - start
    text = results_markdown(args, stats, table, rates, accuracies, timings, total)
    (args.results / "toy_results.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
