"""Logit losses on dense ``[..., C]`` teacher and student logits.

Soft-target KD (:func:`kd_kl`, :func:`soft_cross_entropy`, :func:`hinton_kd`,
:func:`class_weighted_soft_cross_entropy`, :func:`dkd`), the label loss :func:`cross_entropy` and logit
regression (:func:`logit_mse`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from kdjax.losses._log_space import (_cross_entropy_from_log_probs, _gather_class, _kl_from_log_probs,
                                     _tempered)
from kdjax.losses._validation import (
    _CLASS_MASK_HINT,
    _compute_dtype,
    _concrete,
    _finish,
    _float_array,
    _keep_rows,
    _labels,
    _logit_pair,
    _scalar,
    _temperature,
    _where,
)


def _tempered_log_probs(student_logits, teacher_logits, temperature, where):
    """Shared front end of the soft-target losses: validates, masks, returns (log p_s, log p_t, T, where)."""
    s, t = _logit_pair(student_logits, teacher_logits)
    temp = _temperature(temperature)
    where = _where(where, s.shape[:-1], f"logits of shape {s.shape}", _CLASS_MASK_HINT)
    dtype = _compute_dtype(s, t)
    temp = temp.astype(dtype)
    s = _keep_rows(s.astype(dtype), where)
    t = _keep_rows(t.astype(dtype), where)
    return (jax.nn.log_softmax(_tempered(s, temp), axis=-1),
            jax.nn.log_softmax(_tempered(t, temp), axis=-1), temp, where)


def kd_kl(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    temperature: ArrayLike = 1.0,
    where: ArrayLike | None = None,
) -> jax.Array:
    """Hinton et al. (2015) distillation loss: temperature-scaled KL(teacher || student).

    ``loss = T^2 * sum_c p_t,c (log p_t,c - log p_s,c)`` with ``p_t = softmax(t / T)``,
    ``p_s = softmax(s / T)``. The ``T^2`` factor keeps the gradient magnitude independent of ``T``:
    ``d loss / d s = T * (p_s - p_t)``.

    Args:
      student_logits: ``[..., C]`` float.
      teacher_logits: ``[..., C]`` float (same shape; pass it through ``jax.lax.stop_gradient`` if it
        comes from a live model whose parameters you differentiate).
      temperature: scalar ``T > 0`` (may be traced; checked only when concrete).
      where: optional bool, broadcastable to ``[...]``; masked examples give 0.

    Returns:
      ``[...]`` per-example loss, >= 0, float32 for f32/bf16/f16 inputs.

    Example (the first row agrees with the teacher, the second has the two logits swapped):

    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> student = jnp.array([[2.0, 0.0], [1.0, 0.0]])
    >>> teacher = jnp.array([[2.0, 0.0], [0.0, 1.0]])
    >>> [round(float(v), 4) for v in losses.kd_kl(student, teacher, temperature=2.0)]
    [0.0, 0.4898]
    """
    log_ps, log_pt, temp, where = _tempered_log_probs(student_logits, teacher_logits, temperature, where)
    return _finish(temp**2 * _kl_from_log_probs(log_pt, log_ps), where)


def soft_cross_entropy(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    temperature: ArrayLike = 1.0,
    where: ArrayLike | None = None,
) -> jax.Array:
    """Cross-entropy of the student against the teacher's soft targets, scaled by ``T^2``.

    ``loss = -T^2 * sum_c p_t,c log p_s,c`` with ``p = softmax(logits / T)``. It equals
    ``kd_kl + T^2 * H(p_t)``: the same gradient in the student as :func:`kd_kl`, plus the teacher's
    entropy (a constant in the student), so its minimum is ``T^2 H(p_t)``, not 0.

    Args:
      student_logits, teacher_logits: ``[..., C]`` float, same shape.
      temperature: scalar ``T > 0``.
      where: optional bool, broadcastable to ``[...]``; masked examples give 0.

    Returns:
      ``[...]`` per-example loss.

    Example (the same rows as in :func:`kd_kl`; each value is ``kd_kl`` plus ``T^2`` times the
    teacher's entropy):

    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> student = jnp.array([[2.0, 0.0], [1.0, 0.0]])
    >>> teacher = jnp.array([[2.0, 0.0], [0.0, 1.0]])
    >>> [round(float(v), 4) for v in losses.soft_cross_entropy(student, teacher, temperature=2.0)]
    [2.3288, 3.1412]
    """
    log_ps, log_pt, temp, where = _tempered_log_probs(student_logits, teacher_logits, temperature, where)
    return _finish(temp**2 * _cross_entropy_from_log_probs(log_pt, log_ps), where)


def cross_entropy(logits: ArrayLike, labels: ArrayLike, where: ArrayLike | None = None) -> jax.Array:
    """Cross-entropy with integer labels: ``loss = -log softmax(logits)_y``.

    Args:
      logits: ``[..., C]`` float.
      labels: ``[...]`` integer class indices in ``[0, C)``. Checked when concrete; under jit an
        out-of-range label gives NaN for its example. Masked examples' labels are never read.
      where: optional bool, broadcastable to ``[...]``; masked examples give 0.

    Returns:
      ``[...]`` per-example loss.

    Example (``log(1 + 2 e^-2)`` and ``log 3``):

    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    >>> [round(float(v), 4) for v in losses.cross_entropy(logits, jnp.array([0, 2]))]
    [0.2395, 1.0986]
    """
    z = _float_array(logits, "logits")
    if z.ndim < 1:
        raise ValueError(f"logits must have the class axis last, shape [..., C]; got shape {z.shape}")
    where = _where(where, z.shape[:-1], f"logits of shape {z.shape}", _CLASS_MASK_HINT)
    labels = _labels(labels, z.shape[:-1], z.shape[-1], where)
    z = _keep_rows(z.astype(_compute_dtype(z)), where)
    labels = _keep_rows(labels, where)
    log_p = jax.nn.log_softmax(z, axis=-1)
    return _finish(-_gather_class(log_p, labels, z.shape[-1]), where)


def hinton_kd(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike,
    temperature: ArrayLike,
    alpha: ArrayLike,
    where: ArrayLike | None = None,
) -> jax.Array:
    """Hinton et al. (2015) objective: soft-target KD plus hard-label cross-entropy.

    ``loss = alpha * kd_kl(s, t, T) + (1 - alpha) * cross_entropy(s, y)``; the cross-entropy uses
    ``T = 1``. ``alpha = 0`` is plain supervised training (e.g. after the ESKD stop step).

    Warning: ``alpha`` weights the *KD* term here (as RepDistiller's ``-a`` and mdistiller's
    ``KD_WEIGHT`` do), but torchdistill's ``KDLoss(alpha, beta)`` weights the *cross-entropy* with
    ``alpha`` and the ``T^2``-scaled KL with ``beta`` (default ``1 - alpha``). torchdistill's
    ``alpha=a`` (``beta = 1 - a``) is ``hinton_kd(..., alpha=1 - a)``; with ``alpha + beta != 1`` use
    ``a * cross_entropy(s, y) + b * kd_kl(s, t, T)``. See docs/losses.md, "Coming from torchdistill /
    RepDistiller / mdistiller".

    Args:
      student_logits, teacher_logits: ``[..., C]`` float, same shape.
      labels: ``[...]`` integer class indices in ``[0, C)``.
      temperature: scalar ``T > 0``.
      alpha: scalar weight of the KD term in ``[0, 1]`` (may be traced, e.g. from a schedule; checked
        only when concrete).
      where: optional bool, broadcastable to ``[...]``; masked examples give 0.

    Returns:
      ``[...]`` per-example loss.

    Example (``0.9 * kd_kl + 0.1 * cross_entropy``; torchdistill's ``KDLoss(alpha=0.1)`` is this
    ``alpha=0.9``):

    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> student, teacher, labels = jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 1.0]]), jnp.array([0])
    >>> loss = losses.hinton_kd(student, teacher, labels, temperature=2.0, alpha=0.9)
    >>> [round(float(v), 4) for v in loss]
    [0.4722]
    >>> kd = losses.kd_kl(student, teacher, 2.0)
    >>> ce = losses.cross_entropy(student, labels)
    >>> [round(float(v), 4) for v in 0.9 * kd + 0.1 * ce]
    [0.4722]
    """
    alpha_arr, alpha_value = _scalar(alpha, "alpha")
    if alpha_value is not None and not 0.0 <= alpha_value <= 1.0:
        raise ValueError(
            f"alpha must lie in [0, 1] (the weight of the KD term; 1 - alpha weights the label loss), "
            f"got {alpha_value}"
        )
    kd = kd_kl(student_logits, teacher_logits, temperature, where)
    ce = cross_entropy(student_logits, labels, where)
    alpha_arr = alpha_arr.astype(kd.dtype)
    return alpha_arr * kd + (1 - alpha_arr) * ce


def class_weighted_soft_cross_entropy(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    class_weights: ArrayLike,
    temperature: ArrayLike = 1.0,
    where: ArrayLike | None = None,
) -> jax.Array:
    """Chen et al. (2017) weighted soft cross-entropy for detection KD.

    ``loss = -T^2 * sum_c w_c p_t,c log p_s,c`` with ``p = softmax(logits / T)``. Chen et al. weight the
    background class more heavily than the foreground ones (1.5 vs 1), because the teacher is often
    confidently background. With all ``w_c = 1`` this is :func:`soft_cross_entropy`. The ``T^2``
    factor is Hinton's convention, kept by every soft-target loss here; Chen et al.'s
    ``L_soft = -sum_c w_c p_t,c log p_s,c`` has none, so to use their loss weights at ``T != 1``
    divide the weight by ``T^2`` (at ``T = 1`` the two agree).

    Args:
      student_logits, teacher_logits: ``[..., C]`` float, same shape (e.g. ``[num_rois, C]``).
      class_weights: ``[C]``, finite and >= 0 (checked when concrete).
      temperature: scalar ``T > 0``.
      where: optional bool, broadcastable to ``[...]``; masked examples give 0.

    Returns:
      ``[...]`` per-example loss.

    Example (a uniform student, a teacher at ``[0.25, 0.75]``, background (class 0) weighted 1.5:
    ``(1.5 * 0.25 + 0.75) * log 2``):

    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> student = jnp.array([[0.0, 0.0]])
    >>> teacher = jnp.log(jnp.array([[1.0, 3.0]]))
    >>> loss = losses.class_weighted_soft_cross_entropy(student, teacher, jnp.array([1.5, 1.0]))
    >>> [round(float(v), 4) for v in loss]
    [0.7798]
    """
    log_ps, log_pt, temp, where = _tempered_log_probs(student_logits, teacher_logits, temperature, where)
    num_classes = log_ps.shape[-1]
    weights = jnp.asarray(class_weights)
    if not (jnp.issubdtype(weights.dtype, jnp.floating) or jnp.issubdtype(weights.dtype, jnp.integer)):
        raise TypeError(f"class_weights must be real numbers, got dtype {weights.dtype}")
    if weights.shape != (num_classes,):
        raise ValueError(
            f"class_weights has shape {weights.shape} but the logits have {num_classes} classes; pass one "
            f"weight per class, shape ({num_classes},) (Chen et al. use 1.5 for background, 1 elsewhere)"
        )
    concrete = _concrete(class_weights)
    if concrete is not None and not (np.all(np.isfinite(concrete)) and np.all(concrete >= 0)):
        raise ValueError(f"class_weights must be finite and >= 0, got {concrete.tolist()}")
    weights = weights.astype(log_ps.dtype)
    return _finish(temp**2 * _cross_entropy_from_log_probs(log_pt, log_ps, weights), where)


def logit_mse(
    student_logits: ArrayLike, teacher_logits: ArrayLike, where: ArrayLike | None = None
) -> jax.Array:
    """Ba & Caruana (2014) logit regression: ``loss = 1/2 * sum_c (s_c - t_c)^2``.

    Args:
      student_logits, teacher_logits: ``[..., C]`` float, same shape.
      where: optional bool, broadcastable to ``[...]``; masked examples give 0.

    Returns:
      ``[...]`` per-example loss.

    Example:

    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> student = jnp.array([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
    >>> teacher = jnp.array([[1.0, 0.0, 3.0], [0.0, 0.0, 0.0]])
    >>> [round(float(v), 4) for v in losses.logit_mse(student, teacher)]
    [2.0, 0.375]
    """
    s, t = _logit_pair(student_logits, teacher_logits)
    where = _where(where, s.shape[:-1], f"logits of shape {s.shape}", _CLASS_MASK_HINT)
    dtype = _compute_dtype(s, t)
    s, t = _keep_rows(s.astype(dtype), where), _keep_rows(t.astype(dtype), where)
    same = s == t  # includes classes both leave out with -inf: no difference, no gradient
    diff = jnp.where(same, 0.0, jnp.where(same, 0.0, s) - jnp.where(same, 0.0, t))
    return _finish(0.5 * jnp.sum(diff**2, axis=-1), where)


def dkd(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike,
    alpha: ArrayLike = 1.0,
    beta: ArrayLike = 8.0,
    temperature: ArrayLike = 4.0,
    where: ArrayLike | None = None,
) -> jax.Array:
    """Decoupled KD (Zhao et al., CVPR 2022): ``loss = T^2 * (alpha * TCKD + beta * NCKD)``.

    With ``p = softmax(logits / T)`` and the target class ``y``:

    - TCKD ``= KL(b_t || b_s)`` on the binary distributions ``b = [p_y, 1 - p_y]``;
    - NCKD ``= KL(q_t || q_s)`` on the non-target distributions ``q_c = p_c / (1 - p_y)``, ``c != y``
      (the softmax of the non-target logits alone).

    As in the authors' code (mdistiller) both terms are scaled by ``T^2``. Their linear warm-up of the
    whole loss over the first epochs is a weight schedule (``kdjax.schedules.linear``), not part of this
    function. Computed in log space (``log(1 - p_y)`` as a logsumexp over the non-target logits).

    Args:
      student_logits, teacher_logits: ``[..., C]`` float, same shape, ``C >= 2``.
      labels: ``[...]`` integer class indices in ``[0, C)``.
      alpha: scalar weight of TCKD, >= 0.
      beta: scalar weight of NCKD, >= 0.
      temperature: scalar ``T > 0``.
      (The defaults are the authors' CIFAR-100 setting; their ImageNet ResNet-34 -> ResNet-18 config,
      mdistiller ``configs/imagenet/r34_r18/dkd.yaml``, uses ``alpha=1, beta=0.5, T=1``.)
      where: optional bool, broadcastable to ``[...]``; masked examples give 0.

    Returns:
      ``[...]`` per-example loss.

    Example (target class 0, where TCKD = 0.2767 and NCKD = 0.1109: ``1 * TCKD + 8 * NCKD``; with
    ``alpha = 1`` and ``beta = 1 - p_t,y`` it is :func:`kd_kl`, the paper's Eq. 5):

    >>> import jax
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> student, teacher = jnp.array([[1.0, 0.0, 0.0]]), jnp.array([[0.0, 1.0, 0.0]])
    >>> labels = jnp.array([0])
    >>> loss = losses.dkd(student, teacher, labels, alpha=1.0, beta=8.0, temperature=1.0)
    >>> [round(float(v), 4) for v in loss]
    [1.1643]
    >>> p_target = float(jax.nn.softmax(teacher)[0, 0])
    >>> loss = losses.dkd(student, teacher, labels, alpha=1.0, beta=1 - p_target, temperature=1.0)
    >>> [round(float(v), 4) for v in loss]
    [0.3642]
    >>> [round(float(v), 4) for v in losses.kd_kl(student, teacher)]
    [0.3642]
    """
    s, t = _logit_pair(student_logits, teacher_logits)
    num_classes = s.shape[-1]
    if num_classes < 2:
        raise ValueError(f"dkd needs at least 2 classes (a target and a non-target), got logits of shape {s.shape}")
    temp = _temperature(temperature)
    alpha_arr, alpha_value = _scalar(alpha, "alpha")
    beta_arr, beta_value = _scalar(beta, "beta")
    for name, value in (("alpha", alpha_value), ("beta", beta_value)):
        if value is not None and not (np.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite weight >= 0, got {value}")
    where = _where(where, s.shape[:-1], f"logits of shape {s.shape}", _CLASS_MASK_HINT)
    labels = _labels(labels, s.shape[:-1], num_classes, where)
    dtype = _compute_dtype(s, t)
    temp = temp.astype(dtype)
    s = _tempered(_keep_rows(s.astype(dtype), where), temp)
    t = _tempered(_keep_rows(t.astype(dtype), where), temp)
    labels = _keep_rows(labels, where)
    is_target = jnp.arange(num_classes) == labels[..., None]

    def split(z):
        # log p_y, log(1 - p_y), and the non-target log-distribution (-inf at the target class;
        # all -inf when every non-target class is left out, so that NCKD is 0 for a teacher
        # without non-target mass, its weight (1 - p_t,y) in KD = TCKD + (1 - p_t,y) NCKD).
        lse_all = jax.nn.logsumexp(z, axis=-1)
        z_other = jnp.where(is_target, -jnp.inf, z)
        lse_other = jax.nn.logsumexp(z_other, axis=-1)
        some = jnp.isfinite(lse_other)[..., None]
        other = jnp.where(some, z_other - jnp.where(some, lse_other[..., None], 0.0), -jnp.inf)
        log_target = _gather_class(z, labels, num_classes) - lse_all
        return jnp.stack([log_target, lse_other - lse_all], axis=-1), other

    binary_s, other_s = split(s)
    binary_t, other_t = split(t)
    tckd = _kl_from_log_probs(binary_t, binary_s)
    nckd = _kl_from_log_probs(other_t, other_s)
    loss = temp**2 * (alpha_arr.astype(dtype) * tckd + beta_arr.astype(dtype) * nckd)
    return _finish(loss, where)
