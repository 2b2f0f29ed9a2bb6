"""Published reference rows: they load with their source and harness, are marked not measured,
and appear in the summary under the measured means."""

import re

import pandas as pd

import evaluate
from evaluation.references import (
    METRIC_REFERENCES,
    METRIC_SCORERS,
    REFERENCES,
    metric_reference_markdown,
    metric_references_for,
)
from evaluation.suites import SUITES

COMMIT_URL = re.compile(r"^https://github\.com/[\w.-]+/[\w.-]+/blob/[0-9a-f]{40}/")


def test_every_reference_row_names_its_source_and_is_not_measured():
    for ref in [*REFERENCES, *METRIC_REFERENCES]:
        assert ref.measured is False
        assert ref.suite in SUITES and COMMIT_URL.match(ref.source), ref
        assert ref.harness
    rows = {r.model: r.values for r in metric_references_for("pickapic_v2")}
    assert list(rows) == ["SD 1.5", "Diffusion-DPO (SD 1.5)", "Diffusion-KTO (SD 1.5)"]
    # Spot checks against the source table (Semi-DPO README at cd478e0).
    assert rows["SD 1.5"]["PickScore"] == 20.566 and rows["SD 1.5"]["MPS"] == 9.635
    assert rows["Diffusion-DPO (SD 1.5)"]["HPSv2.1"] == 0.261
    assert rows["Diffusion-KTO (SD 1.5)"]["ImageReward"] == 0.629
    assert all(set(v) == set(METRIC_SCORERS) for v in rows.values())
    assert "not stated" in metric_references_for("pickapic_v2")[0].harness.lower()
    assert metric_references_for("partiprompts") == []


def test_published_rows_sit_under_the_measured_means():
    text = metric_reference_markdown("pickapic_v2", {"mine": {"pickscore": 21.25, "x": 1.0}})
    header = "| model | ImageReward | HPSv2.1 | PickScore | Aesthetic | CLIP | MPS |"
    assert text.count(header) == 1
    assert "| mine | – | – | 21.25 | – | – | – | yes | this run |" in text
    assert "| Diffusion-KTO (SD 1.5) | 0.629 | 0.281 | 21.064 | 5.659 | 0.281 | 10.226 | " \
        "**no: published** |" in text  # fmt: skip
    assert "NOT measured here" in text and "cd478e0ea8c8854d96914261aff2ba0e0da70105" in text
    assert metric_reference_markdown("partiprompts", {"mine": {}}) == ""
    scores = pd.DataFrame({"model": ["a", "a", "b"], "pickscore": [20.0, 21.0, 19.5],
                           "style": ["", "", ""]})  # fmt: skip
    text = evaluate.reference_markdown("pickapic_v2", scores, ["pickscore"])
    assert "| a | – | – | 20.5 |" in text and "| b | – | – | 19.5 |" in text


def test_the_pickapic_suite_summary_shows_the_reference_rows(tiny_sd15_dir, tmp_path):
    out = tmp_path / "eval"
    evaluate.main(["--suite", "pickapic_v2", "--limit", "1", "--model", str(tiny_sd15_dir),
                   "--generate", "base", "--num_seeds", "1", "--steps", "2", "--resolution",
                   "64", "--scorer", "toy_warm", "--out", str(out), "--device", "cpu"])  # fmt: skip
    text = (out / "summary.md").read_text()
    assert "| base | – | – | – | – | – | – | yes | this run |" in text
    assert "| SD 1.5 | 0.085 | 0.25 | 20.566 | 5.421 | 0.273 | 9.635 | **no: published** |" in text
