"""Faster R-CNN anchors: a fixed set of reference boxes at every cell of a feature map.

For a feature map of ``H x W`` cells at stride ``s`` (pixels per cell), ``sizes`` ``S_k`` and
aspect ratios ``r_j = h / w``, the cell ``(i, j)`` (row ``i``, column ``j``) has its centre at
``((j + offset) * s, (i + offset) * s)`` and, for every ``(S_k, r_j)`` (sizes outer, ratios
inner), the box of area ``S_k^2`` and aspect ``r_j``::

    w = sqrt(S_k^2 / r_j),   h = r_j * w,   box = (cx - w/2, cy - h/2, cx + w/2, cy + h/2)

This is Detectron2's ``DefaultAnchorGenerator`` (Ren et al. 2015 use sizes 128, 256, 512 and
ratios 0.5, 1, 2 at stride 16: nine anchors a cell). ``offset=0`` puts the centre on the cell's
top-left corner (Detectron2's default), ``offset=0.5`` on its centre.

Anchors depend only on static shapes, so they are computed in NumPy on the host and enter a
jitted function as constants.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _positive(values: Sequence[float], name: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{name} must be a non-empty sequence of finite numbers > 0, got {values}")
    return values


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
    """The anchors of one cell centred on ``(0, 0)``: ``[len(sizes) * len(aspect_ratios), 4]`` float32.

    Row ``k * len(aspect_ratios) + j`` is size ``sizes[k]`` at ratio ``aspect_ratios[j]``.
    """
    sizes = _positive(sizes, "sizes")
    ratios = _positive(aspect_ratios, "aspect_ratios")
    out = []
    for size in sizes:
        for ratio in ratios:
            w = math.sqrt(size * size / ratio)
            h = ratio * w
            out.append([-w / 2, -h / 2, w / 2, h / 2])
    return np.asarray(out, np.float32)


def grid_anchors(feature_size: tuple[int, int], stride: float, sizes: Sequence[float],
                 aspect_ratios: Sequence[float], offset: float = 0.0) -> np.ndarray:
    """All anchors of one feature map.

    Args:
      feature_size: ``(H, W)`` cells.
      stride: pixels per cell (the feature map's downsampling factor).
      sizes: anchor sizes ``S_k`` in pixels (square root of the area).
      aspect_ratios: ``h / w`` ratios.
      offset: the centre of a cell in cells from its top-left corner, in ``[0, 1)``.

    Returns:
      ``[H, W, A, 4]`` float32 with ``A = len(sizes) * len(aspect_ratios)``; ``[i, j, a]`` is
      :func:`cell_anchors` row ``a`` shifted to ``((j + offset) * stride, (i + offset) * stride)``.
      ``reshape(-1, 4)`` orders them as an RPN head's ``[H, W, A * 4]`` output reshaped to
      ``[H * W * A, 4]``.
    """
    height, width = (int(v) for v in feature_size)
    if height < 1 or width < 1:
        raise ValueError(f"feature_size must be (H, W) with H, W >= 1, got {feature_size}")
    (stride,) = _positive([stride], "stride")
    if not 0.0 <= float(offset) < 1.0:
        raise ValueError(f"offset must be in [0, 1), got {offset}")
    base = cell_anchors(sizes, aspect_ratios).astype(np.float64)
    cx = (np.arange(width) + offset) * stride
    cy = (np.arange(height) + offset) * stride
    shift = np.stack(np.broadcast_arrays(cx[None, :], cy[:, None], cx[None, :], cy[:, None]), -1)  # [H, W, 4]
    return (shift[:, :, None, :] + base[None, None, :, :]).astype(np.float32)


def multilevel_anchors(feature_sizes: Sequence[tuple[int, int]], strides: Sequence[float],
                       sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[float],
                       offset: float = 0.0) -> np.ndarray:
    """Anchors of several feature maps (an FPN, or one level), flattened and concatenated.

    Args:
      feature_sizes: ``(H_l, W_l)`` of each level.
      strides: the stride of each level.
      sizes: the anchor sizes of each level (e.g. ``[[32], [64], [128]]``).
      aspect_ratios: shared by all levels.
      offset: as in :func:`grid_anchors`.

    Returns:
      ``[sum_l H_l * W_l * A_l, 4]`` float32, level by level, each in :func:`grid_anchors` order.
    """
    if not len(feature_sizes) == len(strides) == len(sizes):
        raise ValueError(f"one stride and one size list per level: got {len(feature_sizes)} feature sizes, "
                         f"{len(strides)} strides and {len(sizes)} size lists")
    return np.concatenate([grid_anchors(f, s, z, aspect_ratios, offset).reshape(-1, 4)
                           for f, s, z in zip(feature_sizes, strides, sizes)], 0)
