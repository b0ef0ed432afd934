r"""Detection distillation end to end (issue 18): Chen et al. (NeurIPS 2017) measured at CPU scale.

    python -m experiments.detection_kd --config=experiments/configs/detection_digits.py \
        --workdir=/tmp/kdjax_detection --out=results/detection [--seeds=8] [--jobs=2]
    python -m experiments.detection_kd --quick        # the smoke grid (tests), under a minute

Trains the grid of :mod:`experiments.detection_kd.grid` (teachers once per size, then every student
seed: scratch, KD from each larger teacher, the loss-part ablation), each run in its own directory
under ``--workdir`` (:mod:`experiments.detection_kd.runs`: checkpoints, ``metrics.jsonl``, ``tb/``,
``record.json``); then the paired statistics of the paper's claims
(:mod:`experiments.detection_kd.stats`) and the report (:mod:`experiments.detection_kd.report`):
``<out>/README.md``, ``results.json`` and the plots.

Rerunning the command with the same ``--workdir`` reuses finished runs and resumes an interrupted one
from its checkpoint; a workdir started with another config is refused (exit 2) unless
``--config.run.allow_config_change=True``. SIGTERM is a preemption: the running runs checkpoint and
stop, the command exits 0, and the next start resumes. ``--report_only`` rewrites the report from
the finished runs' records (no training). A bad config key or value exits 2 with one clear message.
"""

from __future__ import annotations

import os
import platform
import shlex
import time
from typing import Sequence

PROG = "python -m experiments.detection_kd"
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "detection_digits.py")
FLAGS = (("out", "", "report directory (default results/detection; <workdir>/out with --quick)"),
         ("seeds", 0, "student seeds per cell (0 .. N-1), at least 2 (default 8; 2 with --quick)"),
         ("jobs", 1, "worker processes (runs in parallel)"),
         ("quick", False, "the smoke grid (config arg 'quick'), for the test suite"),
         ("report_only", False, "rewrite the report from the finished runs (no training)"))


def _with_default_config(argv: list[str]) -> list[str]:
    """``argv`` with ``--config`` added when absent (the experiment's config, ``:quick`` with
    ``--quick``)."""
    if any(a.startswith("--config=") for a in argv):
        return argv
    quick = any(a in ("--quick", "--quick=true", "--quick=True") for a in argv)
    return [f"--config={DEFAULT_CONFIG}{':quick' if quick else ''}"] + argv


def _environment() -> dict:
    import jax

    return dict(python=platform.python_version(), jax=jax.__version__, machine=platform.machine(),
                cpu_count=os.cpu_count(), date=time.strftime("%Y-%m-%d %H:%M %Z"))


