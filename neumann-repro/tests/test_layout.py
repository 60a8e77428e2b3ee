"""The reproduction's layout: studies are registry entries, and its modules import without circles."""

from __future__ import annotations

import ast
from pathlib import Path

from neumann_repro import registry
from neumann_repro.study import Study

PACKAGE = Path(registry.__file__).parent


def _imports(path: Path) -> set[str]:
    """The neumann_repro modules that ``path`` imports (relative imports resolved)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
            out |= {n for n in [target, *names] if n.startswith("neumann_repro")}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("neumann_repro")}
    return out


def test_no_import_circles():
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")}
    graph = {m: {d for d in _imports(p) if d in modules and d != m} for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            assert state.get(d) != 1, " -> ".join([*path, m, d])
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_every_study_is_one_module_with_one_entry():
    studies = registry.studies()
    assert len(studies) == len(registry.MODULES) == len(list((PACKAGE / "studies").glob("[!_]*.py")))
    for name, entry in studies.items():
        assert isinstance(entry, Study) and entry.name == name
        assert entry.help and entry.claim[1] and entry.full_cost_core_minutes
        assert callable(entry.run) and callable(entry.render) and callable(entry.verdict)
