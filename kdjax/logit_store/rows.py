"""Checks and conversions of batch rows: example ids, padding masks, finiteness, host top-k."""
from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from kdjax.logit_store.spec import _INDEX_DTYPE, StoreSpec


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


def _row_keys(spec: StoreSpec, ids: np.ndarray, epochs: Any, where: str) -> np.ndarray:
    """Row keys of example ``ids [B]`` (checked) drawn in ``epochs [B]``: the ids themselves for a
    store of one view per example (``epochs`` is ignored), ``(epoch - first) * num_examples + id``
    for a view store, whose rows must all carry an epoch of its range."""
    _check_id_range(ids, spec.num_examples, where)
    if not spec.views:
        return ids
    if epochs is None:
        raise ValueError(f"{where}: this logit store holds {spec.describe_views()}, one row per "
                         f"(epoch, id); pass the epoch of every row (a train batch's 'epoch' key)")
    epochs = np.asarray(epochs)
    if epochs.shape != ids.shape or not np.issubdtype(epochs.dtype, np.integer):
        raise ValueError(f"{where}: epochs must be an integer array of shape {ids.shape} like the ids, "
                         f"got shape {epochs.shape} dtype {epochs.dtype}")
    first, last = spec.epochs
    bad = (epochs < first) | (epochs > last)
    if bad.any():
        pos = np.flatnonzero(bad)
        raise ValueError(f"{where}: rows of epochs {sorted(set(epochs[pos].tolist()))[:5]} (batch rows "
                         f"{pos[:5].tolist()}) but the logit store holds the views of epochs {first}-{last} "
                         f"only; precompute a view store that covers every epoch of the run "
                         f"(--views=epochs:0-<num_epochs - 1>, config teacher.store_views)")
    return (epochs.astype(np.int64) - first) * spec.num_examples + ids


def _describe_keys(spec: StoreSpec, keys: np.ndarray) -> list:
    """Row keys as messages show them: example ids, or ``(epoch, id)`` pairs for a view store."""
    keys = np.asarray(keys)
    if not spec.views:
        return keys.tolist()
    epochs, ids = np.divmod(keys, spec.num_examples)
    return [(int(e) + spec.epochs[0], int(i)) for e, i in zip(epochs, ids)]


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
