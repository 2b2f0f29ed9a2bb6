"""Published figures shown beside measured ones, marked as not measured here.

Only figures read in their source are listed, with the source (URL and commit) and the harness
that produced them. Other harnesses (sampler, steps, seeds, scorer version) give other numbers,
so these rows are context, not a like-for-like comparison.
"""

from __future__ import annotations

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
