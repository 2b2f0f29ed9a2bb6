"""The shipped prompt suites, protocol presets and the suite summary of evaluate.py."""

import json

import pytest

import evaluate
from evaluation import suites
from evaluation.suites import PROTOCOLS, SUITES, TOY_GUIDANCE, load_suite


@pytest.mark.parametrize(("name", "count"), [("pickapic_v2", 487), ("hpsv2", 3200),
                                              ("partiprompts", 1632)])  # fmt: skip
def test_each_suite_loads_with_its_count(name, count):
    suite = load_suite(name)
    assert len(suite.prompts) == count == SUITES[name].count
    assert all(p.strip() for p in suite.prompts)
    assert len(suite.sha256) == 64


def test_hps_styles_are_four_blocks_of_800_and_limit_keeps_each_style():
    suite = load_suite("hpsv2")
    assert [suite.styles.count(s) for s in SUITES["hpsv2"].styles] == [800] * 4
    assert suite.styles[799] == "anime" and suite.styles[800] == "concept-art"
    short = load_suite("hpsv2", limit=3)
    assert short.styles == [s for s in SUITES["hpsv2"].styles for _ in range(3)]
    assert short.prompts[3:6] == suite.prompts[800:803]
    assert load_suite("partiprompts", limit=5).prompts == load_suite("partiprompts").prompts[:5]


def test_a_suite_file_of_the_wrong_size_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(suites, "SUITE_DIR", tmp_path)
    (tmp_path / SUITES["partiprompts"].file).write_text(json.dumps(["a", "b"]))
    with pytest.raises(ValueError, match=r"partiprompts\.json: 2 prompts, expected 1632"):
        load_suite("partiprompts")
    with pytest.raises(ValueError, match="unknown suite"):
        load_suite("drawbench")


def test_protocol_presets_fill_unset_flags_only(tmp_path):
    args = evaluate.parse_args(["--suite", "hpsv2", "--protocol", "sd15", "--generate", "base",
                                "--out", str(tmp_path), "--steps", "10",
                                "--scorer", "toy_warm"])  # fmt: skip
    preset = PROTOCOLS["sd15"]
    assert (args.scheduler, args.guidance_scale, args.resolution) == ("ddim", 7.5, 512)
    assert (args.num_seeds, args.dtype, args.distinct_seeds) == (1, "fp16", True)
    assert args.steps == 10 and preset.steps == 50  # an explicit flag wins
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--suite", "hpsv2", "--prompts", "x.txt", "--generate", "b",
                             "--out", str(tmp_path), "--scorer", "toy_warm"])  # fmt: skip


def test_suite_summary_lists_the_protocol_styles_and_references(tiny_sd15_dir, tmp_path):
    out = tmp_path / "eval"
    evaluate.main(["--suite", "hpsv2", "--limit", "1", "--model", str(tiny_sd15_dir),
                   "--generate", "base", "--num_seeds", "1", "--steps", "2", "--resolution",
                   "64", "--scorer", "toy_warm", "--out", str(out), "--device", "cpu"])  # fmt: skip
    scores = (out / "scores.csv").read_text().splitlines()
    assert len(scores) == 1 + 4 and scores[0].startswith("model,file_name,prompt,seed,style")
    text = (out / "summary.md").read_text()
    for style in SUITES["hpsv2"].styles:
        assert f"| base | {style} | toy_warm | 1 |" in text
    for line in ("| prompts: suite | hpsv2 |", "| prompts: limit_per_style | 1 |",
                 "| generation: scheduler | ddim |", "| generation: steps | 2 |",
                 f"| generation: guidance_scale | {TOY_GUIDANCE} |",
                 "| generation: resolution | 64 |",
                 "| generation: seeds | 0..0 for every prompt |",
                 "| scorer toy_warm | rules in evaluation/toy_reward.py"):  # fmt: skip
        assert line in text, line
    assert (
        "| Stable Diffusion v1.4 | 27.26 | 26.61 | 26.66 | 27.27 | 26.95 | **no: published**"
        in text
    )
    record = json.loads((out / "protocol.json").read_text())
    assert record["prompts"]["count"] == 4 and record["generation"]["protocol"] == "toy"
    assert record["prompts"]["sha256"] == load_suite("hpsv2").sha256
