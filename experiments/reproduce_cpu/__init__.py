r"""The measured CPU-scale reproduction of the ESKD and FitNet claims (MNIST-1D or scikit-learn digits).

One command trains the whole grid, seeds x cells, and writes ``<out>/README.md`` (setup, tables,
per-claim verdicts with numbers), three PNG plots and ``<out>/results.json`` (every per-seed number)::

    python -m experiments.reproduce_cpu --out results [--seeds 20] [--dataset mnist1d] [--jobs 2] \
        [--workdir workdirs/reproduce_cpu/mnist1d] [--cells scratch,full/large] [--smoke] \
        [--merge] [--report-only]

Every run goes through the experiment modules with the configs of ``experiments/configs/small.py``
(``mnist1d_eskd.py`` / ``mnist1d_fitnet.py`` and the digits ones); on MNIST-1D the grid sets the
regime that :mod:`~experiments.reproduce_cpu.regime` measured (:mod:`~experiments.reproduce_cpu.protocol`:
40,000 / 10,000 examples, 24 epochs, Adam teachers of widths 8 / 16 / 128, the BatchNorm student):

* teachers (trained once per size and teacher seed, :func:`experiments.train_teacher.run`,
  keeping the early-teacher epoch): ``small`` / ``medium`` / ``large`` CNNs of the ESKD grid and
  the FitNet teacher; every student cell of seed ``s`` reads the teachers of seed
  :func:`~experiments.reproduce_cpu.grid.teacher_seed` ``(dataset, s)`` (``s mod 5`` on MNIST-1D)
  with ``source=checkpoint,path=...``;
* ESKD grid (:func:`experiments.imagenet_eskd.run`): the small student from scratch, with full KD
  and with ESKD from each teacher, ESKD in both readings (``stop_kd``: KD term off from the stop
  epoch; ``early_teacher``: the teacher's early-epoch snapshot); on MNIST-1D also the stop epoch
  swept (KD off after 25% / 50% / 75% of training) and the loss constants (T = 1, 0.5 / 0.5 against
  T = 4, 0.1 / 0.9), the teacher read from a logit store computed per run; on digits one
  teacher-assistant chain ``large -> medium -> small`` against the direct ``large -> small``;
* FitNet (:func:`experiments.imagenet_fitnet.run`): the thin-and-deep student with hints (stage 1)
  then KD (stage 2), against the same student with stage 2 alone (KD only, built here from the same
  pieces as ``run_fitnet``'s stage 2, see :func:`~experiments.reproduce_cpu.runner.run_fitnet_kd_only`)
  and from scratch.

Seed ``s`` sets ``config.seed`` (initialisation and data order) of every student of that seed, so
comparisons between cells of one seed are paired. Each (cell, seed) runs in its own directory
``<workdir>/<cell>/seed<s>``; a finished one leaves ``record.json`` and is reused when the command
runs again unless it is stale (:func:`~experiments.reproduce_cpu.runner.stale_reason`: its config
or its teacher changed); an interrupted run resumes inside a cell from its checkpoints. ``--cells``
runs only some student cells (and their teachers), and with ``--merge`` keeps every other
cell's per-seed records from ``<out>/results.json`` (after a change to those cells only);
``--smoke`` runs every cell for two short epochs on a small slice of the data (CI);
``--report-only`` recomputes the statistics and the report from ``<out>/results.json``. docs/experiments.md describes the tables and the verdict rules.

The package, in the order a run goes through it: :mod:`~experiments.reproduce_cpu.protocol` (the
cell and the MNIST-1D regime), :mod:`~experiments.reproduce_cpu.grid` (the cells and their configs),
:mod:`~experiments.reproduce_cpu.runner` (running them, the per-seed records),
:mod:`~experiments.reproduce_cpu.statistics` (paired comparisons, collapsed runs, the claims'
verdicts) and :mod:`~experiments.reproduce_cpu.report` (README.md, plots, results.json);
:func:`main` is the command; :mod:`~experiments.reproduce_cpu.regime` is the study that chose the
regime. Their public names are importable from the package itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

from experiments.grids import (INVOCATIONS_FILE, finite_or_none, record_invocation,
                               write_json)

# The public names of the package's modules, importable from the package itself.
from experiments.reproduce_cpu.grid import (DATASETS, RUN_OVERRIDES, SIZES, SMOKE_SAMPLES,
                                            STORE_DIR, TEACHER_SEEDS, Cell, build_config,
                                            cell_dir, grid, select, set_key, teacher_seed)
from experiments.reproduce_cpu.report import (ACCURACY_PLOT, CLAIMS_PLOT, FITNET_TA_PLOT,
                                              MIMIC_PLOT, PREDICTS,
                                              REPORT_FILE, RESULTS_JSON, code_versions,
                                              collapse_table, comparison_text, comparisons_table,
                                              constants_table, count_params, eskd_table,
                                              fitnet_ta_table, fmt_diff, fmt_num,
                                              fmt_p, fmt_pct, machine_info, markdown_table,
                                              mimic_table, plot_accuracy_vs_teacher,
                                              plot_fitnet_ta, plot_mimic, setup_info, timing_text,
                                              plot_claims, verdict_table, write_report)
from experiments.reproduce_cpu.runner import (RECORD_FILE, TEACHER_IGNORED, code_version,
                                              run_cell, run_fitnet_kd_only, run_jobs, stale_reason)
from experiments.reproduce_cpu.statistics import (ALPHA, CLAIM_KINDS, MARGINS, answer, by_cell,
                                                  claims, collapse_rates, collapse_test,
                                                  collapse_thresholds, collapsed_runs, combine,
                                                  compare, evaluate_claims, stats_of, summarize)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.reproduce_cpu",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where README.md, plots, results.json go")
    parser.add_argument("--dataset", default="mnist1d", choices=DATASETS)
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per student cell (default 20; 2 with --smoke)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--workdir", default=None, help="run directories (default "
                        "workdirs/reproduce_cpu/<dataset>[_smoke]); reusing it resumes")
    parser.add_argument("--smoke", action="store_true",
                        help="two short epochs per run on a slice of the data (CI)")
    parser.add_argument("--cells", default=None,
                        help="comma-separated student cells to run (default: all), e.g. "
                             "'scratch,full/large'; the teachers they need are added")
    parser.add_argument("--merge", action="store_true",
                        help="with --cells: train those cells (and their teachers) and keep every "
                             "other cell's per-seed records from <out>/results.json")
    parser.add_argument("--report-only", action="store_true",
                        help="recompute the statistics, README.md and the plots from "
                             "<out>/results.json (no training)")
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = 2 if args.smoke else 20
    if args.seeds < 2:
        parser.error(f"--seeds={args.seeds}: need at least 2 seeds for a standard deviation and a "
                     f"t-test.")
    if args.jobs < 1:
        parser.error(f"--jobs={args.jobs}: need at least 1 worker process.")
    if args.merge and (args.cells is None or args.report_only):
        parser.error("--merge needs --cells (the cells to train again) and no --report-only.")
    if args.cells is not None:
        args.cells = [k.strip() for k in args.cells.split(",") if k.strip()]
        try:
            select(*grid(args.dataset), args.cells)
        except ValueError as e:
            parser.error(f"--cells: {e}")
    if args.workdir is None:
        args.workdir = os.path.join("workdirs", "reproduce_cpu",
                                    args.dataset + ("_smoke" if args.smoke else ""))
    return args


def read_results(out: str, flag: str) -> tuple[dict, list[dict]]:
    """``<out>/results.json`` and its per-seed records (``cell``, ``seed``, ``curves`` added)."""
    path = os.path.join(out, RESULTS_JSON)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: {flag} reads the records of a finished "
                                f"run; run the command without it first.")
    with open(path, encoding="utf-8") as fh:
        old = json.load(fh)
    records = [{**entry, "cell": cell, "seed": int(seed),
                "curves": old["curves"].get(f"{cell}/seed{seed}", {"train": [], "eval": []})}
               for cell, c in old["cells"].items() for seed, entry in c["seeds"].items()]
    return old, records


def rewrite_report(out: str, command: str) -> dict:
    """``--report-only``: the report again from ``<out>/results.json``'s per-seed records, with
    this code's statistics (no training); the setup, machine, timing and the command that trained
    the runs are the file's, and the report names both commands."""
    old, records = read_results(out, "--report-only")
    setup = {**setup_info(old["setup"]["dataset"], old["setup"]["smoke"]), **old["setup"]}
    return write_report(out, setup=setup, machine=old["machine"], records=records,
                        seeds=old["seeds"], timing=old["timing"], command=old["command"],
                        report_command=command, updates=old.get("updates", ()))


