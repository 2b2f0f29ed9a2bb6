"""The online recipes (exps/*.sh launching --loss grpo or nft): they cite the release they
follow, every flag they pass is one of train.py's with a value it accepts, they carry the
released settings, and each runs on a tiny model.

A dry run replaces exps/common.sh by a stub whose ``launch_train`` prints its arguments, so the
recipe's own variable logic runs and train.py's parser reads exactly the argv it would get.
"""

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from training.config import TrainConfig, build_parser, join_negative_numbers, unused_flag_notes

REPO = Path(__file__).resolve().parents[1]
ONLINE = sorted(p for p in (REPO / "exps").glob("*.sh")
                if re.search(r"--loss (grpo|nft)\b", p.read_text()))  # fmt: skip
STUB = """set -euo pipefail
setup_project() { :; }
launch_train() { printf '%s\\0' "$@"; }
"""
# The real helper's collection split (recipes compute their micro-batches through it).
SPLIT = re.search(r"^split_collection\(\) \{\n.*?^\}\n", (REPO / "exps" / "common.sh").read_text(),
                  re.M | re.S)[0]  # fmt: skip
# What the recipes require from the environment (REWARD only where there is no default).
REQUIRED = {"PROMPTS": "prompts.txt", "REWARD": "aesthetic=/models/aesthetic"}
# The released settings each recipe must pass (sources: the recipes' headers): images sampled and
# optimizer steps per collection over all processes, and the loss's settings.
RELEASED = {
    "sd35_flow_grpo.sh": {  # flow_grpo config/grpo.py:pickscore_sd3
        "images": 24 * 48, "updates": 2, "loss": "grpo", "group_size": 24, "sampling_steps": 10,
        "noise_level": 0.7, "sde_type": "sde", "guidance_scale": 4.5,
        "trained_steps_fraction": 0.99,
        "clip_range": 1e-4, "adv_clip_max": 5.0, "kl_coef": 0.01, "advantage_std": "global",
        "filter_zero_advantages": True, "share_initial_noise": False, "lora_rank": 32,
        "lora_alpha": 64.0, "learning_rate": 3e-4,
        "weight_decay": 1e-4, "max_grad_norm": 1.0, "resolution": 512, "mixed_precision": "fp16",
        "reward": ["pickscore"], "reward_weights": "0.0384615384615",
    },
    "sd35_nft.sh": {  # DiffusionNFT config/nft.py:sd3_pickscore
        "images": 24 * 48, "updates": 1, "loss": "nft", "group_size": 24, "sampling_steps": 10,
        "noise_level": 0.0, "guidance_scale": 1.0, "trained_steps_fraction": 0.99,
        "nft_beta": 1.0, "nft_decay": 1, "kl_coef": 1e-4, "adv_clip_max": 5.0,
        "advantage_std": "global", "lora_rank": 32, "lora_alpha": 64.0, "learning_rate": 3e-4,
        "weight_decay": 1e-4, "max_grad_norm": 1.0, "resolution": 512, "mixed_precision": "fp16",
        "reward": ["pickscore"], "reward_weights": "0.0384615384615",
    },
    "sd15_grpo.sh": {  # ddpo-pytorch config/dgx.py:aesthetic
        "images": 256, "updates": 2, "loss": "grpo", "sampling_steps": 50, "noise_level": 1.0,
        "guidance_scale": 5.0, "trained_steps_fraction": 1.0, "clip_range": 1e-4,
        "adv_clip_max": 5.0, "kl_coef": 0.0, "lora_rank": 4, "lora_alpha": None,
        "learning_rate": 3e-4, "weight_decay": 1e-4, "max_grad_norm": 1.0, "max_train_steps": 400,
        "resolution": 512, "mixed_precision": "fp16",
    },
    "sdxl_grpo.sh": {  # DDPO's settings at SDXL's 1024 px
        "images": 256, "updates": 2, "loss": "grpo", "sampling_steps": 50, "noise_level": 1.0,
        "guidance_scale": 5.0, "trained_steps_fraction": 1.0, "clip_range": 1e-4,
        "adv_clip_max": 5.0, "kl_coef": 0.0, "lora_rank": 4, "learning_rate": 3e-4,
        "weight_decay": 1e-4, "max_train_steps": 400, "resolution": 1024,
        "pretrained_vae": "madebyollin/sdxl-vae-fp16-fix",
    },
}  # fmt: skip
FLOW_GRPO_TARGETS = {
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
}  # fmt: skip


def header(script: Path) -> str:
    """The leading comment block, as one line of text."""
    lines = script.read_text().splitlines()[1:]  # after the shebang
    comments = [line[1:].strip() for line in lines[: next(
        i for i, line in enumerate(lines) if not line.startswith("#"))]]  # fmt: skip
    return " ".join(comments)


def recipe_text(script: Path) -> str:
    """The recipe's text with that of the recipes it sources (``source "$(dirname "$0")/X"``)."""
    text = script.read_text()
    for name in re.findall(r'^source "\$\(dirname "\$0"\)/(\S+)"$', text, re.M):
        if name != "common.sh":
            text += recipe_text(script.parent / name)
    return text


