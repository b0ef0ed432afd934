"""The statistics of the reproduction: per-cell mean and std over seeds, collapsed runs, and the
verdict of each paper claim from paired comparisons (:mod:`experiments.paired_stats`).

Design: every student cell of seed ``s`` is trained from the same data order and initialisation
seed and distils from the teachers of the same teacher seed, so the unit of analysis is the
per-seed difference of two cells. Each claim's comparisons are one family: paired t-test and
Wilcoxon signed-rank test, each Holm-adjusted over the family, a bootstrap 95% CI of the mean
difference, a TOST equivalence test with the metric's margin (:data:`MARGINS`) and the minimal
detectable effect; :func:`answer` turns a comparison's verdict into agree / disagree /
inconclusive for what the claim predicts. Collapsed runs (:func:`collapse_thresholds`) are
counted and analysed apart: a comparison uses the seeds at which neither run collapsed.
docs/experiments.md gives the rules.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats  # scipy comes with scikit-learn, of the `experiments` extra

from experiments import paired_stats
from experiments.reproduce_cpu.grid import SIZES

ALPHA = 0.05
#: TOST equivalence margins per metric, in the units the comparisons use (:data:`SCALE`): half a
#: point of top-1 (a smaller difference is below what the papers report: their effects are
#: 0.2-1.9 points on ImageNet, and half a point is about two binomial standard errors of one
#: run on a 10,000-example test split) and 0.01 nats of KL.
MARGINS = {"accuracy": 0.5, "kl": 0.01}
#: Records hold top-1 as a fraction; comparisons use points.
SCALE = {"accuracy": 100.0, "kl": 1.0}
#: A run is collapsed below this top-1 whatever its family's spread (:func:`collapse_thresholds`).
COLLAPSE_CAP = 0.5
#: ... or below its family's scratch mean minus this many scratch standard deviations.
COLLAPSE_SDS = 4.0


def summarize(values: Sequence[float]) -> dict:
    """``{'n', 'mean', 'std'}`` of ``values``; ``std`` is the sample standard deviation (ddof 1;
    NaN for one value)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"summarize: values must be a non-empty 1-D sequence; got shape {x.shape}.")
    return {"n": int(x.size), "mean": float(x.mean()),
            "std": float(x.std(ddof=1)) if x.size > 1 else math.nan}


def stats_of(values: Mapping[int, float] | None) -> dict | None:
    """:func:`summarize` of a cell's ``{seed: value}`` (None when it has none)."""
    return summarize(list(values.values())) if values else None


def compare(a: Mapping[int, float], b: Mapping[int, float], *, metric: str = "accuracy",
            name: str = "a - b") -> paired_stats.Comparison:
    """Cell ``a`` against cell ``b`` (``seed -> value``) over their common seeds, a family of one:
    :func:`experiments.paired_stats.compare` of ``a - b`` in :data:`SCALE` units with the metric's
    margin. Raises ValueError with fewer than two common seeds."""
    return _family({name: (a, b)}, metric)[0]


def _family(pairs: Mapping[str, tuple], metric: str) -> list[paired_stats.Comparison]:
    """``name -> (a, b)`` (seed -> value dicts) as one Holm family of paired comparisons."""
    arrays = {}
    for name, (a, b) in pairs.items():
        seeds = sorted(set(a) & set(b))
        if len(seeds) < 2:
            raise ValueError(f"{name}: needs at least two seeds that both cells have (paired); "
                             f"got {len(seeds)}.")
        scale = SCALE[metric]
        arrays[name] = ([scale * b[s] for s in seeds], [scale * a[s] for s in seeds])
    return paired_stats.compare_family(arrays, margin=MARGINS[metric], alpha=ALPHA)


CLAIM_KINDS = ("higher", "lower", "not_higher")
#: What a claim's prediction makes of each paired verdict of ``a - b``.
ANSWERS = {
    "higher": {"better": "agree", "worse": "disagree", "equivalent": "disagree",
               "inconclusive": "inconclusive"},
    "lower": {"worse": "agree", "better": "disagree", "equivalent": "disagree",
              "inconclusive": "inconclusive"},
    "not_higher": {"better": "disagree", "worse": "agree", "equivalent": "agree",
                   "inconclusive": "inconclusive"},
}


def answer(verdict: str, claim: str) -> str:
    """What a comparison's verdict (``better`` / ``worse`` / ``equivalent`` / ``inconclusive``,
    :func:`experiments.paired_stats.verdict`) says about a claim predicting ``a - b``:
    ``'higher'`` (a gain; equivalence within the margin disagrees), ``'lower'``, or
    ``'not_higher'`` (no gain; equivalence or a loss agrees)."""
    if claim not in CLAIM_KINDS:
        raise ValueError(f"answer: claim={claim!r} is not valid; valid: {', '.join(CLAIM_KINDS)}.")
    return ANSWERS[claim][verdict]


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


