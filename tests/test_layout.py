"""The package layout: imports form a DAG that follows the layers, and no file grows past 400 lines.

Layers, bottom to top: the core modules at the top of ``surgery/`` (capture, shapes, graph,
copying, select, verify, errors, pipeline); ``weights`` and ``activations``; ``channels``;
``shrink`` and ``io``; ``passes``; ``app``. A module may import its own layer or lower ones, never
a higher one, and never in a cycle, at any depth and whether the import is at the top of the file
or inside a function (``if TYPE_CHECKING:`` blocks excepted: they never run).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("surgery", "passes")
MAX_LINES = 400
LAYERS = {"app": 5, "passes": 4, "shrink": 3, "io": 3, "channels": 2, "weights": 1, "activations": 1}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, child.end_lineno + 1))
    return lines


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that module `name` (file `path`) imports, at any place in the file."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the module pkg.sub; `from mod import name` imports mod
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)) is not None:
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)) is not None:
            return found
    return None


def layer(module: str) -> int:
    parts = module.split(".")
    if parts[0] == "passes":
        return LAYERS["passes"]
    if module in ("surgery", "surgery.__main__"):
        return LAYERS["app"]  # the public API gathers every layer below the applications
    return LAYERS.get(parts[1], 0)


def test_find_cycle_finds_a_cycle_at_any_depth():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imports_of_resolves_relative_lazy_and_submodule_imports(tmp_path):
    src = ("from __future__ import annotations\nfrom typing import TYPE_CHECKING\nfrom ..errors import E\n"
           "from . import rules\nif TYPE_CHECKING:\n    from .groups import G\n"
           "def f():\n    from ..pipeline import UnitMask\n")
    path = tmp_path / "x.py"
    path.write_text(src)
    known = {"surgery.errors", "surgery.channels.rules", "surgery.channels.groups", "surgery.pipeline"}
    assert imports_of("surgery.channels.x", path, known) == {"surgery.errors", "surgery.channels.rules",
                                                            "surgery.pipeline"}


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_follow_the_layers():
    bad = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
           for a, targets in import_graph().items() for b in targets if layer(b) > layer(a)]
    assert not bad, "\n".join(bad)


def test_rule_files_import_only_the_rule_book_and_the_shared_helpers():
    graph = import_graph()
    rule_files = [m for m in graph if m.startswith("surgery.channels.rules.")]
    assert len(rule_files) >= 4
    for m in rule_files:
        siblings = {t for t in graph[m] if t.startswith("surgery.channels.rules.")}
        helpers = {f"surgery.channels.rules.{h}" for h in ("common", "operands", "head_dims")}
        assert siblings <= helpers - {m}, f"{m} imports {siblings}"
        assert "surgery.channels.groups" not in graph[m], f"{m} imports the analysis"
    assert not {t for t in graph["surgery.channels.rulebook"] if t.startswith("surgery.channels")}


@pytest.mark.parametrize("module", sorted(_modules()))
def test_no_file_over_400_lines(module):
    n = len(_modules()[module].read_text().splitlines())
    assert n <= MAX_LINES, f"{module} has {n} lines (more than {MAX_LINES}: probably two ideas)"


def test_surgery_imports_passes_only_from_the_applications():
    bad = [m for m, targets in import_graph().items()
           if m.startswith("surgery") and not m.startswith("surgery.app")
           and any(t == "passes" or t.startswith("passes.") for t in targets)]
    assert not bad, f"these core modules import passes: {bad}"
