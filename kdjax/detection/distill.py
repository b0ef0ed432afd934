"""Chen et al. (NeurIPS 2017) detection distillation as pure functions over a training forward.

"Learning Efficient Object Detection Models with Knowledge Distillation" trains a Faster R-CNN student
with, at **both** the RPN and the RoI head (their RCN), the losses (their Eqs. 1-3; ``N`` the
stage's normaliser)::

    L_cls = mu * L_hard(P_s, y) + (1 - mu) * L_soft(P_s, P_t),   L_soft = -sum_c w_c P_t,c log P_s,c
    L_reg = L_sL1(R_s, y_reg) + nu * L_b(R_s, R_t, y_reg)        (positive boxes only)
    L     = L_RPN + L_RCN + gamma * L_hint,   L_stage = 1/N sum L_cls + lambda/N sum L_reg

with ``L_b`` the teacher-bounded L2 (:func:`kdjax.losses.teacher_bounded_l2`, margin ``m``) and the
hint ``L_hint = ||V - Z||_2^2`` between the teacher's feature map ``Z`` and the student's after an
adaptation layer, ``V = r(student features)`` (:func:`adaptation_layer`).

Here the hard parts are :func:`~kdjax.detection.targets.faster_rcnn_loss`'s terms (``lambda = 1``,
its normalisers), read from :func:`~kdjax.detection.targets.detector_loss`'s ``aux``; the teacher's
outputs come from :func:`~kdjax.detection.model.teacher_on_rois` on the student's sampled RoIs
(``aux['roi'].rois``), whose RPN runs on the same image and, with the same stride and anchors, scores
the student's anchors one for one. :func:`chen_loss` adds the soft, bounded and hint terms:

* **RPN classification**: the objectness logit ``z`` is the two-class logit pair ``(0, z)``
  (background, object; ``softmax((0, z)) = (1 - sigmoid(z), sigmoid(z))``, so the hard two-class CE
  is the binary CE of ``faster_rcnn_loss``); soft term over the *sampled* anchors, weights
  ``(w0, 1)``, summed and divided by ``B * rpn_batch_size`` like the hard one.
* **RoI classification**: soft term over the sampled RoIs (``aux['roi'].valid``), weights ``w0`` on
  background (index 0) and 1 on the ``K`` classes, summed and divided by the sampled-RoI count.
* **Regression**: ``teacher_bounded_l2`` on the positive anchors (deltas, same normaliser as the RPN)
  and on the foreground RoIs (the ground-truth class's deltas of student and teacher, same
  normaliser as the RoI head).
* **Hint**: ``fitnet_hint`` (``1/2 ||V - Z||^2``, summed over the map: ``reduction='sum'``) averaged
  over the images.

kdjax's soft losses carry Hinton's ``T^2``; Chen et al.'s has none, so the soft terms here are
``class_weighted_soft_cross_entropy / T^2`` (identical at the paper's ``T = 1``). Every teacher input
is taken under ``stop_gradient``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import losses
from kdjax.models import Regressor

#: The parts :func:`ablation` switches on, by name.
PARTS = ("soft", "bounded", "hint")


@dataclasses.dataclass(frozen=True)
class ChenConfig:
    """The weights of Chen et al.'s recipe (module docstring), with their sources.

    Attributes:
      mu: weight of the hard classification loss, ``1 - mu`` the soft one's. Chen et al. define it
        (Eq. 2) but their main text gives no value: **kdjax's choice** 0.5, an even split.
        ``mu = 1`` leaves the soft term out.
      background_weight: ``w0``, the soft loss's weight of the background class (the others 1):
        **paper**, 1.5 (Sec. 3.2, for the imbalance of background and objects).
      temperature: ``T`` of the soft loss: **paper**, 1 ("no temperature at all (equivalent to
        T = 1)", Sec. 3.2, works best for detection in their study).
      nu: weight of the teacher-bounded regression loss (Sec. 3.3): **kdjax's choice** 0.5, the
        value the paper is cited for, not confirmed from its text here. 0 leaves it out.
      margin: ``m`` of the bounded loss: the paper names it but gives no value: **kdjax's choice** 0
        (penalise the student while it is no better than the teacher).
      hint_weight: weight of ``fitnet_hint``. The paper's ``gamma = 0.5`` (Eq. 1, "fixed to 1 and
        0.5" with ``lambda``) multiplies ``||V - Z||^2``, twice ``fitnet_hint``'s ``1/2 ||.||^2``:
        **paper**, ``2 * 0.5 = 1.0`` here. 0 leaves it out.
      hint_reduction: ``'sum'`` over the feature map (the paper's ``||V - Z||_2^2``) or ``'mean'``
        (**kdjax's option**, independent of the map's size).
      distill_rpn: distil the RPN as well as the RoI head (**paper**: both). Needs the teacher's
        anchors to be the student's (same stride, anchor sizes and ratios, image size).

    ``lambda = 1`` (the paper's regression weight) is :func:`~kdjax.detection.targets.faster_rcnn_loss`'s.
    """
    mu: float = 0.5
    background_weight: float = 1.5
    temperature: float = 1.0
    nu: float = 0.5
    margin: float = 0.0
    hint_weight: float = 1.0
    hint_reduction: str = "sum"
    distill_rpn: bool = True

    def __post_init__(self):
        checks = {"mu": 0.0 <= self.mu <= 1.0, "background_weight": self.background_weight >= 0,
                  "temperature": self.temperature > 0, "nu": self.nu >= 0, "margin": np.isfinite(self.margin),
                  "hint_weight": self.hint_weight >= 0}
        rules = {"mu": "in [0, 1]", "background_weight": ">= 0", "temperature": "> 0", "nu": ">= 0",
                 "margin": "finite", "hint_weight": ">= 0"}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"ChenConfig: {name} must be {rules[name]}; got {name}={getattr(self, name)!r}")
        if self.hint_reduction not in ("sum", "mean"):
            raise ValueError(f"ChenConfig: hint_reduction must be 'sum' or 'mean'; got {self.hint_reduction!r}")


def ablation(*parts: str, base: ChenConfig = ChenConfig()) -> ChenConfig:
    """``base`` with only the named parts of :data:`PARTS` on (``'soft'``: ``mu``; ``'bounded'``:
    ``nu``; ``'hint'``: ``hint_weight``), the others off (``mu = 1``, ``nu = 0``, ``hint_weight = 0``).

    ``ablation(*PARTS)`` is ``base``; ``ablation()`` has no distillation term left, so :func:`chen_loss`'s
    total equals the plain Faster R-CNN loss.
    """
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown distillation part(s) {sorted(unknown)}; parts: {', '.join(PARTS)}")
    return dataclasses.replace(base, mu=base.mu if "soft" in parts else 1.0,
                               nu=base.nu if "bounded" in parts else 0.0,
                               hint_weight=base.hint_weight if "hint" in parts else 0.0)


def adaptation_layer(teacher_channels: int, **kwargs) -> Regressor:
    """Chen et al.'s adaptation layer: a 1x1 conv (**kdjax's choice** of kernel; the paper requires
    only that it map the student's features to the teacher's channels) from the student's feature map
    ``[B, H, W, C_s]`` to ``[B, H, W, teacher_channels]``; ``kwargs`` go to
    :class:`~kdjax.models.Regressor`. Its parameters belong to the student."""
    return Regressor(features_out=int(teacher_channels), kind="conv", kernel_size=1, **kwargs)


def class_weights(num_logits: int, background_weight: float) -> jax.Array:
    """``[num_logits]`` weights: ``background_weight`` at index 0 (background), 1 elsewhere."""
    return jnp.ones((num_logits,), jnp.float32).at[0].set(background_weight)


def objectness_pair(logits: jax.Array) -> jax.Array:
    """RPN objectness logits ``[...]`` as two-class logits ``[..., 2]`` = ``(0, z)`` (background,
    object): their softmax is ``(1 - sigmoid(z), sigmoid(z))``."""
    logits = jnp.asarray(logits, jnp.float32)
    return jnp.stack([jnp.zeros_like(logits), logits], axis=-1)


def soft_classification(student_logits, teacher_logits, where, config: ChenConfig) -> jax.Array:
    """Chen et al.'s ``L_soft`` per row, ``[...]``: ``-sum_c w_c p_t,c log p_s,c`` with
    ``p = softmax(logits / T)`` (no ``T^2``), ``w = (w0, 1, .., 1)``; logits ``[..., C]``, ``where``
    ``[...]`` bool (False rows give 0)."""
    _check_same_classes(student_logits, teacher_logits)
    t = config.temperature
    weights = class_weights(student_logits.shape[-1], config.background_weight)
    return losses.class_weighted_soft_cross_entropy(student_logits, jax.lax.stop_gradient(teacher_logits),
                                                    weights, t, where=where) / t ** 2


def _check_same_classes(student_logits, teacher_logits) -> None:
    cs, ct = student_logits.shape[-1], teacher_logits.shape[-1]
    if cs != ct:
        raise ValueError(f"the teacher has {ct - 1} foreground classes but the student has {cs - 1} (logits "
                         f"[..., {ct}] and [..., {cs}], background included): the teacher scoring the student's "
                         "RoIs must share its label space (same classes, same order)")


def check_same_anchors(student_anchors, teacher_anchors) -> None:
    """Raises ``ValueError`` unless the two ``[N, 4]`` anchor sets are the same (shapes always, values
    when both are concrete): RPN distillation compares the two RPNs anchor by anchor."""
    fix = ("give both detectors the same stride, anchor_sizes, aspect_ratios and anchor_offset and the same "
           "image size, or distil the RoI head only (ChenConfig(distill_rpn=False))")
    if tuple(student_anchors.shape) != tuple(teacher_anchors.shape):
        raise ValueError(f"the teacher's RPN has anchors of shape {tuple(teacher_anchors.shape)} but the "
                         f"student's has {tuple(student_anchors.shape)}; {fix}")
    try:
        same = np.array_equal(np.asarray(student_anchors), np.asarray(teacher_anchors))
    except jax.errors.TracerArrayConversionError:  # traced: the models' static anchors were checked instead
        return
    if not same:
        raise ValueError(f"the teacher's RPN anchors differ from the student's (same count, other boxes); {fix}")


def hint_loss(adapted, teacher_features, reduction: str = "sum") -> jax.Array:
    """``masked_mean`` over the batch of ``fitnet_hint(adapted, teacher_features)``, a scalar:
    ``adapted`` is the adaptation layer's output ``[B, H, W, C_t]``, ``teacher_features`` the teacher's
    map of the same shape (taken under ``stop_gradient``)."""
    if tuple(adapted.shape) != tuple(teacher_features.shape):
        raise ValueError(f"the adapted student features {tuple(adapted.shape)} and the teacher's "
                         f"{tuple(teacher_features.shape)} differ: the adaptation layer must output the "
                         "teacher's channels (adaptation_layer(teacher_channels)) on a tap of the same stride")
    return losses.masked_mean(losses.fitnet_hint(adapted, jax.lax.stop_gradient(teacher_features),
                                                 reduction=reduction))


def _bounded(student, teacher, target, where, margin) -> jax.Array:
    """Sum of ``teacher_bounded_l2`` over the ``where`` boxes (teacher under ``stop_gradient``)."""
    return jnp.sum(losses.teacher_bounded_l2(student, jax.lax.stop_gradient(teacher), target, margin,
                                             where=where))


def _gt_class_deltas(deltas, classes) -> jax.Array:
    """``[B, S, K+1, 4]`` class-specific deltas at ``classes`` ``[B, S]`` -> ``[B, S, 4]``."""
    return jnp.take_along_axis(deltas, classes[..., None, None], axis=2)[:, :, 0]


def rpn_terms(aux: Mapping[str, Any], teacher: Mapping[str, Any], config: ChenConfig,
              rpn_batch_size: int) -> dict[str, jax.Array]:
    """``{'rpn_cls_soft', 'rpn_box_bounded'}`` (scalars, unweighted, over ``B * rpn_batch_size``)."""
    out, rpn = aux["outputs"], aux["rpn"]
    check_same_anchors(out["anchors"], teacher["anchors"])
    norm = jnp.asarray(out["rpn_logits"].shape[0] * max(int(rpn_batch_size), 1), jnp.float32)
    soft = soft_classification(objectness_pair(out["rpn_logits"]), objectness_pair(teacher["rpn_logits"]),
                               rpn.sampled, config)
    bounded = _bounded(out["rpn_deltas"], teacher["rpn_deltas"], rpn.deltas, rpn.positive, config.margin)
    return {"rpn_cls_soft": jnp.sum(soft) / norm, "rpn_box_bounded": bounded / norm}


def roi_terms(aux: Mapping[str, Any], teacher: Mapping[str, Any], config: ChenConfig) -> dict[str, jax.Array]:
    """``{'roi_cls_soft', 'roi_box_bounded'}`` (scalars, unweighted, over the sampled-RoI count), the
    teacher's ``roi_logits`` ``[B, S, K+1]`` / ``roi_deltas`` ``[B, S, K+1, 4]`` scoring ``aux['roi'].rois``."""
    out, roi = aux["outputs"], aux["roi"]
    s_logits, t_logits = out["roi_logits"], teacher["roi_logits"]
    _check_same_classes(s_logits, t_logits)
    if t_logits.shape != s_logits.shape or teacher["roi_deltas"].shape != out["roi_deltas"].shape:
        raise ValueError(f"the teacher scored RoIs of shape {tuple(t_logits.shape[:2])} but the student sampled "
                         f"{tuple(s_logits.shape[:2])}: run the teacher on aux['roi'].rois "
                         "(kdjax.detection.model.teacher_on_rois)")
    count = jnp.maximum(jnp.sum(roi.valid), 1).astype(jnp.float32)
    soft = soft_classification(s_logits, t_logits, roi.valid, config)
    bounded = _bounded(_gt_class_deltas(out["roi_deltas"], roi.classes),
                       _gt_class_deltas(teacher["roi_deltas"], roi.classes), roi.deltas, roi.positive, config.margin)
    return {"roi_cls_soft": jnp.sum(soft) / count, "roi_box_bounded": bounded / count}


def chen_loss(aux: Mapping[str, Any], teacher: Mapping[str, Any], config: ChenConfig = ChenConfig(), *,
              rpn_batch_size: int = 256, hint: tuple[jax.Array, jax.Array] | None = None) -> dict[str, jax.Array]:
    """Chen et al.'s whole loss (module docstring) from a student's training forward and its teacher.

    Args:
      aux: :func:`~kdjax.detection.targets.detector_loss`'s ``aux`` (``terms``, ``outputs``, ``rpn``, ``roi``).
      teacher: the teacher's outputs on the same images with its RoI head on ``aux['roi'].rois``
        (:func:`~kdjax.detection.model.teacher_on_rois`): ``roi_logits``, ``roi_deltas`` and, with
        ``config.distill_rpn``, ``rpn_logits``, ``rpn_deltas``, ``anchors``.
      config: the weights.
      rpn_batch_size: the anchors sampled per image, as given to ``detector_loss`` (the RPN normaliser).
      hint: ``(adapted student features, teacher features)`` (:func:`hint_loss`); needed when
        ``config.hint_weight > 0``.

    Returns:
      float32 scalars: the hard terms ``rpn_cls_hard``, ``rpn_box_smooth_l1``, ``roi_cls_hard``,
      ``roi_box_smooth_l1`` (``faster_rcnn_loss``'s), the unweighted distillation terms
      ``rpn_cls_soft``, ``rpn_box_bounded``, ``roi_cls_soft``, ``roi_box_bounded``, ``hint`` (0 when
      not computed), each stage's combined ``rpn_cls = mu * hard + (1 - mu) * soft``, ``rpn_box =
      smooth_l1 + nu * bounded`` (``roi_cls``, ``roi_box`` likewise; the hard terms alone at the RPN
      without ``distill_rpn``), and ``total = rpn_cls + rpn_box + roi_cls + roi_box + hint_weight * hint``.
    """
    if hint is None and config.hint_weight > 0:
        raise ValueError(f"config.hint_weight = {config.hint_weight} but no hint was given: pass hint=(adapted "
                         "student features, teacher features), or set hint_weight=0")
    hard = aux["terms"]
    terms = {"rpn_cls_hard": hard["rpn_cls"], "rpn_box_smooth_l1": hard["rpn_box"],
             "roi_cls_hard": hard["roi_cls"], "roi_box_smooth_l1": hard["roi_box"]}
    zero = jnp.zeros((), jnp.float32)
    terms.update(rpn_terms(aux, teacher, config, rpn_batch_size) if config.distill_rpn
                 else {"rpn_cls_soft": zero, "rpn_box_bounded": zero})
    terms.update(roi_terms(aux, teacher, config))
    terms["hint"] = zero if hint is None else hint_loss(*hint, reduction=config.hint_reduction)
    for stage, distilled in (("rpn", config.distill_rpn), ("roi", True)):
        mu, nu = (config.mu, config.nu) if distilled else (1.0, 0.0)
        terms[f"{stage}_cls"] = mu * terms[f"{stage}_cls_hard"] + (1.0 - mu) * terms[f"{stage}_cls_soft"]
        terms[f"{stage}_box"] = terms[f"{stage}_box_smooth_l1"] + nu * terms[f"{stage}_box_bounded"]
    terms["total"] = (terms["rpn_cls"] + terms["rpn_box"] + terms["roi_cls"] + terms["roi_box"]
                      + config.hint_weight * terms["hint"])
    return {k: jnp.asarray(v, jnp.float32) for k, v in terms.items()}