def by_cell(records: Sequence[Mapping[str, Any]], metric: str = "accuracy") -> dict[str, dict]:
    """``{cell: {seed: value}}`` of ``metric`` over the records (records without it are left out)."""
    out: dict[str, dict] = {}
    for r in records:
        if r.get(metric) is not None:
            out.setdefault(r["cell"], {})[r["seed"]] = float(r[metric])
    return out


def _family_of(record: Mapping) -> str | None:
    """A student run's family (its model spec); None for a teacher run."""
    return None if record["cell"].startswith("teacher/") else record.get("model")


def collapse_thresholds(records: Sequence[Mapping]) -> dict[str, dict]:
    """Per student model (family): the top-1 below which a run counts as collapsed.

    ``min(COLLAPSE_CAP, mean - COLLAPSE_SDS * std)`` of the family's runs from scratch (the cell
    with ``kd_mode == 'scratch'``): far below what the architecture reaches on labels alone,
    and never above 50% (five times chance on ten classes). Without two scratch runs the cap
    alone. Returns ``{model: {'threshold', 'scratch_mean', 'scratch_std', 'scratch_n'}}``."""
    out: dict[str, dict] = {}
    for model in sorted({m for m in map(_family_of, records) if m}):
        scratch = [r["accuracy"] for r in records if _family_of(r) == model
                   and r.get("kd_mode") == "scratch" and r.get("accuracy") is not None]
        entry = {"threshold": COLLAPSE_CAP, "scratch_mean": math.nan, "scratch_std": math.nan,
                 "scratch_n": len(scratch)}
        if len(scratch) >= 2:
            mean, std = float(np.mean(scratch)), float(np.std(scratch, ddof=1))
            entry.update(threshold=min(COLLAPSE_CAP, mean - COLLAPSE_SDS * std),
                         scratch_mean=mean, scratch_std=std)
        out[model] = entry
    return out


def collapsed_runs(records: Sequence[Mapping],
                   thresholds: Mapping[str, Mapping] | None = None) -> list[dict]:
    """Student runs whose final eval top-1 is below their family's threshold
    (:func:`collapse_thresholds`): the network died or diverged. They are listed, counted per
    cell (:func:`collapse_rates`) and left out of the paired comparisons."""
    thresholds = collapse_thresholds(records) if thresholds is None else thresholds
    return [{"cell": r["cell"], "seed": r["seed"], "accuracy": r["accuracy"], "ce": r.get("ce"),
             "threshold": thresholds[_family_of(r)]["threshold"]}
            for r in sorted(records, key=lambda r: (r["cell"], r["seed"]))
            if _family_of(r) and r.get("accuracy") is not None
            and r["accuracy"] < thresholds[_family_of(r)]["threshold"]]


def collapse_rates(records: Sequence[Mapping], collapsed: Sequence[Mapping]) -> dict[str, dict]:
    """Per student cell: ``k`` collapsed of ``n`` runs, the rate and its exact (Clopper-Pearson)
    95% confidence interval (``scipy.stats.binomtest``)."""
    out = {}
    bad = {(c["cell"], c["seed"]) for c in collapsed}
    for cell in sorted({r["cell"] for r in records if _family_of(r)}):
        seeds = [r["seed"] for r in records if r["cell"] == cell and r.get("accuracy") is not None]
        k, n = sum((cell, s) in bad for s in seeds), len(seeds)
        ci = stats.binomtest(k, n).proportion_ci(0.95, method="exact") if n else None
        out[cell] = {"k": k, "n": n, "rate": k / n if n else math.nan,
                     "ci_low": ci.low if ci else math.nan, "ci_high": ci.high if ci else math.nan}
    return out


