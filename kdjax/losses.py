"""Knowledge-distillation losses as pure functions of arrays.

Every function here is a plain function of its array arguments (no Flax, no globals, no randomness), safe
under ``jax.jit``, ``jax.vmap`` and ``jax.grad``. Conventions shared by all of them:

Per-example output
    Logit losses take logits of shape ``[..., C]`` (``[B, C]`` in the common case) and return one value
    per row, shape ``[...]`` (``[B]``). Feature losses take features ``[B, ...]`` and return ``[B]``: axis 0
    is the batch axis and everything else is reduced. Box losses take ``[..., D]`` and return ``[...]``.
    The batch reduction is the caller's (as in ``optax.losses``); :func:`masked_mean` does the usual one.

``where``
    Optional bool array broadcastable to the per-example output shape (e.g. ``batch['mask']`` of shape
    ``[B]``); ``True`` keeps an example. A masked example gives exactly 0 and contributes exactly zero
    gradient, whatever its inputs hold (NaN/inf padding included): its rows are replaced by zeros before the
    loss is computed. There is no class-axis mask; to leave classes out (e.g. padded vocabulary entries)
    set their logits to ``-inf`` in both student and teacher, which every logit loss supports
    (``0 * log 0`` is taken as 0). :func:`similarity_preserving` is the one loss that mixes examples; there
    masked examples are also removed from the batch similarity matrix.

Dtypes
    Inputs may be f32, bf16 or f16 (mixed is fine); computation happens in at least float32 and bf16/f16
    inputs give float32 output (f64 inputs with ``jax_enable_x64`` give f64). Integer logits/features are
    rejected.

Stability
    Probabilities are handled in log space (``log_softmax``/``logsumexp``; raw logits are never
    exponentiated), so logits of magnitude 1e4 give finite losses and gradients.

Checks
    Shapes and dtypes are checked at trace time, always. Value checks (temperature > 0, labels and top-k
    indices in range, non-negative class weights, ...) run only on concrete values: under ``jax.jit`` a
    traced temperature cannot be checked, and an out-of-range label or index yields NaN for that example
    (never a silently wrong finite value). Errors are ``ValueError``/``TypeError`` naming the argument,
    the offending shape or value, and the fix.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "attention_transfer",
    "class_weighted_soft_cross_entropy",
    "cross_entropy",
    "dkd",
    "fitnet_hint",
    "hinton_kd",
    "kd_kl",
    "kd_kl_topk",
    "kd_kl_topk_bound",
    "logit_mse",
    "masked_mean",
    "similarity_preserving",
    "soft_cross_entropy",
    "teacher_bounded_l2",
]


# ----------------------------------------------------------------------------------------------------------
# Validation helpers (trace-time shape/dtype checks; value checks only on concrete inputs).


def _concrete(x):
    """Returns ``x`` as a NumPy array when its value is known on this host, else None (traced/global)."""
    if isinstance(x, jax.core.Tracer):
        return None
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None
    return np.asarray(x)


def _float_array(x, name: str) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name} must be a floating-point array (float32, bfloat16 or float16), got dtype {x.dtype}; "
            f"cast it first, e.g. {name}.astype(jnp.float32)"
        )
    return x


def _compute_dtype(*arrays) -> jnp.dtype:
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _scalar(value, name: str):
    """Checks that ``value`` is a real scalar; returns (array, concrete float or None)."""
    try:
        arr = jnp.asarray(value)
    except TypeError:
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if arr.ndim != 0:
        raise ValueError(f"{name} must be a scalar, got an array of shape {arr.shape}; pass a single number")
    if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)):
        raise TypeError(f"{name} must be a real number, got dtype {arr.dtype}; pass a Python float")
    concrete = _concrete(value)
    return arr, (None if concrete is None else float(concrete))


def _temperature(temperature) -> jax.Array:
    arr, value = _scalar(temperature, "temperature")
    if value is not None and not (np.isfinite(value) and value > 0):
        raise ValueError(
            f"temperature must be a finite number > 0, got {value}; use temperature=1.0 for the plain "
            "softmax (Hinton et al. use values such as 2-20)"
        )
    return arr


def _logit_pair(student_logits, teacher_logits, s_name="student_logits", t_name="teacher_logits"):
    s = _float_array(student_logits, s_name)
    t = _float_array(teacher_logits, t_name)
    if s.ndim < 1 or t.ndim < 1:
        raise ValueError(
            f"{s_name} and {t_name} must have the class axis last, shape [..., C]; got shapes {s.shape} "
            f"and {t.shape}"
        )
    if s.shape[-1] != t.shape[-1]:
        raise ValueError(
            f"the teacher has {t.shape[-1]} classes but the student has {s.shape[-1]} ({t_name} shape "
            f"{t.shape}, {s_name} shape {s.shape}); the teacher and student must share the label space: "
            "give both the same classes, in the same order, on the last axis"
        )
    if s.shape != t.shape:
        raise ValueError(
            f"{s_name} has shape {s.shape} but {t_name} has shape {t.shape}; they must have the same "
            "leading (batch) axes: pass the teacher outputs for the same examples as the student's"
        )
    return s, t


_CLASS_MASK_HINT = (
    ". A class-axis mask is not supported: to leave classes out, set their logits to -inf in both "
    "student and teacher"
)


def _where(where, example_shape, example_what: str, hint: str = ""):
    """Validates ``where`` and broadcasts it to ``example_shape``; None stays None."""
    if where is None:
        return None
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(
            f"where must be a bool array (True = keep the example), got dtype {where.dtype}; "
            "pass e.g. where=batch['mask'].astype(bool)"
        )
    try:
        broadcast = tuple(np.broadcast_shapes(where.shape, tuple(example_shape)))
    except ValueError:
        broadcast = None
    if broadcast != tuple(example_shape):
        raise ValueError(
            f"where has shape {where.shape} but the per-example loss has shape {tuple(example_shape)} "
            f"({example_what}); where must broadcast to that shape, one flag per example{hint}"
        )
    return jnp.broadcast_to(where, example_shape)


def _keep_rows(x: jax.Array, where) -> jax.Array:
    """Replaces masked examples' entries of ``x`` (shape ``where.shape + rest``) by zeros."""
    if where is None:
        return x
    mask = where.reshape(where.shape + (1,) * (x.ndim - where.ndim))
    return jnp.where(mask, x, jnp.zeros((), x.dtype))


