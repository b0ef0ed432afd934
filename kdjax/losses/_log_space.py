"""Log-space primitives shared by the logit losses: KL, cross-entropy and a range-checked gather.

All take log-probabilities (never exponentiated logits) over the last axis and treat ``0 * log 0`` as 0,
which is what lets ``-inf`` logits leave classes out.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _tempered(z: jax.Array, temp: jax.Array) -> jax.Array:
    """``z / temp`` with ``-inf`` entries kept ``-inf`` without dividing them, so the gradient with
    respect to ``temp`` stays finite (``d(-inf / T)/dT`` would be ``inf * 0``)."""
    out = z == -jnp.inf
    return jnp.where(out, -jnp.inf, jnp.where(out, 0.0, z) / temp)


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
