"""A Faster R-CNN-shaped two-stage detector in Flax Linen, in several sizes from one definition.

Shape of the model (Ren et al. 2015, with Detectron2's choices where the paper leaves one open):

* **Backbone**: ``log2(stride)`` stages of ``depth`` 3x3 conv + ReLU layers (padding 1), stage ``s``
  with ``width * 2**s`` channels, its first conv of stride 2, so a ``[B, H, W, 3]`` image gives
  ``stage1`` .. ``stageS`` at strides 2, 4, .., ``stride`` (``ceil`` of each halving). The last stage
  is the **tap** the RPN and the RoI head read (one level, like the paper's VGG16 ``conv5_3``).
* **RPN head** (Detectron2 ``StandardRPNHead``): 3x3 conv + ReLU keeping the tap's channels, then 1x1
  convs to ``A`` objectness logits and ``4 A`` box deltas per cell, ``A = len(anchor_sizes) *
  len(aspect_ratios)`` anchors from :func:`kdjax.detection.anchors.grid_anchors` (ordered as
  ``[H, W, A]`` flattened, the same order as the head's outputs).
* **Proposals** (Detectron2 ``find_top_rpn_proposals``, one level), inside ``jit``: top
  ``pre_nms_topk`` anchors by objectness, decode (RPN weights ``(1, 1, 1, 1)``), clip to the image,
  drop boxes with a side ``<= min_proposal_size``, NMS at ``rpn_nms_threshold`` (0.7), keep the
  first ``num_proposals`` with a valid mask. The RPN outputs enter this under ``stop_gradient``:
  proposals are constants for the RoI head, as in Faster R-CNN's approximate joint training.
* **RoI head** (Faster R-CNN's fc6/fc7 box head, Detectron2 ``FastRCNNConvFCHead`` 2fc):
  :func:`~kdjax.detection.roi_align.roi_align` (``pool_size`` x ``pool_size``, sampling ratio 2,
  aligned) on the tap, two Dense + ReLU of ``head_width``, then ``cls_score`` ``[B, R, K + 1]``
  (index 0 = background, class ``k`` of the data is index ``k + 1``) and **class-specific**
  ``bbox_pred`` ``[B, R, K + 1, 4]`` (torchvision's layout, with a background row that no loss
  reads; deltas use :data:`~kdjax.detection.boxes.ROI_HEAD_WEIGHTS`).

Every output is a dict (not the classifiers' ``(logits, features)`` pair, see :meth:`FasterRCNN.__call__`).
A teacher scores a student's RoIs with ``teacher.apply(variables, images, rois=student_rois)`` (its
own RPN still runs, for RPN-level distillation, but it makes no proposals), or with
:func:`teacher_on_rois`, which also checks that the teacher has the student's class count.

Initialisation (Detectron2): convs of the backbone He-normal (fan-in), RPN and ``cls_score``
normal with std 0.01, ``bbox_pred`` std 0.001, fc layers PyTorch's ``nn.Linear`` uniform; biases 0.

Training-time target assignment and the loss are pure functions in :mod:`kdjax.detection.targets`
(:func:`~kdjax.detection.targets.detector_loss` is the whole training forward); inference
post-processing is :func:`postprocess` here.

``init`` runs the whole forward, proposal NMS included: jit it (``jax.jit(model.init)``; eager it takes
~20 s on a 2-core CPU, jitted ~2 s), on any image size (the parameters do not depend on it).
Everything runs inside one ``jax.jit``; the only host-side pieces are the anchors (NumPy constants
from the static shapes) and :func:`~kdjax.detection.targets.check_ground_truth` (concrete inputs).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.detection import anchors as anchors_lib
from kdjax.detection import boxes as boxes_lib
from kdjax.detection.nms import batched_nms
from kdjax.detection.roi_align import roi_align
from kdjax.models.resnet import dense_init
from kdjax.models.small import conv_stages

Dtype = Any

#: Sizes sharing the one definition: ``width`` (channels of stage 1), ``depth`` (convs per stage),
#: ``head_width`` (RoI fc layers). All share ``stride`` and the anchors, so a student's RPN outputs
#: line up anchor by anchor with any teacher's (kdjax's choice of sizes, for 64-128 px canvases).
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"width": 8, "depth": 1, "head_width": 64},
    "small": {"width": 16, "depth": 1, "head_width": 128},
    "medium": {"width": 24, "depth": 2, "head_width": 256},
    "large": {"width": 32, "depth": 3, "head_width": 512},
}

_rpn_init = nn.initializers.normal(0.01)
_cls_init = nn.initializers.normal(0.01)
_box_init = nn.initializers.normal(0.001)


class Backbone(nn.Module):
    """``log2(stride)`` conv stages; returns the last stage and writes ``stage1`` .. into a dict."""
    width: int
    depth: int
    num_stages: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        features: dict[str, jax.Array] = {}
        widths = tuple(self.width * 2 ** s for s in range(self.num_stages))
        x = conv_stages(x.astype(self.dtype), widths, (2,) * self.num_stages, self.depth, 3, self.dtype,
                        self.param_dtype, features)
        return x, features


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then per-anchor objectness logits ``[B, H*W*A]`` and deltas ``[B, H*W*A, 4]``."""
    num_anchors: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tap: jax.Array) -> tuple[jax.Array, jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_rpn_init)
        h = nn.relu(nn.Conv(tap.shape[-1], (3, 3), padding=((1, 1), (1, 1)), name="conv", **kw)(tap))
        logits = nn.Conv(self.num_anchors, (1, 1), name="objectness_logits", **kw)(h)
        deltas = nn.Conv(4 * self.num_anchors, (1, 1), name="anchor_deltas", **kw)(h)
        b = tap.shape[0]
        return (logits.astype(jnp.float32).reshape(b, -1),
                deltas.astype(jnp.float32).reshape(b, -1, 4))


