"""Tests for kdjax.losses.

Every loss is checked against an independent float64 NumPy/SciPy reference written here (never by
calling kdjax), on inputs drawn with hypothesis, in float32, bfloat16 and float16. Low-precision inputs
are rounded first and the reference is evaluated on the rounded values; the losses compute in float32,
so the tolerance is set by float32 arithmetic on inputs of that magnitude.
"""
import functools
import warnings

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import log_softmax, logsumexp, softmax

from kdjax import losses

SETTINGS = settings(max_examples=25, deadline=None)
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
F32_EPS = float(np.finfo(np.float32).eps)


def rounded(x, dtype):
    """``x`` rounded to ``dtype``: (jax array, float64 NumPy copy of the rounded values)."""
    arr = jnp.asarray(np.asarray(x, np.float32), dtype)
    return arr, np.asarray(arr.astype(jnp.float32), np.float64)


def assert_close(got, want, atol, rtol=1e-5):
    got = np.asarray(got)
    assert got.dtype == np.float32, got.dtype
    assert got.shape == np.shape(want), (got.shape, np.shape(want))
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=rtol, atol=atol)


def logit_atol(temperature, *logits):
    """float32 error of a T^2-scaled sum over classes of p * log-probabilities of ``logits / T``."""
    magnitude = max(float(np.max(np.abs(z))) for z in logits) / temperature
    return 16 * F32_EPS * temperature**2 * (1.0 + magnitude + np.log(logits[0].shape[-1]))


@st.composite
def logit_cases(draw, min_classes=2):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # Few distinct shapes keep JAX's compilation cache warm (each new shape compiles every primitive);
    # values, scales and temperatures vary freely. (1, 2) covers the single-example, two-class edge.
    batch, classes = draw(st.sampled_from([shape for shape in ((3, 9), (1, 2)) if shape[1] >= min_classes]))
    scale = draw(st.sampled_from([0.1, 1.0, 4.0, 30.0]))
    temperature = draw(st.floats(0.5, 8.0))
    s = rng.normal(size=(batch, classes)) * scale
    t = rng.normal(size=(batch, classes)) * scale
    labels = rng.integers(0, classes, size=batch)
    return s, t, labels, temperature


