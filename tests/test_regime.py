"""experiments.reproduce_cpu.regime (issue 16, item 1): the --quick study's outputs and reuse, the
study's cells and configs, and its selection logic on hand-made inputs."""
import json
import math
import os

import numpy as np
import pytest
from scipy import stats

from experiments.reproduce_cpu import regime
from experiments.reproduce_cpu.grid import build_config
from experiments.validate import validate_config


def _numbers(tree):
    """Every number in a JSON tree (bools excluded)."""
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in _numbers(v)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def test_quick_study_writes_the_report_and_reuses_its_runs(tmp_path):
    out, work = str(tmp_path / "out"), str(tmp_path / "work")
    assert regime.main(["--out", out, "--workdir", work, "--quick", "--jobs", "1"]) == 0
    r = json.load(open(os.path.join(out, "regime.json")))
    assert r["command"].startswith(regime.PROG + " --out")
    assert r["data"]["num_train"] == 400 and r["data"]["num_test"] == 100
    assert r["plan"]["decay"] == [1] and r["teachers"]["early_epoch"] == 1
    widths = r["teachers"]["widths"]
    assert sorted(widths, key=int) == [str(w) for w in regime.TEACHER_WIDTHS]
    assert r["teachers"]["sizes"] == regime.SIZES
    for s in widths.values():
        assert s["final"]["n"] == 2 and len(s["per_seed"]) == 2
        for key in ("final", "early"):
            assert all(math.isfinite(s[key][k]) for k in ("mean", "std", "min", "max"))
            assert 0 <= s[key]["min"] <= s[key]["max"] <= 100
        assert math.isfinite(s["gap"]["mean_diff"])
        assert list(s["pre_decay_means"]) == ["1"]
    assert [c["name"] for c in r["teachers"]["spread"]] == [
        "medium - small", "large - small", "large - medium"]
    settings = r["students"]["settings"]
    assert sorted(settings) == ["student/lr0.1", "student/lr0.1_bn"]
    assert all(s["n"] == 2 and math.isfinite(s["mean"]) and math.isfinite(s["std"])
               for s in settings.values())
    assert r["students"]["chosen"]["name"] in settings
    assert r["timing"]["total"] == 12 and r["timing"]["invocations"][-1]["ran"] == 12
    assert all(math.isfinite(x) for x in _numbers(r))  # undefined values are null
    readme = open(os.path.join(out, "README.md")).read()
    assert r["command"] in readme and "## (c) Student from scratch" in readme
    # The student with BatchNorm ran with it; a teacher kept its early snapshot.
    cfg = json.load(open(os.path.join(work, "student", "lr0.1_bn", "seed1", "config.json")))
    assert cfg["student"]["model"] == "cnn1d:width=4,norm=true" and cfg["seed"] == 1
    assert os.path.isdir(os.path.join(work, "teacher", "w128", "seed0", "stages", "teacher",
                                      "epochs", "epoch_1"))
    # Run again: every run is reused, the numbers are the same.
    assert regime.main(["--out", out, "--workdir", work, "--quick", "--jobs", "1"]) == 0
    again = json.load(open(os.path.join(out, "regime.json")))
    assert again["timing"]["invocations"][-1]["ran"] == 0
    assert again["teachers"] == r["teachers"] and again["students"] == r["students"]


