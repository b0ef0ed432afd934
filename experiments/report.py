"""The markdown report and plots of a run, from its stages' summaries and ``metrics.jsonl`` files.

:func:`write_report` writes ``<workdir>/report.md`` and three PNG figures (matplotlib, Agg canvas;
no pyplot state is touched):

* ``train_losses.png`` - train cross-entropy (every stage: teacher, assistants, student) and KD
  loss ``T^2 KL(p_t^T || p_s^T)`` (stages with a teacher) over steps;
* ``eval_accuracy.png`` - eval top-1 over steps, per stage;
* ``mimic.png`` - the ESKD paper's "the student fails to mimic the teacher" view: the train KD loss,
  the eval ``KL(p_t || p_s)`` at T = 1 and the eval top-1 agreement with the teacher over steps,
  one curve per (student, teacher) pair.

A dashed vertical line, with its legend entry, marks the step where ESKD (``stop_kd`` reading)
switched the KD term off.

The pieces are public so that a driver comparing several runs (e.g. one per teacher) can reuse
them: :func:`load_results`, :func:`read_stage_metrics`, :func:`result_row`,
:func:`markdown_table` (:func:`markdown_grid` for a table of plain rows), :func:`figure`,
:func:`plot_losses`, :func:`plot_eval_accuracy`, :func:`plot_mimic`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

from kdjax import metrics as metrics_lib
from kdjax.atomic import write_text_atomic

REPORT_FILE = "report.md"
LOSS_PLOT = "train_losses.png"
ACCURACY_PLOT = "eval_accuracy.png"
MIMIC_PLOT = "mimic.png"

#: (key of :func:`result_row`, column title) of the results table.
COLUMNS = (
    ("stage", "stage"), ("model", "model"), ("teacher", "teacher"), ("kd_mode", "KD"),
    ("reading", "early stopping"), ("top1", "top-1 (%)"), ("error", "error (%)"),
    ("paper_error", "paper error (%)"), ("delta", "error - paper"),
    ("teacher_top1", "teacher top-1 (%)"), ("paper_teacher_error", "paper teacher error (%)"),
    ("agreement", "agreement (%)"), ("kl", "KL(p_t||p_s)"), ("steps", "steps"),
)

READINGS_NOTE = (
    "Early stopping (ESKD) has two readings and every row says which it used: `stop_kd` - the KD "
    "term is switched off after a stop epoch and the student finishes on cross-entropy alone "
    "(how the paper's ImageNet ESKD column and later codebases describe it); `early_teacher` - "
    "the teacher is taken from an early epoch of its own training (the paper's abstract: "
    "\"stopping the teacher's training early\"). `none`: full KD or no KD.")


def load_results(workdir: str) -> list[dict]:
    """The stage summaries of a finished run (``<workdir>/results.json``)."""
    with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
        return json.load(f)["stages"]


def read_stage_metrics(stage_dir: str) -> tuple[list[dict], list[dict]]:
    """``(train records, eval records)`` of one stage's ``metrics.jsonl``, in step order."""
    records = metrics_lib.read_jsonl(os.path.join(stage_dir, metrics_lib.JSONL_NAME))
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    return train, evals


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100.0 * value:.2f}"


