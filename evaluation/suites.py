"""The standard prompt suites and the sampling protocols that papers evaluate with.

Papers on these sets differ in sampler, steps, guidance, seeds, resolution and scorer versions,
which moves the numbers more than the methods differ; ``evaluate.py --suite NAME --protocol P``
uses one written-down choice for each and records every one of them in its summary.

The prompt files (``assets/eval_prompts/``, lists of strings in the source's order, see its
README for provenance and licences) are checked against their known sizes when loaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

SUITE_DIR = Path(__file__).resolve().parent.parent / "assets" / "eval_prompts"


@dataclass(frozen=True)
class Suite:
    name: str
    file: str  # in SUITE_DIR
    count: int  # prompts in the file
    styles: tuple[str, ...] = ()  # equal consecutive blocks, in file order (HPS v2)
    source: str = ""

    @property
    def path(self) -> Path:
        return SUITE_DIR / self.file


SUITES = {
    s.name: s
    for s in (
        Suite(
            "pickapic_v2",
            "pickapic_v2_test_unique_dedup.json",
            487,
            source="Pick-a-Pic v2 test_unique captions, deduplicated",
        ),
        Suite(
            "hpsv2",
            "hpsv2_benchmark.json",
            3200,
            styles=("anime", "concept-art", "paintings", "photo"),
            source="HPS v2 benchmark prompts (HPD v2), 800 per style",
        ),
        Suite("partiprompts", "partiprompts.json", 1632, source="PartiPrompts (P2)"),
    )
}


def read_prompts(path: str | Path) -> list[str]:
    """A prompt file: one prompt per non-empty line."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line expected)")
    return prompts


@dataclass(frozen=True)
class SuitePrompts:
    suite: str
    prompts: list[str]
    styles: list[str]  # one per prompt ("" when the suite has no styles)
    sha256: str  # of the prompt file, so a summary names exactly which list it used
    limit: int | None


def load_suite(name: str, limit: int | None = None) -> SuitePrompts:
    """The suite's prompts in file order; ``limit`` keeps the first N of each style (of the
    whole list for suites without styles), so a short run still covers every style."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; choose from {sorted(SUITES)}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    suite = SUITES[name]
    raw = suite.path.read_bytes()
    prompts = json.loads(raw)
    if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"{suite.path}: expected a JSON list of non-empty prompt strings")
    if len(prompts) != suite.count:
        raise ValueError(f"{suite.path}: {len(prompts)} prompts, expected {suite.count}")
    styles = [""] * len(prompts)
    if suite.styles:
        block = suite.count // len(suite.styles)
        styles = [suite.styles[i // block] for i in range(len(prompts))]
    keep, seen = [], dict.fromkeys(suite.styles or ("",), 0)
    for i, style in enumerate(styles):
        seen[style] += 1
        if limit is None or seen[style] <= limit:
            keep.append(i)
    return SuitePrompts(
        name,
        [prompts[i] for i in keep],
        [styles[i] for i in keep],
        hashlib.sha256(raw).hexdigest(),
        limit,
    )


@dataclass(frozen=True)
class Protocol:
    """How images are sampled for scoring; every field goes into the summary."""

    name: str
    scheduler: str
    steps: int
    guidance_scale: float
    resolution: int | None  # None: the model's native size
    images_per_prompt: int
    distinct_seeds: bool  # prompt i's seeds shifted past prompt i-1's (generate.py)
    dtype: str
    note: str


# The toy base samples its cleanest shapes with moderate guidance (docs/evaluation.md, "Prompt
# suites and protocols": shape agreement peaks near 3 and falls at 7.5), so the toy protocol, its
# preference data and its benchmark all sample at this scale.
TOY_GUIDANCE = 3.0

# The usual protocol of the papers that report on these suites: SD1.5 at 512 px and SDXL at
# 1024 px, 50 steps, guidance 7.5 (SDXL 5), fixed seeds. DDIM is our choice of sampler (the
# papers differ); every image gets its own seed (prompt i, image j: seed i * k + j).
PROTOCOLS = {
    p.name: p
    for p in (
        Protocol("toy", "ddim", 20, TOY_GUIDANCE, None, 8, False, "fp32", "the toy task (CPU)"),
        Protocol("sd15", "ddim", 50, 7.5, 512, 1, True, "fp16", "SD1.5 at 512 px"),
        Protocol("sdxl", "ddim", 50, 5.0, 1024, 1, True, "fp16", "SDXL at 1024 px"),
        # The diffusers pipelines' own defaults (StableDiffusion3Pipeline, FluxPipeline: 28
        # steps, guidance 7.0 and 3.5), with their flow sampler.
        Protocol("sd3", "flow_euler", 28, 7.0, 1024, 1, True, "bf16", "SD3 / SD3.5 at 1024 px"),
        Protocol("flux", "flow_euler", 28, 3.5, 1024, 1, True, "bf16", "Flux.1 at 1024 px"),
    )
}
