"""Training-time target assignment and the plain Faster R-CNN loss, as pure functions.

Ground truth is padded to ``G`` boxes per image: ``gt_boxes`` ``[B, G, 4]`` float (image pixels),
``gt_labels`` ``[B, G]`` int data class ids in ``[0, K)`` (the RoI head's index is ``label + 1``;
0 is background), ``gt_valid`` ``[B, G]`` bool. An image with no valid box is allowed (all its
anchors and RoIs are background). Check concrete ground truth once on the host with
:func:`check_ground_truth`; everything else here is jittable.

* :func:`rpn_targets` (Ren et al. 2015, Detectron2 defaults): anchors matched to the ground truth at
  IoU ``(0.3, 0.7)`` with low-quality matches (each box's best anchors are positive), 256 anchors
  sampled per image, at most half positive; objectness targets and ``encode(gt, anchor)`` deltas
  (weights 1). Anchors crossing the image border are kept (Detectron2; the paper ignores them).
* :func:`roi_targets` (Detectron2 ``label_and_sample_proposals``): the proposals plus the ground truth
  boxes themselves (``add_ground_truth_to_proposals``), matched at IoU 0.5 (below: background), 128
  RoIs sampled per image (Detectron2 512; fewer for small images), at most 25% foreground; class
  targets ``label + 1`` or 0 and ``encode(gt, roi, ROI_HEAD_WEIGHTS)`` deltas.
* :func:`faster_rcnn_loss`: the four terms, each a scalar:

  - ``rpn_cls``: binary cross-entropy of the objectness logits over the sampled anchors,
  - ``rpn_box``: :func:`~kdjax.losses.smooth_l1` (``beta = 1/9``, py-faster-rcnn's ``rpn_sigma = 3``)
    over the positive anchors,

  both summed and divided by ``B * rpn_batch_size`` (Detectron2's normaliser);

  - ``roi_cls``: softmax cross-entropy over the ``K + 1`` classes, mean over the sampled RoIs,
  - ``roi_box``: smooth-L1 (``beta = 1``, Fast R-CNN) of the ground-truth class's deltas on the
    foreground RoIs, summed and divided by the number of sampled RoIs (Detectron2);

  and ``total``, their sum with weight 1 each (Ren et al.'s ``lambda = 1`` after normalisation).
* :func:`detector_loss`: the whole training forward (backbone, RPN, proposals, targets, RoI head on
  the sampled RoIs) and :func:`faster_rcnn_loss`, for ``jax.grad``.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import losses
from kdjax.detection import boxes as boxes_lib
from kdjax.detection import matching
from kdjax.detection.model import model_proposals

#: py-faster-rcnn's ``beta = 1 / sigma^2`` of the RPN (sigma 3) and of the RoI head (sigma 1).
RPN_SMOOTH_L1_BETA = 1.0 / 9.0
ROI_SMOOTH_L1_BETA = 1.0

_UNIT_BOX = jnp.asarray([0.0, 0.0, 1.0, 1.0])


def check_ground_truth(gt_boxes, gt_labels, gt_valid, num_classes: int, image_size: tuple[int, int]) -> None:
    """Host-side checks of concrete padded ground truth, with clear errors.

    Raises:
      TypeError / ValueError: wrong shapes or dtypes; a valid box with ``x2 < x1``, ``y2 < y1``, a
        non-finite coordinate or outside the ``(H, W)`` image (via
        :func:`~kdjax.detection.boxes.validate_boxes`); a valid label outside ``[0, num_classes)``.
    """
    valid = np.asarray(gt_valid)
    if valid.dtype != np.bool_:
        raise TypeError(f"gt_valid must be bool [B, G], got dtype {valid.dtype}")
    boxes = boxes_lib.validate_boxes(gt_boxes, "gt_boxes", image_size=image_size, where=valid)
    labels = np.asarray(gt_labels)
    if boxes.ndim != 3 or labels.shape != boxes.shape[:2] or valid.shape != boxes.shape[:2]:
        raise ValueError(f"ground truth must be gt_boxes [B, G, 4], gt_labels [B, G] and gt_valid [B, G]; got "
                         f"{boxes.shape}, {labels.shape} and {valid.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"gt_labels must be integer class ids, got dtype {labels.dtype}")
    bad = valid & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        index = [int(i) for i in np.argwhere(bad)[0]]
        raise ValueError(f"gt_labels{index} = {int(labels[tuple(index)])} is out of range: class ids must lie "
                         f"in [0, {num_classes}) for a detector with {num_classes} classes (background is "
                         "not a data class; mark padding with gt_valid=False)")


def _gt_arrays(gt_boxes, gt_labels, gt_valid):
    boxes = boxes_lib._float_boxes(gt_boxes, "gt_boxes")
    labels, valid = jnp.asarray(gt_labels), jnp.asarray(gt_valid)
    if boxes.ndim != 3 or labels.shape != boxes.shape[:2] or valid.shape != boxes.shape[:2]:
        raise ValueError(f"ground truth must be gt_boxes [B, G, 4], gt_labels [B, G] and gt_valid [B, G]; got "
                         f"{boxes.shape}, {labels.shape} and {valid.shape}")
    if valid.dtype != jnp.bool_ or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"gt_valid must be bool and gt_labels integer; got {valid.dtype} and {labels.dtype}")
    # padding rows become unit boxes, so that no NaN can come from them
    return jnp.where(valid[..., None], boxes, _UNIT_BOX), labels.astype(jnp.int32), valid


def _safe_encode(gt: jax.Array, reference: jax.Array, use: jax.Array, weights) -> jax.Array:
    """``encode(gt, reference)`` where ``use``, zeros elsewhere (no NaN from degenerate rows)."""
    g = jnp.where(use[..., None], gt, _UNIT_BOX)
    r = jnp.where(use[..., None], reference, _UNIT_BOX)
    return jnp.where(use[..., None], boxes_lib.encode(g, r, weights), 0.0)


class RPNTargets(NamedTuple):
    """Per anchor, ``[B, N]`` (deltas ``[B, N, 4]``)."""
    objectness: jax.Array  #: float 1.0 for positive anchors, 0.0 otherwise.
    sampled: jax.Array     #: bool, the anchors the classification loss reads (positives and negatives).
    positive: jax.Array    #: bool, the sampled positives (the box loss reads these).
    deltas: jax.Array      #: float ``encode(matched gt, anchor)`` (weights 1) on positives, 0 elsewhere.


def rpn_targets(key: jax.Array, anchors, gt_boxes, gt_labels, gt_valid, *, batch_size_per_image: int = 256,
                positive_fraction: float = 0.5, low_threshold: float = 0.3,
                high_threshold: float = 0.7) -> RPNTargets:
    """RPN targets (module docstring); ``anchors`` ``[N, 4]``, ground truth padded ``[B, G]``."""
    gt, _, valid = _gt_arrays(gt_boxes, gt_labels, gt_valid)
    anchors = boxes_lib._float_boxes(anchors, "anchors")
    keys = jax.random.split(key, gt.shape[0])

    def one(k, g, v):
        m = matching.match(boxes_lib.iou_matrix(g, anchors), low_threshold, high_threshold,
                           allow_low_quality_matches=True, gt_valid=v)
        s = matching.sample_balanced(k, m.labels, batch_size_per_image, positive_fraction)
        positive = s.mask & (m.labels == 1)
        deltas = _safe_encode(g[m.matched_gt], anchors, positive, (1.0, 1.0, 1.0, 1.0))
        return RPNTargets(positive.astype(jnp.float32), s.mask, positive, deltas)

    return jax.vmap(one)(keys, gt, valid)


class RoITargets(NamedTuple):
    """Per sampled RoI, ``[B, S]`` (``S = batch_size_per_image``; boxes and deltas ``[B, S, 4]``)."""
    rois: jax.Array      #: the sampled RoIs (proposals or ground-truth boxes), image pixels.
    classes: jax.Array   #: int32 ``label + 1`` on foreground, 0 on background and padding.
    deltas: jax.Array    #: ``encode(gt, roi, ROI_HEAD_WEIGHTS)`` on foreground, 0 elsewhere.
    positive: jax.Array  #: bool, foreground RoIs.
    valid: jax.Array     #: bool, filled slots (foreground or background).
    matched_gt: jax.Array  #: int32 index of the matched ground-truth box (read with ``positive``).


def roi_targets(key: jax.Array, proposals, proposal_valid, gt_boxes, gt_labels, gt_valid, *,
                batch_size_per_image: int = 128, positive_fraction: float = 0.25, iou_threshold: float = 0.5,
                add_ground_truth: bool = True) -> RoITargets:
    """RoI-head targets (module docstring); ``proposals`` ``[B, R, 4]`` and ``proposal_valid``
    ``[B, R]`` (e.g. the model's ``rois``/``roi_valid``), taken under ``stop_gradient``."""
    gt, labels, valid = _gt_arrays(gt_boxes, gt_labels, gt_valid)
    props = jax.lax.stop_gradient(boxes_lib._float_boxes(proposals, "proposals"))
    pvalid = jnp.broadcast_to(jnp.asarray(proposal_valid, bool), props.shape[:2])
    if add_ground_truth:
        props = jnp.concatenate([props, gt.astype(props.dtype)], axis=1)
        pvalid = jnp.concatenate([pvalid, valid], axis=1)
    keys = jax.random.split(key, gt.shape[0])

    def one(k, p, pv, g, lab, v):
        m = matching.match(boxes_lib.iou_matrix(g, p), iou_threshold, iou_threshold, gt_valid=v)
        s = matching.sample_balanced(k, jnp.where(pv, m.labels, -1), batch_size_per_image, positive_fraction)
        rois = jnp.where(s.valid[:, None], p[s.indices], 0.0)
        matched = m.matched_gt[s.indices]
        classes = jnp.where(s.positive, lab[matched] + 1, 0).astype(jnp.int32)
        deltas = _safe_encode(g[matched], rois, s.positive, boxes_lib.ROI_HEAD_WEIGHTS)
        return RoITargets(rois, classes, deltas, s.positive, s.valid, matched)

    return jax.vmap(one)(keys, props, pvalid, gt, labels, valid)


def _binary_ce(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``-z log sigmoid(x) - (1 - z) log(1 - sigmoid(x)) = softplus(x) - z x``, elementwise."""
    return jax.nn.softplus(logits) - targets * logits


def faster_rcnn_loss(rpn_logits, rpn_deltas, rpn: RPNTargets, roi_logits, roi_deltas, roi: RoITargets, *,
                     rpn_batch_size: int = 256, rpn_beta: float = RPN_SMOOTH_L1_BETA,
                     roi_beta: float = ROI_SMOOTH_L1_BETA) -> dict[str, jax.Array]:
    """The plain Faster R-CNN loss (module docstring) from the model's outputs and the targets.

    Args:
      rpn_logits: ``[B, N]``; rpn_deltas: ``[B, N, 4]`` (the model's outputs on all anchors).
      rpn: :func:`rpn_targets`.
      roi_logits: ``[B, S, K+1]``; roi_deltas: ``[B, S, K+1, 4]`` (the RoI head on ``roi.rois``).
      roi: :func:`roi_targets`.
      rpn_batch_size: the anchors sampled per image (as given to :func:`rpn_targets`); the RPN terms
        are divided by ``B * rpn_batch_size``.
      rpn_beta, roi_beta: the smooth-L1 ``beta`` of each stage.

    Returns:
      ``{'rpn_cls', 'rpn_box', 'roi_cls', 'roi_box', 'total'}``, float32 scalars.
    """
    b = rpn_logits.shape[0]
    rpn_norm = jnp.asarray(b * max(int(rpn_batch_size), 1), jnp.float32)
    rpn_cls = jnp.sum(jnp.where(rpn.sampled, _binary_ce(rpn_logits.astype(jnp.float32), rpn.objectness), 0.0))
    rpn_box = jnp.sum(losses.smooth_l1(rpn_deltas, rpn.deltas, rpn_beta, where=rpn.positive))
    roi_count = jnp.maximum(jnp.sum(roi.valid), 1).astype(jnp.float32)
    roi_cls = jnp.sum(losses.cross_entropy(roi_logits, roi.classes, where=roi.valid)) / roi_count
    picked = jnp.take_along_axis(roi_deltas, roi.classes[..., None, None], axis=2)[:, :, 0]  # [B, S, 4]
    roi_box = jnp.sum(losses.smooth_l1(picked, roi.deltas, roi_beta, where=roi.positive)) / roi_count
    terms = {"rpn_cls": rpn_cls / rpn_norm, "rpn_box": rpn_box / rpn_norm, "roi_cls": roi_cls, "roi_box": roi_box}
    terms["total"] = sum(terms.values())
    return terms


def detector_loss(model, variables: Any, images: jax.Array, gt_boxes, gt_labels, gt_valid, key: jax.Array, *,
                  rpn_batch_size: int = 256, roi_batch_size: int = 128) -> tuple[jax.Array, dict[str, Any]]:
    """One training forward of a :class:`~kdjax.detection.model.FasterRCNN` and its loss.

    Backbone + RPN, proposals (no gradient), :func:`rpn_targets`, :func:`roi_targets` on the proposals
    (plus the ground truth), the RoI head on the sampled RoIs, :func:`faster_rcnn_loss`.

    Returns:
      ``(total, aux)``: ``aux`` holds the terms (``'terms'``), the forward's outputs (``'outputs'``,
      with ``roi_logits``/``roi_deltas`` of the sampled RoIs) and the targets (``'rpn'``, ``'roi'``):
      what the distillation terms (Chen et al.) read next to a teacher scoring ``aux['roi'].rois``.
    """
    rpn_key, roi_key = jax.random.split(key)
    out = model.apply(variables, images, method="features_and_rpn")
    proposals, _, valid = model_proposals(model, out, images.shape[1:3])
    rpn = rpn_targets(rpn_key, out["anchors"], gt_boxes, gt_labels, gt_valid, batch_size_per_image=rpn_batch_size)
    roi = roi_targets(roi_key, proposals, valid, gt_boxes, gt_labels, gt_valid, batch_size_per_image=roi_batch_size)
    logits, deltas = model.apply(variables, out["tap"], roi.rois, method="score_rois")
    terms = faster_rcnn_loss(out["rpn_logits"], out["rpn_deltas"], rpn, logits, deltas, roi,
                             rpn_batch_size=rpn_batch_size)
    outputs = {**out, "proposals": proposals, "proposal_valid": valid, "roi_logits": logits, "roi_deltas": deltas}
    return terms["total"], {"terms": terms, "outputs": outputs, "rpn": rpn, "roi": roi}
