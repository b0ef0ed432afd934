"""Paired statistics for comparing two arms measured on the same seeds (issues 16 and 19).

Two arms ``baseline`` and ``arm`` are run once per seed, with the same seeds; the unit of analysis
is the per-seed difference ``d = arm - baseline``. :func:`compare` gives, for one such pair:

* the paired t-test (``scipy.stats.ttest_rel``) and the Wilcoxon signed-rank test
  (``scipy.stats.wilcoxon`` on ``d``; zero differences dropped, exact null distribution where
  scipy allows), both two-sided: the primary tests;
* a bootstrap 95% confidence interval of the mean paired difference (``scipy.stats.bootstrap``,
  BCa, resampling whole pairs, i.e. the differences);
* TOST equivalence with margin ``m``: two one-sided one-sample t-tests of ``d``,
  ``H0: mean <= -m`` and ``H0: mean >= m`` (``scipy.stats.ttest_1samp`` with ``alternative=``);
  its p-value is the larger of the two;
* the minimal detectable effect (MDE): the smallest true mean difference the two-sided paired
  t-test at ``alpha`` detects with probability ``power`` (default 80%) for ``n`` pairs with the
  observed standard deviation of ``d``, from the noncentral t distribution (``scipy.stats.nct``).

:func:`compare_family` compares several pairs as one family and adjusts each test's p-values
over the family with Holm's step-down method (:func:`holm`), which controls the family-wise error
rate at ``alpha`` under any dependence. The verdict of a comparison (at ``alpha`` after Holm):

* ``better`` / ``worse`` - both primary tests reject "no difference" (the sign of the mean
  difference says which);
* ``equivalent`` - otherwise, if TOST rejects "the difference is at least the margin";
* ``inconclusive`` - neither: the data can tell the arms neither apart nor equivalent (compare the
  MDE with the effect of interest to see how many seeds would be needed).

A comparison can be significant and equivalent at once (a real difference smaller than the
margin): the verdict is then ``better`` / ``worse`` and ``note`` says it lies within the margin.
Degenerate data are handled explicitly: when all differences are equal (standard deviation 0)
the t-based p-values are those of the limit (0 or 1), Wilcoxon's is 1 when every difference is
zero, and the bootstrap interval is the single value.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np
from scipy import optimize, stats

VERDICTS = ("better", "worse", "equivalent", "inconclusive")

METHOD_NOTE = (
    "Method (`experiments/paired_stats.py`): per-seed differences d = arm - baseline; paired "
    "t-test and Wilcoxon signed-rank test (two-sided) as the primary tests, each Holm-adjusted "
    "over the comparisons of the table; bootstrap 95% CI of the mean of d (BCa, 9999 resamples of "
    "the pairs); TOST equivalence with margin ±{margin} (two one-sided t-tests, Holm-adjusted); "
    "MDE = the smallest true mean difference the paired t-test (alpha 0.05, two-sided) detects "
    "with 80% power at this n and the observed sd of d (noncentral t). Verdict: better/worse when "
    "both primary tests reject, else equivalent when TOST rejects, else inconclusive.")


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (in the input order).

    Sorted ascending ``p_(1) <= ... <= p_(m)``: ``adj_(i) = max_{j <= i} min(1, (m - j + 1)
    p_(j))``. Rejecting where ``adj < alpha`` is Holm's procedure at family-wise level ``alpha``.
    NaN p-values are treated as 1.
    """
    p = np.asarray(pvalues, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"pvalues must be one-dimensional, got shape {p.shape}.")
    p = np.where(np.isnan(p), 1.0, p)
    if np.any((p < 0) | (p > 1)):
        raise ValueError(f"p-values must be in [0, 1], got {p.tolist()}.")
    m = p.size
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


def _differences(baseline, arm) -> np.ndarray:
    a, b = np.asarray(baseline, dtype=float), np.asarray(arm, dtype=float)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"baseline and arm must be 1-D of the same length (one value per seed), "
                         f"got shapes {a.shape} and {b.shape}.")
    if a.size < 2:
        raise ValueError(f"a paired comparison needs at least 2 seeds, got {a.size}.")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("baseline and arm must be finite.")
    # Rounded to 12 significant digits of the data's scale: the subtraction's last bits are noise
    # (64.2 - 60.0 != 64.3 - 60.1 in floating point) that would break ties and zeros.
    scale = max(1.0, float(np.max(np.abs(a))), float(np.max(np.abs(b))))
    return np.round(b - a, 12 - int(np.ceil(np.log10(scale))))


def _constant(d: np.ndarray) -> bool:
    return bool(np.all(d == d[0]))


