"""kdjax.detection.nms against a brute-force greedy NMS in NumPy float64 written here."""
import functools

import jax
import numpy as np
import pytest

from kdjax.detection import nms as N


def iou64(p, q):
    iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
    ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
    inter = iw * ih
    union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
    return inter / union if union > 0 else 0.0


def greedy_reference(boxes, scores, thr, score_thr=-np.inf, where=None, classes=None):
    """Textbook greedy NMS: visit by score (ties: lower index first), keep unless a kept box
    of the same class overlaps with IoU > thr."""
    boxes = np.asarray(boxes, np.float64)
    n = len(boxes)
    where = np.ones(n, bool) if where is None else where
    cands = [i for i in range(n) if where[i] and scores[i] > score_thr]
    cands.sort(key=lambda i: (-float(scores[i]), i))
    kept = []
    for i in cands:
        if all(iou64(boxes[i], boxes[j]) <= thr or (classes is not None and classes[i] != classes[j])
               for j in kept):
            kept.append(i)
    return kept


def random_case(rng, n):
    xy = rng.uniform(0, 60, (n, 2))
    wh = rng.uniform(5, 30, (n, 2))
    boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
    scores = rng.integers(0, 8, n).astype(np.float32) / 8  # few distinct values: many ties
    return boxes, scores


def check(got, valid, want, k):
    got, valid = np.asarray(got), np.asarray(valid)
    n_valid = min(k, len(want))
    assert valid.tolist() == [True] * n_valid + [False] * (k - n_valid)
    assert got[:n_valid].tolist() == want[:n_valid]
    assert (got[n_valid:] == 0).all()


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    boxes, scores = random_case(rng, 40)
    boxes[5] = boxes[3]
    scores[5] = scores[3]  # an exact duplicate with the same score: the lower index is kept
    thr = [0.3, 0.5, 0.7][seed % 3]
    want = greedy_reference(boxes, scores, thr)
    assert 3 in want and 5 not in want or 3 not in want
    for k in (5, 40):
        got, valid = jax.jit(N.nms, static_argnames="max_output")(boxes, scores, thr, max_output=k)
        check(got, valid, want, k)


def test_score_threshold_where_nan_and_classes():
    rng = np.random.default_rng(7)
    boxes, scores = random_case(rng, 30)
    scores[2] = np.nan
    where = rng.uniform(size=30) > 0.2
    classes = rng.integers(0, 3, 30)
    want = greedy_reference(boxes, np.nan_to_num(scores, nan=-np.inf), 0.1, score_thr=0.2, where=where,
                            classes=classes)
    got, valid = N.nms(boxes, scores, 0.1, 30, score_threshold=0.2, where=where, classes=classes)
    check(got, valid, want, 30)
    assert 2 not in np.asarray(got)[np.asarray(valid)]
    # per-class NMS in one call == plain NMS run on each class alone
    per_class = set()
    for c in range(3):
        per_class |= set(greedy_reference(boxes, np.nan_to_num(scores, nan=-np.inf), 0.1, score_thr=0.2,
                                          where=where & (classes == c)))
    assert set(want) == per_class
    assert len(want) > len(greedy_reference(boxes, np.nan_to_num(scores, nan=-np.inf), 0.1, score_thr=0.2,
                                            where=where))


def test_batched_equals_per_image():
    rng = np.random.default_rng(3)
    cases = [random_case(rng, 25) for _ in range(3)]
    boxes = np.stack([c[0] for c in cases])
    scores = np.stack([c[1] for c in cases])
    where = rng.uniform(size=(3, 25)) > 0.3
    batched = jax.jit(functools.partial(N.batched_nms, iou_threshold=0.5, max_output=10))
    got, valid = batched(boxes, scores, where=where)
    assert got.shape == valid.shape == (3, 10)
    for i in range(3):
        check(got[i], valid[i], greedy_reference(boxes[i], scores[i], 0.5, where=where[i]), 10)
    plain, plain_valid = N.batched_nms(boxes, scores, 0.5, 10)
    for i in range(3):
        check(plain[i], plain_valid[i], greedy_reference(boxes[i], scores[i], 0.5), 10)


def test_nothing_to_keep_and_errors():
    boxes = np.zeros((4, 4), np.float32)
    got, valid = N.nms(boxes, np.zeros(4, np.float32), 0.5, 3, score_threshold=0.5)
    assert not np.asarray(valid).any() and (np.asarray(got) == 0).all()
    with pytest.raises(ValueError, match="batched_nms"):
        N.nms(np.zeros((2, 4, 4), np.float32), np.zeros((2, 4), np.float32), 0.5, 3)
    with pytest.raises(ValueError, match="max_output"):
        N.nms(boxes, np.zeros(4, np.float32), 0.5, 0)
    with pytest.raises(TypeError, match="scores"):
        N.nms(boxes, np.zeros(4, np.int32), 0.5, 2)
    with pytest.raises(ValueError, match="classes"):
        N.nms(boxes, np.zeros(4, np.float32), 0.5, 2, classes=np.zeros(3, np.int32))


def test_inside_a_differentiated_function():
    # proposals picked by NMS from boxes that carry gradients (the indices themselves have none)
    rng = np.random.default_rng(4)
    boxes, scores = random_case(rng, 12)

    def picked_sum(b):
        idx, valid = N.nms(b, scores, 0.5, 4)
        return (b[idx].sum(-1) * valid).sum()

    g = np.asarray(jax.jit(jax.grad(picked_sum))(boxes))
    idx, valid = N.nms(boxes, scores, 0.5, 4)
    want = np.zeros_like(boxes)
    want[np.asarray(idx)[np.asarray(valid)]] = 1.0
    np.testing.assert_array_equal(g, want)
