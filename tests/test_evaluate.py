"""evaluate.py: summaries and win rates on hand-made score tables, the CLI on hand-made images,
and every scorer class on tiny random-init models loaded from a local directory."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

import evaluate
from common.cli import UsageError
from evaluation.scorers import (
    AESTHETIC_HEAD,
    IMAGEREWARD_HEAD,
    SCORERS,
    PreferenceMLP,
    build_scorer,
)
from evaluation.stats import (
    mean_interval,
    median_image_scores,
    summary,
    wilson_interval,
    win_rate,
)
from scripts.build_toy_data import BACKGROUNDS, COLOURS
from tests.support import TINY_TOWER, save_tiny_clip


def table(rows: list[tuple[str, str, float]]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"model": m, "prompt": p, "seed": i, "s": v} for i, (m, p, v) in enumerate(rows)]
    )


def test_mean_interval_against_hand_computed_values():
    # mean 2, sample std 1 (values 1, 2, 3), half width 1.959964 / sqrt(3) = 1.131586
    mean, low, high = mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert low == pytest.approx(2 - 1.131586, abs=1e-6)
    assert high == pytest.approx(2 + 1.131586, abs=1e-6)
    single = mean_interval([5.0])
    assert single[0] == 5.0 and math.isnan(single[1]) and math.isnan(single[2])
    with pytest.raises(ValueError):
        mean_interval([])


def test_rates_get_the_wilson_interval_inside_zero_and_one():
    # 3 of 4: z = 1.959964, z^2 = 3.841459; centre (0.75 + 3.841459 / 8) / (1 + 3.841459 / 4)
    # = 1.230182 / 1.960365 = 0.627527; half 1.959964 / 1.960365 * sqrt(0.1875 / 4 + 3.841459 / 64)
    # = 0.999795 * sqrt(0.106898) = 0.999795 * 0.326953 = 0.326886 -> [0.300641, 0.954413]
    mean, low, high = mean_interval([1.0, 1.0, 0.0, 1.0])
    assert mean == 0.75
    assert low == pytest.approx(0.300641, abs=1e-5)
    assert high == pytest.approx(0.954413, abs=1e-5)
    # All 12 rewarded: the normal interval would have no width; Wilson's is [12 / (12 + z^2), 1].
    _, low, high = mean_interval([1.0] * 12)
    assert low == pytest.approx(12 / (12 + 3.841459), abs=1e-6) and high == pytest.approx(1.0)


def test_wilson_bounds_are_exactly_0_and_1_at_none_and_all():
    # 0 of 2 gave a lower bound of -5.551e-17, which evaluate.py's table printed.
    assert wilson_interval(0.0, 2) == (0.0, pytest.approx(3.841459 / (2 + 3.841459), abs=1e-6))
    for n in range(1, 60):
        assert wilson_interval(0.0, n)[0] == 0.0 and wilson_interval(1.0, n)[1] == 1.0
        for k in range(n + 1):
            low, high = wilson_interval(k / n, n)
            assert 0.0 <= low <= k / n <= high <= 1.0
    _, low, _ = mean_interval([0.0, 0.0])
    assert low == 0.0 and f"{low:.4g}" == "0"


def test_summary_per_model_and_scorer():
    scores = table([("a", "p", 1.0), ("a", "q", 0.0), ("b", "p", 1.0), ("b", "q", 1.0)])
    out = summary(scores, ["s"])
    assert out["model"].tolist() == ["a", "b"]
    assert out["mean"].tolist() == [0.5, 1.0]
    assert out["n"].tolist() == [2, 2]
    assert out.loc[1, "ci_high"] == pytest.approx(1.0)  # 2 of 2: Wilson, never above 1
    assert out.loc[1, "ci_low"] == pytest.approx(2 / (2 + 1.959964**2))


def test_the_median_scoring_image_decides_with_odd_and_even_k():
    scores = table(
        [
            *[("a", "p", 0.1), ("a", "p", 0.9), ("a", "p", 0.5)],  # k = 3: median 0.5
            *[("a", "q", 0.4), ("a", "q", 0.1), ("a", "q", 0.3), ("a", "q", 0.2)],  # k = 4: 0.2
        ]
    )
    medians = median_image_scores(scores, "a", "s")
    assert medians.to_dict() == {"p": 0.5, "q": 0.2}


def test_win_rate_counts_wins_ties_and_losses_per_prompt():
    rows = []
    # prompt p: a's median 0.6 > b's 0.5 (a win even though a's best image is worse than b's)
    rows += [("a", "p", v) for v in (0.6, 0.6, 0.1)] + [("b", "p", v) for v in (0.5, 0.9, 0.0)]
    # prompt q: equal medians -> tie
    rows += [("a", "q", v) for v in (1.0, 0.0, 1.0)] + [("b", "q", v) for v in (1.0, 1.0, 0.0)]
    # prompt r: loss; prompt s: only in a, left out
    rows += [("a", "r", 0.0)] * 3 + [("b", "r", 1.0)] * 3 + [("a", "s", 1.0)] * 3
    result = win_rate(table(rows), "a", "b", "s")
    assert (result.wins, result.ties, result.losses, result.prompts) == (1, 1, 1, 3)
    assert result.rate == pytest.approx(0.5)
    reverse = win_rate(table(rows), "b", "a", "s")
    assert (reverse.wins, reverse.ties, reverse.losses) == (1, 1, 1)


def write_run(folder: Path, colours: list[str], prompt_colour: str) -> None:
    """generate.py's folder layout, with hand-drawn images."""
    (folder / "images").mkdir(parents=True)
    rows = []
    for seed, colour in enumerate(colours):
        image = Image.new("RGB", (32, 32), BACKGROUNDS["white"])
        ImageDraw.Draw(image).rectangle((8, 8, 23, 23), fill=COLOURS[colour])
        name = f"images/{seed}.png"
        image.save(folder / name)
        rows.append({"file_name": name, "prompt": f"a {prompt_colour} square", "seed": seed})
    pd.DataFrame(rows).to_csv(folder / "generations.csv", index=False)


