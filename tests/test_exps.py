"""Every experiment script runs, with its variables overridden from the environment."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from losses import get_spec, loss_names

REPO = Path(__file__).resolve().parents[1]
# The recipes; exps/common.sh is the plumbing they source.
SCRIPTS = sorted(p for p in (REPO / "exps").glob("*.sh") if p.name != "common.sh")
# The toy benchmark and iterated DPO are pipelines, not one training run: tested on their own
# (iterative_dpo.sh in test_make_pairs.py).
# The online recipes (--loss grpo / nft) have their own tests: test_exps_online.py.
TRAINING_SCRIPTS = [p for p in SCRIPTS if p.name not in ("toy_benchmark.sh", "iterative_dpo.sh")
                    and not re.search(r"--loss (grpo|nft)\b", p.read_text())]  # fmt: skip
# The tiny model a script runs on, by a family name in the script's name (else SD1.5).
FIXTURES = {"sdxl": "tiny_sdxl_dir", "sd35": "tiny_sd3_dir", "flux": "tiny_flux_dir"}


def test_the_published_scripts_exist():
    assert {"example.sh", "sd15_dpo.sh", "sd15_kto.sh", "sdxl_dpo.sh", "sdxl_kto.sh"} <= {
        p.name for p in SCRIPTS
    }


def run_script(script: Path, request, toy_data_dir: Path, out: Path, **extra: str):
    """Run ``script`` on the tiny model and toy data; returns (process, saved config)."""
    family = next((f for key, f in FIXTURES.items() if key in script.name), "tiny_sd15_dir")
    model = request.getfixturevalue(family)
    overrides = {
        "MODEL": str(model),
        "VAE": "none",  # the SDXL scripts' fp16-fix VAE is a hub download
        "DATA": str(toy_data_dir / "pickapic"),
        "CSV": str(toy_data_dir / "kto" / "train_processed_v3.csv"),
        "IMAGES": str(toy_data_dir / "kto"),
        "OUTPUT_DIR": str(out),
        "STEPS": "2",
        "RESOLUTION": "64",
        "NUM_PROCESSES": "1",
        "BATCH": "2",
        "ACCUM": "1",
        "PRECISION": "no",
        "WORKERS": "0",
        "REPORT_TO": "none",
        "EVAL_SEEDS": "1",
        **extra,
    }
    env = {**os.environ, **overrides, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((out / "train_config.json").read_text())["config"]
    # The environment won over the script's defaults ...
    assert config["max_train_steps"] == 2 and config["resolution"] == 64
    assert config["pretrained_model"] == str(model)
    if config["lora_rank"]:  # flux_dpo.sh: LoRA by default
        assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
        assert f"LoRA adapters: {out / 'lora'}" in done.stdout
        return done, config
    folder = "transformer" if family in ("tiny_sd3_dir", "tiny_flux_dir") else "unet"
    assert (out / folder / "diffusion_pytorch_model.safetensors").is_file()
    what = "UNet" if folder == "unet" else "transformer"
    assert f"{what}: {out / folder}" in done.stdout  # train.py's results block
    if script.name == "example.sh":  # ends with where the model and its evaluation are
        last = done.stdout.strip().splitlines()[-1]
        assert f"model: {out / 'unet'}" in last and str(out / "eval" / "summary.png") in last
    return done, config


@pytest.mark.parametrize("script", TRAINING_SCRIPTS, ids=lambda p: p.name)
def test_script_runs_with_overrides(script, request, toy_data_dir, tmp_path):
    _, config = run_script(script, request, toy_data_dir, tmp_path / "out")
    # ... and what was not overridden kept the script's default: the toy-tuned beta of
    # example.sh, a beta the script sets (the flow models'), else the loss's released value.
    text = script.read_text()
    toy_beta = re.search(r"DPO_TOY_BETA=([0-9.]+)", text)
    own_beta = re.search(r"BETA=\$\{BETA:?-([0-9.]+)\}", text)
    released = get_spec(config["loss"]).hyperparameters["beta"]
    expected = toy_beta or own_beta
    assert config["beta"] == (float(expected.group(1)) if expected else released)


@pytest.mark.parametrize(
    ("script", "env", "expected"),
    [
        ("sdxl_dpo.sh", {"LOSS": "mapo"}, {"beta": 0.1, "snr_value": 0.5}),
        (  # two processes on the CPU: the recipe passes --multi_gpu (without it, one runs)
            "sd15_dpo.sh",
            {"LOSS": "dmpo", "MU": "0.9", "NUM_PROCESSES": "2", "ACCELERATE_USE_CPU": "1"},
            {"beta": 2000.0, "dmpo_alpha": 0.01, "winner_preserving_mu": 0.9},
        ),
    ],
    ids=["sdxl-mapo", "sd15-dmpo-safeguard-2-processes"],
)
def test_loss_picks_its_released_defaults(script, env, expected, request, toy_data_dir, tmp_path):
    out = tmp_path / "out"
    done, config = run_script(REPO / "exps" / script, request, toy_data_dir, out, **env)
    assert config["loss"] == env["LOSS"]
    assert {k: config[k] for k in expected} == expected
    assert "is not used by --loss" not in done.stderr + done.stdout
    processes = int(env.get("NUM_PROCESSES", "1"))  # run_script's BATCH 2, ACCUM 1
    assert f"x {processes} processes = {2 * processes} pairs per step" in done.stderr


def test_toy_benchmark_runs_end_to_end_with_overrides(tmp_path):
    """All stages on the shipped toy base with a few images and steps: every table, the
    frontier, the noisy-label column, results and plots; with the online losses registered, a
    GRPO arm and the offline-against-online table and plot."""
    tiny = "learning_rate=1e-4 max_train_steps=2"
    online = "grpo" in loss_names()  # the online trainer (branch online-trainer), once merged
    grpo = f"grpo group_size=2 train_batch_size=2 sampling_steps=2 eval_every=1 {tiny}\n"
    overrides = {
        "OUT": str(tmp_path / "work"),
        "RESULTS": str(tmp_path / "results"),
        "VARIANTS": f"dpo beta=1000 {tiny}\nkto beta=1000 {tiny}\nsft {tiny}\n"
        + (grpo if online else ""),
        "MAIN": "dpo kto sft" + (" grpo" if online else ""),
        "TASKS": "colour",
        "TRAIN_SEEDS": "0",
        "WIDE": "dpo",
        "WIDE_SEEDS": "0 3",
        "FRONTIER": "dpo:1000,3000",
        "FRONTIER_TASK": "colour",  # the default, warm, would build a second task's data
        "FRONTIER_SEEDS": "0",
        "NOISY": "dpo",
        "NOISY_SEEDS": "0",
        "IMAGES_PER_PROMPT": "4",
        "PAIRS_PER_PROMPT": "2",
        "EVAL_SEEDS": "1",
        "SAMPLE_STEPS": "10",
        "BATCH": "2",
        "WARMUP": "1",
    }
    env = {**os.environ, **overrides, "OMP_NUM_THREADS": "1"}
    script = REPO / "exps" / "toy_benchmark.sh"
    done = subprocess.run(
        ["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = (tmp_path / "results" / "toy_results.md").read_text()
    assert "## Task: `colour` (prompt alignment" in results
    assert "## Task: `colour` with a share of the training pairs' labels flipped" in results
    runs = {"colour": ["dpo-s0", "dpo-s3", "kto-s0", "sft-s0", "dpo-b3000-s0"],
            "colour-noisy": ["dpo-s0"]}  # fmt: skip
    for task, names in runs.items():
        for name in ("base", *names):
            assert f"| {task} | {name} | 6 |" in results  # the 6 test prompts x 1 image
        for name in names:
            assert (tmp_path / "work" / "runs" / task / name / "unet").is_dir()
    assert "| dpo | 2 |" in results and "| kto | 1 |" in results  # seeds per loss
    assert "caption dropout 0.0" in results  # the script's CAPTION_DROPOUT (released trainers: 0.2)
    assert "| stalled steps | s / step |" in results
    config = json.loads((tmp_path / "work" / "runs" / "colour" / "kto-s0" / "train_config.json")
                        .read_text())  # fmt: skip
    assert config["config"]["caption_dropout"] == 0.0
    assert "| dpo | 3000 | 1 |" in results and "| dpo | 1000 | 1 |" in results  # frontier
    for plot in ("toy_frontier.png", "toy_reward_by_loss.png", "toy_before_after.png"):
        assert (tmp_path / "results" / plot).stat().st_size > 1000
    if online:
        assert "### Offline against online (colour)" in results and "| grpo-s0 | 6 |" in results
        assert (tmp_path / "results" / "toy_online_vs_offline.png").stat().st_size > 1000
    # Each seed is its own run: different draws, so different weights.
    first, second = (
        tmp_path / "work" / "runs" / "colour" / f"dpo-s{s}" / "unet"
        / "diffusion_pytorch_model.safetensors"
        for s in (0, 3)
    )  # fmt: skip
    assert first.read_bytes() != second.read_bytes()


# --- The recipes' shared plumbing (exps/common.sh) ---


def test_every_recipe_takes_its_plumbing_from_the_common_helper():
    """A recipe sources common.sh first, or sets its own defaults and then runs another recipe
    (exps/sdxl_grpo.sh: DDPO's SD1.5 recipe with SDXL's defaults)."""
    for script in SCRIPTS:
        code = [line for line in script.read_text().splitlines() if not line.startswith("#")]
        runs_another = re.fullmatch(r'source "\$\(dirname "\$0"\)/(\w+\.sh)"', code[-1])
        if runs_another and runs_another[1] != "common.sh":
            assert (script.parent / runs_another[1]) in SCRIPTS, script.name
            assert all(re.fullmatch(r"[A-Z_]+=\$\{[A-Z_]+:-[^}]*\}\s*(#.*)?", line)
                       for line in code[:-1]), script.name  # fmt: skip
            continue
        assert code[0] == 'source "$(dirname "$0")/common.sh"', script.name
        for plumbing in ("accelerate", "scripts/setup.sh", "set -e", ".venv/bin"):
            assert not any(plumbing in line for line in code), (script.name, plumbing)


def test_a_mistake_through_a_recipe_is_one_line_and_exit_code_2(tiny_sd15_dir, toy_data_dir,
                                                                tmp_path):  # fmt: skip
    """The recipes launch through `accelerate launch`, whose own traceback (exit 1) used to
    bury train.py's one-line error."""
    env = {**os.environ, "MODEL": str(tiny_sd15_dir), "DATA": str(toy_data_dir / "pickapic"),
           "OUTPUT_DIR": str(tmp_path / "out"), "NUM_PROCESSES": "1", "BATCH": "1", "ACCUM": "1",
           "PRECISION": "no", "REPORT_TO": "none", "LR": "-1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    done = subprocess.run(["bash", str(REPO / "exps" / "sd15_dpo.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines() == [
        "train.py: error: invalid config: --learning_rate must be > 0"
    ], done.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def test_the_example_runs_kto_on_the_toy_pairs_per_image_labels(request, toy_data_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"  # two held-out prompts keep validation and evaluation short
    prompts.write_text("a red circle on a white background\na blue square on a black background\n")
    short = {"EVAL_PROMPTS": str(prompts), "VALIDATION_IMAGES": "1"}
    _, config = run_script(
        REPO / "exps" / "example.sh", request, toy_data_dir, tmp_path / "out", LOSS="kto", **short
    )
    assert config["loss"] == "kto" and config["csv"].endswith("train_processed_v3.csv")
    toy_beta = re.search(r"KTO_TOY_BETA=([0-9.]+)", (REPO / "exps" / "example.sh").read_text())
    assert config["beta"] == float(toy_beta.group(1))
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text()
             .splitlines()]  # fmt: skip
    assert "validation/toy_colour" in lines[0] and "validation/toy_colour" in lines[-1]
