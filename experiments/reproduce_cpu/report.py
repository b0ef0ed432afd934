"""The reproduction's report: ``README.md`` (setup, verdicts, tables), three PNG plots and
``results.json`` (every per-seed number), written into ``--out``.

Tables are :func:`experiments.report.markdown_grid` tables and the figures
:func:`experiments.report.figure` ones (matplotlib, Agg canvas), the pieces of a run's own report;
the plots here average over seeds (mean ± std), where a run's report draws one run.
"""

from __future__ import annotations

import math
import os
import platform
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from experiments import report as run_report
from experiments.configs import small
from experiments.datasets import build_data
from experiments.reproduce_cpu.grid import SIZES, Cell, build_config
from experiments.reproduce_cpu.runner import write_json
from experiments.reproduce_cpu.statistics import (ALPHA, by_cell, collapsed_runs, direction,
                                                   evaluate_claims, stats_of)
from experiments.rundir import abstract_variables
from experiments.specs import build_model
from kdjax.atomic import write_text_atomic

RESULTS_JSON = "results.json"
REPORT_FILE = "README.md"
ACCURACY_PLOT = "accuracy_vs_teacher.png"
MIMIC_PLOT = "mimic.png"
FITNET_TA_PLOT = "fitnet_ta.png"

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
    """A difference of means: points of top-1 for ``accuracy``, the raw value otherwise."""
    return f"{100 * diff:+.2f} points" if metric == "accuracy" else f"{diff:+.4f}"


def comparison_text(result: Mapping[str, Any]) -> str:
    """One comparison in words: the difference of means and both p-values."""
    sig = "significant at 0.05 (both tests)" if direction(result) != "n.s." else (
        "not significant at 0.05")
    return (f"{result['name']}: {fmt_diff(result['diff'], result['metric'])} (Welch p = "
            f"{fmt_p(result['welch_p'])}, paired p = {fmt_p(result['paired_p'])}; {sig})")


def eskd_table(acc: Mapping, teacher_acc: Mapping, settings: Mapping,
               sizes: Sequence[str] = SIZES, early_acc: Mapping | None = None) -> str:
    """Table 1: eval top-1 (%) of the student per teacher (rows) and KD mode (columns).

    ``early_acc``: ``{cell: {seed: top-1}}`` of the early-epoch teachers (the ``teacher_accuracy``
    that the ``eskd_early`` runs measured)."""
    early_acc = early_acc or {}
    rows = [["none (scratch)", f"`{settings['student']}`", "-", "-",
             fmt_pct(stats_of(acc.get("scratch"))), "-", "-"]]
    for size in sizes:
        rows.append([size, f"`{settings['teachers'][size]}`",
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


def fitnet_ta_table(acc: Mapping, teacher_acc: Mapping, settings: Mapping,
                    assistant_acc: Mapping[int, float] | None = None) -> str:
    """Table 3: the FitNet comparison and the teacher-assistant chain (``assistant_acc``: seed ->
    top-1 of the chain's assistant stage)."""
    rows = [
        ["FitNet teacher", f"`{settings['fitnet_teacher']}`",
         fmt_pct(stats_of(teacher_acc.get("teacher/fitnet")))],
        ["thin-deep student from scratch", f"`{settings['fitnet_student']}`",
         fmt_pct(stats_of(acc.get("fitnet/scratch")))],
        ["thin-deep student, KD only (FitNet stage 2 alone)", f"`{settings['fitnet_student']}`",
         fmt_pct(stats_of(acc.get("fitnet/kd_only")))],
        ["thin-deep student, FitNet (hints, then KD)", f"`{settings['fitnet_student']}`",
         fmt_pct(stats_of(acc.get("fitnet/hint_kd")))],
        ["direct large -> student (full KD)", f"`{settings['student']}`",
         fmt_pct(stats_of(acc.get("full/large")))],
        ["TA chain: the assistant (medium size, distilled from large)",
         f"`{settings['teachers']['medium']}`", fmt_pct(stats_of(assistant_acc))],
        ["TA chain large -> medium -> student (full KD)", f"`{settings['student']}`",
         fmt_pct(stats_of(acc.get("ta/large-medium")))],
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


def plot_accuracy_vs_teacher(acc: Mapping, teacher_acc: Mapping, params: Mapping[str, int],
                             path: str, sizes: Sequence[str] = SIZES) -> str:
    """Student eval top-1 (mean ± std over seeds) against teacher size: full KD, ESKD (both
    readings), the teachers themselves, and the scratch student as a band."""
    fig, (ax,) = run_report.figure(1, width=PANEL_WIDTH, height=4.6)
    x = np.arange(len(sizes))
    for i, (prefix, label) in enumerate((("full", "full KD"), ("eskd_stop", "ESKD stop_kd"),
                                         ("eskd_early", "ESKD early_teacher"))):
        stats = [stats_of(acc.get(f"{prefix}/{s}")) for s in sizes]
        keep = [j for j, st in enumerate(stats) if st]
        if keep:
            ax.errorbar(x[keep] + (i - 1) * 0.06, [100 * stats[j]["mean"] for j in keep],
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
    """Bars (mean ± std, seeds as dots): thin-deep scratch / KD only / FitNet; the small student
    from scratch, by full KD from each teacher, and through the TA chain."""
    fig, axes = run_report.figure(2, width=PANEL_WIDTH, height=PANEL_HEIGHT)
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


def count_params(spec: str, sample_input: np.ndarray, num_classes: int) -> int:
    """Parameters of a model spec (shapes only, nothing computed)."""
    variables = abstract_variables(build_model(spec, num_classes), sample_input)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(variables["params"])))


def setup_info(dataset: str, smoke: bool) -> dict:
    """Dataset sizes, model parameter counts and the training settings of the grid's configs."""
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


def write_report(out: str, *, setup: Mapping, machine: Mapping, records: Sequence[Mapping],
                 seeds: Sequence[int], timing: Mapping, command: str,
                 sizes: Sequence[str] = SIZES) -> dict:
    """Writes ``README.md``, the plots and ``results.json`` into ``out``; returns the JSON object."""
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
    write_text_atomic(os.path.join(out, REPORT_FILE), "\n".join(lines))

    cells = {}
    for r in sorted(records, key=lambda r: (r["cell"], r["seed"])):
        entry = cells.setdefault(r["cell"], {"seeds": {}})
        entry["seeds"][str(r["seed"])] = {k: v for k, v in r.items()
                                          if k not in ("cell", "seed", "curves")}
    for key, entry in cells.items():
        entry["accuracy"] = stats_of(acc.get(key))
    result = {"setup": dict(setup), "machine": dict(machine), "seeds": list(seeds),
              "timing": dict(timing), "command": command, "cells": cells, "claims": claim_results,
              "collapsed": collapsed,
              "curves": {f"{r['cell']}/seed{r['seed']}": r["curves"] for r in records
                         if r["cell"].startswith(("full/", "eskd_stop/"))}}
    write_json(os.path.join(out, RESULTS_JSON), result)
    return result