def kept_records(args: argparse.Namespace, trained: set[str]) -> tuple[dict, list[dict]]:
    """``--merge``: ``<out>/results.json`` and its records of the cells not in ``trained`` (marked
    reused); the file must hold the same dataset, smoke setting and seeds."""
    old, records = read_results(args.out, "--merge")
    mine = (args.dataset, args.smoke, list(range(args.seeds)))
    theirs = (old["setup"]["dataset"], old["setup"]["smoke"], old["seeds"])
    if mine != theirs:
        raise ValueError(f"--merge: {args.out}/{RESULTS_JSON} holds (dataset, smoke, seeds) = "
                         f"{theirs}, this command {mine}; pass the same --dataset, --smoke and "
                         f"--seeds, or run the whole grid without --merge.")
    return old, [{**r, "reused": True} for r in records if r["cell"] not in trained]


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the grid (teachers first, then the students) and writes the report. Returns 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.report_only:
        rewrite_report(args.out, " ".join(["python -m experiments.reproduce_cpu"] + argv))
        print(f"report: {os.path.join(args.out, REPORT_FILE)} (from {RESULTS_JSON})", flush=True)
        return 0
    start = time.perf_counter()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_start = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    workdir = os.path.abspath(args.workdir)
    seeds = list(range(args.seeds))
    teacher_cells, student_cells = select(*grid(args.dataset), args.cells)
    trained = {c.key for c in teacher_cells + student_cells}
    old, records = kept_records(args, trained) if args.merge else ({}, [])
    teacher_seeds = sorted({teacher_seed(args.dataset, s) for s in seeds})
    for phase, cells, phase_seeds in (("teachers", teacher_cells, teacher_seeds),
                                      ("students", student_cells, seeds)):
        jobs = [(cell, args.dataset, seed, workdir, args.smoke) for seed in phase_seeds
                for cell in cells]
        print(f"== {phase}: {len(jobs)} runs", flush=True)
        records += run_jobs(jobs, args.jobs, phase)
    reused = sum(1 for r in records if r.get("reused"))
    history = record_invocation(workdir, {
        "started": started, "wall_s": time.perf_counter() - start, "jobs": args.jobs,
        "ran": len(records) - reused, "reused": reused, "argv": argv, "load_start": load_start,
        "load_end": ", ".join(f"{x:.1f}" for x in os.getloadavg())})
    command = ("python -m experiments.reproduce_cpu " + " ".join(argv)).strip()
    updates = ()
    if args.merge:  # the kept records' invocations and command, then this one's
        history = old["timing"]["invocations"] + history[-1:]
        updates = list(old.get("updates", ())) + [{"command": command, "cells": sorted(trained)}]
        command = old["command"]
    timing = {"invocations": history, "runs_s": float(sum(r["wall_s"] for r in records)),
              "total": len(records)}
    write_report(args.out, setup=setup_info(args.dataset, args.smoke), machine=machine_info(),
                 records=records, seeds=seeds, timing=timing, command=command, updates=updates)
    print(f"report: {os.path.join(args.out, REPORT_FILE)} "
          f"({(time.perf_counter() - start) / 60:.1f} min)", flush=True)
    return 0