@st.composite
def feature_cases(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch, spatial = draw(st.sampled_from([(3, (2, 3)), (1, (4,))]))
    c_s = draw(st.sampled_from([1, 3]))
    c_t = 2
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    s = rng.normal(size=(batch, *spatial, c_s)) * scale
    t = rng.normal(size=(batch, *spatial, c_t)) * scale
    return s, t


# ----------------------------------------------------------------------------------------------------------
# float64 references (NumPy/SciPy only).


def ref_kd_kl(s, t, temperature):
    log_ps = log_softmax(s / temperature, axis=-1)
    log_pt = log_softmax(t / temperature, axis=-1)
    return temperature**2 * np.sum(np.exp(log_pt) * (log_pt - log_ps), axis=-1)


def ref_soft_ce(s, t, temperature, weights=None):
    log_ps = log_softmax(s / temperature, axis=-1)
    p_t = softmax(t / temperature, axis=-1)
    w = np.ones(s.shape[-1]) if weights is None else weights
    return -temperature**2 * np.sum(w * p_t * log_ps, axis=-1)


def ref_ce(z, labels):
    return -np.take_along_axis(log_softmax(z, axis=-1), labels[..., None], axis=-1)[..., 0]


def ref_dkd(s, t, labels, alpha, beta, temperature):
    out = []
    for s_row, t_row, label in zip(s, t, labels):
        parts = []
        for z in (s_row / temperature, t_row / temperature):
            others = np.delete(z, label)
            binary = np.array([z[label] - logsumexp(z), logsumexp(others) - logsumexp(z)])
            parts.append((binary, log_softmax(others)))
        (b_s, n_s), (b_t, n_t) = parts
        tckd = np.sum(np.exp(b_t) * (b_t - b_s))
        nckd = np.sum(np.exp(n_t) * (n_t - n_s))
        out.append(temperature**2 * (alpha * tckd + beta * nckd))
    return np.array(out)


def ref_kd_kl_topk(s, values, indices, temperature):
    log_ps = np.take_along_axis(log_softmax(s / temperature, axis=-1), indices, axis=-1)
    log_q = log_softmax(values / temperature, axis=-1)
    return temperature**2 * np.sum(np.exp(log_q) * (log_q - log_ps), axis=-1)


def ref_fitnet(s, t, reduction):
    sq = (s - t) ** 2
    axes = tuple(range(1, s.ndim))
    return 0.5 * (np.mean(sq, axis=axes) if reduction == "mean" else np.sum(sq, axis=axes))


def ref_attention(s, t, p, squared):
    def attention(a):
        q = np.sum(np.abs(a) ** p, axis=-1).reshape(a.shape[0], -1)
        return q / np.linalg.norm(q, axis=1, keepdims=True)

    dist = np.linalg.norm(attention(s) - attention(t), axis=1)
    return dist**2 if squared else dist


def ref_similarity_gram_diff(s, t):
    def gram(a):
        q = a.reshape(a.shape[0], -1)
        g = q @ q.T
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    return gram(t) - gram(s)


def ref_teacher_bounded(s, t, y, margin):
    d_s = np.sum((s - y) ** 2, axis=-1)
    d_t = np.sum((t - y) ** 2, axis=-1)
    return np.where(d_s + margin > d_t, d_s, 0.0), d_s, d_t


# ----------------------------------------------------------------------------------------------------------
# Values against the references.


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(case=logit_cases())
def test_kd_kl_and_soft_cross_entropy_match_reference(dtype, case):
    s, t, _, temperature = case
    s_j, s_r = rounded(s, dtype)
    t_j, t_r = rounded(t, dtype)
    atol = logit_atol(temperature, s_r, t_r)
    assert_close(losses.kd_kl(s_j, t_j, temperature), ref_kd_kl(s_r, t_r, temperature), atol)
    assert_close(losses.soft_cross_entropy(s_j, t_j, temperature), ref_soft_ce(s_r, t_r, temperature), atol)
    # Documented identity: soft_cross_entropy = kd_kl + T^2 * H(p_t).
    p_t = softmax(t_r / temperature, axis=-1)
    entropy = -np.sum(p_t * log_softmax(t_r / temperature, axis=-1), axis=-1)
    gap = np.asarray(losses.soft_cross_entropy(s_j, t_j, temperature) - losses.kd_kl(s_j, t_j, temperature))
    np.testing.assert_allclose(gap, temperature**2 * entropy, rtol=1e-4, atol=2 * atol)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(case=logit_cases(), alpha=st.floats(0.0, 1.0))
def test_cross_entropy_and_hinton_kd_match_reference(dtype, case, alpha):
    s, t, labels, temperature = case
    s_j, s_r = rounded(s, dtype)
    t_j, t_r = rounded(t, dtype)
    atol = logit_atol(temperature, s_r, t_r) + logit_atol(1.0, s_r)
    ce = ref_ce(s_r, labels)
    assert_close(losses.cross_entropy(s_j, labels), ce, logit_atol(1.0, s_r))
    want = alpha * ref_kd_kl(s_r, t_r, temperature) + (1 - alpha) * ce
    assert_close(losses.hinton_kd(s_j, t_j, labels, temperature, alpha), want, atol)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(case=logit_cases(), seed=st.integers(0, 2**32 - 1))
def test_class_weighted_soft_cross_entropy_matches_reference(dtype, case, seed):
    s, t, _, temperature = case
    weights = np.random.default_rng(seed).uniform(0.0, 2.0, size=s.shape[-1])
    weights[0] = 1.5  # Chen et al.: background weight 1.5
    s_j, s_r = rounded(s, dtype)
    t_j, t_r = rounded(t, dtype)
    got = losses.class_weighted_soft_cross_entropy(s_j, t_j, weights, temperature)
    assert_close(got, ref_soft_ce(s_r, t_r, temperature, weights), 2 * logit_atol(temperature, s_r, t_r))
    # All-ones weights are the plain soft cross-entropy.
    ones = losses.class_weighted_soft_cross_entropy(s_j, t_j, np.ones(s.shape[-1]), temperature)
    np.testing.assert_allclose(ones, losses.soft_cross_entropy(s_j, t_j, temperature), rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(case=logit_cases())
def test_logit_mse_matches_reference(dtype, case):
    s, t, _, _ = case
    s_j, s_r = rounded(s, dtype)
    t_j, t_r = rounded(t, dtype)
    want = 0.5 * np.sum((s_r - t_r) ** 2, axis=-1)
    assert_close(losses.logit_mse(s_j, t_j), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(
    case=logit_cases(),
    alpha=st.sampled_from([0.0, 1.0, 0.5]),
    beta=st.sampled_from([0.0, 8.0, 0.5]),
)
def test_dkd_matches_reference(dtype, case, alpha, beta):
    s, t, labels, temperature = case
    s_j, s_r = rounded(s, dtype)
    t_j, t_r = rounded(t, dtype)
    want = ref_dkd(s_r, t_r, labels, alpha, beta, temperature)
    atol = (alpha + beta + 1) * 2 * logit_atol(temperature, s_r, t_r)
    assert_close(losses.dkd(s_j, t_j, labels, alpha, beta, temperature), want, atol)


@SETTINGS
@given(case=logit_cases())
def test_dkd_terms_recompose_classical_kd(case):
    """Zhao et al. Eq. (5): KD = TCKD + (1 - p_t,y) * NCKD."""
    s, t, labels, temperature = case
    s_j, t_j = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
    tckd = losses.dkd(s_j, t_j, labels, alpha=1.0, beta=0.0, temperature=temperature)
    nckd = losses.dkd(s_j, t_j, labels, alpha=0.0, beta=1.0, temperature=temperature)
    p_target = np.take_along_axis(softmax(t / temperature, axis=-1), labels[:, None], axis=-1)[:, 0]
    want = ref_kd_kl(s, t, temperature)
    got = np.asarray(tckd, np.float64) + (1 - p_target) * np.asarray(nckd, np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=4 * logit_atol(temperature, s, t))


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(case=logit_cases(), data=st.data())
def test_kd_kl_topk_matches_reference(dtype, case, data):
    s, t, _, temperature = case
    classes = s.shape[-1]
    k = data.draw(st.sampled_from(sorted({1, 2, classes})))
    order = data.draw(st.permutations(range(classes)))
    indices = np.asarray(order[:k])[None, :].repeat(s.shape[0], 0)
    s_j, s_r = rounded(s, dtype)
    values_j, values_r = rounded(np.take_along_axis(t, indices, axis=-1), dtype)
    got = losses.kd_kl_topk(s_j, values_j, jnp.asarray(indices, jnp.int32), temperature)
    assert_close(got, ref_kd_kl_topk(s_r, values_r, indices, temperature), logit_atol(temperature, s_r, values_r))


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(case=feature_cases(), reduction=st.sampled_from(["sum", "mean"]))
def test_fitnet_hint_matches_reference(dtype, case, reduction):
    s, _ = case
    t = np.random.default_rng(0).normal(size=s.shape)
    s_j, s_r = rounded(s, dtype)
    t_j, t_r = rounded(t, dtype)
    got = losses.fitnet_hint(s_j, t_j, reduction=reduction)
    assert_close(got, ref_fitnet(s_r, t_r, reduction), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(case=feature_cases(), p=st.sampled_from([1, 2, 3, 2.5]), squared=st.booleans())
def test_attention_transfer_matches_reference(dtype, case, p, squared):
    s, t = case
    s_j, s_r = rounded(s, dtype)
    t_j, t_r = rounded(t, dtype)
    got = losses.attention_transfer(s_j, t_j, p, squared=squared)
    assert_close(got, ref_attention(s_r, t_r, p, squared), atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(case=feature_cases())
def test_similarity_preserving_matches_reference(dtype, case):
    s, t = case
    s_j, s_r = rounded(s, dtype)
    t_j, t_r = rounded(t, dtype)
    diff = ref_similarity_gram_diff(s_r, t_r)
    batch = s.shape[0]
    got = losses.similarity_preserving(s_j, t_j)
    assert_close(got, np.sum(diff**2, axis=1) / batch, atol=1e-5, rtol=1e-4)
    # The mean of the per-example terms is the paper's 1/b^2 ||G_t - G_s||_F^2.
    np.testing.assert_allclose(losses.masked_mean(got), np.sum(diff**2) / batch**2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 6),
    margin=st.sampled_from([0.0, 0.1, -0.1, 1.0]),
)
def test_teacher_bounded_l2_matches_reference(dtype, seed, rows, margin):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(2, rows, 4))
    s_j, s_r = rounded(y + rng.normal(size=y.shape) * 0.5, dtype)
    t_j, t_r = rounded(y + rng.normal(size=y.shape) * 0.5, dtype)
    y_j, y_r = rounded(y, dtype)
    got = np.asarray(losses.teacher_bounded_l2(s_j, t_j, y_j, margin), np.float64)
    want, d_s, d_t = ref_teacher_bounded(s_r, t_r, y_r, margin)
    assert got.shape == (2, rows)
    # Where d_s + m and d_t agree to float32 rounding either branch is a correct answer.
    tie = np.abs(d_s + margin - d_t) <= 1e-5 * (1 + d_s + d_t)
    np.testing.assert_allclose(got[~tie], want[~tie], rtol=1e-5, atol=1e-6)
    assert np.all(np.isclose(got[tie], 0.0) | np.isclose(got[tie], d_s[tie], rtol=1e-5))


def test_teacher_bounded_l2_is_zero_only_when_student_beats_teacher_by_margin():
    y = jnp.zeros((3, 4))
    s = jnp.array([[0.1, 0, 0, 0], [1.0, 0, 0, 0], [0.5, 0, 0, 0]])  # d_s = 0.01, 1, 0.25
    t = jnp.array([[0.5, 0, 0, 0], [0.5, 0, 0, 0], [0.5, 0, 0, 0]])  # d_t = 0.25
    np.testing.assert_allclose(losses.teacher_bounded_l2(s, t, y), [0.0, 1.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(losses.teacher_bounded_l2(s, t, y, margin=0.3), [0.01, 1.0, 0.25], rtol=1e-6)



def ref_smooth_l1(p, y, beta):
    """Loop reference in float64: Fast R-CNN's smooth-L1, summed over the last axis."""
    p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)
    out = np.zeros(p.shape[:-1])
    for index in np.ndindex(*p.shape[:-1]):
        total = 0.0
        for a, b in zip(p[index], y[index]):
            x = abs(a - b)
            total += 0.5 * x * x / beta if x < beta else x - 0.5 * beta
        out[index] = total
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 6), beta=st.sampled_from([0.0, 1.0 / 9, 0.5, 1.0, 3.0]))
def test_smooth_l1_matches_reference(dtype, seed, rows, beta):
    rng = np.random.default_rng(seed)
    p_j, p_r = rounded(rng.normal(size=(2, rows, 4)) * 2, dtype)
    y_j, y_r = rounded(rng.normal(size=(2, rows, 4)) * 2, dtype)
    got = losses.smooth_l1(p_j, y_j, beta)
    assert got.shape == (2, rows) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got, np.float64), ref_smooth_l1(p_r, y_r, beta), rtol=1e-5, atol=1e-6)


