"""The device check runs on the tiny model on a CPU: cases in their own processes, the table."""

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_tiny_check(tmp_path: Path, *cases: str) -> Path:
    """``bench.device_check --tiny --only CASES`` in a process of its own; its RESULTS.md."""
    results = tmp_path / "RESULTS.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench.device_check", "--tiny", "--only", *cases,
         "--results", str(results)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return results


def case_rows(results: Path) -> dict[str, list[str]]:
    """The results table: case name -> its other cells."""
    return {
        line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
        for line in results.read_text().splitlines()
        if line.startswith("| ") and not line.startswith("| case")
    }


def test_tiny_device_check_writes_its_table(tmp_path):
    rows = case_rows(run_tiny_check(tmp_path, "baseline", "fp16"))
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
    rows = case_rows(run_tiny_check(tmp_path, "sd35m", "flux"))
    for name in ("sd35m full 1024 ckpt", "flux lora r16 1024 ckpt"):
        assert rows[name][0] == "pass" and float(rows[name][1]) > 0 and float(rows[name][3]) > 0
    assert "step-0 loss - log 2" in rows["sd35m full 1024 ckpt"][4]


def test_tiny_sweep_and_step_breakdown(tmp_path):
    """Issue 25 item 10: the sweep (one row per pairs-per-step size, s/pair and MFU) and the
    per-phase breakdown of one step, printed in the report and written as a JSON line."""
    from bench.phases import PHASES, UNATTRIBUTED

    results = run_tiny_check(tmp_path, "sweep")
    (record,) = [json.loads(line) for line in (tmp_path / "RESULTS.jsonl").read_text().splitlines()]
    (case,) = [c for c in record["cases"] if c["kind"] == "sweep"]
    assert case["outcome"] == "pass", case["notes"]
    points = case["result"]["sweep"]
    assert [p["pairs"] for p in points] == [1, 2, 4]
    for p in points:
        assert p["fits"] and p["seconds_per_pair"] > 0 and p["mfu"] > 0
        assert math.isclose(p["seconds_per_pair"] * p["pairs"], p["seconds_per_step"])
        b = p["breakdown"]
        rows = {row["phase"]: row for row in b["phases"]}
        assert list(rows) == [*PHASES, UNATTRIBUTED]  # every phase of the step was recorded
        # The phases tile the profiled step: their seconds add up to its measured wall time.
        timed = sum(row["seconds"] for name, row in rows.items() if name != UNATTRIBUTED)
        assert abs(timed - b["step_seconds"]) <= 0.05 * b["step_seconds"] + 0.005
        assert math.isclose(sum(row["share"] for row in rows.values()), 1.0)
        for name in ("policy forward", "reference forward", "policy backward", "optimizer step"):
            assert rows[name]["seconds"] > 0, name
        # FLOPs: the reference runs the policy's architecture on the same inputs; the backward
        # costs about twice the forward; nothing else does matmuls or convolutions.
        forward = rows["policy forward"]["flops"]
        assert rows["reference forward"]["flops"] == forward > 0
        assert 1.5 * forward < rows["policy backward"]["flops"] < 2.5 * forward
        assert sum(row["flops"] or 0 for row in rows.values()) == p["flops_per_step"]
        assert rows["optimizer step"]["flops"] == rows["data"]["flops"] == 0
        assert b["gpu_busy_seconds"] is None  # no GPU here
    text = results.read_text()
    sweep_rows = [line.split("|")[1:-1] for line in text.splitlines()
                  if line.startswith("| ") and line.split("|")[2].strip() == "yes"]  # fmt: skip
    assert [int(cells[0]) for cells in sweep_rows] == [1, 2, 4]
    assert all(float(cells[3]) > 0 for cells in sweep_rows)  # s/pair
    for pairs in ("1 pair", "2 pairs", "4 pairs"):
        assert f"sd15 sweep bf16, {pairs} per step: where the time goes" in text
    assert text.count(f"| {UNATTRIBUTED} |") == 3


