"""The driver: :func:`precompute` runs a teacher over host batches and feeds a writer."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

from kdjax.logit_store.rows import _as_ids, _as_mask, _check_id_range
from kdjax.logit_store.writer import LogitStoreWriter


def _row_key(index: tuple[slice, ...], n: int) -> tuple[int, int]:
    start, stop, _ = index[0].indices(n)
    return start, stop


def _local_rows(arr: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in global row order (replicas once)."""
    n = arr.shape[0]
    pieces = {}
    for shard in arr.addressable_shards:
        pieces.setdefault(_row_key(shard.index, n), shard.data)
    return np.concatenate([np.asarray(pieces[key]) for key in sorted(pieces)], axis=0)


def _all_processes_agree(flag: bool, collective: bool) -> bool:
    """Logical AND of ``flag`` over processes when ``collective`` (a collective if there are several)."""
    if not collective or jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.asarray([flag]))))


def store_outputs(teacher_fn: Callable[[Any, dict[str, Any]], Any], num_classes: int,
                  format: str = "full", k: int | None = None) -> Callable:
    """``forward(variables, batch)``: what :func:`precompute` computes on the device for a store
    of ``format`` (a :class:`~kdjax.logit_store.StoreSpec`'s): ``(logits [B, C],)`` for 'full',
    ``(values [B, k] float32, indices [B, k])`` (``jax.lax.top_k``) for 'topk'."""
    def forward(variables, batch):
        out = teacher_fn(variables, batch)
        if hasattr(out, "logits"):
            logits = out.logits
        else:
            logits = out[0] if isinstance(out, tuple) else out
        if logits.ndim != 2 or logits.shape[1] != num_classes:
            raise ValueError(f"teacher_fn returned logits of shape {logits.shape}; the store expects "
                             f"[B, num_classes={num_classes}]")
        if format == "topk":
            return jax.lax.top_k(logits.astype(np.float32), k)
        return (logits,)
    return forward


def precompute(teacher_fn: Callable[[Any, dict[str, Any]], Any], teacher_variables: Any,
               batches: Iterable[Mapping[str, np.ndarray]], writer: LogitStoreWriter, *,
               sharding: jax.sharding.NamedSharding | None = None, show_progress: bool = True,
               total: int | None = None,
               should_stop: Callable[[int], bool] | None = None) -> dict[str, int]:
    """Run a teacher over host-local batches and write its outputs to ``writer``.

    ``teacher_fn(teacher_variables, batch)`` returns logits ``[B, C]``, an object with a ``logits``
    attribute (``TeacherOutput``) or a tuple whose first element is the logits (e.g.
    ``(logits, features)``); it is jitted here. The device batch is every key of
    the host batch but ``'id'``, which stays on the host (int64 is no device dtype without x64).
    For a 'topk' store the top k are taken on device (``jax.lax.top_k``) so only ``[B, k]`` comes back.

    Without ``sharding`` each process runs its batches on its default device. With a
    ``NamedSharding`` whose spec shards the leading (batch) axis (only its first entry is used:
    every batch array and output is split along axis 0 that way), each host batch is one process's
    part of a global batch (``jax.make_array_from_process_local_data``); the outputs keep that
    sharding and every process writes the rows its devices hold, so processes write disjoint ids.
    A batch whose real rows (``'mask'`` True) are all written already is skipped without running the
    teacher (a resumed run); with several processes the skip is agreed on by all of them.

    For a view store (``writer.spec.views``) each batch also carries ``'epoch'`` (int ``[B]``), the
    epoch of each row's augmented view (:func:`kdjax.data.make_view_iterator`); rows are written
    under ``(epoch, id)``.

    ``should_stop(n)`` (e.g. :meth:`kdjax.preemption.PreemptionWatcher.should_stop`; on several
    processes a collective, called by all with the same ``n``) is asked after each batch ``n``
    (1, 2, ...); True ends the pass there, and the result has ``'stopped': 1``.

    Returns ``{'batches', 'batches_skipped', 'rows_written'}`` counts for this process (plus
    ``'stopped': 1`` when ``should_stop`` ended it). The caller closes the writer (or, when
    stopped, suspends it: :meth:`LogitStoreWriter.suspend`), synchronises the processes and calls
    ``finalize`` on process 0.
    """
    spec = writer.spec
    if sharding is not None and not isinstance(sharding, jax.sharding.NamedSharding):
        raise TypeError(f"sharding must be a jax.sharding.NamedSharding over the batch axis, got "
                        f"{type(sharding).__name__}")
    if spec.num_rows > np.iinfo(np.int32).max:
        raise ValueError(f"precompute carries ids through the device as int32; num_examples="
                         f"{spec.num_examples} (rows {spec.num_rows}) does not fit")
    row_sharding = None
    if sharding is not None:
        lead = sharding.spec[0] if len(sharding.spec) else None
        row_sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(lead))

    fwd = jax.jit(store_outputs(teacher_fn, spec.num_classes, spec.format, spec.k),
                  out_shardings=row_sharding)

    def to_device(x: np.ndarray) -> Any:
        return x if sharding is None else jax.make_array_from_process_local_data(row_sharding, x)

    def to_host(x: Any) -> np.ndarray:
        return np.asarray(x) if sharding is None else _local_rows(x)

    def write_batch(batch, ids: np.ndarray, mask: np.ndarray, epochs: np.ndarray | None) -> int:
        device_batch = {key: to_device(np.asarray(val)) for key, val in batch.items() if key != "id"}
        outputs = fwd(teacher_variables, device_batch)
        local_ids = to_host(to_device(np.where(mask, ids, 0).astype(np.int32)))
        local_mask = to_host(to_device(mask))
        local_epochs = None
        if epochs is not None:
            local_epochs = to_host(to_device(np.where(mask, epochs, spec.epochs[0]).astype(np.int32)))
        host = [to_host(o) for o in outputs]
        if spec.format == "topk":
            return writer.write_topk(local_ids, host[0], host[1], local_mask, epochs=local_epochs)
        return writer.write(local_ids, host[0], local_mask, epochs=local_epochs)

    from tqdm import tqdm

    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    stats = {"batches": 0, "batches_skipped": 0, "rows_written": 0}
    bar = tqdm(total=total, unit="batch", desc=f"teacher -> {os.path.basename(writer.path)}",
               disable=not show_progress or jax.process_index() != 0)
    try:
        for batch in batches:
            if "id" not in batch:
                raise ValueError(f"precompute batches need an 'id' key, got keys {sorted(batch)}")
            ids = _as_ids(batch["id"], "batch['id']")
            mask = _as_mask(batch.get("mask"), ids.size)
            _check_id_range(ids[mask], spec.num_examples, "precompute batch['id']")
            epochs = None
            if spec.views:
                if "epoch" not in batch:
                    raise ValueError(f"precompute into a view store ({spec.describe_views()}) needs "
                                     f"batches with an 'epoch' key (kdjax.data.make_view_iterator), got "
                                     f"keys {sorted(batch)}")
                epochs = np.asarray(batch["epoch"])
            stats["batches"] += 1
            bar.update(1)
            done = writer.is_written(ids[mask], None if epochs is None else epochs[mask])
            if _all_processes_agree(bool(done.all()), sharding is not None):
                stats["batches_skipped"] += 1
            else:
                stats["rows_written"] += write_batch(batch, ids, mask, epochs)
                bar.set_postfix(rows=stats["rows_written"], refresh=False)
            if should_stop is not None and should_stop(stats["batches"]):
                stats["stopped"] = 1
                break
    finally:
        bar.close()
    return stats
