"""experiments.detection_kd (issue 18): the --quick grid trains every run and writes the report;
a second start reuses every finished run and resumes an unfinished one from its checkpoint; bad
configs and a changed config on a started workdir fail with one clear line (exit 2)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from experiments import detection_kd
from experiments.detection_kd import runs
from experiments.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The --quick grid, run once for the module: ``(workdir, out)``."""
    base = tmp_path_factory.mktemp("detection_kd")
    work, out = str(base / "work"), str(base / "out")
    assert detection_kd.main(["--quick", f"--workdir={work}", f"--out={out}"]) == 0
    return work, out


def test_quick_grid_writes_the_report(quick):
    work, out = quick
    for name in ("README.md", "results.json", "map_per_pair.png", "ablation.png", "samples.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    r = json.load(open(os.path.join(out, "results.json")))
    keys = sorted((x["key"], x["seed"]) for x in r["records"])
    assert keys == [("small/teacher", 1000)] + [(k, s) for k in ("tiny/kd_small", "tiny/scratch") for s in (0, 1)]
    for x in r["records"]:
        assert 0.0 <= x["map50"] <= 1.0 and x["steps"] == (6 if x["role"] == "teacher" else 4)
        metrics = [json.loads(line) for line in open(os.path.join(runs.Run(
            x["role"], x["size"], x["seed"], x["teacher"], tuple(x["parts"])).directory(work), "metrics.jsonl"))]
        assert [m["step"] for m in metrics if m["kind"] == "train"] == list(range(2, x["steps"] + 1, 2))
        assert any(m["kind"] == "eval" and m["map50"] == pytest.approx(x["map50"]) for m in metrics)
        if x["arm"].startswith("kd_"):  # the distillation terms were trained
            train = [m for m in metrics if m["kind"] == "train"][-1]
            assert train["loss/roi_cls_soft"] > 0 and train["loss/hint"] > 0 and train["loss/rpn_box_bounded"] >= 0
    fams = r["comparisons"]
    assert [c["name"] for c in fams["kd"]] == ["tiny <- small: KD - scratch"]
    assert all(c["n"] == 2 and c["answer"] in ("agree", "disagree", "equivalent", "inconclusive")
               for f in fams.values() for c in f)
    readme = open(os.path.join(out, "README.md")).read()
    assert r["command"] in readme and "python -m experiments.detection_kd --quick" in readme
    assert "| tiny <- small: KD - scratch | 2 |" in readme and "Measured wall time" in readme


def test_restart_reuses_finished_runs_and_resumes_from_checkpoints(quick, capsys):
    work, out = quick
    # an interrupted run: its record and export gone, its checkpoint (at the last step) kept
    directory = runs.Run("student", "tiny", 1, "small", ("soft", "bounded", "hint")).directory(work)
    os.remove(os.path.join(directory, runs.RECORD_FILE))
    shutil.rmtree(os.path.join(directory, "final"))
    start = time.perf_counter()
    assert detection_kd.main(["--quick", f"--workdir={work}", f"--out={out}"]) == 0
    printed = capsys.readouterr().out
    assert f"{directory}: resuming from step 4 of 4" in printed
    assert printed.count(", reused)") == 4 and os.path.exists(os.path.join(directory, runs.RECORD_FILE))
    history = json.load(open(os.path.join(work, "invocations.json")))
    assert [(h["ran"], h["reused"]) for h in history] == [(5, 0), (1, 4)]
    # --report_only rewrites the report from the records; the command shown stays the training one
    assert detection_kd.main(["--quick", f"--workdir={work}", f"--out={out}", "--report_only"]) == 0
    r = json.load(open(os.path.join(out, "results.json")))
    assert r["command"] == f"python -m experiments.detection_kd --quick --workdir={work} --out={out}"
    assert "--report_only" in r["report_command"] and "rewritten" in open(os.path.join(out, "README.md")).read()
    assert len(json.load(open(os.path.join(work, "invocations.json")))) == 2
    assert time.perf_counter() - start < 60


def test_config_errors_are_one_clear_line(quick, tmp_path):
    work, _ = quick
    with pytest.raises(ConfigError, match="unknown config key 'teacherz'"):
        detection_kd.main(["--quick", f"--workdir={tmp_path}", "--config.grid.teacherz=1"])
    with pytest.raises(ConfigError, match=r"config.grid.teachers=\('huge',\)"):
        detection_kd.main(["--quick", f"--workdir={tmp_path}", "--config.grid.teachers=('huge',)"])
    with pytest.raises(ConfigError, match="paired statistics need at least 2 seeds"):
        detection_kd.main(["--quick", f"--workdir={tmp_path}", "--seeds=1"])
    with pytest.raises(ConfigError, match=r"was started with another config \(train.steps: 4 -> 5\)"):
        detection_kd.main(["--quick", f"--workdir={work}", "--config.train.steps=5"])
    bad = subprocess.run([sys.executable, "-m", "experiments.detection_kd", "--quick",
                          f"--workdir={tmp_path}", "--config.chen.mu=2.0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().startswith("error: invalid config:") and "mu must be in [0, 1]" in bad.stderr


@pytest.mark.slow
def test_sigterm_checkpoints_and_the_next_start_resumes(tmp_path):
    """A SIGTERM mid-run (two workers) stops with exit 0; the same command then finishes the grid."""
    work = str(tmp_path / "work")
    cmd = [sys.executable, "-m", "experiments.detection_kd", "--quick", f"--workdir={work}",
           f"--out={tmp_path / 'out'}", "--jobs=2", "--config.train.teacher_steps=400"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    teacher = runs.Run("teacher", "small", 1000).directory(work)
    deadline = time.time() + 300
    while not os.path.isdir(os.path.join(teacher, "checkpoints", "2")) and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    printed, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "preempted" in printed, printed
    assert not os.path.exists(os.path.join(teacher, runs.RECORD_FILE))
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming from step" in again.stdout
    assert os.path.exists(os.path.join(teacher, runs.RECORD_FILE))
