"""The docs cannot drift from the code: every relative link in README.md and docs/*.md resolves
(the file, and the heading when a link names one), every flag they name exists, and the README
stays short enough to read.

Flags are checked per command where a command line says which one it is (a code block line
running ``train.py``, ``generate.py``, ``evaluate.py``, ``python -m package.module`` or a script
of ``scripts/`` or ``bench/``): the flags after the command must be that command's. Every other
``--flag`` token (prose, comments, commands of other tools) must be some parser's flag: the
union of ``train.py``'s (built from the config, loss options included), every ``add_argument``
in the project's source, and ``accelerate launch``'s. The union still catches typos and removed
flags; the per-command check also catches a flag shown with the wrong command.
"""

from __future__ import annotations

import ast
import re
import shlex
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".venv", "build", "outputs", ".git", "tests"}
README_MAX_LINES = 300
# Flags of tools outside this project that the docs show, each with its tool.
EXTERNAL_FLAGS = {
    "--dev": "scripts/setup.sh",
    "--collect-only": "pytest",
    "--logdir": "tensorboard",
}
# Flags that exist only in a worked example of the docs, each with its page.
EXAMPLE_FLAGS = {"--hinge_margin": "docs/adding-a-loss.md (a loss option added in a diff)"}

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FLAG = re.compile(r"(?<![\w-])(--[A-Za-z][\w-]*)")
FENCE = re.compile(r"^\s*(```|~~~)")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def split_blocks(text: str) -> tuple[str, list[str]]:
    """(the prose with fenced code blocks blanked, the code blocks' lines)."""
    prose, code, inside = [], [], False
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
            prose.append("")
        elif inside:
            code.append(line)
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), code


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor, duplicates numbered as GitHub numbers them."""
    prose, _ = split_blocks(text)
    seen: dict[str, int] = {}
    found = set()
    for line in prose.splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(path: Path, text: str) -> list[str]:
    """Relative links of ``text`` (a file at ``path``) whose file or heading does not exist."""
    prose, _ = split_blocks(text)
    prose = re.sub(r"`[^`\n]*`", "", prose)  # code spans are not links
    broken = []
    for target in LINK.findall(prose):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        if not file_part:  # a heading of this page
            if anchor not in anchors(text):
                broken.append(f"{path.name}: {target} (no such heading)")
            continue
        resolved = (path.parent / file_part).resolve()
        if not resolved.exists():
            broken.append(f"{path.name}: {target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text()):
            broken.append(f"{path.name}: {target} (no such heading)")
    return broken


@cache
def source_flags() -> dict[str, frozenset[str]]:
    """Module file (relative path) -> the ``--flags`` its ``add_argument`` calls declare."""
    found = {}
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in SKIP:
            continue
        flags = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                flags |= {
                    a.value
                    for a in node.args
                    if isinstance(a, ast.Constant) and str(a.value).startswith("--")
                }
        found[relative.as_posix()] = frozenset(flags)
    return found


@cache
def imported_flags(file: str) -> frozenset[str]:
    """Flags declared by the project modules ``file`` imports (a parser often takes a group of
    flags from a helper, e.g. ``evaluation.rewards.add_reward_arguments``), named from it
    (``from evaluation.rewards import ...``) or imported as a module
    (``from scripts import toy_base_training``)."""
    flags: set[str] = set()
    for node in ast.walk(ast.parse((ROOT / file).read_text(), file)):
        if isinstance(node, ast.ImportFrom) and node.module:
            base = node.module.replace(".", "/")
            for module in (base, *(f"{base}/{alias.name}" for alias in node.names)):
                flags |= source_flags().get(module + ".py", frozenset())
    return frozenset(flags)


def parser_flags(parser) -> frozenset[str]:
    return frozenset(o for a in parser._actions for o in a.option_strings if o.startswith("--"))


@cache
def train_flags() -> frozenset[str]:
    from training.config import build_parser

    return parser_flags(build_parser())


@cache
def launcher_flags() -> frozenset[str]:
    from accelerate.commands.launch import launch_command_parser

    return parser_flags(launch_command_parser())


@cache
def all_flags() -> frozenset[str]:
    union = set(train_flags()) | launcher_flags() | set(EXTERNAL_FLAGS)
    for flags in source_flags().values():
        union |= flags
    return frozenset(union)


PYTHON = re.compile(r"(^|/)python3?$")


def command_flags(
    token: str, following: str | None, previous: str | None
) -> tuple[str, frozenset[str]] | None:
    """(command name, its flags) when ``token`` (and, after ``-m``, ``following``) runs one of
    the project's commands; None otherwise. ``train.py`` counts wherever it appears (also after
    ``accelerate launch``'s own flags); other files and ``-m`` only right after ``python``."""
    if token.endswith("train.py"):
        return "train.py", train_flags()
    if previous is None or not PYTHON.search(previous):
        return None
    module = following if token == "-m" else None
    if module:
        file = module.replace(".", "/") + ".py"
    elif token.endswith(".py"):
        file = token.removeprefix("./")
    else:
        return None
    if file not in source_flags():
        return None
    flags = source_flags()[file] | imported_flags(file)
    if file == "scripts/build_cache.py":  # takes train.py's flags besides its own
        flags = flags | train_flags()
    return file, flags


