"""Matching anchors or proposals to ground truth, and balanced sampling of a fixed count.

:func:`match` is Detectron2's ``Matcher`` (torchvision's ``Matcher`` likewise): every
prediction (anchor or proposal) takes the ground-truth box it overlaps most, and a label from its
best IoU ``q``::

    q <  low_threshold                    -> 0   (background / negative)
    low_threshold <= q < high_threshold   -> -1  (ignored)
    q >= high_threshold                   -> 1   (foreground / positive)

(the thresholds are compared in the IoU's dtype: float32 IoU 0.7 is positive at threshold 0.7).

Faster R-CNN's RPN uses ``(0.3, 0.7)`` with ``allow_low_quality_matches=True`` (each ground
truth's best anchors are positive even under 0.7); its RoI head uses ``(0.5, 0.5)`` without it.

:func:`sample_balanced` is Detectron2's ``subsample_labels``: at most
``int(num_samples * positive_fraction)`` positives, the rest negatives, chosen uniformly at random
(RPN: 256 anchors, fraction 0.5; RoI head: 512 proposals, fraction 0.25), in fixed-size arrays.

Both are pure JAX with static shapes: jittable, batched by ``jax.vmap``; the sample is a
deterministic function of the key.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


class Match(NamedTuple):
    """The result of :func:`match` for ``N`` predictions."""

    #: ``[N]`` int32, the index of each prediction's best ground truth (0 when there is none:
    #: read ``labels``).
    matched_gt: jax.Array
    #: ``[N]`` int32 in ``{1, 0, -1}``: positive, negative, ignored.
    labels: jax.Array
    #: ``[N]`` float, the IoU with the matched ground truth (0 when there is none).
    iou: jax.Array


def match(iou: ArrayLike, low_threshold: float, high_threshold: float,
          allow_low_quality_matches: bool = False, gt_valid: ArrayLike | None = None) -> Match:
    """Assigns each prediction to its best ground truth and labels it (rules: module docstring).

    Args:
      iou: ``[M, N]`` IoU of ``M`` ground-truth boxes (rows) with ``N`` predictions (columns), e.g.
        ``boxes.iou_matrix(gt_boxes, anchors)``.
      low_threshold: below it, negative.
      high_threshold: at or above it, positive (``>= low_threshold``; equal: no ignored band).
      allow_low_quality_matches: also label positive, for each ground truth, the predictions whose
        IoU with it equals its highest IoU over all predictions (ties: all of them), provided that
        IoU is > 0 (a ground truth that overlaps nothing makes nothing positive); the prediction
        stays matched to its own best ground truth, as in Detectron2.
      gt_valid: optional ``[M]`` bool; False rows (padding) match nothing. With no valid ground
        truth every prediction is negative.

    Returns:
      :class:`Match` of ``[N]`` arrays.
    """
    q = jnp.asarray(iou)
    if q.ndim != 2:
        raise ValueError(f"iou must be [M ground truths, N predictions], got shape {q.shape}; "
                         "use jax.vmap for a batch")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise TypeError(f"iou must be floating-point, got dtype {q.dtype}")
    if not 0.0 <= low_threshold <= high_threshold <= 1.0:
        raise ValueError(f"need 0 <= low_threshold <= high_threshold <= 1, got {low_threshold}, {high_threshold}")
    m, n = q.shape
    if gt_valid is not None:
        gt_valid = jnp.broadcast_to(jnp.asarray(gt_valid, bool), (m,))
        q = jnp.where(gt_valid[:, None], q, -1.0)
    if m == 0:
        zeros = jnp.zeros((n,), jnp.int32)
        return Match(zeros, zeros, jnp.zeros((n,), q.dtype))
    best = jnp.max(q, axis=0)
    matched = jnp.argmax(q, axis=0).astype(jnp.int32)
    labels = jnp.where(best >= high_threshold, 1, jnp.where(best < low_threshold, 0, -1)).astype(jnp.int32)
    if allow_low_quality_matches:
        highest = jnp.max(q, axis=1, keepdims=True)  # [M, 1]; -1 for padding rows
        low_quality = jnp.any((q == highest) & (highest > 0), axis=0)
        labels = jnp.where(low_quality, 1, labels)
    has_gt = best >= 0  # False only when every row is padding
    return Match(jnp.where(has_gt, matched, 0), jnp.where(has_gt, labels, 0),
                 jnp.where(has_gt, best, 0.0).astype(q.dtype))


class Sample(NamedTuple):
    """The result of :func:`sample_balanced`: ``S = num_samples`` slots, positives first."""

    #: ``[S]`` int32 indices of the sampled predictions (padding: 0).
    indices: jax.Array
    #: ``[S]`` bool, True for a sampled positive (label 1).
    positive: jax.Array
    #: ``[S]`` bool, True for a filled slot (positive or negative), False for padding.
    valid: jax.Array
    #: ``[N]`` bool, True for every sampled prediction: the ``where`` of a loss over all ``N``.
    mask: jax.Array


def sample_balanced(key: jax.Array, labels: ArrayLike, num_samples: int, positive_fraction: float) -> Sample:
    """Samples up to ``num_samples`` labelled predictions, at most a fraction of them positive.

    ``num_pos = min(int(num_samples * positive_fraction), #positives)`` and
    ``num_neg = min(num_samples - num_pos, #negatives)``, each drawn uniformly without replacement
    (a random priority per prediction); ignored predictions (label -1) are never drawn.

    Args:
      key: a ``jax.random`` key; the same key gives the same sample.
      labels: ``[N]`` int in ``{1, 0, -1}`` (:attr:`Match.labels`).
      num_samples: ``S``, static.
      positive_fraction: in ``[0, 1]``.

    Returns:
      :class:`Sample`: slots ``[0, num_pos)`` hold positives, ``[num_pos, num_pos + num_neg)``
      negatives (each group in random order), the rest padding.
    """
    labels = jnp.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be [N], got shape {labels.shape}; use jax.vmap for a batch")
    num_samples = int(num_samples)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    n = labels.shape[0]
    if n == 0:
        raise ValueError("labels is empty: there is nothing to sample from")
    pos, neg = labels == 1, labels == 0
    priority = jax.random.uniform(key, (n,))
    pos_order = jnp.argsort(jnp.where(pos, priority, 2.0))
    neg_order = jnp.argsort(jnp.where(neg, priority, 2.0))
    num_pos = jnp.minimum(int(num_samples * positive_fraction), pos.sum())
    num_neg = jnp.minimum(num_samples - num_pos, neg.sum())
    slot = jnp.arange(num_samples)
    is_pos = slot < num_pos
    valid = slot < num_pos + num_neg
    indices = jnp.where(is_pos, pos_order[jnp.minimum(slot, n - 1)],
                        neg_order[jnp.clip(slot - num_pos, 0, n - 1)])
    indices = jnp.where(valid, indices, 0).astype(jnp.int32)
    mask = jnp.zeros((n,), bool).at[indices].max(valid)
    return Sample(indices, is_pos & valid, valid, mask)
