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

import json
import os
import platform
import shlex
import sys
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
    from experiments import cli, stages
    from experiments.detection_kd import grid, jobs, report, runs, stats
    from experiments.errors import ConfigError
    from experiments.reproduce_cpu.runner import record_invocation, write_json

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
    stages._record_config(config, workdir)
    config_json = config.to_json()
    start, started = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M:%S %Z")
    phases = (("teachers", grid.teacher_runs(config)), ("students", grid.student_runs(config, seeds)))
    records: list[dict] = []
    for phase, todo in phases:
        if flags["report_only"]:
            missing = [r.key for r in todo if not os.path.exists(os.path.join(
                r.directory(workdir), runs.RECORD_FILE))]
            if missing:
                raise ConfigError(f"{PROG}: --report_only: runs {sorted(set(missing))} of {workdir} "
                                  f"have not finished; run the command without --report_only.")
        print(f"== {phase}: {len(todo)} runs", flush=True)
        done = jobs.run_all(config_json, todo, workdir, flags["jobs"], config.run.prng_impl,
                            _progress(phase, len(todo)))
        if any(r.get("preempted") for r in done):
            print(f"preempted: finished runs and checkpoints are kept in {workdir}; run the same "
                  f"command again to resume.", flush=True)
            return 0
        records += done
    reused = sum(1 for r in records if r.get("reused"))
    history = record_invocation(workdir, {
        "started": started, "wall_s": time.perf_counter() - start, "jobs": flags["jobs"],
        "ran": len(records) - reused, "reused": reused, "argv": argv})
    comps = stats.comparisons(config, records, seeds)
    timing = {"invocations": history, "runs_s": float(sum(r["wall_s"] for r in records))}
    environment = _environment()
    path = report.write(out, config=config, records=records, seeds=seeds, comps=comps,
                        test=runs.dataset(config)["test"], timing=timing, command=command,
                        environment=environment)
    write_json(os.path.join(out, report.RESULTS_FILE), {
        "command": command, "config": json.loads(config_json), "seeds": seeds,
        "records": [{k: v for k, v in r.items() if k != "reused"} for r in records],
        "comparisons": comps, "timing": timing, "environment": environment})
    for fam, title in stats.FAMILIES.items():
        print(f"{title}: {stats.overall([c['answer'] for c in comps[fam]])}", flush=True)
    print(f"report: {path} ({(time.perf_counter() - start) / 60:.1f} min)", flush=True)
    return 0


def _progress(phase: str, total: int):
    def done(i: int, record: dict) -> None:
        if record.get("preempted"):
            print(f"{phase} [{i}/{total}] {record['key']} seed {record['seed']}: preempted", flush=True)
            return
        print(f"{phase} [{i}/{total}] {record['key']} seed {record['seed']}: mAP@0.5 "
              f"{100 * record['map50']:.1f}, mAP {100 * record['map']:.1f} "
              f"({record['wall_s']:.0f} s{', reused' if record.get('reused') else ''})", flush=True)
    return done
