"""Where one training step's time goes: the step's phases, recorded, and the breakdown table.

The benchmark's step (``bench.case``) marks its phases with ``phases.start(name)``; each start
ends the phase before it, so the phases tile the step and their times add up to the step's.
Recorders:

- ``Phases``: records nothing (the timed steps run with it);
- ``ProfiledPhases``: one torch.profiler ``record_function`` range per phase, the accelerator
  synchronised at every boundary, so a range lasts as long as its phase's GPU work (not as long
  as launching it) and no phase's kernels spill into the next;
- ``FlopPhases``: the FLOPs of each phase, read from a running ``FlopCounterMode``.

``profile_step`` runs one step under the profiler; ``breakdown`` turns its events into seconds,
share of the step, FLOPs, MFU and GPU-busy seconds per phase.
"""

import time
from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile, record_function, schedule
from torch.utils.flop_counter import FlopCounterMode

# The step's phases in the order it runs them (bench.case's ``our_step``).
PHASES = (
    "data",  # the batch to the device, the text conditioning
    "latents and noise",  # latents from the cached moments, noise and timestep draws
    "policy forward",
    "reference forward",
    "errors and loss",  # per-sample errors, the loss and its metrics (host syncs)
    "policy backward",
    "grad clip",
    "optimizer step",  # step and zero_grad (fp16: the grad scaler's step and update)
    "logging",  # the step's loss to the host, as the trainer logs it every step
)
UNATTRIBUTED = "unattributed"  # the step's time outside every phase's range

Span = tuple[float, float]  # (start, end), microseconds on the profiler's clock


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Phases:
    """Marks nothing: what the timed steps run with."""

    def start(self, name: str) -> None:
        """End the current phase (if any) and begin ``name``."""

    def stop(self) -> None:
        """End the current phase (if any)."""


class ProfiledPhases(Phases):
    def __init__(self, device: torch.device):
        self.device = device
        self._range: record_function | None = None

    def start(self, name: str) -> None:
        self.stop()
        self._range = record_function(name)
        self._range.__enter__()

    def stop(self) -> None:
        if self._range is not None:
            sync(self.device)  # the range ends when its kernels have run, not when launched
            self._range.__exit__(None, None, None)
            self._range = None


class FlopPhases(Phases):
    """FLOPs per phase: the counter's running total read at each boundary."""

    def __init__(self, counter: FlopCounterMode):
        self.counter = counter
        self.flops: dict[str, int] = {}
        self._name: str | None = None
        self._mark = 0

    def start(self, name: str) -> None:
        self.stop()
        self._name = name

    def stop(self) -> None:
        total = self.counter.get_total_flops()
        if self._name is not None:
            self.flops[self._name] = self.flops.get(self._name, 0) + total - self._mark
        self._mark, self._name = total, None


def profile_step(
    step: Callable[[Phases], object], device: torch.device
) -> tuple[list[FunctionEvent], float]:
    """Two steps under torch.profiler, the first only warming it up (its events are dropped)
    -> (the second step's events, that step's wall seconds, synchronised at both ends)."""
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    phases = ProfiledPhases(device)
    seconds = 0.0
    # repeat=1: one cycle, so the events stay readable after it (cycles clear them).
    once = schedule(wait=0, warmup=1, active=1, repeat=1)
    with profile(activities=activities, schedule=once) as prof:
        for _ in range(2):
            sync(device)
            start = time.perf_counter()
            try:
                step(phases)
            finally:
                phases.stop()
            seconds = time.perf_counter() - start
            prof.step()
    return list(prof.events()), seconds


def busy_seconds(window: Span, spans: list[Span]) -> float:
    """Seconds of ``window`` covered by at least one of ``spans`` (kernels on several streams
    overlap: each instant counts once)."""
    lo, hi = window
    clipped = sorted((max(a, lo), min(b, hi)) for a, b in spans if b > lo and a < hi)
    busy, end = 0.0, lo
    for a, b in clipped:
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy / 1e6


def phase_rows(
    windows: list[tuple[str, Span]],
    step_seconds: float,
    flops: dict[str, int] | None = None,
    peak_flops: float | None = None,
    device_spans: list[Span] | None = None,
) -> list[dict]:
    """Phase windows (a phase may occur more than once) -> one row per phase in step order:
    seconds, share of ``step_seconds``, FLOPs and MFU (with ``flops``), seconds the device was
    busy (with ``device_spans``), then an ``unattributed`` row so the shares sum to 1."""
    rows = []
    for name in [n for n in PHASES if any(w[0] == n for w in windows)]:
        own = [span for phase, span in windows if phase == name]
        seconds = sum(b - a for a, b in own) / 1e6
        row = {"phase": name, "seconds": seconds, "share": seconds / step_seconds,
               "flops": None, "mfu": None, "gpu_busy_seconds": None}  # fmt: skip
        if flops is not None:
            row["flops"] = flops.get(name, 0)
            if peak_flops and seconds > 0 and row["flops"]:
                row["mfu"] = row["flops"] / seconds / peak_flops
        if device_spans is not None:
            row["gpu_busy_seconds"] = sum(busy_seconds(span, device_spans) for span in own)
        rows.append(row)
    rest = step_seconds - sum(row["seconds"] for row in rows)
    rows.append({"phase": UNATTRIBUTED, "seconds": rest, "share": rest / step_seconds,
                 "flops": None, "mfu": None, "gpu_busy_seconds": None})  # fmt: skip
    return rows


def breakdown(
    events: list[FunctionEvent],
    step_seconds: float,
    device: torch.device,
    flops: dict[str, int] | None = None,
    peak_flops: float | None = None,
) -> dict:
    """A profiled step's events -> the step's seconds, the phases' rows (``phase_rows``) and,
    on a GPU, the seconds it was busy over the whole step."""
    windows = [(e.name, (e.time_range.start, e.time_range.end)) for e in events
               if e.device_type == DeviceType.CPU and e.name in PHASES]  # fmt: skip
    device_spans = None
    if device.type == "cuda":
        # Kernels, copies and memsets; the GPU-side copies of the ranges are annotations.
        device_spans = [(e.time_range.start, e.time_range.end) for e in events
                        if e.device_type != DeviceType.CPU and e.name not in PHASES
                        and not e.name.startswith("ProfilerStep")]  # fmt: skip
    rows = phase_rows(windows, step_seconds, flops, peak_flops, device_spans)
    result = {"step_seconds": step_seconds, "phases": rows, "gpu_busy_seconds": None}
    if device_spans is not None and windows:
        whole = (min(s[0] for _, s in windows), max(s[1] for _, s in windows))
        result["gpu_busy_seconds"] = busy_seconds(whole, device_spans)
    return result
