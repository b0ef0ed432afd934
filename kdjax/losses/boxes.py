"""Box-regression losses on ``[..., D]`` boxes: :func:`smooth_l1` (Girshick, 2015) and
:func:`teacher_bounded_l2` (Chen et al., 2017)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from kdjax.losses._validation import _compute_dtype, _finish, _float_array, _keep_rows, _scalar, _where


def teacher_bounded_l2(
    student_boxes: ArrayLike,
    teacher_boxes: ArrayLike,
    target_boxes: ArrayLike,
    margin: ArrayLike = 0.0,
    where: ArrayLike | None = None,
) -> jax.Array:
    """Chen et al. (2017) teacher-bounded regression loss, per box.

    With ``d_s = ||R_s - y||_2^2`` and ``d_t = ||R_t - y||_2^2`` over the last axis::

        loss = d_s   if d_s + m > d_t
               0     otherwise

    The student is penalised only while it is not better than the teacher by at least the margin ``m``;
    in the paper it is added (weight ``nu``) to the usual smooth-L1 regression loss on the positive boxes.

    Args:
      student_boxes: ``[..., D]`` float regression outputs, one row per box (``D = 4`` box coordinates
        or deltas), e.g. ``[num_rois, 4]`` or ``[B, num_rois, 4]``.
      teacher_boxes: ``[..., D]`` float, same shape.
      target_boxes: ``[..., D]`` float, the ground-truth regression targets ``y``, same shape.
      margin: scalar ``m`` (0 in the simplest form; any finite value).
      where: optional bool, broadcastable to ``[...]`` (one flag per box, e.g. positives only).

    Returns:
      ``[...]`` per-box loss.

    Example (the same student box, ``d_s = 2``, against a teacher that hits the target (``d_t = 0``)
    and one that misses it by more (``d_t = 8``)):

    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> student = jnp.array([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    >>> teacher = jnp.array([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    >>> target = jnp.array([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0]])
    >>> [round(float(v), 4) for v in losses.teacher_bounded_l2(student, teacher, target)]
    [2.0, 0.0]
    """
    s = _float_array(student_boxes, "student_boxes")
    t = _float_array(teacher_boxes, "teacher_boxes")
    y = _float_array(target_boxes, "target_boxes")
    if s.ndim < 1:
        raise ValueError(f"boxes must have the coordinate axis last, shape [..., D]; got shape {s.shape}")
    if not s.shape == t.shape == y.shape:
        raise ValueError(
            f"student_boxes {s.shape}, teacher_boxes {t.shape} and target_boxes {y.shape} must have the "
            "same shape [..., D] (one row per box, D = 4 coordinates); select the same boxes for all three"
        )
    margin_arr, margin_value = _scalar(margin, "margin")
    if margin_value is not None and not np.isfinite(margin_value):
        raise ValueError(f"margin must be finite, got {margin_value}")
    where = _where(where, s.shape[:-1], f"boxes of shape {s.shape}, one value per box")
    dtype = _compute_dtype(s, t, y)
    s, t, y = (_keep_rows(a.astype(dtype), where) for a in (s, t, y))
    d_s = jnp.sum((s - y) ** 2, axis=-1)
    d_t = jnp.sum((t - y) ** 2, axis=-1)
    loss = jnp.where(d_s + margin_arr.astype(dtype) > d_t, d_s, 0.0)
    return _finish(loss, where)


def smooth_l1(
    pred: ArrayLike,
    target: ArrayLike,
    beta: float = 1.0,
    where: ArrayLike | None = None,
) -> jax.Array:
    """Smooth-L1 (Huber-like) box-regression loss of Fast/Faster R-CNN, per box.

    With ``x = pred - target`` elementwise, summed over the last axis::

        l(x) = 0.5 x^2 / beta    if |x| < beta
               |x| - 0.5 beta    otherwise

    ``beta = 1`` is Girshick's (2015) Fast R-CNN loss; py-faster-rcnn's ``sigma`` is
    ``beta = 1 / sigma^2`` (RPN ``sigma = 3``: ``beta = 1/9``); ``beta = 0`` is the plain L1 loss
    (Detectron2's default). Equals ``torch.nn.functional.smooth_l1_loss(reduction='none')`` summed
    over the last axis.

    Args:
      pred: ``[..., D]`` float, predicted deltas (``D = 4``).
      target: ``[..., D]`` float, the regression targets, same shape.
      beta: a finite number ``>= 0``, the switch point from quadratic to linear.
      where: optional bool, broadcastable to ``[...]`` (one flag per box, e.g. positives only).

    Returns:
      ``[...]`` per-box loss.

    Example (``x = 0.5``: ``0.125``; ``x = 2``: ``1.5``; summed):

    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> float(losses.smooth_l1(jnp.array([0.5, 2.0, 0.0, 0.0]), jnp.zeros(4)))
    1.625
    """
    p = _float_array(pred, "pred")
    y = _float_array(target, "target")
    if p.ndim < 1:
        raise ValueError(f"boxes must have the coordinate axis last, shape [..., D]; got shape {p.shape}")
    if p.shape != y.shape:
        raise ValueError(f"pred {p.shape} and target {y.shape} must have the same shape [..., D] "
                         "(one row per box); select the same boxes for both")
    beta_arr, beta_value = _scalar(beta, "beta")
    if beta_value is not None and not (np.isfinite(beta_value) and beta_value >= 0):
        raise ValueError(f"beta must be a finite number >= 0 (0 gives the L1 loss), got {beta_value}")
    where = _where(where, p.shape[:-1], f"boxes of shape {p.shape}, one value per box")
    dtype = _compute_dtype(p, y)
    p, y = (_keep_rows(a.astype(dtype), where) for a in (p, y))
    beta_arr = beta_arr.astype(dtype)
    x = jnp.abs(p - y)
    quadratic = 0.5 * x * x / jnp.where(beta_arr > 0, beta_arr, 1.0)
    loss = jnp.sum(jnp.where(x < beta_arr, quadratic, x - 0.5 * beta_arr), axis=-1)
    return _finish(loss, where)
