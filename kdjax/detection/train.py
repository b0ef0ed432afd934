"""The detector's train step, scratch or distilled (Chen et al. 2017): one ``jax.jit`` with explicit
shardings, as :func:`kdjax.train.make_train_step` builds for classifiers.

``step(state, teacher_variables, batch) -> (state, metrics)`` with

* ``batch``: ``{'image': [B, H, W, 3] float, 'boxes': [B, G, 4] float (pixels, x1 y1 x2 y2),
  'labels': [B, G] int (data classes in [0, K)), 'valid': [B, G] bool}``, split over every device of
  the mesh (``B`` divisible by the device count). Check concrete ground truth on the host first
  (:func:`~kdjax.detection.targets.check_ground_truth`): inside ``jit`` it cannot raise.
* ``state``: a :class:`kdjax.train.TrainState` whose ``params`` are ``{'detector': ...}`` plus
  ``{'adapter': ...}`` (Chen et al.'s adaptation layer, part of the student) when distilling with a
  hint; replicated or FSDP-sharded (:func:`init_detection_state`); donated.
* ``teacher_variables``: the frozen teacher's variables (``{}`` for scratch), never optimised.

Per step: the student's training forward and targets (:func:`~kdjax.detection.targets.detector_loss`,
sampling keyed by ``fold_in(state.rng, step)``); in KD mode the live teacher on the same images with
its RoI head on the student's sampled RoIs (:func:`~kdjax.detection.model.teacher_on_rois`) and
:func:`~kdjax.detection.distill.chen_loss`. The teacher runs inside the differentiated function only
because it reads the student's RoIs, which carry no gradient (proposals are under ``stop_gradient``),
and its outputs enter every loss under ``stop_gradient``: no teacher backward pass is traced. The
update and its non-finite guard are :func:`kdjax.train.apply_gradients`.

metrics (replicated): ``loss/<term>`` (``faster_rcnn_loss``'s or ``chen_loss``'s terms, ``loss/total``),
``grad_norm``, ``finite``, ``skipped``.

Evaluation: :func:`make_detection_eval_step` (jitted forward + :func:`~kdjax.detection.model.postprocess`,
batch split over the mesh; any detector's variables, the student's ``{'params': state.params['detector']}``
or a teacher's) and :func:`detection_map` (COCO mAP over eval batches through pycocotools, on the host).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from kdjax import sharding
from kdjax import train as train_lib
from kdjax.detection import distill
from kdjax.detection.evaluate import coco_map
from kdjax.detection.model import Detections, FasterRCNN, postprocess, teacher_on_rois
from kdjax.detection.targets import detector_loss
from kdjax.models import Regressor
from kdjax.train import TrainState

BATCH_KEYS = ("image", "boxes", "labels", "valid")


def hint_features(outputs: dict[str, Any], layer: str) -> jax.Array:
    """The feature map ``layer`` (``'tap'`` or a backbone stage ``'stage1'`` ..) of a detector's outputs."""
    if layer == "tap":
        return outputs["tap"]
    if layer not in outputs["features"]:
        raise ValueError(f"unknown hint layer {layer!r}; the detector has 'tap' and {sorted(outputs['features'])}")
    return outputs["features"][layer]


def init_detection_state(student: FasterRCNN, tx: optax.GradientTransformation, *, seed: int, mesh: Mesh,
                         mode: sharding.ParamMode = "replicate", adapter: Regressor | None = None,
                         hint_layer: str = "tap") -> tuple[TrainState, Any]:
    """A fresh :class:`~kdjax.train.TrainState` of ``student`` (and ``adapter`` on its ``hint_layer``)
    initialised from ``seed`` directly into its shardings (``mode``); returns ``(state, shardings)``.

    The parameters do not depend on the image size, so the init runs on one ``2 stride`` square image,
    and it scores one given RoI instead of making proposals: the same parameters as ``student.init``
    (proposals have none), without compiling the proposal NMS (seconds per model on a CPU).
    """
    side = 2 * student.stride
    sample = jnp.zeros((1, side, side, 3), jnp.float32)
    roi = jnp.asarray([[[0.0, 0.0, side, side]]], jnp.float32)

    def init(key):
        det_key, adapter_key, state_key = jax.random.split(key, 3)
        params = {"detector": student.init(det_key, sample, rois=roi)["params"]}
        if adapter is not None:
            features = student.apply({"params": params["detector"]}, sample, method="features_and_rpn")
            params["adapter"] = adapter.init(adapter_key, hint_features(features, hint_layer))["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={}, opt_state=tx.init(params),
                          rng=state_key, skipped=jnp.zeros((), jnp.int32))

    key = jax.random.PRNGKey(seed)
    shardings = sharding.tree_shardings(jax.eval_shape(init, key), mesh, mode)
    return jax.jit(init, out_shardings=shardings)(key), shardings


def _check_setup(student: FasterRCNN, teacher: FasterRCNN | None, config: distill.ChenConfig | None,
                 adapter: Regressor | None) -> None:
    if (teacher is None) != (config is None):
        raise ValueError("KD mode needs both a teacher and a ChenConfig, scratch mode neither; got "
                         f"teacher={'given' if teacher is not None else None}, config={config}")
    if config is None:
        if adapter is not None:
            raise ValueError("an adapter (adaptation layer) was given for a scratch run; it is only read by the "
                             "hint of KD mode")
        return
    if teacher.num_classes != student.num_classes:
        raise ValueError(f"the teacher has {teacher.num_classes} foreground classes but the student has "
                         f"{student.num_classes}: they must share the label space (same classes, same order)")
    if config.hint_weight > 0 and adapter is None:
        raise ValueError(f"config.hint_weight = {config.hint_weight} needs an adaptation layer: pass "
                         "adapter=kdjax.detection.distill.adaptation_layer(teacher channels) (and the same to "
                         "init_detection_state), or use hint_weight=0")


