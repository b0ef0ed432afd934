"""The reproduction's report: ``README.md`` (setup, verdicts, tables), three PNG plots and
``results.json`` (every per-seed number), written into ``--out``.

Tables are :func:`experiments.report.markdown_grid` tables and the figures
:func:`experiments.report.figure` ones (matplotlib, Agg canvas), the pieces of a run's own report;
the plots here average over seeds (mean ± std), where a run's report draws one run.
"""

from __future__ import annotations

import os
import platform
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from experiments import report as run_report
from experiments.datasets import build_data
from experiments.reproduce_cpu.grid import SIZES, TEACHER_SEEDS, build_config, grid
from experiments.grids import write_json
from experiments.reproduce_cpu.statistics import (ALPHA, COLLAPSE_CAP, COLLAPSE_SDS, MARGINS,
                                                   by_cell, collapse_rates, collapse_test,
                                                   collapse_thresholds, collapsed_runs,
                                                   evaluate_claims, stats_of)
from experiments.rundir import abstract_variables
from experiments.specs import build_model
from kdjax.atomic import write_text_atomic

RESULTS_JSON = "results.json"
REPORT_FILE = "README.md"
ACCURACY_PLOT = "accuracy_vs_teacher.png"
MIMIC_PLOT = "mimic.png"
FITNET_TA_PLOT = "fitnet_ta.png"
CLAIMS_PLOT = "claims.png"

#: Size of one plot panel, inches.
PANEL_WIDTH, PANEL_HEIGHT = 5.2, 4.2

#: A GitHub markdown table of a header and rows of cells (``markdown_table(header, rows)``).
markdown_table = run_report.markdown_grid


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
    """A paired mean difference in the comparison's units: points of top-1, nats of KL."""
    return f"{diff:+.2f} points" if metric == "accuracy" else f"{diff:+.4f}"


def _ci(result: Mapping[str, Any]) -> str:
    digits = 2 if result["metric"] == "accuracy" else 4
    return f"[{result['ci_low']:+.{digits}f}, {result['ci_high']:+.{digits}f}]"


def comparison_text(result: Mapping[str, Any]) -> str:
    """One comparison in words: the paired mean difference, its CI, the Holm-adjusted tests, the
    MDE and the verdict."""
    excluded = (f"; seeds {result['excluded']} left out (collapsed)" if result["excluded"]
                else "")
    note = f", {result['note']}" if result["note"] else ""
    return (f"{result['name']}: {fmt_diff(result['mean_diff'], result['metric'])}, 95% CI "
            f"{_ci(result)} over {result['n']} paired seeds{excluded} (Holm: paired t p = "
            f"{fmt_p(result['p_t_holm'])}, Wilcoxon p = {fmt_p(result['p_wilcoxon_holm'])}, "
            f"TOST ±{result['margin']:g} p = {fmt_p(result['p_tost_holm'])}; MDE "
            f"{result['mde']:.2f}) -> {result['verdict']}{note}")


def eskd_table(acc: Mapping, teacher_acc: Mapping, models: Mapping,
               sizes: Sequence[str] = SIZES, early_acc: Mapping | None = None) -> str:
    """Table 1: eval top-1 (%) of the student per teacher (rows) and KD mode (columns).

    ``early_acc``: ``{cell: {seed: top-1}}`` of the early-epoch teachers (the ``teacher_accuracy``
    that the ``eskd_early`` runs measured)."""
    early_acc = early_acc or {}
    rows = [["none (scratch)", f"`{models['student']}`", "-", "-",
             fmt_pct(stats_of(acc.get("scratch"))), "-", "-"]]
    for size in sizes:
        rows.append([size, f"`{models[size]}`",
                     fmt_pct(stats_of(teacher_acc.get(f"teacher/{size}"))),
                     fmt_pct(stats_of(early_acc.get(f"eskd_early/{size}"))),
                     fmt_pct(stats_of(acc.get(f"full/{size}"))),
                     fmt_pct(stats_of(acc.get(f"eskd_stop/{size}"))),
                     fmt_pct(stats_of(acc.get(f"eskd_early/{size}")))])
    return markdown_table(["teacher", "teacher model", "teacher top-1", "early teacher top-1",
                           "student: full KD / scratch", "student: ESKD stop_kd",
                           "student: ESKD early_teacher"], rows)


