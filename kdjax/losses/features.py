"""Feature losses on intermediate activations ``[B, ...]``: :func:`fitnet_hint`,
:func:`attention_transfer` and :func:`similarity_preserving`.
"""
from __future__ import annotations

import warnings
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from kdjax.losses._validation import _compute_dtype, _finish, _float_array, _keep_rows, _scalar, _where


def _feature_pair(student_features, teacher_features):
    s = _float_array(student_features, "student_features")
    t = _float_array(teacher_features, "teacher_features")
    if s.ndim < 1 or t.ndim < 1:
        raise ValueError(
            f"features must have a leading batch axis, shape [B, ...]; got shapes {s.shape} and {t.shape}"
        )
    return s, t


def _hint_reduction(reduction, normalize, caller: str) -> str:
    """The reduction over the non-batch axes that :func:`fitnet_hint` applies, from ``reduction`` and the
    deprecated ``normalize`` (a DeprecationWarning, attributed to ``caller``'s caller); ``caller`` names
    the public function in messages."""
    if normalize is not None:
        if reduction is not None:
            raise TypeError(
                f"{caller} got both reduction={reduction!r} and the deprecated normalize={normalize!r}; "
                "pass only reduction ('sum' or 'mean')"
            )
        replacement = "mean" if normalize else "sum"
        warnings.warn(
            f"{caller}(normalize=...) is deprecated: it never normalised the features, it chose the "
            f"reduction over the non-batch axes; pass reduction={replacement!r} instead of "
            f"normalize={normalize!r}",
            DeprecationWarning,
            stacklevel=3,
        )
        return replacement
    if reduction is None:
        return "sum"
    if not (isinstance(reduction, str) and reduction in ("sum", "mean")):
        raise ValueError(
            f"reduction must be 'sum' (the paper's 1/2 * ||u - r||^2) or 'mean' (1/2 * mean((u - r)^2) over "
            f"the non-batch axes), got {reduction!r}"
        )
    return reduction


def fitnet_hint(
    student_features: ArrayLike,
    teacher_features: ArrayLike,
    where: ArrayLike | None = None,
    *,
    reduction: Literal["sum", "mean"] | None = None,
    normalize: bool | None = None,
) -> jax.Array:
    """FitNets hint loss (Romero et al., 2015): ``loss = 1/2 * ||u - r||^2`` per example.

    ``u`` is the teacher's hint-layer output and ``r`` the student's guided layer after its regressor
    (the regressor, or Chen et al.'s adaptation layer for detection, is part of the student model and
    maps the student's features to the teacher's shape). With ``reduction='sum'`` (the default, the
    paper's) the squared norm sums over all non-batch axes; with ``reduction='mean'`` it is the mean over
    them instead (``1/2 * mean((u - r)^2)``), which keeps the loss scale independent of the feature size.
    PyTorch's ``F.mse_loss(r, u)`` (RepDistiller's and mdistiller's hint loss) is
    ``2 * masked_mean(fitnet_hint(r, u, reduction='mean'))``.

    Args:
      student_features: ``[B, ...]`` float, the regressor output.
      teacher_features: ``[B, ...]`` float, same shape.
      where: optional bool, broadcastable to ``[B]``; masked examples give 0.
      reduction: (keyword-only) ``'sum'`` (None, the default, means ``'sum'``) or ``'mean'`` over the
        non-batch axes.
      normalize: (keyword-only) deprecated spelling of ``reduction``: True is ``reduction='mean'``, False
        is ``reduction='sum'``; it warns (DeprecationWarning), and passing it with ``reduction`` is a
        TypeError. It never normalised the features.

    Returns:
      ``[B]`` per-example loss.

    Example (two examples of four elements each; the second differs by 2 in two elements):

    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> regressed = jnp.zeros((2, 2, 2))
    >>> hint = jnp.array([[[1.0, 1.0], [1.0, 1.0]], [[0.0, 2.0], [0.0, 2.0]]])
    >>> [round(float(v), 4) for v in losses.fitnet_hint(regressed, hint)]
    [2.0, 4.0]
    >>> [round(float(v), 4) for v in losses.fitnet_hint(regressed, hint, reduction="mean")]
    [0.5, 1.0]
    >>> mse = 2 * losses.masked_mean(losses.fitnet_hint(regressed, hint, reduction="mean"))
    >>> round(float(mse), 4)  # mean((regressed - hint)^2) over all 8 elements
    1.5
    """
    how = _hint_reduction(reduction, normalize, "fitnet_hint")
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
    reduce = jnp.mean if how == "mean" else jnp.sum
    return _finish(0.5 * reduce(diff**2, axis=axes), where)


