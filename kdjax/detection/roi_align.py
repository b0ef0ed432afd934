"""RoIAlign (He et al. 2017) over NHWC features, in JAX, with torchvision's / Detectron2's semantics.

For a box ``(x1, y1, x2, y2)`` in image pixels, ``spatial_scale`` (feature cells per pixel, e.g.
``1/16``) and ``offset = 0.5`` if ``aligned`` else ``0``::

    start_x = x1 * spatial_scale - offset          roi_w = (x2 - x1) * spatial_scale
    start_y = y1 * spatial_scale - offset          roi_h = (y2 - y1) * spatial_scale
    (not aligned: roi_w = max(roi_w, 1), roi_h = max(roi_h, 1))

The box is cut into ``out_h x out_w`` bins of ``roi_h / out_h x roi_w / out_w`` cells; bin
``(p, q)`` averages ``g x g`` (``g = sampling_ratio``) bilinear samples of the features at::

    y = start_y + (p + (i + 0.5) / g) * roi_h / out_h,   i = 0 .. g - 1   (likewise x with q, j)

A sample value is torchvision's ``bilinear_interpolate``: 0 if ``y < -1``, ``y > H``, ``x < -1``
or ``x > W``; else ``y`` and ``x`` are clamped to ``>= 0``, and a coordinate at or past the last
cell (``floor(y) >= H - 1``) is read at ``H - 1``; otherwise the usual bilinear mix of the four
surrounding cells (cell ``(r, c)`` has its value at ``(y, x) = (r, c)`` in feature coordinates).

``aligned=True`` (Detectron2's ``ROIAlignV2``, torchvision's ``aligned=True``) shifts by half a
cell so that pixel ``x`` maps to feature coordinate ``x * spatial_scale - 0.5``: cell centres
line up with pixel centres. ``aligned=False`` is the original Mask R-CNN RoIAlign.

The sampling grid has a fixed size ``g`` (static shapes under ``jit``): torchvision's adaptive
grid (``sampling_ratio <= 0``: ``ceil(roi_h / out_h)`` samples, a different count per box) is not
offered. Differentiable in the features and (almost everywhere) in the boxes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kdjax.detection.boxes import _float_boxes


def _axis_samples(start, length, bins: int, grid: int):
    """Sample coordinates along one axis: ``[R, bins * grid]`` (bin-major)."""
    steps = (jnp.arange(bins)[:, None] + (jnp.arange(grid)[None, :] + 0.5) / grid).reshape(-1)
    return start[:, None] + steps[None, :] * (length / bins)[:, None]


def _axis_weights(coords, size: int):
    """torchvision's bilinear_interpolate along one axis: (low, high, w_low, w_high), zero weight
    outside ``[-1, size]``."""
    inside = (coords >= -1.0) & (coords <= size)
    c = jnp.maximum(coords, 0.0)
    low = jnp.floor(c).astype(jnp.int32)
    at_end = low >= size - 1
    low = jnp.where(at_end, size - 1, low)
    high = jnp.where(at_end, size - 1, low + 1)
    c = jnp.where(at_end, low.astype(c.dtype), c)
    frac = c - low.astype(c.dtype)
    return low, high, jnp.where(inside, 1.0 - frac, 0.0), jnp.where(inside, frac, 0.0)


def _roi_align_one(features, boxes, output_size, spatial_scale, sampling_ratio, aligned):
    height, width, _ = features.shape
    out_h, out_w = output_size
    dtype = jnp.promote_types(features.dtype, jnp.float32)
    f = features.astype(dtype)
    b = boxes.astype(dtype) * spatial_scale - (0.5 if aligned else 0.0)
    roi_w = b[:, 2] - b[:, 0]
    roi_h = b[:, 3] - b[:, 1]
    if not aligned:
        roi_w, roi_h = jnp.maximum(roi_w, 1.0), jnp.maximum(roi_h, 1.0)
    ys = _axis_samples(b[:, 1], roi_h, out_h, sampling_ratio)  # [R, Sy]
    xs = _axis_samples(b[:, 0], roi_w, out_w, sampling_ratio)  # [R, Sx]
    y_lo, y_hi, wy_lo, wy_hi = _axis_weights(ys, height)
    x_lo, x_hi, wx_lo, wx_hi = _axis_weights(xs, width)

    def corner(yi, xi, wy, wx):  # [R, Sy, Sx, C]
        return (wy[:, :, None] * wx[:, None, :])[..., None] * f[yi[:, :, None], xi[:, None, :]]

    samples = (corner(y_lo, x_lo, wy_lo, wx_lo) + corner(y_lo, x_hi, wy_lo, wx_hi)
               + corner(y_hi, x_lo, wy_hi, wx_lo) + corner(y_hi, x_hi, wy_hi, wx_hi))
    r, c = boxes.shape[0], features.shape[-1]
    pooled = samples.reshape(r, out_h, sampling_ratio, out_w, sampling_ratio, c).mean(axis=(2, 4))
    return pooled.astype(features.dtype)


def roi_align(features: ArrayLike, boxes: ArrayLike, output_size: int | tuple[int, int],
              spatial_scale: float = 1.0, sampling_ratio: int = 2, aligned: bool = True) -> jax.Array:
    """Pools a fixed ``out_h x out_w`` grid of features for every box (formulas: module docstring).

    Args:
      features: ``[B, H, W, C]`` (or ``[H, W, C]`` for one image), float.
      boxes: ``[B, R, 4]`` (or ``[R, 4]``) ``(x1, y1, x2, y2)`` in image pixels, R boxes per image.
      output_size: ``out`` or ``(out_h, out_w)``, e.g. 7 for the Faster R-CNN box head.
      spatial_scale: feature cells per image pixel (``1 / stride``).
      sampling_ratio: ``g >= 1`` bilinear samples per bin along each axis (``g * g`` a bin).
      aligned: the half-cell shift (True: Detectron2's ``ROIAlignV2``; False: Mask R-CNN's original).

    Returns:
      ``[B, R, out_h, out_w, C]`` (or ``[R, out_h, out_w, C]``) in the features' dtype (computed in
      at least float32).
    """
    f = jnp.asarray(features)
    if not jnp.issubdtype(f.dtype, jnp.floating):
        raise TypeError(f"features must be floating-point, got dtype {f.dtype}")
    b = _float_boxes(boxes, "boxes")
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    output_size = tuple(int(v) for v in output_size)
    if len(output_size) != 2 or min(output_size) < 1:
        raise ValueError(f"output_size must be an int >= 1 or (out_h, out_w), got {output_size}")
    if int(sampling_ratio) != sampling_ratio or sampling_ratio < 1:
        raise ValueError(f"sampling_ratio must be an integer >= 1 (a fixed grid; the adaptive grid of "
                         f"sampling_ratio <= 0 has data-dependent shapes), got {sampling_ratio}")
    args = (output_size, float(spatial_scale), int(sampling_ratio), bool(aligned))
    if f.ndim == 3 and b.ndim == 2:
        return _roi_align_one(f, b, *args)
    if f.ndim == 4 and b.ndim == 3 and f.shape[0] == b.shape[0]:
        return jax.vmap(lambda fi, bi: _roi_align_one(fi, bi, *args))(f, b)
    raise ValueError(f"roi_align takes features [B, H, W, C] with boxes [B, R, 4] (or [H, W, C] with "
                     f"[R, 4]), got features {f.shape} and boxes {b.shape}")
