"""One launcher case of the device check: train.py through ``accelerate launch`` with a config
from ``configs/``, then a resume, then the export; prints one JSON line.

    python -m bench.launch_case --config deepspeed_zero2 --num_processes 1

On the shipped toy base (assets/toy-sd15, SD1.5-shaped, 32 px) and toy pairs built on the spot,
so it needs no download: what it checks is the launch path, not speed. Steps: 3 optimizer steps
with a checkpoint at step 3, a resume from ``latest`` for 1 more step, then
- every logged loss finite, the resumed run starts at step 4;
- the first step's loss (computed before any update: policy == reference) is log 2 to 1e-4,
  whatever the backend casts (DPO at beta 5000; the toy base's norm weights are trained, so a
  reference that does not see the policy's casts shows here);
- ``checkpoint-3`` sealed by its manifest, holding ``unet/``;
- the step-0 validation grid (under FSDP and DeepSpeed sampled from the gathered copy of the
  policy) equals, pixel for pixel, that of a plain ``python train.py`` run of one step;
- the exported ``unet/`` loads, is fp32, moved away from the base, and (mixed precision) holds
  values a half-precision copy could not (the fp32 master weights, not rounded copies).
"""

import argparse
import json
import math
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TOY_BASE = REPO / "assets" / "toy-sd15"
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
LOG2 = math.log(2)
STEP0_TOLERANCE = 1e-4  # bench.device_check's bar for the single-GPU step-0 cases


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(args: argparse.Namespace, data: Path, out: Path, steps: int) -> list[str]:
    launcher = [sys.executable, "-m", "accelerate.commands.launch",
                "--config_file", str(REPO / "configs" / f"{args.config}.yaml"),
                "--num_processes", str(args.num_processes), "--num_machines", "1",
                "--mixed_precision", args.precision, "--dynamo_backend", "no",
                "--main_process_port", str(free_port())]  # fmt: skip
    if args.config == "multi_gpu" and not torch.cuda.is_available():
        launcher.insert(3, "--cpu")
    train = train_command(args.precision, data, out, steps)
    if steps > 3:
        train += ["--resume_from_checkpoint", "latest"]
    return launcher + train


def train_command(precision: str, data: Path, out: Path, steps: int) -> list[str]:
    """train.py and its flags (validation at step 0, every 100 steps and at the end)."""
    return [str(REPO / "train.py"), "--pretrained_model", str(TOY_BASE),
            "--data", str(data / "pickapic"), "--loss", "dpo", "--beta", "5000",
            "--resolution", "32", "--train_batch_size", "2",
            "--learning_rate", "1e-4", "--lr_warmup_steps", "0", "--max_train_steps", str(steps),
            "--checkpointing_steps", "3", "--dataloader_num_workers", "0",
            "--report_to", "none", "--mixed_precision", precision, "--output_dir", str(out),
            "--validation_prompt", "a red circle", "--validation_prompt", "a blue square",
            "--validation_images", "2", "--validation_inference_steps", "4"]  # fmt: skip


def grid_difference(launched: Path, plain: Path) -> int:
    """Largest per-pixel difference (0-255) between two step-0 validation grids."""
    import numpy as np
    from PIL import Image

    a, b = (np.asarray(Image.open(d / "validation" / "step-0.png").convert("RGB"), dtype=int)
            for d in (launched, plain))  # fmt: skip
    return int(np.abs(a - b).max()) if a.shape == b.shape else 255


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def check_export(out: Path, precision: str) -> list[str]:
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    problems = []
    (weights,) = (out / "unet").glob("*.safetensors")
    with safe_open(str(weights), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    if dtypes != {"F32"}:
        problems.append(f"export dtypes {sorted(dtypes)}, expected F32 only")
    trained = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    base = UNet2DConditionModel.from_pretrained(TOY_BASE, subfolder="unet")
    pairs = list(zip(trained.parameters(), base.parameters(), strict=True))
    if all(torch.equal(a, b) for a, b in pairs):
        problems.append("exported weights equal the base: no update reached the export")
    if precision in HALF:
        moved = torch.cat([a.flatten() for a, b in pairs if not torch.equal(a, b)])
        if torch.equal(moved.to(HALF[precision]).float(), moved):
            problems.append(f"exported weights are all {precision}-representable: half copies?")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, choices=["deepspeed_zero2", "fsdp", "multi_gpu"])
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--precision", choices=["no", "bf16", "fp16"], default="bf16")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per launch")
    args = parser.parse_args()
    from scripts.build_toy_data import build_toy_data

    start = time.perf_counter()
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as work:
        data, out = Path(work) / "data", Path(work) / "out"
        build_toy_data(data, num_pairs=32)
        for steps in (3, 4):
            done = subprocess.run(launch_command(args, data, out, steps), cwd=REPO,
                                  capture_output=True, text=True, timeout=args.timeout)  # fmt: skip
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                problems.append(f"launch of {steps} steps exited {done.returncode}: {tail}")
                break
        else:
            logged = metrics(out)
            losses = [m["loss"] for m in logged]
            if not all(map(torch.isfinite, torch.tensor(losses))):
                problems.append(f"non-finite losses {losses}")
            if abs(losses[0] - LOG2) > STEP0_TOLERANCE:
                problems.append(f"step-0 loss {losses[0]:.6f} is not log 2 ({LOG2:.6f})")
            if [m["step"] for m in logged][-1] != 4:
                problems.append(f"resumed run did not reach step 4: {[m['step'] for m in logged]}")
            checkpoint = out / "checkpoint-3"
            if not (checkpoint / "manifest.json").is_file() or not (checkpoint / "unet").is_dir():
                problems.append("checkpoint-3 missing, unsealed, or without unet/")
            problems += check_export(out, args.precision)
            skipped = logged[-1].get("nonfinite_steps", 0)
            # The launched run's step-0 grid (under FSDP / DeepSpeed: from the gathered copy)
            # against a plain single-process run's.
            plain = Path(work) / "plain"
            done = subprocess.run([sys.executable, *train_command(args.precision, data, plain, 1)],
                                  cwd=REPO, capture_output=True, text=True,
                                  timeout=args.timeout)  # fmt: skip
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                problems.append(f"plain run exited {done.returncode}: {tail}")
            else:
                grid_diff = grid_difference(out, plain)
                if grid_diff:
                    problems.append(f"step-0 grid differs from a plain run's by {grid_diff}/255")
    result = {
        "config": args.config,
        "num_processes": args.num_processes,
        "precision": args.precision,
        "passed": not problems,
        "problems": problems,
        "seconds": time.perf_counter() - start,
    }
    if not problems:
        result.update(losses=losses, nonfinite_steps=skipped, grid_diff=grid_diff)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