def _attention_map(features: jax.Array, p) -> jax.Array:
    """``vec(sum_c |A_c|^p) / ||.||_2`` per example, for features ``[B, *spatial, C]``."""
    flat = features.reshape(features.shape[0], -1, features.shape[-1])
    # The normalised map is invariant to a positive rescaling of A, so divide by the per-example max |A|
    # first (without gradient: the exact gradient through it is zero) to keep |A|^p and the norm in range.
    scale = jax.lax.stop_gradient(jnp.max(jnp.abs(flat), axis=(1, 2), keepdims=True))
    flat = flat / jnp.where(scale > 0, scale, 1.0)
    # |A|^p, with 0 where A = 0 by a double where: for p < 1 the derivative of |A|^p there is
    # inf * 0 (NaN), and ReLU features hold exact zeros.
    nonzero = flat != 0
    q = jnp.sum(jnp.where(nonzero, jnp.abs(jnp.where(nonzero, flat, 1.0)) ** p, 0.0), axis=-1)
    sq_norm = jnp.sum(q**2, axis=-1, keepdims=True)
    safe = jnp.where(sq_norm > 0, sq_norm, 1.0)
    return jnp.where(sq_norm > 0, q / jnp.sqrt(safe), 0.0)


def attention_transfer(
    student_features: ArrayLike,
    teacher_features: ArrayLike,
    p: ArrayLike = 2,
    where: ArrayLike | None = None,
    *,
    squared: bool = False,
) -> jax.Array:
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

    Features are channels-last (NHWC); PyTorch's NCHW maps need ``x.transpose(0, 2, 3, 1)``. When the
    spatial sizes differ, RepDistiller and mdistiller shrink the larger map with
    ``F.adaptive_avg_pool2d``; for sizes that divide that is a block mean,
    ``x.reshape(B, h, H // h, w, W // w, C).mean(axis=(2, 4))`` for NHWC ``x`` of spatial ``(H, W)``
    pooled to ``(h, w)``. ``jax.image.resize`` with its defaults (linear, ``antialias=True``) blends
    neighbouring blocks and gives different values; with ``antialias=False`` it matches only when
    halving. Their per-layer loss (``F.normalize(f.pow(p).mean(1))``, squared difference averaged over
    batch and positions) is ``masked_mean(attention_transfer(s, t, p, squared=True)) / prod(spatial)``
    (for odd ``p`` they do not take ``|A|``).

    Args:
      student_features: ``[B, *spatial, C_s]`` float (e.g. NHWC ``[B, H, W, C_s]`` or ``[B, L, C_s]``).
      teacher_features: ``[B, *spatial, C_t]`` float, same ``B`` and spatial sizes.
      p: exponent of the attention mapping, > 0 (the paper uses 2).
      where: optional bool, broadcastable to ``[B]``; masked examples give 0.
      squared: (keyword-only) return the squared distance (the authors' code) instead of the distance
        (the paper).

    Returns:
      ``[B]`` per-example loss.

    Example (the student's map puts its mass on the top row, the teacher's is uniform; one student
    channel against two teacher channels):

    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> student = jnp.array([[[[1.0], [1.0]], [[0.0], [0.0]]]])  # [B=1, H=2, W=2, C=1]
    >>> teacher = jnp.ones((1, 2, 2, 2))
    >>> [round(float(v), 4) for v in losses.attention_transfer(student, teacher)]
    [0.7654]
    >>> [round(float(v), 4) for v in losses.attention_transfer(student, teacher, squared=True)]
    [0.5858]
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
            f"(spatial {s.shape[1:-1]}) vs teacher_features {t.shape} (spatial {t.shape[1:-1]}); pool the "
            "larger one down to the smaller size first, as RepDistiller and mdistiller do with "
            "F.adaptive_avg_pool2d: when the sizes divide that is a block mean, for NHWC "
            "x.reshape(B, h, H // h, w, W // w, C).mean(axis=(2, 4)) (or an average pool with window = "
            "stride = H // h); do not resize with jax.image.resize's defaults (linear with antialias blends "
            "neighbouring blocks and gives different values; antialias=False matches only when halving); "
            "channels may differ"
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


def similarity_preserving(
    student_features: ArrayLike, teacher_features: ArrayLike, where: ArrayLike | None = None
) -> jax.Array:
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

    Example (the student tells its two examples apart, the teacher does not):

    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> student = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> teacher = jnp.array([[1.0, 0.0], [1.0, 0.0]])
    >>> loss = losses.similarity_preserving(student, teacher)
    >>> [round(float(v), 4) for v in loss]
    [0.2929, 0.2929]
    >>> round(float(losses.masked_mean(loss)), 4)  # the paper's 1/b^2 ||G~_t - G~_s||_F^2
    0.2929
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
