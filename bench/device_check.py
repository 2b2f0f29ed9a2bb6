"""The GPU paths in one command: speed, memory, precision and launchers, one table.

    python -m bench.device_check            # on a GPU: real SD1.5 / SDXL / SD3.5 / Flux configs
    python -m bench.device_check --tiny     # anywhere: every case on the tiny model (CPU, CI)

Each case runs in its own process with a timeout (``bench.case`` for training steps,
``bench.launch_case`` for ``accelerate launch`` runs), so one failure or hang does not hide the
rest. Prints one table (case, result, s/pair, MFU, peak GiB, notes) and appends it, with the
machine and versions, to bench/RESULTS.md, and every case's full result as one JSON line to
the file beside it (RESULTS.jsonl). Cases:

- sd15 baseline: the released Diffusion-DPO trainer's per-step work (bench.case), bf16;
- sd15 full bf16 / fp16: this project's step, cached latents, norm weights randomised like a
  real checkpoint's; passes when the step-0 loss is log 2 to 1e-4 (fp16 with the grad scaler);
  notes the speed against the baseline of the same run;
- sd15 sweep bf16: the bf16 case at 1, 4 and 16 pairs per GPU (--sweep; 1, 2, 4 with --tiny),
  one process, a point that runs out of memory reported as not fitting: s/pair and MFU per
  point, and where one step's time goes (``bench.phases``: seconds, share, FLOPs, MFU and GPU
  busy time per phase, from torch.profiler), printed as two more tables;
- sd15 compile: the bf16 case under torch.compile (inductor): speed-up over eager;
- sd15 adamw8bit: the bf16 case with bitsandbytes' 8-bit AdamW;
- sdxl full: 1024 px, gradient checkpointing, Adafactor: peak memory, fits in 80 GB or not;
- sdxl lora: 1024 px, rank 64, gradient checkpointing: peak memory, fits in 24 GB or not;
- sd35m full / flux lora: SD3.5-medium (full fine-tuning, frozen reference) and Flux.1-dev
  (LoRA rank 16, bf16 base) configs at 1024 px, cached latents and T5 features, gradient
  checkpointing: s/pair and peak memory (fits in 80 GB or not); SD3.5's step-0 loss is log 2;
- sd35m online grpo / nft: the online trainer (``bench.online_case``) on SD3.5-medium with LoRA
  r 32, alpha 64 on Flow-GRPO's attention projections, 512 px, fp16, gradient checkpointing, at
  the released group size (24 images per prompt) and the smallest micro-batch the trainer
  takes, one prompt's 24 images (the releases train 9 images per GPU, mixing prompts: not
  expressible); GRPO as flow_grpo's pickscore_sd3 (10 SDE steps, 9 trained, guidance 4.5 in
  sampling and training, KL 0.01), NFT as DiffusionNFT's sd3_pickscore (10 deterministic steps,
  guidance 1, KL 1e-4): images sampled per second collecting, seconds per update (one
  micro-batch: 24 images x every trained step), peak memory of each phase (fits in 80 GB or
  not), the ratio at the first update; printed as one more table. A stand-in reward (mean
  pixel value) and random text features: the reward model's and text encoders' time is not in;
- deepspeed / fsdp: train.py through accelerate launch with configs/deepspeed_zero2.yaml and
  configs/fsdp.yaml (3 steps, checkpoint, resume 1 step, fp32 export loads; the step-0 loss is
  log 2 to 1e-4; the step-0 validation grid equals a plain run's), one process per GPU up
  to 2; on a machine without CUDA they are skipped and the same checks run through
  configs/multi_gpu.yaml on the CPU instead (the launch path is then still exercised).
"""

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.run import machine, versions

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
LOG2 = math.log(2)
STEP0_TOLERANCE = 1e-4  # the bar: |step-0 loss - log 2| < 1e-4
SDXL_FULL_TARGET_GIB = 80
SDXL_LORA_TARGET_GIB = 24
FLOW_TARGET_GIB = 80  # SD3.5-medium full and Flux.1-dev LoRA on one 80 GB GPU (a report only)
MIN_CASE_SECONDS = 20  # a case is not started with less than this left of --budget
# Pairs per GPU of the sweep (issue 25 item 10: 1, 4, 16, or what fits); the tiny model's
# points are kept small so the CPU check stays quick.
SWEEP_PAIRS = {True: [1, 2, 4], False: [1, 4, 16]}
# Online cases: Flow-GRPO's LoRA targets (flow_grpo scripts/train_sd3.py; DiffusionNFT's too).
FLOW_GRPO_LORA_TARGETS = ("attn.to_q,attn.to_k,attn.to_v,attn.to_out.0,attn.add_q_proj,"
                          "attn.add_k_proj,attn.add_v_proj,attn.to_add_out")  # fmt: skip