def test_full_study_cells_build_valid_configs():
    teachers, students = regime.cells(regime.FULL)
    assert [c.key for c in teachers] == ["teacher/w8", "teacher/w16", "teacher/w32", "teacher/w128"]
    assert len(students) == len(regime.STUDENT_RECIPES) * len(regime.NORMS)
    for cell in teachers + students:
        config = build_config(cell, "mnist1d", 3, "/work", False)
        validate_config(config, cell.kind if cell.kind == "teacher" else "kd")
        assert config.dataset.num_samples == regime.NUM_SAMPLES and config.seed == 3
        assert config.num_epochs == 24 and tuple(config.optimizer.decay_epochs) == (12, 18)
    large = build_config(teachers[-1], "mnist1d", 0, "/work", False)
    assert large.teacher.model == "cnn1d:width=128" and large.optimizer.name == "adam"
    assert large.teacher.early_epoch == 12 < 24 and large.optimizer.weight_decay == 0.0
    assert large.optimizer.lr * large.dataset.batch_size / large.optimizer.lr_batch == 1e-2
    bn = build_config(students[1], "mnist1d", 0, "/work", False)
    assert bn.student.model == "cnn1d:width=4,norm=true" and bn.kd.mode == "scratch"
    assert bn.optimizer.name == "sgd" and bn.optimizer.lr == regime.STUDENT_RECIPES[0][2]
    assert bn.optimizer.weight_decay == 5e-4  # the grid's SGD
    adam = build_config(students[-3], "mnist1d", 0, "/work", False)
    assert students[-3].key == "student/adam_lr0.01_bn" and adam.optimizer.name == "adam"
    assert adam.optimizer.lr_batch == adam.dataset.batch_size and adam.optimizer.weight_decay == 0
    assert regime.student_key(4, "sgd", 0.2, False) == "student/lr0.2"
    assert regime.student_key(8, "sgd", 0.1, True) == "student/w8_lr0.1_bn"


def _s(values):
    return regime.summary(values)


def test_pick_stable_takes_the_most_accurate_stable_setting():
    settings = {"a": _s([90.0, 95.0, 85.0]),      # best mean, unstable
                "b": _s([91.0, 91.5, 90.5]),      # stable
                "c": _s([92.0, 92.4, 91.6]),      # stable and more accurate
                "d": _s([60.0, 60.1, 59.9])}
    pick = regime.pick_stable(settings)
    assert pick["name"] == "c" and pick["stable"] and "3 of 4" in pick["reason"]
    # Ties on the mean go to the lower std.
    tie = {"x": _s([92.0, 93.0, 91.0]), "y": _s([92.0, 92.5, 91.5])}
    assert regime.pick_stable(tie)["name"] == "y"
    # None stable: the lowest std, flagged.
    none = {"p": _s([80.0, 90.0]), "q": _s([70.0, 73.0])}
    pick = regime.pick_stable(none)
    assert pick == {"name": "q", "stable": False, "reason": pick["reason"]}
    assert regime.pick_stable(settings, max_std=0.1)["name"] == "d"
    with pytest.raises(ValueError):
        regime.pick_stable({})


def test_summary_gives_a_chi_square_interval_of_the_std():
    x = [91.0, 92.5, 93.0, 90.0, 92.0]
    s = regime.summary(x)
    sd = np.std(x, ddof=1)
    assert s["n"] == 5 and s["std"] == pytest.approx(sd) and s["min"] == 90.0
    lo, hi = s["std_ci"]
    assert lo == pytest.approx(sd * math.sqrt(4 / stats.chi2.ppf(0.975, 4)))
    assert hi == pytest.approx(sd * math.sqrt(4 / stats.chi2.ppf(0.025, 4)))
    assert lo < sd < hi
    assert all(math.isnan(v) for v in regime.summary([90.0])["std_ci"])


def test_accuracy_at_epoch_reads_the_eval_at_the_end_of_the_epoch():
    record = {"cell": "teacher/small", "seed": 0, "steps": 30,
              "curves": {"eval": [[10, 0.5, 0, 0], [20, 0.75, 0, 0], [30, 0.8, 0, 0]]}}
    assert regime.accuracy_at_epoch(record, 2, 3) == 75.0
    with pytest.raises(ValueError, match="no eval at epoch 2"):
        regime.accuracy_at_epoch({**record, "curves": {"eval": [[30, 0.8, 0, 0]]}}, 2, 3)


def test_next_step_names_what_the_student_result_leaves_to_do():
    sizes = {"small": {"final": {"mean": 92.0}}}

    def result(width, stable):
        return {"chosen": {"name": "s", "stable": stable},
                "settings": {"s": {"width": width, "optimizer": "sgd", "mean": 94.0}}}

    assert "none of those swept" in regime._next_step(result(4, False), sizes)
    assert regime._next_step(result(4, True), sizes) == ""
    text = regime._next_step(result(8, True), sizes)
    assert "as wide as the small teacher (width 8)" in text and "94.00% against" in text
