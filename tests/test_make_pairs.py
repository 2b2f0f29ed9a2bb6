"""scripts/make_pairs.py (on-policy pairs) on the tiny model, and exps/iterative_dpo.sh."""

import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data import ImageTransform, PickapicPairs, StreamSettings
from scripts.make_pairs import run as make_pairs
from tests.test_relabel import TinyRandomScorer

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle on a white background", "a blue square on a black background",
           "a green triangle on a white background"]  # fmt: skip
K = 3


def args(model: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--prompts", str(prompts), "--images_per_prompt", str(K),
            "--scorer", "tiny", "--steps", "2", "--resolution", "32", "--batch_size", "4",
            "--prompts_per_unit", "1", "--device", "cpu", "--out", str(out), *extra]  # fmt: skip


def test_best_worst_pairs_with_the_right_chosen_side_and_resume(tiny_sd15_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    summary = make_pairs(args(tiny_sd15_dir, prompts, tmp_path / "whole"), [TinyRandomScorer()])
    assert summary["complete"] and summary["images"] == 9
    images = pd.read_csv(tmp_path / "whole" / "images.csv")
    # Per-image seeds: prompt p, image j -> p * k + j; a score for every image.
    assert images["seed"].tolist() == list(range(9))
    raw = np.array(TinyRandomScorer().score(
        [Image.open(tmp_path / "whole" / f) for f in images["file_name"]], [""] * 9))  # fmt: skip
    assert images["score_tiny"].to_numpy() == pytest.approx(raw, abs=1e-4)
    # The combination standardises the scores the run recorded (the images above were re-read
    # from PNG, so they agree to 1e-4 only, and z divides by a small std).
    recorded = images["score_tiny"].to_numpy()
    z = (recorded - recorded.mean()) / recorded.std()
    assert images["score_combined"].to_numpy() == pytest.approx(z, abs=1e-6)
    assert images["label"].tolist() == (z >= 0).astype(int).tolist()
    pairs = pq.read_table(tmp_path / "whole" / "pickapic" / "train-00000.parquet").to_pandas()
    assert len(pairs) == 3  # best vs worst of each prompt
    for p, row in pairs.iterrows():
        assert row["caption"] == PROMPTS[p]
        mine = z[p * K : (p + 1) * K]
        winner = 0 if row["label_0"] == 1 else 1
        assert row[f"label_{1 - winner}"] == 0
        assert row[f"score_combined_{winner}"] == pytest.approx(mine.max())
        assert row[f"score_combined_{1 - winner}"] == pytest.approx(mine.min())
        # The stored bytes are the generated image of that seed.
        stored = Image.open(io.BytesIO(row[f"jpg_{winner}"]))
        best = images["file_name"][p * K + int(np.argmax(mine))]
        assert row[f"image_{winner}_uid"] == best
        assert np.array_equal(np.asarray(stored), np.asarray(Image.open(tmp_path / "whole" / best)))
    # The output trains as it is.
    out = PickapicPairs(str(tmp_path / "whole" / "pickapic"), StreamSettings(ImageTransform(32)))
    assert out.num_pairs == 3

    cut = args(tiny_sd15_dir, prompts, tmp_path / "cut")
    first = make_pairs([*cut, "--max_units", "1"], [TinyRandomScorer()])
    assert first == {"complete": False, "units_done_now": 1}
    rest = make_pairs(cut, [TinyRandomScorer()])
    assert rest["units_done_now"] == 2
    again = pq.read_table(tmp_path / "cut" / "pickapic" / "train-00000.parquet").to_pandas()
    pd.testing.assert_frame_equal(pairs, again)

    every = make_pairs([*args(tiny_sd15_dir, prompts, tmp_path / "all"), "--pairing", "all",
                        "--margin", "0.1"], [TinyRandomScorer()])  # fmt: skip
    gaps = [abs(a - b) for p in range(3) for i, a in enumerate(z[p * K : (p + 1) * K])
            for b in z[p * K + i + 1 : (p + 1) * K]]  # fmt: skip
    assert every["pairs"] == sum(g > 0.1 for g in gaps)


def test_iterative_dpo_script_runs_rounds_end_to_end(tiny_sd15_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    overrides = {"MODEL": str(tiny_sd15_dir), "OUT": str(tmp_path / "iter"), "ROUNDS": "2",
                 "PROMPTS": str(prompts), "IMAGES_PER_PROMPT": "3", "SAMPLE_STEPS": "2",
                 "RESOLUTION": "32", "STEPS_PER_ROUND": "2", "BATCH": "2", "WARMUP": "0",
                 "SCORER": "toy_warm", "EVAL_SEEDS": "1", "EVAL_PROMPTS": str(prompts),
                 "PAIRING": "all", "MARGIN": "-1"}  # fmt: skip
    env = {**os.environ, **overrides, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(REPO / "exps" / "iterative_dpo.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for r in (1, 2):
        assert (tmp_path / "iter" / f"round{r}" / "train" / "unet").is_dir()
        assert (tmp_path / "iter" / f"round{r}" / "pairs" / "make_pairs.json").is_file()
    # Round 2 generated from round 1's UNet and trained from it.
    args2 = json.loads(
        (tmp_path / "iter" / "round2" / "pairs" / ".make_pairs_args.json").read_text()
    )
    assert args2["unet"] == str(tmp_path / "iter" / "round1" / "train")
    config = json.loads((tmp_path / "iter" / "round2" / "train" / "train_config.json").read_text())
    assert config["config"]["pretrained_model"] == str(tmp_path / "iter" / "round2" / "model")
    assert "round 2" in done.stdout


def test_iterative_dpo_stops_at_a_round_without_pairs(tiny_sd15_dir, tmp_path):
    """No pair clears the margin: the script says so, trains nothing and still evaluates."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS[:1]) + "\n")
    overrides = {"MODEL": str(tiny_sd15_dir), "OUT": str(tmp_path / "iter"), "ROUNDS": "2",
                 "PROMPTS": str(prompts), "IMAGES_PER_PROMPT": "2", "SAMPLE_STEPS": "2",
                 "RESOLUTION": "32", "SCORER": "toy_warm", "EVAL_SEEDS": "1",
                 "EVAL_PROMPTS": str(prompts), "PAIRING": "all", "MARGIN": "1e9"}  # fmt: skip
    env = {**os.environ, **overrides, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(REPO / "exps" / "iterative_dpo.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "round 1: no pairs" in done.stdout and "stopping after round 0" in done.stdout
    assert not (tmp_path / "iter" / "round1" / "train").exists()
    assert (tmp_path / "iter" / "eval" / "summary.md").is_file()
