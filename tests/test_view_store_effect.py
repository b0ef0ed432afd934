"""experiments.view_store_effect --quick (issue 19): the three arms' runs exist, paired by seed,
each reading the teacher it should, and the result files are written."""
import json
import os

import pytest

from experiments import view_store_effect as vse
from experiments.rundir import read_json


def test_quick_run_writes_paired_arms_and_the_report(tmp_path):
    out, work = str(tmp_path / "out"), str(tmp_path / "work")
    assert vse.main(["--out", out, "--workdir", work, "--quick"]) == 0
    for name in ("results.json", "report.md", "view_store_effect.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    r = json.load(open(os.path.join(out, "results.json")))
    assert r["quick"] and r["seeds"] == [0, 1] and r["arms"] == ["live", "centre", "views"]
    assert r["command"].startswith("python -m experiments.view_store_effect --out")
    assert sorted((x["arm"], x["seed"]) for x in r["runs"]) == sorted(
        (a, s) for a in ("live", "centre", "views") for s in (0, 1))
    assert r["config"]["dataset"]["augment"] == "shift_noise"
    for run in r["runs"]:
        assert 0 <= run["accuracy"] <= 100
        cfg = read_json(os.path.join(run["workdir"], "config.json"))
        assert cfg["seed"] == run["seed"]  # paired: the arm's run has the seed of its pair
        assert cfg["dataset"]["augment"] == "shift_noise"
        assert cfg["teacher"]["source"] == "checkpoint"
        assert cfg["teacher"]["path"] == os.path.join(work, "teacher")
        summary = read_json(os.path.join(run["workdir"], "stages", "student", "summary.json"))
        assert summary["final"]["accuracy"] * 100 == pytest.approx(run["accuracy"])
        assert summary["precomputed"] == (run["arm"] != "live")
        if run["arm"] == "views":
            assert cfg["teacher"]["store_views"] == "epochs:0-1"
            meta = read_json(os.path.join(cfg["teacher"]["store"], "train", "metadata.json"))
            assert meta["spec"]["seed"] == run["seed"] and meta["spec"]["epochs"] == [0, 1]
            assert meta["spec"]["transform"].startswith("experiments.datasets.shift_noise@")
        elif run["arm"] == "centre":
            assert cfg["teacher"]["store_views"] == ""
            assert cfg["teacher"]["store"] == os.path.join(work, "stores", "centre")
            meta = read_json(os.path.join(cfg["teacher"]["store"], "train", "metadata.json"))
            assert meta["spec"].get("epochs") is None and meta["spec"]["num_examples"] == 160
    names = [c["name"] for c in r["comparisons"]]
    assert names == ["centre - live", "views - live", "views - centre"]
    assert all(c["n"] == 2 and c["verdict"] in ("better", "worse", "equivalent", "inconclusive")
               for c in r["comparisons"])
    report = open(os.path.join(out, "report.md")).read()
    assert r["command"] in report and "| views - live | 2 |" in report
    # --report-only recomputes from results.json without training.
    assert vse.main(["--out", out, "--report-only"]) == 0
    again = json.load(open(os.path.join(out, "results.json")))
    assert again["comparisons"] == r["comparisons"] and again["runs"] == r["runs"]
    assert "--report-only" in open(os.path.join(out, "report.md")).read()
