r"""The measured effect of consistent precomputed teaching at CPU scale (issue 19).

On augmented MNIST-1D (``dataset.augment='shift_noise'``: the demo's roll by [-4, 4] plus
N(0, 0.2^2) noise), one teacher is trained once and a student is distilled from it (full KD,
T = 4, weight 0.9) in three arms over the same seeds:

* ``live`` - (a) the teacher runs in the step on the student's augmented batch;
* ``centre`` - (b) a store of the teacher's outputs on the unaugmented example (one row per id,
  the store every precompute made before view stores; shared by all seeds);
* ``views`` - (c) a view store of the teacher's outputs on exactly the view the student draws for
  every ``(epoch, id)`` of the run (``teacher.store_views``; one store per seed, as the views are
  fixed by the seed).

An arm's run for seed ``s`` has ``config.seed = s`` (data order, augmentation and the student's
initialisation), so the three arms are paired per seed; the teacher (seed ``TEACHER_SEED``) and the
data are the same for all. Every run is an ``experiments.runs.run_kd`` run with its own workdir
(``<workdir>/runs/<arm>/seed_<s>``); stores are made with
``experiments.precompute_teacher_logits``. The student's final test accuracy per run is compared
with :mod:`experiments.paired_stats` (paired t-test and Wilcoxon, Holm over the three comparisons,
bootstrap CI, TOST with ``--margin``, the minimal detectable effect)::

    python -m experiments.view_store_effect --out results/view_store [--seeds 10] \
        [--workdir /tmp/kdjax_view_store] [--margin 0.5] [--quick]

``--quick`` is a test-sized version (200 examples, 2 epochs, 2 seeds) for the test suite. A
started run resumes: complete stages and stores are kept. Writes ``<out>/results.json`` (every
run's accuracy, the config, the timings), ``<out>/report.md`` and ``<out>/view_store_effect.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from typing import Sequence

ARMS = ("live", "centre", "views")
ARM_LABELS = {"live": "(a) live teacher", "centre": "(b) centre-view store",
              "views": "(c) view store"}
#: The comparisons, ``(name, baseline arm, arm)``: the difference is ``arm - baseline``.
COMPARISONS = (("centre - live", "live", "centre"), ("views - live", "live", "views"),
               ("views - centre", "centre", "views"))
TEACHER_SEED = 1000
PROG = "python -m experiments.view_store_effect"


#: The CPU-scale reproduction's regime (``experiments/reproduce_cpu/regime.py``, results/regime):
#: MNIST-1D generated at 50,000 examples (40,000 train / 10,000 test) and its stable student
#: (width 8 with BatchNorm, SGD at the grid's rate 0.1 per 256: seed std 0.68 points from
#: scratch), on a schedule of 12 epochs (3,744 steps; the rate / 10 after epochs 6 and 9) that
#: keeps three arms x 20 seeds, with a view store per seed, within about half an hour on 2 cores.
NUM_SAMPLES = 50_000
STUDENT = "cnn1d:width=8,norm=true"
EPOCHS, DECAY = 12, (6, 9)


def base_config(quick: bool = False):
    """The student's KD config (unlocked): the MNIST-1D grid's medium teacher (width 48) and the
    regime's student (:data:`STUDENT`) at :data:`NUM_SAMPLES` examples for :data:`EPOCHS` epochs,
    full KD, augmented train set, final-epoch evaluation only."""
    from experiments.configs import small

    c = small.eskd_config("mnist1d", "teacher=medium,mode=full,source=checkpoint").unlock()
    c.name = "view_store_effect"
    c.dataset.num_samples = NUM_SAMPLES
    c.student.model = STUDENT
    c.num_epochs, c.optimizer.decay_epochs = EPOCHS, DECAY
    c.dataset.augment = "shift_noise"
    c.teacher.store_format = "full"
    c.teacher.store_dtype = "float32"
    c.run.progress = False
    c.run.log_every_steps = 1000
    if quick:
        c.dataset.num_samples = 200
        c.num_epochs = 2
        c.optimizer.decay_epochs = (1,)
    c.run.eval_every_epochs = c.num_epochs
    c.run.checkpoint_every_epochs = c.num_epochs
    return c


def teacher_config(base):
    c = type(base)(base.to_dict())
    c.experiment = "teacher"
    c.seed = TEACHER_SEED
    c.teacher.source = "train"
    return c


def arm_config(base, arm: str, seed: int, teacher_dir: str, store_root: str):
    c = type(base)(base.to_dict())
    c.seed = int(seed)
    c.teacher.path = teacher_dir
    if arm == "centre":
        c.teacher.precomputed, c.teacher.store = True, os.path.join(store_root, "centre")
    elif arm == "views":
        c.teacher.precomputed = True
        c.teacher.store = os.path.join(store_root, f"views_seed_{seed}")
        c.teacher.store_views = f"epochs:0-{c.num_epochs - 1}"
    elif arm != "live":
        raise ValueError(f"arm {arm!r}; valid: {', '.join(ARMS)}.")
    return c


def _final_accuracy(outcome) -> float:
    student = [s for s in outcome.summaries if s["role"] == "student"]
    if outcome.stopped_early or not student:
        raise RuntimeError(f"{outcome.workdir}: the student run did not finish (preempted?); "
                           f"run the same command again to resume.")
    return 100.0 * float(student[-1]["final"]["accuracy"])


def run_experiment(out: str, *, seeds: Sequence[int], workdir: str, margin: float = 0.5,
                   quick: bool = False, command: str = "") -> dict:
    """Trains the teacher, makes the stores, runs every (seed, arm) and writes the results."""
    from experiments import paired_stats, precompute_teacher_logits as ptl
    from experiments.runs import run_kd, run_teacher

    t_all = time.perf_counter()
    from experiments.datasets import build_data

    base = base_config(quick)
    base_data = build_data(base.dataset, base.seed)
    timings = {}
    teacher_dir = os.path.join(workdir, "teacher")
    t0 = time.perf_counter()
    tout = run_teacher(teacher_config(base), teacher_dir)
    timings["teacher_train_s"] = time.perf_counter() - t0
    teacher_acc = 100.0 * float(tout.summaries[-1]["final"]["accuracy"])
    store_root = os.path.join(workdir, "stores")
    runs = []
    for seed in seeds:
        for arm in ARMS:
            c = arm_config(base, arm, seed, teacher_dir, store_root)
            store_s = None
            if c.teacher.precomputed and not (arm == "centre" and "store_centre_s" in timings):
                t0 = time.perf_counter()
                ptl.precompute_teacher_logits(type(c)(c.to_dict()), c.teacher.store, progress=False)
                store_s = time.perf_counter() - t0
                if arm == "centre":
                    timings["store_centre_s"] = store_s
            t0 = time.perf_counter()
            outcome = run_kd(c, os.path.join(workdir, "runs", arm, f"seed_{seed}"))
            runs.append(dict(arm=arm, seed=int(seed), accuracy=_final_accuracy(outcome),
                             train_s=time.perf_counter() - t0, store_s=store_s,
                             workdir=outcome.workdir, store=c.teacher.store if
                             c.teacher.precomputed else None,
                             store_views=c.teacher.store_views or None))
            print(f"seed {seed} {arm:6s}: {runs[-1]['accuracy']:.1f}% "
                  f"({runs[-1]['train_s']:.0f} s)", flush=True)
    timings["total_s"] = time.perf_counter() - t_all
    results = dict(
        command=command, issue=19, quick=quick, seeds=[int(s) for s in seeds], arms=list(ARMS),
        arm_labels=ARM_LABELS, metric="student top-1 test accuracy (%), final epoch",
        teacher=dict(seed=TEACHER_SEED, model=base.teacher.model, accuracy=teacher_acc,
                     workdir=teacher_dir),
        num_train=len(base_data.sources[base.dataset.train_split]),
        num_test=len(base_data.sources[base.dataset.eval_split]),
        margin=margin, runs=runs, comparisons=compare_arms(runs, seeds, margin),
        config=json.loads(base.to_json_best_effort()),
        arm_overrides={arm: _overrides(base, arm_config(base, arm, seeds[0], teacher_dir,
                                                         store_root)) for arm in ARMS},
        timings=timings, environment=_environment())
    write_outputs(out, results)
    return results


def compare_arms(runs: Sequence[dict], seeds: Sequence[int], margin: float) -> list[dict]:
    """The :data:`COMPARISONS` of the runs' accuracies, paired by seed (one Holm family)."""
    from experiments import paired_stats

    acc = {arm: [next(r["accuracy"] for r in runs if r["arm"] == arm and r["seed"] == s)
                 for s in seeds] for arm in ARMS}
    family = paired_stats.compare_family(
        {name: (acc[a], acc[b]) for name, a, b in COMPARISONS}, margin=margin)
    return [c.to_dict() for c in family]