def test_smooth_l1_hand_values_mask_and_errors():
    p = jnp.array([[0.5, 2.0, 0.0, 0.0], [jnp.nan, 0.0, 0.0, 0.0]])
    got = losses.smooth_l1(p, jnp.zeros((2, 4)), where=jnp.array([True, False]))
    np.testing.assert_allclose(got, [0.125 + 1.5, 0.0])  # the masked NaN row gives exactly 0
    np.testing.assert_allclose(losses.smooth_l1(p[:1], jnp.zeros((1, 4)), beta=0.0), [2.5])  # L1
    g = jax.grad(lambda x: losses.smooth_l1(x, jnp.zeros((2, 4)), where=jnp.array([True, False])).sum())(p)
    np.testing.assert_allclose(g, [[0.5, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match=r"pred \(2, 4\) and target \(3, 4\) must have the same shape"):
        losses.smooth_l1(jnp.zeros((2, 4)), jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        losses.smooth_l1(jnp.zeros((2, 4)), jnp.zeros((2, 4)), beta=-1.0)
    with pytest.raises(TypeError, match="pred must be a floating-point array"):
        losses.smooth_l1(jnp.zeros((2, 4), jnp.int32), jnp.zeros((2, 4)))

@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from([(5,), (3, 4), (2, 1, 3)]))
def test_masked_mean_matches_reference(seed, shape):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=shape)
    keep = rng.random(size=shape) < 0.6
    got = losses.masked_mean(jnp.asarray(values, jnp.float32), jnp.asarray(keep))
    want = np.sum(values * keep) / max(np.sum(keep), 1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got.dtype == jnp.float32 and got.shape == ()
    unmasked = losses.masked_mean(jnp.asarray(values, jnp.float32))
    np.testing.assert_allclose(unmasked, np.mean(values), rtol=1e-5, atol=1e-6)


def test_masked_mean_all_masked_is_zero_with_zero_gradient():
    values = jnp.array([1.0, jnp.nan, jnp.inf])
    where = jnp.zeros(3, bool)
    assert float(losses.masked_mean(values, where)) == 0.0
    grad = jax.grad(losses.masked_mean)(values, where)
    np.testing.assert_array_equal(grad, np.zeros(3))
    row_mask = jnp.array([True, False])
    got = losses.masked_mean(jnp.array([[1.0, 3.0], [jnp.nan, 7.0]]), row_mask[:, None])
    assert float(got) == 2.0
    assert losses.masked_mean(jnp.ones(4, jnp.bfloat16)).dtype == jnp.float32


# ----------------------------------------------------------------------------------------------------------
# Gradients.


@functools.cache
def _summed_grad(loss):
    """jit(grad(sum(loss))) wrt the first argument, one compilation per shape (eager grad recompiles)."""
    return jax.jit(jax.grad(lambda *args: jnp.sum(loss(*args))))


@SETTINGS
@given(case=logit_cases())
def test_kd_kl_gradient_is_t_times_probability_gap(case):
    s, t, _, temperature = case
    s_j, t_j = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
    grad = _summed_grad(losses.kd_kl)(s_j, t_j, temperature)
    want = temperature * (softmax(s / temperature, axis=-1) - softmax(t / temperature, axis=-1))
    np.testing.assert_allclose(grad, want, atol=16 * F32_EPS * temperature * (1 + np.abs(s).max() / temperature))
    grad_ce = _summed_grad(losses.soft_cross_entropy)(s_j, t_j, temperature)
    np.testing.assert_allclose(grad_ce, grad, atol=16 * F32_EPS * temperature)


@SETTINGS
@given(case=logit_cases())
def test_kd_kl_is_zero_when_logits_agree(case):
    s, _, _, temperature = case
    s_j = jnp.asarray(s, jnp.float32)
    np.testing.assert_array_equal(losses.kd_kl(s_j, s_j, temperature), np.zeros(s.shape[0]))
    # A per-row shift leaves the softmax unchanged.
    shifted = s_j + jnp.asarray(np.arange(s.shape[0]) * 3.0, jnp.float32)[:, None]
    np.testing.assert_allclose(losses.kd_kl(s_j, shifted, temperature), 0.0, atol=logit_atol(temperature, s, s + 9))


def test_hinton_kd_gradient_combines_kd_and_label_gradients():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(3, 5)) * 2, rng.normal(size=(3, 5)) * 2
    labels = np.array([0, 4, 2])
    temperature, alpha = 3.0, 0.7
    s_j, t_j = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
    grad = _summed_grad(losses.hinton_kd)(s_j, t_j, labels, temperature, alpha)
    kd_grad = temperature * (softmax(s / temperature, axis=-1) - softmax(t / temperature, axis=-1))
    ce_grad = softmax(s, axis=-1) - np.eye(5)[labels]
    np.testing.assert_allclose(grad, alpha * kd_grad + (1 - alpha) * ce_grad, atol=1e-6)


def numeric_grad(f, x, h=1e-6):
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[i] = h
        grad[i] = (f(x + step) - f(x - step)) / (2 * h)
    return grad


def _grad_cases():
    rng = np.random.default_rng(7)
    s, t = rng.normal(size=(3, 5)) * 2, rng.normal(size=(3, 5)) * 2
    labels = np.array([1, 0, 4])
    weights = np.array([1.5, 1.0, 0.5, 2.0, 1.0])
    idx = np.argsort(-t, axis=-1)[:, :3]
    fs, ft = rng.normal(size=(3, 2, 3, 4)), rng.normal(size=(3, 2, 3, 2))
    y = rng.normal(size=(3, 4))
    box_s, box_t = y + rng.normal(size=y.shape), y + rng.normal(size=y.shape) * 0.8
    return {
        "dkd": (s, lambda x: losses.dkd(x, t, labels, 1.0, 8.0, 4.0), lambda x: ref_dkd(x, t, labels, 1.0, 8.0, 4.0)),
        "class_weighted": (
            s,
            lambda x: losses.class_weighted_soft_cross_entropy(x, t, weights, 2.0),
            lambda x: ref_soft_ce(x, t, 2.0, weights),
        ),
        "topk": (
            s,
            lambda x: losses.kd_kl_topk(x, np.take_along_axis(t, idx, -1), idx, 2.0),
            lambda x: ref_kd_kl_topk(x, np.take_along_axis(t, idx, -1), idx, 2.0),
        ),
        "logit_mse": (s, lambda x: losses.logit_mse(x, t), lambda x: 0.5 * np.sum((x - t) ** 2, -1)),
        "fitnet": (fs, lambda x: losses.fitnet_hint(x, fs[::-1]), lambda x: ref_fitnet(x, fs[::-1], "sum")),
        "attention": (fs, lambda x: losses.attention_transfer(x, ft), lambda x: ref_attention(x, ft, 2, False)),
        "attention_p3_squared": (
            fs,
            lambda x: losses.attention_transfer(x, ft, 3, squared=True),
            lambda x: ref_attention(x, ft, 3, True),
        ),
        "similarity": (
            fs,
            lambda x: losses.similarity_preserving(x, ft),
            lambda x: np.sum(ref_similarity_gram_diff(x, ft) ** 2, axis=1) / 3,
        ),
        "teacher_bounded": (
            box_s,
            lambda x: losses.teacher_bounded_l2(x, box_t, y, 0.1),
            lambda x: ref_teacher_bounded(x, box_t, y, 0.1)[0],
        ),
        "smooth_l1": (box_s, lambda x: losses.smooth_l1(x, box_t, 0.5), lambda x: ref_smooth_l1(x, box_t, 0.5)),
    }


GRAD_CASES = _grad_cases()


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_gradient_matches_finite_differences_of_reference(name):
    x, loss, reference = GRAD_CASES[name]
    got = jax.jit(jax.grad(lambda v: jnp.sum(loss(v))))(jnp.asarray(x, jnp.float32))
    want = numeric_grad(lambda v: np.sum(reference(v)), x)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-5 * (1 + np.abs(want).max()))


