"""The code's layout, checked: no import circle between modules or packages (at any depth: harness/'s rooms,
the top-level packages), runtime/ below everything, every package's docstring mapping its modules, and the
training loop short enough to read in one sitting (train.py <= 250 lines, train() <= 80)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

PACKAGES = ("bench", "data", "harness", "models", "optimizers", "runtime", "scripts")


def project_modules() -> dict[str, Path]:
    files = [REPO / "train.py", *(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))]
    out = {}
    for path in files:
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports anywhere in it (function bodies included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        found.update(n for n in names if n in modules)
    return found


def graph(level) -> dict[str, set[str]]:
    """Import edges between the nodes `level(module)` names (the module itself, its package, ...)."""
    modules = project_modules()
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        for target in imports(path, modules):
            a, b = level(name), level(target)
            if a != b and not b.startswith(a + ".") and not a.startswith(b + "."):
                edges.setdefault(a, set()).add(b)
    return edges


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the path around it, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(edges):
        if n not in state and (found := visit(n)):
            return found
    return None


def package_of(module: str) -> str:
    """harness's rooms are packages of their own; elsewhere the top-level package."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "harness" and len(parts) > 2 else parts[0]


def test_the_cycle_finder_finds_a_circle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": {"c"}}) is None


@pytest.mark.parametrize("level", [lambda m: m, package_of, lambda m: m.split(".")[0]],
                         ids=["modules", "rooms", "packages"])
def test_no_import_circle(level):
    edges = graph(level)
    assert edges, "no imports found: the scan is broken"
    assert cycle(edges) is None


def test_runtime_is_below_everything():
    edges = graph(lambda m: m.split(".")[0])
    assert not edges.get("runtime"), edges.get("runtime")  # it imports no other project package
    assert {"harness", "optimizers"} <= {a for a, bs in edges.items() if "runtime" in bs}
    for low in ("optimizers", "models", "data"):  # the harness builds on these, never the other way round
        assert not edges.get(low, set()) & {"harness", "bench", "scripts", "train"}, (low, edges.get(low))


def test_every_package_maps_its_modules():
    for init in [*(REPO / p / "__init__.py" for p in PACKAGES if (REPO / p / "__init__.py").exists()),
                 *(REPO / "harness").glob("*/__init__.py")]:
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        names = {p.name for p in init.parent.glob("*.py") if p.name != "__init__.py"}
        names |= {f"{p.parent.name}/" for p in init.parent.glob("*/__init__.py")}
        missing = sorted(n for n in names if n not in doc)
        assert not missing, f"{init.relative_to(REPO)} does not map {missing}"


def test_the_training_loop_reads_in_one_sitting():
    source = (REPO / "train.py").read_text()
    assert len(source.splitlines()) <= 250
    (train,) = [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "train"]
    assert train.end_lineno - train.lineno + 1 <= 80
