"""Two-stage (Faster R-CNN-shaped) detectors in JAX (issue 18): building blocks and the model.

Boxes are ``[..., 4]`` float ``(x1, y1, x2, y2)`` in pixels (width ``x2 - x1``, no ``+ 1``).

* :mod:`kdjax.detection.boxes`: validation, areas, IoU, Faster R-CNN box encoding/decoding,
  clipping.
* :mod:`kdjax.detection.anchors`: Faster R-CNN anchors per feature-map cell (sizes x aspect
  ratios at a stride), one or several levels.
* :mod:`kdjax.detection.nms`: greedy NMS with a fixed output size (indices + valid mask), jittable,
  per-class via ``classes``, batched by ``vmap`` (:func:`~kdjax.detection.nms.batched_nms`).
* :mod:`kdjax.detection.roi_align`: RoIAlign over NHWC features (torchvision / Detectron2 semantics,
  ``aligned=True`` by default, fixed ``sampling_ratio``), differentiable.
* :mod:`kdjax.detection.matching`: Detectron2's ``Matcher`` (IoU thresholds, low-quality matches)
  and balanced positive/negative sampling of a fixed count, jittable, deterministic given a key.
* :mod:`kdjax.detection.model`: the Faster R-CNN-shaped detector (:class:`~kdjax.detection.model.FasterRCNN`,
  sizes ``tiny`` .. ``large`` from one definition): backbone tap, RPN, proposals (top-k + NMS inside
  ``jit``), RoIAlign box head with class-specific deltas; a teacher scores given RoIs
  (``apply(..., rois=...)``, :func:`~kdjax.detection.model.teacher_on_rois`); post-processing.
* :mod:`kdjax.detection.targets`: RPN and RoI-head target assignment (matching + sampling + encoding)
  and the plain Faster R-CNN loss, pure functions over padded ground truth.
* :mod:`kdjax.detection.distill`: Chen et al. (2017)'s distillation recipe as pure functions over
  the loss's aux and a teacher's outputs on the student's RoIs (RPN + RoI class-weighted soft
  targets, teacher-bounded regression, adapted hint), :class:`~kdjax.detection.distill.ChenConfig`.
* :mod:`kdjax.detection.train`: the jitted, sharded detector train step (scratch or KD with a live
  teacher), the eval step and :func:`~kdjax.detection.train.detection_map`.
* :mod:`kdjax.detection.evaluate`: COCO-style mAP@[.5:.95], mAP@0.5, mAP@0.75 and AP per class through
  ``pycocotools`` (in memory, silent); imports pycocotools only when called.
"""
