"""The grid of runs and the config checks (clear errors before any training).

Teachers: one run per size of ``config.grid.teachers`` (seed ``grid.teacher_seed``), shared by every
student seed, as the paper distils every student from one trained teacher. Students, per seed: each
size of ``grid.students`` from scratch and distilled (all of Chen et al.'s parts) from every teacher
larger than itself (:data:`kdjax.detection.model.SIZES` order), and the ablation pair
``(grid.ablation_student, grid.ablation_teacher)`` with each part of ``grid.ablation_parts`` alone.
A seed fixes the student's initialisation, data order and sampling, so the arms are paired by seed.
"""

from __future__ import annotations

from typing import Sequence

from experiments.detection_kd.runs import Run, teacher_run
from experiments.errors import ConfigError

METRICS = ("map50", "map", "map75")


def larger(teacher: str, student: str) -> bool:
    """Whether size ``teacher`` comes after ``student`` in :data:`~kdjax.detection.model.SIZES`."""
    from kdjax.detection.model import SIZES

    order = list(SIZES)
    return order.index(teacher) > order.index(student)


def pairs(config) -> list[tuple[str, str]]:
    """``(student, teacher)`` pairs distilled with every part on, students first."""
    return [(s, t) for s in config.grid.students for t in config.grid.teachers if larger(t, s)]


def teacher_runs(config) -> list[Run]:
    return [teacher_run(config, t) for t in config.grid.teachers]


def student_runs(config, seeds: Sequence[int]) -> list[Run]:
    """Every student run, seed by seed (all cells of seed 0, then of seed 1, ..): parallel workers
    start on different cells, so each cell is compiled once and JAX's persistent compilation cache
    serves it to the other worker."""
    from kdjax.detection.distill import PARTS

    g = config.grid
    cells = []
    for s in g.students:
        cells.append((s, None, ()))
        cells += [(s, t, PARTS) for t in g.teachers if larger(t, s)]
    cells += [(g.ablation_student, g.ablation_teacher, (part,)) for part in g.ablation_parts]
    return [Run("student", s, int(seed), t, tuple(parts)) for seed in seeds for s, t, parts in cells]


def check_config(config) -> None:
    """Raises :class:`ConfigError` listing every problem of ``config`` (one line each)."""
    from kdjax.detection.distill import PARTS, ChenConfig
    from kdjax.detection.model import SIZES

    g, problems = config.grid, []
    for key in ("teachers", "students"):
        bad = [s for s in g[key] if s not in SIZES]
        if bad or not g[key]:
            problems.append(f"config.grid.{key}={tuple(g[key])!r}: sizes must be a non-empty list of "
                            f"{', '.join(SIZES)}.")
    if not problems:
        lonely = [s for s in g.students if not any(larger(t, s) for t in g.teachers)]
        if lonely:
            problems.append(f"config.grid.students {lonely} have no larger teacher in "
                            f"config.grid.teachers={tuple(g.teachers)!r}.")
        if g.ablation_teacher not in g.teachers or g.ablation_student not in g.students \
                or not larger(g.ablation_teacher, g.ablation_student):
            problems.append(f"config.grid.ablation_student={g.ablation_student!r} / ablation_teacher="
                            f"{g.ablation_teacher!r} must be one of the grid's (student, larger teacher) "
                            f"pairs.")
    bad_parts = [p for p in g.ablation_parts if p not in PARTS]
    if bad_parts:
        problems.append(f"config.grid.ablation_parts: unknown parts {bad_parts}; parts: {', '.join(PARTS)}.")
    try:
        ChenConfig(**config.chen.to_dict())
    except (TypeError, ValueError) as e:
        problems.append(f"config.chen: {e}.")
    t = config.train
    for key in ("batch_size", "eval_batch_size", "steps", "teacher_steps", "rpn_batch_size",
                "roi_batch_size", "warmup_steps"):
        if not isinstance(t[key], int) or t[key] < (0 if key == "warmup_steps" else 1):
            problems.append(f"config.train.{key}={t[key]!r} must be a positive integer.")
    if not t.lr > 0:
        problems.append(f"config.train.lr={t.lr!r} must be > 0.")
    if config.stats.metric not in METRICS:
        problems.append(f"config.stats.metric={config.stats.metric!r}; valid: {', '.join(METRICS)}.")
    if not config.stats.margin > 0:
        problems.append(f"config.stats.margin={config.stats.margin!r} must be > 0 (mAP points).")
    if config.run.prng_impl not in ("threefry2x32", "rbg", "unsafe_rbg"):
        problems.append(f"config.run.prng_impl={config.run.prng_impl!r}; valid: 'threefry2x32', 'rbg', "
                        "'unsafe_rbg'.")
    if not problems:
        problems += _check_data(config)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _check_data(config) -> list[str]:
    """The data settings, through the generator's own checks, and the batch against the devices."""
    import jax

    from kdjax.data.detection_digits import digits_detection_arrays

    d, problems = config.data, []
    try:
        digits_detection_arrays(1, 1, canvas_size=d.canvas_size, max_objects=d.max_objects,
                                scales=tuple(d.scales), max_overlap=d.max_overlap, clutter=d.clutter,
                                noise=d.noise, seed=d.seed)
    except (TypeError, ValueError) as e:
        problems.append(f"config.data: {e}.")
    n = jax.device_count()
    for key in ("batch_size", "eval_batch_size"):
        if config.train[key] % n:
            problems.append(f"config.train.{key}={config.train[key]} must be a multiple of the "
                            f"{n} devices.")
    return problems
