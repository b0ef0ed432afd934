"""The Colab demo notebook (notebooks/kdjax_demo.ipynb): a valid nbformat 4 file with its outputs
cleared and no IPython magics, and it runs top to bottom through a real Jupyter kernel (nbclient +
ipykernel on this interpreter, as Colab runs it) with ``KDJAX_DEMO_STEPS`` small so the whole demo
takes seconds."""

import importlib.util
import json
import pathlib
import re
import subprocess
import sys

import pytest

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "kdjax_demo.ipynb"
CELL_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # nbformat 4.5 cell id
STEPS = 6
RUNS = ("teacher, cnn1d width 128", "student from scratch, width 32", "student + KD (T=4)",
        "student + ESKD")


def _notebook() -> dict:
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))


def _source(cell: dict) -> str:
    source = cell["source"]
    return source if isinstance(source, str) else "".join(source)


def _code_cells(notebook: dict) -> list[str]:
    return [_source(cell) for cell in notebook["cells"] if cell["cell_type"] == "code"]


def test_notebook_is_nbformat4_with_outputs_cleared():
    notebook = _notebook()
    assert notebook["nbformat"] == 4
    assert isinstance(notebook["nbformat_minor"], int) and notebook["nbformat_minor"] >= 5
    assert notebook["metadata"]["kernelspec"]["language"] == "python"
    ids = [cell["id"] for cell in notebook["cells"]]
    assert len(set(ids)) == len(ids), f"duplicate cell ids: {ids}"
    assert all(CELL_ID.match(cell_id) for cell_id in ids), ids
    kinds = [cell["cell_type"] for cell in notebook["cells"]]
    assert set(kinds) == {"code", "markdown"}
    for cell in notebook["cells"]:
        assert isinstance(cell["metadata"], dict)
        source = cell["source"]
        assert isinstance(source, str) or all(isinstance(line, str) for line in source)
        assert _source(cell).strip(), f"empty cell {cell['id']}"
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"cell {cell['id']} has outputs; clear them"
            assert cell["execution_count"] is None, f"cell {cell['id']} has an execution count"
        else:
            assert "outputs" not in cell and "execution_count" not in cell


def test_notebook_is_plain_python_with_guarded_install():
    cells = _code_cells(_notebook())
    magics = [line for cell in cells for line in cell.splitlines()
              if line.lstrip().startswith(("!", "%"))]
    assert magics == [], f"IPython magics / shell lines keep the notebook from running as Python: {magics}"
    install = cells[0]
    assert 'find_spec("kdjax") is None' in install and "pip" in install
    assert any('os.environ.get("KDJAX_DEMO_STEPS"' in cell for cell in cells)


def _run_install_cell(monkeypatch, cwd):
    """Runs the install cell in ``cwd`` as if kdjax were not installed; returns the commands run."""
    commands = []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: commands.append((command, kwargs)))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(cwd)
    exec(compile(_code_cells(_notebook())[0], "install cell", "exec"), {"__name__": "__main__"})
    return commands


def test_install_cell_installs_the_clone_when_kdjax_is_missing(monkeypatch):
    commands = _run_install_cell(monkeypatch, NOTEBOOK.parent)
    assert commands == [([sys.executable, "-m", "pip", "install", "-q", "-e", "..[experiments]"],
                         {"check": True})]
    assert sys.path[0] == str(NOTEBOOK.parent.parent)  # importable without a runtime restart


def test_install_cell_without_a_clone_says_where_to_put_it(monkeypatch, tmp_path):
    with pytest.raises(RuntimeError, match=r"no clone of the repository was found at '\.\.' or "
                                           r"'/content/kdjax'"):
        _run_install_cell(monkeypatch, tmp_path)


_PROBE = """
import json, sys
print(json.dumps({
    "executable": sys.executable, "steps": STEPS, "stop_step": stop_step, "workdir": WORKDIR,
    "table": accuracy_table,
    "eval_steps": {name: [r["step"] for r in result.eval_history] for name, result in runs.items()},
    "final": {name: result.eval_history[-1] for name, result in runs.items()},
    "eskd_weights": [float(eskd_weight(s)) for s in (0, stop_step - 1, stop_step, STEPS)],
    "legend": [text.get_text() for text in fig.axes[0].get_legend().get_texts()],
}, default=float))
"""


