"""The statistics of the reproduction: per-cell mean and std over seeds, Welch's and the paired
t-test between two cells, and the verdict of each paper claim (docs/experiments.md gives the rules).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats  # scipy comes with scikit-learn, of the `experiments` extra

from experiments.reproduce_cpu.grid import SIZES

ALPHA = 0.05


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


def _constant(x: np.ndarray) -> bool:
    """True when all values are equal up to float rounding (a t-test is undefined then)."""
    return bool(np.ptp(x) <= 1e-12 * max(1.0, float(np.max(np.abs(x)))))


def compare(a: Mapping[int, float], b: Mapping[int, float]) -> dict:
    """Cell ``a`` against cell ``b`` over seeds: ``a`` and ``b`` map seed -> value.

    Returns ``diff`` (mean(a) - mean(b)), Welch's t-test over all values (``welch_t``,
    ``welch_p``: ``scipy.stats.ttest_ind(a, b, equal_var=False)``, two-sided) and the paired t-test
    over the seeds both have (``paired_t``, ``paired_p``: ``scipy.stats.ttest_rel``, two-sided;
    ``n_paired``). A test is undefined (t and p NaN) with fewer than two values per side, when
    both samples are constant (Welch) or when the paired differences are constant (paired).
    """
    if len(a) < 1 or len(b) < 1:
        raise ValueError(f"compare: both cells need values; got {len(a)} and {len(b)} seeds.")
    xa = np.array([a[s] for s in sorted(a)], np.float64)
    xb = np.array([b[s] for s in sorted(b)], np.float64)
    common_seeds = sorted(set(a) & set(b))
    da = np.array([a[s] - b[s] for s in common_seeds], np.float64)
    out = {"diff": float(xa.mean() - xb.mean()), "n_a": int(xa.size), "n_b": int(xb.size),
           "n_paired": len(common_seeds), "welch_t": math.nan, "welch_p": math.nan,
           "paired_t": math.nan, "paired_p": math.nan}
    with warnings.catch_warnings():
        # One constant sample (e.g. every seed at the same top-1) is fine for Welch's test, but
        # scipy warns about its zero variance; the undefined cases are excluded above.
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        if xa.size > 1 and xb.size > 1 and not (_constant(xa) and _constant(xb)):
            t, p = stats.ttest_ind(xa, xb, equal_var=False)
            out["welch_t"], out["welch_p"] = float(t), float(p)
        if da.size > 1 and not _constant(da):
            t, p = stats.ttest_rel([a[s] for s in common_seeds], [b[s] for s in common_seeds])
            out["paired_t"], out["paired_p"] = float(t), float(p)
    return out


def direction(comparison: Mapping[str, float], alpha: float = ALPHA) -> str:
    """``'higher'`` / ``'lower'`` (the sign of ``diff``) when BOTH Welch's and the paired test give
    p < ``alpha``; else ``'n.s.'`` (an undefined, NaN p-value counts as not significant)."""
    p_values = (comparison["welch_p"], comparison["paired_p"])
    if all(p == p and p < alpha for p in p_values):
        return "higher" if comparison["diff"] > 0 else "lower"
    return "n.s."


CLAIM_KINDS = ("higher", "lower", "not_higher")


def verdict(comparison: Mapping[str, float], claim: str, alpha: float = ALPHA) -> str:
    """Whether a comparison ``a - b`` supports what a claim predicts for it.

    ``claim='higher'`` (``'lower'``): the claim predicts ``a > b`` (``a < b``): agree if
    significantly so, disagree if significantly the other way. ``claim='not_higher'``: the claim
    says ``a`` is no better than ``b``: disagree if significantly higher, agree if significantly
    lower. No significant difference is ``'inconclusive'`` in every case (for ``not_higher`` it is
    consistent with the claim, but a few seeds cannot exclude a small gain).
    """
    if claim not in CLAIM_KINDS:
        raise ValueError(f"verdict: claim={claim!r} is not valid; valid: {', '.join(CLAIM_KINDS)}.")
    d = direction(comparison, alpha)
    if d == "n.s.":
        return "inconclusive"
    if claim == "higher":
        return "agree" if d == "higher" else "disagree"
    if claim == "lower":
        return "agree" if d == "lower" else "disagree"
    return "disagree" if d == "higher" else "agree"


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


def collapsed_runs(records: Sequence[Mapping], num_classes: int) -> list[dict]:
    """Runs whose final eval top-1 is below twice chance (``2 / num_classes``): the network died
    or diverged (e.g. every ReLU off: constant logits, eval CE = ln C). They stay in the
    statistics (they are what the protocol produced) and the report lists them."""
    return [{"cell": r["cell"], "seed": r["seed"], "accuracy": r["accuracy"], "ce": r.get("ce")}
            for r in sorted(records, key=lambda r: (r["cell"], r["seed"]))
            if r.get("accuracy") is not None and r["accuracy"] < 2.0 / num_classes]


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
        {"id": "ta", "core": True,
         "claim": "A teacher assistant does not fix the capacity gap (ESKD paper, claim c; "
                  "Mirzadeh et al. claim it does)",
         "paper": "ESKD paper: distilling through a sequence of intermediate sizes does not remove "
                  "the gap on ImageNet",
         "tests": [(f"TA chain large -> medium -> student minus direct {size} -> student",
                    "ta/large-medium", f"full/{size}", "not_higher", "accuracy")
                   for size in reversed(sizes)]},
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
                    sizes: Sequence[str] = SIZES) -> list[dict]:
    """Runs every claim's comparisons on ``values`` (``{metric: {cell: {seed: value}}}``, e.g.
    ``{'accuracy': by_cell(records), 'kl': by_cell(records, 'kl')}``); comparisons whose cells are
    missing are left out. Each claim gets ``results`` (name, cells, metric, :func:`compare`'s
    numbers, verdict) and an overall ``verdict`` (:func:`combine`; ``not run`` without results)."""
    out = []
    for claim in claims(sizes):
        results = []
        for name, a, b, kind, metric in claim["tests"]:
            cells = values.get(metric, {})
            if cells.get(a) and cells.get(b):
                c = compare(cells[a], cells[b])
                results.append({"name": name, "a": a, "b": b, "claim": kind, "metric": metric,
                                **c, "verdict": verdict(c, kind)})
        overall = combine([r["verdict"] for r in results]) if results else "not run"
        out.append({**{k: v for k, v in claim.items() if k != "tests"}, "results": results,
                    "verdict": overall})
    return out
