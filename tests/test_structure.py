"""The package's structure: no import cycles (between modules, function-level imports included), no
editing method's module imports another's, and importing the tracing engine loads neither the editors
nor a plotting backend."""

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


EDITORS = {"factedit.edit.rome", "factedit.edit.memit", "factedit.edit.alphaedit", "factedit.edit.finetune",
           "factedit.edit.kn"}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through other modules."""
    seen, todo = set(), [start]
    while todo:
        for module in graph[todo.pop()] - seen:
            seen.add(module)
            todo.append(module)
    return seen


def test_no_editor_imports_another_editor():
    """What two methods share (prefixes, key statistics, the layer rule, targets, spreading over layers)
    lives in neutral modules: no method module imports another's, directly or through a neutral
    module or the edit package (whose __init__ imports them all), so changing one method's module
    changes no other method."""
    from factedit.edit import METHODS

    # The list names every module that registers a method's computation (the "none" baseline is the
    # registry's own), so a new method's module is checked too.
    registered = {getattr(method.compute, "func", method.compute).__module__ for method in METHODS.values()}
    assert registered - {"factedit.edit.registry"} == EDITORS
    graph = import_graph()
    assert "factedit.edit.prefixes" in reachable(graph, "factedit.edit.memit")  # the graph follows the shared parts
    for editor in sorted(EDITORS):
        found = reachable(graph, editor) & (EDITORS | {"factedit.edit", "factedit.edit.registry"})
        assert not found, f"{editor} imports {sorted(found)}"


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


def test_benchmarks_and_examples_import_names_that_exist():
    """A name moved from one module to another (e.g. a shared step out of a method's module) leaves no
    benchmark or example importing it from where it was: every `from factedit... import name` in
    benchmarks/*.py and the notebooks' code cells resolves, and a function or class imported from a
    module (not a package, which exports what its modules define) is defined there, not merely
    imported there for its own use."""
    import importlib
    import importlib.util
    import json

    root = PACKAGE.parents[1]
    sources = {path: path.read_text() for path in sorted((root / "benchmarks").glob("*.py"))}
    for notebook in sorted((root / "examples").glob("*.ipynb")):
        cells = json.loads(notebook.read_text())["cells"]
        code = ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"]
        sources[notebook] = "\n".join(line for cell in code for line in cell.splitlines()
                                      if not line.lstrip().startswith(("%", "!")))
    assert len(sources) > 10
    missing = []
    for path, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("factedit"):
                module = importlib.import_module(node.module)
                package = hasattr(module, "__path__")
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        found = importlib.util.find_spec(f"{node.module}.{alias.name}") is not None
                    else:
                        home = getattr(getattr(module, alias.name), "__module__", None)
                        found = package or not isinstance(home, str) or home == node.module
                    if not found:
                        missing.append(f"{path.name}: {node.module}.{alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("factedit"):
                        importlib.import_module(alias.name)
    assert missing == []