def make_detection_train_step(student: FasterRCNN, tx: optax.GradientTransformation, *, mesh: Mesh,
                              state_shardings: Any, teacher: FasterRCNN | None = None,
                              teacher_shardings: Any = None, config: distill.ChenConfig | None = None,
                              adapter: Regressor | None = None, hint_layer: str = "tap",
                              rpn_batch_size: int = 256, roi_batch_size: int = 128,
                              guard_nonfinite: bool = True, donate: bool = True):
    """Build the jitted, sharded ``step(state, teacher_variables, batch) -> (state, metrics)`` (module
    docstring): scratch (no ``teacher``/``config``) or KD (both; ``adapter`` when
    ``config.hint_weight > 0``, on ``hint_layer`` of both detectors). ``rpn_batch_size`` /
    ``roi_batch_size``: anchors / RoIs sampled per image (Faster R-CNN: 256 / 512; 128 for small images).
    Raises ``ValueError`` for an inconsistent setup, and at the first call for a teacher whose anchors
    differ from the student's when ``config.distill_rpn``.
    """
    _check_setup(student, teacher, config, adapter)

    def step_fn(state: TrainState, teacher_variables, batch):
        missing = set(BATCH_KEYS) - set(batch)
        if missing:
            raise ValueError(f"the detection batch lacks {sorted(missing)}; it needs {list(BATCH_KEYS)}")
        images = batch["image"]
        if config is not None and config.distill_rpn:
            size = tuple(images.shape[1:3])
            distill.check_same_anchors(student.anchors(size), teacher.anchors(size))
        key = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            total, aux = detector_loss(student, {"params": params["detector"]}, images, batch["boxes"],
                                       batch["labels"], batch["valid"], key, rpn_batch_size=rpn_batch_size,
                                       roi_batch_size=roi_batch_size)
            if teacher is None:
                return total, aux["terms"]
            t_out = teacher_on_rois(teacher, teacher_variables, images, aux["roi"].rois, student.num_classes,
                                    roi_valid=aux["roi"].valid)
            hint = None
            if adapter is not None:
                adapted = adapter.apply({"params": params["adapter"]}, hint_features(aux["outputs"], hint_layer))
                hint = (adapted, hint_features(t_out, hint_layer))
            terms = distill.chen_loss(aux, t_out, config, rpn_batch_size=rpn_batch_size, hint=hint)
            return terms["total"], terms

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state, grad_norm, finite = train_lib.apply_gradients(state, grads, loss, tx, state.batch_stats,
                                                                 guard_nonfinite)
        metrics = {f"loss/{name}": value for name, value in terms.items()}
        metrics.update(grad_norm=grad_norm, finite=finite, skipped=new_state.skipped)
        return new_state, metrics

    return train_lib._jit_step(step_fn, mesh, state_shardings, teacher_shardings,
                               out_shardings=(state_shardings, sharding.replicated(mesh)),
                               donate_argnums=(0,) if donate else ())


def make_detection_eval_step(model: FasterRCNN, *, mesh: Mesh, variables_shardings: Any = None,
                             score_threshold: float = 0.05, nms_threshold: float = 0.5, max_detections: int = 100):
    """``eval_step(variables, images [B, H, W, 3]) -> Detections`` (``[B, D, ...]``, split over the
    mesh like the images): ``model``'s forward (its own proposals) and
    :func:`~kdjax.detection.model.postprocess` with Detectron2's test settings (score > 0.05, NMS 0.5,
    100 per image), one ``jax.jit``. ``variables_shardings``: replicated when not given."""
    shardings = sharding.replicated(mesh) if variables_shardings is None else variables_shardings

    def eval_fn(variables, images):
        out = model.apply(variables, images)
        return postprocess(out["roi_logits"], out["roi_deltas"], out["rois"], out["roi_valid"], images.shape[1:3],
                           score_threshold=score_threshold, nms_threshold=nms_threshold,
                           max_detections=max_detections)

    batch = sharding.batch_sharding(mesh)
    return jax.jit(eval_fn, in_shardings=(shardings, batch), out_shardings=batch)


def detection_map(eval_step, variables: Any, batches: Iterable[Mapping[str, Any]], num_classes: int,
                  mesh: Mesh) -> dict:
    """COCO mAP (:func:`~kdjax.detection.evaluate.coco_map`) of ``eval_step``'s detections over
    ``batches`` (host-local dicts with ``image``, ``boxes``, ``labels``, ``valid`` and optionally the
    eval pipeline's ``mask``: rows with ``mask=False`` are padding and left out)."""
    ground_truth, detections = [], []
    for batch in batches:
        det: Detections = jax.device_get(eval_step(variables, sharding.global_batch({"image": batch["image"]},
                                                                                     mesh)["image"]))
        mask = batch.get("mask")
        for i in range(len(batch["image"])):
            if mask is not None and not mask[i]:
                continue
            ground_truth.append({"boxes": batch["boxes"][i], "labels": batch["labels"][i], "valid": batch["valid"][i]})
            detections.append({"boxes": det.boxes[i], "scores": det.scores[i], "labels": det.classes[i],
                               "valid": det.valid[i]})
    return coco_map(ground_truth, detections, num_classes)
