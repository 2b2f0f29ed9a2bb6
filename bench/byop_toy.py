"""Issue 13's toy measurements: AI feedback against noisy labels, iterated against offline DPO.

    OMP_NUM_THREADS=2 .venv/bin/python -m bench.byop_toy --out outputs/byop_toy

(i) The toy preference pairs (build/toy-prefs, labelled by the `warm` rule) with 30% of the
labels flipped (seeded), against the same flipped pairs relabelled by the rule as a scorer
(python -m data.relabel --scorer toy_warm); DPO on each with the toy benchmark's settings.
(ii) exps/iterative_dpo.sh with 3 rounds x 100 steps against 1 round x 300 steps (same total).
Every model is scored on the held-out prompts with the toy warm reward (evaluate.py); drift is
the mean absolute pixel difference (0-255) from the base's image of the same prompt and seed.
Writes OUT/results.md.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PY = str(REPO / ".venv" / "bin" / "python")
FLIP_SHARE = 0.3
DPO = ["--loss", "dpo", "--beta", "1000", "--resolution", "32", "--train_batch_size", "8",
       "--learning_rate", "1e-4", "--lr_warmup_steps", "10", "--dataloader_num_workers", "0",
       "--checkpointing_steps", "1000000", "--report_to", "none", "--overwrite_output_dir", "true",
       "--seed", "0"]  # fmt: skip
EVAL = ["--prompts", "assets/toy_prompts_heldout.txt", "--num_seeds", "20", "--distinct_seeds",
        "--resolution", "32", "--scorer", "toy_warm"]  # fmt: skip


def sh(*cmd: str, env: dict | None = None) -> float:
    start = time.time()
    subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, **(env or {})})
    return time.time() - start


def flip(source: Path, target: Path) -> int:
    table = pq.read_table(source)
    rng = np.random.default_rng(0)
    rows = rng.choice(table.num_rows, round(FLIP_SHARE * table.num_rows), replace=False)
    l0, l1 = table.column("label_0").to_numpy().copy(), table.column("label_1").to_numpy().copy()
    l0[rows], l1[rows] = l1[rows], l0[rows].copy()
    table = table.set_column(table.column_names.index("label_0"), "label_0", [l0])
    table = table.set_column(table.column_names.index("label_1"), "label_1", [l1])
    target.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, target / "train.parquet", row_group_size=16)
    return len(rows)


def rates_and_drift(eval_dir: Path) -> dict[str, tuple[float, float]]:
    """model -> (mean toy warm reward, mean drift); images under eval_dir/<model>/ (--generate)."""
    scores = pd.read_csv(eval_dir / "scores.csv", dtype={"prompt": str}, keep_default_na=False)
    pairs = zip(scores["model"], scores["file_name"], strict=True)
    scores["path"] = [str(eval_dir / m / f) for m, f in pairs]
    base = scores[scores["model"] == "base"].set_index(["prompt", "seed"])["path"]
    out = {}
    for model, part in scores.groupby("model", sort=False):
        diffs = []
        for _, row in part.iterrows():
            a = np.asarray(Image.open(row["path"]).convert("RGB"), dtype=np.float64)
            b = Image.open(base[(row["prompt"], row["seed"])]).convert("RGB")
            diffs.append(np.abs(a - np.asarray(b, dtype=np.float64)).mean())
        out[model] = (float(part["toy_warm"].mean()), float(np.mean(diffs)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/byop_toy"))
    parser.add_argument("--model", default="assets/toy-sd15")
    args = parser.parse_args()
    out = args.out.resolve()
    timings = {}
    # (i) AI feedback against 30% flipped labels.
    flipped = flip(REPO / "build/toy-prefs/pickapic/train-00000-of-00001.parquet", out / "flipped")
    timings["relabel"] = sh(PY, "-m", "data.relabel", "--data", str(out / "flipped"),
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
                                      "--max_train_steps", "300", *DPO)  # fmt: skip
    timings["eval (i)"] = sh(PY, "evaluate.py", "--model", args.model, "--generate", "base",
                             "--generate", f"dpo_flipped={out / 'dpo_flipped'}", "--generate",
                             f"dpo_relabelled={out / 'dpo_relabelled'}", *EVAL,
                             "--out", str(out / "eval_i"))  # fmt: skip
    # (ii) iterated on-policy against one offline round, 300 DPO steps in all.
    common = {"MODEL": args.model, "IMAGES_PER_PROMPT": "8", "EVAL_SEEDS": "20"}
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
    lines = [f"# Issue 13 toy measurements ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
             "", f"(i) {flipped} of {original.num_rows} pairs flipped; the rule's relabelling "
             f"agrees with the unflipped labels on {agree:.1%} of pairs.", "",
             "| model | toy warm reward (240 held-out images) | drift (mean abs pixel) |",
             "|---|---|---|"]  # fmt: skip
    for model, (rate, drift) in rates_and_drift(out / "eval_i").items():
        lines.append(f"| {model} | {rate:.1%} | {drift:.1f} |")
    lines += ["", "(ii) iterated (3 rounds x 100 steps) vs offline (1 round x 300 steps):", "",
              "| run | model | toy warm reward | drift |", "|---|---|---|---|"]  # fmt: skip
    for run in ("iterated", "offline"):
        for model, (rate, drift) in rates_and_drift(out / run / "eval").items():
            lines.append(f"| {run} | {model} | {rate:.1%} | {drift:.1f} |")
        for r in sorted((out / run).glob("round*/pairs/make_pairs.json")):
            stats = json.loads(r.read_text())
            lines.append(
                f"| {run} | {r.parts[-3]} training data | on-policy reward "
                f"{stats['mean_score']['toy_warm']:.1%} ({stats['pairs']} pairs) | |"
            )
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