def mimic_table(records: Sequence[Mapping], sizes: Sequence[str] = SIZES) -> str:
    """Table 2: how well the full-KD student mimics each teacher at the end of training."""
    metrics = {m: by_cell(records, m) for m in ("train_kd", "train_ce", "kl", "agreement",
                                                "accuracy")}
    rows = []
    for size in sizes:
        key = f"full/{size}"
        rows.append([size, fmt_num(stats_of(metrics["train_kd"].get(key))),
                     fmt_num(stats_of(metrics["train_ce"].get(key))),
                     fmt_num(stats_of(metrics["kl"].get(key))),
                     fmt_pct(stats_of(metrics["agreement"].get(key)))])
    return markdown_table(["teacher (full KD)", "train KD loss T^2 KL (T=4), last log",
                           "train CE, last log", "eval KL(p_t || p_s), T=1", "eval agreement (%)"],
                          rows)


def fitnet_ta_table(acc: Mapping, teacher_acc: Mapping, models: Mapping,
                    assistant_acc: Mapping[int, float] | None = None) -> str:
    """Table 3: the FitNet comparison and the teacher-assistant chain (``assistant_acc``: seed ->
    top-1 of the chain's assistant stage)."""
    rows = [
        ["FitNet teacher", f"`{models['fitnet_teacher']}`",
         fmt_pct(stats_of(teacher_acc.get("teacher/fitnet")))],
        ["thin-deep student from scratch", f"`{models['fitnet_student']}`",
         fmt_pct(stats_of(acc.get("fitnet/scratch")))],
        ["thin-deep student, KD only (FitNet stage 2 alone)", f"`{models['fitnet_student']}`",
         fmt_pct(stats_of(acc.get("fitnet/kd_only")))],
        ["thin-deep student, FitNet (hints, then KD)", f"`{models['fitnet_student']}`",
         fmt_pct(stats_of(acc.get("fitnet/hint_kd")))],
        *[[f"{label}, twice the rate", f"`{models['fitnet_student']}`",
           fmt_pct(stats_of(acc.get(cell)))]
          for label, cell in (("thin-deep student, KD only", "fitnet_fast/kd_only"),
                              ("thin-deep student, FitNet", "fitnet_fast/hint_kd"))
          if cell in acc],
        ["direct large -> student (full KD)", f"`{models['student']}`",
         fmt_pct(stats_of(acc.get("full/large")))],
        ["TA chain: the assistant (medium size, distilled from large)",
         f"`{models['medium']}`", fmt_pct(stats_of(assistant_acc))],
        ["TA chain large -> medium -> student (full KD)", f"`{models['student']}`",
         fmt_pct(stats_of(acc.get("ta/large-medium")))],
    ]
    return markdown_table(["run", "model", "eval top-1 (%)"], rows)


PREDICTS = {"higher": "a > b", "lower": "a < b", "not_higher": "a not > b"}


def comparisons_table(claim_results: Sequence[Mapping]) -> str:
    """Every comparison behind the verdicts, with its tests (p-values Holm-adjusted within the
    claim)."""
    rows = []
    for claim in claim_results:
        for r in claim["results"]:
            rows.append([claim["id"], r["name"], str(r["n"]),
                         ", ".join(map(str, r["excluded"])) or "-",
                         fmt_diff(r["mean_diff"], r["metric"]), _ci(r),
                         f"{fmt_p(r['p_t'])} ({fmt_p(r['p_t_holm'])})",
                         f"{fmt_p(r['p_wilcoxon'])} ({fmt_p(r['p_wilcoxon_holm'])})",
                         f"{fmt_p(r['p_tost'])} ({fmt_p(r['p_tost_holm'])}), ±{r['margin']:g}",
                         f"{r['mde']:.2f}", r["verdict"] + (f" ({r['note']})" if r["note"] else ""),
                         PREDICTS[r["claim"]], r["answer"]])
    return markdown_table(["claim", "comparison a - b", "n", "seeds left out", "mean diff",
                           "95% CI (bootstrap)", "paired t p (Holm)", "Wilcoxon p (Holm)",
                           "TOST p (Holm), margin", "MDE (80%)", "paired verdict",
                           "claim predicts", "answer"], rows)


