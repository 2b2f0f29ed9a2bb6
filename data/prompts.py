"""Prompts for online training: a text file (one prompt per line) or JSONL (``{"prompt": ...}``
plus any metadata a reward reads, e.g. GenEval-style tags), streamed like the pair stream.

The file is read and checked once at start-up (prompt sets are small next to image data). A
JSONL line that is not a JSON object with a non-empty string ``"prompt"`` is skipped, counted
and reported as ``"FILE: line N: why"`` (``PromptTable.bad_lines``); a file with no usable
prompt is a ``DataError``.

``PromptStream`` is infinite and split into roles (``data/roles.py``: one per process and
DataLoader worker). Draw ``i`` of role ``r`` is the stream's global draw ``g = i * num_roles +
r``: epoch ``g // n`` of the ``n`` prompts, position ``g % n`` in that epoch's permutation
(seeded by ``(seed, epoch)``). A role's state is ``[i]``, the next draw, so a resumed stream
continues exactly; ``g`` is unique to one drawing of a prompt in the whole run and names its
group (the trainer's seeds and group ids derive from it).
"""

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset

from data.errors import DataError
from data.roles import check_positions, check_topology, count_roles, current_role

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl",)
JSON_LIST_SUFFIX = ".json"  # one JSON list of prompts (strings or objects)
PROMPT_KEY = "prompt"
Prompt = tuple[str, dict[str, Any]]  # a prompt and its metadata (a JSON record's other keys)


@dataclass
class PromptTable:
    """The usable prompts of a file, with their metadata and 1-based line numbers."""

    source: str
    prompts: list[str]
    metadata: list[dict[str, Any]]  # per prompt: the JSONL object's other keys ({} for text)
    lines: list[int]
    bad_lines: list[str] = field(default_factory=list)  # "FILE: line N: why", one per skip

    def add(self, number: int, kind: str, read: Callable[[Any], Prompt], raw: Any) -> None:
        """The prompt ``read(raw)`` gives for line (``kind``: "line" or "entry") ``number``,
        appended; or, when it raises ValueError, the reason recorded in ``bad_lines``."""
        try:
            prompt, metadata = read(raw)
        except ValueError as exc:
            self.bad_lines.append(f"{self.source}: {kind} {number}: {exc}")
            return
        self.prompts.append(prompt)
        self.metadata.append(metadata)
        self.lines.append(number)


def _text_prompt(line: str) -> Prompt:
    """A plain text line: the whole line is the prompt, without metadata."""
    return line.strip(), {}


def _jsonl_prompt(text: str) -> Prompt:
    """One JSONL line -> (prompt, metadata); ValueError saying what is wrong."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    return _record_prompt(record)


def _record_prompt(record: Any) -> Prompt:
    """A JSON entry -> (prompt, metadata): an object with a "prompt" key (other keys are the
    metadata), or, in a JSON list file, a plain string."""
    if isinstance(record, str):
        record = {PROMPT_KEY: record}
    if not isinstance(record, dict):
        raise ValueError(f"a JSON {type(record).__name__}, not an object")
    if PROMPT_KEY not in record:
        raise ValueError(f'no "{PROMPT_KEY}" key (keys: {sorted(record)[:5]})')
    prompt = record.pop(PROMPT_KEY)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f'"{PROMPT_KEY}" must be a non-empty string, got {prompt!r}')
    return prompt.strip(), record


def load_prompts(path: str | Path) -> PromptTable:
    """Read a prompt file; blank lines are ignored, bad JSONL lines skipped and recorded."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"--prompts {path}: cannot read ({exc})") from None
    table = PromptTable(str(path), [], [], [])
    if path.suffix.lower() == JSON_LIST_SUFFIX:
        return _json_list(path, text, table)
    read = _jsonl_prompt if path.suffix.lower() in JSONL_SUFFIXES else _text_prompt
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            table.add(number, "line", read, line)
    if not table.prompts:
        why = f"; first problem: {table.bad_lines[0]}" if table.bad_lines else ""
        raise DataError(f'{path}: no prompts (one per line, or JSONL with a "prompt" key){why}')
    return table


