"""requirements-tpu.txt: its pins resolve together and cover what an ImageNet run imports.

pip resolves the file exactly as a TPU VM user runs it (``pip install -r requirements-tpu.txt``,
including its ``-e .`` line, so kdjax's own declared dependencies are resolved with the pins) but
with ``--dry-run --ignore-installed``: nothing is installed, the report lists every distribution
the install would bring. That set must hold a distribution for every third-party top-level module
that the ImageNet entry points, the modules they import (found by walking ``import`` statements,
function-level ones included, since TFDS, Pillow and matplotlib are imported lazily), the report
and the configs import. Needs the package index (as CI's install does) and Python 3.12 (the pins
are for it).
"""

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIREMENTS = os.path.join(ROOT, "requirements-tpu.txt")
LOCAL_PACKAGES = ("kdjax", "experiments")
# What a pod user runs: the ImageNet experiments and the teacher/store commands they start with,
# the report written at the end, and the configs (loaded by file; the smoke cells use scikit-learn
# digits through kdjax.data).
RUN_PATH_ROOTS = (
    "experiments.imagenet_eskd",
    "experiments.imagenet_fitnet",
    "experiments.train_teacher",
    "experiments.precompute_teacher_logits",
    "experiments.report",
    "experiments.configs.imagenet_eskd",
    "experiments.configs.imagenet_fitnet",
)


def _module_file(name):
    base = os.path.join(ROOT, *name.split("."))
    if os.path.isfile(os.path.join(base, "__init__.py")):
        return os.path.join(base, "__init__.py")
    return base + ".py" if os.path.isfile(base + ".py") else None


def _imported_names(tree, module, is_package):
    """Absolute dotted names of everything ``module`` imports (``from a import b``: a and a.b)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".")[: None if is_package else -1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def third_party_imports(roots=RUN_PATH_ROOTS):
    """{third-party top-level module: sorted local modules importing it} over the import closure."""
    seen, found, todo = set(), {}, list(roots)
    while todo:
        module = todo.pop()
        path = _module_file(module)
        if module in seen or path is None:  # a name imported from a module, not a module
            continue
        seen.add(module)
        parts = module.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parents' __init__ run too
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for name in _imported_names(tree, module, path.endswith("__init__.py")):
            top = name.split(".")[0]
            if top in LOCAL_PACKAGES:
                todo.append(name)
            elif top != "__future__" and top not in sys.stdlib_module_names:
                found.setdefault(top, set()).add(module)
    assert {"experiments.imagenet_eskd", "kdjax.data.imagenet", "experiments.report"} <= seen
    return {top: sorted(modules) for top, modules in found.items()}


def _canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins():
    pins = {}
    with open(REQUIREMENTS, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if match := re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==(\S+)", line):
                pins[_canonical(match.group(1))] = match.group(3)
            else:
                assert not line or line == "-e .", f"requirements-tpu.txt: not an exact pin: {line!r}"
    return pins


def test_the_import_walk_finds_the_lazy_imports():
    modules = third_party_imports()
    for module, importer in [("PIL", "kdjax.data.imagenet"), ("tensorflow_datasets", "kdjax.data.imagenet"),
                             ("matplotlib", "experiments.report"), ("sklearn", "kdjax.data.small"),
                             ("jax", "kdjax.train"), ("orbax", "kdjax.checkpointing.manager")]:
        assert importer in modules.get(module, []), (module, modules.get(module))
    assert not {"os", "json", "kdjax", "experiments", "__future__"} & set(modules)


@pytest.mark.skipif(sys.version_info < (3, 12), reason="requirements-tpu.txt pins jax 0.12 and "
                    "friends, which need Python 3.12 (the TPU VM target); this Python cannot resolve them")
def test_requirements_tpu_resolve_and_cover_the_imagenet_run(tmp_path):
    report_path = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
               "--disable-pip-version-check", "--quiet", "--report", str(report_path),
               "-r", REQUIREMENTS]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (
        f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    with open(report_path, encoding="utf-8") as f:
        report = json.load(f)
    resolved = {_canonical(item["metadata"]["name"]): item["metadata"]["version"]
                for item in report["install"]}

    pins = _pins()
    assert {"jax", "pillow", "matplotlib", "scikit-learn", "tensorboard"} <= set(pins)
    assert {name: resolved.get(name) for name in pins} == pins  # every pin, at its version
    assert "kdjax" in resolved and "libtpu" in resolved  # the -e . line; jax[tpu]'s TPU runtime

    modules = third_party_imports()
    assert {"PIL", "matplotlib", "tensorflow_datasets", "sklearn", "jax", "grain"} <= set(modules)
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for module, importers in sorted(modules.items()):
        # packages_distributions() knows the modules of this environment (the dev install has
        # every one of them); a module it does not know is reported, never silently passed.
        candidates = {_canonical(d) for d in providers.get(module, [])}
        if not candidates & set(resolved):
            missing[module] = {"imported by": importers, "distributions here": sorted(candidates)}
    assert not missing, f"requirements-tpu.txt lacks a distribution for: {missing}"


def test_the_tpu_extra_pins_the_jax_of_requirements_tpu():
    """pyproject's ``tpu`` extra and requirements-tpu.txt name the same ``jax[tpu]`` release: an
    unpinned extra lets pip pick a jax whose libtpu is not published and backtrack for hours."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extra = tomllib.load(f)["project"]["optional-dependencies"]["tpu"]
    with open(REQUIREMENTS) as f:
        pins = [line.strip() for line in f if line.startswith("jax[tpu]")]
    assert len(extra) == 1 and len(pins) == 1, (extra, pins)
    assert re.fullmatch(r"jax\[tpu\]==[0-9.]+", pins[0]), pins
    assert extra[0].split(";")[0].strip() == pins[0], (extra, pins)


def test_the_dev_extra_holds_every_other_extra():
    """``dev`` lists every other extra's requirements itself (no ``kdjax[...]`` self-reference,
    which sends pip 23's resolver backtracking), so none may be left out of it."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    dev = set(extras.pop("dev"))
    assert not any(r.startswith("kdjax") for r in dev), dev
    for name, requirements in extras.items():
        assert set(requirements) <= dev, (name, set(requirements) - dev)