def collapse_test(a: str, b: str, records: Sequence[Mapping],
                  collapsed: Sequence[Mapping]) -> dict:
    """Do cells ``a`` and ``b`` collapse at different rates? Paired by seed: the exact McNemar
    test (a two-sided binomial test of the discordant seeds, ``scipy.stats.binomtest``).
    Returns ``{'n', 'a_only', 'b_only', 'p'}`` (p 1 without discordant seeds)."""
    bad = {(c["cell"], c["seed"]) for c in collapsed}
    seeds = sorted({r["seed"] for r in records if r["cell"] == a}
                   & {r["seed"] for r in records if r["cell"] == b})
    a_only = sum((a, s) in bad and (b, s) not in bad for s in seeds)
    b_only = sum((b, s) in bad and (a, s) not in bad for s in seeds)
    p = stats.binomtest(a_only, a_only + b_only).pvalue if a_only + b_only else 1.0
    return {"n": len(seeds), "a_only": a_only, "b_only": b_only, "p": float(p)}


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
        {"id": "hints_fast", "core": False,
         "claim": "Hints rescue a thin-and-deep student that KD alone trains poorly (FitNets), "
                  "at twice the learning rate; the collapse rate per arm is the primary outcome "
                  "(see Collapsed runs)",
         "paper": "FitNets: deep thin students trained with KD alone fail to learn well; the hint "
                  "stage makes them trainable",
         "tests": [("FitNet (hints + KD) minus KD only, twice the rate", "fitnet_fast/hint_kd",
                    "fitnet_fast/kd_only", "higher", "accuracy")]},
        {"id": "ta", "core": True,
         "claim": "A teacher assistant does not fix the capacity gap (ESKD paper, claim c; "
                  "Mirzadeh et al. claim it does)",
         "paper": "ESKD paper: distilling through a sequence of intermediate sizes does not remove "
                  "the gap on ImageNet",
         "tests": [(f"TA chain large -> medium -> student minus direct {size} -> student",
                    "ta/large-medium", f"full/{size}", "not_higher", "accuracy")
                   for size in reversed(sizes)]},
        {"id": "stop_epoch", "core": False,
         "claim": "ESKD's gain over full KD holds wherever KD stops: after 25%, 50% or 75% of "
                  "training (the `stop_kd` reading's free constant, large teacher)",
         "paper": "ESKD paper: KD stopped at epoch 60 of 90 on ImageNet (2/3), one setting",
         "tests": [(f"ESKD stop at {pct}% <- large minus full KD <- large", cell, "full/large",
                    "higher", "accuracy")
                   for pct, cell in ((25, "eskd_stop25/large"), (50, "eskd_stop/large"),
                                     (75, "eskd_stop75/large"))]},
        {"id": "loss_constants", "core": False,
         "claim": "The grid's KD constants (T = 4, 0.1 CE + 0.9 KD, the kdjax ImageNet configs' "
                  "defaults) are not beaten by T = 1 with 0.5 CE + 0.5 KD (torchdistill's and "
                  "mdistiller's ImageNet ResNet-34 -> 18 configs)",
         "paper": "no paper claim: the constants kdjax's ImageNet configs document",
         "tests": [("full KD <- large at T = 1, 0.5 / 0.5 minus at T = 4, 0.1 / 0.9",
                    "full_t1/large", "full/large", "not_higher", "accuracy")]},
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
                    sizes: Sequence[str] = SIZES,
                    collapsed: Sequence[Mapping] = ()) -> list[dict]:
    """Runs every claim's comparisons on ``values`` (``{metric: {cell: {seed: value}}}``, e.g.
    ``{'accuracy': by_cell(records), 'kl': by_cell(records, 'kl')}``) as one Holm family per
    claim, leaving out the seeds at which either cell collapsed (``collapsed``: records of
    :func:`collapsed_runs`); comparisons with fewer than two such seeds are left out. Each claim
    gets ``results`` (name, cells, metric, what the claim predicts, the
    :class:`~experiments.paired_stats.Comparison` fields, ``excluded`` seeds, ``answer``) and an
    overall ``verdict`` (:func:`combine` of the answers; ``not run`` without results)."""
    bad = {(c["cell"], c["seed"]) for c in collapsed}
    out = []
    for claim in claims(sizes):
        metric = claim["tests"][0][4]
        pairs, meta = {}, {}
        for name, a, b, kind, m in claim["tests"]:
            cells = values.get(m, {})
            if not (cells.get(a) and cells.get(b)):
                continue
            common = set(cells[a]) & set(cells[b])
            keep = {s for s in common if (a, s) not in bad and (b, s) not in bad}
            if len(keep) < 2:
                continue
            pairs[name] = ({s: cells[a][s] for s in keep}, {s: cells[b][s] for s in keep})
            meta[name] = {"name": name, "a": a, "b": b, "claim": kind, "metric": m,
                          "excluded": sorted(common - keep)}
        results = []
        if pairs:
            for c in _family(pairs, metric):
                d = c.to_dict()
                d.pop("name")
                results.append({**meta[c.name], **d,
                                "answer": answer(c.verdict, meta[c.name]["claim"])})
        overall = combine([r["answer"] for r in results]) if results else "not run"
        out.append({**{k: v for k, v in claim.items() if k != "tests"}, "results": results,
                    "verdict": overall})
    return out
