"""Running the grid: one (cell, seed) at a time, in this process or in worker processes.

Each (cell, seed) runs in its own directory ``<workdir>/<cell>/seed<s>`` through the experiment
modules' ``run`` functions; a finished one leaves ``record.json`` (:data:`RECORD_FILE`, the per-seed
result) and is reused when the command runs again unless it is stale (:func:`stale_reason`: its
config or its teacher changed); an interrupted run resumes inside a cell from its checkpoints.
``<workdir>/invocations.json`` keeps the history of the command's invocations
(:func:`experiments.grids.record_invocation`).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from typing import Any, Mapping, Sequence

from experiments import imagenet_eskd, imagenet_fitnet, rundir, stages, train_teacher
from experiments.grids import enable_compilation_cache, exit_when_orphaned, write_json
from experiments.reproduce_cpu.grid import Cell, build_config, cell_dir, teacher_seed
from experiments.specs import build_model
from experiments.teachers import obtain_teacher
from experiments.validate import validate_config
from kdjax import metrics as metrics_lib

RECORD_FILE = "record.json"
#: Config keys a teacher run does not read (``train_teacher`` trains ``teacher.model`` on labels):
#: a change there leaves a trained teacher valid.
TEACHER_IGNORED = ("student.", "kd.", "fitnet.", "assistants", "name", "paper.")


def run_fitnet_kd_only(config, workdir: str):
    """FitNet's stage 2 alone: the thin-and-deep student from its random initialisation, distilled
    by :func:`experiments.stages.fitnet_kd_stage` (the same loss, optimizer and epochs as
    :func:`experiments.runs.run_fitnet`'s stage 2) but without the hint stage, so the two differ
    only in the hints. Returns the student stage's summary."""
    validate_config(config, "fitnet")
    ctx = stages.make_context(config, workdir)
    c, data = ctx.config, ctx.data
    teacher, _ = obtain_teacher(ctx)
    module = build_model(c.student.model, data.num_classes, c.student.dtype)
    stage = stages.fitnet_kd_stage(ctx, teacher, module, name="student", role="student",
                                   row={"kd_mode": "kd_only"})
    outcome = stages.run_stage(stage, ctx)
    if outcome.stopped_early:
        raise RuntimeError(f"{workdir} was preempted; run the command again to resume it.")
    outcome.summary["dir"] = os.path.join(rundir.STAGES_DIR, outcome.summary["stage"])
    return outcome.summary


def _curves(stage_dir: str) -> dict[str, list]:
    """Train ``[step, loss/ce, loss/kd]`` and eval ``[step, accuracy, kl, agreement]`` records."""
    path = os.path.join(stage_dir, metrics_lib.JSONL_NAME)
    records = metrics_lib.read_jsonl(path) if os.path.exists(path) else []
    train = [[r["step"], r.get("loss/ce"), r.get("loss/kd")] for r in records
             if r.get("kind") == "train"]
    evals = [[r["step"], r.get("accuracy"), r.get("kl"), r.get("agreement")] for r in records
             if r.get("kind") == "eval"]
    return {"train": train, "eval": evals}


def code_version() -> str:
    """The first 12 hex digits of a SHA-256 over the sources a run executes (the ``.py`` files of
    ``kdjax/`` and ``experiments/`` in sorted order, this driver's package
    ``experiments/reproduce_cpu/`` excepted: what it changes in a run shows in the run's config,
    which :func:`stale_reason` checks): records of runs trained by different code show different
    versions in the report."""
    driver = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(driver))
    digest = hashlib.sha256()
    for package in ("kdjax", "experiments"):
        for folder, _, files in sorted(os.walk(os.path.join(root, package))):
            if os.path.commonpath([folder, driver]) == driver:
                continue
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as fh:
                    digest.update(fh.read())
    return digest.hexdigest()[:12]


def _record(cell: Cell, seed: int, directory: str, summaries: Sequence[Mapping[str, Any]],
            wall_s: float) -> dict:
    """The per-seed result of a cell from its stage summaries (the last stage is the result)."""
    last = summaries[-1]
    final = last.get("final") or {}
    train = last.get("final_train") or {}
    return {
        "cell": cell.key, "seed": seed, "wall_s": wall_s, "code": code_version(),
        "model": last.get("model"), "teacher": last.get("teacher"),
        "kd_mode": last.get("kd_mode"), "reading": last.get("reading"),
        "steps": last.get("steps"),
        "accuracy": final.get("accuracy"), "ce": final.get("ce"), "kl": final.get("kl"),
        "agreement": final.get("agreement"), "teacher_accuracy": final.get("teacher_accuracy"),
        "train_ce": train.get("loss/ce"), "train_kd": train.get("loss/kd"),
        "final": final, "final_train": train,
        "stages": [{"stage": s["stage"], "model": s.get("model"), "steps": s.get("steps"),
                    "accuracy": (s.get("final") or {}).get("accuracy")} for s in summaries],
        "curves": _curves(os.path.join(directory, last["dir"])),
    }


