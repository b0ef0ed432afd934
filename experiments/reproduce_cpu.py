r"""The measured CPU-scale reproduction of the ESKD and FitNet claims (MNIST-1D or scikit-learn digits).

One command trains the whole grid, seeds x cells, and writes ``<out>/README.md`` (setup, tables,
per-claim verdicts with numbers), three PNG plots and ``<out>/results.json`` (every per-seed number)::

    python -m experiments.reproduce_cpu --out results [--seeds 10] [--dataset mnist1d] [--jobs 2] \
        [--workdir workdirs/reproduce_cpu/mnist1d] [--cells scratch,full/large] [--smoke]

Every run goes through the experiment modules with the configs of ``experiments/configs/small.py``
(``mnist1d_eskd.py`` / ``mnist1d_fitnet.py`` and the digits ones):

* teachers (trained once per size and seed, :func:`experiments.train_teacher.run`, keeping the
  early-teacher epoch): ``small`` / ``medium`` / ``large`` CNNs of the ESKD grid and the FitNet
  teacher; every student cell of seed ``s`` reads the seed-``s`` teacher with
  ``source=checkpoint,path=...``;
* ESKD grid (:func:`experiments.imagenet_eskd.run`): the small student from scratch, with full KD
  and with ESKD from each teacher, ESKD in both readings (``stop_kd``: KD term off from the stop
  epoch; ``early_teacher``: the teacher's early-epoch snapshot); one teacher-assistant chain
  ``large -> medium -> small`` (full KD at each link) against the direct ``large -> small``;
* FitNet (:func:`experiments.imagenet_fitnet.run`): the thin-and-deep student with hints (stage 1)
  then KD (stage 2), against the same student with stage 2 alone (KD only, built here from the same
  pieces as ``run_fitnet``'s stage 2, see :func:`run_fitnet_kd_only`) and from scratch.

Seed ``s`` sets ``config.seed`` (initialisation and data order) of the teacher and of every student
of that seed, so comparisons between cells of one seed are paired. Each (cell, seed) runs in its own
directory ``<workdir>/<cell>/seed<s>``; a finished one leaves ``record.json`` and is reused when
the command runs again unless it is stale (:func:`stale_reason`: its config or its teacher
changed); an interrupted run resumes inside a cell from its checkpoints. ``--cells`` runs only some
student cells (and their teachers); ``--smoke`` runs every cell for two short epochs on a small
slice of the data (CI). docs/experiments.md describes the tables and the verdict rules.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import shutil
import sys
import time
import warnings
from typing import Any, Mapping, Sequence

import numpy as np

DATASETS = ("mnist1d", "digits")
SIZES = ("small", "medium", "large")
RECORD_FILE = "record.json"
RESULTS_JSON = "results.json"
REPORT_FILE = "README.md"
ACCURACY_PLOT = "accuracy_vs_teacher.png"
MIMIC_PLOT = "mimic.png"
FITNET_TA_PLOT = "fitnet_ta.png"
ALPHA = 0.05
#: MNIST-1D examples in smoke mode (400 train / 100 test: 3 steps per epoch at batch 128).
SMOKE_SAMPLES = 500
#: Run settings that do not change what is trained: no progress bar, no intermediate checkpoints
#: (a cell is short, and it is redone or resumed from its last checkpoint), no best-checkpoint
#: tracking (the final eval is the result).
RUN_OVERRIDES = (("run.progress", False), ("run.checkpoint_every_epochs", 0),
                 ("run.best_metric", None))


# ------------------------------------------------------------------------------------------------
# The grid.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cell:
    """One cell of the grid, run once per seed.

    ``kind``: ``teacher`` (:func:`experiments.train_teacher.run`), ``kd``
    (:func:`experiments.imagenet_eskd.run`), ``fitnet`` (:func:`experiments.imagenet_fitnet.run`)
    or ``fitnet_kd_only`` (:func:`run_fitnet_kd_only`). ``config``: ``eskd`` or ``fitnet``, the
    config getter of ``experiments/configs/small.py``; ``arg``: its ARG string; ``teacher``: the
    teacher cell whose seed-``s`` workdir is passed as ``source=checkpoint,path=``; ``overrides``:
    ``(dotted key, value)`` pairs set on the config after the getter.
    """
    key: str
    kind: str
    config: str
    arg: str
    label: str
    teacher: str | None = None
    overrides: tuple = ()


def grid(dataset: str) -> tuple[list[Cell], list[Cell]]:
    """``(teacher cells, student cells)`` of the reproduction on ``dataset``.

    Teachers: ``teacher/<size>`` for each ESKD size (kept at the config's early-teacher epoch too)
    and ``teacher/fitnet``. Students: ``scratch``; ``full/<size>``, ``eskd_stop/<size>``,
    ``eskd_early/<size>``; ``ta/large-medium`` (large -> medium assistant -> student, full KD);
    ``fitnet/hint_kd``, ``fitnet/kd_only``, ``fitnet/scratch`` (thin-and-deep student).
    """
    from experiments.configs import small

    if dataset not in DATASETS:
        raise ValueError(f"dataset={dataset!r} is not valid; valid: {', '.join(DATASETS)}.")
    s = small.SETTINGS[dataset]
    teachers = [Cell(f"teacher/{size}", "teacher", "eskd",
                     f"teacher={size},mode=eskd,reading=early_teacher",
                     f"teacher {size} ({s['teachers'][size]})") for size in SIZES]
    teachers.append(Cell("teacher/fitnet", "teacher", "fitnet", "",
                         f"FitNet teacher ({s['fitnet_teacher']})"))
    students = [Cell("scratch", "kd", "eskd", "teacher=none", "student from scratch")]
    for size in SIZES:
        t = f"teacher/{size}"
        students += [
            Cell(f"full/{size}", "kd", "eskd", f"teacher={size},mode=full", f"full KD <- {size}", t),
            Cell(f"eskd_stop/{size}", "kd", "eskd", f"teacher={size},mode=eskd,reading=stop_kd",
                 f"ESKD stop_kd <- {size}", t),
            Cell(f"eskd_early/{size}", "kd", "eskd",
                 f"teacher={size},mode=eskd,reading=early_teacher",
                 f"ESKD early_teacher <- {size}", t)]
    students.append(Cell("ta/large-medium", "kd", "eskd", "teacher=large,mode=full,ta=medium",
                         "TA chain large -> medium -> student (full KD)", "teacher/large"))
    thin = (("student.model", s["fitnet_student"]), ("optimizer.lr", s["fitnet_lr"]))
    students += [
        Cell("fitnet/hint_kd", "fitnet", "fitnet", "", "FitNet: hints, then KD", "teacher/fitnet"),
        Cell("fitnet/kd_only", "fitnet_kd_only", "fitnet", "", "thin-deep: KD only (FitNet stage 2)",
             "teacher/fitnet"),
        Cell("fitnet/scratch", "kd", "eskd", "teacher=none", "thin-deep: from scratch",
             overrides=thin)]
    return teachers, students


def select(teachers: Sequence[Cell], students: Sequence[Cell],
           keys: Sequence[str] | None) -> tuple[list[Cell], list[Cell]]:
    """The student cells named in ``keys`` (all when None) and the teachers they need."""
    if keys is None:
        return list(teachers), list(students)
    valid = [c.key for c in students]
    unknown = [k for k in keys if k not in valid]
    if unknown or not keys:
        raise ValueError(f"cells={list(keys)!r}: unknown cell(s) {unknown}; valid: "
                         f"{', '.join(valid)}.")
    chosen = [c for c in students if c.key in keys]
    needed = {c.teacher for c in chosen}
    return [t for t in teachers if t.key in needed], chosen


def cell_dir(workdir: str, key: str, seed: int) -> str:
    """The run directory of ``key`` at ``seed``: ``<workdir>/<key>/seed<seed>``."""
    return os.path.join(workdir, *key.split("/"), f"seed{seed}")


def set_key(config, dotted: str, value: Any) -> None:
    """``config.<dotted> = value`` on an unlocked ConfigDict (``dotted`` like ``run.progress``)."""
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value


def build_config(cell: Cell, dataset: str, seed: int, workdir: str, smoke: bool):
    """The locked experiment config of ``cell`` at ``seed`` (teacher path, smoke, run overrides)."""
    from experiments.configs import small

    parts = [cell.arg] if cell.arg else []
    if cell.teacher is not None:
        parts.append(f"source=checkpoint,path={cell_dir(workdir, cell.teacher, seed)}")
    if smoke:
        parts.append("smoke")
    getter = small.eskd_config if cell.config == "eskd" else small.fitnet_config
    config = getter(dataset, ",".join(parts))
    config.unlock()
    config.seed = seed
    for key, value in RUN_OVERRIDES + tuple(cell.overrides):
        set_key(config, key, value)
    if smoke and dataset == "mnist1d":
        config.dataset.num_samples = SMOKE_SAMPLES
    return config.lock()


# ------------------------------------------------------------------------------------------------
# Running one (cell, seed).
# ------------------------------------------------------------------------------------------------


def run_fitnet_kd_only(config, workdir: str):
    """FitNet's stage 2 alone: the thin-and-deep student from its random initialisation, distilled
    by :func:`experiments.stages.fitnet_kd_stage` (the same loss, optimizer and epochs as
    :func:`experiments.runs.run_fitnet`'s stage 2) but without the hint stage, so the two differ
    only in the hints. Returns the student stage's summary."""
    from experiments import rundir, stages, validate

    validate.validate_config(config, "fitnet")
    ctx = stages.make_context(config, workdir)
    c, data = ctx.config, ctx.data
    teacher, _ = stages.obtain_teacher(ctx)
    module = validate.build_model(c.student.model, data.num_classes, c.student.dtype)
    stage = stages.fitnet_kd_stage(ctx, teacher, module, name="student", role="student",
                                   row={"kd_mode": "kd_only"})
    outcome = stages.run_stage(stage, ctx)
    if outcome.stopped_early:
        raise RuntimeError(f"{workdir} was preempted; run the command again to resume it.")
    outcome.summary["dir"] = os.path.join(rundir.STAGES_DIR, outcome.summary["stage"])
    return outcome.summary


def _curves(stage_dir: str) -> dict[str, list]:
    """Train ``[step, loss/ce, loss/kd]`` and eval ``[step, accuracy, kl, agreement]`` records."""
    from kdjax import metrics as metrics_lib

    path = os.path.join(stage_dir, metrics_lib.JSONL_NAME)
    records = metrics_lib.read_jsonl(path) if os.path.exists(path) else []
    train = [[r["step"], r.get("loss/ce"), r.get("loss/kd")] for r in records
             if r.get("kind") == "train"]
    evals = [[r["step"], r.get("accuracy"), r.get("kl"), r.get("agreement")] for r in records
             if r.get("kind") == "eval"]
    return {"train": train, "eval": evals}


def code_version() -> str:
    """The first 12 hex digits of a SHA-256 over the sources a run executes (the ``.py`` files of
    ``kdjax/`` and ``experiments/`` in sorted order, this driver excepted: what it changes in a
    run shows in the run's config, which :func:`stale_reason` checks): records of runs trained by
    different code show different versions in the report."""
    import hashlib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for package in ("kdjax", "experiments"):
        for folder, _, files in sorted(os.walk(os.path.join(root, package))):
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(folder, name)
                if os.path.samefile(path, __file__):
                    continue
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


def enable_compilation_cache(directory: str) -> None:
    """Turns on JAX's persistent compilation cache in ``directory`` for this process.

    The seeds of a cell compile exactly the same train and eval steps, so with the cache only the
    first seed of each cell pays for XLA's compiles (seconds per run on a busy 2-core CPU, more
    than the training itself in smoke runs). Results are unchanged: the cache stores compiled
    executables keyed by the computation and the compile options.
    """
    import jax

    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


#: Config keys a teacher run does not read (``train_teacher`` trains ``teacher.model`` on labels):
#: a change there leaves a trained teacher valid.
TEACHER_IGNORED = ("student.", "kd.", "fitnet.", "assistants", "name", "paper.")


def stale_reason(directory: str, config, teacher_dir: str | None,
                 ignore: Sequence[str] = ()) -> str | None:
    """Why the run in ``directory`` cannot be reused for ``config`` (None: it can, or is new).

    Stale when the config it was started with (``config.json``, written by the experiment
    modules) differs from ``config`` in a key not starting with one of ``ignore`` (e.g.
    ``experiments/configs/small.py`` changed since), or when its teacher's run finished after it
    (the teacher was retrained).
    """
    from experiments import rundir

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
    from experiments import rundir

    directory = cell_dir(workdir, cell.key, seed)
    path = os.path.join(directory, RECORD_FILE)
    config = build_config(cell, dataset, seed, workdir, smoke)
    teacher_dir = cell_dir(workdir, cell.teacher, seed) if cell.teacher else None
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
        from experiments import imagenet_eskd, imagenet_fitnet, train_teacher

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


def finite_or_none(tree: Any) -> Any:
    """``tree`` with every non-finite float (an undefined std or p-value) as None: strict JSON."""
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    if isinstance(tree, Mapping):
        return {k: finite_or_none(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [finite_or_none(v) for v in tree]
    return tree


def write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as strict JSON (non-finite floats as null) atomically: a temporary file,
    then a rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(finite_or_none(obj), fh, indent=1, sort_keys=True, allow_nan=False)
        fh.write("\n")
    os.replace(tmp, path)


def _exit_when_orphaned(parent: int) -> None:
    """Worker initializer: a daemon thread ends the worker (``os._exit``) within 2 s of the driver
    process ``parent`` going away, so a killed driver never leaves workers writing into the
    workdir (an unfinished run resumes or restarts cleanly next time)."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2.0)
        os._exit(1)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


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
                                                initializer=_exit_when_orphaned,
                                                initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(_run_job, job): job for job in jobs}
        for i, future in enumerate(concurrent.futures.as_completed(futures), 1):
            done(i, futures[future], future.result())
    return records


# ------------------------------------------------------------------------------------------------
# Statistics and verdicts.
# ------------------------------------------------------------------------------------------------


def summarize(values: Sequence[float]) -> dict:
    """``{'n', 'mean', 'std'}`` of ``values``; ``std`` is the sample standard deviation (ddof 1;
    NaN for one value)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"summarize: values must be a non-empty 1-D sequence; got shape {x.shape}.")
    return {"n": int(x.size), "mean": float(x.mean()),
            "std": float(x.std(ddof=1)) if x.size > 1 else math.nan}


def _constant(x: np.ndarray) -> bool:
    """True when all values are equal up to float rounding (a t-test is undefined then)."""
    return bool(np.ptp(x) <= 1e-12 * max(1.0, float(np.max(np.abs(x)))))


def compare(a: Mapping[int, float], b: Mapping[int, float]) -> dict:
    """Cell ``a`` against cell ``b`` over seeds: ``a`` and ``b`` map seed -> value.

    Returns ``diff`` (mean(a) - mean(b)), Welch's t-test over all values (``welch_t``,
    ``welch_p``: ``scipy.stats.ttest_ind(a, b, equal_var=False)``, two-sided) and the paired t-test
    over the seeds both have (``paired_t``, ``paired_p``: ``scipy.stats.ttest_rel``, two-sided;
    ``n_paired``). A test is undefined (t and p NaN) with fewer than two values per side, when
    both samples are constant (Welch) or when the paired differences are constant (paired).
    """
    from scipy import stats

    if len(a) < 1 or len(b) < 1:
        raise ValueError(f"compare: both cells need values; got {len(a)} and {len(b)} seeds.")
    xa = np.array([a[s] for s in sorted(a)], np.float64)
    xb = np.array([b[s] for s in sorted(b)], np.float64)
    common_seeds = sorted(set(a) & set(b))
    da = np.array([a[s] - b[s] for s in common_seeds], np.float64)
    out = {"diff": float(xa.mean() - xb.mean()), "n_a": int(xa.size), "n_b": int(xb.size),
           "n_paired": len(common_seeds), "welch_t": math.nan, "welch_p": math.nan,
           "paired_t": math.nan, "paired_p": math.nan}
    with warnings.catch_warnings():
        # One constant sample (e.g. every seed at the same top-1) is fine for Welch's test, but
        # scipy warns about its zero variance; the undefined cases are excluded above.
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        if xa.size > 1 and xb.size > 1 and not (_constant(xa) and _constant(xb)):
            t, p = stats.ttest_ind(xa, xb, equal_var=False)
            out["welch_t"], out["welch_p"] = float(t), float(p)
        if da.size > 1 and not _constant(da):
            t, p = stats.ttest_rel([a[s] for s in common_seeds], [b[s] for s in common_seeds])
            out["paired_t"], out["paired_p"] = float(t), float(p)
    return out


def direction(comparison: Mapping[str, float], alpha: float = ALPHA) -> str:
    """``'higher'`` / ``'lower'`` (the sign of ``diff``) when BOTH Welch's and the paired test give
    p < ``alpha``; else ``'n.s.'`` (an undefined, NaN p-value counts as not significant)."""
    p_values = (comparison["welch_p"], comparison["paired_p"])
    if all(p == p and p < alpha for p in p_values):
        return "higher" if comparison["diff"] > 0 else "lower"
    return "n.s."


CLAIM_KINDS = ("higher", "lower", "not_higher")


def verdict(comparison: Mapping[str, float], claim: str, alpha: float = ALPHA) -> str:
    """Whether a comparison ``a - b`` supports what a claim predicts for it.

    ``claim='higher'`` (``'lower'``): the claim predicts ``a > b`` (``a < b``): agree if
    significantly so, disagree if significantly the other way. ``claim='not_higher'``: the claim
    says ``a`` is no better than ``b``: disagree if significantly higher, agree if significantly
    lower. No significant difference is ``'inconclusive'`` in every case (for ``not_higher`` it is
    consistent with the claim, but a few seeds cannot exclude a small gain).
    """
    if claim not in CLAIM_KINDS:
        raise ValueError(f"verdict: claim={claim!r} is not valid; valid: {', '.join(CLAIM_KINDS)}.")
    d = direction(comparison, alpha)
    if d == "n.s.":
        return "inconclusive"
    if claim == "higher":
        return "agree" if d == "higher" else "disagree"
    if claim == "lower":
        return "agree" if d == "lower" else "disagree"
    return "disagree" if d == "higher" else "agree"


def combine(verdicts: Sequence[str]) -> str:
    """One verdict for a claim tested by several comparisons: the common verdict if all are the
    same, else ``'mixed (k agree, l inconclusive, m disagree)'``."""
    if not verdicts:
        raise ValueError("combine: no verdicts to combine.")
    if len(set(verdicts)) == 1:
        return verdicts[0]
    counts = {v: sum(1 for x in verdicts if x == v) for v in ("agree", "inconclusive", "disagree")}
    return (f"mixed ({counts['agree']} agree, {counts['inconclusive']} inconclusive, "
            f"{counts['disagree']} disagree)")


# ------------------------------------------------------------------------------------------------
# Collecting results.
# ------------------------------------------------------------------------------------------------


def by_cell(records: Sequence[Mapping[str, Any]], metric: str = "accuracy") -> dict[str, dict]:
    """``{cell: {seed: value}}`` of ``metric`` over the records (records without it are left out)."""
    out: dict[str, dict] = {}
    for r in records:
        if r.get(metric) is not None:
            out.setdefault(r["cell"], {})[r["seed"]] = float(r[metric])
    return out


def fmt_pct(stats: Mapping[str, float] | None) -> str:
    """``mean ± std`` of a fraction, in percent with two decimals (``-`` when missing)."""
    if not stats:
        return "-"
    std = "n/a" if stats["std"] != stats["std"] else f"{100 * stats['std']:.2f}"
    return f"{100 * stats['mean']:.2f} ± {std}"


def fmt_num(stats: Mapping[str, float] | None, digits: int = 3) -> str:
    """``mean ± std`` of a plain number (``-`` when missing)."""
    if not stats:
        return "-"
    std = "n/a" if stats["std"] != stats["std"] else f"{stats['std']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {std}"


def fmt_p(p: float) -> str:
    """A p-value as text (``n/a`` when undefined)."""
    if p != p:
        return "n/a"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def fmt_diff(diff: float, metric: str) -> str:
    """A difference of means: points of top-1 for ``accuracy``, the raw value otherwise."""
    return f"{100 * diff:+.2f} points" if metric == "accuracy" else f"{diff:+.4f}"


def comparison_text(result: Mapping[str, Any]) -> str:
    """One comparison in words: the difference of means and both p-values."""
    sig = "significant at 0.05 (both tests)" if direction(result) != "n.s." else (
        "not significant at 0.05")
    return (f"{result['name']}: {fmt_diff(result['diff'], result['metric'])} (Welch p = "
            f"{fmt_p(result['welch_p'])}, paired p = {fmt_p(result['paired_p'])}; {sig})")


def claims(sizes: Sequence[str] = SIZES) -> list[dict]:
    """The papers' claims and the comparisons that test each.

    Each claim: ``id``, ``claim`` (in words), ``paper`` (the published evidence), ``core`` (one of
    the four claims the reproduction must answer, or a supporting one) and ``tests``:
    ``(name, cell a, cell b, what the claim predicts for a - b, metric)``.
    """
    pairs = [(sizes[j], sizes[i]) for i in range(len(sizes)) for j in range(i + 1, len(sizes))]
    paper_full = ("ImageNet, student ResNet-18 error: scratch 30.24; full KD 30.57 / 30.79 / 30.95 "
                  "from ResNet-18 / 34 / 50 teachers (teacher errors 30.24 / 26.70 / 23.85)")
    paper_eskd = ("ImageNet, student ResNet-18 error with ESKD 29.01 / 29.16 / 29.35 vs full KD "
                  "30.57 / 30.79 / 30.95 (ResNet-18 / 34 / 50 teachers) and scratch 30.24")

    def eskd_tests(reading: str) -> list:
        return [t for size in sizes for t in (
            (f"ESKD {reading} <- {size} minus full KD <- {size}", f"eskd_{reading}/{size}",
             f"full/{size}", "higher", "accuracy"),
            (f"ESKD {reading} <- {size} minus scratch", f"eskd_{reading}/{size}", "scratch",
             "higher", "accuracy"))]

    return [
        {"id": "bigger_teacher", "core": True,
         "claim": "Under full KD a bigger, more accurate teacher does not give a better student "
                  "(ESKD paper, claim a)", "paper": paper_full,
         "tests": [(f"full KD <- {big} minus full KD <- {little}", f"full/{big}",
                    f"full/{little}", "not_higher", "accuracy") for big, little in pairs]},
        {"id": "eskd_stop", "core": True,
         "claim": "ESKD beats full KD and training from scratch, `stop_kd` reading: KD switched "
                  "off at the stop epoch (ESKD paper, claim d)", "paper": paper_eskd,
         "tests": eskd_tests("stop")},
        {"id": "eskd_early", "core": True,
         "claim": "ESKD beats full KD and training from scratch, `early_teacher` reading: an "
                  "early-epoch teacher (ESKD paper's abstract, claim d)", "paper": paper_eskd,
         "tests": eskd_tests("early")},
        {"id": "hints", "core": True, "claim": "Hints help thin-and-deep students (FitNets)",
         "paper": "CIFAR-10: a 19-layer thin FitNet (~2.5M parameters) beats its ~9M-parameter "
                  "maxout teacher; the paper credits the hint stage for training thin, deep "
                  "students that KD alone trains poorly",
         "tests": [("FitNet (hints + KD) minus KD only", "fitnet/hint_kd", "fitnet/kd_only",
                    "higher", "accuracy"),
                   ("FitNet (hints + KD) minus scratch", "fitnet/hint_kd", "fitnet/scratch",
                    "higher", "accuracy")]},
        {"id": "ta", "core": True,
         "claim": "A teacher assistant does not fix the capacity gap (ESKD paper, claim c; "
                  "Mirzadeh et al. claim it does)",
         "paper": "ESKD paper: distilling through a sequence of intermediate sizes does not remove "
                  "the gap on ImageNet",
         "tests": [(f"TA chain large -> medium -> student minus direct {size} -> student",
                    "ta/large-medium", f"full/{size}", "not_higher", "accuracy")
                   for size in reversed(sizes)]},
        {"id": "kd_vs_scratch", "core": False,
         "claim": "Full KD can lose to training from scratch (ESKD paper, claim a)",
         "paper": paper_full,
         "tests": [(f"full KD <- {size} minus scratch", f"full/{size}", "scratch", "lower",
                    "accuracy") for size in sizes]},
        {"id": "mimic", "core": False,
         "claim": "The student fails to mimic a bigger teacher: its eval KL(p_t || p_s) to the "
                  "teacher is larger (ESKD paper, claim b)",
         "paper": "the paper's explanation of claim a: a small student trades cross-entropy for "
                  "KD loss and cannot follow a large teacher",
         "tests": [(f"KL to {big} teacher minus KL to {little} teacher", f"full/{big}",
                    f"full/{little}", "higher", "kl") for big, little in pairs]},
    ]


def evaluate_claims(values: Mapping[str, Mapping[str, Mapping[int, float]]],
                    sizes: Sequence[str] = SIZES) -> list[dict]:
    """Runs every claim's comparisons on ``values`` (``{metric: {cell: {seed: value}}}``, e.g.
    ``{'accuracy': by_cell(records), 'kl': by_cell(records, 'kl')}``); comparisons whose cells are
    missing are left out. Each claim gets ``results`` (name, cells, metric, :func:`compare`'s
    numbers, verdict) and an overall ``verdict`` (:func:`combine`; ``not run`` without results)."""
    out = []
    for claim in claims(sizes):
        results = []
        for name, a, b, kind, metric in claim["tests"]:
            cells = values.get(metric, {})
            if cells.get(a) and cells.get(b):
                c = compare(cells[a], cells[b])
                results.append({"name": name, "a": a, "b": b, "claim": kind, "metric": metric,
                                **c, "verdict": verdict(c, kind)})
        overall = combine([r["verdict"] for r in results]) if results else "not run"
        out.append({**{k: v for k, v in claim.items() if k != "tests"}, "results": results,
                    "verdict": overall})
    return out


# ------------------------------------------------------------------------------------------------
# Tables.
# ------------------------------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _stats(values: Mapping[int, float] | None) -> dict | None:
    return summarize(list(values.values())) if values else None


def eskd_table(acc: Mapping, teacher_acc: Mapping, settings: Mapping,
               sizes: Sequence[str] = SIZES, early_acc: Mapping | None = None) -> str:
    """Table 1: eval top-1 (%) of the student per teacher (rows) and KD mode (columns).

    ``early_acc``: ``{cell: {seed: top-1}}`` of the early-epoch teachers (the ``teacher_accuracy``
    that the ``eskd_early`` runs measured)."""
    early_acc = early_acc or {}
    rows = [["none (scratch)", f"`{settings['student']}`", "-", "-",
             fmt_pct(_stats(acc.get("scratch"))), "-", "-"]]
    for size in sizes:
        rows.append([size, f"`{settings['teachers'][size]}`",
                     fmt_pct(_stats(teacher_acc.get(f"teacher/{size}"))),
                     fmt_pct(_stats(early_acc.get(f"eskd_early/{size}"))),
                     fmt_pct(_stats(acc.get(f"full/{size}"))),
                     fmt_pct(_stats(acc.get(f"eskd_stop/{size}"))),
                     fmt_pct(_stats(acc.get(f"eskd_early/{size}")))])
    return markdown_table(["teacher", "teacher model", "teacher top-1", "early teacher top-1",
                           "student: full KD / scratch", "student: ESKD stop_kd",
                           "student: ESKD early_teacher"], rows)


def collapsed_runs(records: Sequence[Mapping], num_classes: int) -> list[dict]:
    """Runs whose final eval top-1 is below twice chance (``2 / num_classes``): the network died
    or diverged (e.g. every ReLU off: constant logits, eval CE = ln C). They stay in the
    statistics (they are what the protocol produced) and the report lists them."""
    return [{"cell": r["cell"], "seed": r["seed"], "accuracy": r["accuracy"], "ce": r.get("ce")}
            for r in sorted(records, key=lambda r: (r["cell"], r["seed"]))
            if r.get("accuracy") is not None and r["accuracy"] < 2.0 / num_classes]


def mimic_table(records: Sequence[Mapping], sizes: Sequence[str] = SIZES) -> str:
    """Table 2: how well the full-KD student mimics each teacher at the end of training."""
    metrics = {m: by_cell(records, m) for m in ("train_kd", "train_ce", "kl", "agreement",
                                                "accuracy")}
    rows = []
    for size in sizes:
        key = f"full/{size}"
        rows.append([size, fmt_num(_stats(metrics["train_kd"].get(key))),
                     fmt_num(_stats(metrics["train_ce"].get(key))),
                     fmt_num(_stats(metrics["kl"].get(key))),
                     fmt_pct(_stats(metrics["agreement"].get(key)))])
    return markdown_table(["teacher (full KD)", "train KD loss T^2 KL (T=4), last log",
                           "train CE, last log", "eval KL(p_t || p_s), T=1", "eval agreement (%)"],
                          rows)


def fitnet_ta_table(acc: Mapping, teacher_acc: Mapping, settings: Mapping,
                    assistant_acc: Mapping[int, float] | None = None) -> str:
    """Table 3: the FitNet comparison and the teacher-assistant chain (``assistant_acc``: seed ->
    top-1 of the chain's assistant stage)."""
    rows = [
        ["FitNet teacher", f"`{settings['fitnet_teacher']}`",
         fmt_pct(_stats(teacher_acc.get("teacher/fitnet")))],
        ["thin-deep student from scratch", f"`{settings['fitnet_student']}`",
         fmt_pct(_stats(acc.get("fitnet/scratch")))],
        ["thin-deep student, KD only (FitNet stage 2 alone)", f"`{settings['fitnet_student']}`",
         fmt_pct(_stats(acc.get("fitnet/kd_only")))],
        ["thin-deep student, FitNet (hints, then KD)", f"`{settings['fitnet_student']}`",
         fmt_pct(_stats(acc.get("fitnet/hint_kd")))],
        ["direct large -> student (full KD)", f"`{settings['student']}`",
         fmt_pct(_stats(acc.get("full/large")))],
        ["TA chain: the assistant (medium size, distilled from large)",
         f"`{settings['teachers']['medium']}`", fmt_pct(_stats(assistant_acc))],
        ["TA chain large -> medium -> student (full KD)", f"`{settings['student']}`",
         fmt_pct(_stats(acc.get("ta/large-medium")))],
    ]
    return markdown_table(["run", "model", "eval top-1 (%)"], rows)


PREDICTS = {"higher": "a > b", "lower": "a < b", "not_higher": "a not > b"}


def comparisons_table(claim_results: Sequence[Mapping]) -> str:
    """Table 4: every comparison behind the verdicts."""
    rows = []
    for claim in claim_results:
        for r in claim["results"]:
            rows.append([claim["id"], r["name"], fmt_diff(r["diff"], r["metric"]),
                         fmt_p(r["welch_p"]), fmt_p(r["paired_p"]), str(r["n_paired"]),
                         PREDICTS[r["claim"]], r["verdict"]])
    return markdown_table(["claim", "comparison a - b", "diff of means", "Welch p", "paired p",
                           "paired seeds", "claim predicts", "verdict"], rows)


# ------------------------------------------------------------------------------------------------
# Plots.
# ------------------------------------------------------------------------------------------------


def _figure(panels: int, height: float = 4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * panels, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, panels, squeeze=False)[0]


def plot_accuracy_vs_teacher(acc: Mapping, teacher_acc: Mapping, params: Mapping[str, int],
                             path: str, sizes: Sequence[str] = SIZES) -> str:
    """Student eval top-1 (mean ± std over seeds) against teacher size: full KD, ESKD (both
    readings), the teachers themselves, and the scratch student as a band."""
    fig, (ax,) = _figure(1, 4.6)
    x = np.arange(len(sizes))
    for i, (prefix, label) in enumerate((("full", "full KD"), ("eskd_stop", "ESKD stop_kd"),
                                         ("eskd_early", "ESKD early_teacher"))):
        stats = [_stats(acc.get(f"{prefix}/{s}")) for s in sizes]
        keep = [j for j, st in enumerate(stats) if st]
        if keep:
            ax.errorbar(x[keep] + (i - 1) * 0.06, [100 * stats[j]["mean"] for j in keep],
                        yerr=[100 * np.nan_to_num(stats[j]["std"]) for j in keep], marker="o",
                        capsize=3, label=label, color=f"C{i}")
    scratch = _stats(acc.get("scratch"))
    if scratch:
        m, s = 100 * scratch["mean"], 100 * np.nan_to_num(scratch["std"])
        ax.axhline(m, color="k", linestyle="--", linewidth=1, label="scratch")
        ax.axhspan(m - s, m + s, color="k", alpha=0.1)
    ticks = []
    for s in sizes:
        st = _stats(teacher_acc.get(f"teacher/{s}"))
        ticks.append(f"{s}\n{params.get(s, 0):,} params" +
                     (f"\nteacher {100 * st['mean']:.1f}%" if st else ""))
    ax.set_xticks(x, ticks)
    ax.set_ylabel("student eval top-1 (%)")
    ax.set_title("student accuracy vs teacher size (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)
    return path


def _mean_curve(curves: Sequence[Sequence[Sequence]], column: int) -> tuple[list, list, list]:
    """Steps, mean and std over seeds of one column of per-seed ``[step, ...]`` rows (the steps
    every seed logged)."""
    per_seed = [{row[0]: row[column] for row in c if row[column] is not None} for c in curves]
    steps = sorted(set.intersection(*(set(d) for d in per_seed))) if per_seed else []
    values = np.array([[d[s] for s in steps] for d in per_seed], np.float64).reshape(
        len(per_seed), len(steps))
    return steps, list(values.mean(0)), list(values.std(0))


def plot_mimic(records: Sequence[Mapping], path: str, sizes: Sequence[str] = SIZES) -> str:
    """The 'student fails to mimic the teacher' view over training, full KD, one curve per teacher
    size (mean ± std over seeds): train KD loss, train CE, eval KL(p_t || p_s) at T = 1."""
    fig, axes = _figure(3)
    panels = (("train", 2, "train KD loss T^2 KL(p_t^T || p_s^T), T = 4"),
              ("train", 1, "train cross-entropy"), ("eval", 2, "eval KL(p_t || p_s), T = 1"))
    for ax, (kind, column, title) in zip(axes, panels):
        for i, size in enumerate(sizes):
            curves = [r["curves"][kind] for r in records if r["cell"] == f"full/{size}"]
            if not curves:
                continue
            steps, mean, std = _mean_curve(curves, column)
            ax.plot(steps, mean, color=f"C{i}", label=f"full KD <- {size}")
            ax.fill_between(steps, np.subtract(mean, std), np.add(mean, std), color=f"C{i}",
                            alpha=0.2)
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize="small")
    fig.savefig(path, dpi=100)
    return path


def plot_fitnet_ta(acc: Mapping, path: str) -> str:
    """Bars (mean ± std, seeds as dots): thin-deep scratch / KD only / FitNet; the small student
    from scratch, by full KD from each teacher, and through the TA chain."""
    fig, axes = _figure(2)
    groups = ((("fitnet/scratch", "scratch"), ("fitnet/kd_only", "KD only"),
               ("fitnet/hint_kd", "hints + KD")),
              (("scratch", "scratch"), ("full/small", "direct\nsmall"),
               ("full/medium", "direct\nmedium"), ("full/large", "direct\nlarge"),
               ("ta/large-medium", "TA chain\nlarge->medium")))
    titles = ("thin-and-deep student (FitNet)", "small student: teacher-assistant chain")
    for ax, group, title in zip(axes, groups, titles):
        for i, (key, label) in enumerate(group):
            values = acc.get(key)
            if not values:
                continue
            v = 100 * np.array(list(values.values()))
            ax.bar(i, v.mean(), yerr=v.std(ddof=1) if v.size > 1 else 0, color=f"C{i}",
                   alpha=0.6, capsize=4)
            ax.plot(np.full(v.size, i), v, "k.", markersize=4)
        ax.set_xticks(range(len(group)), [label for _, label in group])
        present = [100 * x for key, _ in group for x in (acc.get(key) or {}).values()]
        if present:
            ax.set_ylim(min(present) - 3, max(present) + 2)
        ax.set_ylabel("eval top-1 (%)")
        ax.set_title(title, fontsize="medium")
        ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=100)
    return path


# ------------------------------------------------------------------------------------------------
# Report.
# ------------------------------------------------------------------------------------------------


def count_params(spec: str, sample_input: np.ndarray, num_classes: int) -> int:
    """Parameters of a model spec (shapes only, nothing computed)."""
    from experiments.validate import build_model
    from experiments.rundir import abstract_variables

    variables = abstract_variables(build_model(spec, num_classes), sample_input)
    return int(sum(np.prod(x.shape) for x in _leaves(variables["params"])))


def _leaves(tree) -> list:
    import jax

    return jax.tree.leaves(tree)


def setup_info(dataset: str, smoke: bool) -> dict:
    """Dataset sizes, model parameter counts and the training settings of the grid's configs."""
    from experiments.configs import small
    from experiments.datasets import build_data

    s = small.SETTINGS[dataset]
    kd = build_config(Cell("x", "kd", "eskd", "teacher=large,mode=eskd", ""), dataset, 0, "/", smoke)
    early = build_config(Cell("x", "kd", "eskd", "teacher=large,mode=eskd,reading=early_teacher",
                              ""), dataset, 0, "/", smoke)
    fit = build_config(Cell("x", "fitnet", "fitnet", "", ""), dataset, 0, "/", smoke)
    data = build_data(kd.dataset, 0)
    specs = {**s["teachers"], "student": s["student"], "fitnet_teacher": s["fitnet_teacher"],
             "fitnet_student": s["fitnet_student"]}
    params = {k: count_params(v, data.sample_input, data.num_classes) for k, v in specs.items()}
    return {
        "dataset": dataset, "smoke": smoke,
        "train_examples": data.num_examples(data.train_split),
        "eval_examples": data.num_examples(data.eval_split), "eval_split": data.eval_split,
        "num_classes": data.num_classes, "models": specs, "params": params,
        "epochs": kd.num_epochs, "steps_per_epoch": data.steps_per_epoch,
        "batch_size": kd.dataset.batch_size,
        "optimizer": {"name": kd.optimizer.name, "lr": kd.optimizer.lr,
                      "lr_batch": kd.optimizer.lr_batch, "momentum": kd.optimizer.momentum,
                      "weight_decay": kd.optimizer.weight_decay,
                      "decay_epochs": list(kd.optimizer.decay_epochs)},
        "temperature": kd.kd.temperature, "kd_weight": kd.kd.weight, "ce_weight": kd.kd.ce_weight,
        "stop_epoch": kd.kd.stop_epoch, "early_teacher_epoch": early.teacher.early_epoch,
        "fitnet": {"lr": fit.optimizer.lr, "teacher_lr": fit.teacher.lr or fit.optimizer.lr,
                   "stage1_epochs": fit.fitnet.stage1_epochs,
                   "stage1_schedule": fit.fitnet.stage1_schedule,
                   "hint_layer": fit.fitnet.hint_layer, "guided_layer": fit.fitnet.guided_layer,
                   "regressor_relu": fit.fitnet.regressor_relu,
                   "temperature": fit.fitnet.temperature,
                   "weight_start": fit.fitnet.weight_start, "weight_end": fit.fitnet.weight_end},
    }


def machine_info() -> dict:
    """Where the numbers were measured."""
    import jax

    return {"platform": platform.platform(), "processor": platform.processor() or "unknown",
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "jax": jax.__version__, "devices": [str(d) for d in jax.devices()]}


def _runs(n: int) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


def code_versions(records: Sequence[Mapping]) -> dict[str, int]:
    """``{code version: number of runs}`` over the records."""
    out: dict[str, int] = {}
    for r in records:
        out[r.get("code", "unknown")] = out.get(r.get("code", "unknown"), 0) + 1
    return out


def timing_text(timing: Mapping[str, Any]) -> str:
    """The measured wall time: every invocation of the command that produced these runs."""
    parts = []
    for inv in timing["invocations"]:
        parts.append(f"{inv['started']}: {inv['wall_s'] / 60:.1f} min wall, {inv['jobs']} worker "
                     f"process(es), {_runs(inv['ran'])} trained, {inv['reused']} reused; load "
                     f"average {inv['load_start']} at the start, {inv['load_end']} at the end")
    trained = sum(inv["wall_s"] for inv in timing["invocations"] if inv["ran"])
    return (f"- Wall time: {trained / 60:.1f} min in total for the invocations that trained "
            f"runs (sum of the {timing['total']} runs' own times: {timing['runs_s'] / 60:.1f} "
            f"min). Invocations: " + "; ".join(parts) + ". The 2-core CPU was shared with other "
            f"processes (load average above 2), so these times are upper bounds of the time on "
            f"an idle machine.")


def verdict_table(claim_results: Sequence[Mapping]) -> str:
    """One row per claim: the claim, its verdict and every comparison behind it, in short."""
    return markdown_table(["claim", "verdict", "evidence"], [
        [c["claim"], f"**{c['verdict']}**",
         "; ".join(f"{r['name']}: {fmt_diff(r['diff'], r['metric'])} ({fmt_p(r['welch_p'])} / "
                   f"{fmt_p(r['paired_p'])})" for r in c["results"]) or "-"]
        for c in claim_results])


def _claim_section(claim: Mapping) -> list[str]:
    lines = [f"### {claim['claim']}", "", f"Paper: {claim['paper']}.", "",
             f"**Verdict: {claim['verdict']}.**", ""]
    for r in claim["results"]:
        lines.append(f"- {comparison_text(r)} -> {r['verdict']}.")
    return lines + [""]


def write_report(out: str, *, setup: Mapping, machine: Mapping, records: Sequence[Mapping],
                 seeds: Sequence[int], timing: Mapping, command: str,
                 sizes: Sequence[str] = SIZES) -> dict:
    """Writes ``README.md``, the plots and ``results.json`` into ``out``; returns the JSON object."""
    from experiments.configs import small

    os.makedirs(out, exist_ok=True)
    settings = small.SETTINGS[setup["dataset"]]
    acc = by_cell(records)
    teacher_acc = {k: v for k, v in acc.items() if k.startswith("teacher/")}
    claim_results = evaluate_claims({"accuracy": acc, "kl": by_cell(records, "kl")}, sizes)
    collapsed = collapsed_runs(records, setup["num_classes"])
    plot_accuracy_vs_teacher(acc, teacher_acc, setup["params"], os.path.join(out, ACCURACY_PLOT),
                             sizes)
    plot_mimic(records, os.path.join(out, MIMIC_PLOT), sizes)
    plot_fitnet_ta(acc, os.path.join(out, FITNET_TA_PLOT))

    p = setup["params"]
    o = setup["optimizer"]
    f = setup["fitnet"]
    lines = [f"# CPU-scale reproduction of the ESKD and FitNet claims ({setup['dataset']})", ""]
    if setup["smoke"]:
        lines += ["**SMOKE RUN: two short epochs on a slice of the data. These numbers only show "
                  "that the pipeline runs; they say nothing about the claims.**", ""]
    lines += [
        f"Regenerate with `{command}` (see docs/experiments.md). Every number below was measured "
        f"by that command; nothing is copied or extrapolated. Per-seed numbers: "
        f"[`{RESULTS_JSON}`]({RESULTS_JSON}).", "",
        "## Setup", "",
        f"- Data: {setup['dataset']}, {setup['train_examples']} train / {setup['eval_examples']} "
        f"{setup['eval_split']} examples, {setup['num_classes']} classes; top-1 is measured on "
        f"the {setup['eval_split']} split after the last step.",
        f"- Student `{settings['student']}` ({p['student']:,} parameters); teachers small "
        f"`{settings['teachers']['small']}` ({p['small']:,}), medium "
        f"`{settings['teachers']['medium']}` ({p['medium']:,}), large "
        f"`{settings['teachers']['large']}` ({p['large']:,}).",
        f"- Training (teachers and students alike): {setup['epochs']} epochs x "
        f"{setup['steps_per_epoch']} steps, batch {setup['batch_size']}, {o['name']} momentum "
        f"{o['momentum']}, learning rate {o['lr']} x batch / {o['lr_batch']}, divided by 10 at "
        f"epochs {o['decay_epochs']}, weight decay {o['weight_decay']}.",
        f"- KD: `{setup['ce_weight']} CE + {setup['kd_weight']} T^2 KL(p_t^T || p_s^T)`, "
        f"T = {setup['temperature']}. ESKD `stop_kd`: the KD term off from epoch "
        f"{setup['stop_epoch']} (then CE with weight 1). ESKD `early_teacher`: full KD from the "
        f"teacher's epoch-{setup['early_teacher_epoch']} snapshot.",
        f"- Teacher-assistant chain: the medium-size model distilled from the large teacher "
        f"(full KD), then the student distilled from it; both links with the settings above.",
        f"- FitNet: teacher `{settings['fitnet_teacher']}` ({p['fitnet_teacher']:,}; trained at "
        f"learning rate {f['teacher_lr']} x batch / {o['lr_batch']}), thin-and-deep "
        f"student `{settings['fitnet_student']}` ({p['fitnet_student']:,}); stage 1 "
        f"{f['stage1_epochs']} epochs ({f['stage1_schedule']} schedule) on the hint loss between "
        f"the teacher's `{f['hint_layer']}` and a 1x1-conv regressor"
        f"{' ending in a ReLU' if f['regressor_relu'] else ''} on the student's "
        f"`{f['guided_layer']}` (only the layers up to it trained); stage 2 {setup['epochs']} "
        f"epochs of `CE + lambda H(p_t^T, p_s^T)`, T = {f['temperature']}, lambda "
        f"{f['weight_start']} -> {f['weight_end']}; learning rate {f['lr']} x batch / "
        f"{o['lr_batch']} (the FitNet config's). KD only: stage 2 alone from a random "
        f"initialisation. Scratch: CE alone, same learning rate and epochs.",
        f"- Seeds: {len(seeds)} ({', '.join(map(str, seeds))}); seed s sets the initialisation "
        f"and data order of the teacher and of every student of seed s, and the seed-s "
        f"students all distil from the seed-s teachers, so comparisons are paired by seed.",
        f"- Statistics: mean ± sample std (ddof 1) over seeds. Each comparison `a - b` gets "
        f"Welch's t-test (`scipy.stats.ttest_ind(equal_var=False)`) and the paired t-test over "
        f"seeds (`ttest_rel`); a difference counts as significant only when BOTH give p < "
        f"{ALPHA}. Verdicts: agree / disagree when significant in the claim's / the opposite "
        f"direction; inconclusive otherwise (with {len(seeds)} seeds a difference below about "
        f"one std is not detectable).",
        f"- Machine: {machine['platform']}, {machine['cpu_count']} CPU cores, Python "
        f"{machine['python']}, jax {machine['jax']}, devices {', '.join(machine['devices'])}.",
        timing_text(timing),
        f"- Code: the runs were trained by source version(s) "
        f"{', '.join(f'`{v}` ({_runs(n)})' for v, n in code_versions(records).items())} "
        f"(SHA-256 prefix over `kdjax/` and `experiments/`, see `code_version`).", "",
        "## Verdicts", "",
        "The four claims the reproduction answers, then two supporting measurements. Evidence: "
        "difference of means `a - b` (Welch p / paired p).", "",
        verdict_table([c for c in claim_results if c["core"]]), "",
        "Supporting measurements:", "",
        verdict_table([c for c in claim_results if not c["core"]]), ""]
    for claim in claim_results:
        lines += _claim_section(claim)
    lines += [
        "## Tables", "",
        "### Table 1: the ESKD grid (eval top-1 %, mean ± std over seeds)", "",
        "Rows: the student's teacher; columns: the teacher's own top-1 and the student's under "
        "full KD, ESKD `stop_kd` and ESKD `early_teacher`. The first row is the student trained "
        "on labels alone.", "",
        eskd_table(acc, teacher_acc, settings, sizes, by_cell(records, "teacher_accuracy")), "",
        "### Table 2: does the student mimic its teacher? (full KD, end of training)", "",
        "The ESKD paper's explanation of the capacity gap: a small student cannot follow a large "
        "teacher, so its KD loss stays higher and it trades cross-entropy for KD loss. Train "
        "losses are the mean over the last logging window; KL and agreement are on the eval "
        "split.", "",
        mimic_table(records, sizes), "",
        "### Table 3: FitNet and the teacher-assistant chain (eval top-1 %)", "",
        fitnet_ta_table(acc, teacher_acc, settings, {
            r["seed"]: r["stages"][0]["accuracy"] for r in records
            if r["cell"] == "ta/large-medium" and r["stages"][0]["accuracy"] is not None}), "",
        "### Runs that collapsed", "",
        f"Final eval top-1 below twice chance ({200 / setup['num_classes']:.0f}%): the network "
        f"died or diverged (constant logits give eval CE = ln {setup['num_classes']} = "
        f"{math.log(setup['num_classes']):.3f}). They are kept in every mean, std and test above: "
        f"they are what the protocol produced.", "",
        (markdown_table(["cell", "seed", "top-1 (%)", "eval CE"],
                        [[c["cell"], str(c["seed"]), f"{100 * c['accuracy']:.2f}",
                          "-" if c["ce"] is None else f"{c['ce']:.3f}"]
                         for c in collapsed]) if collapsed else "None."), "",
        "### Table 4: every comparison", "",
        "`diff of means` = mean(a) - mean(b) (top-1 in points; KL raw); `claim predicts` is what "
        "the paper's claim says about `a - b`.", "",
        comparisons_table(claim_results), "",
        "## Plots", "",
        f"Student top-1 against teacher size (full KD, both ESKD readings, scratch band): "
        f"![accuracy vs teacher]({ACCURACY_PLOT})", "",
        f"The student fails to mimic? Train KD loss, train CE and eval KL(p_t || p_s) over "
        f"training, full KD, per teacher size: ![mimic]({MIMIC_PLOT})", "",
        f"FitNet and the teacher-assistant chain (bars: mean ± std; dots: seeds): "
        f"![fitnet and TA]({FITNET_TA_PLOT})", ""]
    with open(os.path.join(out, REPORT_FILE), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))

    cells = {}
    for r in sorted(records, key=lambda r: (r["cell"], r["seed"])):
        entry = cells.setdefault(r["cell"], {"seeds": {}})
        entry["seeds"][str(r["seed"])] = {k: v for k, v in r.items()
                                          if k not in ("cell", "seed", "curves")}
    for key, entry in cells.items():
        entry["accuracy"] = _stats(acc.get(key))
    result = {"setup": dict(setup), "machine": dict(machine), "seeds": list(seeds),
              "timing": dict(timing), "command": command, "cells": cells, "claims": claim_results,
              "collapsed": collapsed,
              "curves": {f"{r['cell']}/seed{r['seed']}": r["curves"] for r in records
                         if r["cell"].startswith(("full/", "eskd_stop/"))}}
    write_json(os.path.join(out, RESULTS_JSON), result)
    return result


# ------------------------------------------------------------------------------------------------
# Command line.
# ------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.reproduce_cpu",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where README.md, plots, results.json go")
    parser.add_argument("--dataset", default="mnist1d", choices=DATASETS)
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per cell (default 10; 2 with --smoke)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--workdir", default=None, help="run directories (default "
                        "workdirs/reproduce_cpu/<dataset>[_smoke]); reusing it resumes")
    parser.add_argument("--smoke", action="store_true",
                        help="two short epochs per run on a slice of the data (CI)")
    parser.add_argument("--cells", default=None,
                        help="comma-separated student cells to run (default: all), e.g. "
                             "'scratch,full/large'; the teachers they need are added")
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = 2 if args.smoke else 10
    if args.seeds < 2:
        parser.error(f"--seeds={args.seeds}: need at least 2 seeds for a standard deviation and a "
                     f"t-test.")
    if args.jobs < 1:
        parser.error(f"--jobs={args.jobs}: need at least 1 worker process.")
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


def record_invocation(workdir: str, entry: Mapping[str, Any]) -> list[dict]:
    """Appends ``entry`` to ``<workdir>/invocations.json`` and returns the whole history, so a
    report regenerated from reused runs still states when and how long they were measured.
    An invocation that reused no run trained every run of the report: it starts a new history."""
    path = os.path.join(workdir, "invocations.json")
    history = []
    if os.path.exists(path) and entry["reused"]:
        with open(path, encoding="utf-8") as fh:
            history = json.load(fh)
    history.append(dict(entry))
    write_json(path, history)
    return history


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the grid (teachers first, then the students) and writes the report. Returns 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    start = time.perf_counter()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_start = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    workdir = os.path.abspath(args.workdir)
    seeds = list(range(args.seeds))
    teacher_cells, student_cells = select(*grid(args.dataset), args.cells)
    records = []
    for phase, cells in (("teachers", teacher_cells), ("students", student_cells)):
        jobs = [(cell, args.dataset, seed, workdir, args.smoke) for seed in seeds for cell in cells]
        print(f"== {phase}: {len(jobs)} runs", flush=True)
        records += run_jobs(jobs, args.jobs, phase)
    reused = sum(1 for r in records if r.get("reused"))
    history = record_invocation(workdir, {
        "started": started, "wall_s": time.perf_counter() - start, "jobs": args.jobs,
        "ran": len(records) - reused, "reused": reused, "argv": argv, "load_start": load_start,
        "load_end": ", ".join(f"{x:.1f}" for x in os.getloadavg())})
    timing = {"invocations": history, "runs_s": float(sum(r["wall_s"] for r in records)),
              "total": len(records)}
    command = "python -m experiments.reproduce_cpu " + " ".join(argv)
    write_report(args.out, setup=setup_info(args.dataset, args.smoke), machine=machine_info(),
                 records=records, seeds=seeds, timing=timing, command=command.strip())
    print(f"report: {os.path.join(args.out, REPORT_FILE)} "
          f"({(time.perf_counter() - start) / 60:.1f} min)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
