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

Losses, by submodule (all re-exported here; import them from ``kdjax.losses``)
    ==============  ===========================================================================
    ``logits``      :func:`kd_kl`, :func:`soft_cross_entropy`, :func:`cross_entropy`,
                    :func:`hinton_kd`, :func:`class_weighted_soft_cross_entropy`,
                    :func:`logit_mse`, :func:`dkd`
    ``topk``        :func:`kd_kl_topk`, :func:`kd_kl_topk_bound` (teacher stored as its top-k logits)
    ``features``    :func:`fitnet_hint`, :func:`attention_transfer`, :func:`similarity_preserving`
    ``boxes``       :func:`smooth_l1`, :func:`teacher_bounded_l2`
    ``reductions``  :func:`masked_mean`
    ==============  ===========================================================================

The private ``_validation`` (argument checks, ``where`` masking) and ``_log_space`` (KL and cross-entropy
of log-probabilities) modules hold what the losses share.
"""
from kdjax.losses.boxes import smooth_l1, teacher_bounded_l2
from kdjax.losses.features import attention_transfer, fitnet_hint, similarity_preserving
from kdjax.losses.logits import (
    class_weighted_soft_cross_entropy,
    cross_entropy,
    dkd,
    hinton_kd,
    kd_kl,
    logit_mse,
    soft_cross_entropy,
)
from kdjax.losses.reductions import masked_mean
from kdjax.losses.topk import kd_kl_topk, kd_kl_topk_bound

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
    "smooth_l1",
    "soft_cross_entropy",
    "teacher_bounded_l2",
]
