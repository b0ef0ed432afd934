"""The grid of the CPU-scale reproduction: its cells (:func:`grid`, :func:`select`) and the locked
config of each (cell, seed) (:func:`build_config`, from ``experiments/configs/small.py``); the
student cells of seed ``s`` read the seed-``s`` teachers (``source=checkpoint,path=...``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

from experiments.configs import small

DATASETS = ("mnist1d", "digits")
SIZES = ("small", "medium", "large")
#: MNIST-1D examples in smoke mode (400 train / 100 test: 3 steps per epoch at batch 128).
SMOKE_SAMPLES = 500
#: Run settings that do not change what is trained: no progress bar, no intermediate checkpoints
#: (a cell is short, and it is redone or resumed from its last checkpoint), no best-checkpoint
#: tracking (the final eval is the result).
RUN_OVERRIDES = (("run.progress", False), ("run.checkpoint_every_epochs", 0),
                 ("run.best_metric", None))


@dataclasses.dataclass(frozen=True)
class Cell:
    """One cell of the grid, run once per seed.

    ``kind``: ``teacher`` (:func:`experiments.train_teacher.run`), ``kd``
    (:func:`experiments.imagenet_eskd.run`), ``fitnet`` (:func:`experiments.imagenet_fitnet.run`)
    or ``fitnet_kd_only`` (:func:`experiments.reproduce_cpu.runner.run_fitnet_kd_only`).
    ``config``: ``eskd`` or ``fitnet``, the config getter of ``experiments/configs/small.py``;
    ``arg``: its ARG string; ``teacher``: the teacher cell whose seed-``s`` workdir is passed as
    ``source=checkpoint,path=``; ``overrides``: ``(dotted key, value)`` pairs set on the config
    after the getter.
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