def test_cli_scores_folders_and_writes_csv_markdown_and_chart(tmp_path):
    write_run(tmp_path / "base", ["red", "blue", "blue", "green"], "red")
    write_run(tmp_path / "tuned", ["red", "red", "red", "blue"], "red")
    out = tmp_path / "eval"
    _, table_, rates = evaluate.main(
        [
            "--run",
            f"base={tmp_path / 'base'}",
            "--run",
            f"tuned={tmp_path / 'tuned'}",
            "--scorer",
            "toy_colour",
            "--out",
            str(out),
        ]
    )
    written = pd.read_csv(out / evaluate.SCORES_CSV)
    assert written["toy_colour"].tolist() == [1, 0, 0, 0, 1, 1, 1, 0]
    assert table_["mean"].tolist() == [0.25, 0.75]
    # one prompt, k = 4: base's median image scores 0, tuned's 1 -> tuned wins it
    assert len(rates) == 1 and rates[0].model == "tuned" and rates[0].rate == 1.0
    text = (out / evaluate.SUMMARY_MD).read_text()
    assert "| tuned | base | toy_colour | 1 | 1 | 0 | 0 | 100.0% |" in text
    assert Image.open(out / evaluate.SUMMARY_PNG).size[0] > 100
    # diversity and drift against the baseline's images, matched by (prompt, seed)
    dist = pd.read_csv(out / evaluate.DISTRIBUTION_CSV).set_index("model")
    assert dist.loc["base", "diversity"] == pytest.approx(1.0)
    assert dist.loc["base", "drift"] == pytest.approx(0.0, abs=1e-9)
    # tuned draws red 3 times of 4 (3 identical pairs of 6), base has 1 identical pair of 6
    assert dist.loc["tuned", "diversity"] < 1.0
    assert dist.loc["tuned", "drift"] > 0.0
    assert dist["images"].tolist() == [4, 4]
    assert "| tuned | 4 | 1 |" in text


def test_cli_rejects_a_folder_without_generations_csv(tmp_path):
    with pytest.raises(UsageError, match=r"generations\.csv"):
        evaluate.main(
            ["--run", f"x={tmp_path}", "--scorer", "toy_warm", "--out", str(tmp_path / "o")]
        )


# --- Learned scorers on tiny random-init models saved to local directories ---


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    out = save_tiny_clip(tmp_path_factory.mktemp("tiny-clip") / "clip", projection_dim=16)
    save_file(PreferenceMLP(16).state_dict(), str(out / AESTHETIC_HEAD))
    return out


@pytest.fixture(scope="module")
def tiny_blip_dir(tmp_path_factory) -> Path:
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForImageTextRetrieval,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    out = tmp_path_factory.mktemp("tiny-blip") / "blip"
    torch.manual_seed(0)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "square"]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    config = BlipConfig(
        text_config={
            **TINY_TOWER,
            "vocab_size": len(words),
            "encoder_hidden_size": 32,
            "max_position_embeddings": 64,
            "bos_token_id": 2,
            "sep_token_id": 3,
            "pad_token_id": 0,
        },
        vision_config={**TINY_TOWER, "image_size": 32, "patch_size": 8},
        projection_dim=16,
        image_text_hidden_size=16,
    )
    BlipForImageTextRetrieval(config).save_pretrained(out)
    processor = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(out)
    # ImageReward's checkpoint names its head "mlp.layers.*"; the loader strips the prefix.
    head = {f"mlp.{k}": v for k, v in PreferenceMLP(32).state_dict().items()}
    save_file(head, str(out / IMAGEREWARD_HEAD))
    return out


