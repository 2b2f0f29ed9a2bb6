"""The toy builder's pairing (scripts/build_toy_prefs.preference_pairs) on hand-made image lists."""

from __future__ import annotations

from scripts.build_toy_prefs import preference_pairs


def image(name: str, reward: float, shape_ok: bool, caption: str = "a red circle") -> dict:
    return {"caption": caption, "jpeg": name.encode(), "uid": name, "reward": reward,
            "shape_ok": shape_ok}  # fmt: skip


# One prompt: right colour drawn as a blob more often than wrong colour, as on the toy base.
IMAGES = [
    image("good-shape", 1.0, True),
    image("good-blob-1", 1.0, False),
    image("good-blob-2", 1.0, False),
    image("bad-shape-1", 0.0, True),
    image("bad-shape-2", 0.0, True),
    image("bad-shape-3", 0.0, True),
    image("bad-blob", 0.0, False),
]
BY_NAME = {i["jpeg"]: i for i in IMAGES}


def winner_loser(row: dict) -> tuple[dict, dict]:
    a, b = BY_NAME[row["jpg_0"]], BY_NAME[row["jpg_1"]]
    return (a, b) if row["label_0"] == 1.0 else (b, a)


def test_matched_pairs_agree_on_shape_and_fill_every_stratum():
    rows = preference_pairs(IMAGES, pairs_per_prompt=8, seed=0)
    pairs = [winner_loser(r) for r in rows]
    # Blobs: max(2 good, 1 bad) = 2 pairs; shapes: max(1 good, 3 bad) = 3 pairs.
    assert len(pairs) == 5
    assert all(w["reward"] == 1.0 and lose["reward"] == 0.0 for w, lose in pairs)
    assert all(w["shape_ok"] == lose["shape_ok"] for w, lose in pairs)
    assert sum(w["shape_ok"] for w, _ in pairs) == 3
    # Every image of the prompt is used.
    assert {x["uid"] for pair in pairs for x in pair} == {i["uid"] for i in IMAGES}


def test_the_cap_takes_strata_in_turn():
    rows = preference_pairs(IMAGES, pairs_per_prompt=3, seed=0)
    pairs = [winner_loser(r) for r in rows]
    assert sorted(w["shape_ok"] for w, _ in pairs) == [False, False, True]


def test_unmatched_pairs_mix_shapes():
    rows = preference_pairs(IMAGES, pairs_per_prompt=8, seed=0, match_shape=False)
    pairs = [winner_loser(r) for r in rows]
    assert len(pairs) == 4  # max(3 good, 4 bad)
    assert any(w["shape_ok"] != lose["shape_ok"] for w, lose in pairs)


def test_a_stratum_without_a_rewarded_image_gives_no_pairs():
    images = [image("good-blob", 1.0, False), image("bad-shape", 0.0, True)]
    assert preference_pairs(images, pairs_per_prompt=8, seed=0) == []
    assert len(preference_pairs(images, pairs_per_prompt=8, seed=0, match_shape=False)) == 1


def test_the_shell_scripts_rebuild_at_the_current_data_version():
    """setup.sh and the example grep stats.json for the builder's version: bumps reach both."""
    from pathlib import Path

    from scripts.build_toy_prefs import DATA_VERSION

    repo = Path(__file__).resolve().parents[1]
    for script in ("scripts/setup.sh", "exps/example.sh"):
        assert f'"version": {DATA_VERSION},' in (repo / script).read_text(), script
