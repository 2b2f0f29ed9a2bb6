"""The device check runs on the tiny model on a CPU: cases in their own processes, the table."""

import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_tiny_device_check_writes_its_table(tmp_path):
    results = tmp_path / "RESULTS.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench.device_check", "--tiny", "--only", "baseline", "fp16",
         "--results", str(results)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {
        line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
        for line in results.read_text().splitlines()
        if line.startswith("| ") and not line.startswith("| case")
    }
    assert rows["sd15 baseline bf16"][0] == "pass"
    fp16 = rows["sd15 full fp16 (grad scaler)"]
    assert fp16[0] == "pass" and float(fp16[1]) > 0 and float(fp16[3]) > 0  # s/pair, peak GiB
    # Policy and reference agree at step 0 in fp16 with checkpoint-like norm weights.
    gap = float(fp16[4].split("= ")[1].split(";")[0])
    assert abs(gap) < 1e-4 and not math.isnan(gap)
    assert "x baseline pairs/s" in fp16[4]
    assert rows["sdxl full 1024 ckpt adafactor"][0] == "skip"  # not selected
    assert rows["deepspeed_zero2 launch x1"][4] == "needs CUDA"


def test_tiny_flow_cases_run(tmp_path):
    """The SD3.5-medium and Flux.1-dev cases, on their tiny stand-ins: s/pair, memory, and the
    SD3 reference agreeing with the policy at step 0 in bf16."""
    results = tmp_path / "RESULTS.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench.device_check", "--tiny", "--only", "sd35m", "flux",
         "--results", str(results)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {
        line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
        for line in results.read_text().splitlines()
        if line.startswith("| ") and not line.startswith("| case")
    }
    for name in ("sd35m full 1024 ckpt", "flux lora r16 1024 ckpt"):
        assert rows[name][0] == "pass" and float(rows[name][1]) > 0 and float(rows[name][3]) > 0
    assert "step-0 loss - log 2" in rows["sd35m full 1024 ckpt"][4]