def images_and_prompts() -> tuple[list[Image.Image], list[str]]:
    images = [
        Image.new("RGB", (40, 32), COLOURS["red"]),
        Image.new("RGB", (32, 32), COLOURS["blue"]),
        Image.effect_noise((32, 48), 50).convert("RGB"),
    ]
    return images, ["a red square", "a blue square", "a red square"]


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_every_scorer_gives_one_finite_score_per_image(name, tiny_clip_dir, tiny_blip_dir):
    path = {"imagereward": tiny_blip_dir}.get(name, tiny_clip_dir)
    scorer = build_scorer(name, None if name.startswith("toy_") else str(path))
    images, prompts = images_and_prompts()
    scores = scorer.score(images, prompts)
    assert len(scores) == 3 and np.isfinite(scores).all()
    assert scorer.name == name


def test_clip_scores_follow_their_formulas(tiny_clip_dir):
    """The three CLIP scorers share the cosine; PickScore scales it, CLIP score clamps it."""
    images, prompts = images_and_prompts()
    hps = np.array(build_scorer("hpsv2", str(tiny_clip_dir)).score(images, prompts))
    pick = np.array(build_scorer("pickscore", str(tiny_clip_dir)).score(images, prompts))
    clip = np.array(build_scorer("clip_score", str(tiny_clip_dir)).score(images, prompts))
    scale = math.exp(2.6592)  # CLIPConfig's default logit_scale_init_value
    np.testing.assert_allclose(pick, scale * hps, rtol=1e-4)
    np.testing.assert_allclose(clip, 100 * np.clip(hps, 0, None), rtol=1e-4, atol=1e-4)
    assert len(set(np.round(hps, 6))) == 3  # the images are told apart


def test_a_scorer_without_its_weights_is_a_clear_error(tmp_path, tiny_clip_dir):
    with pytest.raises(ValueError, match="needs a model path"):
        build_scorer("aesthetic")
    with pytest.raises(ValueError, match="unknown scorer"):
        build_scorer("fid")
    bare = tmp_path / "clip-without-head"
    bare.mkdir()
    for f in tiny_clip_dir.iterdir():
        if f.name != AESTHETIC_HEAD:
            (bare / f.name).write_bytes(f.read_bytes())
    with pytest.raises(FileNotFoundError, match=AESTHETIC_HEAD):
        build_scorer("aesthetic", str(bare))


# --- Every argument checked before the first image (issue 25, item 9) ---


def test_every_argument_is_checked_before_the_first_image(tiny_sd15_dir, tmp_path):
    """A mistake in a later --generate, a scorer that cannot read the prompts, an unknown
    --baseline: one UsageError naming the flag, and no image generated."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na cat on a sofa\n")  # the second names no toy colour
    out = tmp_path / "eval"
    common = ["--model", str(tiny_sd15_dir), "--num_seeds", "1", "--steps", "1",
              "--resolution", "32", "--out", str(out), "--device", "cpu"]  # fmt: skip
    cases = [
        (["--generate", "base", "--generate", f"dpo={tmp_path / 'no-run'}", "--prompts",
          str(prompts), "--scorer", "toy_warm"], r"^--generate .*no-run: neither a trained"),
        (["--generate", "base", "--prompts", str(prompts), "--scorer", "toy_colour"],
         r"^--scorer toy_colour cannot score prompt 2 of --prompts .*'a cat on a sofa'"),
        (["--generate", "base", "--suite", "partiprompts", "--limit", "2", "--scorer",
          "toy_shape"], r"^--scorer toy_shape cannot score prompt 1 of --suite partiprompts"),
        (["--generate", "base", "--prompts", str(prompts), "--scorer", "toy_warm",
          "--baseline", "nope"], r"^--baseline 'nope' is not one of the runs \['base'\]"),
        (["--generate", "base", "--prompts", str(prompts), "--scorer", "aesthetic"],
         r"^--scorer aesthetic needs a model path"),
        (["--generate", "base", "--prompts", str(tmp_path / "none.txt"), "--scorer",
          "toy_warm"], r"^--prompts .*none\.txt: no such file"),
    ]  # fmt: skip
    for argv, expected in cases:
        with pytest.raises(UsageError, match=expected):
            evaluate.main([*common, *argv])
        assert not out.exists(), argv  # nothing generated, nothing written


def test_a_run_folder_whose_prompts_a_scorer_cannot_read_is_refused(tmp_path):
    write_run(tmp_path / "base", ["red"], "red")
    frame = pd.read_csv(tmp_path / "base" / "generations.csv")
    frame["prompt"] = ["a plain square"]
    frame.to_csv(tmp_path / "base" / "generations.csv", index=False)
    with pytest.raises(UsageError, match=r"--scorer toy_colour cannot score prompt 1 of --run"):
        evaluate.main(["--run", f"base={tmp_path / 'base'}", "--scorer", "toy_colour",
                       "--out", str(tmp_path / "eval")])  # fmt: skip
