"""kdjax.detection.matching against a loop-by-loop NumPy version of Detectron2's Matcher and
subsample_labels rules, written here."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.detection import matching as M


def match_reference(iou, low, high, low_quality, gt_valid):
    # thresholds compared in the IoU's dtype (float32), as JAX and PyTorch compare with a Python float
    iou, low, high = np.asarray(iou, np.float32), np.float32(low), np.float32(high)
    m, n = iou.shape
    rows = [i for i in range(m) if gt_valid[i]]
    matched, labels, best = np.zeros(n, int), np.zeros(n, int), np.zeros(n, np.float32)
    if not rows:
        return matched, labels, best
    for j in range(n):
        i = max(rows, key=lambda r: (iou[r, j], -r))  # highest IoU, first row on ties
        matched[j], best[j] = i, iou[i, j]
        labels[j] = 1 if best[j] >= high else (0 if best[j] < low else -1)
    if low_quality:
        for i in rows:
            top = iou[i].max()
            if top > 0:
                for j in range(n):
                    if iou[i, j] == top:
                        labels[j] = 1
    return matched, labels, best


@pytest.mark.parametrize("low,high,low_quality", [(0.3, 0.7, True), (0.3, 0.7, False), (0.5, 0.5, False)])
def test_match_matches_reference(low, high, low_quality):
    rng = np.random.default_rng(0)
    iou = np.round(rng.uniform(0, 0.8, (5, 60)), 2).astype(np.float32)  # rounded: ties between rows
    iou[3] = np.minimum(iou[3], 0.2)   # a ground truth with only poor matches
    iou[3, 7] = iou[3, 9] = 0.25       # ... tied best: both become low-quality positives
    iou[:, 11] = 0.0                   # overlaps nothing
    gt_valid = np.array([True, True, False, True, True])
    got = jax.jit(functools.partial(M.match, low_threshold=low, high_threshold=high,
                                    allow_low_quality_matches=low_quality))(iou, gt_valid=gt_valid)
    want = match_reference(iou, low, high, low_quality, gt_valid)
    np.testing.assert_array_equal(got.matched_gt, want[0])
    np.testing.assert_array_equal(got.labels, want[1])
    np.testing.assert_allclose(got.iou, want[2], rtol=1e-6)
    assert got.labels[11] == 0 and 2 not in np.asarray(got.matched_gt)
    if low_quality:
        assert got.labels[7] == 1 and got.labels[9] == 1


def test_match_no_ground_truth_and_zero_overlap():
    iou = np.zeros((2, 4), np.float32)
    got = M.match(iou, 0.3, 0.7, True, gt_valid=np.array([False, False]))
    assert (np.asarray(got.labels) == 0).all() and (np.asarray(got.matched_gt) == 0).all()
    # a ground truth that overlaps nothing makes nothing positive, even with low-quality matches
    got = M.match(iou, 0.3, 0.7, True)
    assert (np.asarray(got.labels) == 0).all()
    got = M.match(np.zeros((0, 4), np.float32), 0.3, 0.7)
    assert got.labels.shape == (4,) and (np.asarray(got.labels) == 0).all()
    batched = jax.vmap(lambda q: M.match(q, 0.3, 0.7, True))(np.stack([iou + 0.8, iou]))
    assert batched.labels.shape == (2, 4) and np.asarray(batched.labels).tolist() == [[1] * 4, [0] * 4]


def check_sample(sample, labels, num_samples, fraction):
    labels = np.asarray(labels)
    idx, pos, valid, mask = (np.asarray(a) for a in sample)
    num_pos = min(int(num_samples * fraction), int((labels == 1).sum()))
    num_neg = min(num_samples - num_pos, int((labels == 0).sum()))
    assert pos.tolist() == [True] * num_pos + [False] * (num_samples - num_pos)
    assert valid.tolist() == [True] * (num_pos + num_neg) + [False] * (num_samples - num_pos - num_neg)
    chosen = idx[valid]
    assert len(set(chosen.tolist())) == len(chosen)               # without replacement
    assert (labels[idx[pos]] == 1).all() and (labels[idx[valid & ~pos]] == 0).all()
    assert (idx[~valid] == 0).all()
    want_mask = np.zeros(len(labels), bool)
    want_mask[chosen] = True
    np.testing.assert_array_equal(mask, want_mask)


@pytest.mark.parametrize("n_pos,n_neg,num_samples,fraction", [(10, 50, 16, 0.25), (2, 50, 16, 0.5),
                                                              (30, 3, 16, 0.5), (1, 2, 16, 0.5), (0, 5, 4, 0.5)])
def test_sample_counts_and_labels(n_pos, n_neg, num_samples, fraction):
    rng = np.random.default_rng(n_pos)
    labels = np.array([1] * n_pos + [0] * n_neg + [-1] * 7)
    rng.shuffle(labels)
    sample = jax.jit(M.sample_balanced, static_argnums=(2, 3))(jax.random.key(0), labels, num_samples, fraction)
    check_sample(sample, labels, num_samples, fraction)


def test_sample_deterministic_and_uniform():
    labels = np.array([1] * 4 + [0] * 6 + [-1] * 2)
    fn = jax.jit(jax.vmap(lambda k: M.sample_balanced(k, labels, 4, 0.5)))
    keys = jax.random.split(jax.random.key(1), 2000)
    a, b = fn(keys), fn(keys)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert not (np.asarray(a.indices) == np.asarray(a.indices)[0]).all()
    # each of the 4 positives is drawn with probability 2/4, each of the 6 negatives with 2/6
    freq = np.asarray(a.mask).mean(0)
    np.testing.assert_allclose(freq[:4], 0.5, atol=0.05)
    np.testing.assert_allclose(freq[4:10], 1 / 3, atol=0.05)
    assert freq[10:].max() == 0


def test_errors():
    with pytest.raises(ValueError, match="vmap"):
        M.match(np.zeros((2, 3, 4), np.float32), 0.3, 0.7)
    with pytest.raises(ValueError, match="low_threshold"):
        M.match(np.zeros((2, 3), np.float32), 0.7, 0.3)
    with pytest.raises(TypeError, match="floating"):
        M.match(np.zeros((2, 3), np.int32), 0.3, 0.7)
    with pytest.raises(ValueError, match="num_samples"):
        M.sample_balanced(jax.random.key(0), jnp.zeros(3, jnp.int32), 0, 0.5)
    with pytest.raises(ValueError, match="positive_fraction"):
        M.sample_balanced(jax.random.key(0), jnp.zeros(3, jnp.int32), 2, 1.5)
    with pytest.raises(ValueError, match="empty"):
        M.sample_balanced(jax.random.key(0), jnp.zeros(0, jnp.int32), 2, 0.5)
