"""The Colab demo notebook (notebooks/kdjax_demo.ipynb): a valid nbformat 4 file with its outputs
cleared, and every code cell runs in order, in one namespace, as plain Python (no IPython magics),
with ``KDJAX_DEMO_STEPS`` small so the whole demo takes seconds."""

import importlib.util
import json
import pathlib
import re
import subprocess
import sys
import tempfile

import matplotlib
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


def test_notebook_runs_end_to_end(monkeypatch, tmp_path):
    monkeypatch.setenv("KDJAX_DEMO_STEPS", str(STEPS))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the demo's workdirs go under tmp_path
    monkeypatch.chdir(NOTEBOOK.parent)                        # as when opened from notebooks/
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def no_pip(*args, **kwargs):
        raise AssertionError(f"the install cell ran {args} although kdjax is importable")

    namespace = {"__name__": "__main__"}
    plt.close("all")
    try:
        for index, source in enumerate(_code_cells(_notebook())):
            code = compile(source, f"{NOTEBOOK.name}, code cell {index}", "exec")
            if index == 0:
                with monkeypatch.context() as patch:
                    patch.setattr(subprocess, "run", no_pip)
                    exec(code, namespace)
            else:
                exec(code, namespace)
        figure_lines = [len(ax.get_lines()) for ax in plt.gcf().axes]
    finally:
        plt.close("all")

    assert namespace["STEPS"] == STEPS
    table = namespace["accuracy_table"]
    assert tuple(table) == RUNS
    for name, accuracy in table.items():
        assert isinstance(accuracy, float) and 0.0 <= accuracy <= 1.0, (name, accuracy)
    for name, result in namespace["runs"].items():
        steps = [record["step"] for record in result.eval_history]
        assert steps == list(range(1, STEPS + 1)), (name, steps)  # EVAL_EVERY = 1 at 6 steps
        assert result.eval_history[-1]["num_examples"] == 1000    # the MNIST-1D test split
        assert int(result.state.step) == STEPS
        assert table[name] == result.eval_history[-1]["accuracy"]
    # The KD runs' live teacher is the trained teacher: its accuracy on the same test split matches.
    teacher_accuracy = table[RUNS[0]]
    for name in RUNS[2:]:
        record = namespace["runs"][name].eval_history[-1]
        assert record["teacher_accuracy"] == pytest.approx(teacher_accuracy, abs=2e-3)
        assert 0.0 <= record["agreement"] <= 1.0
    assert "teacher_accuracy" not in namespace["runs"][RUNS[1]].eval_history[-1]
    # ESKD: KD weight 0.5 before the stop step, 0 from it on.
    stop = namespace["stop_step"]
    assert stop == 2 * STEPS // 3
    assert [float(namespace["eskd_weight"](s)) for s in (0, stop - 1, stop, STEPS)] == [0.5, 0.5, 0.0, 0.0]
    # One curve per run plus the ESKD stop line.
    assert figure_lines == [len(RUNS) + 1]
    assert len(list(tmp_path.glob("kdjax_demo_*/*/metrics.jsonl"))) == len(RUNS)
