"""The package's structure: no import cycles (between modules, function-level imports included), and
importing the tracing engine loads neither the editors nor a plotting backend."""

import ast
import subprocess
import sys
from pathlib import Path

import factedit

PACKAGE = Path(factedit.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The factedit modules a module imports anywhere in its body (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = ".".join(base[:len(base) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found.update(c for c in candidates if c.startswith("factedit") and c != name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v), on_stack.add(v)
        for w in graph[v]:
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
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_itself_back():
    graph = import_graph()
    assert "factedit.edit.prompts" in graph["factedit.edit.rome"]  # the graph sees relative imports
    # A package imports its own modules to export them; only cycles through other modules count.
    for name in graph:
        graph[name] = {m for m in graph[name] if not (PACKAGE / Path(*name.split(".")[1:]) / "__init__.py").exists()
                       or not m.startswith(name + ".")}
    assert cycles(graph) == []


def test_tracing_loads_neither_the_editors_nor_a_plotting_backend():
    code = ("import sys, factedit.trace, factedit.evaluate.plots; "
            "print(sorted(m for m in ('factedit.edit', 'matplotlib.pyplot') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_transformers_cache_internals_sit_in_one_module():
    """The key/value cache and the forward arguments' names, which change across transformers versions,
    are handled in factedit.kv_cache only: the trace engine, generation and the value step call it."""
    internals = ("past_key_values", "inspect.signature", ".crop(", "batch_repeat_interleave", "DynamicCache",
                 "cache.layers")
    for path in PACKAGE.rglob("*.py"):
        if path.name != "kv_cache.py":
            text = path.read_text()
            assert not [word for word in internals if word in text], path
