"""kdjax.detection.roi_align against a loop-by-loop NumPy float64 RoIAlign written here from
torchvision's C++ kernel (roi_align_kernel.cpp: bilinear_interpolate and roi_align_forward)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kdjax.detection import roi_align as R

# jitted once per static configuration (eager dispatch compiles op by op: slow on a small CPU)
roi_align = jax.jit(R.roi_align, static_argnames=("output_size", "spatial_scale", "sampling_ratio", "aligned"))


def bilinear(f, y, x):
    """One sample of f [H, W, C] at (y, x), torchvision semantics."""
    h, w = f.shape[:2]
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return np.zeros(f.shape[-1])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    return hy * hx * f[y0, x0] + hy * lx * f[y0, x1] + ly * hx * f[y1, x0] + ly * lx * f[y1, x1]


def roi_align_reference(f, boxes, out, scale, g, aligned):
    f = np.asarray(f, np.float64)
    res = np.zeros((len(boxes), out, out, f.shape[-1]))
    off = 0.5 if aligned else 0.0
    for r, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, np.float64)):
        sx, sy = x1 * scale - off, y1 * scale - off
        rw, rh = x2 * scale - off - sx, y2 * scale - off - sy
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bw, bh = rw / out, rh / out
        for p in range(out):
            for q in range(out):
                acc = np.zeros(f.shape[-1])
                for i in range(g):
                    for j in range(g):
                        y = sy + p * bh + (i + 0.5) * bh / g
                        x = sx + q * bw + (j + 0.5) * bw / g
                        acc += bilinear(f, y, x)
                res[r, p, q] = acc / max(g * g, 1)
    return res


BOXES = np.array([
    [3.0, 5.0, 20.0, 17.0],     # inside
    [0.0, 0.0, 32.0, 24.0],     # the whole image
    [-6.0, -4.0, 5.0, 6.0],     # over the top-left border
    [26.0, 18.0, 40.0, 30.0],   # over the bottom-right border (samples past H, W)
    [10.0, 10.0, 10.5, 10.2],   # tiny
    [50.0, 50.0, 60.0, 60.0],   # wholly outside -> 0
], np.float32)


@pytest.mark.parametrize("aligned,g,scale", [(True, 2, 0.25), (False, 2, 0.25), (True, 3, 0.5)])
def test_matches_loop_reference(aligned, g, scale):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(int(24 * scale), int(32 * scale), 3)).astype(np.float32)  # [H, W, C]
    got = roi_align(feats, BOXES, 3, spatial_scale=scale, sampling_ratio=g, aligned=aligned)
    want = roi_align_reference(feats, BOXES, 3, scale, g, aligned)
    assert got.shape == (6, 3, 3, 3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if scale == 0.25:
        assert np.abs(want[5]).max() == 0 and np.abs(want[3]).max() > 0


def test_batched_rectangular_output_and_jit():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(2, 6, 8, 4)).astype(np.float32)
    boxes = np.stack([BOXES[:4], BOXES[1:5]])
    got = roi_align(feats, boxes, (2, 3), spatial_scale=0.25)
    assert got.shape == (2, 4, 2, 3, 4)
    for i in range(2):
        one = roi_align(feats[i], boxes[i], (2, 3), spatial_scale=0.25)
        np.testing.assert_allclose(got[i], one, rtol=1e-5, atol=1e-6)
    # a constant map pools to the constant wherever all samples are inside
    const = roi_align(jnp.full((6, 8, 1), 2.5), BOXES[:2], 2, spatial_scale=0.25)
    np.testing.assert_allclose(const, 2.5, rtol=1e-6)
    # bf16 in, bf16 out
    assert roi_align(feats.astype(jnp.bfloat16), boxes, 2, spatial_scale=0.25).dtype == jnp.bfloat16


def test_gradients():
    rng = np.random.default_rng(2)
    feats = jnp.asarray(rng.normal(size=(6, 8, 2)))
    boxes = jnp.asarray([[3.3, 5.1, 20.7, 17.4], [-2.3, 1.1, 9.6, 7.9]])  # sample points off the integer grid
    with jax.enable_x64(True):
        f64, b64 = jnp.asarray(feats, jnp.float64), jnp.asarray(boxes, jnp.float64)
        check_grads(jax.jit(lambda f: R.roi_align(f, b64, 2, 0.25)), (f64,), order=1, modes=("rev",), eps=1e-4)
        check_grads(jax.jit(lambda b: R.roi_align(f64, b, 2, 0.25)), (b64,), order=1, modes=("rev",), eps=1e-4)


def test_errors():
    f = np.zeros((4, 4, 1), np.float32)
    b = np.zeros((1, 4), np.float32)
    with pytest.raises(ValueError, match="sampling_ratio"):
        R.roi_align(f, b, 2, sampling_ratio=0)
    with pytest.raises(ValueError, match="features"):
        R.roi_align(f, np.zeros((2, 1, 4), np.float32), 2)
    with pytest.raises(ValueError, match="output_size"):
        R.roi_align(f, b, 0)
    with pytest.raises(TypeError, match="floating"):
        R.roi_align(f.astype(np.int32), b, 2)
