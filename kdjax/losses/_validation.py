"""Argument checks shared by the losses, plus the masking helpers they all use.

Shapes and dtypes are checked at trace time, always; values (temperatures, indices, labels) only when they
are concrete on this host. ``_where``/``_keep_rows``/``_finish`` implement the ``where`` contract: masked
examples' inputs are zeroed before the loss and their output is exactly 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


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
