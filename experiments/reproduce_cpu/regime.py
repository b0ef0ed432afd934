r"""The regime of the CPU-scale reproduction, found by a measured study (issue 16, item 1).

The grid of :mod:`experiments.reproduce_cpu` runs on the published MNIST-1D (4,000 train / 1,000
test), where its teachers stay below the published CNN baseline, its medium and large teachers
are almost equally accurate and its student from scratch is unstable. This command measures a regime in which the papers' claims can show, and writes what it
found to ``<out>/README.md`` and ``<out>/regime.json``::

    python -m experiments.reproduce_cpu.regime --out results/regime [--jobs 2] [--workdir DIR] [--quick]

It runs, through the grid's own machinery (:class:`~experiments.reproduce_cpu.protocol.Cell` configs
from ``experiments/configs/small.py`` with override keys, run and reused by
:func:`~experiments.reproduce_cpu.runner.run_jobs`):

(a) MNIST-1D generated locally by the mnist1d package's generator at :data:`NUM_SAMPLES` examples
    (``dataset.num_samples``: 40,000 train / 10,000 test), its generation timed and fingerprinted;
(b) teachers of the CNN1D widths :data:`TEACHER_WIDTHS` with the MNIST-1D reference recipe's
    optimizer (Adam, no weight decay) for about 8k steps, several seeds each; the small / medium /
    large sizes (:data:`SIZES`) are three of them, the large one checked against the published
    CNN baseline (:data:`PUBLISHED_CNN`), and the sizes' spread is tested with paired comparisons
    (:mod:`experiments.paired_stats`);
(c) a sweep of the student (CNN1D width :data:`STUDENT_WIDTH`, and the grid's width 8 as a check)
    from scratch over BatchNorm (``norm=true`` in its model spec) and the optimizer and learning
    rate (:data:`STUDENT_RECIPES` x :data:`NORMS`), reporting the seed std of each setting;
    :func:`pick_stable` chooses the most accurate setting with seed std <= :data:`MAX_STD`;
(d) the early-teacher snapshot: the epoch of the first learning-rate decay (the end of the first,
    highest-rate phase; the exported snapshot is taken before the decay applies), with its
    accuracy gap to the final teacher per width, and the mean accuracy of every pre-decay epoch.

Each (cell, seed) runs in ``<workdir>/<cell>/seed<s>`` and a finished one is reused when the
command runs again (``record.json``, as in the grid), so an interrupted study resumes; every
invocation's wall time is kept in ``<workdir>/invocations.json`` and reported. ``--quick`` is the
test-sized study (500 examples, 2 epochs, 2 seeds, two student settings).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import shlex
import sys
import time
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

from experiments.reproduce_cpu.protocol import (BATCH, DECAY, EPOCHS, NUM_SAMPLES, SIZES,
                                                TEACHER_LR, Cell, adam, student_spec)

PROG = "python -m experiments.reproduce_cpu.regime"
DATASET = "mnist1d"
#: The published MNIST-1D CNN's test accuracy (Greydanus & Kobak, ICML 2024), in percent.
PUBLISHED_CNN = 94.0
#: Teacher widths trained (CNN1D, 3 conv layers each, the grid's family) and the three sizes
#: taken from them. Width 32 is trained to show why it is not the medium size: at 40,000 train
#: examples it is within a few tenths of a point of width 128 (measured here).
TEACHER_WIDTHS = (8, 16, 32, 128)
#: The student's CNN1D width: half the small teacher's (the grid's width 8 is the small teacher).
STUDENT_WIDTH = 4
#: Student sweep: ``(width, optimizer, peak rate)`` (SGD: the grid's, rate per 256 examples; Adam:
#: the teachers' recipe) and BatchNorm off / on. Width 8 (the grid's student, here the small
#: teacher's width) at the grid's rate checks whether the width-4 student's seed spread is its width's.
STUDENT_RECIPES = ((STUDENT_WIDTH, "sgd", 0.05), (STUDENT_WIDTH, "sgd", 0.1),
                   (STUDENT_WIDTH, "sgd", 0.2), (STUDENT_WIDTH, "adam", 0.01), (8, "sgd", 0.1))
NORMS = (False, True)
#: A stable student: seed std of its test accuracy at most this many points.
MAX_STD = 1.0
#: TOST margin (accuracy points) of the paired comparisons between teacher sizes.
MARGIN = 0.5


@dataclasses.dataclass(frozen=True)
class Plan:
    """The numbers of one study: data size, schedule (step decays, the grid's), the teachers'
    Adam rate and the student grid, and the seeds of each phase."""
    num_samples: int
    epochs: int
    decay: tuple[int, ...]
    teacher_lr: float
    student_recipes: tuple[tuple[int, str, float], ...]
    norms: tuple[bool, ...]
    teacher_seeds: int
    student_seeds: int

    @property
    def early_epoch(self) -> int:
        """The early-teacher epoch: the first decay epoch (its snapshot precedes the decay)."""
        return self.decay[0]


#: The study: batch 128, 40,000 train examples -> 312 steps per epoch; 24 epochs = 7,488 steps
#: (the reference recipe's ~8k), the rate / 10 at epochs 12 and 18 (1/2 and 3/4 of training).
FULL = Plan(num_samples=NUM_SAMPLES, epochs=EPOCHS, decay=DECAY, teacher_lr=TEACHER_LR,
            student_recipes=STUDENT_RECIPES, norms=NORMS, teacher_seeds=5, student_seeds=5)
#: The test-sized study (CI): 400 train / 100 test, 2 epochs, 2 seeds, two student settings.
QUICK = Plan(num_samples=500, epochs=2, decay=(1,), teacher_lr=1e-2,
             student_recipes=((STUDENT_WIDTH, "sgd", 0.1),),
             norms=NORMS, teacher_seeds=2, student_seeds=2)


def teacher_key(width: int) -> str:
    """The cell key of a teacher width, e.g. ``teacher/w128``."""
    return f"teacher/w{width}"


def student_key(width: int, optimizer: str, lr: float, norm: bool) -> str:
    """The cell key of a student setting, e.g. ``student/lr0.1_bn`` (:data:`STUDENT_WIDTH`, SGD),
    ``student/adam_lr0.01``, ``student/w8_lr0.1``."""
    prefix = ("" if width == STUDENT_WIDTH else f"w{width}_") + (
        "" if optimizer == "sgd" else f"{optimizer}_")
    return f"student/{prefix}lr{lr:g}" + ("_bn" if norm else "")


def _common(plan: Plan, eval_every: int) -> tuple:
    """Overrides every cell of the study shares: data size, schedule, evaluation interval."""
    return (("dataset.num_samples", plan.num_samples), ("num_epochs", plan.epochs),
            ("optimizer.decay_epochs", plan.decay), ("run.eval_every_epochs", eval_every))


def cells(plan: Plan) -> tuple[list, list]:
    """``(teacher cells, student cells)`` of the study (see the module docstring).

    Teachers: the grid's ``eskd`` config for an early-teacher run, with Adam at
    ``plan.teacher_lr`` (:func:`adam`), evaluated every epoch, snapshot kept at
    :attr:`Plan.early_epoch`. Students: the grid's scratch student config with the grid's SGD
    (momentum 0.9, weight decay 5e-4) or :func:`adam` at each rate, BatchNorm off / on,
    evaluated at the end only."""
    teachers = [Cell(teacher_key(width), "teacher", "eskd",
                     "teacher=large,mode=eskd,reading=early_teacher", f"teacher cnn1d width {width}",
                     overrides=_common(plan, 1) + (
                         ("teacher.model", f"cnn1d:width={width}"),
                         ("teacher.early_epoch", plan.early_epoch)) + adam(plan.teacher_lr))
                for width in TEACHER_WIDTHS]
    students = [Cell(student_key(width, opt, lr, norm), "kd", "eskd", "teacher=none",
                     f"student width {width} from scratch, {opt} {lr:g}"
                     + (", BatchNorm" if norm else ""),
                     overrides=_common(plan, plan.epochs) + (
                         ("student.model", student_spec(width, norm)),)
                     + (adam(lr) if opt == "adam" else (("optimizer.lr", lr),)))
                for width, opt, lr in plan.student_recipes for norm in plan.norms]
    return teachers, students


def summary(values: Sequence[float]) -> dict:
    """``n``, ``mean``, ``std`` (:func:`~experiments.reproduce_cpu.statistics.summarize`), ``min``,
    ``max`` and the 95% confidence interval of the std (chi-square, ``scipy.stats.chi2``; NaN
    for one value)."""
    from experiments.reproduce_cpu.statistics import summarize

    out = summarize(values)
    n, std = out["n"], out["std"]
    if n > 1:
        high, low = stats.chi2.ppf([0.025, 0.975], n - 1)
        out["std_ci"] = [std * math.sqrt((n - 1) / low), std * math.sqrt((n - 1) / high)]
    else:
        out["std_ci"] = [math.nan, math.nan]
    return {**out, "min": float(np.min(values)), "max": float(np.max(values))}


def pick_stable(settings: Mapping[str, Mapping], max_std: float = MAX_STD) -> dict:
    """The setting to use from ``{name: summary}`` (:func:`summary` of each setting's accuracies).

    The most accurate (highest mean; then lowest std, then name) of those with seed std at most
    ``max_std``; when none qualifies, the one with the lowest std. Returns ``{'name', 'stable',
    'reason'}``."""
    if not settings:
        raise ValueError("pick_stable needs at least one setting.")
    stable = {k: s for k, s in settings.items() if s["std"] <= max_std}
    if stable:
        name = min(stable, key=lambda k: (-stable[k]["mean"], stable[k]["std"], k))
        reason = (f"the highest mean accuracy of the {len(stable)} of {len(settings)} settings "
                  f"with seed std <= {max_std:g} points")
    else:
        name = min(settings, key=lambda k: (settings[k]["std"], k))
        reason = f"no setting has seed std <= {max_std:g} points; the lowest std"
    return {"name": name, "stable": bool(stable), "reason": reason}


def accuracy_at_epoch(record: Mapping, epoch: int, epochs: int) -> float:
    """Test accuracy (%) of a teacher run's eval at the end of ``epoch`` (its eval curve, evaluated
    every epoch), i.e. of its snapshot at that epoch."""
    step = epoch * (record["steps"] // epochs)
    for row in record["curves"]["eval"]:
        if row[0] == step:
            return 100.0 * row[1]
    raise ValueError(f"{record['cell']} seed {record['seed']}: no eval at epoch {epoch} "
                     f"(step {step}).")


def _rows(records: Sequence[Mapping], key: str) -> list[Mapping]:
    """The records of cell ``key``, in seed order."""
    return sorted((r for r in records if r["cell"] == key), key=lambda r: r["seed"])


def _accuracies(records: Sequence[Mapping], key: str) -> list[float]:
    """The test accuracies (%) of cell ``key``, in seed order."""
    return [100.0 * r["accuracy"] for r in _rows(records, key)]


def teacher_analysis(records: Sequence[Mapping], plan: Plan) -> dict:
    """(b) and (d): per width, the final and early-epoch accuracies, the paired early -> final gap,
    the mean accuracy at every pre-decay epoch; the paired comparisons between the sizes (one Holm
    family) and whether the large teacher reaches the published baseline."""
    from experiments import paired_stats

    widths, final = {}, {}
    for width in TEACHER_WIDTHS:
        rows = _rows(records, teacher_key(width))
        final[width] = _accuracies(records, teacher_key(width))
        early = [accuracy_at_epoch(r, plan.early_epoch, plan.epochs) for r in rows]
        gap = paired_stats.compare(early, final[width], margin=MARGIN,
                                   name=f"final - epoch {plan.early_epoch}")
        curve = {e: summary([accuracy_at_epoch(r, e, plan.epochs) for r in rows])["mean"]
                 for e in range(1, plan.early_epoch + 1)}
        widths[str(width)] = {"model": f"cnn1d:width={width}", "final": summary(final[width]),
                              "early": summary(early), "gap": gap.to_dict(),
                              "pre_decay_means": curve, "per_seed": final[width],
                              "early_per_seed": early}
    names = list(SIZES)
    pairs = {f"{b} - {a}": (final[SIZES[a]], final[SIZES[b]])
             for i, a in enumerate(names) for b in names[i + 1:]}
    spread = paired_stats.compare_family(pairs, margin=MARGIN)
    large = widths[str(SIZES["large"])]["final"]["mean"]
    return {"early_epoch": plan.early_epoch, "widths": widths, "sizes": dict(SIZES),
            "spread": [c.to_dict() for c in spread], "large_meets_baseline": large >= PUBLISHED_CNN}


def student_analysis(records: Sequence[Mapping], plan: Plan) -> dict:
    """(c): every student setting's summary and the chosen one (:func:`pick_stable`)."""
    settings = {}
    for width, opt, lr in plan.student_recipes:
        for norm in plan.norms:
            acc = _accuracies(records, student_key(width, opt, lr, norm))
            settings[student_key(width, opt, lr, norm)] = {
                **summary(acc), "width": width, "optimizer": opt, "lr": lr, "norm": norm,
                "model": student_spec(width, norm), "per_seed": acc}
    return {"settings": settings, "chosen": pick_stable(settings)}


def generate_data(num_samples: int) -> dict:
    """(a): generates MNIST-1D at ``num_samples`` (:func:`kdjax.data.mnist1d_arrays`, offline)
    and returns its split sizes, the generation time and a SHA-256 of the arrays (the same on
    every run: the generator is seeded)."""
    from kdjax.data import mnist1d_arrays

    start = time.perf_counter()
    arrays = mnist1d_arrays(num_samples=num_samples)
    seconds = time.perf_counter() - start
    digest = hashlib.sha256()
    for split in ("train", "test"):
        for key in ("image", "label"):
            digest.update(np.ascontiguousarray(arrays[split][key]).tobytes())
    num_train = int(arrays["train"]["label"].size)
    return {"num_samples": num_samples, "num_train": num_train,
            "num_test": int(arrays["test"]["label"].size), "generate_s": seconds,
            "steps_per_epoch": num_train // BATCH, "sha256": digest.hexdigest()}


def _row(label: str, s: Mapping, *extra: str) -> str:
    """A markdown table row: label, extra cells, n, mean, std, its 95% CI, min, max."""
    lo, hi = s["std_ci"]
    return (f"| {' | '.join((label,) + extra)} | {s['n']} | {s['mean']:.2f} | {s['std']:.2f} | "
            f"[{lo:.2f}, {hi:.2f}] | {s['min']:.2f} | {s['max']:.2f} |")


_STATS_HEADER = "n | mean | std | std 95% CI | min | max |"


def _header(*labels: str) -> list[str]:
    """A markdown table's header and separator: ``labels`` then the :func:`_row` statistics."""
    return [f"| {' | '.join(labels)} | {_STATS_HEADER}", "|---" * (len(labels) + 6) + "|"]


def data_section(data: Mapping, plan: Plan) -> list[str]:
    """(a) in markdown."""
    se = 100 * math.sqrt(0.95 * 0.05 / data["num_test"])
    return [
        "## (a) Data", "",
        f"MNIST-1D generated here by the mnist1d package's own generator "
        f"(`make_dataset(get_dataset_args())` with `num_samples={data['num_samples']}`, seed 42, "
        f"offline, `kdjax.data.mnist1d_arrays`): **{data['num_train']:,} train / "
        f"{data['num_test']:,} test** examples, generated in {data['generate_s']:.1f} s (once in "
        f"each process, which keeps it in memory). SHA-256 of the arrays: "
        f"`{data['sha256'][:16]}...` (the generator is seeded: the same on every run).",
        "",
        f"Why this size: the published split has 1,000 test examples, where one run's accuracy "
        f"near 95% has a binomial standard error of 0.69 points, larger than the effects the "
        f"papers report (0.2-1.9 points); at {data['num_test']:,} it is {se:.2f} points. Ten "
        f"times the published training set gives the teachers room to pass the published CNN "
        f"baseline with the reference recipe's ~8k steps, which at "
        f"{data['steps_per_epoch']} steps per epoch (batch {BATCH}) are {plan.epochs} epochs "
        f"({plan.epochs * data['steps_per_epoch']:,} steps), so the whole study fits the 2-core "
        f"CPU's budget.", ""]


def _size_label(width: str) -> str:
    """``small`` / ``medium`` / ``large`` for a width (a string key) that is one of :data:`SIZES`,
    else ``-``."""
    return next((size for size, w in SIZES.items() if str(w) == width), "-")


def teacher_section(t: Mapping, plan: Plan, steps_per_epoch: int) -> list[str]:
    """(b) and (d) in markdown."""
    from experiments import paired_stats

    widths = t["widths"]
    lines = [
        "## (b) Teachers", "",
        f"Adam (the MNIST-1D reference recipe's optimizer), rate {plan.teacher_lr:g}, no weight "
        f"decay, batch {BATCH}, {plan.epochs} epochs ({plan.epochs * steps_per_epoch:,} steps), "
        f"the rate / 10 after epochs {', '.join(map(str, plan.decay))}; "
        f"{plan.teacher_seeds} seeds per width (`config.seed`: initialisation and data order). "
        f"Final test accuracy (%):", "", *_header("width", "size", "model")]
    for width, s in widths.items():
        lines.append(_row(width, s["final"], _size_label(width), f"`{s['model']}`"))
    large = widths[str(SIZES["large"])]["final"]["mean"]
    lines += ["", f"Published MNIST-1D CNN baseline: {PUBLISHED_CNN:g}% (logistic regression "
              f"~32%, MLP ~68%). The large teacher's mean, {large:.2f}%, "
              + ("reaches it." if t["large_meets_baseline"] else "**does not reach it.**")
              + " Sizes: " + ", ".join(f"{size} = width {w}" for size, w in SIZES.items())
              + "; the width-32 row shows why width 32 is not the medium size (compare it with "
              "width 128).", "",
              "Spread between the sizes, paired by seed (one Holm family; TOST margin "
              f"±{MARGIN:g} points):", "",
              paired_stats.markdown_table([paired_stats.Comparison.from_dict(c)
                                           for c in t["spread"]]), "",
              f"With n = {plan.teacher_seeds} pairs the exact two-sided Wilcoxon p-value cannot "
              f"fall below 2 / 2^{plan.teacher_seeds} = {2 / 2 ** plan.teacher_seeds:.4g}, so no "
              "comparison can be `better` (which needs both tests); the paired t-tests and the "
              "bootstrap intervals are what separate the sizes here.", "",
              "## (d) Early teacher", "",
              f"The early-teacher snapshot is taken at epoch **{plan.early_epoch}**: the end of the "
              f"first, highest-rate phase, before the first decay applies (the grid's snapshot "
              f"came after it, and matched the final teacher). Its accuracy and the paired gap "
              f"to the final teacher (bootstrap 95% CI):", "",
              f"| width | size | epoch {plan.early_epoch} mean ± std | final mean ± std | gap "
              "(final - early) | 95% CI | paired t p |", "|---|---|---|---|---|---|---|"]
    for width, s in widths.items():
        e, f, g = s["early"], s["final"], s["gap"]
        lines.append(f"| {width} | {_size_label(width)} | {e['mean']:.2f} ± {e['std']:.2f} | "
                     f"{f['mean']:.2f} ± {f['std']:.2f} | {g['mean_diff']:+.2f} | "
                     f"[{g['ci_low']:+.2f}, {g['ci_high']:+.2f}] | {g['p_t']:.2g} |")
    epochs = list(next(iter(widths.values()))["pre_decay_means"])
    lines += ["", "Mean test accuracy (%) at the end of every epoch up to the first decay (for "
              "other early-teacher choices):", "",
              "| width | " + " | ".join(f"ep {e}" for e in epochs) + " |",
              "|---|" + "---|" * len(epochs)]
    for width, s in widths.items():
        lines.append(f"| {width} | "
                     + " | ".join(f"{v:.1f}" for v in s["pre_decay_means"].values()) + " |")
    return lines + [""]


def student_section(st: Mapping, plan: Plan) -> list[str]:
    """(c) in markdown."""
    chosen = st["chosen"]
    c = st["settings"][chosen["name"]]
    lines = [
        "## (c) Student from scratch", "",
        f"`cnn1d:width={STUDENT_WIDTH}` (half the small teacher's width; width 8, the grid's "
        f"student and here the small teacher's width, as a check), batch {BATCH}, the "
        f"teachers' schedule; the sweep: optimizer and peak rate (SGD: the grid's, momentum 0.9, "
        f"weight decay 5e-4, rate per 256 examples; Adam: the teachers' recipe) x BatchNorm "
        f"(`norm=true`: BatchNorm between each conv and its ReLU), {plan.student_seeds} seeds "
        "each. Final test accuracy (%):", "",
        *_header("setting", "width", "optimizer", "rate", "BatchNorm")]
    for name, s in st["settings"].items():
        lines.append(_row(f"`{name}`", s, str(s["width"]), s["optimizer"], f"{s['lr']:g}",
                          "yes" if s["norm"] else "no"))
    verdict = (f"seed std {c['std']:.2f} points <= {MAX_STD:g}" if chosen["stable"] else
               f"**seed std {c['std']:.2f} points > {MAX_STD:g}: no setting is stable yet**")
    return lines + ["", f"Chosen: **`{chosen['name']}`** (`{c['model']}`, {c['optimizer']} "
                    f"rate {c['lr']:g}), "
                    f"{c['mean']:.2f}% mean, {verdict}; rule: {chosen['reason']}. The std's "
                    f"95% CI (chi-square) shows how loosely {plan.student_seeds} seeds pin it.",
                    ""]


def render(result: Mapping, plan: Plan) -> str:
    """``README.md`` of the study from its :func:`run_study` result."""
    from experiments.reproduce_cpu.report import timing_text

    t, st = result["teachers"], result["students"]
    chosen = st["settings"][st["chosen"]["name"]]
    sizes = {size: t["widths"][str(width)] for size, width in SIZES.items()}
    found = [
        f"- data: MNIST-1D, {result['data']['num_train']:,} train / "
        f"{result['data']['num_test']:,} test (`dataset.num_samples={plan.num_samples}`);",
        "- teachers (Adam): " + ", ".join(
            f"{size} (width {SIZES[size]}) {s['final']['mean']:.2f} ± {s['final']['std']:.2f}%"
            for size, s in sizes.items()) + f" (n = {plan.teacher_seeds} each);",
        f"- student: `{st['chosen']['name']}`, {chosen['mean']:.2f} ± {chosen['std']:.2f}% "
        f"(n = {plan.student_seeds}; "
        + ("stable" if st["chosen"]["stable"] else f"**no setting has seed std <= {MAX_STD:g}**")
        + ");",
        f"- early teacher: epoch {plan.early_epoch}; gap to the final teacher " + ", ".join(
            f"{size} {s['gap']['mean_diff']:+.2f}" for size, s in sizes.items())
        + " points."]
    lines = ["# The regime of the CPU-scale reproduction (issue 16, item 1)", "",
             "Every number here comes from this command (`regime.json` holds every per-seed "
             "value):", "", "```", result["command"], "```", "",
             "Found:", *found, timing_text(result["timing"]), "",
             *data_section(result["data"], plan),
             *teacher_section(t, plan, result["data"]["steps_per_epoch"]),
             *student_section(st, plan),
             "## Not yet", "",
             "The grid in `results/` still runs on the published 4,000 / 1,000 split with its "
             "old recipes; moving it onto this regime, with 20+ seeds per cell, is the rest of "
             "issue 16."
             + _next_step(st, sizes), ""]
    return "\n".join(lines)


def _next_step(st: Mapping, sizes: Mapping[str, Mapping]) -> str:
    """What the student result leaves to do before the grid moves here ('' when nothing)."""
    if not st["chosen"]["stable"]:
        return (f" Before that, the student needs a setting with seed std <= {MAX_STD:g} point: "
                "none of those swept here has one.")
    c, small = st["settings"][st["chosen"]["name"]], sizes["small"]["final"]["mean"]
    if c["width"] < SIZES["small"]:
        return ""
    return (f" The stable student is as wide as the small teacher (width {c['width']}) and, "
            f"with {c['optimizer']}, at {c['mean']:.2f}% against the small teacher's {small:.2f}%: "
            "the grid needs teachers wider than the student (widths 16 / 32 / 128 here, less "
            "spread at the top) or small teachers trained with the student's recipe.")


def run_study(out: str, plan: Plan, workdir: str, jobs: int, command: str) -> dict:
    """Runs (or reuses) every teacher and student run of ``plan`` and writes ``<out>/README.md``
    and ``<out>/regime.json``. Returns the result."""
    from experiments.reproduce_cpu.report import machine_info
    from experiments.grids import record_invocation, write_json
    from experiments.reproduce_cpu.runner import run_jobs
    from kdjax.atomic import write_text_atomic

    start, started = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_start = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    data = generate_data(plan.num_samples)
    teachers, students = cells(plan)
    records = []
    for phase, group, seeds in (("teachers", teachers, plan.teacher_seeds),
                                ("students", students, plan.student_seeds)):
        batch = [(cell, DATASET, seed, workdir, False) for seed in range(seeds) for cell in group]
        print(f"== {phase}: {len(batch)} runs", flush=True)
        records += run_jobs(batch, jobs, phase)
    reused = sum(1 for r in records if r.get("reused"))
    history = record_invocation(workdir, {
        "started": started, "wall_s": time.perf_counter() - start, "jobs": jobs,
        "ran": len(records) - reused, "reused": reused, "argv": command,
        "load_start": load_start,
        "load_end": ", ".join(f"{x:.1f}" for x in os.getloadavg())})
    result = {"command": command, "plan": dataclasses.asdict(plan), "data": data,
              "teachers": teacher_analysis(records, plan),
              "students": student_analysis(records, plan),
              "timing": {"invocations": history,
                         "runs_s": float(sum(r["wall_s"] for r in records)),
                         "total": len(records)},
              "machine": machine_info()}
    write_json(os.path.join(out, "regime.json"), result)
    write_text_atomic(os.path.join(out, "README.md"), render(result, plan))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry (module docstring). Returns 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="where README.md and regime.json go")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--workdir", default=None, help="run directories (default "
                   "workdirs/reproduce_cpu/regime[_quick]); reusing it resumes")
    p.add_argument("--quick", action="store_true", help="the test-sized study (CI)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs={args.jobs}: need at least 1 worker process.")
    workdir = os.path.abspath(args.workdir or os.path.join(
        "workdirs", "reproduce_cpu", "regime" + ("_quick" if args.quick else "")))
    command = " ".join([PROG] + [shlex.quote(a) for a in argv])
    result = run_study(args.out, QUICK if args.quick else FULL, workdir, args.jobs, command)
    print(f"wrote {os.path.join(args.out, 'README.md')} "
          f"({result['timing']['invocations'][-1]['wall_s'] / 60:.1f} min)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
