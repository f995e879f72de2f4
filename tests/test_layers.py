"""The packages' layers only point down: engine/ imports none of the outer packages, and no modules import
each other, directly or around a longer cycle. Read from the sources with ``ast`` (imports inside
functions included: a function-level import hides a cycle from Python, not from this test)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "cli", "export", "kernels", "bench", "serve", "scale", "video")
OUTER = tuple(p for p in PACKAGES if p not in ("engine", "kernels"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")) if (ROOT / package).is_dir() else []:
            if "results" not in path.parts:
                found[_module_name(path)] = path
    return found


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """The project modules ``name`` imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            # The longest project module the name starts with: pkg.sub.attr -> pkg.sub.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    modules = set(sources)
    graph = {name: _imports(name, path, modules) for name, path in sources.items()}
    # A package's __init__ importing its own submodules (to re-export them) is how a package is built, not a
    # layer crossing; the submodules importing a sibling through the package would be, and is kept.
    return {
        name: {t for t in targets if not (name and t.startswith(name + ".") and sources[name].name == "__init__.py")}
        for name, targets in graph.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    graph = _graph()
    # Known edges, so that an empty graph (a broken reader) cannot pass the tests below.
    assert "engine.config" in graph["engine.core"]
    assert "engine.style_losses.base" in graph["engine.style_losses.gram"]
    assert "cli.options" in graph["cli.main"]


def test_engine_imports_no_outer_package():
    crossings = [
        f"{name} imports {target}"
        for name, targets in _graph().items()
        if name.split(".")[0] == "engine"
        for target in targets
        if target.split(".")[0] in OUTER
    ]
    assert not crossings, crossings


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_a_cycle_would_be_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
