"""The grid of the CPU-scale reproduction: its cells (:func:`grid`, :func:`select`) and the locked
config of each (cell, seed) (:func:`build_config`, from ``experiments/configs/small.py``); the
student cells of seed ``s`` read the teachers of seed :func:`teacher_seed` ``(dataset, s)``
(``source=checkpoint,path=...``).

MNIST-1D runs in the regime that ``experiments/reproduce_cpu/regime.py`` measured
(results/regime): 40,000 train / 10,000 test examples, 24 epochs with the rate / 10 after epochs
12 and 18, teachers of widths 8 / 16 / 128 trained with Adam, the stable BatchNorm student, the
18-layer FitNet student (``protocol.FITNET_STUDENT``), five teacher seeds shared by the student
seeds, and the teacher's logits precomputed into a store per student run (exact: MNIST-1D is not
augmented, so the store holds what a live teacher computes, and the run skips the teacher's
forward pass on every step). Digits keeps ``small.SETTINGS``.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from experiments.configs import small
from experiments.reproduce_cpu import protocol
from experiments.reproduce_cpu.protocol import Cell

DATASETS = ("mnist1d", "digits")
SIZES = ("small", "medium", "large")
#: MNIST-1D examples in smoke mode (400 train / 100 test: 3 steps per epoch at batch 128).
SMOKE_SAMPLES = 500
#: Overrides a smoke run leaves at the smoke config's values (two epochs, decay after the first,
#: the ESKD epochs at 1, eval every epoch).
SMOKE_KEEPS = ("dataset.num_samples", "num_epochs", "optimizer.decay_epochs", "kd.stop_epoch",
               "teacher.early_epoch", "run.eval_every_epochs", "run.log_every_steps")
#: The store directory inside a ``precomputed`` cell's run directory.
STORE_DIR = "teacher_store"
#: Run settings that do not change what is trained: no progress bar, no intermediate checkpoints
#: (a cell is short, and it is redone or resumed from its last checkpoint), no best-checkpoint
#: tracking (the final eval is the result).
RUN_OVERRIDES = (("run.progress", False), ("run.checkpoint_every_epochs", 0),
                 ("run.best_metric", None))
#: Teacher seeds per dataset: student seed ``s`` distils from teacher seed ``s mod k``
#: (:func:`teacher_seed`); None: one teacher per student seed.
TEACHER_SEEDS = {"mnist1d": 5, "digits": None}
#: ESKD stop-epoch sweep on MNIST-1D (the large teacher): ``cell suffix -> fraction of training``;
#: ``eskd_stop/<size>`` stops at 1/2, the first decay.
STOP_SWEEP = {"eskd_stop25": 0.25, "eskd_stop75": 0.75}
#: The other loss constants (torchdistill's and mdistiller's ImageNet ResNet-34 -> 18 configs):
#: ``(temperature, KD weight, CE weight)``, against the grid's T = 4, 0.9 / 0.1.
T1_LOSS = (1.0, 0.5, 0.5)


def teacher_seed(dataset: str, seed: int) -> int:
    """The teacher seed whose teachers the students of ``seed`` distil from."""
    k = TEACHER_SEEDS[dataset]
    return seed if k is None else seed % k


def regime_overrides() -> tuple:
    """Overrides every MNIST-1D cell shares: the regime's data size and schedule, final eval only
    (teachers evaluate every epoch, see :func:`grid`) and logging every 100 steps."""
    return (("dataset.num_samples", protocol.NUM_SAMPLES), ("num_epochs", protocol.EPOCHS),
            ("optimizer.decay_epochs", protocol.DECAY),
            ("run.eval_every_epochs", protocol.EPOCHS),
            ("run.log_every_steps", 100))


def grid(dataset: str) -> tuple[list[Cell], list[Cell]]:
    """``(teacher cells, student cells)`` of the reproduction on ``dataset``.

    Teachers: ``teacher/<size>`` for each ESKD size (kept at the early-teacher epoch too) and
    ``teacher/fitnet``. Students: ``scratch``; ``full/<size>``, ``eskd_stop/<size>``,
    ``eskd_early/<size>``; ``fitnet/hint_kd``, ``fitnet/kd_only``, ``fitnet/scratch``
    (thin-and-deep student). MNIST-1D adds the two FitNet arms at twice the rate
    (``fitnet_fast/hint_kd``, ``fitnet_fast/kd_only``), the stop-epoch sweep (``eskd_stop25/large``,
    ``eskd_stop75/large``, :data:`STOP_SWEEP`) and the loss constants (``full_t1/large``,
    :data:`T1_LOSS`); digits adds the teacher-assistant chain ``ta/large-medium`` (large ->
    medium assistant -> student, full KD).
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset={dataset!r} is not valid; valid: {', '.join(DATASETS)}.")
    s = small.SETTINGS[dataset]
    regime = dataset == "mnist1d"
    common, student, models, teacher_extra, kd_extra = (), (), dict(s["teachers"]), (), ()
    early = protocol.DECAY[0]  # the first decay: ESKD's stop and early-teacher epoch
    if regime:
        common = regime_overrides()
        student = (("student.model", protocol.student_spec(protocol.GRID_STUDENT_WIDTH, True)),)
        models = {size: f"cnn1d:width={w}" for size, w in protocol.SIZES.items()}
        teacher_extra = (("run.eval_every_epochs", 1),) + protocol.adam(protocol.TEACHER_LR)
        kd_extra = (("kd.stop_epoch", early), ("teacher.early_epoch", early))

    def model(size: str) -> tuple:
        return (("teacher.model", models[size]),) if regime else ()

    teachers = [Cell(f"teacher/{size}", "teacher", "eskd",
                     f"teacher={size},mode=eskd,reading=early_teacher",
                     f"teacher {size} ({models[size]})",
                     overrides=common + model(size) + teacher_extra + kd_extra[1:])
                for size in SIZES]
    teachers.append(Cell("teacher/fitnet", "teacher", "fitnet", "",
                         f"FitNet teacher ({s['fitnet_teacher']})", overrides=common))
    students = [Cell("scratch", "kd", "eskd", "teacher=none", "student from scratch",
                     overrides=common + student)]

    def kd(key: str, arg: str, label: str, size: str, extra: tuple = ()) -> Cell:
        return Cell(key, "kd", "eskd", arg, label, f"teacher/{size}",
                    overrides=common + student + model(size) + extra, precomputed=regime)

    for size in SIZES:
        students += [
            kd(f"full/{size}", f"teacher={size},mode=full", f"full KD <- {size}", size),
            kd(f"eskd_stop/{size}", f"teacher={size},mode=eskd,reading=stop_kd",
               f"ESKD stop_kd <- {size}", size, kd_extra[:1]),
            kd(f"eskd_early/{size}", f"teacher={size},mode=eskd,reading=early_teacher",
               f"ESKD early_teacher <- {size}", size, kd_extra[1:])]
    if regime:
        for key, fraction in STOP_SWEEP.items():
            epoch = round(fraction * protocol.EPOCHS)
            students.append(kd(f"{key}/large", "teacher=large,mode=eskd,reading=stop_kd",
                               f"ESKD stop_kd at epoch {epoch} <- large", "large",
                               (("kd.stop_epoch", epoch),)))
        t, w, ce = T1_LOSS
        students.append(kd("full_t1/large", "teacher=large,mode=full",
                           f"full KD <- large, T = {t:g}, {ce:g} CE + {w:g} KD", "large",
                           (("kd.temperature", t), ("kd.weight", w), ("kd.ce_weight", ce))))
    else:
        students.append(Cell("ta/large-medium", "kd", "eskd", "teacher=large,mode=full,ta=medium",
                             "TA chain large -> medium -> student (full KD)", "teacher/large"))
    thin = ((("student.model", protocol.FITNET_STUDENT), ("optimizer.lr", protocol.FITNET_LR))
            if regime else
            (("student.model", s["fitnet_student"]), ("optimizer.lr", s["fitnet_lr"])))

    def fitnet_arms(prefix: str, overrides: tuple, note: str = "") -> list[Cell]:
        """``<prefix>/hint_kd`` (hints, then KD) and ``<prefix>/kd_only`` (FitNet's stage 2 alone)
        of the thin-and-deep student set by ``overrides``; ``note`` ends their labels."""
        return [Cell(f"{prefix}/hint_kd", "fitnet", "fitnet", "", f"FitNet: hints, then KD{note}",
                     "teacher/fitnet", overrides=common + overrides),
                Cell(f"{prefix}/kd_only", "fitnet_kd_only", "fitnet", "",
                     f"thin-deep: KD only (FitNet stage 2){note}", "teacher/fitnet",
                     overrides=common + overrides)]

    students += fitnet_arms("fitnet", thin) + [
        Cell("fitnet/scratch", "kd", "eskd", "teacher=none", "thin-deep: from scratch",
             overrides=common + thin)]
    if regime:
        fast = thin[:1] + (("optimizer.lr", protocol.FITNET_FAST_LR),)
        students += fitnet_arms("fitnet_fast", fast, f" (rate {protocol.FITNET_FAST_LR:g})")
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
        teacher = cell_dir(workdir, cell.teacher, teacher_seed(dataset, seed))
        parts.append(f"source=checkpoint,path={teacher}")
    if cell.precomputed:
        store = os.path.join(cell_dir(workdir, cell.key, seed), STORE_DIR)
        parts.append(f"precomputed,store={store}")
    if smoke:
        parts.append("smoke")
    getter = small.eskd_config if cell.config == "eskd" else small.fitnet_config
    config = getter(dataset, ",".join(parts))
    config.unlock()
    config.seed = seed
    overrides = tuple(cell.overrides)
    if smoke:  # a smoke run keeps its short schedule, the regime's model choices only
        overrides = tuple((k, v) for k, v in overrides if k not in SMOKE_KEEPS)
    for key, value in RUN_OVERRIDES + overrides:
        set_key(config, key, value)
    if smoke and dataset == "mnist1d":
        config.dataset.num_samples = SMOKE_SAMPLES
    return config.lock()