def unknown_flags_in_code(lines: list[str]) -> list[str]:
    """Flags of the code lines that their command (or, for other tools, any parser) lacks."""
    logical, joined = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            joined += line.rstrip()[:-1] + " "
            continue
        logical.append(joined + line)
        joined = ""
    if joined:
        logical.append(joined)
    wrong = []
    for line in logical:
        shown = " ".join(line.split())
        command_part, _, comment = line.partition(" #")
        if line.lstrip().startswith("#"):
            command_part, comment = "", line
        for segment in re.split(r"&&|\|\||[|;]", command_part):
            try:
                tokens = shlex.split(segment)
            except ValueError:
                tokens = segment.split()
            allowed, name = all_flags(), "any command"
            for i, token in enumerate(tokens):
                following = tokens[i + 1] if i + 1 < len(tokens) else None
                found = command_flags(token, following, tokens[i - 1] if i else None)
                if found:
                    name, allowed = found
                    continue
                flag = token.split("=", 1)[0]
                if FLAG.fullmatch(flag) and flag not in allowed and flag not in EXAMPLE_FLAGS:
                    wrong.append(f"{flag} ({name}): {shown}")
        wrong += [f"{f} (any command): {shown}" for f in unknown_flags_in_prose(comment)]
    return wrong


def unknown_flags_in_prose(text: str) -> list[str]:
    return sorted({f for f in FLAG.findall(text) if f not in all_flags() | set(EXAMPLE_FLAGS)})


def test_the_link_checker_sees_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "b.md").write_text("# Real heading\n\ntext\n")
    page = tmp_path / "a.md"
    text = (
        "[ok](b.md) [ok](b.md#real-heading) [web](https://example.com) [self](#top)\n"
        "# Top\n[gone](c.md) [bad](b.md#no-such-heading)\n```\n[in code](d.md)\n```\n"
    )
    assert broken_links(page, text) == [
        "a.md: c.md (no such file)",
        "a.md: b.md#no-such-heading (no such heading)",
    ]
    assert slug("Losses (`--loss`)") == "losses---loss"


def test_the_flag_checker_sees_typos_and_flags_of_another_command():
    lines = [
        "python train.py --loss dpo --learning_rate 1e-5 \\",
        "  --learning_rat 1e-5",
        "python generate.py --max_train_steps 3  # --seeds are fine in a comment",
        "accelerate launch --num_processes 2 train.py --beta 5000",
        "python -m data.check DATA --strict --no_such_flag",
    ]
    assert unknown_flags_in_code(lines) == [
        "--learning_rat (train.py): python train.py --loss dpo --learning_rate 1e-5 "
        "--learning_rat 1e-5",
        "--max_train_steps (generate.py): python generate.py --max_train_steps 3 "
        "# --seeds are fine in a comment",
        "--no_such_flag (data/check.py): python -m data.check DATA --strict --no_such_flag",
    ]
    assert unknown_flags_in_prose("use `--beta`, not `--betta`; a -- dash") == ["--betta"]


def test_every_relative_link_in_the_docs_resolves():
    broken = [b for path in doc_files() for b in broken_links(path, path.read_text())]
    assert not broken, "broken links: " + "; ".join(broken)


def test_every_flag_named_in_the_docs_exists():
    wrong = []
    for path in doc_files():
        prose, code = split_blocks(path.read_text())
        wrong += [f"{path.name}: {f}" for f in unknown_flags_in_prose(prose)]
        wrong += [f"{path.name}: {w}" for w in unknown_flags_in_code(code)]
    assert not wrong, "flags no parser has: " + "; ".join(wrong)


def test_the_readme_fits_on_a_few_screens():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"
