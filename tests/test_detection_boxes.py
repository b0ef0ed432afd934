"""kdjax.detection.boxes against NumPy float64 references written here."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdjax.detection import boxes as B


def random_boxes(rng, n, size=100.0, min_side=0.5):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(min_side, size / 2, (n, 2))
    return np.concatenate([xy, xy + wh], -1)


def iou_reference(a, b):
    """Brute-force float64 IoU, one pair at a time."""
    out = np.zeros((len(a), len(b)))
    for i, p in enumerate(np.asarray(a, np.float64)):
        for j, q in enumerate(np.asarray(b, np.float64)):
            iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            inter = iw * ih
            union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
            out[i, j] = inter / union if union > 0 else 0.0
    return out


def test_iou_matches_brute_force():
    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, 13), random_boxes(rng, 9)
    b[0] = a[0]                       # identical -> 1
    b[1] = [500, 500, 510, 510]       # disjoint -> 0
    b[2] = [a[1, 2], a[1, 1], a[1, 2] + 5, a[1, 3]]  # touching edge -> 0
    b[3] = [3, 3, 3, 3]               # zero-size -> 0
    ref = iou_reference(a, b)
    got = np.asarray(B.iou_matrix(a.astype(np.float32), b.astype(np.float32)))
    assert got.shape == (13, 9)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert got[0, 0] == pytest.approx(1.0) and got[:, 1].max() == 0 and got[1, 2] == 0 and got[:, 3].max() == 0
    # Two zero-size boxes: union 0 -> 0, not NaN.
    z = np.zeros((1, 4), np.float32)
    assert float(B.iou_matrix(z, z)[0, 0]) == 0.0


def test_iou_batched_jit_vmap():
    rng = np.random.default_rng(1)
    a = np.stack([random_boxes(rng, 5) for _ in range(3)]).astype(np.float32)
    b = np.stack([random_boxes(rng, 4) for _ in range(3)]).astype(np.float32)
    batched = B.iou_matrix(a, b)
    via_vmap = jax.jit(jax.vmap(B.iou_matrix))(a, b)
    assert batched.shape == (3, 5, 4)
    np.testing.assert_allclose(batched, via_vmap, rtol=1e-6)
    for k in range(3):
        np.testing.assert_allclose(batched[k], iou_reference(a[k], b[k]), rtol=1e-5, atol=1e-6)


def encode_reference(g, a, w):
    g, a = np.asarray(g, np.float64), np.asarray(a, np.float64)
    aw, ah = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    gw, gh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
    ax, ay = a[:, 0] + aw / 2, a[:, 1] + ah / 2
    gx, gy = g[:, 0] + gw / 2, g[:, 1] + gh / 2
    return np.stack([w[0] * (gx - ax) / aw, w[1] * (gy - ay) / ah,
                     w[2] * np.log(gw / aw), w[3] * np.log(gh / ah)], -1)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), B.ROI_HEAD_WEIGHTS])
def test_encode_matches_reference_and_decode_inverts(weights):
    rng = np.random.default_rng(2)
    g, a = random_boxes(rng, 50), random_boxes(rng, 50)
    d = B.encode(g.astype(np.float32), a.astype(np.float32), weights)
    np.testing.assert_allclose(d, encode_reference(g, a, weights), rtol=1e-4, atol=1e-4)
    back = B.decode(d, a.astype(np.float32), weights)
    np.testing.assert_allclose(back, g, rtol=1e-4, atol=1e-3)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-50, 50), min_size=2, max_size=2), st.lists(st.floats(1, 60), min_size=2, max_size=2),
       st.lists(st.floats(-50, 50), min_size=2, max_size=2), st.lists(st.floats(1, 60), min_size=2, max_size=2))
def test_round_trip_hypothesis(g_xy, g_wh, a_xy, a_wh):
    # size ratios up to 60 stay under the decode clamp (1000 / 16 = 62.5), where decode is exact
    g = np.array([[*g_xy, g_xy[0] + g_wh[0], g_xy[1] + g_wh[1]]], np.float64)
    a = np.array([[*a_xy, a_xy[0] + a_wh[0], a_xy[1] + a_wh[1]]], np.float64)
    with jax.enable_x64(True):
        d = B.encode(jnp.asarray(g), jnp.asarray(a), B.ROI_HEAD_WEIGHTS)
        back = np.asarray(B.decode(d, jnp.asarray(a), B.ROI_HEAD_WEIGHTS))
    np.testing.assert_allclose(back, g, rtol=1e-9, atol=1e-9)


def test_decode_clamps_scale_and_jits():
    a = np.array([[0.0, 0.0, 16.0, 16.0]], np.float32)
    d = np.array([[0.0, 0.0, 100.0, -2.0]], np.float32)
    out = np.asarray(jax.jit(B.decode)(d, a))
    w, h = out[0, 2] - out[0, 0], out[0, 3] - out[0, 1]
    assert np.isfinite(out).all()
    assert w == pytest.approx(16 * 1000 / 16, rel=1e-5)     # clamped at log(1000/16)
    assert h == pytest.approx(16 * math.exp(-2.0), rel=1e-5)  # not clamped below
    # decode broadcasts one reference over a batch of deltas; grad is finite.
    many = jnp.zeros((3, 1, 4))
    assert B.decode(many, a).shape == (3, 1, 4)
    g = jax.grad(lambda x: B.decode(x, a).sum())(jnp.asarray(d))
    assert np.isfinite(np.asarray(g)).all()


def test_clip_to_image():
    b = np.array([[-5.0, 2.0, 30.0, 50.0], [40.0, 40.0, 60.0, 70.0]], np.float32)
    out = np.asarray(B.clip_to_image(b, height=32, width=36))
    np.testing.assert_array_equal(out, [[0, 2, 30, 32], [36, 32, 36, 32]])
    per_image = B.clip_to_image(np.stack([b, b]), height=np.array([[32.0], [100.0]]),
                                width=np.array([[36.0], [100.0]]))
    np.testing.assert_array_equal(per_image[1], [[0, 2, 30, 50], [40, 40, 60, 70]])


def test_area():
    np.testing.assert_allclose(B.box_area(np.array([[1.0, 2.0, 4.0, 7.0], [0, 0, 0, 3.0]])), [15.0, 0.0])


def test_validate_boxes_errors():
    good = np.array([[0.0, 0.0, 10.0, 10.0], [2.0, 3.0, 4.0, 5.0]], np.float32)
    assert B.validate_boxes(good, image_size=(10, 10)) is not None
    with pytest.raises(ValueError, match=r"gt\[1\].*x2 < x1"):
        B.validate_boxes(np.array([[0.0, 0, 1, 1], [5.0, 0, 4, 1]]), name="gt")
    with pytest.raises(ValueError, match="y2 < y1"):
        B.validate_boxes(np.array([[0.0, 3, 1, 1]]))
    with pytest.raises(ValueError, match="not finite"):
        B.validate_boxes(np.array([[0.0, np.nan, 1, 1]]))
    with pytest.raises(ValueError, match="outside the image"):
        B.validate_boxes(good, image_size=(8, 10))
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 4\]"):
        B.validate_boxes(np.zeros((3, 5)))
    with pytest.raises(TypeError, match="floating"):
        B.validate_boxes(np.zeros((3, 4), np.int32))
    # padding rows are not checked
    B.validate_boxes(np.array([[0.0, 0, 1, 1], [5.0, 0, 4, 1]]), where=np.array([True, False]))
    with pytest.raises(TypeError, match="traced"):
        jax.jit(B.validate_boxes)(good)


def test_shape_and_dtype_errors():
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        B.iou_matrix(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(TypeError, match="floating"):
        B.box_area(np.zeros((2, 4), np.int32))
    with pytest.raises(ValueError, match="same shape"):
        B.encode(np.ones((2, 4)), np.ones((3, 4)))
    with pytest.raises(ValueError, match="weights"):
        B.decode(np.ones((2, 4)), np.ones((2, 4)), weights=(1, 1, 0, 1))
