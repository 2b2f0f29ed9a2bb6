"""Build the toy preference dataset on-policy: the toy base draws, a toy reward rule labels.

For every prompt, the base model generates k images (each from its own seed, FIRST_SEED...); a
rule of evaluation/toy_reward.py (--rule, default ``warm``: mean red - mean blue >= WARM_MARGIN; or
``colour``: the image shows the colour its caption names) labels each 1 or 0. Pairs join a
rewarded and an unrewarded image of the same prompt (like Pick-a-Pic, whose images were drawn
by SD models and judged per prompt), written in both formats the trainer reads:

    OUT/pickapic/train-00000-of-00001.parquet   Pick-a-Pic pairs (caption, jpg_0/1, label_0/1)
    OUT/kto/train_processed_v3.csv + images     per-image labels (file_name, caption, split)
    OUT/heldout/pairs.parquet                   pairs of the held-out prompts (for evaluation)
    OUT/stats.json                              the base's reward rate per split, pair counts

Prompts come from assets/toy_prompts_{train,heldout}.txt (written by --write_prompts), and the
held-out prompts are halved into assets/toy_prompts_{validation,test}.txt (``toy_eval_split``):
settings are chosen on validation, results reported on test.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import sys
import uuid
from dataclasses import dataclass, field
from itertools import product, zip_longest
from pathlib import Path

from PIL import Image

# Run as a script, the repo root is not on sys.path.
if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluation.suites import TOY_GUIDANCE
from evaluation.toy_reward import shape_reward, toy_reward
from scripts import build_toy_data as toy_data
from scripts.atomic_dir import atomic_directory

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_PROMPTS = REPO_ROOT / "assets" / "toy_prompts_train.txt"
HELDOUT_PROMPTS = REPO_ROOT / "assets" / "toy_prompts_heldout.txt"
HELDOUT_PER_COLOUR = 2  # of each colour's 9 (shape, background) scenes
VALIDATION_PROMPTS = REPO_ROOT / "assets" / "toy_prompts_validation.txt"
TEST_PROMPTS = REPO_ROOT / "assets" / "toy_prompts_test.txt"
EVAL_SPLITS = ("validation", "test")
# The seed of the validation / test draw (toy_eval_split); changing it re-draws both splits.
SPLIT_SEED = 27
# Bumped when the builder's output changes, so setup rebuilds build/toy-prefs (2: per-image seeds;
# 3: the retrained toy base that reads its prompt; 4: the third base, with the typical-colour
# habit; 5: shape-matched pairs; 6: the fourth base); scripts/setup.sh and exps/example.sh grep
# stats.json for this number: bump it there too (tests/test_toy_pairs.py checks).
DATA_VERSION = 6
# Generation seeds start here, so evaluation seeds (0..k-1) never share noise with the data.
FIRST_SEED = 10_000


def toy_prompt_split() -> tuple[list[str], list[str]]:
    """All 54 toy captions split into train and held-out: each colour keeps HELDOUT_PER_COLOUR
    (shape, background) combinations out of training, a different pair for each colour."""
    scenes = list(product(toy_data.SHAPES, toy_data.BACKGROUNDS))
    train, heldout = [], []
    for i, colour in enumerate(toy_data.COLOURS):
        held = {(HELDOUT_PER_COLOUR * i + j) % len(scenes) for j in range(HELDOUT_PER_COLOUR)}
        for j, (shape, background) in enumerate(scenes):
            (heldout if j in held else train).append(
                toy_data.scene_caption(colour, shape, background)
            )
    return train, heldout


def caption_colour(caption: str) -> str:
    """The colour a toy caption names ("an orange circle on ..." -> "orange")."""
    return caption.split()[1]


def toy_eval_split(heldout: list[str], seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """The held-out prompts halved into ``validation`` (every choice of settings) and ``test``
    (reported, never used to choose): of each colour's held-out prompts a seeded shuffle sends
    half to validation and the rest to test, so both splits name every colour equally often
    (the base's colour rate differs by colour). Training prompts, and so the preference pairs,
    are untouched. Both lists keep the held-out file's order."""
    rng = random.Random(seed)
    by_colour: dict[str, list[str]] = {}
    for caption in heldout:
        by_colour.setdefault(caption_colour(caption), []).append(caption)
    validation = set()
    for captions in by_colour.values():
        drawn = sorted(captions)
        rng.shuffle(drawn)
        validation.update(drawn[: len(drawn) // 2])
    return {
        "validation": [c for c in heldout if c in validation],
        "test": [c for c in heldout if c not in validation],
    }


def split_prompt_file(split: str) -> Path:
    """The prompt file of an evaluation split (EVAL_SPLITS)."""
    return {"validation": VALIDATION_PROMPTS, "test": TEST_PROMPTS}[split]


def write_prompt_files() -> None:
    train, heldout = toy_prompt_split()
    TRAIN_PROMPTS.parent.mkdir(parents=True, exist_ok=True)
    TRAIN_PROMPTS.write_text("\n".join(train) + "\n", encoding="utf-8")
    HELDOUT_PROMPTS.write_text("\n".join(heldout) + "\n", encoding="utf-8")
    for split, prompts in toy_eval_split(heldout).items():
        split_prompt_file(split).write_text("\n".join(prompts) + "\n", encoding="utf-8")


# The default taste: a "warm filter" preference that the base meets only part of the time; the toy
# benchmark builds both this and ``colour`` (prompt alignment) data (README, "Toy benchmark").
DEFAULT_RULE = "warm"


def labelled_generations(
    pipe, prompts: list[str], k: int, settings: dict, rule: str = DEFAULT_RULE
) -> list[dict]:
    """prompt, seed, jpeg, uid and reward of k generations per prompt, every image from its own
    seed (FIRST_SEED...): the toy base's colour is mostly decided by the noise, so seeds shared
    across prompts would repeat k colour draws rather than give prompts x k."""
    from models.generation import generate

    reward = toy_reward(rule)
    rng = random.Random(0)
    out = []
    seeds = list(range(FIRST_SEED, FIRST_SEED + k))
    for g in generate(pipe, prompts, seeds, distinct_seeds=True, **settings):
        jpeg = toy_data.encode_jpeg(g.image)
        # Label the stored (JPEG) image, not the PNG: compression flips borderline images.
        stored = Image.open(io.BytesIO(jpeg))
        out.append(
            {
                "caption": g.prompt,
                "seed": g.seed,
                "jpeg": jpeg,
                "uid": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "reward": reward(stored, g.prompt),
                "shape_ok": shape_reward(stored, g.prompt) == 1.0,
            }
        )
    return out


def preference_pairs(
    images: list[dict], pairs_per_prompt: int, seed: int, match_shape: bool = True
) -> list[dict]:
    """Up to pairs_per_prompt (rewarded, unrewarded) pairs per prompt, each image in at most one
    pair where possible; sides shuffled so the winner is not always image 0.

    match_shape pairs a rewarded image only with an unrewarded one that agrees with it on the
    ``shape`` rule (both draw the caption's shape, or both do not), so a pair differs in the
    task's reward and not in shape. Unmatched, the colour task's pairs teach blobs: the base's
    right-colour images, drawn against its typical-colour habit, miss the shape about twice as
    often as its wrong-colour ones (README, "Toy benchmark"). Strata take turns until the prompt
    has its pairs."""
    rng = random.Random(seed)
    rows = []
    stratum_of = (lambda i: i["shape_ok"]) if match_shape else (lambda i: True)
    for caption in dict.fromkeys(i["caption"] for i in images):
        mine = [i for i in images if i["caption"] == caption]
        runs = []  # per stratum, its pairs in order
        for stratum in sorted({stratum_of(i) for i in mine}):
            group = [i for i in mine if stratum_of(i) == stratum]
            good = [i for i in group if i["reward"] == 1.0]
            bad = [i for i in group if i["reward"] == 0.0]
            rng.shuffle(good)
            rng.shuffle(bad)
            n = max(len(good), len(bad)) if good and bad else 0
            runs.append([(good[j % len(good)], bad[j % len(bad)]) for j in range(n)])
        chosen = [pair for turn in zip_longest(*runs) for pair in turn if pair is not None]
        for w, lose in chosen[:pairs_per_prompt]:
            a, b, label_0 = (w, lose, 1.0) if rng.random() < 0.5 else (lose, w, 0.0)
            rows.append(
                {
                    "caption": caption,
                    "jpg_0": a["jpeg"],
                    "jpg_1": b["jpeg"],
                    "label_0": label_0,
                    "label_1": 1.0 - label_0,
                    "image_0_uid": a["uid"],
                    "image_1_uid": b["uid"],
                }
            )
    rng.shuffle(rows)
    return rows


@dataclass(frozen=True)
class ToyPrefsRecipe:
    """How build_toy_prefs makes the data from a base (stats.json records it)."""

    images_per_prompt: int = 16  # k generations per prompt, each from its own seed
    pairs_per_prompt: int = 8
    # generate()'s settings over the defaults (20 steps, TOY_GUIDANCE, batches of 64)
    settings: dict = field(default_factory=dict)
    seed: int = 0  # of the pairing; generation seeds start at FIRST_SEED
    rule: str = DEFAULT_RULE  # the toy reward rule that labels every image
    match_shape: bool = True  # see preference_pairs


def build_toy_prefs(model: str, out_dir: Path, recipe: ToyPrefsRecipe | None = None) -> dict:
    """Generate, label and write the dataset (atomically); returns the stats it writes."""
    from models.generation import load_pipeline

    recipe = recipe or ToyPrefsRecipe()
    rule, match_shape, k = recipe.rule, recipe.match_shape, recipe.images_per_prompt
    toy_reward(rule)  # unknown rule: fail before generating
    settings = {"steps": 20, "guidance_scale": TOY_GUIDANCE, "batch_size": 64, **recipe.settings}
    train_prompts, heldout_prompts = toy_prompt_split()
    pipe = load_pipeline(model)  # its family's default sampler: ddim (SD), flow_euler (SD3)
    # One call for both splits, so no held-out image shares its noise with a training image.
    images = labelled_generations(pipe, train_prompts + heldout_prompts, k, settings, rule)
    heldout = set(heldout_prompts)
    train_images = [i for i in images if i["caption"] not in heldout]
    heldout_images = [i for i in images if i["caption"] in heldout]
    per_prompt, seed = recipe.pairs_per_prompt, recipe.seed
    train_rows = preference_pairs(train_images, per_prompt, seed, match_shape)
    heldout_rows = preference_pairs(heldout_images, per_prompt, seed + 1, match_shape)
    stats = {
        "version": DATA_VERSION,
        "model": model,
        "rule": rule,
        "images_per_prompt": k,
        "match_shape": match_shape,
        "settings": settings,
        "train_prompts": len(train_prompts),
        "heldout_prompts": len(heldout_prompts),
        "train_reward_rate": sum(i["reward"] for i in train_images) / len(train_images),
        "heldout_reward_rate": sum(i["reward"] for i in heldout_images) / len(heldout_images),
        "train_pairs": len(train_rows),
        "heldout_pairs": len(heldout_rows),
    }
    with atomic_directory(out_dir) as tmp:
        toy_data.write_pairs_parquet(
            tmp / "pickapic" / "train-00000-of-00001.parquet", train_rows, 16
        )
        toy_data.write_pairs_parquet(tmp / "heldout" / "pairs.parquet", heldout_rows, 16)
        toy_data.write_kto(tmp / "kto", train_rows)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    logger.info("toy preferences in %s: %s", out_dir, stats)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO_ROOT / "assets" / "toy-sd15"), help="base")
    parser.add_argument("--out", type=Path, default=Path("build/toy-prefs"), help="output dir")
    parser.add_argument("--images_per_prompt", type=int, default=16, help="k generations")
    parser.add_argument("--pairs_per_prompt", type=int, default=8, help="pairs per prompt")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--guidance_scale", type=float, default=TOY_GUIDANCE, help="CFG scale")
    parser.add_argument(
        "--rule", default=DEFAULT_RULE, choices=["colour", "warm"], help="toy reward rule"
    )
    parser.add_argument(
        "--no_shape_match",
        action="store_true",
        help="pair any rewarded with any unrewarded image, whatever their shapes",
    )
    parser.add_argument("--write_prompts", action="store_true", help="(re)write assets prompts")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.write_prompts:
        write_prompt_files()
    recipe = ToyPrefsRecipe(
        args.images_per_prompt,
        args.pairs_per_prompt,
        {"steps": args.steps, "guidance_scale": args.guidance_scale},
        rule=args.rule,
        match_shape=not args.no_shape_match,
    )
    stats = build_toy_prefs(args.model, args.out, recipe)
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
