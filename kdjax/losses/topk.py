"""Sparse KD against a teacher stored as its top-k logits: :func:`kd_kl_topk` and its error bound
:func:`kd_kl_topk_bound` (derivation in docs/losses.md).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from kdjax.losses._log_space import _kl_from_log_probs, _tempered
from kdjax.losses._validation import (
    _CLASS_MASK_HINT,
    _check_index_range,
    _compute_dtype,
    _concrete,
    _finish,
    _float_array,
    _keep_rows,
    _logit_pair,
    _temperature,
    _where,
)


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


def kd_kl_topk(
    student_logits: ArrayLike,
    teacher_topk_values: ArrayLike,
    teacher_topk_indices: ArrayLike,
    temperature: ArrayLike = 1.0,
    where: ArrayLike | None = None,
) -> jax.Array:
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
        when concrete; under jit an out-of-range or repeated index gives NaN for its example).
      temperature: scalar ``T > 0``.
      where: optional bool, broadcastable to ``[...]``; masked examples give 0.

    Returns:
      ``[...]`` per-example loss, >= 0.

    Example (a uniform student over 3 classes; the teacher stores its top 2 logits, 2 and 0, so
    ``q = softmax([2, 0])`` and the loss is ``log 3 - H(q)``):

    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> student = jnp.zeros((1, 3))
    >>> values, indices = jnp.array([[2.0, 0.0]]), jnp.array([[0, 1]])
    >>> [round(float(v), 4) for v in losses.kd_kl_topk(student, values, indices)]
    [0.7333]
    """
    s, values, indices, where = _topk_inputs(student_logits, teacher_topk_values, teacher_topk_indices, where)
    temp = _temperature(temperature)
    dtype = _compute_dtype(s, values)
    temp = temp.astype(dtype)
    num_classes = s.shape[-1]
    s = _keep_rows(s.astype(dtype), where)
    values = _keep_rows(values.astype(dtype), where)
    indices = _keep_rows(indices, where)
    log_ps = jax.nn.log_softmax(_tempered(s, temp), axis=-1)
    # Under jit the indices are not checked: a row with an index out of range or a repeated one
    # gives NaN (a repeat would weigh one class twice and could make the "KL" negative).
    ordered = jnp.sort(indices, axis=-1)
    valid = (jnp.all((indices >= 0) & (indices < num_classes), axis=-1)
             & jnp.all(ordered[..., 1:] != ordered[..., :-1], axis=-1))
    log_ps_at = jnp.take_along_axis(log_ps, jnp.clip(indices, 0, num_classes - 1), axis=-1)
    log_q = jax.nn.log_softmax(_tempered(values, temp), axis=-1)
    loss = temp**2 * _kl_from_log_probs(log_q, log_ps_at)
    return _finish(jnp.where(valid, loss, jnp.nan), where)


def kd_kl_topk_bound(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    teacher_topk_indices: ArrayLike,
    temperature: ArrayLike = 1.0,
    where: ArrayLike | None = None,
) -> jax.Array:
    """Per-example upper bound on ``|kd_kl(s, t) - kd_kl_topk(s, t[idx], idx)|``.

    ``bound = max(a, T^2 * eps * L - a)`` with ``a = eps * kd_kl_topk + T^2 * H(eps)``, where
    ``eps = sum_{c not stored} softmax(t / T)_c`` is the teacher's tail mass, ``L`` the largest
    ``-log softmax(s / T)_c`` over the tail classes that hold teacher mass (0 when ``k = C``; classes
    the teacher leaves out with ``-inf`` add nothing to ``D``) and
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

    Example (the teacher ``[2, 0, -1]`` stored as its top 2; the tail holds 4.2% of its mass):

    >>> import jax
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> student, teacher = jnp.zeros((1, 3)), jnp.array([[2.0, 0.0, -1.0]])
    >>> values, indices = jax.lax.top_k(teacher, 2)
    >>> full = losses.kd_kl(student, teacher)
    >>> sparse = losses.kd_kl_topk(student, values, indices)
    >>> [round(float(v), 4) for v in full - sparse]
    [-0.1589]
    >>> [round(float(v), 4) for v in losses.kd_kl_topk_bound(student, teacher, indices)]
    [0.2051]
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
    # [..., C]: whether each class is stored (a scatter, not a [..., C, k] comparison).
    rows = indices.reshape(-1, indices.shape[-1])
    stored = (jnp.zeros((rows.shape[0], num_classes), bool)
              .at[jnp.arange(rows.shape[0])[:, None], rows].set(True, mode="drop")
              .reshape(t.shape))
    log_pt = jax.nn.log_softmax(_tempered(t, temp), axis=-1)
    neg_log_ps = -jax.nn.log_softmax(_tempered(s, temp), axis=-1)
    tail = ~stored & (log_pt > -jnp.inf)
    eps = jnp.clip(jnp.sum(jnp.where(stored, 0.0, jnp.exp(log_pt)), axis=-1), 0.0, 1.0)
    tail_nll = jnp.max(jnp.where(tail, neg_log_ps, 0.0), axis=-1)
    binary_entropy = -jax.scipy.special.xlogy(eps, eps) - jax.scipy.special.xlog1py(1.0 - eps, -eps)
    a = eps * topk + temp**2 * binary_entropy
    upper = jnp.where(eps > 0, temp**2 * eps * tail_nll, 0.0) - a
    return _finish(jnp.maximum(a, upper), where)
