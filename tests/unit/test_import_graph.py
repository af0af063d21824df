"""No import circle among `service/` modules (issue 30), nor bench importing tests.

Every import counts: at module level, inside a function, or under `TYPE_CHECKING`. A
circle hidden in a function or a type check still ties two modules into one unit that
cannot be read, tested or moved alone, and it is how circles come back.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def module_name(path: Path) -> str:
    """`service/core/scoring.py` → `service.core.scoring` (a package: its folder's name)."""
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that `path` imports, wherever the import statement stands."""
    out: set[str] = set()
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else None
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                anchor = (package or module_name(path)).split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from a.b import c` imports the module a.b.c when there is one, else a.b.
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        out.update(n for n in names if n in known)
    return out


def import_graph(root: str) -> dict[str, set[str]]:
    """Each module under `root` → the modules under `root` it imports (packages included)."""
    files = sorted((REPO / root).rglob("*.py"))
    known = {module_name(f) for f in files}
    return {module_name(f): imported_modules(f, known) - {module_name(f)} for f in files}


def test_the_graph_sees_the_imports_that_matter() -> None:
    # The check below is only as good as this reader: known edges must be in it.
    graph = import_graph("service")
    assert "service.processes.triton_server" in graph["service.cli"]  # in a function
    assert "service.core.embedder" in graph["service.core.scoring"]  # under TYPE_CHECKING
    assert "service.core.prompts" in graph["service.core.embedder"]
    assert len(graph) > 40


def test_no_import_circle_among_service_modules() -> None:
    try:
        graphlib.TopologicalSorter(import_graph("service")).prepare()
    except graphlib.CycleError as exc:
        pytest.fail(f"an import circle among service/ modules: {' → '.join(exc.args[1])}")


@pytest.mark.parametrize("root", ["bench"])
def test_bench_does_not_import_tests(root: str) -> None:
    offenders = []
    for f in sorted((REPO / root).rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            offenders += [
                f"{f.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] == "tests"
            ]
    assert not offenders, offenders
