"""Benchmark pairs/s, peak memory and (with --flops) MFU for model sizes x modes x cache, each
case in its own process, with the released code's per-step work as the baseline of the same run.

    python -m bench.run --sizes tiny sd15 --resolution 128          # CPU
    python -m bench.run --sizes sd15 --resolution 512 --precision bf16 --flops   # GPU

Appends a section to bench/RESULTS.md: machine, date, versions, the command, one row per case,
and each case's speed and memory as ratios to the baseline of the same size in the same run.
A case whose estimated memory exceeds what the machine has free is skipped and says so.
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
CASES = ("baseline", "full/off", "full/on", "lora/off", "lora/on")
# Parameters (millions): UNet, VAE + text encoders, to estimate a case's memory before running.
PARAMS_M = {"tiny": (1.1, 1.8), "sd15": (859.5, 83.7 + 123.1), "sdxl": (2567.5, 83.7 + 817.6)}


def estimate_gib(size: str, case: str, precision: str) -> float:
    """fp32 trainable weights + grads + 2 AdamW moments; frozen copies in the compute dtype."""
    unet, others = PARAMS_M[size]
    frozen_bytes = 2 if precision == "bf16" else 4
    mode, _, cache = case.partition("/")
    # LoRA: the frozen base only (adapters are ~0.1%); full: policy, grads, AdamW, reference.
    gib = unet * frozen_bytes if mode == "lora" else unet * (16 + frozen_bytes)
    if cache != "on":
        gib += others * frozen_bytes
    return gib * 1e6 / 2**30 * 1.15 + 0.5  # activations, allocator slack, the interpreter


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def machine() -> str:
    import torch

    cores = os.cpu_count()
    mem = available_gib()
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}), {cores} CPU cores"
    total = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return (
        f"CPU only: {platform.processor() or platform.machine()}, {cores} cores, "
        f"{int(total) / 2**20:.0f} GiB RAM ({mem:.0f} GiB available at start, shared machine)"
    )


def versions() -> str:
    names = ("torch", "diffusers", "transformers", "peft", "bitsandbytes")
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return f"python {platform.python_version()}, " + ", ".join(found)


def run_case(size: str, case: str, args: argparse.Namespace) -> dict:
    mode, _, cache = case.partition("/")
    command = [sys.executable, "-m", "bench.case", "--size", size, "--mode", mode,
               "--cache", cache or "off", "--resolution", str(args.resolution),
               "--pairs", str(args.pairs), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--precision", args.precision]  # fmt: skip
    if args.flops:
        command.append("--flops")
    if args.gradient_checkpointing:
        command.append("--gradient_checkpointing")
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[tuple[str, str, dict]], flops: bool) -> list[str]:
    head = "| size | case | s/pair | pairs/s | x baseline pairs/s | peak GiB | x baseline memory |"
    sep = "|---|---|---|---|---|---|---|"
    if flops:
        head += " TFLOP/step | MFU |"
        sep += "---|---|"
    lines = [head, sep]
    baselines = {size: r for size, case, r in rows if case == "baseline" and "error" not in r}
    for size, case, r in rows:
        if "error" in r or "skipped" in r:
            lines.append(f"| {size} | {case} | {r.get('skipped') or r['error']} |" + " |" * 4)
            continue
        base = baselines.get(size)
        speed = f"{r['pairs_per_second'] / base['pairs_per_second']:.2f}" if base else "-"
        memory = f"{r['peak_memory_gib'] / base['peak_memory_gib']:.2f}" if base else "-"
        line = (f"| {size} | {case} | {r['seconds_per_pair']:.3f} | {r['pairs_per_second']:.3f}"
                f" | {speed} | {r['peak_memory_gib']:.2f} | {memory} |")  # fmt: skip
        if flops:
            line += f" {r['flops_per_step'] / 1e12:.3f} | {100 * r['mfu']:.1f}% |"
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny"], choices=list(PARAMS_M))
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--flops", action="store_true", help="FLOPs and MFU (one extra step)")
    parser.add_argument("--note", default="", help="a line written under the table")
    parser.add_argument("--no_write", action="store_true", help="print only")
    args = parser.parse_args()

    header = [
        f"## {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"- machine: {machine()}",
        f"- versions: {versions()}",
        f"- command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} python -m "
        f"bench.run {shlex.join(sys.argv[1:])}`",
        f"- {args.pairs} pair(s) per step, {args.resolution} px, {args.precision}, "
        f"{args.warmup} warm-up + {args.steps} timed steps per case, each case in its own process",
        "",
    ]
    rows = []
    for size in args.sizes:
        for case in args.cases:
            need, free = estimate_gib(size, case, args.precision), available_gib()
            if need > free - 1.0:
                result = {"skipped": f"skipped: needs ~{need:.0f} GiB, {free:.0f} GiB free"}
            else:
                result = run_case(size, case, args)
            rows.append((size, case, result))
            print(size, case, json.dumps(result), flush=True)
    lines = header + table(rows, args.flops) + ([f"\n{args.note}"] if args.note else []) + [""]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        with RESULTS.open("a") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
