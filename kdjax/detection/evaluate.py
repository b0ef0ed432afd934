"""COCO-style detection mAP through ``pycocotools`` (the reference COCO evaluation), in memory.

:func:`coco_map` builds pycocotools' ``COCO`` ground-truth and detection objects from arrays
(nothing is written to disk, its prints are silenced), runs ``COCOeval`` for boxes and returns
mAP@[.5:.95] (the COCO metric: AP averaged over IoU thresholds 0.50, 0.55, ..., 0.95 and 101
recall points, then over classes), mAP@0.5 (PASCAL VOC-style threshold, COCO's interpolation),
mAP@0.75, and AP per class.

Conventions (pycocotools'): a detection matches a ground truth when their IoU is ``>=`` the
threshold; each ground truth matches at most one detection, taken in decreasing score order; at
most ``max_detections`` detections per image *and class* (highest scores) count; classes with no ground
truth in the whole set are left out of the mean (their AP is NaN here). pycocotools is imported
on the first call (the ``experiments`` extra), not with :mod:`kdjax.detection`.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence

import numpy as np

from kdjax.detection.boxes import validate_boxes


def _rows(item: Mapping, index: int, kind: str, keys: tuple[str, ...], num_classes: int):
    """One image's boxes [n, 4], labels [n] (and scores [n]) as NumPy, ``valid`` rows only, checked."""
    missing = [k for k in keys if k not in item]
    if missing:
        raise ValueError(f"{kind}[{index}] lacks {missing}: each entry needs {list(keys)} "
                         "(and optionally 'valid')")
    boxes = np.asarray(item["boxes"])
    if boxes.size == 0:  # [] or [0, 4]: no boxes
        boxes = np.zeros((0, 4), np.float64)
    if boxes.ndim != 2:
        raise ValueError(f"{kind}[{index}]['boxes'] must be [n, 4], got shape {boxes.shape}")
    n = boxes.shape[0]
    valid = np.ones(n, bool) if item.get("valid") is None else np.asarray(item["valid"], bool)
    arrays = [np.asarray(item[k]) for k in keys[1:]]
    for key, array in zip(keys[1:], arrays):
        if array.shape != (n,):
            raise ValueError(f"{kind}[{index}]['{key}'] must have shape [{n}] (one per box), got {array.shape}")
    if valid.shape != (n,):
        raise ValueError(f"{kind}[{index}]['valid'] must have shape [{n}], got {valid.shape}")
    validate_boxes(boxes, f"{kind}[{index}]['boxes']", where=valid)
    labels = arrays[0]
    if not np.issubdtype(labels.dtype, np.integer) and n:
        raise TypeError(f"{kind}[{index}]['labels'] must be integers, got dtype {labels.dtype}")
    bad = valid & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        raise ValueError(f"{kind}[{index}]['labels'] has class id {int(labels[bad][0])} outside "
                         f"[0, {num_classes}) (num_classes={num_classes})")
    if len(arrays) > 1 and not np.isfinite(arrays[1][valid]).all():
        raise ValueError(f"{kind}[{index}]['scores'] has a non-finite score")
    return [np.asarray(a)[valid] for a in (boxes, *arrays)]


def _coco(images, categories, annotations):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {"images": images, "categories": categories, "annotations": annotations}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_map(ground_truth: Sequence[Mapping], detections: Sequence[Mapping], num_classes: int,
             max_detections: int = 100) -> dict:
    """COCO box mAP of detections against ground truth, one entry per image.

    Args:
      ground_truth: per image, ``{'boxes': [n, 4] (x1, y1, x2, y2), 'labels': [n] int in
        [0, num_classes)}``, optionally ``'valid': [n] bool`` (padding rows False).
      detections: per image (same order and length), ``{'boxes': [k, 4], 'scores': [k],
        'labels': [k]}``, optionally ``'valid'`` (e.g. :func:`kdjax.detection.nms.nms`'s mask).
      num_classes: the number of object classes (no background class).
      max_detections: detections per image and class that count (COCO: 100; pycocotools applies
        the limit per image and category).

    Returns:
      ``{'map': mAP@[.5:.95], 'map50': mAP@0.5, 'map75': mAP@0.75, 'ap_per_class': [num_classes]
      AP@[.5:.95], 'ap50_per_class': [num_classes] AP@0.5}`` as floats / float64 arrays; NaN where
      there is no ground truth (a class: in the per-class arrays; the whole set: everywhere).

    Raises:
      ValueError / TypeError: mismatched lengths or shapes, invalid boxes (``x2 < x1``, non-finite),
        class ids out of range, non-finite scores.
    """
    from pycocotools.cocoeval import COCOeval

    if len(ground_truth) != len(detections):
        raise ValueError(f"{len(ground_truth)} ground-truth images but {len(detections)} detection entries; "
                         "give one detection entry (possibly empty) per image")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    num_classes = int(num_classes)
    if int(max_detections) < 1:
        raise ValueError(f"max_detections must be >= 1, got {max_detections}")
    max_detections = int(max_detections)
    images = [{"id": i + 1} for i in range(len(ground_truth))]
    categories = [{"id": c + 1, "name": str(c)} for c in range(num_classes)]

    def annotation(box, label, image, ann_id, score=None):
        x1, y1, x2, y2 = (float(v) for v in box)
        out = {"id": ann_id, "image_id": image + 1, "category_id": int(label) + 1, "iscrowd": 0,
               "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)}
        if score is not None:
            out["score"] = float(score)
        return out

    gt_anns, dt_anns = [], []
    for i, item in enumerate(ground_truth):
        boxes, labels = _rows(item, i, "ground_truth", ("boxes", "labels"), num_classes)
        gt_anns += [annotation(b, l, i, len(gt_anns) + k + 1) for k, (b, l) in enumerate(zip(boxes, labels))]
    for i, item in enumerate(detections):
        boxes, labels, scores = _rows(item, i, "detections", ("boxes", "labels", "scores"), num_classes)
        dt_anns += [annotation(b, l, i, len(dt_anns) + k + 1, s)
                    for k, (b, l, s) in enumerate(zip(boxes, labels, scores))]
    nan_classes = np.full(num_classes, np.nan)
    if not gt_anns:
        return {"map": float("nan"), "map50": float("nan"), "map75": float("nan"),
                "ap_per_class": nan_classes, "ap50_per_class": nan_classes.copy()}

    evaluator = COCOeval(_coco(images, categories, gt_anns), _coco(images, categories, dt_anns), "bbox")
    # pycocotools sorts maxDets and limits to the largest; stats[0:3] read maxDets[2]
    evaluator.params.maxDets = [1, min(10, max_detections), max_detections]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()  # stats[0:3]: AP@[.5:.95], AP@.5, AP@.75 at max_detections, area 'all'
    # precision: [T IoU thresholds, R recall points, K classes], area 'all', max_detections; -1 for a
    # class without ground truth (all its entries), else every entry is filled.
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    has_gt = (precision > -1).all(axis=(0, 1))
    ap = np.where(has_gt, precision.mean(axis=(0, 1)), np.nan)
    ap50 = np.where(has_gt, precision[0].mean(axis=0), np.nan)
    return {"map": float(evaluator.stats[0]), "map50": float(evaluator.stats[1]),
            "map75": float(evaluator.stats[2]),
            "ap_per_class": ap.astype(np.float64), "ap50_per_class": ap50.astype(np.float64)}
