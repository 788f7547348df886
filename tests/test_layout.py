"""The package's layout: imports between files of src/csm go one way down (no cycles), and no file uses a
name starting with `_` from another file. Imports are read with `ast`, at module level and inside functions
alike (a lazy import is still an import)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "csm"


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, not `.__init__`)."""
    found = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def is_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def imports(name: str, path: Path, known: dict[str, Path]) -> tuple[set[str], list[str]]:
    """The package's modules that `name` imports, and the private names it takes from other files."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    private: list[str] = []
    aliases: dict[str, str] = {}  # a local name bound to one of the package's modules
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE and alias.name in known:
                    targets.add(alias.name)
                    if alias.asname:
                        aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:  # `from . import x`, `from .pkg import module`
                    targets.add(sub)
                    aliases[alias.asname or alias.name] = sub
                    continue
                if base in known:
                    targets.add(base)
                if alias.name.startswith("_") and not is_dunder(alias.name) and base != name:
                    private.append(f"{name} imports {alias.name} from {base} (line {node.lineno})")
    for node in ast.walk(tree):  # `module._helper` through a module imported above
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not is_dunder(node.attr)
            and aliases[node.value.id] != name
        ):
            private.append(f"{name} uses {aliases[node.value.id]}.{node.attr} (line {node.lineno})")
    targets.discard(name)
    return targets, private


def graph() -> tuple[dict[str, set[str]], list[str]]:
    known = modules()
    edges, private = {}, []
    for name, path in known.items():
        edges[name], taken = imports(name, path, known)
        private += taken
    return edges, private


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_is_read_from_every_kind_of_import():
    edges, _ = graph()
    assert "csm.model" in edges["csm.pipeline"]  # module level, relative
    assert "csm.conversation" in edges["csm.pipeline"]  # inside a method
    assert {"csm.train.data", "csm.train.distributed"} <= edges["csm.train.recipe"]  # `from . import x`
    assert "csm.cli.main" in edges["csm.cli"]  # a package's __init__


def test_no_import_cycle_between_files_of_the_package():
    edges, _ = graph()
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_name_is_imported_from_another_file():
    _, private = graph()
    assert not private, "private names used across files:\n" + "\n".join(private)


def test_a_cycle_and_a_private_import_are_found(tmp_path):
    """The checks themselves can fail: a made-up pair of modules that import each other's helpers."""
    (tmp_path / "a.py").write_text("def f():\n    from .b import _helper\n")
    (tmp_path / "b.py").write_text("from . import a\n")
    known = {"csm.a": tmp_path / "a.py", "csm.b": tmp_path / "b.py"}
    edges = {name: imports(name, path, known)[0] for name, path in known.items()}
    assert find_cycle(edges) == ["csm.a", "csm.b", "csm.a"]
    assert imports("csm.a", known["csm.a"], known)[1] == ["csm.a imports _helper from csm.b (line 2)"]


def test_cli_commands_import_only_the_shared_module_of_the_cli():
    edges, _ = graph()
    commands = [m for m in edges if m.startswith("csm.cli.") and m not in ("csm.cli.main", "csm.cli.common")]
    assert "csm.cli.say" in commands and "csm.cli.batch" in commands
    wrong = {
        m: sorted(t for t in edges[m] if t.startswith("csm.cli") and t != "csm.cli.common") for m in commands
    }
    wrong = {m: t for m, t in wrong.items() if t and m != "csm.cli.__main__"}
    assert not wrong, f"a command imports another part of the CLI than csm.cli.common: {wrong}"
    assert not [t for t in edges["csm.cli.common"] if t.startswith("csm.cli")], "common imports a command"
