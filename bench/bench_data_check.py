"""Throughput of the data check (``python -m data.check``) on 512 px JPEG Pick-a-Pic parquet.

    .venv/bin/python bench/bench_data_check.py [--pairs 400]

Generates a parquet shard of photo-like 512 x 512 JPEG pairs (smooth colour fields plus grain,
quality 90, so each file has realistic entropy), pins itself to one CPU core and times, in the
same run: the check's scan (draft-mode decode of both images, labels, duplicates, caption
tokens) and, as the baseline, a full RGB decode of the same images (what training's loader
does first).
Prints pairs/s for both and their ratio; the one-off tokenizer load is timed separately.
"""

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import check
from data.decode import load_rgb
from scripts.build_toy_data import write_pairs_parquet

SIZE = 512


def photo_like_jpeg(rng: np.random.Generator) -> bytes:
    """Low-frequency colour field upsampled to 512 px, plus per-pixel grain."""
    coarse = rng.uniform(0, 255, size=(8, 8, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((SIZE, SIZE), Image.BICUBIC), np.float32)
    grain = rng.normal(0, 12, size=(SIZE, SIZE, 3))
    pixels = np.clip(field + grain, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_shard(path: Path, pairs: int) -> int:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(pairs):
        label = float(i % 2)
        rows.append({
            "caption": f"a photo of thing number {i} in the style of a painter, highly detailed",
            "jpg_0": photo_like_jpeg(rng), "jpg_1": photo_like_jpeg(rng),
            "label_0": label, "label_1": 1.0 - label,
            "image_0_uid": f"{i}-0", "image_1_uid": f"{i}-1",
        })  # fmt: skip
    write_pairs_parquet(path, rows, rows_per_group=100)
    return sum(len(r["jpg_0"]) + len(r["jpg_1"]) for r in rows)


def full_decode(path: Path) -> None:
    import pyarrow.parquet as pq

    shard = pq.ParquetFile(path)
    for group in range(shard.metadata.num_row_groups):
        table = shard.read_row_group(group, columns=["jpg_0", "jpg_1"])
        for column in ("jpg_0", "jpg_1"):
            for cell in table.column(column):
                load_rgb(cell.as_py())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=400)
    args = parser.parse_args()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "train-0.parquet"
        size = make_shard(shard, args.pairs)
        tokenizer = check.default_tokenizer()
        start = time.perf_counter()
        captions = check.CaptionLengths(tokenizer)
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        report = check.check_pairs(str(shard), captions)
        check_s = time.perf_counter() - start
        assert not report.fatal and report.usable == args.pairs, report.summary()
        start = time.perf_counter()
        full_decode(shard)
        decode_s = time.perf_counter() - start
    print(f"{args.pairs} pairs of 512 px JPEG ({size / 2 / args.pairs / 1024:.0f} KiB per image),"
          f" one core, tokenizer: {tokenizer}")  # fmt: skip
    print(f"tokenizer load (once): {load_s:.2f} s")
    print(f"data check:           {args.pairs / check_s:7.1f} pairs/s ({check_s:.2f} s)")
    print(f"full decode baseline: {args.pairs / decode_s:7.1f} pairs/s ({decode_s:.2f} s)")
    print(f"check / full decode:  {decode_s / check_s:7.2f}x")


if __name__ == "__main__":
    main()
