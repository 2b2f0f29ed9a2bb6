"""Every experiment script runs, with its variables overridden from the environment."""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "exps").glob("*.sh"))


def test_the_published_scripts_exist():
    assert {"example.sh", "sd15_dpo.sh", "sd15_kto.sh", "sdxl_dpo.sh", "sdxl_kto.sh"} <= {
        p.name for p in SCRIPTS
    }


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_runs_with_overrides(script, request, toy_data_dir, tmp_path):
    model = request.getfixturevalue("tiny_sdxl_dir" if "sdxl" in script.name else "tiny_sd15_dir")
    out = tmp_path / "out"
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
    }
    env = {**os.environ, **overrides, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    config = json.loads((out / "train_config.json").read_text())["config"]
    # The environment won over the script's defaults ...
    assert config["max_train_steps"] == 2 and config["resolution"] == 64
    assert config["pretrained_model"] == str(model)
    # ... and what was not overridden kept the script's published value.
    assert config["beta"] == 5000.0
    assert "trained UNet saved to" in done.stderr + done.stdout