def main(argv: Sequence[str]) -> int:
    from experiments import cli, rundir, stages
    from experiments.detection_kd import grid, report, runs, stats
    from experiments.errors import ConfigError
    from experiments.grids import INVOCATIONS_FILE, record_invocation, write_json

    argv = list(argv)
    args = cli.parse_command_line(_with_default_config(argv), prog=PROG, doc=__doc__,
                                  needs_workdir=False, extra_flags=FLAGS)
    config, flags = args.config, args.flags
    if flags["quick"] and config.name != "detection_digits_quick":
        raise ConfigError(f"{PROG}: --quick selects the config argument 'quick'; leave --config out "
                          f"or pass --config=...detection_digits.py:quick.")
    quick = config.name.endswith("quick")
    flags["seeds"] = flags["seeds"] or (2 if quick else 8)
    if flags["seeds"] < 2:
        raise ConfigError(f"{PROG}: --seeds={flags['seeds']}: paired statistics need at least 2 seeds.")
    if flags["jobs"] < 1:
        raise ConfigError(f"{PROG}: --jobs={flags['jobs']}: need at least 1 worker process.")
    grid.check_config(config)
    workdir = os.path.abspath(args.workdir or f"/tmp/kdjax_detection{'_quick' if quick else ''}")
    out = flags["out"] or (os.path.join(workdir, "out") if quick else "results/detection")
    seeds = list(range(flags["seeds"]))
    command = " ".join([PROG] + [shlex.quote(a) for a in argv])
    os.makedirs(workdir, exist_ok=True)
    stages.record_config(config, workdir)
    start, started = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M:%S %Z")
    todo = grid.teacher_runs(config) + grid.student_runs(config, seeds)
    if flags["report_only"]:
        records, history = _finished(todo, workdir), rundir.read_json(
            os.path.join(workdir, INVOCATIONS_FILE))
        report_command, command = command, " ".join([PROG] + [shlex.quote(a) for a in history[-1]["argv"]])
    else:
        records, report_command = _train(config, todo, workdir, flags["jobs"]), None
        finished = [r for r in records if not r.get("preempted")]
        reused = sum(1 for r in finished if r.get("reused"))
        history = record_invocation(workdir, {
            "started": started, "wall_s": time.perf_counter() - start, "jobs": flags["jobs"],
            "ran": len(finished) - reused, "reused": reused, "argv": argv,
            "preempted": len(finished) < len(records)})
        if len(finished) < len(records):
            print(f"preempted: finished runs and checkpoints are kept in {workdir}; run the same "
                  f"command again to resume.", flush=True)
            return 0
    comps = stats.comparisons(config, records, seeds)
    timing = {"invocations": history, "runs_s": float(sum(r["wall_s"] for r in records))}
    environment = _environment()
    path = report.write(out, config=config, records=records, seeds=seeds, comps=comps,
                        test=runs.dataset(config)["test"], timing=timing, command=command,
                        environment=environment, report_command=report_command)
    write_json(os.path.join(out, report.RESULTS_FILE), {
        "command": command, "report_command": report_command, "config": config.to_dict(), "seeds": seeds,
        "records": [{k: v for k, v in r.items() if k != "reused"} for r in records],
        "comparisons": comps, "timing": timing, "environment": environment})
    for fam, title in stats.FAMILIES.items():
        print(f"{title}: {stats.overall([c['answer'] for c in comps[fam]])}", flush=True)
    print(f"report: {path} ({(time.perf_counter() - start) / 60:.1f} min)", flush=True)
    return 0


def _train(config, todo, workdir: str, num_jobs: int) -> list[dict]:
    """Runs the teachers, then the students (:func:`experiments.detection_kd.jobs.run_all`);
    returns the records (after a preemption, those of the runs so far, the preempted ones
    marked ``preempted``)."""
    from experiments.detection_kd import jobs

    records: list[dict] = []
    for phase in ("teacher", "student"):
        runs_of_phase = [r for r in todo if r.role == phase]
        print(f"== {phase}s: {len(runs_of_phase)} runs", flush=True)
        records += jobs.run_all(config.to_json(), runs_of_phase, workdir, num_jobs,
                                config.run.prng_impl, _progress(f"{phase}s", len(runs_of_phase)))
        if any(r.get("preempted") for r in records):
            break
    return records


def _finished(todo, workdir: str) -> list[dict]:
    """The records of ``todo`` (``--report_only``); ConfigError naming the unfinished runs."""
    from experiments import rundir
    from experiments.detection_kd.runs import RECORD_FILE
    from experiments.errors import ConfigError

    paths = {r: os.path.join(r.directory(workdir), RECORD_FILE) for r in todo}
    missing = sorted({f"{r.key} seed {r.seed}" for r, p in paths.items() if not os.path.exists(p)})
    if missing or not os.path.exists(os.path.join(workdir, "invocations.json")):
        raise ConfigError(f"{PROG}: --report_only: {len(missing)} runs of {workdir} have not finished "
                          f"({', '.join(missing[:4])}{', ..' if len(missing) > 4 else ''}); run the "
                          f"command without --report_only.")
    return [rundir.read_json(p) for p in paths.values()]


def _progress(phase: str, total: int):
    def done(i: int, record: dict) -> None:
        if record.get("preempted"):
            print(f"{phase} [{i}/{total}] {record['key']} seed {record['seed']}: preempted", flush=True)
            return
        print(f"{phase} [{i}/{total}] {record['key']} seed {record['seed']}: mAP@0.5 "
              f"{100 * record['map50']:.1f}, mAP {100 * record['map']:.1f} "
              f"({record['wall_s']:.0f} s{', reused' if record.get('reused') else ''})", flush=True)
    return done