def _finish(loss: jax.Array, where) -> jax.Array:
    if where is None:
        return loss
    return jnp.where(where, loss, jnp.zeros((), loss.dtype))


def _check_index_range(indices, where, upper: int, name: str, fix: str) -> None:
    """Raises if a concrete unmasked index is outside [0, upper); skipped for traced inputs."""
    values = _concrete(indices)
    if values is None:
        return
    if where is not None:
        keep = _concrete(where)
        if keep is None:
            return
        values = values[np.broadcast_to(keep, values.shape[: keep.ndim])]
    bad = (values < 0) | (values >= upper)
    if bad.any():
        first = values[bad].flat[0]
        raise ValueError(
            f"{name} must lie in [0, {upper}) for logits with {upper} classes, but holds {int(first)} "
            f"(range seen: {int(values.min())}..{int(values.max())}); {fix}"
        )


def _labels(labels, example_shape, num_classes: int, where) -> jax.Array:
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"labels must be integer class indices, got dtype {labels.dtype}; pass labels.astype(jnp.int32) "
            "(for soft or one-hot targets use soft_cross_entropy)"
        )
    if labels.shape != tuple(example_shape):
        raise ValueError(
            f"labels has shape {labels.shape} but the logits have {tuple(example_shape)} rows of "
            f"{num_classes} classes; labels must have shape {tuple(example_shape)}, one class index per row"
        )
    _check_index_range(
        labels, where, num_classes, "labels",
        "fix the label mapping, or mask padding rows with where=...",
    )
    return labels


def _gather_class(x: jax.Array, index: jax.Array, num_classes: int) -> jax.Array:
    """``x[..., index]`` per row; NaN where the index is out of range (only reachable under jit)."""
    valid = (index >= 0) & (index < num_classes)
    safe = jnp.clip(index, 0, num_classes - 1)
    picked = jnp.take_along_axis(x, safe[..., None], axis=-1)[..., 0]
    return jnp.where(valid, picked, jnp.nan)