def _json_list(path: Path, text: str, table: PromptTable) -> PromptTable:
    """A .json file holding one list of prompts (strings or objects, as the shipped suites in
    assets/eval_prompts/); entry N is numbered N in the problems (the "line" of a JSONL)."""
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}"
        raise DataError(f"--prompts {path}: not valid JSON ({exc.msg} at {where})") from None
    if not isinstance(entries, list):
        raise DataError(f"--prompts {path}: a .json prompt file holds a list of prompts")
    for number, entry in enumerate(entries, start=1):
        table.add(number, "entry", _record_prompt, entry)
    if not table.prompts:
        raise DataError(f"{path}: no prompts in its list")
    return table


@dataclass
class PromptBatch:
    """B prompts for one collection micro-batch."""

    prompts: list[str]  # [B]
    metadata: list[dict[str, Any]]  # [B]
    draws: list[int]  # [B] global draw index of each prompt (its group id)
    positions: dict[int, list]  # stream role -> resume state after this batch
    rows: list[tuple[int, ...]]  # [B] (line in the file,)
    skipped: int = 0  # nothing is skipped while streaming (bad lines are dropped at load)


def collate_prompts(examples: list[dict]) -> PromptBatch:
    if not examples:
        raise ValueError("cannot collate an empty list of prompts")
    positions = {}
    for example in examples:  # later examples of a role overwrite earlier ones
        positions[example["role"]] = list(example["state"])
    return PromptBatch(
        prompts=[e["prompt"] for e in examples],
        metadata=[e["metadata"] for e in examples],
        draws=[e["draw"] for e in examples],
        positions=positions,
        rows=[e["row"] for e in examples],
    )


class PromptStream(IterableDataset):
    """Infinite, shuffled-per-epoch, role-split stream of a ``PromptTable``'s prompts."""

    def __init__(
        self,
        table: PromptTable,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle: bool = True,
    ):
        super().__init__()
        check_topology(rank, world_size, num_workers)
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (it seeds numpy generators), got {seed}")
        self.table, self.seed, self.shuffle = table, seed, shuffle
        self.rank, self.num_workers = rank, num_workers
        self.num_roles = count_roles(world_size, num_workers)
        self._positions: dict[int, list] = {}
        self._role_offset = 0

    @property
    def num_prompts(self) -> int:
        return len(self.table.prompts)

    def resume_from(self, positions: dict[int, list], role_offset: int = 0) -> None:
        """Continue each role right after its saved state ``[i]``; call before iterating."""
        self._positions = check_positions(positions, self.num_roles, 1)
        self._role_offset = role_offset

    def __iter__(self) -> Iterator[dict]:
        return self.iter_role(current_role(self.rank, self.num_workers, self._role_offset))

    def order(self, epoch: int) -> np.ndarray:
        """The prompt indices of one epoch, in drawing order."""
        if not self.shuffle:
            return np.arange(self.num_prompts)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_prompts)

    def iter_role(self, role: int) -> Iterator[dict]:
        if not 0 <= role < self.num_roles:
            raise ValueError(f"role must be in [0, {self.num_roles}), got {role}")
        (draw,) = self._positions.get(role, [0])
        epoch, order = -1, np.empty(0, dtype=np.int64)
        while True:
            g = draw * self.num_roles + role
            if g // self.num_prompts != epoch:
                epoch = g // self.num_prompts
                order = self.order(epoch)
            index = int(order[g % self.num_prompts])
            draw += 1
            yield {
                "prompt": self.table.prompts[index],
                "metadata": dict(self.table.metadata[index]),
                "draw": g,
                "role": role,
                "state": [draw],
                "row": (self.table.lines[index],),
            }


def report_bad_lines(table: PromptTable, shown: int = 10) -> None:
    """One warning line per skipped line (the first ``shown``), then their count."""
    for message in table.bad_lines[:shown]:
        logger.warning("skipped %s", message)
    if table.bad_lines:
        logger.warning(
            "%s: skipped %d bad line(s) of %d prompts read",
            table.source,
            len(table.bad_lines),
            len(table.prompts) + len(table.bad_lines),
        )