def write_outputs(out: str, results: dict) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot(results, os.path.join(out, "view_store_effect.png"))
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report(results))


def rewrite_report(out: str, command: str) -> dict:
    """``--report-only``: the statistics, report and plot again from ``<out>/results.json``'s runs
    (no training); the run's own command stays the one that made the runs."""
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    results["comparisons"] = compare_arms(results["runs"], results["seeds"], results["margin"])
    results["report_command"] = command
    write_outputs(out, results)
    return results


def _overrides(base, c) -> dict:
    from experiments.rundir import flatten_record

    a = flatten_record(json.loads(base.to_json_best_effort()))
    b = flatten_record(json.loads(c.to_json_best_effort()))
    return {k: b.get(k) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k != "seed"}


def _environment() -> dict:
    import jax
    import scipy

    return dict(python=platform.python_version(), jax=jax.__version__, scipy=scipy.__version__,
                machine=platform.machine(), cpu_count=os.cpu_count(),
                date=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def claims(results: dict) -> list[dict]:
    """The two claims and what the comparisons say about them."""
    by = {c["name"]: c for c in results["comparisons"]}
    view, centre = by["views - live"], by["centre - live"]
    out = []
    agree = {"equivalent": "agree", "better": "disagree", "worse": "disagree",
             "inconclusive": "inconclusive"}[view["verdict"]]
    out.append(dict(claim="view store equals live teacher (within the margin)",
                    comparison="views - live", verdict=view["verdict"], answer=agree))
    answer = {"worse": "agree", "better": "disagree", "equivalent": "disagree",
              "inconclusive": "inconclusive"}[centre["verdict"]]
    out.append(dict(claim="centre store is worse than live teacher (Beyer et al. 2022)",
                    comparison="centre - live", verdict=centre["verdict"], answer=answer))
    return out


def report(results: dict) -> str:
    import numpy as np

    from experiments import paired_stats

    c, t, tm = results["config"], results["teacher"], results["timings"]
    n = len(results["seeds"])
    lines = [
        "# Consistent precomputed teaching at CPU scale (issue 19)",
        "",
        f"Student top-1 test accuracy (%, final epoch, {results['num_test']} test examples) on "
        "augmented MNIST-1D, "
        "distilled from one teacher with (a) the teacher live in the step, (b) a store of its "
        "outputs on the unaugmented example (centre view), (c) a view store of its outputs on the "
        f"exact augmented view of every (epoch, id). {n} seeds, the same for each arm (paired: "
        "a seed fixes the data order, the augmentation and the student's initialisation).",
        "",
        "Command (every number below comes from it; `results.json` holds every run):",
        "",
        "```",
        results["command"],
        "```",
        "",
    ]
    if results.get("report_command"):
        lines += ["The statistics, this report and the plot were recomputed from `results.json` "
                  f"(no training) with `{results['report_command']}`.", ""]
    lines += [
        f"Setup: MNIST-1D ({results['num_train']} train / {results['num_test']} test examples), "
        f"`dataset.augment='{c['dataset']['augment']}'` (roll by a shift in [-4, 4] plus "
        "N(0, 0.2^2) noise, the demo notebook's), "
        f"student `{c['student']['model']}`, teacher `{t['model']}` (trained once on the augmented "
        f"set, seed {t['seed']}, {c['num_epochs']} epochs: {t['accuracy']:.1f}% test), full KD "
        f"(T = {c['kd']['temperature']}, KD weight {c['kd']['weight']}, CE weight "
        f"{c['kd']['ce_weight']}), SGD lr {c['optimizer']['lr']} per {c['optimizer']['lr_batch']}, "
        f"batch {c['dataset']['batch_size']}, {c['num_epochs']} epochs, lr / 10 at epochs "
        f"{', '.join(str(e) for e in c['optimizer']['decay_epochs'])}. Stores: full float32 "
        "logits (no top-k loss), so (c) holds exactly what (a) computes.",
        "",
        "| arm | mean | std | min | max | per seed (" + ", ".join(str(s) for s in
                                                               results["seeds"]) + ") |",
        "|---|---|---|---|---|---|",
    ]
    for arm in results["arms"]:
        a = np.array([r["accuracy"] for r in results["runs"] if r["arm"] == arm])
        lines.append(f"| {results['arm_labels'][arm]} | {a.mean():.2f} | {a.std(ddof=1) if n > 1 else float('nan'):.2f} | "
                     f"{a.min():.1f} | {a.max():.1f} | {', '.join(f'{v:.1f}' for v in a)} |")
    lines += ["", paired_stats.markdown_table(
        [paired_stats.Comparison.from_dict(x) for x in results["comparisons"]]), "",
        paired_stats.METHOD_NOTE.format(margin=results["margin"]), "",
        f"Margin: ±{results['margin']} accuracy points. One run's accuracy on "
        f"{results['num_test']} test examples has a binomial standard error of about "
        f"{_binomial_se(results):.1f} points at the live arm's mean, and the accuracy step is "
        f"{100 / results['num_test']:g} points; a consistency effect worth reporting (Beyer et al. report several points on "
        "ImageNet) is larger than 0.5 points, and a difference below it is smaller than what one "
        "test set of this size can resolve for a single run.", "",
        "## Claims", "", "| claim | comparison | verdict | agree? |", "|---|---|---|---|"]
    for cl in claims(results):
        lines.append(f"| {cl['claim']} | {cl['comparison']} | {cl['verdict']} | {cl['answer']} |")
    lines += ["", "![per-seed accuracies and paired differences](view_store_effect.png)", "",
              "## Timings", "",
              f"Measured on this machine ({results['environment']['cpu_count']} CPU cores, shared "
              f"with other jobs; jax {results['environment']['jax']}): total "
              f"{tm['total_s'] / 60:.1f} min; teacher training {tm['teacher_train_s']:.0f} s; "
              f"centre store {tm.get('store_centre_s', float('nan')):.1f} s."]
    for arm in results["arms"]:
        rs = [r for r in results["runs"] if r["arm"] == arm]
        tr = np.mean([r["train_s"] for r in rs])
        st = [r["store_s"] for r in rs if r["store_s"] is not None and arm == "views"]
        lines.append(f"- {results['arm_labels'][arm]}: student run {tr:.0f} s mean"
                     + (f"; view store precompute {np.mean(st):.0f} s mean per seed" if st else ""))
    lines += ["", "Runs that a resumed command found complete report the time to skip them."]
    return "\n".join(lines) + "\n"


def _binomial_se(results: dict) -> float:
    p = sum(r["accuracy"] for r in results["runs"] if r["arm"] == "live") / 100
    p /= len(results["seeds"])
    return 100 * (p * (1 - p) / results["num_test"]) ** 0.5


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    arms, seeds = results["arms"], results["seeds"]
    acc = {a: np.array([next(r["accuracy"] for r in results["runs"]
                             if r["arm"] == a and r["seed"] == s) for s in seeds]) for a in arms}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for s_i in range(len(seeds)):
        ax1.plot(range(len(arms)), [acc[a][s_i] for a in arms], color="0.75", lw=0.8, zorder=1)
    for i, a in enumerate(arms):
        ax1.scatter(np.full(len(seeds), i), acc[a], s=14, zorder=2)
        m = acc[a].mean()
        half = (np.std(acc[a], ddof=1) / np.sqrt(len(seeds)) * 1.96) if len(seeds) > 1 else 0
        ax1.errorbar(i + 0.15, m, yerr=half, fmt="o", color="k", capsize=4, zorder=3)
    ax1.set_xticks(range(len(arms)), [results["arm_labels"][a] for a in arms])
    ax1.set_ylabel("student test accuracy (%)")
    ax1.set_title("per seed (lines join a seed's runs); mean ± 1.96 SE")
    m = results["margin"]
    for i, comp in enumerate(results["comparisons"]):
        d = acc[comp["arm"]] - acc[comp["baseline"]]
        ax2.scatter(np.full(len(d), i), d, s=14, zorder=2)
        lo, hi = comp["ci_low"], comp["ci_high"]
        ax2.errorbar(i + 0.15, comp["mean_diff"], yerr=[[comp["mean_diff"] - lo], [hi - comp["mean_diff"]]],
                     fmt="o", color="k", capsize=4, zorder=3)
        ax2.annotate(comp["verdict"], (i + 0.2, hi), fontsize=8)
    ax2.axhspan(-m, m, color="tab:green", alpha=0.12, label=f"equivalence margin ±{m}")
    ax2.axhline(0, color="0.5", lw=0.8)
    ax2.set_xticks(range(len(results["comparisons"])), [c["name"] for c in results["comparisons"]])
    ax2.set_ylabel("paired difference (accuracy points)")
    ax2.set_title("paired differences; mean and bootstrap 95% CI")
    ax2.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="results directory (results.json, report.md, plot)")
    p.add_argument("--seeds", type=int, default=10, help="number of seeds (0 .. N-1); default 10")
    p.add_argument("--workdir", default="", help="run dirs and stores (default: /tmp/kdjax_view_store"
                                                 "[_quick])")
    p.add_argument("--margin", type=float, default=0.5, help="TOST margin, accuracy points")
    p.add_argument("--quick", action="store_true", help="200 examples, 2 epochs, 2 seeds (tests)")
    p.add_argument("--report-only", action="store_true",
                   help="recompute the statistics, report.md and the plot from <out>/results.json")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    command = " ".join([PROG] + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])
    if args.report_only:
        results = rewrite_report(args.out, command)
        for cl in claims(results):
            print(f"{cl['claim']}: {cl['verdict']} ({cl['answer']})")
        return 0
    seeds = list(range(2 if args.quick and args.seeds == 10 else args.seeds))
    if len(seeds) < 2:
        p.error("--seeds must be at least 2 (a paired comparison).")
    workdir = args.workdir or ("/tmp/kdjax_view_store" + ("_quick" if args.quick else ""))
    results = run_experiment(args.out, seeds=seeds, workdir=workdir, margin=args.margin,
                             quick=args.quick, command=command)
    for cl in claims(results):
        print(f"{cl['claim']}: {cl['verdict']} ({cl['answer']})")
    print(f"wrote {args.out}/results.json, report.md, view_store_effect.png "
          f"({results['timings']['total_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
