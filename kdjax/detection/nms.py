"""Greedy non-maximum suppression with a fixed output size, jittable and batched by ``vmap``.

Greedy NMS (as ``torchvision.ops.nms``): visit the boxes by decreasing score; keep a box unless
a box kept before it overlaps it with IoU ``> iou_threshold``. Here the result is the first
``max_output`` kept boxes, as indices into the input padded to a fixed length with a mask, so
the shapes are static and the whole thing runs inside ``jax.jit``.

Ties in score are broken by the lower input index first (a stable sort), so the result is
deterministic. Boxes that are masked out (``where``), score at most ``score_threshold``, or
have a NaN score are never kept and never suppress anything. With ``classes``, boxes of
different classes never suppress each other (per-class NMS in one call).

Cost: ``max_output`` sequential steps of ``O(N)`` work (one IoU row each), ``O(N)`` memory.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kdjax.detection.boxes import _float_boxes, iou_matrix


def nms(boxes: ArrayLike, scores: ArrayLike, iou_threshold: float, max_output: int,
        score_threshold: float = -float("inf"), where: ArrayLike | None = None,
        classes: ArrayLike | None = None) -> tuple[jax.Array, jax.Array]:
    """Greedy NMS of one image, fixed output size.

    Args:
      boxes: ``[N, 4]`` float ``(x1, y1, x2, y2)``.
      scores: ``[N]`` float.
      iou_threshold: a box is suppressed by a kept box when their IoU is ``> iou_threshold``.
      max_output: ``K``, the length of the output (static).
      score_threshold: only boxes with ``score > score_threshold`` can be kept.
      where: optional ``[N]`` bool; False rows (padding) are ignored.
      classes: optional ``[N]`` int; only boxes of the same class suppress each other.

    Returns:
      ``(indices, valid)``: ``indices`` ``[K]`` int32, the kept boxes' input indices in the order
      greedy NMS keeps them (decreasing score, ties by index); ``valid`` ``[K]`` bool, True for the
      first ``min(K, number kept)`` entries. Padded entries have index 0 (safe to gather with;
      mask them with ``valid``).

    Batched: ``jax.vmap(functools.partial(nms, iou_threshold=0.7, max_output=300))(boxes, scores)``
    or :func:`batched_nms`.
    """
    b = _float_boxes(boxes, "boxes")
    s = jnp.asarray(scores)
    if b.ndim != 2 or s.shape != b.shape[:1]:
        raise ValueError(f"nms takes boxes [N, 4] and scores [N], got {b.shape} and {s.shape}; "
                         "use batched_nms (or jax.vmap) for a batch")
    if not jnp.issubdtype(s.dtype, jnp.floating):
        raise TypeError(f"scores must be floating-point, got dtype {s.dtype}")
    max_output = int(max_output)
    if max_output < 1:
        raise ValueError(f"max_output must be >= 1, got {max_output}")
    n = b.shape[0]
    s = s.astype(jnp.promote_types(s.dtype, jnp.float32))
    candidate = s > score_threshold  # False for NaN
    if where is not None:
        candidate = candidate & jnp.broadcast_to(jnp.asarray(where, bool), (n,))
    order = jnp.argsort(jnp.where(candidate, -s, jnp.inf), stable=True)  # candidates first, by score
    sorted_boxes = b[order]
    alive = candidate[order]
    if classes is not None:
        c = jnp.asarray(classes)
        if c.shape != (n,):
            raise ValueError(f"classes must have shape [N] = ({n},), got {c.shape}")
        sorted_classes = c[order]

    def step(k, carry):
        alive, picked, valid = carry
        first = jnp.argmax(alive)  # the highest-scoring box not yet kept or suppressed
        any_alive = alive[first]
        row = iou_matrix(sorted_boxes[first][None], sorted_boxes)[0]
        suppress = row > iou_threshold
        if classes is not None:
            suppress = suppress & (sorted_classes == sorted_classes[first])
        suppress = suppress.at[first].set(True)
        alive = jnp.where(any_alive, alive & ~suppress, alive)
        picked = picked.at[k].set(jnp.where(any_alive, order[first], 0))
        valid = valid.at[k].set(any_alive)
        return alive, picked, valid

    init = (alive, jnp.zeros((max_output,), jnp.int32), jnp.zeros((max_output,), bool))
    _, picked, valid = jax.lax.fori_loop(0, max_output, step, init)
    return picked.astype(jnp.int32), valid


def batched_nms(boxes: ArrayLike, scores: ArrayLike, iou_threshold: float, max_output: int,
                score_threshold: float = -float("inf"), where: ArrayLike | None = None,
                classes: ArrayLike | None = None) -> tuple[jax.Array, jax.Array]:
    """:func:`nms` over a batch of images: ``boxes [B, N, 4]``, ``scores [B, N]`` (and optional
    ``where``, ``classes`` ``[B, N]``) to ``indices [B, K]`` int32 and ``valid [B, K]`` bool."""
    one = functools.partial(nms, iou_threshold=iou_threshold, max_output=max_output,
                            score_threshold=score_threshold)
    if where is None and classes is None:
        return jax.vmap(lambda b, s: one(b, s))(boxes, scores)
    b = jnp.asarray(boxes)
    where = (jnp.ones(b.shape[:-1], bool) if where is None
             else jnp.broadcast_to(jnp.asarray(where, bool), b.shape[:-1]))
    if classes is None:
        return jax.vmap(lambda b, s, w: one(b, s, where=w))(boxes, scores, where)
    return jax.vmap(lambda b, s, w, c: one(b, s, where=w, classes=c))(boxes, scores, where, classes)