def paired_t(baseline, arm) -> tuple[float, float]:
    """``(t, p)`` of the two-sided paired t-test of ``arm - baseline`` (``scipy.stats.ttest_rel``);
    all-equal differences give ``t = +-inf, p = 0`` (or ``t = 0, p = 1`` when all are zero)."""
    d = _differences(baseline, arm)
    if _constant(d):
        return (0.0, 1.0) if d[0] == 0 else (float(np.sign(d[0]) * np.inf), 0.0)
    r = stats.ttest_rel(d, np.zeros_like(d))  # = ttest_rel(arm, baseline) on the rounded d
    return float(r.statistic), float(r.pvalue)


def wilcoxon_p(baseline, arm) -> float:
    """Two-sided Wilcoxon signed-rank p-value of ``arm - baseline`` (zeros dropped; 1 if all are
    zero)."""
    d = _differences(baseline, arm)
    if np.all(d == 0):
        return 1.0
    return float(stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def tost_p(baseline, arm, margin: float) -> float:
    """TOST p-value for equivalence of the mean paired difference within ``(-margin, margin)``:
    the larger p of ``H0: mean <= -margin`` and ``H0: mean >= margin`` (one-sided one-sample t)."""
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin!r}.")
    d = _differences(baseline, arm)
    if _constant(d):
        return 0.0 if abs(d[0]) < margin else 1.0
    lower = stats.ttest_1samp(d, -margin, alternative="greater").pvalue
    upper = stats.ttest_1samp(d, margin, alternative="less").pvalue
    return float(max(lower, upper))