class RoIHead(nn.Module):
    """RoIAlign on the tap, two fc + ReLU, class logits ``[B, R, K+1]`` and deltas ``[B, R, K+1, 4]``."""
    num_classes: int
    head_width: int
    pool_size: int
    stride: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tap: jax.Array, rois: jax.Array) -> tuple[jax.Array, jax.Array]:
        pooled = roi_align(tap, rois, self.pool_size, spatial_scale=1.0 / self.stride, sampling_ratio=2,
                           aligned=True)
        b, r = rois.shape[:2]
        h = pooled.reshape(b, r, -1).astype(self.dtype)
        for i in (1, 2):
            h = nn.relu(nn.Dense(self.head_width, dtype=self.dtype, param_dtype=self.param_dtype,
                                 kernel_init=dense_init, name=f"fc{i}")(h))
        h = h.astype(jnp.float32)
        k1 = self.num_classes + 1
        logits = nn.Dense(k1, dtype=jnp.float32, param_dtype=self.param_dtype, kernel_init=_cls_init,
                          name="cls_score")(h)
        deltas = nn.Dense(4 * k1, dtype=jnp.float32, param_dtype=self.param_dtype, kernel_init=_box_init,
                          name="bbox_pred")(h)
        return logits, deltas.reshape(b, r, k1, 4)


def _check_image(x: jax.Array, stride: int) -> None:
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"FasterRCNN expects images of shape [B, H, W, 3] (NHWC, RGB); got shape "
                         f"{tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"FasterRCNN expects floating-point images, got dtype {x.dtype}; cast them first, "
                        "e.g. images.astype(jnp.float32) / 255")
    if x.shape[0] < 1 or min(x.shape[1:3]) < stride:
        raise ValueError(f"images of shape {tuple(x.shape)} are empty or smaller than the stride {stride}: "
                         f"need B >= 1 and H, W >= {stride}")


