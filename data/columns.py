"""Column mapping for parquet or hub pairs in another schema (``--columns``).

Pick-a-Pic's names are the reader's standard names; ``prob_0`` is the optional soft label (the
probability that ``jpg_0`` is preferred, written by ``python -m evaluation.relabel``). A mapping
``caption=prompt,jpg_0=image_a`` reads column ``prompt`` as the caption and ``image_a`` as the
first image; unmapped names keep their standard column.
"""

from collections.abc import Sequence

STANDARD = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
PROB = "prob_0"


def parse_columns(text: str | None) -> dict[str, str]:
    """``"caption=prompt,jpg_0=a"`` -> standard name -> column, for every standard name and
    ``prob_0``. Raises ValueError for an unknown name, a missing ``=`` or a name given twice."""
    mapping = {name: name for name in (*STANDARD, PROB)}
    if not text:
        return mapping
    given: set[str] = set()
    for item in text.split(","):
        name, sep, column = (part.strip() for part in item.partition("="))
        if not sep or not column:
            raise ValueError(f"--columns {text}: expected name=column items, got {item!r}")
        if name not in mapping:
            known = ", ".join((*STANDARD, PROB))
            raise ValueError(f"--columns {text}: unknown name {name!r} (one of {known})")
        if name in given:
            raise ValueError(f"--columns {text}: {name!r} is given twice")
        given.add(name)
        mapping[name] = column
    return mapping


def column_problems(text: str | None, other_sources: Sequence[str] = ()) -> list[str]:
    """``--columns``'s problems, as every command that takes it reports them: a mapping that
    does not parse, or one given with another data source (``other_sources``: the flags given,
    e.g. ``["--csv"]``), whose columns it does not name."""
    try:
        parse_columns(text)
    except ValueError as exc:
        return [str(exc)]
    if text and other_sources:
        return [f"--columns maps --data columns: it does not apply to {other_sources[0]}"]
    return []


def columns_flag(text: str | None, other_sources: Sequence[str] = ()) -> dict[str, str]:
    """``parse_columns`` for a command line: ValueError with ``column_problems``' message."""
    problems = column_problems(text, other_sources)
    if problems:
        raise ValueError("; ".join(problems))
    return parse_columns(text)