# Released group size and sampler steps (Flow-GRPO config/grpo.py, DiffusionNFT config/nft.py);
# the tiny stand-in samples fewer so the CPU check stays quick.
ONLINE_GROUP = {True: 4, False: 24}
ONLINE_STEPS = {True: 4, False: 10}
# |ratio - 1| at the first update after a collection: 0 in fp32, within this in bf16 / fp16
# (docs/online.md, the healthy run); beyond it sampling and training compute different steps.
RATIO_TOLERANCE = 1e-3
SCOPE = {
    True: "tiny SD1.5-shaped model at 64 px for every case, tiny SD3- and Flux-shaped ones for "
    "theirs (names are the GPU cases they stand in for; memory targets mean nothing here)",
    False: "real SD1.5 / SDXL / SD3.5-medium / Flux.1-dev configs, random init",
}


@dataclass
class Case:
    name: str
    command: list[str]
    timeout: float
    # "bench" or "sweep" (bench.case), "launch" (bench.launch_case), "online" (bench.online_case)
    kind: str = "bench"
    skip: str = ""  # a reason not to run it here
    result: dict = field(default_factory=dict)
    outcome: str = ""  # pass / fail / skip
    notes: list[str] = field(default_factory=list)


def bench_case(name: str, size: str, resolution: int, pairs: int, steps: int, warmup: int,
               timeout: float, *extra: str) -> Case:  # fmt: skip
    command = [sys.executable, "-m", "bench.case", "--size", size,
               "--resolution", str(resolution), "--pairs", str(pairs), "--steps", str(steps),
               "--warmup", str(warmup), *extra]  # fmt: skip
    return Case(name, command, timeout)


def plan(tiny: bool, cuda: bool, gpus: int, sweep: list[int] | None = None) -> list[Case]:
    """The cases, on real-size configs (GPU) or all on the tiny model (--tiny); ``sweep``: the
    sweep case's pairs per step (default: SWEEP_PAIRS)."""
    sd15, sdxl = ("tiny", "tiny") if tiny else ("sd15", "sdxl")
    sd35m, flux = ("tiny_sd3", "tiny_flux") if tiny else ("sd35m", "flux")
    res, xl_res = (64, 64) if tiny else (512, 1024)
    pairs, steps, warmup = (1, 1, 1) if tiny else (4, 5, 2)
    t = 240 if tiny else 180
    cached = ("--mode", "full", "--cache", "on", "--randomise_norms")
    cases = [
        bench_case("sd15 baseline bf16", sd15, res, pairs, steps, warmup, t,
                   "--mode", "baseline", "--precision", "bf16", "--flops"),
        bench_case("sd15 full bf16", sd15, res, pairs, steps, warmup, t, *cached,
                   "--precision", "bf16", "--flops"),
        bench_case("sd15 sweep bf16", sd15, res, pairs, steps, warmup, 2 * t, *cached,
                   "--precision", "bf16", "--flops", "--profile",
                   "--sweep", *map(str, sweep or SWEEP_PAIRS[tiny])),
        bench_case("sd15 full fp16 (grad scaler)", sd15, res, pairs, steps, warmup, t, *cached,
                   "--precision", "fp16"),
        bench_case("sd15 full bf16 adamw8bit", sd15, res, pairs, steps, warmup, t, *cached,
                   "--precision", "bf16", "--optimizer", "adamw8bit"),
        bench_case("sdxl full 1024 ckpt adafactor", sdxl, xl_res, 1, 3, 1, t, *cached,
                   "--precision", "bf16", "--gradient_checkpointing", "--optimizer", "adafactor"),
        bench_case("sdxl lora r64 1024 ckpt", sdxl, xl_res, 1, 3, 1, t, "--mode", "lora",
                   "--cache", "on", "--lora_rank", "64", "--precision", "bf16",
                   "--gradient_checkpointing"),
        bench_case("sd15 full bf16 compile", sd15, res, pairs, steps, warmup + 1, 2 * t,
                   *cached, "--precision", "bf16", "--compile"),
        # Flow transformers (issue 15), cached latents and T5 features, random init.
        bench_case("sd35m full 1024 ckpt", sd35m, xl_res, 1, 3, 1, t, *cached,
                   "--precision", "bf16", "--gradient_checkpointing"),
        bench_case("flux lora r16 1024 ckpt", flux, xl_res, 1, 3, 1, t, "--mode", "lora",
                   "--cache", "on", "--lora_rank", "16", "--precision", "bf16",
                   "--gradient_checkpointing"),
    ]  # fmt: skip
    cases += online_cases(tiny, t)
    for case in cases:
        if "--sweep" in case.command:
            case.kind = "sweep"  # its result holds points, not one measurement
    procs = str(max(1, min(2, gpus)))
    for config in ("deepspeed_zero2", "fsdp"):
        case = Case(f"{config} launch x{procs}", [sys.executable, "-m", "bench.launch_case",
                    "--config", config, "--num_processes", procs, "--precision", "bf16",
                    "--timeout", "140"],
                    timeout=420, kind="launch")  # fmt: skip
        if not cuda:
            case.skip = "needs CUDA"
        cases.append(case)
    if not cuda:
        cases.append(Case("ddp launch x1 (cpu)", [sys.executable, "-m", "bench.launch_case",
                          "--config", "multi_gpu", "--precision", "bf16"],
                          timeout=420, kind="launch"))  # fmt: skip
    return cases


