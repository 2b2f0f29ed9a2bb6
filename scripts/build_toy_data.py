"""Build a small Pick-a-Pic-shaped preference dataset offline: parquet pairs + the KTO image CSV.

Each prompt names a coloured shape on a background ("a red circle on a white background"). Every
prompt has a pool of synthetic images that get the colour and/or shape right or wrong; an image's
score is 2 x (colour right) + (shape right), and in each pair the higher score wins, equal scores
tie. Images are reused across pairs of one prompt, as in Pick-a-Pic, so some both win and lose.
Same seed, byte-identical files.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import random
import sys
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

# Run as a script, the repo root is not on sys.path, and `scripts.*` needs it.
if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.atomic_dir import atomic_directory

logger = logging.getLogger(__name__)

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
BACKGROUNDS = {"white": (250, 250, 250), "black": (10, 10, 10), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
SIZES = ((64, 64), (80, 64), (64, 96))  # (width, height): square, landscape, portrait
# Scores of a prompt's image pool: two fully right (they can tie), colour only, shape only, neither.
POOL_SCORES = (3, 3, 2, 1, 0)
PAIRS_PER_PROMPT = 4
TIE_RATE = 0.12  # Pick-a-Pic v2's share of tied rows
JPEG_QUALITY = 90

KTO_SPLITS = ("exclusive_win", "intersections", "exclusive_lose")
KTO_CSV = "train_processed_v3.csv"
# Pick-a-Pic v2 column types; write_pairs_parquet casts known columns to these.
PAIR_FIELDS = {
    f.name: f
    for f in (
        pa.field("caption", pa.string()),
        pa.field("jpg_0", pa.binary()),
        pa.field("jpg_1", pa.binary()),
        pa.field("label_0", pa.float64()),
        pa.field("label_1", pa.float64()),
        pa.field("image_0_uid", pa.string()),
        pa.field("image_1_uid", pa.string()),
    )
}


@dataclass(frozen=True)
class ToyImage:
    uid: str
    score: int
    jpeg: bytes


def encode_jpeg(image: Image.Image) -> bytes:
    """JPEG bytes of an image (RGB, fixed quality, no metadata: deterministic)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def draw_scene(
    rng: random.Random,
    colour: str,
    shape: str,
    background: str,
    sizes: tuple[tuple[int, int], ...] = SIZES,
) -> Image.Image:
    """One shape of one colour, at a random place and size, on a plain background."""
    width, height = rng.choice(sizes)
    image = Image.new("RGB", (width, height), BACKGROUNDS[background])
    side = rng.randint(int(0.4 * min(width, height)), int(0.7 * min(width, height)))
    left, top = rng.randint(0, width - side), rng.randint(0, height - side)
    return draw_shape(image, colour, shape, left, top, side)


def draw_shape(
    image: Image.Image, colour: str, shape: str, left: int, top: int, side: int
) -> Image.Image:
    """Draw one shape of one colour in the side x side square at (left, top); returns image."""
    box = (left, top, left + side - 1, top + side - 1)
    draw, fill = ImageDraw.Draw(image), COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(left + side // 2, top), (box[2], box[3]), (left, box[3])], fill=fill)
    return image


def scene_caption(colour: str, shape: str, background: str) -> str:
    """The toy caption of a scene: "an orange circle on a white background"."""
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape} on a {background} background"


def other(rng: random.Random, options: Iterable[str], not_this: str) -> str:
    return rng.choice([o for o in options if o != not_this])


def make_pool(rng: random.Random, colour: str, shape: str, background: str) -> list[ToyImage]:
    """A prompt's images, one per entry of POOL_SCORES, scored against the prompt."""
    pool = []
    for score in POOL_SCORES:
        img_colour = colour if score >= 2 else other(rng, COLOURS, colour)
        img_shape = shape if score % 2 == 1 else other(rng, SHAPES, shape)
        image = draw_scene(rng, img_colour, img_shape, background)
        uid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        pool.append(ToyImage(uid, score, encode_jpeg(image)))
    return pool


def pair_row(rng: random.Random, caption: str, a: ToyImage, b: ToyImage) -> dict:
    """One Pick-a-Pic row; the sides are shuffled so the winner is not always image 0."""
    if rng.random() < 0.5:
        a, b = b, a
    label_0 = 0.5 if a.score == b.score else float(a.score > b.score)
    return {
        "caption": caption,
        "jpg_0": a.jpeg,
        "jpg_1": b.jpeg,
        "label_0": label_0,
        "label_1": 1.0 - label_0,
        "image_0_uid": a.uid,
        "image_1_uid": b.uid,
    }


