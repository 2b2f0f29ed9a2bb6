"""Published figures shown beside measured ones, marked as not measured here.

Only figures read in their source are listed, with the source (URL and commit), the table and
the harness that produced them as far as the source states it (what it does not state is
written as not stated). Other harnesses (sampler, steps, seeds, scorer version) give other
numbers, so these rows are context, not a like-for-like comparison. Two kinds of rows:
``Reference``, a per-style table (the HPS v2 benchmark), and ``MetricReference``, one figure per
scorer for a whole suite.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

HPSV2_README = (
    "https://github.com/tgxs002/HPSv2/blob/067feeeed1467900b1677ef2dcde03442af62fe6/README.md"
)
HPSV2_HARNESS = (
    "HPS v2 repository's benchmark (`hpsv2.evaluate_benchmark`): HPS v2 (not v2.1) on the "
    "authors' own generations of each model, 800 prompts per style"
)


@dataclass(frozen=True)
class Reference:
    suite: str
    model: str
    scorer: str  # our scorer name whose scale the figures are on (see ``scale``)
    scale: float  # the published figure = scale x our scorer's mean
    by_style: dict[str, float]
    average: float
    source: str
    harness: str
    measured: bool = False  # published, never measured here


HPS_STYLES = ("anime", "concept-art", "paintings", "photo")
# The README's benchmark table (columns Animation, Concept-art, Painting, Photo, Averaged).
HPSV2_TABLE = {
    "Stable Diffusion v1.4": ((27.26, 26.61, 26.66, 27.27), 26.95),
    "Stable Diffusion v2.0": ((27.48, 26.89, 26.86, 27.46), 27.17),
    "SDXL Base 0.9": ((28.42, 27.63, 27.60, 27.29), 27.73),
}
REFERENCES = [
    Reference(
        suite="hpsv2",
        model=model,
        scorer="hpsv2",
        scale=100.0,
        by_style=dict(zip(HPS_STYLES, values, strict=True)),
        average=average,
        source=HPSV2_README,
        harness=HPSV2_HARNESS,
    )
    for model, (values, average) in HPSV2_TABLE.items()
]


def references_for(suite: str) -> list[Reference]:
    return [r for r in REFERENCES if r.suite == suite]


@dataclass(frozen=True)
class MetricReference:
    """A model's published mean per scorer on one suite; columns as the source names them."""

    suite: str
    model: str
    values: dict[str, float]  # source column -> published figure
    source: str
    table: str
    harness: str
    measured: bool = False  # published, never measured here


# Source column -> our scorer whose mean is on the same scale, where the source names the same
# model (None: no registered equivalent, or the source does not say which model it is).
METRIC_SCORERS: dict[str, str | None] = {
    "ImageReward": "imagereward",
    "HPSv2.1": "hpsv2",  # with the v2.1 weights (the protocol records the weights' digest)
    "PickScore": "pickscore",
    "Aesthetic": "aesthetic",  # the LAION improved aesthetic predictor; head not stated
    "CLIP": None,  # the source does not say which CLIP model or scale
    "MPS": None,  # not a registered scorer
}

SEMI_DPO_README = (
    "https://github.com/L-CodingSpace/Semi-DPO/blob/cd478e0ea8c8854d96914261aff2ba0e0da70105/"
    "README.md"
)
SEMI_DPO_TABLE = (
    "the README's Results table, given there as Table 1 of Liu et al., 'Learning from Noisy "
    "Preferences: A Semi-Supervised Learning Approach to Direct Preference Optimization', ICLR "
    "2026 (arXiv 2604.24952); its Semi-DPO row is not copied"
)
SEMI_DPO_HARNESS = (
    "Semi-DPO authors' evaluation of SD 1.5 and of SD 1.5 trained on Pick-a-Pic v2 with "
    "Diffusion-DPO and Diffusion-KTO, on the Pick-a-Pic v2 test prompts; scorers ImageReward, "
    "HPS v2.1, PickScore, LAION aesthetic, CLIP, MPS. Not stated in the README: which DPO and KTO "
    "checkpoints, sampler, steps, guidance, seeds, images per prompt, CLIP model. The "
    "repository's scripts/4_evaluate.sh (commit b626a9e) uses the test_unique split (this suite "
    "is that split deduplicated), 50 steps, seed 42 for every prompt, one image per prompt and "
    "semi_dpo/evaluate.py's guidance default (the pipeline's own); the README does not say that "
    "Table 1 was made with it"
)
_SEMI_DPO_COLUMNS = ("ImageReward", "HPSv2.1", "PickScore", "Aesthetic", "CLIP", "MPS")
# Copied from the README named above (commit cd478e0), row by row.
_SEMI_DPO_ROWS = {
    "SD 1.5": (0.085, 0.250, 20.566, 5.421, 0.273, 9.635),
    "Diffusion-DPO (SD 1.5)": (0.297, 0.261, 20.948, 5.549, 0.279, 10.144),
    "Diffusion-KTO (SD 1.5)": (0.629, 0.281, 21.064, 5.659, 0.281, 10.226),
}
METRIC_REFERENCES = [
    MetricReference(
        suite="pickapic_v2",
        model=model,
        values=dict(zip(_SEMI_DPO_COLUMNS, values, strict=True)),
        source=SEMI_DPO_README,
        table=SEMI_DPO_TABLE,
        harness=SEMI_DPO_HARNESS,
    )
    for model, values in _SEMI_DPO_ROWS.items()
]


def metric_references_for(suite: str) -> list[MetricReference]:
    return [r for r in METRIC_REFERENCES if r.suite == suite]


def metric_reference_markdown(suite: str, measured: Mapping[str, Mapping[str, float]]) -> str:
    """The suite's published rows under the measured ones (``measured``: model -> scorer ->
    mean), a column per source column; a measured cell only where ``METRIC_SCORERS`` names a
    scorer that was run. Empty when the suite has no such rows."""
    refs = metric_references_for(suite)
    if not refs:
        return ""
    columns = list(refs[0].values)
    lines = [
        "| model | " + " | ".join(columns) + " | measured here | source |",
        "|---" * (len(columns) + 3) + "|",
    ]
    for model, means in measured.items():
        cells = [means.get(METRIC_SCORERS.get(c) or "", float("nan")) for c in columns]
        shown = " | ".join("–" if c != c else f"{c:.4g}" for c in cells)  # NaN: not run
        lines.append(f"| {model} | {shown} | yes | this run |")
    for ref in refs:
        shown = " | ".join(f"{ref.values[c]:g}" for c in columns)
        lines.append(f"| {ref.model} | {shown} | **no: published** | [source]({ref.source}) |")
    sources = sorted({f"{r.table} ({r.source}); harness: {r.harness}" for r in refs})
    return (
        "Published figures beside this run's means (same scale where a column has a scorer: "
        + ", ".join(f"{c} = `{s}`" for c, s in METRIC_SCORERS.items() if s and c in columns)
        + "):\n\n"
        + "\n".join(lines)
        + "\n\nPublished rows are NOT measured here: "
        + "; ".join(sources)
        + ".\n"
    )
