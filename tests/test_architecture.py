"""Layering: core never imports a technique or a backend, and the package has no import cycles."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREES = {"fxcook": ROOT / "fxcook", "fxcook.passes": ROOT / "passes", "fxcook.runtime": ROOT / "runtime"}
LAYERS = ("fxcook.passes", "fxcook.runtime")
FRONT_ENDS = ("fxcook.recipe", "fxcook.cli", "fxcook.demo", "fxcook.__main__")


def _modules() -> dict[str, Path]:
    out = {}
    for prefix, tree in TREES.items():
        for path in tree.rglob("*.py"):
            parts = list(path.relative_to(tree).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([prefix, *parts])] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """fxcook modules `name` imports anywhere in its body (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _is_core(name: str) -> bool:
    return not name.startswith(LAYERS) and not name.startswith(FRONT_ENDS) and name != "fxcook"


def test_core_never_imports_a_technique_or_a_backend():
    bad = sorted(f"{m} imports {t}" for m, ts in _graph().items() if _is_core(m) for t in ts if t.startswith(LAYERS))
    assert not bad, "core modules import passes/runtime: " + "; ".join(bad)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t) :] + [t]
            if t not in state and (found := visit(t)):
                return found
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def _without_packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's `__init__` re-exporting its own submodules is not a cycle between modules."""
    return {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}


def test_no_import_cycles():
    cycle = _cycle(_without_packages(_graph()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_training_loads_no_technique():
    code = (
        "import sys, fxcook, fxcook.pipeline, fxcook.cooked; fxcook.train; fxcook.DistillLoss; "
        "print([m for m in sys.modules if m.startswith(('fxcook.passes', 'fxcook.runtime'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