def test_a_sweep_point_that_does_not_fit_is_reported_not_raised():
    """A point whose batch cannot be allocated (here: the CPU allocator refuses 2**57 bytes of
    latents) is reported as not fitting; the sweep returns instead of crashing."""
    import torch

    from bench.case import arguments, sweep

    args = arguments().parse_args(["--size", "tiny", "--mode", "full", "--cache", "on",
                                   "--resolution", str(2**26), "--sweep", "64"])  # fmt: skip
    (point,) = sweep(args, torch.device("cpu"), torch.float32, None)
    assert point["pairs"] == 64 and point["fits"] is False
    assert "can't allocate memory" in point["error"]


def test_busy_seconds_and_phase_rows_by_hand():
    from bench.phases import UNATTRIBUTED, busy_seconds, phase_rows

    # Kernels on two streams overlap (5-15 and 12-20 us): each instant counts once.
    assert math.isclose(busy_seconds((0, 30), [(5, 15), (12, 20), (25, 40)]), 20e-6)
    assert busy_seconds((0, 10), [(10, 20)]) == 0.0
    windows = [("data", (0, 10)), ("policy forward", (10, 40)), ("data", (40, 50))]
    rows = phase_rows(windows, step_seconds=60e-6, flops={"data": 0, "policy forward": 300},
                      peak_flops=1e9, device_spans=[(5, 15), (45, 60)])  # fmt: skip
    assert [r["phase"] for r in rows] == ["data", "policy forward", UNATTRIBUTED]
    data, forward, rest = rows
    assert math.isclose(data["seconds"], 20e-6) and math.isclose(data["share"], 1 / 3)
    assert math.isclose(data["gpu_busy_seconds"], 10e-6)  # 5-10 and 45-50
    assert math.isclose(forward["gpu_busy_seconds"], 5e-6)  # 10-15
    assert math.isclose(forward["mfu"], 300 / 30e-6 / 1e9) and data["mfu"] is None
    assert math.isclose(rest["seconds"], 10e-6) and math.isclose(rest["share"], 1 / 6)


def test_tiny_online_cases(tmp_path):
    """The online trainer's cases on the tiny SD3 (GRPO and NFT, LoRA): images per second
    collecting, seconds per update, peak memory, the adapters moved, and GRPO's stored
    log-probabilities recomputing exactly (fp32) at the first update."""
    results = run_tiny_check(tmp_path, "online")
    (record,) = [json.loads(line) for line in (tmp_path / "RESULTS.jsonl").read_text().splitlines()]
    cases = {c["name"]: c for c in record["cases"] if c["kind"] == "online"}
    assert set(cases) == {"sd35m online grpo lora r32 g4", "sd35m online nft lora r32 g4"}
    for name, case in cases.items():
        r = case["result"]
        assert case["outcome"] == "pass", case["notes"]
        assert r["fits"] and r["finite"] and r["moved"]
        assert r["images"] == r["micro_batch_images"] == 4  # one prompt x the tiny group of 4
        assert r["trained_steps"] == 3  # int(4 sampler steps x 0.99)
        assert math.isclose(r["images_per_second"] * r["collect_seconds"], r["images"])
        assert r["seconds_per_update"] > 0 and r["peak_memory_gib"] > 0
        assert r["peak_memory_gib"] == max(r["peak_collect_gib"], r["peak_update_gib"])
        assert r["loss"] == ("nft" if "nft" in name else "grpo")
    assert cases["sd35m online grpo lora r32 g4"]["result"]["ratio_at_first_step"] == 1.0
    assert cases["sd35m online nft lora r32 g4"]["result"]["ratio_at_first_step"] is None
    text = results.read_text()
    assert "### Online training: collect, then update" in text
    rows = [line for line in text.splitlines() if line.startswith("| sd35m online")]
    assert len(rows) == 4  # each case in the main table and in the online one
    assert "| 4 x 3 |" in rows[-1] and "| 1.000000 |" in rows[-2]