def _kl_from_log_probs(log_p, log_q, weights=None) -> jax.Array:
    """sum_c w_c p_c (log p_c - log q_c) over the last axis, with 0 * log 0 = 0."""
    p = jnp.exp(log_p)
    support = p > 0
    terms = p * (jnp.where(support, log_p, 0.0) - jnp.where(support, log_q, 0.0))
    if weights is not None:
        terms = terms * weights
    return jnp.sum(terms, axis=-1)


def _cross_entropy_from_log_probs(log_p, log_q, weights=None) -> jax.Array:
    """-sum_c w_c p_c log q_c over the last axis, with 0 * log 0 = 0."""
    p = jnp.exp(log_p)
    terms = p * jnp.where(p > 0, log_q, 0.0)
    if weights is not None:
        terms = terms * weights
    return -jnp.sum(terms, axis=-1)


def _tempered_log_probs(student_logits, teacher_logits, temperature, where):
    """Shared front end of the soft-target losses: validates, masks, returns (log p_s, log p_t, T, where)."""
    s, t = _logit_pair(student_logits, teacher_logits)
    temp = _temperature(temperature)
    where = _where(where, s.shape[:-1], f"logits of shape {s.shape}", _CLASS_MASK_HINT)
    dtype = _compute_dtype(s, t)
    temp = temp.astype(dtype)
    s = _keep_rows(s.astype(dtype), where)
    t = _keep_rows(t.astype(dtype), where)
    return jax.nn.log_softmax(s / temp, axis=-1), jax.nn.log_softmax(t / temp, axis=-1), temp, where


# ----------------------------------------------------------------------------------------------------------
# Reductions.


def masked_mean(values, where=None) -> jax.Array:
    """Mean of ``values`` over the entries where ``where`` is True.

    Args:
      values: per-example losses, any shape (e.g. ``[B]``), any float dtype.
      where: optional bool array broadcastable to ``values.shape``; None means all entries.

    Returns:
      A scalar, ``sum(values * where) / max(sum(where), 1)`` in at least float32. An all-False ``where``
      gives 0 (not NaN) with zero gradient. Masked entries never reach the result or its gradient, even if
      they hold NaN/inf.
    """
    values = _float_array(values, "values")
    values = values.astype(_compute_dtype(values))
    if where is None:
        return jnp.mean(values)
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(
            f"where must be a bool array (True = count the entry), got dtype {where.dtype}; "
            "pass e.g. where=batch['mask'].astype(bool)"
        )
    try:
        broadcast = tuple(np.broadcast_shapes(where.shape, values.shape))
    except ValueError:
        broadcast = None
    if broadcast != values.shape:
        raise ValueError(
            f"where has shape {where.shape} but values has shape {values.shape}; where must broadcast to "
            "the shape of values"
        )
    where = jnp.broadcast_to(where, values.shape)
    total = jnp.sum(jnp.where(where, values, jnp.zeros((), values.dtype)))
    count = jnp.sum(where).astype(values.dtype)
    return total / jnp.maximum(count, 1)


# ----------------------------------------------------------------------------------------------------------
# Logit losses.


def kd_kl(student_logits, teacher_logits, temperature=1.0, where=None) -> jax.Array:
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
    """
    log_ps, log_pt, temp, where = _tempered_log_probs(student_logits, teacher_logits, temperature, where)
    return _finish(temp**2 * _kl_from_log_probs(log_pt, log_ps), where)


def soft_cross_entropy(student_logits, teacher_logits, temperature=1.0, where=None) -> jax.Array:
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
    """
    log_ps, log_pt, temp, where = _tempered_log_probs(student_logits, teacher_logits, temperature, where)
    return _finish(temp**2 * _cross_entropy_from_log_probs(log_pt, log_ps), where)