def stale_reason(directory: str, config, teacher_dir: str | None,
                 ignore: Sequence[str] = ()) -> str | None:
    """Why the run in ``directory`` cannot be reused for ``config`` (None: it can, or is new).

    Stale when the config it was started with (``config.json``, written by the experiment
    modules) differs from ``config`` in a key not starting with one of ``ignore`` (e.g.
    ``experiments/configs/small.py`` changed since), or when its teacher's run finished after it
    (the teacher was retrained).
    """
    stored_path = os.path.join(directory, rundir.CONFIG_FILE)
    if not os.path.exists(stored_path):
        return None
    stored = rundir.read_json(stored_path)
    current = json.loads(config.to_json_best_effort())
    if stored != current:
        flat_a, flat_b = rundir.flatten_record(stored), rundir.flatten_record(current)
        keys = sorted(k for k in set(flat_a) | set(flat_b)
                      if flat_a.get(k) != flat_b.get(k) and not k.startswith(tuple(ignore)))
        if keys:
            return f"the config changed since it ran ({', '.join(keys)})"
    record = os.path.join(directory, RECORD_FILE)
    teacher_record = os.path.join(teacher_dir, RECORD_FILE) if teacher_dir else None
    if (teacher_record and os.path.exists(record) and os.path.exists(teacher_record)
            and os.path.getmtime(teacher_record) > os.path.getmtime(record)):
        return "its teacher was retrained after it ran"
    return None


def run_cell(cell: Cell, dataset: str, seed: int, workdir: str, smoke: bool) -> dict:
    """Runs (or resumes) ``cell`` at ``seed``; writes and returns its record.

    A finished run is reused unless :func:`stale_reason` finds it stale (then its directory is
    deleted and it runs again). A run that trains turns on the compilation cache
    ``<workdir>/jax_cache`` for the process."""
    directory = cell_dir(workdir, cell.key, seed)
    path = os.path.join(directory, RECORD_FILE)
    config = build_config(cell, dataset, seed, workdir, smoke)
    teacher_dir = (cell_dir(workdir, cell.teacher, teacher_seed(dataset, seed))
                   if cell.teacher else None)
    reason = stale_reason(directory, config, teacher_dir,
                          TEACHER_IGNORED if cell.kind == "teacher" else ())
    if reason is not None:
        print(f"{cell.key} seed {seed}: {reason}; rerunning it from the start.", flush=True)
        shutil.rmtree(directory)
    elif os.path.exists(path):
        return {**rundir.read_json(path), "reused": True}
    enable_compilation_cache(os.path.join(workdir, "jax_cache"))
    start = time.perf_counter()
    if cell.kind == "fitnet_kd_only":
        summaries = [run_fitnet_kd_only(config, directory)]
    else:
        runner = {"teacher": train_teacher.run, "kd": imagenet_eskd.run,
                  "fitnet": imagenet_fitnet.run}[cell.kind]
        outcome = runner(config, directory)
        if outcome.stopped_early:
            raise RuntimeError(f"{cell.key} seed {seed} was preempted; run the command again to "
                               f"resume it.")
        summaries = outcome.summaries
    record = _record(cell, seed, directory, summaries, time.perf_counter() - start)
    write_json(path, record)
    return record


def _run_job(job: tuple) -> dict:
    return run_cell(*job)


def run_jobs(jobs: Sequence[tuple], num_workers: int, log_prefix: str) -> list[dict]:
    """Runs ``(cell, dataset, seed, workdir, smoke)`` jobs in this process (``num_workers`` 1) or
    in that many spawned processes; prints one line per finished job. Returns the records."""
    records = []

    def done(i: int, job: tuple, record: dict) -> None:
        acc = record.get("accuracy")
        print(f"{log_prefix} [{i}/{len(jobs)}] {job[0].key} ({job[0].label}) seed {job[2]}: top-1 "
              f"{'-' if acc is None else f'{100 * acc:.2f}'}% ({record['wall_s']:.1f} s run)",
              flush=True)
        records.append(record)

    if num_workers <= 1:
        for i, job in enumerate(jobs, 1):
            done(i, job, _run_job(job))
        return records
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context,
                                                initializer=exit_when_orphaned,
                                                initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(_run_job, job): job for job in jobs}
        for i, future in enumerate(concurrent.futures.as_completed(futures), 1):
            done(i, futures[future], future.result())
    return records