def online_cases(tiny: bool, timeout: float) -> list[Case]:
    """The online trainer on SD3.5-medium (the tiny SD3 on a CPU), LoRA, GRPO and NFT at their
    released settings (bench.online_case)."""
    size, resolution, precision = ("tiny_sd3", 64, "fp32") if tiny else ("sd35m", 512, "fp16")
    common = [sys.executable, "-m", "bench.online_case", "--size", size,
              "--resolution", str(resolution), "--group_size", str(ONLINE_GROUP[tiny]),
              "--sampling_steps", str(ONLINE_STEPS[tiny]), "--precision", precision,
              "--lora_rank", "32", "--lora_alpha", "64", "--lora_targets", FLOW_GRPO_LORA_TARGETS,
              "--gradient_checkpointing"]  # fmt: skip
    released = {"grpo": ["--guidance_scale", "4.5", "--kl_coef", "0.01"],
                "nft": ["--guidance_scale", "1", "--kl_coef", "1e-4"]}  # fmt: skip
    return [Case(f"sd35m online {loss} lora r32 g{ONLINE_GROUP[tiny]}",
                 [*common, "--loss", loss, *flags], 2 * timeout, kind="online")
            for loss, flags in released.items()]  # fmt: skip


def run(case: Case, deadline: float = math.inf) -> None:
    """Run one case within its own timeout and what is left before ``deadline``."""
    left = deadline - time.monotonic()
    if not case.skip and left < MIN_CASE_SECONDS:
        case.skip = "not run: the --budget was spent"
    if case.skip:
        case.outcome = "skip"
        case.notes.append(case.skip)
        return
    start = time.perf_counter()
    timeout = min(case.timeout, left)
    try:
        done = subprocess.run(case.command, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        case.outcome = "fail"
        case.notes.append(f"timed out after {timeout:.0f} s")
        return
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        case.outcome = "fail"
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        case.notes.append(f"exit {done.returncode}: {tail[0][:200]}")
        return
    case.result = json.loads(lines[-1])
    case.result["wall_seconds"] = time.perf_counter() - start
    case.outcome = "pass"


def judge(cases: list[Case]) -> None:
    """Turn each result into pass/fail and notes, comparing cases of the same run."""
    by_name = {c.name: c for c in cases}
    baseline = by_name["sd15 baseline bf16"].result
    eager = by_name["sd15 full bf16"].result
    for case in cases:
        r = case.result
        if case.outcome != "pass":
            continue
        if case.kind == "sweep":
            judge_sweep(case)
            continue
        if case.kind == "online":
            judge_online(case)
            continue
        if case.kind == "launch":
            if not r["passed"]:
                case.outcome = "fail"
                case.notes += r["problems"]
            else:
                case.notes.append(f"losses {', '.join(f'{x:.3f}' for x in r['losses'])}")
                case.notes.append(f"step-0 loss - log 2 = {r['losses'][0] - LOG2:+.1e}")
                case.notes.append(f"{r['nonfinite_steps']} skipped steps; {r['seconds']:.0f} s")
            continue
        if not r.get("finite", True):
            case.outcome = "fail"
            case.notes.append("non-finite loss")
        if "--randomise_norms" in case.command and r["mode"] == "full":
            gap = abs(r["step0_loss"] - LOG2)
            case.notes.append(f"step-0 loss - log 2 = {r['step0_loss'] - LOG2:+.1e}")
            if gap > STEP0_TOLERANCE:
                case.outcome = "fail"
        if baseline and case.name.startswith("sd15 full"):
            ratio = r["pairs_per_second"] / baseline["pairs_per_second"]
            case.notes.append(f"{ratio:.2f}x baseline pairs/s")
        if case.name.endswith("compile") and eager:
            speedup = r["pairs_per_second"] / eager["pairs_per_second"]
            case.notes.append(f"{speedup:.2f}x eager")
        for prefix, target in (("sdxl full", SDXL_FULL_TARGET_GIB),
                               ("sdxl lora", SDXL_LORA_TARGET_GIB),
                               ("sd35m full", FLOW_TARGET_GIB),
                               ("flux lora", FLOW_TARGET_GIB)):  # fmt: skip
            if case.name.startswith(prefix):
                fits = "fits" if r["peak_memory_gib"] < target else "does NOT fit"
                case.notes.append(f"{fits} in {target} GB")


def pairs_text(count: int) -> str:
    return f"{count} pair{'s' * (count != 1)}"


def judge_sweep(case: Case) -> None:
    """Fails on a non-finite loss or when no point fits; notes the point of least s/pair."""
    points = case.result["sweep"]
    fit = [p for p in points if p["fits"]]
    if not fit:
        case.outcome = "fail"
        case.notes.append("no point fits")
        return
    if not all(p["finite"] for p in fit):
        case.outcome = "fail"
        case.notes.append("non-finite loss")
    best = min(fit, key=lambda p: p["seconds_per_pair"])
    mfu = f", MFU {100 * best['mfu']:.1f}%" if "mfu" in best else ""
    fastest = f"{best['seconds_per_pair']:.3f} s/pair"
    case.notes.append(f"fastest: {pairs_text(best['pairs'])}, {fastest}{mfu}")
    case.notes += [f"{pairs_text(p['pairs'])}: does not fit" for p in points if not p["fits"]]
    case.notes.append("tables below")


def judge_online(case: Case) -> None:
    """Fails when it does not fit, a loss is not finite, the adapters did not move or GRPO's
    ratio at the first update is off 1; notes the speeds and the ratio."""
    r = case.result
    if not r["fits"]:
        case.outcome = "fail"
        case.notes.append(f"out of memory: {r['error'][:120]}")
        return
    if not r["finite"]:
        case.outcome = "fail"
        case.notes.append("non-finite loss")
    if not r["moved"]:
        case.outcome = "fail"
        case.notes.append("the updates left the adapters unchanged")
    case.notes.append(f"{r['images_per_second']:.2f} images/s collecting")
    case.notes.append(f"{r['seconds_per_update']:.2f} s per update")
    ratio = r["ratio_at_first_step"]
    if ratio is not None:
        case.notes.append(f"ratio at first update {ratio:.6f}")
        if not abs(ratio - 1) <= RATIO_TOLERANCE:
            case.outcome = "fail"
            case.notes.append(f"the ratio is off 1 by more than {RATIO_TOLERANCE:g}")
    fits = "fits" if r["peak_memory_gib"] < FLOW_TARGET_GIB else "does NOT fit"
    case.notes.append(f"{fits} in {FLOW_TARGET_GIB} GB")
    case.notes.append("table below")


def online_section(cases: list[Case]) -> list[str]:
    """One row per online case that ran: the collection's speed, the update's, and memory."""
    ran = [c for c in cases if c.kind == "online" and c.result.get("fits")]
    if not ran:
        return []
    lines = ["", "### Online training: collect, then update", "",
             "Collecting: one prompt's images sampled (every sampler step, guidance as the "
             "release), decoded and scored by a stand-in reward. An update: one optimizer step "
             "over its micro-batches, each trained at every trained step. Ratio: recomputed over "
             "stored probability at the first update (GRPO; 1 when sampling and training agree).",
             "", "| case | images | s collecting | images/s | s per update | images x steps per "
             "update | peak GiB collecting | peak GiB updating | ratio at first update |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for case in ran:
        r = case.result
        trained = r["micro_batches_per_update"] * r["micro_batch_images"]
        ratio = r["ratio_at_first_step"]
        lines.append(
            f"| {case.name} | {r['images']} | {r['collect_seconds']:.2f} | "
            f"{r['images_per_second']:.2f} | {r['seconds_per_update']:.2f} | "
            f"{trained} x {r['trained_steps']} | {r['peak_collect_gib']:.2f} | "
            f"{r['peak_update_gib']:.2f} | {'-' if ratio is None else f'{ratio:.6f}'} |"
        )
    return lines


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def sweep_table(case: Case) -> list[str]:
    """One row per point: time per step and per pair, MFU, peak memory, GPU busy share."""
    lines = ["| pairs per GPU | fits | s/step | s/pair | pairs/s | MFU | peak GiB | GPU busy |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in case.result["sweep"]:
        if not p["fits"]:
            lines.append(f"| {p['pairs']} | does not fit | - | - | - | - | - | - |")
            continue
        busy = p.get("breakdown", {}).get("gpu_busy_seconds")
        profiled = p.get("breakdown", {}).get("step_seconds")
        lines.append(
            f"| {p['pairs']} | yes | {p['seconds_per_step']:.4f} | {p['seconds_per_pair']:.4f} | "
            f"{p['pairs_per_second']:.2f} | {percent(p.get('mfu'))} | "
            f"{p['peak_memory_gib']:.2f} | {percent(busy and busy / profiled)} |"
        )
    return lines


def breakdown_table(point: dict) -> list[str]:
    """One row per phase of the point's profiled step: seconds, share, GFLOP, MFU, GPU busy."""
    b = point["breakdown"]
    lines = [
        f"One profiled step: {b['step_seconds']:.4f} s, synchronised at each phase boundary "
        f"(the timed steps, not synchronised: {point['seconds_per_step']:.4f} s).",
        "",
        "| phase | seconds | share | GFLOP | MFU | GPU busy |",
        "|---|---|---|---|---|---|",
    ]
    for row in b["phases"]:
        gflop = "-" if row["flops"] is None else f"{row['flops'] / 1e9:.4g}"
        busy = row["gpu_busy_seconds"]
        busy = None if busy is None or row["seconds"] <= 0 else busy / row["seconds"]
        lines.append(f"| {row['phase']} | {row['seconds']:.4f} | {percent(row['share'])} | "
                     f"{gflop} | {percent(row['mfu'])} | {percent(busy)} |")  # fmt: skip
    return lines


def sweep_section(case: Case, cuda: bool) -> list[str]:
    """The sweep's table and each fitting point's breakdown, with what the columns mean."""
    if case.outcome == "skip" or not case.result.get("sweep"):
        return []
    r = case.result
    where = "this GPU's" if cuda else "this CPU's (not a GPU figure)"
    lines = ["", f"### {case.name}: micro-batch sweep", "",
             f"MFU: FLOPs counted by torch's FlopCounterMode over {where} measured matmul peak "
             f"({r['matmul_peak_flops'] / 1e12:.2f} TFLOP/s, {'bf16' if cuda else r['precision']})."
             " GPU busy: share of the profiled step with a kernel or copy running.", "",
             *sweep_table(case)]  # fmt: skip
    for point in r["sweep"]:
        if point["fits"] and "breakdown" in point:
            title = f"### {case.name}, {pairs_text(point['pairs'])} per step: where the time goes"
            lines += ["", title, "", *breakdown_table(point)]
    return lines


def table(cases: list[Case]) -> list[str]:
    lines = ["| case | result | s/pair | MFU | peak GiB | notes |", "|---|---|---|---|---|---|"]
    for case in cases:
        r = case.result if case.kind in ("bench", "online") else {}
        s_pair = f"{r['seconds_per_pair']:.3f}" if "seconds_per_pair" in r else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        peak = f"{r['peak_memory_gib']:.2f}" if "peak_memory_gib" in r else "-"
        notes = "; ".join(case.notes).replace("|", "/")
        lines.append(f"| {case.name} | {case.outcome} | {s_pair} | {mfu} | {peak} | {notes} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="every case on the tiny model")
    parser.add_argument(
        "--only", nargs="+", default=None, help="run only the cases whose name has one of these"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=math.inf,
        help="seconds for the whole check: cases "
        "that would start later are skipped, and none runs past it",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="file the table goes to")
    parser.add_argument("--json", type=Path, default=None,
                        help="file each run's results are appended to as one JSON line "
                        "(default: --results with the suffix .jsonl)")  # fmt: skip
    parser.add_argument("--sweep", type=int, nargs="+", default=None, metavar="PAIRS",
                        help="pairs per GPU of the sweep case (default: "
                        f"{SWEEP_PAIRS[False]}, with --tiny {SWEEP_PAIRS[True]})")  # fmt: skip
    parser.add_argument("--no_write", action="store_true", help="print only")
    args = parser.parse_args()
    if args.sweep and min(args.sweep) < 1:
        parser.error("--sweep: pairs per GPU must be positive")
    deadline = time.monotonic() + args.budget
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        parser.error("no CUDA device: run with --tiny (every case on the tiny model)")
    # A machine without build/ (a bare GPU box): the shipped toy base carries the CLIP tokenizer.
    if not (REPO / "build" / "clip-tokenizer" / "tokenizer_config.json").is_file():
        os.environ.setdefault("PREFDIFF_TOKENIZER_CACHE", str(REPO / "assets/toy-sd15/tokenizer"))
    cases = plan(args.tiny, cuda, torch.cuda.device_count(), args.sweep)
    for case in cases:
        if args.only and not any(word in case.name for word in args.only):
            case.skip = case.skip or "not selected (--only)"
    # The launcher cases (toy model, seconds of GPU work) run side by side first; the timed
    # cases then run one at a time on an otherwise idle machine.
    launches = [c for c in cases if c.kind == "launch"]
    with ThreadPoolExecutor(max_workers=len(launches)) as pool:
        list(pool.map(lambda case: run(case, deadline), launches))
    for case in cases:
        if case.kind != "launch":
            run(case, deadline)
    for case in cases:
        print(f"{case.name}: {case.outcome} {json.dumps(case.result)} {case.notes}", flush=True)
    judge(cases)
    now, command, host = datetime.datetime.now(datetime.UTC), " ".join(sys.argv[1:]), machine()
    header = [
        f"## Device check {now:%Y-%m-%d %H:%M} UTC",
        "",
        f"- machine: {host}",
        f"- versions: {versions()}",
        f"- command: `python -m bench.device_check {command}`",
        f"- {SCOPE[args.tiny]}; each case in its own process",
        "",
    ]
    sweeps = [line for c in cases if c.kind == "sweep" for line in sweep_section(c, cuda)]
    text = "\n".join(header + table(cases) + sweeps + online_section(cases)) + "\n\n"
    print(text)
    if not args.no_write:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with args.results.open("a") as handle:
            handle.write(text)
        record = {"date": f"{now:%Y-%m-%d %H:%M} UTC", "machine": host,
                  "versions": versions(), "command": f"python -m bench.device_check {command}",
                  "scope": SCOPE[args.tiny],
                  "cases": [{"name": c.name, "kind": c.kind, "outcome": c.outcome,
                             "notes": c.notes, "result": c.result} for c in cases]}  # fmt: skip
        with (args.json or args.results.with_suffix(".jsonl")).open("a") as handle:
            handle.write(json.dumps(record) + "\n")
    failed = [c.name for c in cases if c.outcome == "fail"]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