class FasterRCNN(nn.Module):
    """Two-stage detector (module docstring); ``num_classes`` = K foreground classes.

    Attributes:
      num_classes: ``K``; the RoI head has ``K + 1`` outputs, index 0 background.
      width, depth, head_width: the size (see :data:`SIZES`).
      stride: the tap's stride, a power of two >= 2 (8 for 64-128 px canvases; the paper's VGG16: 16).
      anchor_sizes, aspect_ratios, anchor_offset: the anchors (:func:`~kdjax.detection.anchors.grid_anchors`).
      pre_nms_topk: anchors kept by objectness before the proposal NMS (Detectron2 test default 1000;
        here fewer for small images, capped at the anchor count).
      num_proposals: ``R``, proposals per image after NMS (Detectron2 1000; fixed, with a valid mask).
      rpn_nms_threshold: IoU of the proposal NMS (0.7, Ren et al.).
      min_proposal_size: proposals with width or height ``<=`` this are dropped (Detectron2: 0).
      pool_size: RoIAlign output ``pool_size x pool_size`` (7, Detectron2).
    """
    num_classes: int
    width: int = 16
    depth: int = 1
    head_width: int = 128
    stride: int = 8
    anchor_sizes: Sequence[float] = (16.0, 32.0, 64.0)
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)
    anchor_offset: float = 0.0
    pre_nms_topk: int = 300
    num_proposals: int = 100
    rpn_nms_threshold: float = 0.7
    min_proposal_size: float = 0.0
    pool_size: int = 7
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        for name in ("num_classes", "width", "depth", "head_width", "pre_nms_topk", "num_proposals", "pool_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FasterRCNN: {name} must be an integer >= 1; got {name}={value!r}")
        if not (isinstance(self.stride, int) and self.stride >= 2 and self.stride & (self.stride - 1) == 0):
            raise ValueError(f"FasterRCNN: stride must be a power of two >= 2; got {self.stride!r}")
        anchors_lib.cell_anchors(self.anchor_sizes, self.aspect_ratios)  # validates them
        if not 0.0 <= self.rpn_nms_threshold <= 1.0:
            raise ValueError(f"FasterRCNN: rpn_nms_threshold must be in [0, 1]; got {self.rpn_nms_threshold}")
        super().__post_init__()

    @property
    def num_anchors(self) -> int:
        """Anchors per feature-map cell."""
        return len(self.anchor_sizes) * len(self.aspect_ratios)

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.backbone = Backbone(self.width, self.depth, int(math.log2(self.stride)), **kw)
        self.rpn = RPNHead(self.num_anchors, **kw)
        self.roi_head = RoIHead(self.num_classes, self.head_width, self.pool_size, self.stride, **kw)

    def anchors(self, image_size: tuple[int, int]) -> np.ndarray:
        """``[N, 4]`` float32 anchors of an ``(H, W)`` image (host-side constants)."""
        h, w = image_size
        for _ in range(int(math.log2(self.stride))):
            h, w = (h + 1) // 2, (w + 1) // 2  # each stride-2 conv (kernel 3, padding 1): ceil(n / 2)
        return anchors_lib.grid_anchors((h, w), self.stride, self.anchor_sizes, self.aspect_ratios,
                                        self.anchor_offset).reshape(-1, 4)

    def features_and_rpn(self, x: jax.Array) -> dict[str, Any]:
        """Backbone and RPN head: ``features`` (``stage1`` ..), ``tap``, ``rpn_logits`` ``[B, N]``,
        ``rpn_deltas`` ``[B, N, 4]``, ``anchors`` ``[N, 4]``."""
        _check_image(x, self.stride)
        tap, features = self.backbone(x)
        logits, deltas = self.rpn(tap)
        anchors = jnp.asarray(self.anchors(x.shape[1:3]))
        if anchors.shape[0] != logits.shape[1]:  # the stride arithmetic above must match the backbone
            raise AssertionError(f"{anchors.shape[0]} anchors for {logits.shape[1]} RPN outputs")
        return {"features": features, "tap": tap, "rpn_logits": logits, "rpn_deltas": deltas,
                "anchors": anchors}

    def propose(self, rpn_logits: jax.Array, rpn_deltas: jax.Array, anchors: jax.Array,
                image_size: tuple[int, int]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Proposals ``[B, R, 4]``, their objectness logits ``[B, R]`` and valid mask ``[B, R]``, all
        under ``stop_gradient`` (module docstring)."""
        return model_proposals(self, {"rpn_logits": rpn_logits, "rpn_deltas": rpn_deltas, "anchors": anchors},
                               image_size)

    def score_rois(self, tap: jax.Array, rois: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The RoI head on ``rois`` ``[B, R, 4]`` (image pixels): ``roi_logits`` ``[B, R, K+1]``,
        ``roi_deltas`` ``[B, R, K+1, 4]``."""
        rois = boxes_lib._float_boxes(rois, "rois")
        if rois.ndim != 3 or rois.shape[0] != tap.shape[0]:
            raise ValueError(f"rois must be [B, R, 4] with B = {tap.shape[0]} (the batch); got {rois.shape}")
        return self.roi_head(tap, rois)

    def __call__(self, x: jax.Array, rois: jax.Array | None = None, roi_valid: jax.Array | None = None,
                 train: bool = False) -> dict[str, Any]:
        """The whole detector on ``x`` ``[B, H, W, 3]``.

        Args:
          x: float images, NHWC.
          rois: optional ``[B, R, 4]`` boxes to score instead of this model's own proposals (a
            teacher scoring the student's RoIs; the RPN outputs are still computed).
          roi_valid: optional ``[B, R]`` bool of ``rois`` (default all True); returned as ``roi_valid``.
          train: unused (no BatchNorm or dropout); kept for the models' calling convention.

        Returns:
          dict with ``features`` (``stage1`` .. ``stageS``), ``tap`` (= ``stageS``), ``rpn_logits``
          ``[B, N]``, ``rpn_deltas`` ``[B, N, 4]``, ``anchors`` ``[N, 4]``, ``rois`` ``[B, R, 4]``
          (the proposals, or the given ``rois``), ``roi_valid`` ``[B, R]``, ``roi_scores`` ``[B, R]``
          (proposal objectness logits; zeros for given rois), ``roi_logits`` ``[B, R, K+1]`` and
          ``roi_deltas`` ``[B, R, K+1, 4]``. All float32 except the features (compute dtype).
        """
        del train
        if rois is not None:
            rois = boxes_lib._float_boxes(rois, "rois")
            if rois.ndim != 3 or rois.shape[0] != x.shape[0]:
                raise ValueError(f"rois must be [B, R, 4] with B = {x.shape[0]} (the images' batch); "
                                 f"got {rois.shape}")
        out = self.features_and_rpn(x)
        if rois is None:
            rois, scores, valid = self.propose(out["rpn_logits"], out["rpn_deltas"], out["anchors"], x.shape[1:3])
        else:
            valid = (jnp.ones(rois.shape[:2], bool) if roi_valid is None
                     else jnp.broadcast_to(jnp.asarray(roi_valid, bool), rois.shape[:2]))
            scores = jnp.zeros(rois.shape[:2], jnp.float32)
        logits, deltas = self.score_rois(out["tap"], rois)
        return {**out, "rois": rois, "roi_valid": valid, "roi_scores": scores, "roi_logits": logits,
                "roi_deltas": deltas}


def proposals_from_rpn(rpn_logits: jax.Array, rpn_deltas: jax.Array, anchors: jax.Array,
                       image_size: tuple[int, int], *, pre_nms_topk: int, num_proposals: int,
                       nms_threshold: float = 0.7, min_size: float = 0.0
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """RPN outputs to a fixed number of proposals per image (Detectron2 ``find_top_rpn_proposals``).

    Top ``min(pre_nms_topk, N)`` anchors by logit -> decode (weights 1) -> clip to ``(H, W)`` -> drop
    boxes with a side ``<= min_size`` -> NMS at ``nms_threshold`` -> first ``num_proposals``.
    Everything is under ``stop_gradient``.

    Returns:
      ``(boxes [B, R, 4], logits [B, R], valid [B, R])``; invalid rows hold a zero box and logit -inf.
    """
    logits = jax.lax.stop_gradient(rpn_logits)
    deltas = jax.lax.stop_gradient(rpn_deltas)
    k = min(int(pre_nms_topk), logits.shape[1])
    top, index = jax.lax.top_k(logits, k)  # [B, k]
    picked_deltas = jnp.take_along_axis(deltas, index[..., None], axis=1)
    picked_anchors = jnp.asarray(anchors)[index]
    height, width = image_size
    boxes = boxes_lib.clip_to_image(boxes_lib.decode(picked_deltas, picked_anchors), height, width)
    big = ((boxes[..., 2] - boxes[..., 0]) > min_size) & ((boxes[..., 3] - boxes[..., 1]) > min_size)
    keep, valid = batched_nms(boxes, top, nms_threshold, int(num_proposals), where=big & jnp.isfinite(top))
    out = jnp.take_along_axis(boxes, keep[..., None], axis=1)
    out = jnp.where(valid[..., None], out, 0.0)
    scores = jnp.where(valid, jnp.take_along_axis(top, keep, axis=1), -jnp.inf)
    return out, scores, valid


def model_proposals(model: FasterRCNN, outputs: dict[str, Any], image_size: tuple[int, int]
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`proposals_from_rpn` with ``model``'s settings on its :meth:`FasterRCNN.features_and_rpn`
    ``outputs`` (callable outside ``apply``: proposals have no parameters)."""
    return proposals_from_rpn(outputs["rpn_logits"], outputs["rpn_deltas"], outputs["anchors"], image_size,
                              pre_nms_topk=model.pre_nms_topk, num_proposals=model.num_proposals,
                              nms_threshold=model.rpn_nms_threshold, min_size=model.min_proposal_size)


def create(size: str, num_classes: int, **kwargs) -> FasterRCNN:
    """``FasterRCNN`` of a named size (:data:`SIZES`) with ``num_classes`` foreground classes;
    ``kwargs`` override any attribute (e.g. ``num_proposals``, ``stride``)."""
    if size not in SIZES:
        raise ValueError(f"unknown detector size {size!r}; sizes: {', '.join(SIZES)}")
    return FasterRCNN(num_classes=num_classes, **{**SIZES[size], **kwargs})


def _roi_cls_kernel_classes(variables: Any) -> int | None:
    try:
        return int(variables["params"]["roi_head"]["cls_score"]["kernel"].shape[-1]) - 1
    except (KeyError, TypeError, AttributeError, IndexError):
        return None


def teacher_on_rois(teacher: FasterRCNN, teacher_variables: Any, images: jax.Array, rois: jax.Array,
               num_classes: int, roi_valid: jax.Array | None = None) -> dict[str, Any]:
    """A teacher's outputs with its RoI head on given ``rois`` (the student's proposals), as Chen et
    al. (2017) distil the RoI head; raises ``ValueError`` if the teacher does not have
    ``num_classes`` foreground classes (by its attribute and by its ``cls_score`` parameters).

    Returns ``teacher.apply(teacher_variables, images, rois=rois)``: ``roi_logits`` ``[B, R, K+1]``,
    ``roi_deltas`` ``[B, R, K+1, 4]``, the teacher's RPN outputs and its ``tap``.
    """
    have = {teacher.num_classes, _roi_cls_kernel_classes(teacher_variables)} - {None}
    if have != {int(num_classes)}:
        raise ValueError(f"the teacher has {sorted(have)} foreground classes but the student has {num_classes}: "
                         "a teacher scoring the student's RoIs must share its label space (same classes, "
                         "same order)")
    return teacher.apply(teacher_variables, images, rois=rois, roi_valid=roi_valid)


class Detections(NamedTuple):
    """:func:`postprocess` output, ``D = max_detections`` slots per image, best first."""
    boxes: jax.Array    #: ``[B, D, 4]`` in image pixels, clipped.
    scores: jax.Array   #: ``[B, D]`` softmax probability of the class.
    classes: jax.Array  #: ``[B, D]`` int32 data class ids in ``[0, K)`` (background excluded).
    valid: jax.Array    #: ``[B, D]`` bool.


def postprocess(roi_logits: jax.Array, roi_deltas: jax.Array, rois: jax.Array, roi_valid: jax.Array,
                image_size: tuple[int, int], *, score_threshold: float = 0.05, nms_threshold: float = 0.5,
                max_detections: int = 100) -> Detections:
    """Detections from the RoI head (Detectron2 ``fast_rcnn_inference``), jittable.

    Per RoI and foreground class ``k``: score ``softmax(roi_logits)[k + 1]``, box ``decode(roi_deltas[k + 1],
    roi, ROI_HEAD_WEIGHTS)`` clipped to the image; candidates with score ``> score_threshold`` (0.05),
    per-class NMS at ``nms_threshold`` (0.5), the ``max_detections`` (100) best per image.
    """
    b, r, k1 = roi_logits.shape
    if roi_deltas.shape != (b, r, k1, 4) or rois.shape != (b, r, 4) or roi_valid.shape != (b, r):
        raise ValueError(f"postprocess needs roi_logits [B, R, K+1], roi_deltas [B, R, K+1, 4], rois [B, R, 4] "
                         f"and roi_valid [B, R]; got {roi_logits.shape}, {roi_deltas.shape}, {rois.shape}, "
                         f"{roi_valid.shape}")
    k = k1 - 1
    probs = jax.nn.softmax(roi_logits.astype(jnp.float32), axis=-1)[..., 1:]  # [B, R, K]
    height, width = image_size
    boxes = boxes_lib.decode(roi_deltas[:, :, 1:], rois[:, :, None, :], boxes_lib.ROI_HEAD_WEIGHTS)
    boxes = boxes_lib.clip_to_image(boxes, height, width)  # [B, R, K, 4]
    classes = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (b, r, k)).reshape(b, r * k)
    where = jnp.broadcast_to(roi_valid[..., None], (b, r, k)).reshape(b, r * k)
    boxes, probs = boxes.reshape(b, r * k, 4), probs.reshape(b, r * k)
    keep, valid = batched_nms(boxes, probs, nms_threshold, int(max_detections), score_threshold=score_threshold,
                              where=where, classes=classes)
    take = lambda a: jnp.take_along_axis(a, keep, axis=1)  # noqa: E731
    return Detections(jnp.where(valid[..., None], jnp.take_along_axis(boxes, keep[..., None], axis=1), 0.0),
                      jnp.where(valid, take(probs), 0.0), jnp.where(valid, take(classes), 0), valid)