def cross_entropy(logits, labels, where=None) -> jax.Array:
    """Cross-entropy with integer labels: ``loss = -log softmax(logits)_y``.

    Args:
      logits: ``[..., C]`` float.
      labels: ``[...]`` integer class indices in ``[0, C)``. Checked when concrete; under jit an
        out-of-range label gives NaN for its example. Masked examples' labels are never read.
      where: optional bool, broadcastable to ``[...]``; masked examples give 0.

    Returns:
      ``[...]`` per-example loss.
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


def hinton_kd(student_logits, teacher_logits, labels, temperature, alpha, where=None) -> jax.Array:
    """Hinton et al. (2015) objective: soft-target KD plus hard-label cross-entropy.

    ``loss = alpha * kd_kl(s, t, T) + (1 - alpha) * cross_entropy(s, y)``; the cross-entropy uses
    ``T = 1``. ``alpha = 0`` is plain supervised training (e.g. after the ESKD stop step).

    Args:
      student_logits, teacher_logits: ``[..., C]`` float, same shape.
      labels: ``[...]`` integer class indices in ``[0, C)``.
      temperature: scalar ``T > 0``.
      alpha: scalar weight of the KD term in ``[0, 1]`` (may be traced, e.g. from a schedule; checked
        only when concrete).
      where: optional bool, broadcastable to ``[...]``; masked examples give 0.

    Returns:
      ``[...]`` per-example loss.
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
    student_logits, teacher_logits, class_weights, temperature=1.0, where=None
) -> jax.Array:
    """Chen et al. (2017) weighted soft cross-entropy for detection KD.

    ``loss = -T^2 * sum_c w_c p_t,c log p_s,c`` with ``p = softmax(logits / T)``. Chen et al. weight the
    background class more heavily than the foreground ones (1.5 vs 1), because the teacher is often
    confidently background. With all ``w_c = 1`` this is :func:`soft_cross_entropy`.

    Args:
      student_logits, teacher_logits: ``[..., C]`` float, same shape (e.g. ``[num_rois, C]``).
      class_weights: ``[C]``, finite and >= 0 (checked when concrete).
      temperature: scalar ``T > 0``.
      where: optional bool, broadcastable to ``[...]``; masked examples give 0.

    Returns:
      ``[...]`` per-example loss.
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


def logit_mse(student_logits, teacher_logits, where=None) -> jax.Array:
    """Ba & Caruana (2014) logit regression: ``loss = 1/2 * sum_c (s_c - t_c)^2``.

    Args:
      student_logits, teacher_logits: ``[..., C]`` float, same shape.
      where: optional bool, broadcastable to ``[...]``; masked examples give 0.

    Returns:
      ``[...]`` per-example loss.
    """
    s, t = _logit_pair(student_logits, teacher_logits)
    where = _where(where, s.shape[:-1], f"logits of shape {s.shape}", _CLASS_MASK_HINT)
    dtype = _compute_dtype(s, t)
    diff = _keep_rows(s.astype(dtype), where) - _keep_rows(t.astype(dtype), where)
    return _finish(0.5 * jnp.sum(diff**2, axis=-1), where)


def dkd(student_logits, teacher_logits, labels, alpha=1.0, beta=8.0, temperature=4.0, where=None) -> jax.Array:
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
    s = _keep_rows(s.astype(dtype), where) / temp
    t = _keep_rows(t.astype(dtype), where) / temp
    labels = _keep_rows(labels, where)
    is_target = jnp.arange(num_classes) == labels[..., None]

    def split(z):
        # log p_y, log(1 - p_y), and the non-target log-distribution (-inf at the target class).
        lse_all = jax.nn.logsumexp(z, axis=-1)
        z_other = jnp.where(is_target, -jnp.inf, z)
        lse_other = jax.nn.logsumexp(z_other, axis=-1)
        log_target = _gather_class(z, labels, num_classes) - lse_all
        return jnp.stack([log_target, lse_other - lse_all], axis=-1), z_other - lse_other[..., None]

    binary_s, other_s = split(s)
    binary_t, other_t = split(t)
    tckd = _kl_from_log_probs(binary_t, binary_s)
    nckd = _kl_from_log_probs(other_t, other_s)
    loss = temp**2 * (alpha_arr.astype(dtype) * tckd + beta_arr.astype(dtype) * nckd)
    return _finish(loss, where)


# ----------------------------------------------------------------------------------------------------------
# Top-k (sparse) teachers.


def _topk_inputs(student_logits, teacher_topk_values, teacher_topk_indices, where):
    s = _float_array(student_logits, "student_logits")
    values = _float_array(teacher_topk_values, "teacher_topk_values")
    indices = jnp.asarray(teacher_topk_indices)
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise TypeError(
            f"teacher_topk_indices must be integer class indices, got dtype {indices.dtype}; "
            "pass indices.astype(jnp.int32)"
        )
    if s.ndim < 1:
        raise ValueError(f"student_logits must have the class axis last, shape [..., C]; got shape {s.shape}")
    if values.shape != indices.shape:
        raise ValueError(
            f"teacher_topk_values has shape {values.shape} but teacher_topk_indices has shape "
            f"{indices.shape}; they must match, [..., k]: value j of a row is the teacher logit of class "
            "index j of that row"
        )
    if values.shape[:-1] != s.shape[:-1] or values.ndim != s.ndim:
        raise ValueError(
            f"teacher_topk_values/indices have shape {values.shape} but student_logits has shape {s.shape}; "
            f"the top-k arrays must be [..., k] with the student's leading axes {s.shape[:-1]}"
        )
    num_classes, k = s.shape[-1], values.shape[-1]
    if not 1 <= k <= num_classes:
        raise ValueError(
            f"the teacher stores k={k} classes per row but the student has C={num_classes}; need "
            f"1 <= k <= C (the teacher and student must share the label space)"
        )
    where = _where(where, s.shape[:-1], f"logits of shape {s.shape}", _CLASS_MASK_HINT)
    _check_index_range(
        indices, where, num_classes, "teacher_topk_indices",
        "the stored indices must index the student's classes (same label space)",
    )
    concrete = _concrete(indices)
    keep = None if where is None else _concrete(where)
    if concrete is not None and (where is None or keep is not None) and k > 1:
        rows = concrete.reshape(-1, k)
        if keep is not None:
            rows = rows[np.broadcast_to(keep, concrete.shape[:-1]).reshape(-1)]
        ordered = np.sort(rows, axis=-1)
        if (ordered[:, 1:] == ordered[:, :-1]).any():
            raise ValueError(
                "teacher_topk_indices repeats a class within a row; the k stored classes of a row must be "
                "distinct (store jax.lax.top_k(teacher_logits, k))"
            )
    return s, values, indices, where


def kd_kl_topk(student_logits, teacher_topk_values, teacher_topk_indices, temperature=1.0, where=None) -> jax.Array:
    """KD loss against a teacher stored as its k largest logits per example (sparse KD).

    Mass outside the top k: the teacher distribution is renormalised over the k stored classes,
    ``q = softmax(v / T)`` over the stored values ``v``; the student log-probabilities are its full
    ``C``-class log-softmax gathered at the stored indices. So this is the KL restricted to the top-k
    support::

        loss = T^2 * sum_j q_j (log q_j - log softmax(s / T)_{i_j})

    It equals :func:`kd_kl` exactly when ``k == C``. For ``k < C`` the difference
    ``D = kd_kl - kd_kl_topk`` obeys (derivation in docs/losses.md), with ``eps`` the teacher's tail mass
    (its full-softmax probability at temperature ``T`` outside the stored classes), ``L`` the largest
    ``-log softmax(s / T)_c`` over the tail classes and ``H(eps)`` the binary entropy::

        -(eps * kd_kl_topk + T^2 H(eps))  <=  D  <=  T^2 eps L - eps * kd_kl_topk - T^2 H(eps)

    so ``|D| <= max(a, T^2 eps L - a)`` with ``a = eps * kd_kl_topk + T^2 H(eps)``
    (:func:`kd_kl_topk_bound` computes it). No bound in ``eps`` alone exists: a student that gives a tail
    class vanishing probability makes ``kd_kl`` arbitrarily large while ``kd_kl_topk`` stays put; with
    finite logits ``L <= (max(s) - min(s)) / T + log C``.

    Args:
      student_logits: ``[..., C]`` float.
      teacher_topk_values: ``[..., k]`` float, the teacher's raw logits (not divided by ``T``) at the
        stored classes, e.g. ``jax.lax.top_k(teacher_logits, k)[0]``; any order.
      teacher_topk_indices: ``[..., k]`` integer, distinct class indices in ``[0, C)`` per row (checked
        when concrete; under jit an out-of-range index gives NaN for its example).
      temperature: scalar ``T > 0``.
      where: optional bool, broadcastable to ``[...]``; masked examples give 0.

    Returns:
      ``[...]`` per-example loss, >= 0.
    """
    s, values, indices, where = _topk_inputs(student_logits, teacher_topk_values, teacher_topk_indices, where)
    temp = _temperature(temperature)
    dtype = _compute_dtype(s, values)
    temp = temp.astype(dtype)
    num_classes = s.shape[-1]
    s = _keep_rows(s.astype(dtype), where)
    values = _keep_rows(values.astype(dtype), where)
    indices = _keep_rows(indices, where)
    log_ps = jax.nn.log_softmax(s / temp, axis=-1)
    valid = jnp.all((indices >= 0) & (indices < num_classes), axis=-1)
    log_ps_at = jnp.take_along_axis(log_ps, jnp.clip(indices, 0, num_classes - 1), axis=-1)
    log_q = jax.nn.log_softmax(values / temp, axis=-1)
    loss = temp**2 * _kl_from_log_probs(log_q, log_ps_at)
    return _finish(jnp.where(valid, loss, jnp.nan), where)


def kd_kl_topk_bound(student_logits, teacher_logits, teacher_topk_indices, temperature=1.0, where=None) -> jax.Array:
    """Per-example upper bound on ``|kd_kl(s, t) - kd_kl_topk(s, t[idx], idx)|``.

    ``bound = max(a, T^2 * eps * L - a)`` with ``a = eps * kd_kl_topk + T^2 * H(eps)``, where
    ``eps = sum_{c not stored} softmax(t / T)_c`` is the teacher's tail mass, ``L`` the largest
    ``-log softmax(s / T)_c`` over the tail classes (0 when ``k = C``) and
    ``H(eps) = -eps log eps - (1 - eps) log(1 - eps)``. Valid in exact arithmetic when the stored values
    are the teacher logits at the stored indices; storing them in bf16/f16 adds a quantisation error on
    top. See :func:`kd_kl_topk` and docs/losses.md for the derivation.

    Args:
      student_logits, teacher_logits: ``[..., C]`` float, same shape (the full teacher logits).
      teacher_topk_indices: ``[..., k]`` integer, distinct indices in ``[0, C)`` per row.
      temperature: scalar ``T > 0``.
      where: optional bool, broadcastable to ``[...]``; masked examples give 0.

    Returns:
      ``[...]`` per-example bound, >= 0.
    """
    s, t = _logit_pair(student_logits, teacher_logits)
    indices = jnp.asarray(teacher_topk_indices)
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise TypeError(
            f"teacher_topk_indices must be integer class indices, got dtype {indices.dtype}; "
            "pass indices.astype(jnp.int32)"
        )
    if indices.ndim != t.ndim or indices.shape[:-1] != t.shape[:-1]:
        raise ValueError(
            f"teacher_topk_indices has shape {indices.shape} but teacher_logits has shape {t.shape}; the "
            f"indices must be [..., k] with the logits' leading axes {t.shape[:-1]}"
        )
    num_classes = t.shape[-1]
    dtype = _compute_dtype(s, t)
    values = jnp.take_along_axis(t, jnp.clip(indices, 0, num_classes - 1), axis=-1)
    topk = kd_kl_topk(s, values, indices, temperature, where).astype(dtype)
    temp = jnp.asarray(temperature).astype(dtype)
    where = _where(where, s.shape[:-1], f"logits of shape {s.shape}", _CLASS_MASK_HINT)
    s = _keep_rows(s.astype(dtype), where)
    t = _keep_rows(t.astype(dtype), where)
    indices = _keep_rows(indices, where)
    stored = jnp.any(indices[..., None, :] == jnp.arange(num_classes)[:, None], axis=-1)
    log_pt = jax.nn.log_softmax(t / temp, axis=-1)
    neg_log_ps = -jax.nn.log_softmax(s / temp, axis=-1)
    eps = jnp.clip(jnp.sum(jnp.where(stored, 0.0, jnp.exp(log_pt)), axis=-1), 0.0, 1.0)
    tail_nll = jnp.max(jnp.where(stored, 0.0, neg_log_ps), axis=-1)
    binary_entropy = -jax.scipy.special.xlogy(eps, eps) - jax.scipy.special.xlog1py(1.0 - eps, -eps)
    a = eps * topk + temp**2 * binary_entropy
    upper = jnp.where(eps > 0, temp**2 * eps * tail_nll, 0.0) - a
    return _finish(jnp.maximum(a, upper), where)


# ----------------------------------------------------------------------------------------------------------
# Feature and box losses.


def _feature_pair(student_features, teacher_features):
    s = _float_array(student_features, "student_features")
    t = _float_array(teacher_features, "teacher_features")
    if s.ndim < 1 or t.ndim < 1:
        raise ValueError(
            f"features must have a leading batch axis, shape [B, ...]; got shapes {s.shape} and {t.shape}"
        )
    return s, t


def fitnet_hint(student_features, teacher_features, where=None, *, normalize=False) -> jax.Array:
    """FitNets hint loss (Romero et al., 2015): ``loss = 1/2 * ||u - r||^2`` per example.

    ``u`` is the teacher's hint-layer output and ``r`` the student's guided layer after its regressor
    (the regressor, or Chen et al.'s adaptation layer for detection, is part of the student model and
    maps the student's features to the teacher's shape). The squared norm sums over all non-batch axes;
    with ``normalize=True`` it is the mean over them instead (``1/2 * mean((u - r)^2)``), which keeps the
    loss scale independent of the feature size.

    Args:
      student_features: ``[B, ...]`` float, the regressor output.
      teacher_features: ``[B, ...]`` float, same shape.
      where: optional bool, broadcastable to ``[B]``; masked examples give 0.
      normalize: (keyword-only) False for the paper's sum, True for the mean over the non-batch axes.

    Returns:
      ``[B]`` per-example loss.
    """
    s, t = _feature_pair(student_features, teacher_features)
    if s.shape != t.shape:
        raise ValueError(
            f"student_features has shape {s.shape} but teacher_features has shape {t.shape}; a hint loss "
            "compares equal shapes: give the student a regressor/adaptation layer (e.g. a 1x1 conv to the "
            "teacher's channels, at the teacher's spatial size) and pass its output"
        )
    where = _where(where, s.shape[:1], f"features of shape {s.shape}, one value per example on axis 0")
    dtype = _compute_dtype(s, t)
    diff = _keep_rows(s.astype(dtype), where) - _keep_rows(t.astype(dtype), where)
    axes = tuple(range(1, diff.ndim))
    reduce = jnp.mean if normalize else jnp.sum
    return _finish(0.5 * reduce(diff**2, axis=axes), where)


def _attention_map(features: jax.Array, p) -> jax.Array:
    """``vec(sum_c |A_c|^p) / ||.||_2`` per example, for features ``[B, *spatial, C]``."""
    flat = features.reshape(features.shape[0], -1, features.shape[-1])
    # The normalised map is invariant to a positive rescaling of A, so divide by the per-example max |A|
    # first (without gradient: the exact gradient through it is zero) to keep |A|^p and the norm in range.
    scale = jax.lax.stop_gradient(jnp.max(jnp.abs(flat), axis=(1, 2), keepdims=True))
    flat = flat / jnp.where(scale > 0, scale, 1.0)
    q = jnp.sum(jnp.abs(flat) ** p, axis=-1)
    sq_norm = jnp.sum(q**2, axis=-1, keepdims=True)
    safe = jnp.where(sq_norm > 0, sq_norm, 1.0)
    return jnp.where(sq_norm > 0, q / jnp.sqrt(safe), 0.0)


def attention_transfer(student_features, teacher_features, p=2, where=None, *, squared=False) -> jax.Array:
    """Activation-based attention transfer (Zagoruyko & Komodakis, ICLR 2017).

    The attention map of features ``A`` of shape ``[B, *spatial, C]`` is ``F(A) = sum_c |A_c|^p`` over
    channels, flattened to ``Q`` of length ``prod(spatial)``. Per example::

        loss = || Q_s / ||Q_s||_2 - Q_t / ||Q_t||_2 ||_2            (squared=False, the paper's Eq. 2)
        loss = || Q_s / ||Q_s||_2 - Q_t / ||Q_t||_2 ||_2^2          (squared=True)

    The paper's objective adds ``beta/2 * sum_j loss_j`` over layer pairs ``j`` (``beta = 1000``); that
    weight is the caller's. The authors' code uses the squared form averaged over positions:
    ``beta/2 * squared_loss / prod(spatial)`` reproduces it. Channel counts may differ; spatial sizes must
    match. An all-zero map is taken as the zero vector (loss ``||Q_other/||Q_other|| ||``), and
    gradients are finite (the non-squared norm is given the zero subgradient where the maps agree).

    Args:
      student_features: ``[B, *spatial, C_s]`` float (e.g. NHWC ``[B, H, W, C_s]`` or ``[B, L, C_s]``).
      teacher_features: ``[B, *spatial, C_t]`` float, same ``B`` and spatial sizes.
      p: exponent of the attention mapping, > 0 (the paper uses 2).
      where: optional bool, broadcastable to ``[B]``; masked examples give 0.
      squared: (keyword-only) return the squared distance (the authors' code) instead of the distance
        (the paper).

    Returns:
      ``[B]`` per-example loss.
    """
    s, t = _feature_pair(student_features, teacher_features)
    if s.ndim < 3 or t.ndim < 3:
        raise ValueError(
            f"attention_transfer needs features [B, *spatial, C] with at least one spatial axis; got "
            f"student_features {s.shape} and teacher_features {t.shape}"
        )
    if s.shape[:-1] != t.shape[:-1]:
        raise ValueError(
            f"attention maps need the same batch and spatial sizes: student_features {s.shape} "
            f"(spatial {s.shape[1:-1]}) vs teacher_features {t.shape} (spatial {t.shape[1:-1]}); resize or "
            "pool one of them first (e.g. jax.image.resize or an average pool); channels may differ"
        )
    _, p_value = _scalar(p, "p")
    if p_value is not None and not (np.isfinite(p_value) and p_value > 0):
        raise ValueError(f"p must be a finite number > 0 (the paper uses p=2), got {p_value}")
    where = _where(where, s.shape[:1], f"features of shape {s.shape}, one value per example on axis 0")
    dtype = _compute_dtype(s, t)
    q_s = _attention_map(_keep_rows(s.astype(dtype), where), p)
    q_t = _attention_map(_keep_rows(t.astype(dtype), where), p)
    sq_dist = jnp.sum((q_s - q_t) ** 2, axis=-1)
    if squared:
        return _finish(sq_dist, where)
    safe = jnp.where(sq_dist > 0, sq_dist, 1.0)
    return _finish(jnp.where(sq_dist > 0, jnp.sqrt(safe), 0.0), where)


def similarity_preserving(student_features, teacher_features, where=None) -> jax.Array:
    """Similarity-preserving KD (Tung & Mori, ICCV 2019), split into per-example terms.

    With ``Q = reshape(A, [B, -1])``, ``G = Q Q^T`` (``[B, B]``) and each row of ``G`` L2-normalised
    (``G~``), the paper's batch loss is ``1/b^2 * ||G~_t - G~_s||_F^2``. This returns row ``i``'s share,
    ``loss_i = 1/b * sum_j (G~_t - G~_s)_ij^2``, so ``masked_mean(loss, where)`` is exactly the paper's
    loss. This is the one loss here that mixes examples: masked examples are removed from the batch
    (rows and columns of ``G``) and ``b`` counts the unmasked ones. Under a sharded jit the similarity
    matrix is over the global batch. Student and teacher may have different feature shapes.

    Args:
      student_features: ``[B, ...]`` float.
      teacher_features: ``[B, ...]`` float, same ``B``.
      where: optional bool, broadcastable to ``[B]``; masked examples give 0.

    Returns:
      ``[B]`` per-example loss.
    """
    s, t = _feature_pair(student_features, teacher_features)
    if s.shape[0] != t.shape[0]:
        raise ValueError(
            f"student_features has batch size {s.shape[0]} (shape {s.shape}) but teacher_features has "
            f"{t.shape[0]} (shape {t.shape}); pass the same examples to both"
        )
    where = _where(where, s.shape[:1], f"features of shape {s.shape}, one value per example on axis 0")
    keep = jnp.ones(s.shape[:1], bool) if where is None else where
    dtype = _compute_dtype(s, t)

    def normalized_gram(a):
        q = _keep_rows(a.astype(dtype), keep).reshape(a.shape[0], -1)
        gram = q @ q.T
        sq_norm = jnp.sum(gram**2, axis=-1, keepdims=True)
        safe = jnp.where(sq_norm > 0, sq_norm, 1.0)
        return jnp.where(sq_norm > 0, gram / jnp.sqrt(safe), 0.0)

    diff = normalized_gram(s) - normalized_gram(t)
    count = jnp.maximum(jnp.sum(keep), 1).astype(dtype)
    return _finish(jnp.sum(diff**2, axis=-1) / count, where)


def teacher_bounded_l2(student_boxes, teacher_boxes, target_boxes, margin=0.0, where=None) -> jax.Array:
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
