"""A first run as a new user meets it: a bad ``--workdir`` or missing ImageNet data ends in one
line naming the path and the fix (exit status 2), a resumed run says where it resumes, a
preemption warning prints above the progress bar, not on its line, orbax says nothing about
metrics, and the report carries only the notes and legend entries that fit it. Runs go through
the real commands (subprocesses) or their ``main``, as typed."""

import errno
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from experiments import cli, imagenet_eskd, report

import fit_worker

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_SMOKE = "--config=experiments/configs/digits_eskd.py:teacher=small,mode=eskd,smoke"


def _command(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def _main_error(monkeypatch, capsys, *argv: str) -> str:
    """Runs ``python -m experiments.imagenet_eskd ARGV`` in-process; returns its one stderr line
    after checking the exit status 2."""
    monkeypatch.setattr(sys, "argv", ["imagenet_eskd", *argv])
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(imagenet_eskd.main)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_workdir_that_is_a_file_is_one_line_exit_2(tmp_path):
    workdir = tmp_path / "a_file"
    workdir.write_text("not a directory")
    run = _command("-m", "experiments.imagenet_eskd", DIGITS_SMOKE, f"--workdir={workdir}")
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        f"error: python -m experiments.imagenet_eskd: --workdir={workdir} is a file, not a "
        f"directory; pass --workdir= a writable directory (created if missing)."]
    assert workdir.read_text() == "not a directory"


def test_workdir_under_a_file_is_one_line_exit_2(monkeypatch, capsys, tmp_path):
    parent = tmp_path / "a_file"
    parent.write_text("")
    line = _main_error(monkeypatch, capsys, DIGITS_SMOKE, f"--workdir={parent}/run")
    assert f"--workdir={parent}/run is under the file {parent}, not a directory" in line


def test_workdir_on_a_read_only_file_system_is_one_line_exit_2(monkeypatch, capsys, tmp_path):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    line = _main_error(monkeypatch, capsys, DIGITS_SMOKE, f"--workdir={tmp_path}/run")
    assert line == (f"error: python -m experiments.imagenet_eskd: --workdir={tmp_path}/run: "
                    f"cannot write in {tmp_path} (Read-only file system); pass --workdir= a "
                    f"writable directory (created if missing).")
    assert not (tmp_path / "run").exists()


def test_teacher_file_without_imagenet_is_one_line_exit_2(tmp_path):
    teacher = tmp_path / "resnet34.npz"
    np.savez(teacher, **{"fc.weight": np.zeros((1000, 512), np.float32)})
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    run = _command("-m", "experiments.imagenet_eskd",
                   "--config=experiments/configs/imagenet_eskd.py:teacher=resnet34,mode=eskd",
                   f"--config.teacher.path={teacher}", f"--config.dataset.data_dir={data_dir}",
                   f"--workdir={tmp_path}/run")
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert errors == run.stderr.splitlines()[-1:]
    assert errors[0].startswith(f"error: config.dataset.data_dir='{data_dir}': TFDS imagenet2012 "
                                f"is not prepared in '{data_dir}/imagenet2012/")
    assert "python -m kdjax.data.imagenet --manual_dir=$MANUAL" in errors[0]
    assert not (tmp_path / "run").exists()


_PREEMPTED_FIT = """
import os, signal, sys
sys.path.insert(0, "tests")
import fit_worker
seen = []
def preempt_at_4(batch):
    seen.append(1)
    if len(seen) == 4:
        os.kill(os.getpid(), signal.SIGTERM)
    return batch
result = fit_worker.run(sys.argv[1], 12, checkpoint_every=0, eval_every=6, log_every=2,
                        progress=True, **({"batch_transform": preempt_at_4}
                                          if sys.argv[2] == "preempt" else {}))
print("stopped_early", result.stopped_early, "at", int(result.state.step))
"""


def test_preemption_prints_above_the_bar_and_the_resumed_run_says_where_it_resumes(
        tmp_path, compile_cache):
    env = fit_worker.cache_env(compile_cache)
    first = _command("-c", _PREEMPTED_FIT, str(tmp_path), "preempt", env=env)
    assert first.returncode == 0, first.stderr
    step = int(re.fullmatch(r"stopped_early True at (\d+)", first.stdout.strip()).group(1))
    # Each \r- or \n-separated piece of stderr is one drawing of the bar or one printed line:
    # the warning is a piece of its own, not appended to a bar's.
    pieces = re.split(r"[\r\n]", first.stderr)
    warnings = [p for p in pieces if "Preemption requested" in p]
    assert warnings == [f"WARNING:kdjax.preemption:Preemption requested: a signal reached this "
                        f"process (SIGTERM here). Stopping after step {step}; checkpoint it and "
                        f"exit."]
    assert "tracked_metric" not in first.stderr
    second = _command("-c", _PREEMPTED_FIT, str(tmp_path), "run", env=env)
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines() == [
        f"train: resuming from step {step} of 12 ({tmp_path})", "stopped_early False at 12"]
    assert "tracked_metric" not in second.stderr


def _summary(stage: str, kd_mode: str, **extra) -> dict:
    return {"stage": stage, "dir": f"stages/{stage}", "model": "cnn", "teacher": "big cnn",
            "kd_mode": kd_mode, "reading": "none", "steps": 4, **extra}


@pytest.mark.parametrize("kd_modes, has_note", [(("hint", "fitnet"), False),
                                                (("scratch", "eskd"), True), (("full",), True)])
def test_the_note_on_eskds_readings_is_in_kd_reports_only(tmp_path, kd_modes, has_note):
    summaries = [_summary(f"s{i}", mode, final={"accuracy": 0.5})
                 for i, mode in enumerate(kd_modes)]
    path = report.write_report(str(tmp_path), title="run", summaries=summaries)
    assert (report.READINGS_NOTE in open(path).read()) == has_note


def test_the_eskd_stop_line_has_a_legend_entry(tmp_path, monkeypatch):
    figures, make_figure = [], report.figure

    def recording_figure(*args, **kwargs):
        figures.append(make_figure(*args, **kwargs))
        return figures[-1]

    monkeypatch.setattr(report, "figure", recording_figure)
    evals = [{"kind": "eval", "step": s, "accuracy": 0.1 * s} for s in (2, 4)]
    report.plot_eval_accuracy({"student": evals, "scratch": evals}, str(tmp_path / "acc.png"),
                              stops={"student": 3, "scratch": None})
    (fig, _), = figures
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "student", "student: ESKD stop (KD term off)", "scratch"]


def test_a_run_trained_in_segments_does_not_say_it_resumes(tmp_path):
    """A teacher that keeps an early epoch trains in segments (fit to that epoch, export, fit on
    from its own checkpoint): uninterrupted, it prints no 'resuming from step' line."""
    result = _command("-m", "experiments.train_teacher",
                      "--config=experiments/configs/digits_eskd.py:teacher=small,mode=eskd,"
                      "reading=early_teacher,smoke", f"--workdir={tmp_path}")
    assert result.returncode == 0, result.stderr
    epochs = os.listdir(os.path.join(tmp_path, "stages", "teacher", "epochs"))
    assert epochs and all(e.startswith("epoch_") for e in epochs)  # it did train in segments
    assert "resuming" not in result.stdout + result.stderr
