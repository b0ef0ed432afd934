"""The drawing of the code: which module of ``kdjax`` and ``experiments`` imports which.

The graph is read from the source with ``ast`` (nothing is imported): every ``import`` and
``from ... import`` statement counts, at module level, inside functions and under
``if TYPE_CHECKING:`` alike, since each is a dependency a reader has to follow. An edge points at
the module a statement names (``from a.b import c`` names ``a.b.c`` when that is a module, else
``a.b``); the parent packages Python also initialises on the way are not edges, so a package whose
``__init__`` re-exports its submodules is not a circle.

Also: ``kdjax`` never imports ``experiments``, only :mod:`kdjax.atomic` replaces a file by
renaming a temporary one over it, and CI runs README's two set-up commands and nothing else.
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("kdjax", "experiments")


def local_modules(packages=PACKAGES) -> dict[str, str]:
    """``{dotted module name: file}`` of every ``.py`` file under the packages."""
    out = {}
    for package in packages:
        for folder, dirs, files in os.walk(os.path.join(ROOT, package)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, ROOT)[:-len(".py")].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                out[".".join(parts)] = path
    return out


def _named(module: str, is_package: bool, node: ast.AST) -> list[str]:
    """The absolute names an import statement of ``module`` names (``from a import b``: ``a.b``
    and ``a``; the caller keeps the first that is a local module)."""
    if isinstance(node, ast.Import):
        return [[alias.name] for alias in node.names]
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([node.module] if node.module else []))
    else:
        base = node.module
    return [[f"{base}.{alias.name}", base] for alias in node.names]


def import_graph(packages=PACKAGES) -> dict[str, set[str]]:
    """``{module: modules it imports}`` over the local modules (third-party imports left out)."""
    modules = local_modules(packages)
    graph = {}
    for module, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        edges = set()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for candidates in _named(module, path.endswith("__init__.py"), node):
                target = next((c for c in candidates if c in modules), None)
                if target is None:  # ``import a.b.c`` of a name inside a.b.c: the longest module
                    parts = candidates[-1].split(".")
                    target = next((".".join(parts[:i]) for i in range(len(parts), 0, -1)
                                   if ".".join(parts[:i]) in modules), None)
                if target is not None and target != module:
                    edges.add(target)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as ``[a, b, ..., a]``, or None (depth-first search, sorted order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_module_level_and_function_level_imports():
    graph = import_graph()
    assert "kdjax.loop" in graph["experiments.stages"]            # inside run_stage
    assert "experiments.errors" in graph["experiments.validate"]   # at module level
    assert "kdjax.atomic" in graph["kdjax.metrics"]
    assert "experiments.reproduce_cpu.grid" in graph["experiments.reproduce_cpu"]
    assert {"experiments.errors", "experiments.console"} <= set(graph)


def test_find_cycle_reports_the_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_circle_in_kdjax_and_experiments():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_kdjax_never_imports_experiments():
    graph = import_graph()
    upward = sorted(f"{module} -> {target}" for module, targets in graph.items()
                    if module.startswith("kdjax") for target in targets
                    if target.split(".")[0] == "experiments")
    assert not upward, "kdjax imports experiments: " + ", ".join(upward)


def test_files_are_replaced_atomically_in_one_place():
    """Writing a temporary file and renaming it over the target is kdjax.atomic's job alone (the
    oneDNN kernel build renames what the compiler wrote, which no Python writer can do for it)."""
    allowed = {"kdjax.atomic", "kdjax.kernels.build"}
    renaming = []
    for module, path in local_modules().items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr in ("replace", "rename")
                    and isinstance(node.value, ast.Name) and node.value.id == "os"
                    and module not in allowed):
                renaming.append(f"{module}:{node.lineno}")
    assert not renaming, ("os.replace / os.rename outside kdjax.atomic (use write_json_atomic, "
                          "write_text_atomic or atomic_write): " + ", ".join(renaming))


def readme_setup_commands() -> list[str]:
    """The commands of README's first code block under "Set up and test", comments dropped."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    block = text.split("## Set up and test", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_ci_runs_readmes_two_commands_and_nothing_else():
    """Set-up is README's install command and its test command; .ci/run runs those two, after
    making the venv, and installs nothing else (no apt-get, no separate kernel build)."""
    commands = readme_setup_commands()
    assert commands == ['pip install -e ".[dev]"', "python -m pytest -n 2"], commands
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        steps = [line.split("#", 1)[0].strip() for line in f if "# README:" in line]
    assert steps == commands
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        script = f.read()
    assert "apt-get" not in script and "kdjax.kernels.build" not in script