def prompt_rows(rng: random.Random) -> list[dict]:
    """PAIRS_PER_PROMPT distinct pairs from one prompt's pool, tied pairs at about TIE_RATE."""
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    background = rng.choice(list(BACKGROUNDS))
    caption = scene_caption(colour, shape, background)
    pool = make_pool(rng, colour, shape, background)
    ties = [(a, b) for a, b in combinations(pool, 2) if a.score == b.score]
    decided = [(a, b) for a, b in combinations(pool, 2) if a.score != b.score]
    # One tie available per prompt; including it with this probability gives TIE_RATE overall.
    chosen = ties[:1] if rng.random() < TIE_RATE * PAIRS_PER_PROMPT else []
    chosen += rng.sample(decided, PAIRS_PER_PROMPT - len(chosen))
    return [pair_row(rng, caption, a, b) for a, b in chosen]


def make_pair_rows(num_pairs: int, seed: int) -> list[dict]:
    """num_pairs rows, prompts interleaved (shuffled) as in the real dataset."""
    rng = random.Random(seed)
    rows: list[dict] = []
    while len(rows) < num_pairs:
        rows += prompt_rows(rng)
    rows = rows[:num_pairs]
    rng.shuffle(rows)
    return rows


def write_pairs_parquet(path: Path, rows: list[dict], rows_per_group: int) -> None:
    """Write Pick-a-Pic rows to one parquet file, rows_per_group rows per row group.

    Known columns get Pick-a-Pic's types (e.g. int labels become float64); others are inferred.
    """
    if rows:
        table = pa.Table.from_pylist(rows)
        fields = [PAIR_FIELDS.get(name, table.schema.field(name)) for name in table.column_names]
        table = table.cast(pa.schema(fields))
    else:
        table = pa.schema(list(PAIR_FIELDS.values())).empty_table()
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=rows_per_group)


def kto_splits(rows: Iterable[dict]) -> dict[str, str]:
    """uid -> KTO split from the non-tied comparisons each image was in (ties say nothing)."""
    won: set[str] = set()
    lost: set[str] = set()
    seen: dict[str, None] = {}  # first-seen order, for a stable CSV
    for row in rows:
        if row["label_0"] == row["label_1"]:
            continue
        winner, loser = (0, 1) if row["label_0"] > row["label_1"] else (1, 0)
        won.add(row[f"image_{winner}_uid"])
        lost.add(row[f"image_{loser}_uid"])
        seen.update(dict.fromkeys([row["image_0_uid"], row["image_1_uid"]]))
    splits = {}
    for uid in seen:
        if uid in won and uid in lost:
            splits[uid] = "intersections"
        else:
            splits[uid] = "exclusive_win" if uid in won else "exclusive_lose"
    return splits


def write_kto(kto_dir: Path, rows: list[dict]) -> None:
    """The per-image CSV (paths relative to kto_dir) and the JPEG files it names."""
    images = {}
    captions = {}
    for row in rows:
        for side in (0, 1):
            images[row[f"image_{side}_uid"]] = row[f"jpg_{side}"]
            captions[row[f"image_{side}_uid"]] = row["caption"]
    (kto_dir / "train").mkdir(parents=True)
    with open(kto_dir / KTO_CSV, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["file_name", "caption", "split"])
        for uid, split in kto_splits(rows).items():
            file_name = f"train/{uid}.jpg"
            (kto_dir / file_name).write_bytes(images[uid])
            writer.writerow([file_name, captions[uid], split])


def build_toy_data(
    out_dir: Path,
    num_pairs: int = 256,
    seed: int = 0,
    num_shards: int = 2,
    rows_per_group: int = 16,
) -> None:
    """Write out_dir/pickapic/train-*.parquet and out_dir/kto/ (CSV + JPEGs), atomically."""
    rows = make_pair_rows(num_pairs, seed)
    with atomic_directory(out_dir) as tmp:
        per_shard = -(-num_pairs // num_shards)
        for i in range(num_shards):
            name = f"train-{i:05d}-of-{num_shards:05d}.parquet"
            shard = rows[i * per_shard : (i + 1) * per_shard]
            write_pairs_parquet(tmp / "pickapic" / name, shard, rows_per_group)
        write_kto(tmp / "kto", rows)
    ties = sum(r["label_0"] == 0.5 for r in rows)
    logger.info("toy data in %s: %d pairs (%d ties), seed %d", out_dir, len(rows), ties, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--pairs", type=int, default=256, help="number of pairs (rows)")
    parser.add_argument("--seed", type=int, default=0, help="seed for scenes, pairs and uids")
    parser.add_argument("--shards", type=int, default=2, help="number of parquet files")
    parser.add_argument("--rows_per_group", type=int, default=16, help="parquet row group size")
    parser.add_argument("--force", action="store_true", help="rebuild even if out exists")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if (args.out / "kto" / KTO_CSV).is_file() and not args.force:
        print(f"toy data already in {args.out} (use --force to rebuild)")
        return
    build_toy_data(args.out, args.pairs, args.seed, args.shards, args.rows_per_group)
    print(f"built {args.pairs} toy pairs in {args.out}")


if __name__ == "__main__":
    main()