def test_attention_transfer_degenerate_maps():
    _, _, _, fs, ft = _inputs()
    # Identical maps: loss 0 with a finite (zero) subgradient for the non-squared norm.
    same = ft[..., :2] * 2.0  # channel count and scale differ, attention map is the same up to scale
    same_map = jnp.concatenate([same, same], axis=-1)
    np.testing.assert_allclose(losses.attention_transfer(same, same_map), 0.0, atol=1e-6)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(losses.attention_transfer(x, x))))(fs)
    np.testing.assert_array_equal(grad, 0.0)
    # An all-zero map is the zero vector: the distance to a unit vector is 1.
    zeros = jnp.zeros_like(fs)
    np.testing.assert_allclose(losses.attention_transfer(zeros, ft), 1.0, rtol=1e-6)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(losses.attention_transfer(x, ft))))(zeros)
    assert np.all(np.isfinite(grad))


# ----------------------------------------------------------------------------------------------------------
# Peer conventions: the pooling that matches RepDistiller/mdistiller's attention transfer, and
# fitnet_hint's reduction keyword (formerly normalize).


def ref_adaptive_avg_pool2d(x, size):
    """PyTorch's ``F.adaptive_avg_pool2d`` on NCHW ``x``, in float64 NumPy: output cell ``(i, j)`` averages
    input rows ``floor(i H / h) .. ceil((i + 1) H / h) - 1`` and the same columns for ``W / w``."""
    (h, w), (height, width) = size, x.shape[2:]
    out = np.empty(x.shape[:2] + (h, w))
    for i in range(h):
        rows = slice(i * height // h, -(-(i + 1) * height // h))
        for j in range(w):
            cols = slice(j * width // w, -(-(j + 1) * width // w))
            out[:, :, i, j] = x[:, :, rows, cols].mean(axis=(2, 3))
    return out


def _block_mean(x, h, w):
    """The pooling the attention_transfer error message suggests, for NHWC ``x``."""
    b, height, width, c = x.shape
    return x.reshape(b, h, height // h, w, width // w, c).mean(axis=(2, 4))


@pytest.mark.parametrize("size", [(4, 4), (2, 2), (4, 2)])
def test_suggested_pooling_matches_the_peers_adaptive_avg_pool_and_default_resize_does_not(size):
    h, w = size
    x_nchw = np.random.default_rng(7).normal(size=(2, 3, 8, 8))  # a PyTorch-layout feature map
    want = ref_adaptive_avg_pool2d(x_nchw, size).transpose(0, 2, 3, 1)  # to kdjax's NHWC
    x = jnp.asarray(x_nchw.transpose(0, 2, 3, 1), jnp.float32)
    out_shape = (2, h, w, 3)
    np.testing.assert_allclose(_block_mean(x, h, w), want, atol=1e-6)
    flax_linen = pytest.importorskip("flax.linen")
    window = (8 // h, 8 // w)
    np.testing.assert_allclose(flax_linen.avg_pool(x, window, strides=window), want, atol=1e-6)
    # The trap: jax.image.resize's defaults (linear, antialias=True) blend neighbouring blocks; here
    # that is 37-42% off in relative L2 norm (about 0.42, 0.40, 0.37 for the three sizes).
    default = np.asarray(jax.image.resize(x, out_shape, "linear"), np.float64)
    assert np.linalg.norm(default - want) / np.linalg.norm(want) > 0.3
    # antialias=False samples between the two middle pixels of each block: the block mean only when halving.
    no_antialias = np.asarray(jax.image.resize(x, out_shape, "linear", antialias=False), np.float64)
    if window == (2, 2):
        np.testing.assert_allclose(no_antialias, want, atol=1e-6)
    else:
        assert np.linalg.norm(no_antialias - want) / np.linalg.norm(want) > 0.3
    # The attention loss against a smaller student map inherits the difference.
    student = np.random.default_rng(8).normal(size=out_shape)
    pooled_loss = losses.attention_transfer(jnp.asarray(student, jnp.float32), _block_mean(x, h, w))
    assert_close(pooled_loss, ref_attention(student, want, 2, False), atol=1e-6, rtol=1e-5)
    resized_loss = np.asarray(losses.attention_transfer(jnp.asarray(student, jnp.float32), default))
    assert np.max(np.abs(resized_loss - pooled_loss)) > 1e-2


def test_fitnet_hint_reduction_keyword_and_deprecated_normalize():
    s, t = (jnp.asarray(np.random.default_rng(k).normal(size=(3, 2, 2, 4)), jnp.float32) for k in (1, 2))
    s_r, t_r = np.asarray(s, np.float64), np.asarray(t, np.float64)
    by_sum, by_mean = losses.fitnet_hint(s, t, reduction="sum"), losses.fitnet_hint(s, t, reduction="mean")
    assert_close(by_sum, ref_fitnet(s_r, t_r, "sum"), atol=1e-6)
    assert_close(by_mean, ref_fitnet(s_r, t_r, "mean"), atol=1e-6)
    np.testing.assert_array_equal(losses.fitnet_hint(s, t), by_sum)  # the default is the paper's sum
    for normalize, new, reduction in ((True, by_mean, "mean"), (False, by_sum, "sum")):
        message = rf"fitnet_hint\(normalize=\.\.\.\) is deprecated.*reduction='{reduction}'"
        with pytest.warns(DeprecationWarning, match=message) as record:
            old = losses.fitnet_hint(s, t, normalize=normalize)
        assert record[0].filename == __file__  # attributed to the caller's line
        np.testing.assert_array_equal(old, new)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new keyword never warns
        losses.fitnet_hint(s, t, reduction="mean")
    with pytest.raises(TypeError, match=r"both reduction='mean' and the deprecated normalize=True"):
        losses.fitnet_hint(s, t, reduction="mean", normalize=True)
    with pytest.raises(TypeError, match=r"both reduction='sum' and the deprecated normalize=False"):
        losses.fitnet_hint(s, t, reduction="sum", normalize=False)
    with pytest.raises(ValueError, match=r"reduction must be 'sum' .* or 'mean' .*got 'avg'"):
        losses.fitnet_hint(s, t, reduction="avg")


def test_recipe_hint_reduction_keyword_and_deprecated_normalize():
    from kdjax import recipe
    from kdjax.teachers import TeacherOutput

    s, t = (jnp.asarray(np.random.default_rng(k).normal(size=(3, 2, 2, 4)), jnp.float32) for k in (3, 4))
    student = recipe.StudentOutput(jnp.zeros((3, 5)), {"s": s})
    teacher = TeacherOutput(features={"t": t})
    batch = {"mask": jnp.array([True, True, False])}

    def value(term):
        return np.asarray(term.loss(student, teacher, batch, 0))

    by_mean = value(recipe.hint("s", "t", reduction="mean"))
    by_sum = value(recipe.hint("s", "t", reduction="sum"))
    np.testing.assert_array_equal(by_mean, losses.fitnet_hint(s, t, batch["mask"], reduction="mean"))
    np.testing.assert_array_equal(by_sum, losses.fitnet_hint(s, t, batch["mask"]))
    np.testing.assert_array_equal(value(recipe.hint("s", "t")), by_sum)
    for normalize, new, reduction in ((True, by_mean, "mean"), (False, by_sum, "sum")):
        message = rf"recipe\.hint\(normalize=\.\.\.\) is deprecated.*reduction='{reduction}'"
        with pytest.warns(DeprecationWarning, match=message) as record:
            term = recipe.hint("s", "t", 1.0, normalize)  # positional, as it used to be passed
        assert record[0].filename == __file__
        np.testing.assert_array_equal(value(term), new)
    with pytest.raises(TypeError, match=r"recipe\.hint got both reduction='mean' and the deprecated normalize"):
        recipe.hint("s", "t", normalize=True, reduction="mean")
    with pytest.raises(ValueError, match=r"reduction must be 'sum'.*got 'none'"):
        recipe.hint("s", "t", reduction="none")


# ----------------------------------------------------------------------------------------------------------
# jit / vmap / leading axes.


def _all_losses(s, t, labels, fs, ft):
    idx = jnp.argsort(-t, axis=-1)[..., :3]
    return {
        "kd_kl": lambda T, w: losses.kd_kl(s, t, T, where=w),
        "soft_cross_entropy": lambda T, w: losses.soft_cross_entropy(s, t, T, where=w),
        "cross_entropy": lambda T, w: losses.cross_entropy(s, labels, where=w),
        "hinton_kd": lambda T, w: losses.hinton_kd(s, t, labels, T, 0.3, where=w),
        "class_weighted": lambda T, w: losses.class_weighted_soft_cross_entropy(
            s, t, jnp.linspace(0.5, 1.5, s.shape[-1]), T, where=w
        ),
        "logit_mse": lambda T, w: losses.logit_mse(s, t, where=w),
        "dkd": lambda T, w: losses.dkd(s, t, labels, 1.0, 8.0, T, where=w),
        "kd_kl_topk": lambda T, w: losses.kd_kl_topk(s, jnp.take_along_axis(t, idx, -1), idx, T, where=w),
        "kd_kl_topk_bound": lambda T, w: losses.kd_kl_topk_bound(s, t, idx, T, where=w),
        "fitnet_hint": lambda T, w: losses.fitnet_hint(fs, fs * 0.5, where=w),
        "attention_transfer": lambda T, w: losses.attention_transfer(fs, ft, where=w),
        "teacher_bounded_l2": lambda T, w: losses.teacher_bounded_l2(s[..., :4], t[..., :4], s[..., :4] * 0.9, where=w),
        "smooth_l1": lambda T, w: losses.smooth_l1(s[..., :4], t[..., :4], 0.5, where=w),
    }


def _inputs(batch=4, classes=6, seed=3):
    rng = np.random.default_rng(seed)
    s = jnp.asarray(rng.normal(size=(batch, classes)) * 3, jnp.float32)
    t = jnp.asarray(rng.normal(size=(batch, classes)) * 3, jnp.float32)
    labels = jnp.asarray(rng.integers(0, classes, size=batch), jnp.int32)
    fs = jnp.asarray(rng.normal(size=(batch, 3, 3, 2)), jnp.float32)
    ft = jnp.asarray(rng.normal(size=(batch, 3, 3, 5)), jnp.float32)
    return s, t, labels, fs, ft


LOSS_NAMES = sorted(_all_losses(*_inputs()))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_jit_with_traced_temperature_and_mask_matches_eager(name):
    s, t, labels, fs, ft = _inputs()
    where = jnp.array([True, False, True, True])

    def run(s, t, labels, fs, ft, temperature, where):
        return _all_losses(s, t, labels, fs, ft)[name](temperature, where)

    eager = run(s, t, labels, fs, ft, 2.5, where)
    jitted = jax.jit(run)(s, t, labels, fs, ft, jnp.float32(2.5), where)
    assert jitted.shape == (4,) and jitted.dtype == jnp.float32
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)
    assert float(eager[1]) == 0.0


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_mask_zeroes_examples_and_their_gradients_even_with_nan_inputs(name):
    s, t, labels, fs, ft = _inputs()
    where = jnp.array([True, False, True, False])
    full = _all_losses(s, t, labels, fs, ft)[name](2.0, None)
    # Poison the masked rows: NaN / inf inputs and an invalid label must not leak.
    poison = jnp.array([False, True, False, True])
    s_bad = jnp.where(poison[:, None], jnp.nan, s)
    t_bad = jnp.where(poison[:, None], jnp.inf, t)
    labels_bad = jnp.where(poison, -7, labels)
    fs_bad = jnp.where(poison[:, None, None, None], jnp.nan, fs)

    def masked(s_in, fs_in):
        return _all_losses(s_in, t_bad, labels_bad, fs_in, ft)[name](2.0, where)

    out = masked(s_bad, fs_bad)
    np.testing.assert_allclose(out, jnp.where(where, full, 0.0), rtol=1e-6, atol=1e-7)
    grad_s, grad_fs = jax.jit(jax.grad(lambda a, b: jnp.sum(masked(a, b)), argnums=(0, 1)))(s_bad, fs_bad)
    for grad in (grad_s, grad_fs):
        assert np.all(np.isfinite(grad))
        np.testing.assert_array_equal(np.asarray(grad)[~np.asarray(where)], 0.0)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_vmap_over_an_extra_axis_matches_per_slice_calls(name):
    stacks = [_inputs(seed=seed) for seed in range(3)]
    stacked = [jnp.stack(parts) for parts in zip(*stacks)]

    def run(s, t, labels, fs, ft):
        return _all_losses(s, t, labels, fs, ft)[name](2.0, None)

    batched = jax.jit(jax.vmap(run))(*stacked)
    per_slice = jnp.stack([run(*parts) for parts in stacks])
    np.testing.assert_allclose(batched, per_slice, rtol=1e-5, atol=1e-6)


def test_logit_losses_accept_extra_leading_axes():
    rng = np.random.default_rng(0)
    s = jnp.asarray(rng.normal(size=(2, 3, 7)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(2, 3, 7)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 7, size=(2, 3)))
    where = jnp.array([[True, False, True], [True, True, False]])
    got = jax.jit(losses.kd_kl)(s, t, 2.0, where=where)
    want = ref_kd_kl(np.asarray(s, np.float64), np.asarray(t, np.float64), 2.0) * np.asarray(where)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    got_ce = jax.jit(losses.cross_entropy)(s, labels, where=jnp.array([[False], [True]]))  # broadcasts
    np.testing.assert_allclose(got_ce[1], ref_ce(np.asarray(s[1], np.float64), np.asarray(labels[1])), rtol=1e-5)
    np.testing.assert_array_equal(got_ce[0], 0.0)


def test_similarity_preserving_masked_equals_the_unmasked_sub_batch():
    _, _, _, fs, ft = _inputs()
    where = jnp.array([True, False, True, True])
    fs_bad = jnp.where(~where[:, None, None, None], jnp.nan, fs)
    sp = jax.jit(losses.similarity_preserving)
    got = sp(fs_bad, ft, where=where)
    sub = sp(fs[where], ft[where])
    np.testing.assert_allclose(np.asarray(got)[np.asarray(where)], sub, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(got)[~np.asarray(where)], 0.0)
    np.testing.assert_allclose(losses.masked_mean(got, where), jnp.mean(sub), rtol=1e-5)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(losses.similarity_preserving(x, ft, where=where))))(fs_bad)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(np.asarray(grad)[~np.asarray(where)], 0.0)


# ----------------------------------------------------------------------------------------------------------
# Numerical robustness.


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_1e4_magnitude_logits_give_finite_loss_and_gradient(name):
    s, t, labels, fs, ft = _inputs()
    s, t, fs, ft = s * 1e4, t * 1e4, fs * 1e4, ft * 1e4

    def total(s_in, fs_in):
        return jnp.sum(_all_losses(s_in, t, labels, fs_in, ft)[name](1.0, None))

    value = total(s, fs)
    grads = jax.jit(jax.grad(total, argnums=(0, 1)))(s, fs)
    assert np.isfinite(float(value))
    for grad in grads:
        assert np.all(np.isfinite(grad))


def test_1e4_magnitude_kd_kl_matches_reference():
    rng = np.random.default_rng(5)
    s, t = rng.normal(size=(4, 8)) * 1e4, rng.normal(size=(4, 8)) * 1e4
    s32, t32 = np.float32(s).astype(np.float64), np.float32(t).astype(np.float64)
    for temperature in (1.0, 4.0):
        got = losses.kd_kl(jnp.asarray(s32, jnp.float32), jnp.asarray(t32, jnp.float32), temperature)
        np.testing.assert_allclose(got, ref_kd_kl(s32, t32, temperature), rtol=1e-5)


def test_minus_inf_logits_leave_classes_out():
    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
    labels = np.array([0, 3, 1])
    s_pad = jnp.asarray(np.concatenate([s, np.full((3, 2), -np.inf)], axis=1), jnp.float32)
    t_pad = jnp.asarray(np.concatenate([t, np.full((3, 2), -np.inf)], axis=1), jnp.float32)
    weights = np.array([1.5, 1, 1, 1, 1, 1, 1, 1])
    idx = np.argsort(-t, axis=-1)[:, :3]
    cases = [
        (lambda a, T=2.0: losses.kd_kl(a, t_pad, T), ref_kd_kl(s, t, 2.0)),
        (lambda a, T=2.0: losses.soft_cross_entropy(a, t_pad, T), ref_soft_ce(s, t, 2.0)),
        (lambda a, T=2.0: losses.class_weighted_soft_cross_entropy(a, t_pad, weights, T),
         ref_soft_ce(s, t, 2.0, weights[:6])),
        (lambda a: losses.cross_entropy(a, labels), ref_ce(s, labels)),
        (lambda a, T=4.0: losses.dkd(a, t_pad, labels, 1.0, 8.0, T), ref_dkd(s, t, labels, 1.0, 8.0, 4.0)),
        (lambda a: losses.logit_mse(a, t_pad), 0.5 * np.sum((s - t) ** 2, -1)),
        (lambda a, T=2.0: losses.kd_kl_topk(a, np.take_along_axis(t, idx, -1), idx, T),
         ref_kd_kl_topk(s, np.take_along_axis(t, idx, -1), idx, 2.0)),
    ]
    for loss, want in cases:
        np.testing.assert_allclose(loss(s_pad), want, rtol=1e-5, atol=1e-6)
        grad = jax.jit(jax.grad(lambda a: jnp.sum(loss(a))))(s_pad)
        assert np.all(np.isfinite(grad))
        np.testing.assert_array_equal(grad[:, 6:], 0.0)
    # The gradient with respect to the temperature (learned temperatures) ignores the padding too.
    trimmed = {"kd_kl": lambda T: losses.kd_kl(s_pad[:, :6], t_pad[:, :6], T),
               "dkd": lambda T: losses.dkd(s_pad[:, :6], t_pad[:, :6], labels, 1.0, 8.0, T)}
    for name, (loss, temperature) in {"kd_kl": (cases[0][0], 2.0), "dkd": (cases[4][0], 4.0)}.items():
        got = jax.grad(lambda T: jnp.sum(loss(s_pad, T)))(temperature)
        np.testing.assert_allclose(got, jax.grad(lambda T: jnp.sum(trimmed[name](T)))(temperature),
                                   rtol=1e-5, atol=1e-6)
    # The top-k bound: a tail class the teacher leaves out adds nothing to it.
    np.testing.assert_allclose(losses.kd_kl_topk_bound(s_pad, t_pad, idx, 2.0),
                               losses.kd_kl_topk_bound(s_pad[:, :6], t_pad[:, :6], idx, 2.0), rtol=1e-6)


def test_dkd_with_a_teacher_without_non_target_mass_is_its_tckd():
    """A teacher that puts -inf on every non-target class has no non-target distribution: NCKD is
    0 (its weight 1 - p_t,y in KD = TCKD + (1 - p_t,y) NCKD), and the loss and its gradient stay
    finite (they were NaN)."""
    s = np.array([[2.0, 1.0, 0.0], [0.5, -1.0, 3.0]])
    t = np.array([[3.0, -np.inf, -np.inf], [-np.inf, -np.inf, 1.0]])
    labels = np.array([0, 2])
    loss = lambda a: losses.dkd(a, jnp.asarray(t, jnp.float32), labels, alpha=1.0, beta=8.0, temperature=2.0)
    # TCKD alone: the teacher's binary distribution is [1, 0], so KL = -log b_s,target.
    z = s / 2.0
    want = 4.0 * -(z[[0, 1], labels] - logsumexp(z, axis=-1))
    np.testing.assert_allclose(loss(jnp.asarray(s, jnp.float32)), want, rtol=1e-5)
    assert np.all(np.isfinite(jax.grad(lambda a: jnp.sum(loss(a)))(jnp.asarray(s, jnp.float32))))


def test_attention_transfer_gradient_is_finite_for_p_below_one_at_zero_features():
    """ReLU features hold exact zeros, where d|A|^p/dA is infinite for p < 1: those entries
    contribute 0 (as |0|^p = 0) and a zero gradient instead of NaN; the value matches float64."""
    a = np.maximum(np.arange(-8.0, 10.0).reshape(1, 3, 3, 2), 0.0)
    b = a + 1.0
    for p in (0.5, 1.0, 2.0):
        loss = lambda x, p=p: losses.attention_transfer(x, jnp.asarray(b, jnp.float32), p)
        np.testing.assert_allclose(loss(jnp.asarray(a, jnp.float32)), ref_attention(a, b, p, False),
                                   rtol=1e-5)
        assert np.all(np.isfinite(jax.grad(lambda x: jnp.sum(loss(x)))(jnp.asarray(a, jnp.float32))))


def test_out_of_range_labels_and_indices_give_nan_under_jit():
    s, t, labels, _, _ = _inputs()
    bad = labels.at[2].set(6)
    out = np.asarray(jax.jit(losses.cross_entropy)(s, bad))
    np.testing.assert_array_equal(np.isnan(out), [False, False, True, False])
    out = np.asarray(jax.jit(losses.dkd)(s, t, bad.at[0].set(-1)))
    np.testing.assert_array_equal(np.isnan(out), [True, False, True, False])
    idx = jnp.argsort(-t, axis=-1)[:, :3].at[1, 0].set(17)
    out = np.asarray(jax.jit(losses.kd_kl_topk)(s, jnp.take_along_axis(t, jnp.clip(idx, 0, 5), -1), idx))
    np.testing.assert_array_equal(np.isnan(out), [False, True, False, False])
    # A class repeated within a row (eagerly a ValueError) would be weighed twice: NaN for that row.
    idx = jnp.argsort(-t, axis=-1)[:, :3]
    idx = idx.at[3, 2].set(idx[3, 0])
    out = np.asarray(jax.jit(losses.kd_kl_topk)(s, jnp.take_along_axis(t, idx, -1), idx))
    np.testing.assert_array_equal(np.isnan(out), [False, False, False, True])


# ----------------------------------------------------------------------------------------------------------
# Top-k teachers: equality at k = C and the documented bound for k < C.


@SETTINGS
@given(case=logit_cases(), seed=st.integers(0, 2**32 - 1))
def test_kd_kl_topk_equals_kd_kl_when_k_is_c(case, seed):
    s, t, _, temperature = case
    s_j, t_j = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
    perm = np.random.default_rng(seed).permuted(np.tile(np.arange(s.shape[-1]), (s.shape[0], 1)), axis=1)
    values = np.take_along_axis(np.asarray(t_j), perm, -1)
    got = losses.kd_kl_topk(s_j, values, jnp.asarray(perm, jnp.int32), temperature)
    atol = logit_atol(temperature, s, t)
    np.testing.assert_allclose(got, losses.kd_kl(s_j, t_j, temperature), rtol=1e-5, atol=atol)
    np.testing.assert_allclose(losses.kd_kl_topk_bound(s_j, t_j, perm, temperature), 0.0, atol=1e-7)


def _ref_topk_terms(s, t, idx, temperature):
    """float64: D = kd_kl - kd_kl_topk, tail mass eps, max tail -log p_s, binary entropy H(eps)."""
    topk = ref_kd_kl_topk(s, np.take_along_axis(t, idx, -1), idx, temperature)
    diff = ref_kd_kl(s, t, temperature) - topk
    tail = np.ones(s.shape, bool)
    np.put_along_axis(tail, idx, False, axis=-1)
    p_t = softmax(t / temperature, axis=-1)
    eps = np.sum(np.where(tail, p_t, 0.0), axis=-1)
    nll = np.max(np.where(tail, -log_softmax(s / temperature, axis=-1), 0.0), axis=-1)
    entropy = -(np.where(eps > 0, eps * np.log(np.where(eps > 0, eps, 1)), 0) + (1 - eps) * np.log1p(-eps))
    return diff, topk, eps, nll, entropy


@st.composite
def topk_cases(draw):
    s, t, _, temperature = draw(logit_cases(min_classes=3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # Teachers from flat to very peaked, and students that may starve the teacher's tail classes.
    t = t * draw(st.sampled_from([0.1, 1.0, 5.0]))
    if draw(st.booleans()):
        s = s - 40.0 * (rng.random(s.shape) < 0.5)
    k = draw(st.sampled_from(sorted({1, 2, s.shape[-1] - 1})))
    idx = np.argsort(-t, axis=-1, kind="stable")[:, :k]
    return s, t, idx, temperature


@SETTINGS
@given(case=topk_cases())
def test_topk_bound_derivation_holds_in_float64(case):
    """-(eps*topk + T^2 H) <= kd_kl - kd_kl_topk <= T^2 eps L - eps*topk - T^2 H, in exact-ish arithmetic."""
    s, t, idx, temperature = case
    diff, topk, eps, nll, entropy = _ref_topk_terms(s, t, idx, temperature)
    lower = -(eps * topk + temperature**2 * entropy)
    upper = temperature**2 * eps * nll + lower
    slack = 1e-9 * temperature**2 * (1 + np.abs(s).max() + np.abs(t).max())
    assert np.all(lower - slack <= diff), (lower, diff)
    assert np.all(diff <= upper + slack), (diff, upper)
    # The input-only bound on L quoted in the docstring.
    assert np.all(nll <= (s.max(-1) - s.min(-1)) / temperature + np.log(s.shape[-1]) + 1e-9)


@SETTINGS
@given(case=topk_cases())
def test_kd_kl_topk_agrees_with_kd_kl_within_documented_bound(case):
    s, t, idx, temperature = case
    s_j, t_j = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
    s64, t64 = np.asarray(s_j, np.float64), np.asarray(t_j, np.float64)
    bound = np.asarray(losses.kd_kl_topk_bound(s_j, t_j, idx, temperature), np.float64)
    diff, topk, eps, nll, entropy = _ref_topk_terms(s64, t64, idx, temperature)
    a = eps * topk + temperature**2 * entropy
    want = np.maximum(a, temperature**2 * eps * nll - a)
    np.testing.assert_allclose(bound, want, rtol=1e-4, atol=logit_atol(temperature, s64, t64))
    got_diff = np.asarray(losses.kd_kl(s_j, t_j, temperature), np.float64) - np.asarray(
        losses.kd_kl_topk(s_j, jnp.take_along_axis(t_j, idx, -1), idx, temperature), np.float64
    )
    assert np.all(np.abs(got_diff) <= bound + 2 * logit_atol(temperature, s64, t64))


def test_topk_bound_vanishes_as_the_teacher_tail_vanishes():
    rng = np.random.default_rng(4)
    s = jnp.asarray(rng.normal(size=(4, 10)), jnp.float32)
    t = rng.normal(size=(4, 10))
    idx = np.argsort(-t, axis=-1)[:, :3]
    previous = np.inf
    for gap in (0.0, 5.0, 10.0, 20.0):
        peaked = t.copy()
        np.put_along_axis(peaked, idx, np.take_along_axis(t, idx, -1) + gap, axis=-1)
        t_j = jnp.asarray(peaked, jnp.float32)
        bound = float(jnp.max(losses.kd_kl_topk_bound(s, t_j, idx, 1.0)))
        diff = jnp.abs(losses.kd_kl(s, t_j) - losses.kd_kl_topk(s, jnp.take_along_axis(t_j, idx, -1), idx))
        assert float(jnp.max(diff)) <= bound + 1e-5
        assert bound < previous
        previous = bound
    assert previous < 1e-6


def test_topk_difference_is_not_bounded_by_tail_mass_alone():
    """A student that starves a tail class inflates kd_kl but not kd_kl_topk; the bound tracks it via L."""
    t = jnp.array([[5.0, 4.0, 0.0, 0.0]])
    idx = jnp.array([[0, 1]])
    values = jnp.take_along_axis(t, idx, -1)
    eps = float(1 - jnp.sum(jax.nn.softmax(t)[0, :2]))
    diffs = []
    for starve in (0.0, 50.0, 500.0):
        s = jnp.array([[5.0, 4.0, -starve, 0.0]])
        diffs.append(float(losses.kd_kl(s, t)[0] - losses.kd_kl_topk(s, values, idx)[0]))
        bound = float(losses.kd_kl_topk_bound(s, t, idx)[0])
        assert abs(diffs[-1]) <= bound + 1e-5
    assert diffs[0] < diffs[1] < diffs[2]
    assert eps < 0.01 and diffs[-1] > 200 * eps  # grows without limit as the student starves class 2


# ----------------------------------------------------------------------------------------------------------
# Errors: every bad input names the argument, the shapes/values and the fix.

S4 = jnp.zeros((2, 4))
Y = jnp.array([0, 1])
F = jnp.zeros((2, 3, 3, 2))

ERROR_CASES = [
    (
        lambda: losses.kd_kl(jnp.zeros((2, 4), jnp.int32), S4),
        TypeError,
        r"student_logits must be a floating-point array.*int32.*astype",
    ),
    (lambda: losses.kd_kl(S4, jnp.zeros((2, 4), jnp.int8)), TypeError, "teacher_logits must be a floating-point"),
    (
        lambda: losses.kd_kl(S4, jnp.zeros((2, 5))),
        ValueError,
        r"teacher has 5 classes but the student has 4.*share the label space",
    ),
    (
        lambda: losses.kd_kl_topk(S4, jnp.zeros((2, 5)), jnp.zeros((2, 5), jnp.int32)),
        ValueError,
        "k=5 classes per row but the student has C=4",
    ),
    (lambda: losses.kd_kl(S4, jnp.zeros((3, 4))), ValueError, r"shape \(2, 4\) but teacher_logits has shape \(3, 4\)"),
    (lambda: losses.kd_kl(jnp.float32(1.0), jnp.float32(1.0)), ValueError, "class axis last"),
    (lambda: losses.kd_kl(S4, S4, 0.0), ValueError, "temperature must be a finite number > 0, got 0.0"),
    (lambda: losses.soft_cross_entropy(S4, S4, -2.0), ValueError, "temperature must be a finite number > 0, got -2.0"),
    (lambda: losses.kd_kl(S4, S4, float("nan")), ValueError, "temperature must be a finite number > 0"),
    (
        lambda: losses.kd_kl(S4, S4, jnp.ones(2)),
        ValueError,
        r"temperature must be a scalar, got an array of shape \(2,\)",
    ),
    (lambda: losses.kd_kl(S4, S4, "4"), TypeError, "temperature must be a real number, got '4'"),
    (lambda: losses.kd_kl(S4, S4, True), TypeError, "temperature must be a real number"),
    (lambda: losses.kd_kl(S4, S4, where=jnp.ones(2)), TypeError, r"where must be a bool array.*float32"),
    (
        lambda: losses.kd_kl(S4, S4, where=jnp.ones(3, bool)),
        ValueError,
        r"where has shape \(3,\) but the per-example loss has shape \(2,\)",
    ),
    (lambda: losses.kd_kl(S4, S4, where=jnp.ones((2, 4), bool)), ValueError, "class-axis mask is not supported.*-inf"),
    (lambda: losses.cross_entropy(S4, jnp.array([0.0, 1.0])), TypeError, "labels must be integer class indices"),
    (
        lambda: losses.cross_entropy(S4, jnp.array([0, 1, 2])),
        ValueError,
        r"labels has shape \(3,\).*must have shape \(2,\)",
    ),
    (lambda: losses.cross_entropy(S4, jnp.array([0, 4])), ValueError, r"labels must lie in \[0, 4\).*holds 4"),
    (
        lambda: losses.hinton_kd(S4, S4, jnp.array([-1, 0]), 2.0, 0.5),
        ValueError,
        r"labels must lie in \[0, 4\).*holds -1",
    ),
    (lambda: losses.hinton_kd(S4, S4, Y, 2.0, 1.5), ValueError, r"alpha must lie in \[0, 1\].*1.5"),
    (lambda: losses.dkd(S4, S4, jnp.array([0, 9])), ValueError, r"labels must lie in \[0, 4\)"),
    (lambda: losses.dkd(jnp.zeros((2, 1)), jnp.zeros((2, 1)), jnp.array([0, 0])), ValueError, "at least 2 classes"),
    (lambda: losses.dkd(S4, S4, Y, beta=-1.0), ValueError, "beta must be a finite weight >= 0"),
    (
        lambda: losses.class_weighted_soft_cross_entropy(S4, S4, jnp.ones(3)),
        ValueError,
        r"class_weights has shape \(3,\).*4 classes.*shape \(4,\)",
    ),
    (
        lambda: losses.class_weighted_soft_cross_entropy(S4, S4, jnp.array([1.0, -1.0, 1.0, 1.0])),
        ValueError,
        "class_weights must be finite and >= 0",
    ),
    (
        lambda: losses.kd_kl_topk(S4, jnp.zeros((2, 3)), jnp.zeros((2, 2), jnp.int32)),
        ValueError,
        r"teacher_topk_values has shape \(2, 3\) but teacher_topk_indices has shape \(2, 2\)",
    ),
    (
        lambda: losses.kd_kl_topk(S4, jnp.zeros((3, 2)), jnp.zeros((3, 2), jnp.int32)),
        ValueError,
        r"student's leading axes \(2,\)",
    ),
    (
        lambda: losses.kd_kl_topk(S4, jnp.zeros((2, 2)), jnp.zeros((2, 2))),
        TypeError,
        "teacher_topk_indices must be integer",
    ),
    (
        lambda: losses.kd_kl_topk(S4, jnp.zeros((2, 2)), jnp.array([[0, 1], [2, 4]])),
        ValueError,
        r"teacher_topk_indices must lie in \[0, 4\)",
    ),
    (
        lambda: losses.kd_kl_topk(S4, jnp.zeros((2, 2)), jnp.array([[0, 1], [2, 2]])),
        ValueError,
        "repeats a class within a row",
    ),
    (
        lambda: losses.kd_kl_topk_bound(S4, S4, jnp.zeros((3, 2), jnp.int32)),
        ValueError,
        r"teacher_topk_indices has shape \(3, 2\)",
    ),
    (
        lambda: losses.fitnet_hint(F, jnp.zeros((2, 3, 3, 5))),
        ValueError,
        r"student_features has shape \(2, 3, 3, 2\).*regressor",
    ),
    (lambda: losses.fitnet_hint(F, F, where=jnp.ones((2, 3), bool)), ValueError, r"where has shape \(2, 3\).*\(2,\)"),
    (
        lambda: losses.attention_transfer(F, jnp.zeros((2, 4, 4, 2))),
        ValueError,
        r"spatial \(3, 3\).*spatial \(4, 4\).*adaptive_avg_pool2d.*block mean.*"
        r"x\.reshape\(B, h, H // h, w, W // w, C\)\.mean\(axis=\(2, 4\)\).*jax\.image\.resize.*antialias=False",
    ),
    (lambda: losses.attention_transfer(jnp.zeros((2, 3)), jnp.zeros((2, 3))), ValueError, "at least one spatial axis"),
    (lambda: losses.attention_transfer(F, F, p=0), ValueError, "p must be a finite number > 0"),
    (lambda: losses.similarity_preserving(F, jnp.zeros((3, 5))), ValueError, "batch size 2.*has 3"),
    (
        lambda: losses.teacher_bounded_l2(jnp.zeros((3, 4)), jnp.zeros((3, 4)), jnp.zeros((2, 4))),
        ValueError,
        r"target_boxes \(2, 4\) must have the same shape",
    ),
    (
        lambda: losses.teacher_bounded_l2(jnp.zeros((3, 4)), jnp.zeros((3, 4)), jnp.zeros((3, 4)), float("inf")),
        ValueError,
        "margin must be finite",
    ),
    (lambda: losses.masked_mean(jnp.ones(3), jnp.ones(3)), TypeError, "where must be a bool array"),
    (
        lambda: losses.masked_mean(jnp.ones(3), jnp.ones(4, bool)),
        ValueError,
        r"where has shape \(4,\) but values has shape \(3,\)",
    ),
    (lambda: losses.masked_mean(jnp.ones(3, jnp.int32)), TypeError, "values must be a floating-point array"),
]


@pytest.mark.parametrize("index", range(len(ERROR_CASES)))
def test_bad_inputs_raise_clear_errors(index):
    call, error, match = ERROR_CASES[index]
    with pytest.raises(error, match=match):
        call()


def test_value_checks_skip_masked_rows():
    s, t, _, _, _ = _inputs()
    labels = jnp.array([2, -1, 5, 6])  # padding rows carry invalid labels
    where = jnp.array([True, False, True, False])
    out = losses.cross_entropy(s, labels, where=where)
    want = ref_ce(np.asarray(s, np.float64), np.array([2, 0, 5, 0])) * np.asarray(where)
    np.testing.assert_allclose(out, want, rtol=1e-5)
    idx = jnp.array([[0, 1, 2], [0, 0, 9], [3, 4, 5], [0, 0, 0]])  # invalid on padding rows
    values = jnp.take_along_axis(t, jnp.clip(idx, 0, 5), -1)
    out = losses.kd_kl_topk(s, values, idx, where=where)
    want = ref_kd_kl_topk(np.asarray(s, np.float64), np.asarray(values, np.float64), np.clip(idx, 0, 5), 1.0)
    np.testing.assert_allclose(out, want * np.asarray(where), rtol=1e-5)


def test_traced_temperature_and_alpha_are_not_checked_under_jit():
    # Under jit the values are unknown at trace time: no error, documented; concrete values are checked.
    out = jax.jit(losses.hinton_kd)(S4, S4, Y, jnp.float32(2.0), jnp.float32(0.5))
    np.testing.assert_allclose(out, 0.5 * np.log(4.0), rtol=1e-6)
