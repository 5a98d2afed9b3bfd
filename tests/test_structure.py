"""The package's structure: no import cycles (between modules, function-level imports included), no
editing method's module imports another's, the command-line modules import one way only, and
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


def package_of(path: Path) -> str:
    """The package a module's relative imports start from: itself for an __init__.py."""
    name = module_name(path)
    return name if path.name == "__init__.py" else name.rsplit(".", 1)[0]


def import_source(node: ast.ImportFrom, package: str) -> str:
    """The module a `from ... import` statement imports from, relative imports resolved."""
    if not node.level:
        return node.module or ""
    base = package.split(".")
    base = ".".join(base[:len(base) - node.level + 1])
    return f"{base}.{node.module}" if node.module else base


def imports_of(path: Path) -> set[str]:
    """The factedit modules a module imports anywhere in its body (relative imports resolved)."""
    name, package = module_name(path), package_of(path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            target = import_source(node, package)
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


EDITORS = {"factedit.edit.rome", "factedit.edit.memit", "factedit.edit.alphaedit", "factedit.edit.encore",
           "factedit.edit.finetune", "factedit.edit.kn"}


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


CLI = PACKAGE / "cli"
# What the command modules share; everything else in factedit/cli is the package (the group) or a command module.
SHARED_CLI_MODULES = {"factedit.cli.options", "factedit.cli.progress_bars"}


def modules_taken_from(text: str, package: str) -> set[str]:
    """The modules a module's code takes names from, anywhere in its body: `from .options import COUNT`
    and `from . import options` take from factedit.cli.options, `from . import main` from the package
    factedit.cli itself (its __init__)."""
    found = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            source = import_source(node, package)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.add(submodule if (PACKAGE.parent / Path(*submodule.split("."))).with_suffix(".py").exists()
                          else source)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_the_command_modules_import_only_the_shared_cli_modules():
    """Imports in factedit.cli go one way: the package's __init__ (the `factedit` group) imports the
    command modules and registers their commands; a command module takes what it shares with the
    others (options, settings, progress bars) from options and progress_bars only, never from the
    package or another command module, so that none depends on the order the others are imported in."""
    assert modules_taken_from("from . import main, options\nfrom .edit_commands import x\nimport factedit.cli",
                              "factedit.cli") == {"factedit.cli", "factedit.cli.options",
                                                  "factedit.cli.edit_commands"}  # the check sees each kind
    cli_modules = {module_name(path) for path in CLI.glob("*.py")}
    assert SHARED_CLI_MODULES < cli_modules
    for path in sorted(CLI.glob("*.py")):
        if path.name == "__init__.py":
            continue
        name = module_name(path)
        taken = modules_taken_from(path.read_text(), package_of(path)) & cli_modules
        wrong = taken - (SHARED_CLI_MODULES - {name})
        assert not wrong, f"{name} imports {sorted(wrong)}; share it through {sorted(SHARED_CLI_MODULES)}"


def test_every_command_is_registered():
    """Each command a module of factedit.cli defines is reachable from `factedit` (registered in
    factedit.cli's __init__, or in a group that is), so a new command cannot be left out."""
    import importlib

    import click

    from factedit.cli import main

    def reachable_commands(group):
        for command in group.commands.values():
            yield command
            if isinstance(command, click.Group):
                yield from reachable_commands(command)

    reachable = set(reachable_commands(main))
    defined = [value for path in sorted(CLI.glob("*.py"))
               for value in vars(importlib.import_module(module_name(path))).values()
               if isinstance(value, click.Command) and value is not main]
    assert len(defined) > 10
    assert [command.name for command in defined if command not in reachable] == []


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