def verdict_table(claim_results: Sequence[Mapping]) -> str:
    """One row per claim: the claim, its verdict and every comparison behind it, in short."""
    return markdown_table(["claim", "verdict", "evidence"], [
        [c["claim"], f"**{c['verdict']}**",
         "; ".join(f"{r['name']}: {fmt_diff(r['mean_diff'], r['metric'])} {_ci(r)} "
                   f"({r['verdict']})" for r in c["results"]) or "-"]
        for c in claim_results])


def _claim_section(claim: Mapping) -> list[str]:
    lines = [f"### {claim['claim']}", "", f"Paper: {claim['paper']}.", "",
             f"**Verdict: {claim['verdict']}.**", ""]
    for r in claim["results"]:
        lines.append(f"- {comparison_text(r)}; the claim predicts {PREDICTS[r['claim']]}: "
                     f"{r['answer']}.")
    return lines + [""]


def collapse_table(rates: Mapping[str, Mapping]) -> str:
    """Collapsed runs per student cell: ``k / n``, the rate and its exact 95% CI."""
    return markdown_table(["cell", "collapsed / runs", "rate (%)", "95% CI (Clopper-Pearson)"], [
        [cell, f"{r['k']} / {r['n']}", f"{100 * r['rate']:.0f}",
         f"[{100 * r['ci_low']:.0f}, {100 * r['ci_high']:.0f}]"] for cell, r in rates.items()])


def constants_table(acc: Mapping, teacher_acc: Mapping, early_acc: Mapping) -> str:
    """The ESKD protocol's free constants as measured axes (MNIST-1D grid): the stop epoch, the
    early teacher and the loss constants, each against full KD from the large teacher."""
    rows = [["full KD (T = 4, 0.1 CE + 0.9 KD)", fmt_pct(stats_of(acc.get("full/large")))]]
    for label, cell in (("ESKD stop_kd after 25% (epoch 6)", "eskd_stop25/large"),
                        ("ESKD stop_kd after 50% (epoch 12, first decay)", "eskd_stop/large"),
                        ("ESKD stop_kd after 75% (epoch 18, second decay)", "eskd_stop75/large"),
                        ("ESKD early_teacher (epoch 12 snapshot)", "eskd_early/large"),
                        ("full KD at T = 1, 0.5 CE + 0.5 KD", "full_t1/large")):
        rows.append([label, fmt_pct(stats_of(acc.get(cell)))])
    rows.append(["(teacher: final / epoch-12 snapshot)",
                 f"{fmt_pct(stats_of(teacher_acc.get('teacher/large')))} / "
                 f"{fmt_pct(stats_of(early_acc.get('eskd_early/large')))}"])
    return markdown_table(["student of the large teacher", "eval top-1 (%)"], rows)


