"""data/prompts.py: prompt files (text and JSONL), bad lines skipped and reported by file and
line, the role-split stream (disjoint, every prompt once per epoch, exactly resumable, also
through DataLoader workers), and the online flags' start-up checks."""

import itertools
import json
import logging
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from common.cli import UsageError
from data.errors import DataError
from data.prompts import PromptStream, collate_prompts, load_prompts, report_bad_lines
from training.config import parse_config


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_text_file_one_prompt_per_line(tmp_path):
    table = load_prompts(write(tmp_path / "p.txt", ["  a red circle ", "", "a blue square"]))
    assert table.prompts == ["a red circle", "a blue square"]
    assert table.lines == [1, 3] and table.metadata == [{}, {}] and table.bad_lines == []


def test_jsonl_keeps_metadata_and_reports_every_bad_line(tmp_path, caplog):
    path = write(tmp_path / "p.jsonl", [
        json.dumps({"prompt": "a red circle", "tag": "colour", "include": ["red"]}),
        "{not json",
        json.dumps(["a list"]),
        json.dumps({"caption": "no prompt key"}),
        "",
        json.dumps({"prompt": "  "}),
        json.dumps({"prompt": "a blue square"}),
    ])  # fmt: skip
    table = load_prompts(path)
    assert table.prompts == ["a red circle", "a blue square"] and table.lines == [1, 7]
    assert table.metadata == [{"tag": "colour", "include": ["red"]}, {}]
    assert [m.split(":")[1].strip() for m in table.bad_lines] == [
        "line 2", "line 3", "line 4", "line 6"
    ]  # fmt: skip
    assert table.bad_lines[0].startswith(f"{path}: line 2: not valid JSON")
    assert "a JSON list, not an object" in table.bad_lines[1]
    assert table.bad_lines[2].endswith("""no "prompt" key (keys: ['caption'])""")
    assert all("\n" not in m for m in table.bad_lines)
    with caplog.at_level(logging.WARNING, logger="data.prompts"):
        report_bad_lines(table)
    assert f"skipped {path}: line 4" in caplog.text
    assert "skipped 4 bad line(s) of 6 prompts read" in caplog.text


def test_a_json_list_of_prompts_reads_like_the_shipped_suites(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(["a red circle", {"prompt": "a blue square", "tag": "x"}, 3]))
    table = load_prompts(path)
    assert table.prompts == ["a red circle", "a blue square"] and table.lines == [1, 2]
    assert table.metadata == [{}, {"tag": "x"}]
    assert table.bad_lines == [f"{path}: entry 3: a JSON int, not an object"]
    (tmp_path / "d.json").write_text(json.dumps({"prompt": "not a list"}))
    with pytest.raises(DataError, match="holds a list of prompts"):
        load_prompts(tmp_path / "d.json")
    assert len(load_prompts("assets/eval_prompts/partiprompts.json").prompts) == 1632


def test_a_file_without_prompts_is_a_data_error_naming_it(tmp_path):
    path = write(tmp_path / "p.jsonl", [json.dumps({"text": "x"})])
    with pytest.raises(DataError, match=rf"{path}: no prompts .*line 1: no \"prompt\" key"):
        load_prompts(path)
    with pytest.raises(DataError, match="cannot read"):
        load_prompts(tmp_path / "missing.txt")


@pytest.fixture
def table(tmp_path):
    return load_prompts(write(tmp_path / "p.txt", [f"prompt {i}" for i in range(5)]))


def test_roles_split_each_epoch_and_resume_exactly(table):
    stream = PromptStream(table, seed=3, rank=0, world_size=2)
    first = [list(itertools.islice(stream.iter_role(r), 5)) for r in range(2)]
    draws = sorted(e["draw"] for role in first for e in role)
    assert draws == list(range(10))  # global draws g = i * roles + role, each once
    by_draw = {e["draw"]: e["prompt"] for role in first for e in role}
    for epoch in range(2):  # every prompt once per epoch, in a seeded order
        shown = [by_draw[g] for g in range(5 * epoch, 5 * epoch + 5)]
        assert sorted(shown) == table.prompts
    assert [by_draw[g] for g in range(5)] != [by_draw[g] for g in range(5, 10)]
    resumed = PromptStream(table, seed=3, rank=0, world_size=2)
    resumed.resume_from({"1": first[1][1]["state"]})  # JSON turns keys into str
    assert list(itertools.islice(resumed.iter_role(1), 3)) == first[1][2:]


def test_dataloader_workers_alternate_roles_and_resume(table):
    def batches(stream, n):
        loader = DataLoader(stream, batch_size=2, num_workers=2, collate_fn=collate_prompts)
        return list(itertools.islice(iter(loader), n))

    reference = batches(PromptStream(table, num_workers=2), 5)
    assert [sorted(b.positions) for b in reference] == [[0], [1], [0], [1], [0]]
    positions: dict = {}
    for batch in reference[:3]:
        positions.update(batch.positions)
    resumed = PromptStream(table, num_workers=2)
    resumed.resume_from(positions, role_offset=3 % 2)
    again = batches(resumed, 2)
    assert [b.draws for b in again] == [b.draws for b in reference[3:]]
    assert [b.prompts for b in again] == [b.prompts for b in reference[3:]]


@pytest.mark.parametrize(
    "extra,message",
    [
        ((), "--loss grpo samples from prompts: give --prompts FILE"),
        (("--prompts", "PROMPTS"), "--loss grpo needs --reward NAME[=PATH]"),
        (("--prompts", "PROMPTS", "--reward", "toy_warm", "--csv", "x.csv", "--images", "."),
         "--loss grpo samples its own images: drop --csv"),
        (("--prompts", "PROMPTS", "--reward", "toy_warm", "--collect_batches", "3",
          "--gradient_accumulation_steps", "2"), "must be a positive multiple of"),
        (("--prompts", "PROMPTS", "--reward", "toy_warm", "--sde_window_size", "3",
          "--sde_window_range", "0,2"), "--sde_window_range 0,2: need 0 <= LO < HI"),
        (("--prompts", "PROMPTS", "--reward", "toy_warm", "--group_size", "1"),
         "--group_size must be >= 2"),
    ],
)  # fmt: skip
def test_online_flag_mistakes_stop_at_start_up(extra, message, table):
    args = ["--loss", "grpo", *(table.source if a == "PROMPTS" else a for a in extra)]
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(args)


def test_prompts_are_for_online_losses_only(table):
    with pytest.raises(UsageError, match=r"--prompts is for the online losses \(grpo, nft\)"):
        parse_config(["--loss", "dpo", "--prompts", table.source])
    config = parse_config(["--loss", "nft", "--prompts", table.source, "--reward", "toy_warm"])
    assert config.kl_coef == 1e-4  # nft's released KL weight, resolved at start-up
    assert parse_config(["--loss", "grpo", "--prompts", table.source, "--reward", "toy_warm",
                         "--kl_coef", "0"]).kl_coef == 0.0  # fmt: skip
