"""Axis-aligned boxes as ``[..., 4]`` float arrays ``(x1, y1, x2, y2)``, in pixels.

A box covers ``x1 <= x <= x2``, ``y1 <= y <= y2``; its width is ``x2 - x1`` and its height
``y2 - y1`` (the continuous convention of Detectron2 and torchvision, no ``+ 1``). Zero-size
boxes are allowed (they have area 0 and IoU 0 with everything).

* :func:`validate_boxes`: host-side checks with clear errors (shape, dtype, non-finite values,
  ``x2 < x1`` or ``y2 < y1``, outside the image).
* :func:`box_area`, :func:`iou_matrix`: areas and pairwise IoU.
* :func:`encode` / :func:`decode`: the Faster R-CNN box parameterisation (Girshick et al.;
  Ren et al. 2015) of a box relative to a reference box (anchor or proposal).
* :func:`clip_to_image`: clamps coordinates to ``[0, width] x [0, height]``.

Every function except :func:`validate_boxes` is a pure JAX function, safe under ``jit``,
``vmap`` and ``grad``, and computes in at least float32.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

#: Upper bound on the decoded ``dw``, ``dh`` (after dividing by their weights): a box grows at
#: most ``1000 / 16`` times its reference's size, as in Detectron2 and torchvision.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)

#: Delta weights ``(wx, wy, ww, wh)`` of the Faster R-CNN RoI head (the RPN uses ``(1, 1, 1, 1)``).
ROI_HEAD_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def _float_boxes(boxes: ArrayLike, name: str) -> jax.Array:
    boxes = jnp.asarray(boxes)
    if not jnp.issubdtype(boxes.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {boxes.dtype}; cast it first, "
                        f"e.g. {name}.astype(jnp.float32)")
    if boxes.ndim < 1 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [..., 4] (x1, y1, x2, y2), got shape {boxes.shape}")
    return boxes.astype(jnp.promote_types(boxes.dtype, jnp.float32))


def _weights(weights: Sequence[float]) -> tuple[float, float, float, float]:
    weights = tuple(float(w) for w in weights)
    if len(weights) != 4 or not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"weights must be four finite numbers > 0 (wx, wy, ww, wh), got {weights}")
    return weights


def validate_boxes(boxes: ArrayLike, name: str = "boxes", image_size: tuple[int, int] | None = None,
                   where: ArrayLike | None = None) -> np.ndarray:
    """Checks concrete boxes on the host and returns them as a NumPy array.

    Meant for inputs (ground truth, data sets, user calls), not for traced values inside ``jit``
    (a traced argument raises ``TypeError``: check before the jitted function).

    Args:
      boxes: ``[..., 4]`` float ``(x1, y1, x2, y2)``.
      name: the argument name used in the messages.
      image_size: optional ``(height, width)``; then every box must lie in
        ``[0, width] x [0, height]``.
      where: optional bool ``[...]``; rows where it is False (padding) are not checked.

    Returns:
      ``np.asarray(boxes)``.

    Raises:
      TypeError: not a floating-point array, or traced.
      ValueError: wrong shape, a non-finite coordinate, ``x2 < x1`` or ``y2 < y1``, or a box
        outside the image; the message names the first offending box by index.
    """
    if isinstance(boxes, jax.core.Tracer):
        raise TypeError(f"validate_boxes needs concrete {name}, got a traced value; validate before jit")
    array = np.asarray(boxes)
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {array.dtype}")
    if array.ndim < 1 or array.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [..., 4] (x1, y1, x2, y2), got shape {array.shape}")
    keep = np.ones(array.shape[:-1], bool) if where is None else np.broadcast_to(
        np.asarray(where, bool), array.shape[:-1])

    def first(bad: np.ndarray, what: str) -> None:
        bad = bad & keep
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{name}{list(index)} = {array[index].tolist()}: {what} "
                             f"({int(bad.sum())} such box(es) in {name} of shape {array.shape})")

    first(~np.isfinite(array).all(-1), "a coordinate is not finite")
    x1, y1, x2, y2 = np.moveaxis(array, -1, 0)
    first(x2 < x1, "x2 < x1; boxes are (x1, y1, x2, y2) with x1 <= x2")
    first(y2 < y1, "y2 < y1; boxes are (x1, y1, x2, y2) with y1 <= y2")
    if image_size is not None:
        height, width = image_size
        first((x1 < 0) | (y1 < 0) | (x2 > width) | (y2 > height),
              f"outside the image [0, {width}] x [0, {height}] (width x height); clip it first")
    return array


def box_area(boxes: ArrayLike) -> jax.Array:
    """``(x2 - x1) * (y2 - y1)`` of ``[..., 4]`` boxes, shape ``[...]``."""
    b = _float_boxes(boxes, "boxes")
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def iou_matrix(boxes_a: ArrayLike, boxes_b: ArrayLike) -> jax.Array:
    """Pairwise intersection over union.

    ``iou[..., i, j] = |a_i ∩ b_j| / (|a_i| + |b_j| - |a_i ∩ b_j|)``, with
    ``|a ∩ b| = max(0, min(x2) - max(x1)) * max(0, min(y2) - max(y1))``; 0 where the union is 0
    (two zero-size boxes).

    Args:
      boxes_a: ``[..., N, 4]``.
      boxes_b: ``[..., M, 4]`` (leading axes broadcast with ``boxes_a``'s).

    Returns:
      ``[..., N, M]`` in ``[0, 1]``.
    """
    a = _float_boxes(boxes_a, "boxes_a")
    b = _float_boxes(boxes_b, "boxes_b")
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"iou_matrix needs [..., N, 4] and [..., M, 4], got {a.shape} and {b.shape}")
    a, b = a[..., :, None, :], b[..., None, :, :]
    inter_w = jnp.maximum(jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0]), 0.0)
    inter_h = jnp.maximum(jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1]), 0.0)
    inter = inter_w * inter_h
    union = box_area(a) + box_area(b) - inter
    return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def _centre_size(b: jax.Array):
    w = b[..., 2] - b[..., 0]
    h = b[..., 3] - b[..., 1]
    return b[..., 0] + 0.5 * w, b[..., 1] + 0.5 * h, w, h


def encode(boxes: ArrayLike, reference: ArrayLike, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> jax.Array:
    """Faster R-CNN regression targets of ``boxes`` relative to ``reference`` boxes.

    With centres ``(x, y)`` and sizes ``(w, h)`` of a box ``g`` and its reference ``a``::

        dx = wx * (x_g - x_a) / w_a        dw = ww * log(w_g / w_a)
        dy = wy * (y_g - y_a) / h_a        dh = wh * log(h_g / h_a)

    Args:
      boxes: ``[..., 4]`` target boxes (e.g. the matched ground truth), positive width and height.
      reference: ``[..., 4]`` reference boxes (anchors or proposals), same shape, positive size.
      weights: ``(wx, wy, ww, wh)``; ``(1, 1, 1, 1)`` for the RPN, :data:`ROI_HEAD_WEIGHTS` for
        the RoI head.

    Returns:
      ``[..., 4]`` deltas ``(dx, dy, dw, dh)``; :func:`decode` inverts it.
    """
    g = _float_boxes(boxes, "boxes")
    a = _float_boxes(reference, "reference")
    if g.shape != a.shape:
        raise ValueError(f"boxes {g.shape} and reference {a.shape} must have the same shape [..., 4]")
    wx, wy, ww, wh = _weights(weights)
    gx, gy, gw, gh = _centre_size(g)
    ax, ay, aw, ah = _centre_size(a)
    return jnp.stack([wx * (gx - ax) / aw, wy * (gy - ay) / ah,
                      ww * jnp.log(gw / aw), wh * jnp.log(gh / ah)], axis=-1)


def decode(deltas: ArrayLike, reference: ArrayLike, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
           scale_clamp: float = DEFAULT_SCALE_CLAMP) -> jax.Array:
    """Applies Faster R-CNN deltas to reference boxes (the inverse of :func:`encode`)::

        x = x_a + (dx / wx) * w_a          w = w_a * exp(min(dw / ww, scale_clamp))
        y = y_a + (dy / wy) * h_a          h = h_a * exp(min(dh / wh, scale_clamp))

    and returns ``(x - w/2, y - h/2, x + w/2, y + h/2)``. The clamp keeps ``exp`` finite for
    wild predictions early in training (default ``log(1000 / 16)``, as in Detectron2).

    Args:
      deltas: ``[..., 4]`` ``(dx, dy, dw, dh)``.
      reference: ``[..., 4]`` boxes, broadcastable against ``deltas``.
      weights: ``(wx, wy, ww, wh)``, the same as given to :func:`encode`.
      scale_clamp: upper bound on ``dw / ww`` and ``dh / wh``.

    Returns:
      ``[..., 4]`` boxes (not clipped to the image: see :func:`clip_to_image`).
    """
    d = _float_boxes(deltas, "deltas")
    a = _float_boxes(reference, "reference")
    wx, wy, ww, wh = _weights(weights)
    ax, ay, aw, ah = _centre_size(a)
    x = ax + d[..., 0] / wx * aw
    y = ay + d[..., 1] / wy * ah
    w = aw * jnp.exp(jnp.minimum(d[..., 2] / ww, scale_clamp))
    h = ah * jnp.exp(jnp.minimum(d[..., 3] / wh, scale_clamp))
    return jnp.stack([x - 0.5 * w, y - 0.5 * h, x + 0.5 * w, y + 0.5 * h], axis=-1)


def clip_to_image(boxes: ArrayLike, height: ArrayLike, width: ArrayLike) -> jax.Array:
    """Clamps ``x`` to ``[0, width]`` and ``y`` to ``[0, height]``; ``[..., 4]`` in and out.

    ``height`` and ``width`` may be scalars or arrays broadcastable to ``[...]`` (one size per
    image, e.g. ``[B, 1]`` for ``[B, N, 4]`` boxes). A box wholly outside becomes a zero-size
    box on the border.
    """
    b = _float_boxes(boxes, "boxes")
    w = jnp.asarray(width, b.dtype)
    h = jnp.asarray(height, b.dtype)
    return jnp.stack([jnp.clip(b[..., 0], 0, w), jnp.clip(b[..., 1], 0, h),
                      jnp.clip(b[..., 2], 0, w), jnp.clip(b[..., 3], 0, h)], axis=-1)
