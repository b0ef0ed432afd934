"""The report: ``README.md``, ``results.json`` and the plots, from the runs' records alone.

* ``map_per_pair.png`` - per student size, the test mAP of scratch and of KD from each teacher, one
  point per seed (lines join a seed's runs), mean and 95% interval, the teachers' mAP as lines;
* ``ablation.png`` - the ablation pair: scratch, each part alone, all parts;
* ``samples.png`` - test canvases with the ground truth, the largest teacher's, the scratch
  student's and the distilled student's boxes (seed 0 of the ablation student).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from experiments import paired_stats
from experiments.detection_kd import stats
from experiments.detection_kd.grid import larger
from experiments.report import figure, markdown_grid

REPORT_FILE = "README.md"
RESULTS_FILE = "results.json"
PAIR_PLOT, ABLATION_PLOT, SAMPLES_PLOT = "map_per_pair.png", "ablation.png", "samples.png"

#: What the project's reference notes (shared/reference/papers.md, issue 18) give of Chen et al.'s
#: PASCAL VOC 2007 table (mAP, %): (student, teacher, scratch, distilled). The other cells of the
#: paper's table are not in the notes and are not quoted here.
PAPER_ROWS = (("Tucker", "VGG16", 54.7, 59.4), ("VGGM", "VGG16", 59.8, 63.7))
PAPER_RANGE = "+0.2 to +4.7 mAP over every student-teacher pair and dataset (PASCAL, KITTI, ILSVRC, COCO)"


def _mean_sd(values: Sequence[float]) -> str:
    a = np.asarray(values, float)
    sd = a.std(ddof=1) if a.size > 1 else float("nan")
    return f"{a.mean():.1f} ± {sd:.1f}"


def _arms(config, size: str) -> list[str]:
    """The arms of a student size in plot order: scratch, then KD from each larger teacher."""
    from kdjax.detection.model import SIZES

    ts = sorted((t for t in config.grid.teachers if larger(t, size)), key=list(SIZES).index)
    return ["scratch"] + [f"kd_{t}" for t in ts]


def _label(arm: str) -> str:
    if arm == "scratch":
        return "scratch"
    parts = arm.split("_")
    return f"KD <- {parts[1]}" + (f"\n{parts[2]} only" if len(parts) > 2 else "")


def _strip_panel(ax, columns: Sequence[tuple[str, dict[int, float]]], seeds: Sequence[int],
                 ylabel: str) -> None:
    """Per-seed points of each column, lines joining a seed, mean ± 1.96 SE."""
    for s in seeds:
        ax.plot(range(len(columns)), [col[s] for _, col in columns], color="0.8", lw=0.7, zorder=1)
    for i, (_, col) in enumerate(columns):
        v = np.array([col[s] for s in seeds])
        ax.scatter(np.full(len(v), i), v, s=12, zorder=2)
        half = 1.96 * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0
        ax.errorbar(i + 0.15, v.mean(), yerr=half, fmt="o", color="k", capsize=3, zorder=3)
    ax.set_xticks(range(len(columns)), [label for label, _ in columns], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def plot_pairs(config, table, seeds: Sequence[int], path: str, ylabel: str) -> None:
    students = list(config.grid.students)
    fig, axes = figure(len(students), width=4.2, height=3.6)
    for ax, s in zip(axes, students):
        _strip_panel(ax, [(_label(a), table[(s, a)]) for a in _arms(config, s)], seeds, ylabel)
        for i, t in enumerate(config.grid.teachers):
            (v,) = table[(t, "teacher")].values()
            ax.axhline(v, color=f"C{i + 3}", ls="--", lw=0.9, label=f"{t} teacher")
        ax.set_title(f"student {s}")
        ax.legend(fontsize=7, loc="best")
    fig.savefig(path, dpi=90)


def plot_ablation(config, table, seeds: Sequence[int], path: str, ylabel: str) -> None:
    s, t = config.grid.ablation_student, config.grid.ablation_teacher
    arms = ["scratch"] + [f"kd_{t}_{p}" for p in config.grid.ablation_parts] + [f"kd_{t}"]
    fig, axes = figure(1, width=5.0, height=3.6)
    _strip_panel(axes[0], [(_label(a) if a != f"kd_{t}" else f"KD <- {t}\nall", table[(s, a)])
                           for a in arms], seeds, ylabel)
    axes[0].set_title(f"ablation: student {s}, teacher {t}")
    fig.savefig(path, dpi=90)


def plot_samples(config, records: Sequence[Mapping], test: Mapping[str, np.ndarray], path: str) -> None:
    """Canvases x (ground truth, teacher, scratch student, KD student) with labelled boxes."""
    from kdjax.detection.model import SIZES

    s, seed = config.grid.ablation_student, min(int(r["seed"]) for r in records if r["role"] == "student")
    largest = max(config.grid.teachers, key=list(SIZES).index)
    find = {(r["size"], r["arm"], int(r["seed"])): r for r in records}
    columns = [("ground truth", None),
               (f"{largest} teacher", find[(largest, "teacher", int(config.grid.teacher_seed))]),
               (f"{s} scratch (seed {seed})", find[(s, "scratch", seed)]),
               (f"{s} <- {largest} KD (seed {seed})", find.get((s, f"kd_{largest}", seed)))]
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = min(int(config.run.sample_images), len(test["image"]))
    fig = Figure(figsize=(2.0 * len(columns), 2.1 * n), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(n, len(columns), squeeze=False)
    for j, (title, record) in enumerate(columns):
        for i in range(n):
            ax = grid[i, j]
            ax.imshow(test["image"][i], interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=8)
            if record is None and j == 0:
                valid = test["valid"][i]
                boxes, classes, scores = test["boxes"][i][valid], test["labels"][i][valid], None
            elif record is None:
                continue
            else:
                sample = record["samples"][i]
                boxes, classes, scores = (np.asarray(sample["boxes"]).reshape(-1, 4), sample["classes"],
                                          sample["scores"])
            for k, (box, cls) in enumerate(zip(boxes, classes)):
                x1, y1, x2, y2 = box
                color = "lime" if scores is None else "orange"
                ax.add_patch(_rectangle((x1, y1), x2 - x1, y2 - y1, color))
                text = str(int(cls)) if scores is None else f"{int(cls)} {scores[k]:.2f}"
                ax.text(x1, y1 - 1, text, color=color, fontsize=6, va="bottom")
    fig.savefig(path, dpi=80)


def _rectangle(xy, w, h, color):
    from matplotlib.patches import Rectangle

    return Rectangle(xy, w, h, fill=False, edgecolor=color, linewidth=1.0)


def _claims_table(comps: Mapping[str, list[dict]]) -> str:
    rows = []
    for fam, title in stats.FAMILIES.items():
        answers = [c["answer"] for c in comps[fam]]
        counts = ", ".join(f"{answers.count(a)} {a}" for a in dict.fromkeys(answers))
        rows.append([title, len(answers), counts or "-", f"**{stats.overall(answers)}**"])
    return markdown_grid(["claim (Chen et al. 2017)", "comparisons", "answers", "overall"], rows)


def _family_section(fam: str, comps: list[dict]) -> list[str]:
    if not comps:
        return []
    table = paired_stats.markdown_table([paired_stats.Comparison.from_dict(c) for c in comps])
    answers = "; ".join(f"{c['name']}: **{c['answer']}**" for c in comps)
    return [f"### {stats.FAMILIES[fam]}", "", table, "", f"Against the claim: {answers}.", ""]


def _measured_table(config, table, seeds) -> str:
    """Students x (scratch, KD from each teacher) mean ± sd and the mean paired gain."""
    header = ["student", "scratch"] + [f"KD <- {t}" for t in config.grid.teachers]
    rows = []
    for s in config.grid.students:
        scratch = np.array([table[(s, "scratch")][k] for k in seeds])
        row = [s, _mean_sd(scratch)]
        for t in config.grid.teachers:
            if not larger(t, s):
                row.append("-")
                continue
            kd = np.array([table[(s, f"kd_{t}")][k] for k in seeds])
            row.append(f"{_mean_sd(kd)} ({(kd - scratch).mean():+.1f})")
        rows.append(row)
    teacher_row = ["teacher itself", "-"] + [f"{next(iter(table[(t, 'teacher')].values())):.1f}"
                                              for t in config.grid.teachers]
    return markdown_grid(header, rows + [teacher_row])


def _paper_table(config, table, seeds, largest: str) -> str:
    from kdjax.detection.model import SIZES

    smallest = min(config.grid.students, key=list(SIZES).index)
    biggest = max(config.grid.students, key=list(SIZES).index)
    rows = []
    for (ps, pt, p0, p1), s in zip(PAPER_ROWS, (smallest, biggest)):
        m0 = np.mean([table[(s, "scratch")][k] for k in seeds])
        m1 = np.mean([table[(s, f"kd_{largest}")][k] for k in seeds])
        rows.append([f"{ps} <- {pt}", f"{p0:.1f}", f"{p1:.1f}", f"{p1 - p0:+.1f}",
                     f"{s} <- {largest}", f"{m0:.1f}", f"{m1:.1f}", f"{m1 - m0:+.1f}"])
    return markdown_grid(["paper pair (PASCAL VOC 07)", "scratch", "KD", "gain",
                          "kdjax pair (digits)", "scratch", "KD", "gain"], rows)


def write(out: str, *, config, records: Sequence[Mapping], seeds: Sequence[int],
          comps: Mapping[str, list[dict]], test: Mapping[str, np.ndarray], timing: Mapping[str, Any],
          command: str, environment: Mapping[str, Any], report_command: str | None = None) -> str:
    """Writes the plots and ``README.md`` into ``out``; returns the README's path.
    ``report_command``: the ``--report_only`` command that rewrote the report, if one did."""
    from kdjax.atomic import write_text_atomic
    from kdjax.detection.model import SIZES

    os.makedirs(out, exist_ok=True)
    metric, c = config.stats.metric, config
    name = {"map50": "mAP@0.5", "map": "mAP@[.5:.95]", "map75": "mAP@0.75"}
    table = stats.by_arm(records, metric)
    ylabel = f"test {name[metric]} (points)"
    plot_pairs(config, table, seeds, os.path.join(out, PAIR_PLOT), ylabel)
    plot_ablation(config, table, seeds, os.path.join(out, ABLATION_PLOT), ylabel)
    plot_samples(config, records, test, os.path.join(out, SAMPLES_PLOT))
    largest = max(c.grid.teachers, key=list(SIZES).index)
    coco_table = stats.by_arm(records, "map")
    abl = [["scratch", _mean_sd([table[(c.grid.ablation_student, 'scratch')][k] for k in seeds])]]
    abl += [[f"{p} only", _mean_sd([table[(c.grid.ablation_student, f'kd_{c.grid.ablation_teacher}_{p}')][k]
                                    for k in seeds])] for p in c.grid.ablation_parts]
    abl += [["all", _mean_sd([table[(c.grid.ablation_student, f'kd_{c.grid.ablation_teacher}')][k]
                              for k in seeds])]]
    students = [r for r in records if r["role"] == "student"]
    invocations = timing["invocations"]
    smoke = " (quick smoke grid)" if c.name.endswith("quick") else ""
    lines = [
        f"# Detection distillation (Chen et al., NeurIPS 2017) at CPU scale{smoke}",
        "",
        "Faster R-CNN-shaped detectors (`kdjax.detection`) on the digits detection set "
        "(`kdjax.data.detection_digits`), students trained from scratch and distilled with Chen et "
        "al.'s recipe (RPN + RoI class-weighted soft targets, teacher-bounded regression, adapted "
        f"hint) from a live teacher scoring the student's RoIs. Metric: test {name[metric]} (COCO "
        "evaluation through pycocotools), in points. Every number below comes from the command:",
        "",
        "```",
        command,
        "```",
        "",
        *([f"This report was rewritten from the runs' records (no training) by `{report_command}`.", ""]
          if report_command else []),
        f"Measured wall time: **{sum(i['wall_s'] for i in invocations) / 60:.1f} min** for the whole "
        f"grid, the sum of the invocations of this workdir ("
        + "; ".join(f"{i['started']}: {i['wall_s'] / 60:.1f} min, {i['ran']} runs trained, {i['reused']} "
                    f"reused, {i['jobs']} worker process(es){', preempted' if i.get('preempted') else ''}"
                    for i in invocations)
        + f"), on {environment['cpu_count']} CPU cores, jax {environment['jax']}; report written "
        f"{environment['date']}.",
        "",
        "## Claims",
        "",
        _claims_table(comps),
        "",
        _teacher_note(c, table, name[metric]),
        "",
        "## The paper's table beside the measured one",
        "",
        f"The paper (PASCAL VOC 2007 mAP, %; the pairs in the project's reference notes; overall "
        f"{PAPER_RANGE}) beside the kdjax pair of the same role (its smallest / largest student "
        f"distilled from its largest teacher; mean over {len(seeds)} seeds):",
        "",
        _paper_table(c, table, seeds, largest),
        "",
        f"Measured, {name[metric]} mean ± sd over seeds {list(seeds)} (mean paired gain over "
        "scratch); the teachers are one run each:",
        "",
        _measured_table(c, table, seeds),
        "",
        f"The same runs' mAP@[.5:.95] (COCO's metric):",
        "",
        _measured_table(c, coco_table, seeds),
        "",
        f"Ablation on {c.grid.ablation_student} <- {c.grid.ablation_teacher} ({name[metric]}):",
        "",
        markdown_grid(["parts on", name[metric]], abl),
        "",
        "![mAP per pair](map_per_pair.png)",
        "",
        "![ablation](ablation.png)",
        "",
        "Test canvases: ground truth (green, class), detections with score >= 0.5 (orange, class "
        "and score):",
        "",
        "![samples](samples.png)",
        "",
        "## Statistics",
        "",
        paired_stats.METHOD_NOTE.format(margin=c.stats.margin)
        + f" Units: {name[metric]} points; the margin ±{c.stats.margin:g} is kdjax's choice. "
        "Holm is applied within each claim's family. The `largest` family compares the students' "
        "seeds with the one teacher run (a one-sample test against its fixed mAP).",
        "",
        _wilcoxon_floor(len(seeds), comps),
        "",
    ]
    for fam in stats.FAMILIES:
        lines += _family_section(fam, comps[fam])
    lines += _design(c, seeds) + _timing(c, students, records, timing)
    path = os.path.join(out, REPORT_FILE)
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def _teacher_note(c, table, metric_name: str) -> str:
    """The teachers' mAPs in size order, and whether the largest is the most accurate of them."""
    from kdjax.detection.model import SIZES

    order = sorted(c.grid.teachers, key=list(SIZES).index)
    values = {t: next(iter(table[(t, "teacher")].values())) for t in order}
    best = max(values, key=values.get)
    listing = ", ".join(f"{t} {v:.1f}" for t, v in values.items())
    verdict = ("the largest is also the most accurate teacher" if best == order[-1] else
               f"the largest is not the most accurate teacher ({best} is), so the teacher-size claims "
               "compare teachers whose accuracy does not grow with their size")
    return (f"Teachers' test {metric_name} (one run each, {c.train.teacher_steps} steps): {listing}; "
            f"{verdict}.")


