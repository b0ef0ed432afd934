"""experiments.paired_stats: hand-computable cases, scipy cross-checks on random data, a Monte Carlo
check of the minimal detectable effect, and the verdicts."""
import numpy as np
import pytest
from scipy import stats

from experiments import paired_stats as ps


# -- Holm ------------------------------------------------------------------------------------------


def test_holm_hand_cases():
    # sorted 0.01, 0.03, 0.04 -> 3 * 0.01, 2 * 0.03, max(0.06, 1 * 0.04); back in input order.
    np.testing.assert_allclose(ps.holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    np.testing.assert_allclose(ps.holm([0.5]), [0.5])
    np.testing.assert_allclose(ps.holm([0.02, 0.02]), [0.04, 0.04])
    np.testing.assert_allclose(ps.holm([0.6, 0.7]), [1.0, 1.0])  # capped at 1
    np.testing.assert_allclose(ps.holm([0.001, 0.2, 0.0125, 0.04]),
                               [0.004, 0.2, 0.0375, 0.08])
    np.testing.assert_allclose(ps.holm([np.nan, 0.01]), [1.0, 0.02])
    with pytest.raises(ValueError, match=r"p-values must be in \[0, 1\]"):
        ps.holm([0.1, 1.5])


def test_holm_rejections_match_the_step_down_procedure_on_random_p_values():
    """Rejecting where adjusted < alpha = Holm's procedure written as its definition: walk the
    sorted p-values, reject while p_(i) < alpha / (m - i + 1), stop at the first failure."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        m = rng.integers(1, 9)
        p = rng.uniform(0, 0.1, m) ** rng.uniform(0.5, 2)
        alpha = 0.05
        reject = np.zeros(m, bool)
        for i, j in enumerate(np.argsort(p, kind="stable")):
            if p[j] < alpha / (m - i):
                reject[j] = True
            else:
                break
        np.testing.assert_array_equal(ps.holm(p) < alpha, reject)
        assert np.all(ps.holm(p) >= p - 1e-15)


# -- the tests -------------------------------------------------------------------------------------


def test_paired_t_hand_case_and_scipy():
    # d = 1, 2, 3: mean 2, sd 1, t = 2 / (1 / sqrt(3)) = 2 sqrt(3); p = 2 P(T_2 > t).
    t, p = ps.paired_t([0, 0, 0], [1, 2, 3])
    assert t == pytest.approx(2 * np.sqrt(3))
    assert p == pytest.approx(2 * stats.t.sf(2 * np.sqrt(3), 2))
    assert p == pytest.approx(0.0741799, abs=1e-6)
    rng = np.random.default_rng(1)
    for _ in range(20):
        a = rng.normal(80, 2, 8)
        b = a + rng.normal(0.3, 1, 8)
        t, p = ps.paired_t(a, b)
        ref = stats.ttest_1samp(b - a, 0.0)  # the same test through another scipy function
        assert t == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)


def test_wilcoxon_exact_hand_cases_and_scipy():
    # All 5 differences positive: W- = 0, P = 2 * 1/32. One negative of rank 1: W- = 1, P = 2 * 2/32.
    assert ps.wilcoxon_p([0] * 5, [1, 2, 3, 4, 5]) == pytest.approx(2 / 32)
    assert ps.wilcoxon_p([0] * 5, [-1, 2, 3, 4, 5]) == pytest.approx(4 / 32)
    assert ps.wilcoxon_p([1, 2, 3], [1, 2, 3]) == 1.0
    rng = np.random.default_rng(2)
    for _ in range(20):
        a, b = rng.normal(size=9), rng.normal(0.5, 1, 9)
        assert ps.wilcoxon_p(a, b) == pytest.approx(stats.wilcoxon(b, a).pvalue)


def test_tost_hand_case_and_scipy():
    # d = +-0.1 (mean 0, sd 0.11547), margin 0.5: both one-sided t = 0.5 / (sd / 2) on 3 df.
    d = np.array([0.1, -0.1, 0.1, -0.1])
    sd = d.std(ddof=1)
    assert ps.tost_p(np.zeros(4), d, 0.5) == pytest.approx(stats.t.sf(0.5 / (sd / 2), 3))
    # A mean exactly on the margin: one of the two one-sided tests has t = 0, p = 1/2.
    assert ps.tost_p(np.zeros(4), d + 0.5, 0.5) == pytest.approx(0.5)
    rng = np.random.default_rng(3)
    for _ in range(20):
        a = rng.normal(size=10)
        b = a + rng.normal(rng.uniform(-1, 1), 0.5, 10)
        m = rng.uniform(0.1, 1)
        # The same hypotheses as paired tests of shifted arms (ttest_rel with alternative=).
        lower = stats.ttest_rel(b + m, a, alternative="greater").pvalue
        upper = stats.ttest_rel(b - m, a, alternative="less").pvalue
        assert ps.tost_p(a, b, m) == pytest.approx(max(lower, upper))
    assert ps.tost_p([0, 0], [0.2, 0.2], 0.5) == 0.0 and ps.tost_p([0, 0], [0.7, 0.7], 0.5) == 1.0
    with pytest.raises(ValueError, match="margin must be > 0"):
        ps.tost_p([0, 1], [1, 2], 0.0)


# -- the minimal detectable effect -------------------------------------------------------------------


def test_mde_matches_published_and_asymptotic_values():
    # G*Power / Cohen: one-sample (paired) t, two-sided alpha 0.05, power 0.8, n = 10: dz = 0.996.
    assert ps.mde_effect_size(10) == pytest.approx(0.996, abs=1e-3)
    # Large n: the normal approximation (z_0.975 + z_0.8) / sqrt(n).
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    assert ps.mde_effect_size(2000) == pytest.approx(z / np.sqrt(2000), rel=2e-3)
    assert ps.mde_effect_size(20) < ps.mde_effect_size(10) < ps.mde_effect_size(5)
    assert ps.mde_effect_size(10, power=0.9) > ps.mde_effect_size(10)
    assert np.isfinite(ps.mde_effect_size(2))  # the tail where scipy's nct.cdf is NaN
    for n in (2, 3, 10):
        assert ps.t_power(ps.mde_effect_size(n), n) == pytest.approx(0.8, abs=1e-8)
    assert ps.t_power(0.0, 10) == pytest.approx(0.05)  # no effect: the test's level


def test_mde_has_the_stated_power_by_simulation():
    """Simulated paired data with a true mean difference of the MDE: the paired t-test rejects
    in ~80% of 20000 experiments (binomial SE 0.3 points)."""
    rng = np.random.default_rng(4)
    n, sd = 8, 1.7
    delta = ps.mde_effect_size(n) * sd
    d = rng.normal(delta, sd, size=(20000, n))
    p = stats.ttest_1samp(d, 0.0, axis=1).pvalue
    assert np.mean(p < 0.05) == pytest.approx(0.8, abs=0.012)


# -- bootstrap -------------------------------------------------------------------------------------


def test_bootstrap_ci_is_paired_seeded_and_close_to_the_t_interval():
    rng = np.random.default_rng(5)
    a = rng.normal(80, 3, 40)  # large between-seed spread, small paired difference
    b = a + rng.normal(0.4, 0.5, 40)
    lo, hi = ps.bootstrap_ci(a, b)
    d = b - a
    half = stats.t.ppf(0.975, 39) * d.std(ddof=1) / np.sqrt(40)
    assert lo < d.mean() < hi
    assert lo == pytest.approx(d.mean() - half, abs=0.25 * half)
    assert hi == pytest.approx(d.mean() + half, abs=0.25 * half)
    # Pairing matters: the interval of unpaired resampling would be ~6x wider (sd 3 vs 0.5).
    assert hi - lo < 1.0
    assert ps.bootstrap_ci(a, b) == (lo, hi)  # seeded
    assert ps.bootstrap_ci([1, 2, 3], [1.5, 2.5, 3.5]) == (0.5, 0.5)


# -- comparisons and verdicts ------------------------------------------------------------------------


def test_verdicts_and_family_holm():
    rng = np.random.default_rng(6)
    base = rng.normal(85, 1.5, 10)
    pairs = {"worse - base": (base, base - 2 + rng.normal(0, 0.3, 10)),
             "same - base": (base, base + rng.normal(0, 0.05, 10)),
             "noisy - base": (base, base + rng.normal(0.3, 3, 10))}
    fam = ps.compare_family(pairs, margin=0.5)
    by = {c.name: c for c in fam}
    assert by["worse - base"].verdict == "worse"
    assert by["same - base"].verdict == "equivalent"
    assert by["noisy - base"].verdict == "inconclusive"
    assert by["noisy - base"].mde > 0.5  # why it is inconclusive: 10 seeds cannot see 0.5 points
    assert by["worse - base"].baseline == "base" and by["worse - base"].arm == "worse"
    for key in ("p_t", "p_wilcoxon", "p_tost"):
        np.testing.assert_allclose([getattr(c, key + "_holm") for c in fam],
                                   ps.holm([getattr(c, key) for c in fam]))
    better = ps.compare(base, base + 3 + rng.normal(0, 0.3, 10), margin=0.5, name="b - a")
    assert better.verdict == "better" and better.p_t_holm == better.p_t
    # Significant and within the margin: better, with a note.
    small = ps.compare(base, base + 0.2 + rng.normal(0, 0.02, 10), margin=0.5)
    assert small.verdict == "better" and "within the equivalence margin" in small.note
    same = ps.compare(base, base, margin=0.5)  # identical runs
    assert same.verdict == "equivalent" and same.ci_low == same.ci_high == 0.0
    assert ps.Comparison.from_dict(same.to_dict()) == same
    assert "| same - base |" in ps.markdown_table(fam)


def test_float_noise_of_the_subtraction_is_not_a_difference():
    """Accuracies in 0.1-point steps: 64.2 - 60.0 and 64.3 - 60.1 differ in their last bits, but
    are the same difference (a constant shift: t-test p = 0, the single-value interval), and
    74.8 - 74.8 style zeros stay zeros for Wilcoxon."""
    a, b = [60.0, 60.1, 64.4], [64.2, 64.3, 68.6]
    assert len({y - x for x, y in zip(a, b)}) > 1  # the floating-point differences do differ
    c = ps.compare(a, b, margin=0.5)
    assert c.sd_diff == 0 and c.p_t == 0 and c.ci_low == c.ci_high == pytest.approx(4.2)
    assert ps.wilcoxon_p([0.1 + 0.2, 0.5], [0.3, 0.5]) == 1.0


def test_input_errors():
    with pytest.raises(ValueError, match="same length"):
        ps.compare([1, 2, 3], [1, 2], margin=0.5)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        ps.compare([1], [2], margin=0.5)
    with pytest.raises(ValueError, match="finite"):
        ps.compare([1, np.nan], [2, 3], margin=0.5)
