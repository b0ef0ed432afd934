"""The CPU-scale reproduction driver (experiments/reproduce_cpu/).

A smoke run of the command (2 seeds, two short epochs on 400 MNIST-1D examples, a few cells) checks
the files it writes, that the tables hold the per-seed numbers' mean and std, and that a second
invocation reuses every run; the full smoke grid (every cell) is marked slow. The statistics and
verdict helpers are checked against t statistics and p-values computed by hand from the formulas
(Welch-Satterthwaite, paired differences) with float64 NumPy and the t distribution's survival
function.
"""

from __future__ import annotations

import json
import shutil
import math
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from experiments import reproduce_cpu as rc, rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_command(args, timeout=600):
    """Runs ``python -m experiments.reproduce_cpu ARGS`` on one CPU device (as a user would)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "experiments.reproduce_cpu", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def pct(values):
    """``mean ± std`` in percent, computed by hand with the standard library."""
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def seed_values(result, cell, key="accuracy"):
    return [result["cells"][cell]["seeds"][s][key] for s in sorted(result["cells"][cell]["seeds"])]


# ------------------------------------------------------------------------------------------------
# The command end to end.
# ------------------------------------------------------------------------------------------------


def test_smoke_run_writes_report_tables_plots_json_and_resumes(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["--smoke", "--seeds", "2", "--cells", "scratch,full/large", "--out", str(out),
            "--workdir", str(work)]
    proc = run_command(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "== teachers: 2 runs" in proc.stdout and "== students: 4 runs" in proc.stdout

    for name in (rc.ACCURACY_PLOT, rc.MIMIC_PLOT, rc.FITNET_TA_PLOT, rc.CLAIMS_PLOT):
        with open(out / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    result = json.loads((out / rc.RESULTS_JSON).read_text())
    assert set(result["cells"]) == {"teacher/large", "scratch", "full/large"}
    for cell in result["cells"].values():
        assert sorted(cell["seeds"]) == ["0", "1"]
    assert result["setup"]["train_examples"] == 400 and result["setup"]["eval_examples"] == 100
    assert result["setup"]["epochs"] == 2 and result["setup"]["steps_per_epoch"] == 3
    record = result["cells"]["full/large"]["seeds"]["1"]
    assert record["steps"] == 6 and record["kd_mode"] == "full"
    assert record["teacher"].startswith("cnn1d:width=128 (checkpoint")
    assert 0.0 <= record["accuracy"] <= 1.0 and record["kl"] >= 0.0
    # The regime's teacher logits were computed once into the run's own store and read from it.
    assert (work / "full" / "large" / "seed1" / rc.STORE_DIR / "train").is_dir()
    assert result["setup"]["precomputed"] is True and result["setup"]["teacher_seeds"] == 5
    assert [row[0] for row in result["curves"]["full/large/seed1"]["eval"]] == [3, 6]

    report = (out / rc.REPORT_FILE).read_text()
    assert "SMOKE RUN" in report
    scratch, large = seed_values(result, "scratch"), seed_values(result, "full/large")
    teacher_large = seed_values(result, "teacher/large")
    assert (f"| none (scratch) | `cnn1d:width=8,norm=true` | - | - | {pct(scratch)} | - | - |"
            in report)
    assert (f"| large | `cnn1d:width=128` | {pct(teacher_large)} | - | {pct(large)} | - | - |"
            in report)
    kl = seed_values(result, "full/large", "kl")
    assert f"{statistics.mean(kl):.3f} ± {statistics.stdev(kl):.3f}" in report
    # The comparison behind "full KD can lose to scratch", recomputed here (paired by seed).
    diff = 100 * (statistics.mean(large) - statistics.mean(scratch))
    claim = next(c for c in result["claims"] if c["id"] == "kd_vs_scratch")
    assert [r["name"] for r in claim["results"]] == ["full KD <- large minus scratch"]
    assert claim["results"][0]["mean_diff"] == pytest.approx(diff, abs=1e-9)
    assert f"| kd_vs_scratch | full KD <- large minus scratch | 2 | - | {diff:+.2f} points" in report
    assert next(c for c in result["claims"] if c["id"] == "hints")["verdict"] == "not run"

    # A second invocation reuses every run and says so; the numbers do not change.
    assert rc.main(args) == 0
    history = json.loads((work / "invocations.json").read_text())
    assert [(h["ran"], h["reused"]) for h in history] == [(6, 0), (0, 6)]
    again = json.loads((out / rc.RESULTS_JSON).read_text())
    assert seed_values(again, "full/large") == large
    assert "6 runs trained, 0 reused" in (out / rc.REPORT_FILE).read_text()
    # --report-only recomputes the statistics from results.json alone (the workdir is not read).
    shutil.rmtree(work)
    assert rc.main(["--out", str(out), "--report-only"]) == 0
    rewritten = json.loads((out / rc.RESULTS_JSON).read_text())
    assert rewritten["report_command"] == f"python -m experiments.reproduce_cpu --out {out} --report-only"
    assert rewritten["claims"] == again["claims"] and rewritten["command"] == again["command"]
    assert "recomputed from those records (no training)" in (out / rc.REPORT_FILE).read_text()
    # --merge trains the named cells again and keeps the other cells' records from results.json.
    merge = ["--smoke", "--seeds", "2", "--cells", "scratch", "--merge", "--out", str(out),
             "--workdir", str(work)]
    assert rc.main(merge) == 0
    merged = json.loads((out / rc.RESULTS_JSON).read_text())
    assert set(merged["cells"]) == set(again["cells"])
    assert seed_values(merged, "full/large") == large
    assert merged["command"] == again["command"]
    assert merged["updates"] == [{"command": "python -m experiments.reproduce_cpu "
                                  + " ".join(merge), "cells": ["scratch"]}]
    assert len(merged["timing"]["invocations"]) == 3
    assert (merged["timing"]["invocations"][-1]["ran"],
            merged["timing"]["invocations"][-1]["reused"]) == (2, 4)
    assert "The cells `scratch` were trained again" in (out / rc.REPORT_FILE).read_text()
    with pytest.raises(ValueError, match=r"--merge: .* pass the same --dataset, --smoke and --seeds"):
        rc.main(merge[:2] + ["3"] + merge[3:])


@pytest.mark.slow
def test_smoke_run_of_every_cell(tmp_path):
    """Every experiment of the grid (teachers, KD, ESKD both readings, TA chain, FitNet, KD only,
    thin-deep scratch) runs and lands in the report."""
    out = tmp_path / "out"
    proc = run_command(["--smoke", "--jobs", "2", "--out", str(out), "--workdir",
                        str(tmp_path / "work")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / rc.RESULTS_JSON).read_text())
    teachers, students = rc.grid("mnist1d")
    assert set(result["cells"]) == {c.key for c in teachers + students}
    fitnet = result["cells"]["fitnet/hint_kd"]["seeds"]["0"]
    assert [s["stage"] for s in fitnet["stages"]] == ["fitnet_stage1", "fitnet_stage2"]
    assert result["cells"]["fitnet/kd_only"]["seeds"]["0"]["kd_mode"] == "kd_only"
    assert result["cells"]["fitnet/scratch"]["seeds"]["0"]["model"] == "cnn1d:width=8,depth=18"
    assert "early_teacher (teacher from its epoch 1)" == \
        result["cells"]["eskd_early/large"]["seeds"]["1"]["reading"]
    # The teacher-assistant chain is a digits cell; every other claim has its cells here.
    assert [c["id"] for c in result["claims"] if c["verdict"] == "not run"] == ["ta"]


# ------------------------------------------------------------------------------------------------
# The grid and its configs.
# ------------------------------------------------------------------------------------------------


def test_grid_configs_share_teachers_by_seed_and_keep_the_protocol(tmp_path):
    teachers, students = rc.grid("mnist1d")
    assert [t.key for t in teachers] == ["teacher/small", "teacher/medium", "teacher/large",
                                         "teacher/fitnet"]
    assert len({c.key for c in students}) == len(students) == 18
    by_key = {c.key: c for c in students + teachers}
    work = str(tmp_path)
    # Student seed 8 reads the teachers of seed 8 mod 5 = 3, from its own logit store.
    c = rc.build_config(by_key["eskd_early/medium"], "mnist1d", 8, work, smoke=False)
    assert c.seed == 8 and c.teacher.source == "checkpoint"
    assert c.teacher.path == rc.cell_dir(work, "teacher/medium", 3)
    assert c.teacher.precomputed and c.teacher.store == os.path.join(
        rc.cell_dir(work, "eskd_early/medium", 8), rc.STORE_DIR)
    assert (c.kd.mode, c.kd.reading, c.teacher.early_epoch) == ("eskd", "early_teacher", 12)
    assert c.run.progress is False and c.run.best_metric is None
    # The regime (results/regime): 40,000 / 10,000 examples, 24 epochs, decays at 12 and 18.
    assert (c.dataset.num_samples, c.num_epochs, tuple(c.optimizer.decay_epochs)) == (
        50_000, 24, (12, 18))
    assert (c.student.model, c.teacher.model) == ("cnn1d:width=8,norm=true", "cnn1d:width=16")
    stops = {k: rc.build_config(by_key[k], "mnist1d", 0, work, smoke=False).kd.stop_epoch
             for k in ("eskd_stop25/large", "eskd_stop/large", "eskd_stop75/large")}
    assert stops == {"eskd_stop25/large": 6, "eskd_stop/large": 12, "eskd_stop75/large": 18}
    t1 = rc.build_config(by_key["full_t1/large"], "mnist1d", 0, work, smoke=False).kd
    assert (t1.temperature, t1.weight, t1.ce_weight, t1.mode) == (1.0, 0.5, 0.5, "full")
    t = rc.build_config(by_key["teacher/large"], "mnist1d", 3, work, smoke=False)
    assert t.teacher.model == "cnn1d:width=128" and t.teacher.early_epoch == 12
    assert (t.optimizer.name, t.optimizer.lr, t.run.eval_every_epochs) == ("adam", 0.01, 1)
    assert [rc.teacher_seed("mnist1d", s) for s in (0, 4, 5, 19)] == [0, 4, 0, 4]
    assert rc.teacher_seed("digits", 19) == 19
    # The three FitNet arms train the regime's 18-layer student at its rate.
    thin = rc.build_config(by_key["fitnet/scratch"], "mnist1d", 0, work, smoke=True)
    assert (thin.student.model, thin.optimizer.lr) == ("cnn1d:width=8,depth=18", 0.01)
    assert thin.kd.mode == "scratch" and thin.num_epochs == 2
    assert thin.dataset.num_samples == rc.SMOKE_SAMPLES
    for key in ("fitnet/hint_kd", "fitnet/kd_only"):
        arm = rc.build_config(by_key[key], "mnist1d", 0, work, smoke=False)
        assert (arm.student.model, arm.optimizer.lr, arm.num_epochs) == (
            "cnn1d:width=8,depth=18", 0.01, 24)
    fast = rc.build_config(by_key["fitnet_fast/kd_only"], "mnist1d", 0, work, smoke=False)
    assert (fast.student.model, fast.optimizer.lr) == ("cnn1d:width=8,depth=18", 0.02)
    assert "fitnet_fast/hint_kd" in by_key and not any(
        c.key.startswith("fitnet_fast/") for c in rc.grid("digits")[1])
    fitnet_teacher = rc.build_config(by_key["teacher/fitnet"], "mnist1d", 0, work, smoke=False)
    assert fitnet_teacher.teacher.model == "cnn1d:width=64"
    digits = {c.key: c for c in rc.grid("digits")[1]}
    assert "ta/large-medium" in digits and "full_t1/large" not in digits
    assert not rc.build_config(digits["full/large"], "digits", 1, work, False).teacher.precomputed
    ta = rc.build_config(digits["ta/large-medium"], "digits", 1, work, smoke=False)
    assert tuple(ta.assistants) == ("cnn2d:width=16",) and ta.teacher.model == "cnn2d:width=32"
    assert ta.dataset.num_samples is None


def test_stale_runs_are_found_by_config_and_teacher_age(tmp_path):
    teachers, students = rc.grid("mnist1d")
    by_key = {c.key: c for c in teachers + students}
    work = str(tmp_path)
    student_dir = rc.cell_dir(work, "full/large", 0)
    teacher_dir = rc.cell_dir(work, "teacher/large", 0)
    config = rc.build_config(by_key["full/large"], "mnist1d", 0, work, smoke=True)
    assert rc.stale_reason(student_dir, config, teacher_dir) is None        # never ran
    rc.write_json(os.path.join(student_dir, rundir.CONFIG_FILE),
                  json.loads(config.to_json_best_effort()))
    assert rc.stale_reason(student_dir, config, teacher_dir) is None        # same config
    changed = rc.build_config(by_key["full/large"], "mnist1d", 0, work, smoke=True)
    changed.unlock()
    changed.optimizer.lr = 0.2
    changed.kd.temperature = 2.0
    assert rc.stale_reason(student_dir, changed, teacher_dir) == (
        "the config changed since it ran (kd.temperature, optimizer.lr)")
    assert rc.stale_reason(student_dir, changed, teacher_dir,
                           ignore=("kd.", "optimizer.")) is None
    rc.write_json(os.path.join(student_dir, rc.RECORD_FILE), {"cell": "full/large"})
    rc.write_json(os.path.join(teacher_dir, rc.RECORD_FILE), {"cell": "teacher/large"})
    os.utime(os.path.join(student_dir, rc.RECORD_FILE), (1000, 1000))
    assert rc.stale_reason(student_dir, config, teacher_dir) == (
        "its teacher was retrained after it ran")
    os.utime(os.path.join(teacher_dir, rc.RECORD_FILE), (500, 500))
    assert rc.stale_reason(student_dir, config, teacher_dir) is None


def test_select_adds_the_needed_teachers_and_rejects_unknown_cells():
    teachers, students = rc.grid("mnist1d")
    t, s = rc.select(teachers, students, ["fitnet/kd_only", "scratch"])
    assert [c.key for c in t] == ["teacher/fitnet"]
    assert [c.key for c in s] == ["scratch", "fitnet/kd_only"]
    with pytest.raises(ValueError, match=r"unknown cell\(s\) \['full/huge'\]; valid: scratch, "):
        rc.select(teachers, students, ["full/huge"])
    with pytest.raises(ValueError, match="dataset='cifar10' is not valid; valid: mnist1d, digits"):
        rc.grid("cifar10")


def test_report_only_needs_a_finished_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.json does not exist: --report-only "
                                                "reads the records of a finished run"):
        rc.main(["--out", str(tmp_path), "--report-only"])


def test_command_line_errors(capsys):
    for argv, message in ((["--out", "x", "--seeds", "1"], "need at least 2 seeds"),
                          (["--out", "x", "--jobs", "0"], "need at least 1 worker"),
                          (["--out", "x", "--cells", "bogus"], "unknown cell(s) ['bogus']"),
                          (["--out", "x", "--merge"], "--merge needs --cells")):
        with pytest.raises(SystemExit) as e:
            rc.parse_args(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err
    args = rc.parse_args(["--out", "x", "--smoke"])
    assert args.seeds == 2 and args.workdir == os.path.join("workdirs", "reproduce_cpu",
                                                            "mnist1d_smoke")
    assert rc.parse_args(["--out", "x"]).seeds == 20


# ------------------------------------------------------------------------------------------------
# Statistics against hand computations.
# ------------------------------------------------------------------------------------------------

A = {0: 0.812, 1: 0.805, 2: 0.821, 3: 0.799, 4: 0.816}
B = {0: 0.801, 1: 0.797, 2: 0.806, 3: 0.795, 4: 0.809}


def test_summarize_is_mean_and_sample_std():
    x = np.array(list(A.values()), np.float64)
    s = rc.summarize(list(A.values()))
    assert s["n"] == 5
    assert s["mean"] == pytest.approx(x.sum() / 5, abs=1e-15)
    assert s["std"] == pytest.approx(math.sqrt(((x - x.mean()) ** 2).sum() / 4), abs=1e-15)
    assert math.isnan(rc.summarize([0.5])["std"])
    with pytest.raises(ValueError, match=r"non-empty 1-D sequence; got shape \(0,\)"):
        rc.summarize([])


def test_compare_is_the_paired_comparison_in_points():
    a, b = np.array(list(A.values())), np.array(list(B.values()))
    c = rc.compare(A, B, name="A - B")
    d = 100 * (a - b)
    tp = d.mean() / (d.std(ddof=1) / math.sqrt(5))
    assert c.mean_diff == pytest.approx(d.mean(), abs=1e-12)
    assert c.t == pytest.approx(tp, rel=1e-10)
    assert c.p_t == pytest.approx(2 * stats.t.sf(abs(tp), 4), rel=1e-8)
    assert c.p_wilcoxon == pytest.approx(stats.wilcoxon(d).pvalue, rel=1e-12)
    assert c.margin == rc.MARGINS["accuracy"] and c.n == 5
    # Seeds only one cell has are left out of the pairs.
    b7 = {**{s: v for s, v in B.items() if s != 4}, 7: 0.9}
    assert rc.compare(A, b7).n == 4
    with pytest.raises(ValueError, match="at least two seeds that both cells have"):
        rc.compare({0: 0.5}, {0: 0.4, 1: 0.3})


@pytest.mark.parametrize("kind,better,worse,equivalent", [
    ("higher", "agree", "disagree", "disagree"),
    ("lower", "disagree", "agree", "disagree"),
    ("not_higher", "disagree", "agree", "agree"),
])
def test_answer_truth_table(kind, better, worse, equivalent):
    assert rc.answer("better", kind) == better
    assert rc.answer("worse", kind) == worse
    assert rc.answer("equivalent", kind) == equivalent
    assert rc.answer("inconclusive", kind) == "inconclusive"


def test_answer_and_combine_errors_and_mixtures():
    with pytest.raises(ValueError, match="claim='better' is not valid; valid: higher, lower"):
        rc.answer("better", "better")
    assert rc.combine(["agree", "agree"]) == "agree"
    assert rc.combine(["agree", "inconclusive", "disagree", "agree"]) == (
        "mixed (2 agree, 1 inconclusive, 1 disagree)")
    with pytest.raises(ValueError, match="no verdicts to combine"):
        rc.combine([])


def _records(cells):
    return [{"cell": cell, "seed": s, "accuracy": v, "model": model, "kd_mode": mode}
            for cell, (model, mode, values) in cells.items() for s, v in values.items()]


def test_collapse_threshold_rates_and_paired_test():
    """Collapse is defined from the data: min(50%, scratch mean - 4 std) per student model; rates
    get exact CIs and two cells are compared by the exact McNemar test over seeds."""
    scratch = {s: 0.60 + 0.01 * s for s in range(10)}
    thin = "cnn1d_thin_deep:width=16"
    records = _records({
        "fitnet/scratch": (thin, "scratch", scratch),
        "fitnet/hint_kd": (thin, "fitnet", {s: 0.7 + 0.001 * s for s in range(10)}),
        "fitnet/kd_only": (thin, "kd_only", {s: (0.40 if s < 6 else 0.7 + 0.002 * s)
                                             for s in range(10)}),
        "scratch": ("cnn1d:width=8", "scratch", {s: 0.94 for s in range(3)}),
        "teacher/large": ("cnn1d:width=128", None, {0: 0.1})})
    th = rc.collapse_thresholds(records)
    x = np.array(list(scratch.values()))
    assert th[thin]["threshold"] == pytest.approx(min(0.5, x.mean() - 4 * x.std(ddof=1)))
    assert th["cnn1d:width=8"]["threshold"] == 0.5        # constant scratch: the cap
    assert "cnn1d:width=128" not in th                      # teachers are not students
    collapsed = rc.collapsed_runs(records, th)
    assert [(c["cell"], c["seed"]) for c in collapsed] == [("fitnet/kd_only", s) for s in range(6)]
    rates = rc.collapse_rates(records, collapsed)
    ci = stats.binomtest(6, 10).proportion_ci(0.95, method="exact")
    assert (rates["fitnet/kd_only"]["k"], rates["fitnet/kd_only"]["n"]) == (6, 10)
    assert rates["fitnet/kd_only"]["ci_low"] == pytest.approx(ci.low)
    assert rates["fitnet/hint_kd"]["k"] == 0
    test = rc.collapse_test("fitnet/hint_kd", "fitnet/kd_only", records, collapsed)
    assert (test["n"], test["a_only"], test["b_only"]) == (10, 0, 6)
    assert test["p"] == pytest.approx(2 * 0.5 ** 6)          # exact two-sided binomial, 6 of 6
    # The claims leave the collapsed seeds out of their pairs.
    acc = rc.by_cell(records)
    hints = next(c for c in rc.evaluate_claims({"accuracy": acc}, collapsed=collapsed)
                 if c["id"] == "hints")
    kd_only = next(r for r in hints["results"] if r["b"] == "fitnet/kd_only")
    assert kd_only["n"] == 4 and kd_only["excluded"] == [0, 1, 2, 3, 4, 5]


def test_evaluate_claims_on_synthetic_cells():
    """Full KD gets worse with teacher size (a capacity gap), ESKD stop_kd fixes it, the TA chain
    is not better than the direct large teacher, T = 1 is as good as T = 4 (equivalent within the
    margin); cells not given are 'not run'."""
    rng = np.random.default_rng(0)
    noise = {s: rng.normal(0, 0.002) for s in range(20)}

    def cell(mean):
        return {s: mean + noise[s] + rng.normal(0, 0.0005) for s in range(20)}

    acc = {"scratch": cell(0.78), "full/small": cell(0.80), "full/medium": cell(0.79),
           "full/large": cell(0.77), "ta/large-medium": cell(0.77),
           "full_t1/large": cell(0.7701),
           **{f"eskd_stop/{s}": cell(0.83) for s in rc.SIZES}}
    results = {c["id"]: c for c in rc.evaluate_claims({"accuracy": acc})}
    assert results["bigger_teacher"]["verdict"] == "agree"
    assert results["eskd_stop"]["verdict"] == "agree"
    assert len(results["eskd_stop"]["results"]) == 6
    assert results["eskd_early"]["verdict"] == "not run"
    assert results["hints"]["verdict"] == "not run" and results["mimic"]["verdict"] == "not run"
    ta = {r["b"]: (r["verdict"], r["answer"]) for r in results["ta"]["results"]}
    assert ta["full/small"] == ("worse", "agree") and ta["full/large"] == ("equivalent", "agree")
    assert results["loss_constants"]["results"][0]["verdict"] == "equivalent"
    assert results["loss_constants"]["verdict"] == "agree"
    assert results["kd_vs_scratch"]["verdict"] == "mixed (1 agree, 0 inconclusive, 2 disagree)"
    large_small = results["bigger_teacher"]["results"][1]
    assert (large_small["a"], large_small["b"]) == ("full/large", "full/small")
    d = 100 * np.array([acc["full/large"][s] - acc["full/small"][s] for s in range(20)])
    assert large_small["mean_diff"] == pytest.approx(d.mean())
    # Holm over the claim's three comparisons: the smallest raw p-value times three.
    ps = [r["p_t"] for r in results["bigger_teacher"]["results"]]
    assert min(r["p_t_holm"] for r in results["bigger_teacher"]["results"]) == pytest.approx(
        min(1.0, 3 * min(ps)))


def test_formatting_helpers():
    assert rc.fmt_pct({"mean": 0.81234, "std": 0.00456}) == "81.23 ± 0.46"
    assert rc.fmt_pct({"mean": 0.5, "std": math.nan}) == "50.00 ± n/a"
    assert rc.fmt_pct(None) == "-"
    assert rc.fmt_num({"mean": 0.123456, "std": 0.01}, 3) == "0.123 ± 0.010"
    assert rc.fmt_p(math.nan) == "n/a" and rc.fmt_p(0.0421) == "0.042"
    assert rc.fmt_p(3.2e-5) == "3.2e-05"
    assert rc.fmt_diff(-1.25, "accuracy") == "-1.25 points"
    assert rc.fmt_diff(0.01234, "kl") == "+0.0123"
    assert rc.finite_or_none({"p": [math.nan, 0.5, math.inf], "s": "x", "n": 3}) == {
        "p": [None, 0.5, None], "s": "x", "n": 3}
    table = rc.markdown_table(["a", "b"], [["1", "2"]])
    assert table == "| a | b |\n|---|---|\n| 1 | 2 |"


def test_invocation_history_restarts_when_every_run_was_retrained(tmp_path):
    entry = {"started": "t0", "wall_s": 60.0, "ran": 4, "reused": 0}
    assert rc.record_invocation(str(tmp_path), entry) == [entry]
    again = dict(entry, started="t1", ran=0, reused=4)      # report regenerated from reused runs
    assert rc.record_invocation(str(tmp_path), again) == [entry, again]
    partial = dict(entry, started="t2", ran=1, reused=3)    # one stale run retrained
    assert [h["started"] for h in rc.record_invocation(str(tmp_path), partial)] == ["t0", "t1", "t2"]
    fresh = dict(entry, started="t3")                        # every run retrained: old ones are gone
    assert rc.record_invocation(str(tmp_path), fresh) == [fresh]
    with open(tmp_path / "invocations.json", encoding="utf-8") as fh:
        assert json.load(fh) == [fresh]