def dry_run(script: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    folder = tmp_path / "exps"
    folder.mkdir(exist_ok=True)
    for sibling in script.parent.glob("*.sh"):  # a recipe may source another (sdxl -> sd15)
        shutil.copy(sibling, folder / sibling.name)
    shutil.copytree(script.parent / "settings", folder / "settings", dirs_exist_ok=True)
    (folder / "common.sh").write_text(STUB + SPLIT)
    text = recipe_text(script)
    required = {k: v for k, v in REQUIRED.items() if f"{k}=${{{k}:?" in text}
    env = {**os.environ, **required, **env}
    # The timeout only guards against a hang: a dry run takes seconds, but minutes on a
    # machine loaded by other jobs (30 s failed there).
    return subprocess.run(["bash", str(folder / script.name)], env=env, capture_output=True,
                          text=True, timeout=180)  # fmt: skip


def recipe_argv(script: Path, tmp_path: Path, **env: str) -> list[str]:
    done = dry_run(script, tmp_path, **env)
    assert done.returncode == 0, done.stderr
    return join_negative_numbers(done.stdout.split("\0")[:-1])


def test_every_online_recipe_is_here():
    assert {p.name for p in ONLINE} == set(RELEASED)


@pytest.mark.parametrize("script", ONLINE, ids=lambda p: p.name)
def test_the_header_cites_the_release_and_says_what_differs(script):
    text = header(script)
    # Repository, file, config name and the commit read: "owner/repo config/x.py:name (commit
    # abc1234)".
    cited = re.search(r"[\w.-]+/[\w.-]+ config/\w+\.py:\w+ \(commit [0-9a-f]{7,40}[,)]", text)
    assert cited, text[:300]
    assert "Differs from" in text  # what train.py's flags cannot express is said, not hidden


@pytest.mark.parametrize("script", ONLINE, ids=lambda p: p.name)
def test_the_recipe_passes_train_py_flags_with_the_released_settings(script, tmp_path):
    """train.py's own parser accepts every flag and value (an unknown flag or a bad choice
    exits), no flag is one the loss ignores, and the settings are the release's."""
    argv = recipe_argv(script, tmp_path)
    namespace = build_parser().parse_args(argv)
    config = TrainConfig(**vars(namespace))
    given = {arg[2:].split("=")[0] for arg in argv if arg.startswith("--")}
    assert unused_flag_notes(config, given) == []
    expected = dict(RELEASED[script.name])
    processes = 8  # the recipes' default NUM_PROCESSES
    prompts = processes * config.collect_batches * config.train_batch_size
    assert prompts * config.group_size == expected.pop("images")
    assert config.collect_batches // config.gradient_accumulation_steps == expected.pop("updates")
    assert {k: getattr(config, k) for k in expected} == expected
    assert config.max_grad_norm == 1.0 and config.lr_scheduler == "constant"
    if script.name.startswith("sd35"):
        assert set(config.lora_target_modules.split(",")) == FLOW_GRPO_TARGETS


@pytest.mark.parametrize("script", ONLINE, ids=lambda p: p.name)
def test_a_process_count_that_breaks_the_released_epoch_is_refused(script, tmp_path):
    """7 processes cannot share the release's prompts per epoch in whole micro-batches: the
    recipe says so instead of silently sampling fewer."""
    done = dry_run(script, tmp_path, NUM_PROCESSES="7")
    assert done.returncode == 2 and done.stdout == ""
    assert "must divide GROUPS_PER_EPOCH" in done.stderr


# --- each recipe on a tiny model (through exps/common.sh: accelerate launch, one process) ---

FIXTURES = {"sd35": "tiny_sd3_dir", "sd15": "tiny_sd15_dir", "sdxl": "tiny_sdxl_dir"}
TOY_PROMPTS = "a red circle on a white background\na blue square on a black background\n"


@pytest.mark.parametrize("script", ONLINE, ids=lambda p: p.name)
def test_the_recipe_runs_on_a_tiny_model(script, request, tmp_path):
    model = request.getfixturevalue(FIXTURES[script.name.split("_")[0]])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(TOY_PROMPTS)
    out = tmp_path / "out"
    overrides = {
        "MODEL": str(model), "VAE": "none", "PROMPTS": str(prompts), "REWARD": "toy_colour",
        "REWARD_WEIGHTS": "1", "OUTPUT_DIR": str(out), "NUM_PROCESSES": "1", "GROUP": "2",
        "GROUPS_PER_EPOCH": "2", "UPDATES_PER_EPOCH": "1", "SAMPLING_STEPS": "2", "STEPS": "1",
        "RESOLUTION": "32", "PRECISION": "no", "GRAD_CKPT": "false", "REPORT_TO": "none",
        "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    done = subprocess.run(["bash", str(script)], cwd=REPO, env={**os.environ, **overrides},
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((out / "train_config.json").read_text())["config"]
    # The environment won over the recipe's defaults; what it did not override kept them.
    assert config["group_size"] == 2 and config["sampling_steps"] == 2
    assert config["collect_batches"] == 2 and config["gradient_accumulation_steps"] == 2
    kept = {k: v for k, v in RELEASED[script.name].items()
            if k in ("loss", "kl_coef", "clip_range", "guidance_scale", "noise_level",
                     "lora_rank", "lora_alpha", "nft_beta", "advantage_std")}  # fmt: skip
    assert {k: config[k] for k in kept} == kept
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    (logged,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged["online/images_scored"] == 4.0  # 2 prompts x 2 images
    if config["loss"] == "grpo" and config["filter_zero_advantages"]:
        # toy_colour finds no colour in the tiny model's noise: every image scores 0, so every
        # group is equal and left out (no ratio is computed); the step still completes.
        assert logged["online/filtered"] == 1.0 and logged["loss"] == 0.0
        assert math.isnan(logged["online/ratio_at_first_step"])
    elif config["loss"] == "grpo":  # the stored log-probs recompute exactly: ratio 1 in fp32
        assert logged["online/ratio_at_first_step"] == 1.0
