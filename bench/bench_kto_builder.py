"""Peak memory of the KTO builder (scripts/build_kto_csv.py) at two input sizes.

    .venv/bin/python bench/bench_kto_builder.py [--pairs 4000] [--factor 4]

Writes Pick-a-Pic-shaped shards of ``pairs`` and ``factor x pairs`` rows (500-row row groups;
each image appears in about two comparisons, so the per-image tallies grow with the input),
runs the builder on each in a fresh process and reads that process's peak RSS (``wait4``).
Bounded memory means the ratio of the two peaks stays near 1 while the input grows ``factor``
times. Images are small (32 px) so the run is quick: the row group, not the image size, bounds
what is held in memory, and the per-image state is what could grow.
"""

import argparse
import io
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.build_toy_data import write_pairs_parquet

REPO = Path(__file__).resolve().parents[1]
ROWS_PER_GROUP = 500
SHARD_ROWS = 4000


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    colour = tuple(random.Random(seed).randrange(256) for _ in range(3))
    Image.new("RGB", (32, 32), colour).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_shards(root: Path, pairs: int) -> None:
    rng = random.Random(pairs)
    pool = [jpeg(i) for i in range(64)]
    num_images = pairs  # 2 images per pair over `pairs` uids: ~2 comparisons per image
    rows = []
    for i in range(pairs):
        a, b = rng.sample(range(num_images), 2)
        label = float(rng.random() < 0.5)
        rows.append({
            "caption": f"prompt {a % 997}", "jpg_0": pool[a % 64], "jpg_1": pool[b % 64],
            "label_0": label, "label_1": 1.0 - label,
            "image_0_uid": f"img-{a:08d}", "image_1_uid": f"img-{b:08d}",
        })  # fmt: skip
        if len(rows) == SHARD_ROWS or i == pairs - 1:
            write_pairs_parquet(root / f"train-{i // SHARD_ROWS:05d}.parquet", rows, ROWS_PER_GROUP)
            rows = []


def peak_rss_mib(data: Path, out: Path) -> tuple[float, float]:
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "scripts/build_kto_csv.py", "--data", str(data), "--out", str(out)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"builder failed on {data} (status {status})")
    return usage.ru_maxrss / 1024, time.perf_counter() - start  # ru_maxrss is KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4000)
    parser.add_argument("--factor", type=int, default=4)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for pairs in (args.pairs, args.pairs * args.factor):
            data = Path(tmp) / f"pairs-{pairs}"
            make_shards(data, pairs)
            rss, seconds = peak_rss_mib(data, Path(tmp) / f"kto-{pairs}")
            csv_text = (Path(tmp) / f"kto-{pairs}" / "train_processed_v3.csv").read_text()
            images = csv_text.count("\n") - 1
            results.append(rss)
            print(
                f"{pairs:7d} pairs -> {images:7d} images: peak RSS {rss:6.1f} MiB, {seconds:.1f} s"
            )
    print(f"peak RSS ratio ({args.factor}x the input): {results[1] / results[0]:.2f}")


if __name__ == "__main__":
    main()
