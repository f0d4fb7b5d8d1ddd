"""The package's layering: no import cycles, and the leaves import nothing from the package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_mmbalance"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports, anywhere in its source (lazy imports included)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                candidates = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            targets |= {c for c in candidates if c in modules and c != name}
        graph[name] = targets
    return graph


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = [*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


@pytest.mark.parametrize(
    ("module", "allowed"),
    [
        ("lightning_mmbalance.contract", set()),
        ("lightning_mmbalance.utilities.checks", set()),
        ("lightning_mmbalance.utilities.compile", set()),
        ("lightning_mmbalance.utilities.tree", set()),
        ("lightning_mmbalance.functional.ogm_ge", {"lightning_mmbalance.utilities.checks"}),
        (
            "lightning_mmbalance.functional.opm",
            {"lightning_mmbalance.functional.ogm_ge", "lightning_mmbalance.utilities.checks"},
        ),
        ("lightning_mmbalance.functional.agm", {"lightning_mmbalance.utilities.checks"}),
        ("lightning_mmbalance.functional.arl", set()),
        ("lightning_mmbalance.functional.mmpareto", set()),
        ("lightning_mmbalance.functional.relearning", set()),
        ("lightning_mmbalance.functional.diagnostics", set()),
        ("lightning_mmbalance.functional.gradient_blending", {"lightning_mmbalance.utilities.checks"}),
        ("lightning_mmbalance.functional.inforeg", {"lightning_mmbalance.utilities.checks"}),
        ("lightning_mmbalance.fusion", {"lightning_mmbalance.utilities.checks"}),
    ],
)
def test_leaves_stay_leaves(module, allowed):
    assert _imports()[module] <= allowed


def test_functional_has_no_lightning_import():
    for path in (PACKAGE / "functional").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not any(name.startswith("lightning") and not name.startswith("lightning_mmbalance") for name in names)