def _wilcoxon_floor(n: int, comps: Mapping[str, list[dict]]) -> str:
    """What ``n`` seeds can show: the exact Wilcoxon test's smallest two-sided p-value, times a
    family's size after Holm, against alpha."""
    floor = 2.0 / 2 ** n
    largest = int(0.05 // floor)  # the largest family whose smallest Holm p can be < 0.05
    sizes = sorted({len(v) for v in comps.values() if v})
    reach = f"families of at most {largest} comparison(s)" if largest else "no family"
    return (f"With n = {n} seeds the exact two-sided Wilcoxon signed-rank test cannot give a p-value "
            f"below 2/2^{n} = {floor:.4f}, and Holm multiplies the smallest p of a family of m "
            f"comparisons by m: a better / worse verdict (both tests reject at 0.05) is possible only in "
            f"{reach} (the families here have {sizes} comparisons). Where it is not, the paired "
            "t-test's p-value, the bootstrap CI, the TOST and the MDE are the evidence to read.")


def _design(c, seeds) -> list[str]:
    from kdjax.detection.model import SIZES

    sizes = markdown_grid(["size", "width", "depth", "RoI head width"],
                          [[s, v["width"], v["depth"], v["head_width"]] for s, v in SIZES.items()
                           if s in set(c.grid.teachers) | set(c.grid.students)])
    ch = c.chen
    return [
        "## Grid design", "",
        f"- Data: `digits_detection_arrays` {c.data.num_train} train / {c.data.num_test} test canvases of "
        f"{c.data.canvas_size} px, up to {c.data.max_objects} digits at scales {tuple(c.data.scales)}, "
        f"{c.data.clutter} clutter fragments, noise {c.data.noise}, data seed {c.data.seed}.",
        f"- Detectors (one definition, `kdjax.detection.model.SIZES`; stride 8, anchors 16/32/64 x "
        f"3 ratios, {c.model.pre_nms_topk} proposals before NMS, {c.model.num_proposals} after):",
        "", sizes, "",
        f"- Teachers {list(c.grid.teachers)}: {c.train.teacher_steps} steps, one run each (seed "
        f"{c.grid.teacher_seed}), shared by every student seed (the paper distils from one trained "
        "teacher).",
        f"- Students {list(c.grid.students)}: {c.train.steps} steps, scratch and KD from every larger "
        f"teacher; ablation on {c.grid.ablation_student} <- {c.grid.ablation_teacher} with "
        f"{', '.join(c.grid.ablation_parts)} alone. Seeds {list(seeds)} (a seed fixes the student's "
        "initialisation, data order and sampling; arms paired by seed).",
        f"- Optimiser (kdjax's choice): Adam, lr {c.train.lr} with {c.train.warmup_steps} warmup steps "
        f"and cosine decay, global-norm clip {c.train.clip_norm}; batch {c.train.batch_size}; "
        f"{c.train.rpn_batch_size} anchors and {c.train.roi_batch_size} RoIs sampled per image.",
        f"- Loss weights (`kdjax.detection.distill.ChenConfig`): mu = {ch.mu} (kdjax's choice; the paper "
        f"defines mu without a value in the text), w0 = {ch.background_weight} (paper), T = "
        f"{ch.temperature} (paper), nu = {ch.nu} (kdjax's choice: the paper's value is not confirmed "
        f"from its text), margin m = {ch.margin} (kdjax's choice), hint = {ch.hint_weight} x "
        f"fitnet_hint with reduction '{ch.hint_reduction}' (kdjax's choice: the paper's summed hint with "
        "gamma = 0.5 starts about 100x the detection loss on these feature maps; the mean over the "
        "map's elements weighted 100 starts near the Faster R-CNN loss for every teacher width), "
        f"RPN distilled: {ch.distill_rpn} (paper). Adaptation layer: 1x1 conv (kdjax's choice).",
        "",
    ]


def _timing(c, students, records, timing) -> list[str]:
    cells: dict[str, list[float]] = {}
    for r in records:
        cells.setdefault(r["key"], []).append(float(r["wall_s"]))
    rows = [[k, len(v), f"{np.mean(v):.0f}"] for k, v in cells.items()]
    return ["## Timings", "",
            f"Sum of the runs' own wall times: {timing['runs_s'] / 60:.1f} min over {len(records)} runs "
            f"({len(students)} student runs). A reused run reports the time it took when it was "
            "trained.", "", markdown_grid(["run", "runs", "mean wall s"], rows), ""]