def _num(value: Any, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def result_row(summary: Mapping[str, Any]) -> dict[str, str]:
    """Display strings for one stage summary (keys of :data:`COLUMNS`)."""
    final = summary.get("final") or {}
    accuracy = final.get("accuracy")
    error = None if accuracy is None else 100.0 * (1.0 - accuracy)
    paper = summary.get("paper_error")
    teacher = summary.get("teacher") or "-"
    if summary.get("precomputed"):
        teacher += " [precomputed]"
    return {
        "stage": summary.get("stage", "-"),
        "model": f"`{summary.get('model', '-')}`",
        "teacher": teacher,
        "kd_mode": summary.get("kd_mode", "-"),
        "reading": summary.get("reading", "-"),
        "top1": _pct(accuracy),
        "error": _num(error),
        "paper_error": _num(paper),
        "delta": "-" if error is None or paper is None else f"{error - paper:+.2f}",
        "teacher_top1": _pct(final.get("teacher_accuracy")),
        "paper_teacher_error": _num(summary.get("paper_teacher_error")),
        "agreement": _pct(final.get("agreement")),
        "kl": _num(final.get("kl"), ".4f"),
        "steps": str(summary.get("steps", "-")),
    }


def markdown_grid(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table: ``header`` titles, then ``rows`` of cells written as they are."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_table(rows: Sequence[Mapping[str, str]],
                   columns: Sequence[tuple[str, str]] = COLUMNS) -> str:
    """A GitHub markdown table of ``rows`` (dicts keyed by the first element of each column; a
    missing key shows ``-``, a ``|`` inside a cell becomes ``/``)."""
    return markdown_grid([title for _, title in columns],
                         [[str(row.get(key, "-")).replace("|", "/") for key, _ in columns]
                          for row in rows])


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [float(p[1]) for p in points]


def figure(num_panels: int, *, width: float = 5.0, height: float = 4.6):
    """``(fig, axes)``: a matplotlib figure of ``num_panels`` side by side, each ``width`` x
    ``height`` inches, on its own Agg canvas (pyplot's global state is never touched)."""
    # matplotlib is imported here, not at the top: only the report needs it, and importing it
    # costs a second in every process of a run that only trains.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * num_panels, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, num_panels, squeeze=False)[0]
    return fig, axes


def _colors(*curve_sets: Mapping[str, Any]) -> dict[str, str]:
    """One matplotlib colour per label, the same in every panel of a figure."""
    labels = list(dict.fromkeys(label for curves in curve_sets for label in curves))
    return {label: f"C{i % 10}" for i, label in enumerate(labels)}


def _panel(ax, curves: Mapping[str, Sequence[Mapping[str, Any]]], key: str, title: str,
           ylabel: str, colors: Mapping[str, str], scale: float = 1.0,
           stops: Mapping[str, int] | None = None) -> bool:
    """Draws ``key`` of each label's records; a dashed line at each label's ESKD stop step."""
    drawn = False
    for label, records in curves.items():
        steps, values = _series(records, key)
        if steps:
            ax.plot(steps, [scale * v for v in values], label=label, color=colors[label],
                    marker="o" if len(steps) < 30 else None, markersize=3)
            drawn = True
            if stops and stops.get(label) is not None:
                ax.axvline(stops[label], color=colors[label], linestyle="--", linewidth=0.8,
                           label=f"{label}: ESKD stop (KD term off)")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if not drawn:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    return drawn


def _save(fig, axes, path: str) -> str:
    """One legend for all panels, below them (labels are long), then the PNG."""
    entries = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(list(entries.values()), list(entries), loc="outside lower center",
                   fontsize="small", ncols=1)
    fig.savefig(path, dpi=100)
    return path


def plot_losses(train_curves: Mapping[str, Sequence[Mapping[str, Any]]], path: str,
                stops: Mapping[str, int] | None = None) -> str:
    """Train CE (``loss/ce``) and KD loss (``loss/kd``) over steps, one curve per label.

    ``stops``: label -> step where ESKD switched the KD term off (drawn as a dashed line).
    """
    fig, axes = figure(2)
    colors = _colors(train_curves)
    _panel(axes[0], train_curves, "loss/ce", "train cross-entropy", "CE", colors, stops=stops)
    _panel(axes[1], train_curves, "loss/kd", "train KD loss", "T^2 KL(p_t^T || p_s^T)", colors,
           stops=stops)
    return _save(fig, axes, path)


def plot_eval_accuracy(eval_curves: Mapping[str, Sequence[Mapping[str, Any]]], path: str,
                       stops: Mapping[str, int] | None = None) -> str:
    """Eval top-1 (%) over steps, one curve per label (``stops`` as in :func:`plot_losses`)."""
    fig, axes = figure(1)
    _panel(axes[0], eval_curves, "accuracy", "eval top-1", "top-1 (%)", _colors(eval_curves),
           scale=100.0, stops=stops)
    return _save(fig, axes, path)


def plot_mimic(train_curves: Mapping[str, Sequence[Mapping[str, Any]]],
               eval_curves: Mapping[str, Sequence[Mapping[str, Any]]], path: str,
               stops: Mapping[str, int] | None = None) -> str:
    """How well each student mimics its teacher: train KD loss, eval KL at T = 1, eval agreement.

    The train KD loss is logged after the ESKD stop too (with weight 0), so the curves show how
    the student drifts from the teacher once it trains on labels alone.
    """
    fig, axes = figure(3)
    colors = _colors(train_curves, eval_curves)
    _panel(axes[0], train_curves, "loss/kd", "train: KD loss", "T^2 KL(p_t^T || p_s^T)", colors,
           stops=stops)
    _panel(axes[1], eval_curves, "kl", "eval: KL(p_t || p_s), T = 1", "KL", colors, stops=stops)
    _panel(axes[2], eval_curves, "agreement", "eval: top-1 agreement with teacher", "agreement (%)",
           colors, scale=100.0, stops=stops)
    return _save(fig, axes, path)


def _label(summary: Mapping[str, Any]) -> str:
    label = f"{summary['stage']}: {summary.get('model')}"
    if summary.get("teacher"):
        label += f" <- {summary['teacher']}"
    return label


def write_report(workdir: str, *, title: str, summaries: Sequence[Mapping[str, Any]],
                 paper_source: str = "") -> str:
    """Writes ``report.md`` and the three plots into ``workdir``; returns the report's path.

    The note on ESKD's two readings is added when a stage distilled with full KD or ESKD.

    ``summaries``: stage summaries (``results.json``'s ``stages``), each with ``dir`` (the stage
    directory, relative to ``workdir``) holding its ``metrics.jsonl``.
    """
    train_curves, eval_curves, mimic_train, mimic_eval, stops = {}, {}, {}, {}, {}
    for s in summaries:
        train, evals = read_stage_metrics(os.path.join(workdir, s["dir"]))
        label = _label(s)
        stops[label] = s.get("kd_stop_step")
        train_curves[label] = train
        if evals:
            eval_curves[label] = evals
        if s.get("teacher"):
            mimic_train[label] = train
            mimic_eval[label] = evals
    plot_losses(train_curves, os.path.join(workdir, LOSS_PLOT), stops)
    plot_eval_accuracy(eval_curves, os.path.join(workdir, ACCURACY_PLOT), stops)
    plot_mimic(mimic_train, mimic_eval, os.path.join(workdir, MIMIC_PLOT), stops)

    rows = [result_row(s) for s in summaries if s.get("final")]
    notes = sorted({s["paper_note"] for s in summaries if s.get("paper_note")})
    hint_stages = [s for s in summaries if not s.get("final")]
    lines = [f"# {title}", ""]
    if paper_source:
        lines += [f"Paper numbers: {paper_source}.", ""]
    lines += ["## Results (final eval)", "", markdown_table(rows), ""]
    if any(s.get("kd_mode") in ("full", "eskd") for s in summaries):  # not FitNet's: no reading
        lines += [READINGS_NOTE, ""]
    lines += [f"Paper: {n}." for n in notes] + ([""] if notes else [])
    for s in hint_stages:
        train = s.get("final_train") or {}
        loss = train.get("loss/total")
        lines += [f"Stage `{s['stage']}` ({s.get('kd_mode')}, teacher {s.get('teacher')}): final "
                  f"train loss {_num(loss, '.4f')} after {s.get('steps')} steps; trained modules "
                  f"{', '.join(s.get('trained_modules', [])) or '-'}.", ""]
    lines += ["## Plots", "",
              f"Train cross-entropy and KD loss: ![train losses]({LOSS_PLOT})", "",
              f"Eval accuracy over time: ![eval accuracy]({ACCURACY_PLOT})", "",
              "Does the student mimic its teacher? Train KD loss, eval KL(p_t || p_s) at T = 1 and "
              f"eval top-1 agreement: ![student fails to mimic]({MIMIC_PLOT})", ""]
    path = os.path.join(workdir, REPORT_FILE)
    write_text_atomic(path, "\n".join(lines))
    return path
