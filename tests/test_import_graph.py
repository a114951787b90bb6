"""The package's modules import one another without a cycle, and lower layers never import upper
ones (docs/ARCHITECTURE.md): `mlx_mistral` knows nothing of `server` or `convert`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Source folder -> the installed package it becomes (see pyproject's package-dir).
FOLDERS = {
    "mlx_mistral": "mlx_mistral",
    "server": "mlx_mistral.server",
    "convert": "mlx_mistral.convert",
}


def module_name(path: Path) -> str:
    folder, *rest = path.relative_to(REPO).with_suffix("").parts
    parts = [FOLDERS[folder], *rest]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str) -> set[str]:
    """The package modules that `path` imports, at module level or inside a function (an import
    deferred into a function is still a dependency), but not under `if TYPE_CHECKING:`."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def import_graph() -> dict[str, set[str]]:
    files = {
        module_name(path): path
        for folder in FOLDERS
        for path in (REPO / folder).rglob("*.py")
        if "demo_model" not in path.parts
    }
    return {name: imports_of(path, name) & set(files) - {name} for name, path in files.items()}


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                cycle = trail[trail.index(dep) :] + [dep] if dep in trail else [name, dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*trail, dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_library_imports_no_server_and_no_converter():
    for name, deps in import_graph().items():
        # `mlx_mistral.cli` is the program's entry point, above every layer: it dispatches to
        # `serve` and `convert`.
        if name.startswith(("mlx_mistral.server", "mlx_mistral.convert", "mlx_mistral.cli")):
            continue
        upper = {d for d in deps if d.startswith(("mlx_mistral.server", "mlx_mistral.convert"))}
        assert not upper, f"{name} imports {sorted(upper)}"
