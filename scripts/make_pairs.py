"""On-policy preference pairs: generate k images per prompt, score them, pair best vs worst.

    python -m scripts.make_pairs --model assets/toy-sd15 --unet outputs/round1 \\
        --prompts assets/toy_prompts_train.txt --images_per_prompt 4 --scorer toy_warm \\
        --out build/round2

Image j of prompt p (0-based, in the prompts file's order) is drawn from its own generator seeded
``--first_seed + p * k + j``, so it depends on (prompt, seed, settings) only, never on the batch
or on how a run was interrupted. Prompts are processed in units of ``--prompts_per_unit``: a unit's
images go to ``OUT/images/`` and their scores to ``OUT/.units/`` (atomically), and a killed run,
re-run with the same command, continues with the first unit not written (``--max_units N`` stops
after N new units, as a kill would).

Scores are combined as in ``python -m evaluation.relabel``: each scorer z-scored over every image
of the run, then ``c = sum_k w_k z_k``. Pairs (``--pairing``): ``best_worst``, the highest-
against the lowest-scoring image of each prompt, or ``all``, every two images of a prompt; either
way only when the gap exceeds ``--margin`` (z units; default 0: equal scores make no pair). The
chosen image's side (``jpg_0`` or ``jpg_1``) is drawn per pair from a generator seeded by the
prompt.

Writes ``OUT/pickapic/train-00000.parquet`` (the Pick-a-Pic schema: caption, jpg_0/1 PNG bytes,
label_0/1, image_0/1_uid = file names, plus seed_*, score_combined_*, prob_0) for ``--data``,
``OUT/images.csv`` (file_name relative to OUT, caption, split ``exclusive_win`` when ``c >=
--threshold`` else ``exclusive_lose``, seed, scores, label) for ``--csv OUT/images.csv --images
OUT``, and ``OUT/make_pairs.json`` (counts, each scorer's mean raw score).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import cli
from evaluation.relabel import (
    DESIRABLE,
    UNDESIRABLE,
    build_named,
    check_resume,
    parse_weights,
    write_parquet_atomic,
)

logger = logging.getLogger(__name__)

UNITS_DIR = ".units"
ARGS_FILE = ".make_pairs_args.json"
PAIRS_FILE = "pickapic/train-00000.parquet"
IMAGES_CSV = "images.csv"
SUMMARY_FILE = "make_pairs.json"
ROW_GROUP = 64  # pairs per parquet row group (their PNG bytes are in memory at once)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(prog="python -m scripts.make_pairs", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="assets/toy-sd15", help="base model dir or hub name")
    parser.add_argument("--unet", help="trained UNet: the trainer's OUTPUT_DIR or a unet/ folder")
    parser.add_argument("--lora", help="trained LoRA: the trainer's OUTPUT_DIR or a lora/ folder")
    parser.add_argument("--prompts", required=True, help="file with one prompt per line")
    parser.add_argument("--images_per_prompt", type=int, default=4, help="k >= 2")
    parser.add_argument("--first_seed", type=int, default=0, help="seed of prompt 0, image 0")
    parser.add_argument("--scorer", action="append", required=True,
                        help="NAME or NAME=PATH of a registered scorer (repeatable)")  # fmt: skip
    parser.add_argument("--weights", help="comma-separated weight per --scorer (default equal)")
    parser.add_argument("--pairing", choices=["best_worst", "all"], default="best_worst")
    parser.add_argument("--margin", type=float, default=0.0,
                        help="pair only when the combined gap exceeds this (z units)")  # fmt: skip
    parser.add_argument("--threshold", type=float, default=0.0,
                        help="per-image CSV: desirable when combined >= this (z)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=20, help="inference steps")
    parser.add_argument("--guidance_scale", type=float, default=1.0, help="CFG scale (<=1: off)")
    parser.add_argument("--scheduler", default="ddim", help="sampler (generate.py's choices)")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: native)")
    parser.add_argument("--batch_size", type=int, default=16, help="images per pipeline call")
    parser.add_argument("--prompts_per_unit", type=int, default=8, help="prompts per unit")
    parser.add_argument("--device", default=None, help="default: cuda if present")
    parser.add_argument("--max_units", type=int, default=None, help="stop after N new units")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    return parser


def seed_of(prompt_index: int, image: int, k: int, first_seed: int) -> int:
    return first_seed + prompt_index * k + image


def generate_unit(pipe, prompts: list[tuple[int, str]], args: argparse.Namespace) -> list[dict]:
    """k images per (index, prompt), ``batch_size`` per pipeline call, each its own generator."""
    import torch

    k = args.images_per_prompt
    jobs = [(p, text, j) for p, text in prompts for j in range(k)]
    resolution = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    rows = []
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start : start + args.batch_size]
        seeds = [seed_of(p, j, k, args.first_seed) for p, _, j in batch]
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        with torch.no_grad():
            images = pipe([text for _, text, _ in batch], num_inference_steps=args.steps,
                          guidance_scale=args.guidance_scale, height=resolution, width=resolution,
                          generator=generators).images  # fmt: skip
        for (p, text, j), seed, image in zip(batch, seeds, images, strict=True):
            file_name = f"images/p{p:05d}_{j:03d}.png"
            path = args.out / file_name
            image.save(path.with_name(f".{path.name}.tmp"), format="PNG")
            os.replace(path.with_name(f".{path.name}.tmp"), path)
            rows.append({"prompt_index": p, "caption": text, "image": j, "seed": seed,
                         "file_name": file_name, "pil": image})  # fmt: skip
    return rows


def score_rows(rows: list[dict], scorers: Sequence, names: list[str], batch_size: int) -> None:
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        for scorer, name in zip(scorers, names, strict=True):
            values = scorer.score([r["pil"] for r in batch], [r["caption"] for r in batch])
            for row, value in zip(batch, values, strict=True):
                row[f"score_{name}"] = float(value)


def combined_scores(frame: pd.DataFrame, names: list[str], weights: list[float]) -> np.ndarray:
    """sum_k w_k z_k, each scorer z-scored over every image of the run (std 0: contributes 0)."""
    total = np.zeros(len(frame))
    for name, weight in zip(names, weights, strict=True):
        values = frame[f"score_{name}"].to_numpy(np.float64)
        std = values.std()
        total += weight * ((values - values.mean()) / std if std > 0 else 0.0)
    return total


def choose_pairs(frame: pd.DataFrame, pairing: str, margin: float, seed: int) -> list[dict]:
    """(winner row, loser row, winner side) per pair, prompt by prompt in prompt order."""
    pairs = []
    for p, group in frame.groupby("prompt_index", sort=True):
        rows = group.sort_values("image").to_dict("records")
        if pairing == "best_worst":
            best = max(rows, key=lambda r: r["combined"])
            worst = min(rows, key=lambda r: r["combined"])
            candidates = [(best, worst)]
        else:
            candidates = [(a, b) if a["combined"] >= b["combined"] else (b, a)
                          for a, b in itertools.combinations(rows, 2)]  # fmt: skip
        rng = np.random.default_rng([seed, int(p)])
        for winner, loser in candidates:
            if winner["combined"] - loser["combined"] > margin:
                pairs.append({"winner": winner, "loser": loser, "side": int(rng.integers(2))})
    return pairs


def write_pairs(out: Path, pairs: list[dict]) -> None:
    path = out / PAIRS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    schema = pa.schema([
        ("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
        ("label_0", pa.float64()), ("label_1", pa.float64()), ("image_0_uid", pa.string()),
        ("image_1_uid", pa.string()), ("seed_0", pa.int64()), ("seed_1", pa.int64()),
        ("score_combined_0", pa.float64()), ("score_combined_1", pa.float64()),
        ("prob_0", pa.float64()),
    ])  # fmt: skip
    with pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, max(len(pairs), 1), ROW_GROUP):
            columns: dict[str, list] = {name: [] for name in schema.names}
            for pair in pairs[start : start + ROW_GROUP]:
                first, second = (pair["winner"], pair["loser"])
                if pair["side"]:
                    first, second = second, first
                gap = first["combined"] - second["combined"]
                columns["caption"].append(first["caption"])
                for side, row in ((0, first), (1, second)):
                    columns[f"jpg_{side}"].append((out / row["file_name"]).read_bytes())
                    columns[f"label_{side}"].append(1.0 if row is pair["winner"] else 0.0)
                    columns[f"image_{side}_uid"].append(row["file_name"])
                    columns[f"seed_{side}"].append(int(row["seed"]))
                    columns[f"score_combined_{side}"].append(float(row["combined"]))
                columns["prob_0"].append(float(1.0 / (1.0 + np.exp(-gap))))
            writer.write_table(pa.table(columns, schema=schema))
    os.replace(tmp, path)


def write_images_csv(out: Path, frame: pd.DataFrame, names: list[str], threshold: float) -> None:
    table = frame[["file_name", "caption"]].copy()
    table["label"] = (frame["combined"] >= threshold).astype(int)
    table["split"] = np.where(table["label"] == 1, DESIRABLE, UNDESIRABLE)
    table["seed"] = frame["seed"]
    for name in names:
        table[f"score_{name}"] = frame[f"score_{name}"]
    table["score_combined"] = frame["combined"]
    tmp = out / f".{IMAGES_CSV}.tmp"
    table.to_csv(tmp, index=False)
    os.replace(tmp, out / IMAGES_CSV)


def run(argv: Sequence[str] | None = None, scorers: Sequence | None = None) -> dict:
    """Generate, score and pair; ``scorers`` replaces --scorer's built ones (tests)."""
    args = build_parser().parse_args(None if argv is None else list(argv))
    if args.images_per_prompt < 2:
        raise cli.UsageError("--images_per_prompt must be >= 2 (a pair needs two images)")
    if args.batch_size < 1 or args.prompts_per_unit < 1:
        raise cli.UsageError("--batch_size and --prompts_per_unit must be >= 1")
    from evaluation.suites import read_prompts
    from models.generation import load_pipeline

    prompts = read_prompts(args.prompts)
    names = [s.partition("=")[0] for s in args.scorer]
    weights = parse_weights(args.weights, len(names))
    identity = {k: str(v) for k, v in vars(args).items() if k not in ("max_units", "device", "out")}
    check_resume(args.out, identity, ARGS_FILE)
    if (args.out / SUMMARY_FILE).is_file():
        return json.loads((args.out / SUMMARY_FILE).read_text())
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    (args.out / UNITS_DIR).mkdir(exist_ok=True)
    if scorers is None:
        paths = [s.partition("=")[2] for s in args.scorer]
        scorers = [build_named(n, p, args.device) for n, p in zip(names, paths, strict=True)]
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe, done_now = None, 0
    indexed = list(enumerate(prompts))
    units = [indexed[i : i + args.prompts_per_unit]
             for i in range(0, len(indexed), args.prompts_per_unit)]  # fmt: skip
    unit_files = [args.out / UNITS_DIR / f"u{u:05d}.parquet" for u in range(len(units))]
    for unit, path in zip(units, unit_files, strict=True):
        if path.is_file():
            continue
        if args.max_units is not None and done_now >= args.max_units:
            return {"complete": False, "units_done_now": done_now}
        if pipe is None:
            pipe = load_pipeline(args.model, args.unet, args.scheduler, device=device,
                                 lora=args.lora)  # fmt: skip
        rows = generate_unit(pipe, unit, args)
        score_rows(rows, scorers, names, args.batch_size)
        for row in rows:
            del row["pil"]
        write_parquet_atomic(pa.Table.from_pylist(rows), path)
        done_now += 1
    frame = pd.concat([pq.read_table(p).to_pandas() for p in unit_files], ignore_index=True)
    frame["combined"] = combined_scores(frame, names, weights)
    pairs = choose_pairs(frame, args.pairing, args.margin, args.first_seed)
    write_pairs(args.out, pairs)
    write_images_csv(args.out, frame, names, args.threshold)
    summary = {
        "complete": True,
        "units_done_now": done_now,
        "prompts": len(prompts),
        "images": len(frame),
        "pairs": len(pairs),
        "desirable": int((frame["combined"] >= args.threshold).sum()),
        "mean_score": {n: float(frame[f"score_{n}"].mean()) for n in names},
    }
    (args.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    cli.setup_logging("%(levelname)s %(name)s: %(message)s")
    summary = run(argv)
    if not summary["complete"]:
        print(f"{summary['units_done_now']} units written; re-run the same command to continue")
        return 0
    print(f"{summary['pairs']} pairs from {summary['images']} images of {summary['prompts']} "
          f"prompts: {PAIRS_FILE}, {IMAGES_CSV}; mean scores {summary['mean_score']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, prog="python -m scripts.make_pairs"))
