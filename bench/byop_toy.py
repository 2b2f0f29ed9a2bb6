"""Issue 13's toy measurements: AI feedback against noisy labels, iterated against offline DPO.

    OMP_NUM_THREADS=2 .venv/bin/python -m bench.byop_toy --out outputs/byop_toy

(i) The toy preference pairs (build/toy-prefs, labelled by the `warm` rule) with 30% of the
labels flipped (seeded), against the same flipped pairs relabelled by the rule as a scorer
(python -m evaluation.relabel --scorer toy_warm); DPO on each with the toy benchmark's settings.
(ii) exps/iterative_dpo.sh with 3 rounds x 100 steps against 1 round x 300 steps (same total).
Every model is scored on the held-out prompts (20 images each, every image from its own seed) by
evaluate.py: the toy warm reward and shape agreement (toy_shape) with 95% Wilson intervals, and
diversity and drift against the base's images of the same prompts and seeds
(evaluation/distribution.py). One training seed per call (--seed, default 0; the pairs, the
flips and the evaluation images do not depend on it). Writes OUT/results.md.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from evaluation.stats import wilson_interval
from scripts.toy_benchmark import flip_pair_labels

REPO = Path(__file__).resolve().parents[1]
PY = str(REPO / ".venv" / "bin" / "python")
FLIP_SHARE = 0.3
HEAD = "toy warm reward (240 held-out images) | shape agreement | diversity | drift"
DPO = ["--loss", "dpo", "--beta", "1000", "--resolution", "32", "--train_batch_size", "8",
       "--learning_rate", "1e-4", "--lr_warmup_steps", "10", "--dataloader_num_workers", "0",
       "--checkpointing_steps", "1000000", "--report_to", "none",
       "--overwrite_output_dir", "true"]  # fmt: skip
EVAL = ["--prompts", "assets/toy_prompts_heldout.txt", "--num_seeds", "20", "--distinct_seeds",
        "--resolution", "32", "--scorer", "toy_warm", "--scorer", "toy_shape"]  # fmt: skip


def sh(*cmd: str, env: dict | None = None) -> float:
    start = time.time()
    subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, **(env or {})})
    return time.time() - start


def flip(source: Path, target: Path) -> int:
    table, flipped = flip_pair_labels(pq.read_table(source), FLIP_SHARE, seed=0)
    target.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, target / "train.parquet", row_group_size=16)
    return flipped


def rate(values: pd.Series) -> str:
    low, high = wilson_interval(float(values.mean()), len(values))
    return f"{values.mean():.1%} [{low:.1%}, {high:.1%}]"


def model_rows(eval_dir: Path) -> dict[str, list[str]]:
    """model -> [warm reward, shape agreement, diversity, drift] from evaluate.py's outputs."""
    scores = pd.read_csv(eval_dir / "scores.csv", dtype={"prompt": str}, keep_default_na=False)
    distribution = pd.read_csv(eval_dir / "distribution.csv").set_index("model")
    rows = {}
    for model, part in scores.groupby("model", sort=False):
        measures = distribution.loc[model] if model in distribution.index else None
        rows[model] = [rate(part["toy_warm"]), rate(part["toy_shape"]),
                       "1" if measures is None else f"{measures['diversity']:.2f}",
                       "0" if measures is None else f"{measures['drift']:.2f}"]  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/byop_toy"))
    parser.add_argument("--model", default="assets/toy-sd15")
    parser.add_argument("--seed", type=int, default=0, help="training seed of every DPO run")
    args = parser.parse_args()
    out = args.out.resolve()
    timings = {}
    # (i) AI feedback against 30% flipped labels.
    flipped = flip(REPO / "build/toy-prefs/pickapic/train-00000-of-00001.parquet", out / "flipped")
    timings["relabel"] = sh(PY, "-m", "evaluation.relabel", "--data", str(out / "flipped"),
                            "--scorer", "toy_warm", "--out", str(out / "relabelled"))  # fmt: skip
    original = pq.read_table(REPO / "build/toy-prefs/pickapic/train-00000-of-00001.parquet")
    relabelled = pd.concat([pq.read_table(p).to_pandas() for p in
                            sorted((out / "relabelled").glob("*.parquet"))])  # fmt: skip
    agree = float(
        (relabelled["label_0"].to_numpy() == original.column("label_0").to_numpy()).mean()
    )
    for name, data in (("flipped", out / "flipped"), ("relabelled", out / "relabelled")):
        timings[f"train {name}"] = sh(PY, "train.py", "--pretrained_model", args.model, "--data",
                                      str(data), "--output_dir", str(out / f"dpo_{name}"),
                                      "--max_train_steps", "300", *DPO,
                                      "--seed", str(args.seed))  # fmt: skip
    timings["eval (i)"] = sh(PY, "evaluate.py", "--model", args.model, "--generate", "base",
                             "--generate", f"dpo_flipped={out / 'dpo_flipped'}", "--generate",
                             f"dpo_relabelled={out / 'dpo_relabelled'}", *EVAL,
                             "--out", str(out / "eval_i"))  # fmt: skip
    # (ii) iterated on-policy against one offline round, 300 DPO steps in all.
    common = {
        "MODEL": args.model,
        "IMAGES_PER_PROMPT": "8",
        "EVAL_SEEDS": "20",
        "SEED": str(args.seed),
    }
    timings["iterated 3x100"] = sh(
        "bash",
        "exps/iterative_dpo.sh",
        env={**common, "OUT": str(out / "iterated"), "ROUNDS": "3", "STEPS_PER_ROUND": "100"},
    )
    timings["offline 1x300"] = sh(
        "bash",
        "exps/iterative_dpo.sh",
        env={**common, "OUT": str(out / "offline"), "ROUNDS": "1", "STEPS_PER_ROUND": "300"},
    )
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"# Issue 13 toy measurements, training seed {args.seed} ({when})",
             "", f"(i) {flipped} of {original.num_rows} pairs flipped; the rule's relabelling "
             f"agrees with the unflipped labels on {agree:.1%} of pairs.", "",
             f"| model | {HEAD} |", "|---|---|---|---|---|"]  # fmt: skip
    for model, row in model_rows(out / "eval_i").items():
        lines.append(f"| {model} | {' | '.join(row)} |")
    lines += ["", "(ii) iterated (3 rounds x 100 steps) vs offline (1 round x 300 steps):", "",
              f"| run | model | {HEAD} |", "|---|---|---|---|---|---|"]  # fmt: skip
    for run in ("iterated", "offline"):
        for model, row in model_rows(out / run / "eval").items():
            lines.append(f"| {run} | {model} | {' | '.join(row)} |")
        for r in sorted((out / run).glob("round*/pairs/make_pairs.json")):
            stats = json.loads(r.read_text())
            lines.append(
                f"| {run} | {r.parts[-3]} training data | on-policy reward "
                f"{stats['mean_score']['toy_warm']:.1%} ({stats['pairs']} pairs) | | | |"
            )
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
