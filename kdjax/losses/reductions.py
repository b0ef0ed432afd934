"""Batch reduction of per-example losses: :func:`masked_mean`."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from kdjax.losses._validation import _compute_dtype, _float_array


def masked_mean(values: ArrayLike, where: ArrayLike | None = None) -> jax.Array:
    """Mean of ``values`` over the entries where ``where`` is True.

    Args:
      values: per-example losses, any shape (e.g. ``[B]``), any float dtype.
      where: optional bool array broadcastable to ``values.shape``; None means all entries.

    Returns:
      A scalar, ``sum(values * where) / max(sum(where), 1)`` in at least float32. An all-False ``where``
      gives 0 (not NaN) with zero gradient. Masked entries never reach the result or its gradient, even if
      they hold NaN/inf.

    Example (the padding row's value never reaches the mean):

    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> values = jnp.array([1.0, 2.0, 3.0, 100.0])
    >>> round(float(losses.masked_mean(values, jnp.array([True, True, True, False]))), 4)
    2.0
    >>> round(float(losses.masked_mean(values)), 4)
    26.5
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