def t_power(effect_size: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided one-sample (paired) t-test with ``n`` pairs at standardized effect
    ``effect_size = mean(d) / sd(d)`` (noncentral t with ``n - 1`` degrees of freedom)."""
    df, nc = n - 1, effect_size * np.sqrt(n)
    crit = stats.t.ppf(1 - alpha / 2, df)
    # P(T < -crit | nc) = P(T > crit | -nc): scipy's nct.cdf far in the tail can be NaN.
    upper, lower = stats.nct.sf(crit, df, abs(nc)), stats.nct.sf(crit, df, -abs(nc))
    return float(upper + (0.0 if np.isnan(lower) else lower))


def mde_effect_size(n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The standardized effect ``mean(d) / sd(d)`` that the two-sided paired t-test with ``n``
    pairs detects with probability ``power`` at level ``alpha`` (solved on :func:`t_power`)."""
    if n < 2:
        raise ValueError(f"n must be at least 2, got {n}.")
    if not (0 < alpha < 1 and alpha < power < 1):
        raise ValueError(f"need 0 < alpha < power < 1, got alpha={alpha}, power={power}.")
    hi = 1.0
    while t_power(hi, n, alpha) < power:  # bracket the root (nct is NaN for absurd noncentrality)
        hi *= 2.0
        if hi > 1e4:
            raise ValueError(f"no effect size reaches power {power} with n={n} at alpha={alpha}.")
    return float(optimize.brentq(lambda e: t_power(e, n, alpha) - power, 0.0, hi, xtol=1e-10))


def bootstrap_ci(baseline, arm, *, confidence: float = 0.95, n_resamples: int = 9999,
                 seed: int = 0) -> tuple[float, float]:
    """BCa bootstrap CI of the mean paired difference, resampling pairs (= the differences)."""
    d = _differences(baseline, arm)
    if _constant(d):
        return float(d[0]), float(d[0])
    r = stats.bootstrap((d,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                        method="BCa", rng=np.random.default_rng(seed))
    lo, hi = float(r.confidence_interval.low), float(r.confidence_interval.high)
    if not (np.isfinite(lo) and np.isfinite(hi)):  # BCa undefined (e.g. too few distinct values)
        r = stats.bootstrap((d,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                            method="percentile", rng=np.random.default_rng(seed))
        lo, hi = float(r.confidence_interval.low), float(r.confidence_interval.high)
    return lo, hi


@dataclasses.dataclass
class Comparison:
    """One paired comparison ``arm - baseline`` (see the module docstring). ``p_*_holm`` are
    filled in by :func:`compare_family` (equal to the raw ones for a family of one)."""
    name: str
    baseline: str
    arm: str
    n: int
    mean_baseline: float
    mean_arm: float
    mean_diff: float
    sd_diff: float
    t: float
    p_t: float
    p_wilcoxon: float
    ci_low: float
    ci_high: float
    margin: float
    p_tost: float
    mde: float
    mde_effect_size: float
    alpha: float
    power: float
    p_t_holm: float = float("nan")
    p_wilcoxon_holm: float = float("nan")
    p_tost_holm: float = float("nan")
    verdict: str = ""
    note: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Comparison":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def compare(baseline, arm, *, margin: float, alpha: float = 0.05, power: float = 0.8,
            name: str = "", baseline_name: str = "", arm_name: str = "", seed: int = 0,
            n_resamples: int = 9999) -> Comparison:
    """One paired comparison; a family of one (its Holm p-values are the raw ones)."""
    return compare_family({name or "arm - baseline": (baseline, arm)}, margin=margin, alpha=alpha,
                          power=power, seed=seed, n_resamples=n_resamples,
                          names={name or "arm - baseline": (baseline_name, arm_name)})[0]


def _compare_raw(name, baseline, arm, *, margin, alpha, power, seed, n_resamples, names):
    d = _differences(baseline, arm)
    n = d.size
    sd = float(np.std(d, ddof=1))
    t, p_t = paired_t(baseline, arm)
    lo, hi = bootstrap_ci(baseline, arm, seed=seed, n_resamples=n_resamples)
    dz = mde_effect_size(n, alpha, power)
    return Comparison(
        name=name, baseline=names[0], arm=names[1], n=n,
        mean_baseline=float(np.mean(baseline)), mean_arm=float(np.mean(arm)),
        mean_diff=float(d.mean()), sd_diff=sd, t=t, p_t=p_t, p_wilcoxon=wilcoxon_p(baseline, arm),
        ci_low=lo, ci_high=hi, margin=float(margin), p_tost=tost_p(baseline, arm, margin),
        mde=dz * sd, mde_effect_size=dz, alpha=alpha, power=power)


def verdict(c: Comparison) -> tuple[str, str]:
    """``(verdict, note)`` of a comparison from its Holm-adjusted p-values (module docstring)."""
    t_sig, w_sig = c.p_t_holm < c.alpha, c.p_wilcoxon_holm < c.alpha
    equivalent = c.p_tost_holm < c.alpha
    if t_sig and w_sig:
        v = "better" if c.mean_diff > 0 else "worse"
        return v, ("a real difference, but within the equivalence margin" if equivalent else "")
    note = ""
    if t_sig != w_sig:
        note = ("only the paired t-test rejects" if t_sig else "only the Wilcoxon test rejects")
    return ("equivalent" if equivalent else "inconclusive"), note


def compare_family(pairs: Mapping[str, tuple], *, margin: float, alpha: float = 0.05,
                   power: float = 0.8, seed: int = 0, n_resamples: int = 9999,
                   names: Mapping[str, tuple[str, str]] | None = None) -> list[Comparison]:
    """Compares every ``name -> (baseline, arm)`` pair (each one value per seed, same seeds in
    the same order) and Holm-adjusts each test's p-values over the family; in the input order.

    ``names``: optional ``name -> (baseline label, arm label)``; by default the name's parts
    around ``' - '`` (``'views - live'`` -> baseline ``live``, arm ``views``)."""
    if not pairs:
        raise ValueError("compare_family needs at least one pair.")
    out = []
    for name, (baseline, arm) in pairs.items():
        labels = (names or {}).get(name)
        if not labels:
            parts = name.split(" - ")
            labels = (parts[1], parts[0]) if len(parts) == 2 else ("baseline", "arm")
        out.append(_compare_raw(name, baseline, arm, margin=margin, alpha=alpha, power=power,
                                seed=seed, n_resamples=n_resamples, names=labels))
    for key in ("p_t", "p_wilcoxon", "p_tost"):
        for c, adj in zip(out, holm([getattr(c, key) for c in out])):
            setattr(c, key + "_holm", float(adj))
    for c in out:
        c.verdict, c.note = verdict(c)
    return out


def _p(x: float) -> str:
    return "<0.0001" if x < 1e-4 else f"{x:.4f}"


def markdown_table(comparisons: Sequence[Comparison]) -> str:
    """The comparisons as a markdown table (differences in the units of the data)."""
    rows = ["| comparison | n | mean diff | sd diff | 95% CI (bootstrap) | t-test p (Holm) | "
            "Wilcoxon p (Holm) | TOST p (Holm), margin | MDE (80%) | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        verdict_text = c.verdict + (f" ({c.note})" if c.note else "")
        rows.append(f"| {c.name} | {c.n} | {c.mean_diff:+.3f} | {c.sd_diff:.3f} | "
                    f"[{c.ci_low:+.3f}, {c.ci_high:+.3f}] | {_p(c.p_t)} ({_p(c.p_t_holm)}) | "
                    f"{_p(c.p_wilcoxon)} ({_p(c.p_wilcoxon_holm)}) | "
                    f"{_p(c.p_tost)} ({_p(c.p_tost_holm)}), ±{c.margin:g} | {c.mde:.3f} | "
                    f"{verdict_text} |")
    return "\n".join(rows)
