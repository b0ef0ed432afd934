"""Checks and conversions of batch rows: example ids, padding masks, finiteness, host top-k."""
from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from kdjax.logit_store.spec import _INDEX_DTYPE


def _as_ids(ids: Any, name: str = "ids") -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D integer array of example ids, got shape {ids.shape} "
                         f"dtype {ids.dtype}")
    return ids.astype(np.int64, copy=False)


def _as_mask(mask: Any, n: int) -> np.ndarray:
    if mask is None:
        return np.ones(n, dtype=bool)
    mask = np.asarray(mask)
    if mask.shape != (n,) or mask.dtype != np.bool_:
        raise ValueError(f"mask must be a bool array of shape ({n},) matching ids, got shape "
                         f"{mask.shape} dtype {mask.dtype}")
    return mask


def _check_id_range(ids: np.ndarray, num_examples: int, where: str) -> None:
    bad = (ids < 0) | (ids >= num_examples)
    if bad.any():
        pos = np.flatnonzero(bad)
        raise ValueError(f"{where}: example ids must be in [0, {num_examples}), got {ids[pos[:5]].tolist()} "
                         f"at batch rows {pos[:5].tolist()} ({pos.size} out of range); ids are the "
                         f"record index of the example in its split")


def _repeated_ids(ids: np.ndarray) -> np.ndarray:
    """The ids that occur more than once in ``ids`` (sorted, each once)."""
    uniq, counts = np.unique(ids, return_counts=True)
    return uniq[counts > 1]


def _is_float(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is a NumPy float or an ml_dtypes float (bfloat16 has kind 'V' in NumPy)."""
    return np.issubdtype(dtype, np.floating) or dtype in (np.dtype(ml_dtypes.bfloat16),)


def _check_finite(x: np.ndarray, what: str) -> None:
    if not np.isfinite(x).all():
        rows = np.flatnonzero(~np.isfinite(x).all(axis=-1))
        raise ValueError(f"{what} are not finite in batch rows {rows[:5].tolist()} ({rows.size} rows)")


def topk_host(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row on the host: ``values [B, k]`` (float32, descending), ``indices [B, k]`` int32.

    Ties go to the lower class index, as in ``jax.lax.top_k``.
    """
    x = np.asarray(logits, dtype=np.float32)
    indices = np.argsort(-x, axis=-1, kind="stable")[:, :k]
    return np.take_along_axis(x, indices, axis=-1), indices.astype(_INDEX_DTYPE)