def _kernel_manager(tmp_path):
    """A kernel manager for a kernel spec that runs this very interpreter (``sys.executable``):
    the ``python3`` spec a venv's ipykernel ships runs whatever ``python`` is first on PATH."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    kernels = tmp_path / "kernels"
    write_kernel_spec(str(kernels / "kdjax-test"))
    specs = KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)
    return KernelManager(kernel_name="kdjax-test", kernel_spec_manager=specs)


def _outputs(cell: dict, stream: str) -> str:
    return "".join(o.get("text", "") for o in cell["outputs"]
                   if o["output_type"] == "stream" and o["name"] == stream)


def test_notebook_runs_end_to_end_in_a_jupyter_kernel(monkeypatch, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("KDJAX_DEMO_STEPS", str(STEPS))
    monkeypatch.setenv("TMPDIR", str(tmp))  # the kernel's tempfile directory: WORKDIR goes there
    notebook = nbformat.reads(NOTEBOOK.read_text(encoding="utf-8"), as_version=4)
    # kdjax is installed here: the install cell must not run pip.
    notebook.cells.insert(0, nbformat.v4.new_code_cell(
        "import subprocess\n"
        "def _no_pip(*args, **kwargs):\n"
        "    raise AssertionError(f'the install cell ran {args} although kdjax is importable')\n"
        "subprocess.run = _no_pip"))
    notebook.cells.append(nbformat.v4.new_code_cell(_PROBE))
    client = NotebookClient(notebook, km=_kernel_manager(tmp_path), timeout=300,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError, with the cell's traceback, if a cell fails

    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    facts = json.loads(_outputs(code[-1], "stdout"))
    assert facts["executable"] == sys.executable
    assert facts["steps"] == STEPS
    # The runs' directory was a temporary one under TMPDIR, removed by the clean-up cell.
    assert pathlib.Path(facts["workdir"]).parent == tmp
    assert list(tmp.glob("kdjax_demo_*")) == []
    stderr = "".join(_outputs(cell, "stderr") for cell in code)
    assert "IProgress" not in stderr and "Traceback" not in stderr
    assert "tracked_metric" not in stderr
    # The results cell prints one line per run with its final accuracy, and draws the plot.
    results = next(cell for cell in code if "accuracy_table = " in cell.source)
    printed = _outputs(results, "stdout").splitlines()
    assert printed[0].split() == ["run", "params", "test", "acc", "agreement"]
    table = facts["table"]
    assert tuple(table) == RUNS
    for name, line in zip(RUNS, printed[1:]):
        assert line.startswith(name) and f"{table[name]:9.3f}" in line, (name, line)
        assert 0.0 <= table[name] <= 1.0
    assert any("image/png" in o.get("data", {}) for o in results.outputs)
    assert facts["legend"] == list(RUNS) + ["ESKD stop step"]
    for name in RUNS:
        assert facts["eval_steps"][name] == list(range(1, STEPS + 1))  # EVAL_EVERY = 1 at 6 steps
        assert facts["final"][name]["num_examples"] == 1000             # the MNIST-1D test split
        assert facts["final"][name]["accuracy"] == table[name]
    # The KD runs' live teacher is the trained teacher: its accuracy on the same test split matches.
    for name in RUNS[2:]:
        assert facts["final"][name]["teacher_accuracy"] == pytest.approx(table[RUNS[0]], abs=2e-3)
        assert 0.0 <= facts["final"][name]["agreement"] <= 1.0
    assert "teacher_accuracy" not in facts["final"][RUNS[1]]
    # ESKD: KD weight 0.5 before the stop step, 0 from it on.
    assert facts["stop_step"] == 2 * STEPS // 3
    assert facts["eskd_weights"] == [0.5, 0.5, 0.0, 0.0]
