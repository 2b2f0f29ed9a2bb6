"""The layout's rules, checked on the source: no import cycle between the project's files
(imports inside functions count), and lower layers never import higher ones."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".venv", "build", "outputs", ".git", "tests"}

# Lowest first: a package may import its own layer and the ones below, never above.
LAYERS = (
    {"common"},
    {"losses", "data"},
    {"diffusion"},
    {"models", "evaluation"},
    {"training"},
    {"train", "generate", "evaluate"},
)
# losses/ and data/ are the pure bottom: besides each other's peers they import only common/.
PURE = {"losses": {"losses", "common"}, "data": {"data", "common"}}


def project_files() -> dict[str, Path]:
    """Module name -> file, for every Python file of the project (tests excepted)."""
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts
        if parts[0] in SKIP:
            continue
        name = ".".join(parts)[: -len(".py")].removesuffix(".__init__")
        found[name] = path
    return found


def imported_modules(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Project modules a file imports anywhere in its body (``from a import b`` counts ``a.b``
    when that is a module, else ``a``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_files()
    return {name: imported_modules(path, name, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), as sorted lists."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def layer_of(module: str) -> int | None:
    top = module.split(".")[0]
    return next((i for i, layer in enumerate(LAYERS) if top in layer), None)


def test_the_cycle_finder_sees_a_cycle_through_a_function_level_import(tmp_path):
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    modules = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    graph = {name: imported_modules(path, name, modules) for name, path in modules.items()}
    assert find_cycles(graph) == [["a", "b"]]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    listing = "; ".join(" <-> ".join(f"{m.replace('.', '/')}.py" for m in c) for c in cycles)
    assert not cycles, f"import cycles: {listing}"


def test_lower_layers_never_import_higher_ones():
    wrong = []
    for module, imports in import_graph().items():
        here = layer_of(module)
        top = module.split(".")[0]
        for target in imports:
            there = layer_of(target)
            if (top in PURE and target.split(".")[0] not in PURE[top]) or (
                here is not None and there is not None and there > here
            ):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layering: " + "; ".join(sorted(wrong))