def plot_accuracy_vs_teacher(acc: Mapping, teacher_acc: Mapping, params: Mapping[str, int],
                             path: str, sizes: Sequence[str] = SIZES) -> str:
    """Student eval top-1 (every seed as a dot, mean ± std as a bar) against teacher size: full
    KD, ESKD (both readings), the teachers themselves, and the scratch student as a band."""
    fig, (ax,) = run_report.figure(1, width=PANEL_WIDTH, height=4.6)
    x = np.arange(len(sizes))
    for i, (prefix, label) in enumerate((("full", "full KD"), ("eskd_stop", "ESKD stop_kd"),
                                         ("eskd_early", "ESKD early_teacher"))):
        stats = [stats_of(acc.get(f"{prefix}/{s}")) for s in sizes]
        keep = [j for j, st in enumerate(stats) if st]
        for j in keep:
            values = 100 * np.array(list(acc[f"{prefix}/{sizes[j]}"].values()))
            ax.scatter(np.full(values.size, x[j] + (i - 1) * 0.18 + 0.05), values, s=6,
                       color=f"C{i}", alpha=0.45, linewidths=0)
        if keep:
            ax.errorbar(x[keep] + (i - 1) * 0.18, [100 * stats[j]["mean"] for j in keep],
                        yerr=[100 * np.nan_to_num(stats[j]["std"]) for j in keep], marker="o",
                        capsize=3, label=label, color=f"C{i}")
    scratch = stats_of(acc.get("scratch"))
    if scratch:
        m, s = 100 * scratch["mean"], 100 * np.nan_to_num(scratch["std"])
        ax.axhline(m, color="k", linestyle="--", linewidth=1, label="scratch")
        ax.axhspan(m - s, m + s, color="k", alpha=0.1)
    ticks = []
    for s in sizes:
        st = stats_of(teacher_acc.get(f"teacher/{s}"))
        ticks.append(f"{s}\n{params.get(s, 0):,} params" +
                     (f"\nteacher {100 * st['mean']:.1f}%" if st else ""))
    ax.set_xticks(x, ticks)
    ax.set_ylabel("student eval top-1 (%)")
    ax.set_title("student accuracy vs teacher size (dots: seeds; mean ± std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)
    return path


def plot_claims(claim_results: Sequence[Mapping], values: Mapping[str, Mapping[int, float]],
                path: str) -> str:
    """Every top-1 comparison of the claims at a glance: one row per comparison ``a - b``, the
    per-seed paired differences as dots (the seeds it used), the mean with its bootstrap 95% CI,
    the TOST margin as a band, and the paired verdict and the claim's answer beside it."""
    rows = [(c["id"], r) for c in claim_results for r in c["results"] if r["metric"] == "accuracy"]
    fig, (ax,) = run_report.figure(1, width=11.0, height=max(2.5, 0.34 * len(rows) + 1.2))
    if not rows:
        ax.text(0.5, 0.5, "no comparisons", ha="center", va="center", transform=ax.transAxes)
        fig.savefig(path, dpi=100)
        return path
    margin = rows[0][1]["margin"]
    ax.axvspan(-margin, margin, color="tab:green", alpha=0.12,
               label=f"equivalence margin ±{margin:g}")
    ax.axvline(0, color="0.5", linewidth=0.8)
    for y, (claim, r) in enumerate(rows):
        a, b = values[r["a"]], values[r["b"]]
        seeds = sorted((set(a) & set(b)) - set(r["excluded"]))
        d = [100 * (a[s] - b[s]) for s in seeds]
        ax.scatter(d, np.full(len(d), y) + np.linspace(-0.12, 0.12, len(d)), s=7, alpha=0.5,
                   color="C0", linewidths=0)
        ax.errorbar(r["mean_diff"], y, xerr=[[r["mean_diff"] - r["ci_low"]],
                                             [r["ci_high"] - r["mean_diff"]]],
                    fmt="o", color="k", capsize=3, markersize=4)
        ax.annotate(f" {r['verdict']} -> {r['answer']}", (1.0, y), xycoords=("axes fraction",
                    "data"), fontsize=8, va="center")
    ax.set_yticks(range(len(rows)), [f"[{claim}] {r['name']}" for claim, r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("paired difference a - b (top-1 points); dots: seeds; bar: bootstrap 95% CI")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize="small", loc="lower left")
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
    fig, axes = run_report.figure(3, width=PANEL_WIDTH, height=PANEL_HEIGHT)
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
    """Bars (mean ± std, seeds as dots): thin-deep scratch / KD only / FitNet (and the last two at
    twice the rate); the small student
    from scratch, by full KD from each teacher, and through the TA chain."""
    fig, axes = run_report.figure(2, width=PANEL_WIDTH, height=PANEL_HEIGHT)
    groups = ((("fitnet/scratch", "scratch"), ("fitnet/kd_only", "KD only"),
               ("fitnet/hint_kd", "hints + KD"), ("fitnet_fast/kd_only", "KD only\n2x rate"),
               ("fitnet_fast/hint_kd", "hints + KD\n2x rate")),
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


def count_params(spec: str, sample_input: np.ndarray, num_classes: int) -> int:
    """Parameters of a model spec (shapes only, nothing computed)."""
    variables = abstract_variables(build_model(spec, num_classes), sample_input)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(variables["params"])))


def setup_info(dataset: str, smoke: bool) -> dict:
    """Dataset sizes, model parameter counts and the training settings, read from the configs of
    the grid's own cells (:func:`~experiments.reproduce_cpu.grid.build_config`)."""
    teachers, students = grid(dataset)
    cells = {c.key: c for c in teachers + students}
    config = {key: build_config(cells[key], dataset, 0, "/", smoke)
              for key in ("scratch", "eskd_stop/large", "eskd_early/large", "fitnet/hint_kd")}
    kd, early, fit = config["eskd_stop/large"], config["eskd_early/large"], config["fitnet/hint_kd"]
    teacher_configs = {size: build_config(cells[f"teacher/{size}"], dataset, 0, "/", smoke)
                       for size in SIZES}
    data = build_data(kd.dataset, 0)
    specs = {**{size: c.teacher.model for size, c in teacher_configs.items()},
             "student": config["scratch"].student.model, "fitnet_teacher": fit.teacher.model,
             "fitnet_student": fit.student.model}
    params = {k: count_params(v, data.sample_input, data.num_classes) for k, v in specs.items()}

    def optimizer(c) -> dict:
        return {"name": c.optimizer.name, "lr": c.optimizer.lr, "lr_batch": c.optimizer.lr_batch,
                "momentum": c.optimizer.momentum, "weight_decay": c.optimizer.weight_decay,
                "decay_epochs": list(c.optimizer.decay_epochs)}

    return {
        "dataset": dataset, "smoke": smoke,
        "train_examples": data.num_examples(data.train_split),
        "eval_examples": data.num_examples(data.eval_split), "eval_split": data.eval_split,
        "num_classes": data.num_classes, "models": specs, "params": params,
        "epochs": kd.num_epochs, "steps_per_epoch": data.steps_per_epoch,
        "batch_size": kd.dataset.batch_size, "optimizer": optimizer(kd),
        "teacher_optimizer": optimizer(teacher_configs["large"]),
        "teacher_seeds": TEACHER_SEEDS[dataset], "precomputed": cells["full/large"].precomputed,
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
            "min). Invocations: " + "; ".join(parts) + ". The 2-core CPU was shared with other "
            "processes (load average above 2), so these times are upper bounds of the time on "
            "an idle machine.")


#: Published MNIST-1D test accuracies (Greydanus & Kobak, ICML 2024), percent.
PUBLISHED_MNIST1D = {"logistic regression": 32, "MLP": 68, "CNN": 94}


def _seeds_text(setup: Mapping, seeds: Sequence[int]) -> str:
    k = setup["teacher_seeds"]
    teachers = ("seed s sets the initialisation and data order of the teacher and of every "
                "student of seed s, and the seed-s students all distil from the seed-s teachers"
                if k is None else
                f"seed s sets the initialisation and data order of every student of seed s, "
                f"which distil from the teachers of seed s mod {k} ({k} teacher seeds, each "
                f"teacher trained once)")
    return (f"- Seeds: {len(seeds)} per student cell ({seeds[0]}-{seeds[-1]}); {teachers}; so "
            f"comparisons between cells are paired by seed.")


def write_report(out: str, *, setup: Mapping, machine: Mapping, records: Sequence[Mapping],
                 seeds: Sequence[int], timing: Mapping, command: str,
                 sizes: Sequence[str] = SIZES, report_command: str | None = None,
                 updates: Sequence[Mapping] = ()) -> dict:
    """Writes ``README.md``, the plots and ``results.json`` into ``out``; returns the JSON object.
    ``report_command``: the ``--report-only`` command that recomputed the statistics from an
    earlier run's records (None: ``command`` trained them and wrote this report). ``updates``:
    ``{'command', 'cells'}`` of each ``--merge`` invocation that trained those cells again after
    ``command`` (their records replace ``command``'s)."""
    os.makedirs(out, exist_ok=True)
    models = setup["models"]
    acc = by_cell(records)
    teacher_acc = {k: v for k, v in acc.items() if k.startswith("teacher/")}
    early_acc = by_cell(records, "teacher_accuracy")
    thresholds = collapse_thresholds(records)
    collapsed = collapsed_runs(records, thresholds)
    rates = collapse_rates(records, collapsed)
    claim_results = evaluate_claims({"accuracy": acc, "kl": by_cell(records, "kl")}, sizes,
                                    collapsed)
    fitnet_collapse = [(a, b, collapse_test(a, b, records, collapsed))
                       for a, b in (("fitnet/hint_kd", "fitnet/kd_only"),
                                    ("fitnet/hint_kd", "fitnet/scratch"),
                                    ("fitnet_fast/hint_kd", "fitnet_fast/kd_only"))
                       if a in rates and b in rates]
    plot_accuracy_vs_teacher(acc, teacher_acc, setup["params"], os.path.join(out, ACCURACY_PLOT),
                             sizes)
    plot_mimic(records, os.path.join(out, MIMIC_PLOT), sizes)
    plot_fitnet_ta(acc, os.path.join(out, FITNET_TA_PLOT))
    plot_claims(claim_results, acc, os.path.join(out, CLAIMS_PLOT))

    p = setup["params"]
    o, to = setup["optimizer"], setup["teacher_optimizer"]
    f = setup["fitnet"]
    lines = [f"# CPU-scale reproduction of the ESKD and FitNet claims ({setup['dataset']})", ""]
    if setup["smoke"]:
        lines += ["**SMOKE RUN: two short epochs on a slice of the data. These numbers only show "
                  "that the pipeline runs; they say nothing about the claims.**", ""]
    teachers_vs_published = ""
    if setup["dataset"] == "mnist1d":
        teachers_vs_published = (
            " Published MNIST-1D test accuracies for comparison: " + ", ".join(
                f"{k} {v}%" for k, v in PUBLISHED_MNIST1D.items()) + "; here (mean over the "
            "teacher seeds): " + ", ".join(
                f"{size} teacher {fmt_pct(stats_of(teacher_acc.get(f'teacher/{size}')))}"
                for size in sizes) + f", student from scratch "
            f"{fmt_pct(stats_of(acc.get('scratch')))}.")
    lines += [
        f"Regenerate with `{command}` (see docs/experiments.md). Every number below was measured "
        f"by that command; nothing is copied or extrapolated. Per-seed numbers: "
        f"[`{RESULTS_JSON}`]({RESULTS_JSON})."
        + (f" The statistics, tables and plots were recomputed from those records (no "
           f"training) by `{report_command}`." if report_command else "")
        + "".join(f" The cells {', '.join(f'`{c}`' for c in u['cells'])} were trained again, "
                  f"after a change to their setup, by `{u['command']}`, which kept the other "
                  f"cells' records." for u in updates), "",
        "## Setup", "",
        f"- Data: {setup['dataset']}, {setup['train_examples']} train / {setup['eval_examples']} "
        f"{setup['eval_split']} examples, {setup['num_classes']} classes; top-1 is measured on "
        f"the {setup['eval_split']} split after the last step.{teachers_vs_published}",
        f"- Student `{models['student']}` ({p['student']:,} parameters); teachers small "
        f"`{models['small']}` ({p['small']:,}), medium `{models['medium']}` ({p['medium']:,}), "
        f"large `{models['large']}` ({p['large']:,}).",
        f"- Students: {setup['epochs']} epochs x {setup['steps_per_epoch']} steps, batch "
        f"{setup['batch_size']}, {o['name']} momentum {o['momentum']}, learning rate {o['lr']} x "
        f"batch / {o['lr_batch']}, divided by 10 at epochs {o['decay_epochs']}, weight decay "
        f"{o['weight_decay']}. Teachers: the same schedule with {to['name']} at rate {to['lr']} x "
        f"batch / {to['lr_batch']}, weight decay {to['weight_decay']}.",
        f"- KD: `{setup['ce_weight']} CE + {setup['kd_weight']} T^2 KL(p_t^T || p_s^T)`, "
        f"T = {setup['temperature']}. ESKD `stop_kd`: the KD term off from epoch "
        f"{setup['stop_epoch']} (then CE with weight 1). ESKD `early_teacher`: full KD from the "
        f"teacher's epoch-{setup['early_teacher_epoch']} snapshot."
        + (" The teacher's logits are computed once per run into a logit store (full float32; "
           "no augmentation, so the store holds exactly what a live teacher computes) and read "
           "from it." if setup["precomputed"] else ""),
        f"- FitNet: teacher `{models['fitnet_teacher']}` ({p['fitnet_teacher']:,}; trained at "
        f"learning rate {f['teacher_lr']} x batch / {o['lr_batch']}), thin-and-deep "
        f"student `{models['fitnet_student']}` ({p['fitnet_student']:,}); stage 1 "
        f"{f['stage1_epochs']} epochs ({f['stage1_schedule']} schedule) on the hint loss between "
        f"the teacher's `{f['hint_layer']}` and a 1x1-conv regressor"
        f"{' ending in a ReLU' if f['regressor_relu'] else ''} on the student's "
        f"`{f['guided_layer']}` (only the layers up to it trained); stage 2 {setup['epochs']} "
        f"epochs of `CE + lambda H(p_t^T, p_s^T)`, T = {f['temperature']}, lambda "
        f"{f['weight_start']} -> {f['weight_end']}; learning rate {f['lr']} x batch / "
        f"{o['lr_batch']} (the FitNet config's). KD only: stage 2 alone from a random "
        f"initialisation. Scratch: CE alone, same learning rate and epochs.",
        _seeds_text(setup, seeds),
        f"- Statistics (`experiments/paired_stats.py`): mean ± sample std (ddof 1) over seeds. "
        f"Each claim's comparisons `a - b` are one family: per-seed differences, the paired "
        f"t-test and the Wilcoxon signed-rank test (two-sided, each Holm-adjusted over the "
        f"family), a bootstrap 95% CI of the mean difference (BCa), a TOST equivalence test with "
        f"margin ±{MARGINS['accuracy']:g} points of top-1 (±{MARGINS['kl']:g} for KL), and the "
        f"minimal detectable effect (80% power, alpha {ALPHA}). Paired verdict: better / worse "
        f"when both tests reject, else equivalent when TOST rejects, else inconclusive. The "
        f"claim's answer: agree / disagree when the verdict is what the claim predicts / the "
        f"opposite (for a predicted gain, equivalence disagrees; for \"no gain\", equivalence "
        f"agrees), else inconclusive. Collapsed runs are left out of the comparisons and counted "
        f"apart (below).",
        f"- Machine: {machine['platform']}, {machine['cpu_count']} CPU cores, Python "
        f"{machine['python']}, jax {machine['jax']}, devices {', '.join(machine['devices'])}.",
        timing_text(timing),
        f"- Code: the runs were trained by source version(s) "
        f"{', '.join(f'`{v}` ({_runs(n)})' for v, n in code_versions(records).items())} "
        f"(SHA-256 prefix over `kdjax/` and `experiments/`, see `code_version`).", "",
        "## Verdicts", "",
        "The claims the reproduction answers, then supporting measurements. Evidence: paired "
        "mean difference `a - b` with its bootstrap 95% CI and the paired verdict.", "",
        verdict_table([c for c in claim_results if c["core"]]), "",
        "Supporting measurements:", "",
        verdict_table([c for c in claim_results if not c["core"]]), ""]
    for claim in claim_results:
        lines += _claim_section(claim)
    threshold_text = "; ".join(
        f"`{model}`: {100 * t['threshold']:.1f}%" + (
            f" (scratch {100 * t['scratch_mean']:.2f} ± {100 * t['scratch_std']:.2f}, "
            f"n = {t['scratch_n']})" if t["scratch_n"] >= 2 else " (no scratch runs: the cap)")
        for model, t in thresholds.items())
    lines += [
        "## Tables", "",
        "### Table 1: the ESKD grid (eval top-1 %, mean ± std over seeds)", "",
        "Rows: the student's teacher; columns: the teacher's own top-1 and the student's under "
        "full KD, ESKD `stop_kd` and ESKD `early_teacher`. The first row is the student trained "
        "on labels alone.", "",
        eskd_table(acc, teacher_acc, models, sizes, early_acc), ""]
    if "full_t1/large" in acc or "eskd_stop25/large" in acc:
        lines += ["### Table 2: the protocol's free constants (large teacher)", "",
                  "Where KD stops, which teacher snapshot teaches, and the loss constants, each "
                  "beside full KD at the grid's constants (the `stop_epoch` and `loss_constants` "
                  "claims test them).", "",
                  constants_table(acc, teacher_acc, early_acc), ""]
    lines += [
        "### Table 3: does the student mimic its teacher? (full KD, end of training)", "",
        "The ESKD paper's explanation of the capacity gap: a small student cannot follow a large "
        "teacher, so its KD loss stays higher and it trades cross-entropy for KD loss. Train "
        "losses are the mean over the last logging window; KL and agreement are on the eval "
        "split.", "",
        mimic_table(records, sizes), "",
        "### Table 4: FitNet and the teacher-assistant chain (eval top-1 %)", "",
        fitnet_ta_table(acc, teacher_acc, models, {
            r["seed"]: r["stages"][0]["accuracy"] for r in records
            if r["cell"] == "ta/large-medium" and r["stages"][0]["accuracy"] is not None}), "",
        "### Collapsed runs", "",
        f"A student run is collapsed when its final top-1 is below min({100 * COLLAPSE_CAP:.0f}%, "
        f"its model's scratch mean - {COLLAPSE_SDS:g} scratch std): far below what the "
        f"architecture reaches on labels alone. Thresholds: {threshold_text}. Collapsed runs are "
        f"left out of the paired comparisons (their seeds are listed there) and counted here.", "",
        collapse_table(rates) if rates else "No student runs.", ""]
    for a, b, t in fitnet_collapse:
        lines.append(f"- Collapse, {a} vs {b} (exact McNemar over {t['n']} paired seeds): "
                     f"{t['a_only']} seeds collapsed only in {a}, {t['b_only']} only in {b}; "
                     f"p = {fmt_p(t['p'])}.")
    lines += ["", (markdown_table(["cell", "seed", "top-1 (%)", "eval CE"],
                                  [[c["cell"], str(c["seed"]), f"{100 * c['accuracy']:.2f}",
                                    "-" if c["ce"] is None else f"{c['ce']:.3f}"]
                                   for c in collapsed]) if collapsed else "No run collapsed."), "",
        "### Table 5: every comparison", "",
        "`mean diff` = mean over seeds of a - b (top-1 in points; KL in nats), p-values raw "
        "(Holm-adjusted within the claim); `claim predicts` is what the paper's claim says about "
        "`a - b`.", "",
        comparisons_table(claim_results), "",
        "## Plots", "",
        f"Every top-1 comparison of the claims: per-seed paired differences, the mean with its "
        f"bootstrap 95% CI, the equivalence margin, the verdict: ![claims]({CLAIMS_PLOT})", "",
        f"Student top-1 against teacher size (full KD, both ESKD readings, scratch band): "
        f"![accuracy vs teacher]({ACCURACY_PLOT})", "",
        f"The student fails to mimic? Train KD loss, train CE and eval KL(p_t || p_s) over "
        f"training, full KD, per teacher size: ![mimic]({MIMIC_PLOT})", "",
        f"FitNet and the teacher-assistant chain (bars: mean ± std; dots: seeds): "
        f"![fitnet and TA]({FITNET_TA_PLOT})", ""]
    write_text_atomic(os.path.join(out, REPORT_FILE), "\n".join(lines))

    cells = {}
    for r in sorted(records, key=lambda r: (r["cell"], r["seed"])):
        entry = cells.setdefault(r["cell"], {"seeds": {}})
        entry["seeds"][str(r["seed"])] = {k: v for k, v in r.items()
                                          if k not in ("cell", "seed", "curves")}
    for key, entry in cells.items():
        entry["accuracy"] = stats_of(acc.get(key))
    result = {"setup": dict(setup), "machine": dict(machine), "seeds": list(seeds),
              "timing": dict(timing), "command": command, "report_command": report_command,
              "updates": [dict(u) for u in updates],
              "cells": cells, "claims": claim_results,
              "collapsed": collapsed, "collapse_thresholds": thresholds,
              "collapse_rates": rates,
              "curves": {f"{r['cell']}/seed{r['seed']}": r["curves"] for r in records
                         if r["cell"].startswith(("full/", "eskd_stop/"))}}
    write_json(os.path.join(out, RESULTS_JSON), result)
    return result
