"""Shared grain input pipeline: per-host sharding, batching, eval padding, resumable iterators.

Every dataset in :mod:`kdjax.data` goes through the two entry points of this module:

* :func:`make_train_iterator`: an infinite (or ``num_epochs``-long) stream of shuffled, augmented
  examples, split across hosts without overlap and batched to the host-local batch size.
* :func:`make_eval_iterator`: one pass over a split, padded to whole global batches, with ``mask``
  marking the padding rows.

Both return grain ``DatasetIterator`` objects: ``get_state()``/``set_state()`` round-trip exactly, and
``grain.checkpoint.CheckpointSave(iterator)`` / ``CheckpointRestore(iterator)`` store the state in an
orbax checkpoint. :func:`prefetch_to_device` turns the host-local batches into global ``jax.Array``
values sharded over a mesh, in a background thread, while keeping that state exact.

Batches are dicts of NumPy arrays with a leading host-local batch axis ``B = global // process_count``:

======== ======== ========== ==========================================================
key      dtype    shape      meaning
======== ======== ========== ==========================================================
image    any      [B, ...]   what the transform returned (float32 normalised by default)
label    int32    [B]        class index
id       int64    [B]        record index of the example in its source (keys teacher logits)
mask     bool     [B]        True for real rows; False for eval padding rows
epoch    int32    [B]        train batches only: the epoch the row was drawn in
======== ======== ========== ==========================================================

Determinism. Record order within epoch ``e`` is the permutation
``np.random.default_rng([seed, e]).permutation(N)``; host ``h`` of ``P`` takes positions ``h, h + P, h + 2P, ...`` of that permutation, up to
``P * (N // P)`` positions, so hosts are disjoint, together cover all but ``N mod P`` records of each
epoch (a different remainder every epoch) and each gets exactly ``N // P`` records per epoch. The
augmentation of a record is ``transform(record, example_rng(seed, epoch, id))``: a pure function of
``(seed, epoch, id)``, reproducible one example at a time with :func:`train_example`.
"""

from __future__ import annotations

import copy
import queue
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grain
import jax
import numpy as np

from kdjax.sharding import to_global

Transform = Callable[[Mapping[str, Any], "np.random.Generator | None"], Mapping[str, Any]]
"""``transform(record, rng) -> {'image': ..., 'label': ..., ...}``. ``rng`` is None in eval."""

_MAX_SEED = 2**32


class ArraySource:
    """Random-access source over equal-length in-memory arrays (MNIST-1D, digits, tests).

    ``source[i]`` is ``{key: arrays[key][i]}``: the same record interface as a TFDS data source, so
    in-memory datasets run through the same grain pipeline as ImageNet.

    Args:
      arrays: mapping from key to array; every array has the same leading length ``N >= 1`` and
        ``'image'`` and ``'label'`` are present.
    """

    def __init__(self, arrays: Mapping[str, Any]):
        if not isinstance(arrays, Mapping):
            raise TypeError(
                f"arrays must be a mapping of key -> array, got {type(arrays).__name__}; "
                "pass e.g. {'image': x, 'label': y}."
            )
        missing = {"image", "label"} - set(arrays)
        if missing:
            raise ValueError(
                f"arrays is missing key(s) {sorted(missing)}; got keys {sorted(arrays)}. "
                "An ArraySource needs at least 'image' and 'label'."
            )
        self._arrays = {key: np.asarray(value) for key, value in arrays.items()}
        lengths = {key: (value.shape[0] if value.ndim else None) for key, value in self._arrays.items()}
        if len(set(lengths.values())) != 1 or None in lengths.values() or lengths["image"] == 0:
            raise ValueError(
                f"every array must have the same non-zero leading length; got leading lengths {lengths}."
            )
        self._length = lengths["image"]

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {key: value[index] for key, value in self._arrays.items()}

    def take(self, ids: np.ndarray, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
        """``{key: arrays[key][ids]}`` for ``keys``: records ``ids`` in one gather per key."""
        return {key: self._arrays[key][ids] for key in keys}

    def __repr__(self) -> str:
        shapes = {key: value.shape for key, value in self._arrays.items()}
        return f"ArraySource({shapes})"


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    """Host-local batch size ``global_batch_size // process_count``; raises unless it divides."""
    if not isinstance(global_batch_size, (int, np.integer)) or global_batch_size < 1:
        raise ValueError(f"global_batch_size must be a positive integer, got {global_batch_size!r}.")
    if global_batch_size % process_count:
        lower = global_batch_size - global_batch_size % process_count
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by process_count={process_count}; "
            f"every host needs the same local batch. Use a multiple of {process_count}, "
            f"e.g. {max(lower, process_count)} or {lower + process_count}."
        )
    return int(global_batch_size // process_count)


def eval_num_batches(num_records: int, global_batch_size: int) -> int:
    """Number of global eval batches, ``ceil(num_records / global_batch_size)``."""
    return -(-num_records // global_batch_size)


def example_rng(seed: int, epoch: int, example_id: int) -> np.random.Generator:
    """NumPy generator for the augmentation of ``example_id`` in ``epoch`` under ``seed``.

    ``np.random.default_rng([seed, epoch, example_id])`` (SeedSequence entropy from the three
    integers): independent streams for distinct triples, identical for equal ones.
    """
    return np.random.default_rng([int(seed), int(epoch), int(example_id)])


def _passthrough(record: Mapping[str, Any]) -> dict[str, Any]:
    return {"image": record["image"], "label": record["label"]}


def _finish(out: Mapping[str, Any], example_id: int) -> dict[str, Any]:
    if "image" not in out or "label" not in out:
        raise ValueError(
            f"transform must return a mapping with 'image' and 'label'; got keys {sorted(out)} "
            f"for example id {example_id}."
        )
    result = dict(out)
    result["label"] = np.int32(out["label"])
    result["id"] = np.int64(example_id)
    return result


def train_example(
    source: Any,
    example_id: int,
    *,
    seed: int,
    epoch: int,
    transform: Transform | None = None,
) -> dict[str, Any]:
    """The training row for ``source[example_id]`` in ``epoch``: exactly what the train iterator yields.

    This is how a teacher run reproduces the view a student saw: same ``(seed, epoch, id)``, same
    transform, same output. Returns ``{'image', 'label' (int32), 'id' (int64), 'epoch' (int32),
    'mask' (True)}`` plus any extra keys the transform returns.
    """
    record = source[example_id]
    if transform is None:
        out = _passthrough(record)
    else:
        out = transform(record, example_rng(seed, epoch, example_id))
    result = _finish(out, example_id)
    result["epoch"] = np.int32(epoch)
    result["mask"] = np.True_
    return result


def _epoch_order(seed: int, epoch: int, num_records: int) -> np.ndarray:
    """The record order of ``epoch``: a permutation of ``range(num_records)`` drawn by
    ``np.random.default_rng([seed, epoch])`` (int64)."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_records)


def _stack(rows: list[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Rows of equal keys -> one batch dict of stacked arrays."""
    return {key: np.stack([np.asarray(row[key]) for row in rows]) for key in rows[0]}


def _rows(source: Any, transform: Transform | None, ids: np.ndarray,
          views: tuple[int, np.ndarray] | None) -> dict[str, np.ndarray]:
    """The batch of records ``ids`` through ``transform``: train/view rows when ``views`` is
    ``(seed, epochs)`` (each row exactly :func:`train_example`'s), eval rows (``rng=None``) when it
    is None. Without a transform, an :class:`ArraySource` is read with one gather per key."""
    if transform is None and isinstance(source, ArraySource):
        batch = source.take(ids, ("image", "label"))
        batch["label"] = batch["label"].astype(np.int32)
        batch["id"] = ids.astype(np.int64)
        if views is not None:
            batch["epoch"] = views[1].astype(np.int32)
            batch["mask"] = np.ones(len(ids), np.bool_)
        return batch
    if views is not None:
        seed, epochs = views
        return _stack([train_example(source, int(i), seed=seed, epoch=int(e), transform=transform)
                       for i, e in zip(ids, epochs)])
    rows = []
    for i in ids:
        record = source[int(i)]
        rows.append(_finish(_passthrough(record) if transform is None
                            else transform(record, None), int(i)))
    return _stack(rows)


class _TrainBatch:
    """Grain map-with-index: host batch ``b`` -> its training rows.

    Row ``r`` is host stream position ``t = b * L + r``, in epoch ``e = t // (N // P)``: record
    ``order(e)[h + P * (t mod (N // P))]`` (:func:`_epoch_order` of the ``N`` records; host ``h``
    of ``P``).
    """

    def __init__(self, source: Any, transform: Transform | None, seed: int, local_batch: int,
                 process_index: int, process_count: int):
        self._source, self._transform, self._seed = source, transform, seed
        self._per_host, self._local = len(source) // process_count, local_batch
        self._index, self._count = process_index, process_count
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        # Grain's reader threads may call this at once: the cache is replaced, never mutated, and
        # keeps the neighbouring epochs (a batch spans at most two, threads run a few ahead).
        order = self._orders.get(epoch)
        if order is None:
            order = _epoch_order(self._seed, epoch, len(self._source))
            self._orders = {**{e: o for e, o in self._orders.items() if abs(e - epoch) <= 1},
                            epoch: order}
        return order

    def __call__(self, batch_index: int, _: Any) -> dict[str, np.ndarray]:
        epochs, slots = np.divmod(int(batch_index) * self._local + np.arange(self._local),
                                  self._per_host)
        ids = np.empty(self._local, np.int64)
        for epoch in np.unique(epochs):
            rows = epochs == epoch
            ids[rows] = self._order(int(epoch))[self._index + self._count * slots[rows]]
        return _rows(self._source, self._transform, ids, (self._seed, epochs))


class _PaddedBatch:
    """Grain map: host batch ``b`` of a padded pass -> its rows (eval and view iterators).

    Row ``r`` is global position ``j = b * G + h * L + r`` (host ``h``, ``G`` global and ``L``
    local rows); positions ``j >= total`` are padding rows (``mask`` False) that repeat position
    ``j mod total``. Eval: ``total = N`` and ``id = j``. Views (``views=(seed, first)``):
    ``total = E * N`` and ``(epoch, id) = (first + j // N, j mod N)``, each row exactly
    :func:`train_example`'s.
    """

    def __init__(self, source: Any, transform: Transform | None, total: int, global_batch: int,
                 local_batch: int, process_index: int, views: tuple[int, int] | None = None):
        self._source, self._transform, self._total = source, transform, total
        self._global, self._local, self._index = global_batch, local_batch, process_index
        self._views = views

    def __call__(self, batch_index: int) -> dict[str, np.ndarray]:
        positions = (int(batch_index) * self._global + self._index * self._local
                     + np.arange(self._local))
        if self._views is None:
            batch = _rows(self._source, self._transform, positions % self._total, None)
        else:
            seed, first = self._views
            epochs, ids = np.divmod(positions % self._total, len(self._source))
            batch = _rows(self._source, self._transform, ids, (seed, first + epochs))
        batch["mask"] = positions < self._total
        return batch


def _resolve_processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"process_count must be a positive integer, got {count!r}.")
    if not isinstance(index, (int, np.integer)) or not 0 <= index < count:
        raise ValueError(
            f"process_index must be an integer in [0, process_count={count}), got {index!r}."
        )
    return int(index), int(count)


def _check_source(source: Any) -> int:
    if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
        raise TypeError(
            f"source must support len() and [index] (a TFDS data source or ArraySource), "
            f"got {type(source).__name__}."
        )
    num_records = len(source)
    if num_records < 1:
        raise ValueError(f"source is empty (len(source) == {num_records}); nothing to iterate over.")
    return num_records


def _batches(ds: grain.MapDataset, local_batch: int, num_threads: int,
             prefetch_buffer_size: int) -> grain.DatasetIterator:
    """Iterator over a dataset whose elements are whole host batches; grain reads
    ``ceil(prefetch_buffer_size / local_batch)`` batches ahead with ``num_threads`` threads."""
    if num_threads < 0 or prefetch_buffer_size < 0:
        raise ValueError(
            f"num_threads and prefetch_buffer_size must be >= 0, got {num_threads} and "
            f"{prefetch_buffer_size}."
        )
    options = grain.ReadOptions(num_threads=num_threads,
                                prefetch_buffer_size=-(-prefetch_buffer_size // local_batch))
    return iter(ds.to_iter_dataset(options))


def make_train_iterator(
    source: Any,
    *,
    global_batch_size: int,
    seed: int,
    transform: Transform | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
    num_threads: int = 0,
    prefetch_buffer_size: int = 256,
) -> grain.DatasetIterator:
    """Shuffled, augmented, host-sharded training batches as a checkpointable grain iterator.

    Args:
      source: random-access source (``len`` and ``[i]``): a TFDS data source or :class:`ArraySource`.
      global_batch_size: batch size summed over hosts; each host yields ``global // process_count``.
      seed: integer in ``[0, 2**32)``; fixes the shuffle of every epoch and every augmentation.
      transform: ``transform(record, rng) -> {'image', 'label', ...}``; ``None`` passes the record's
        ``image`` and ``label`` through unchanged (no random number generator is built).
      process_index, process_count: this host and the number of hosts (default: JAX's).
      num_epochs: ``None`` for an endless stream; otherwise stop after that many epochs (the last
        partial batch is dropped). Batches may straddle epochs; ``batch['epoch']`` says which.
      num_threads: grain reader threads (0 runs the transform in the consuming thread; use 0 for
        in-memory arrays, ~16 for JPEG decoding, which releases the GIL).
      prefetch_buffer_size: examples grain reads ahead (per host).

    Returns:
      A ``grain.DatasetIterator`` of dicts ``{'image', 'label', 'id', 'epoch', 'mask'}`` with leading
      axis ``global_batch_size // process_count``.
    """
    num_records = _check_source(source)
    index, count = _resolve_processes(process_index, process_count)
    local = local_batch_size(global_batch_size, count)
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < _MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}.")
    if num_records < count:
        raise ValueError(
            f"the source has {num_records} records but there are process_count={count} hosts; "
            "every host needs at least one record per epoch. Use fewer hosts or a larger split."
        )
    per_host = num_records // count
    if num_epochs is not None:
        if not isinstance(num_epochs, (int, np.integer)) or num_epochs < 1:
            raise ValueError(f"num_epochs must be None or a positive integer, got {num_epochs!r}.")
        if per_host * num_epochs < local:
            raise ValueError(
                f"num_epochs={num_epochs} gives each host {per_host * num_epochs} examples, fewer than "
                f"one local batch of {local}; lower global_batch_size or raise num_epochs."
            )
    # One element per host batch (the last partial one dropped); endless without num_epochs.
    ds = (grain.MapDataset.range(1).repeat(None) if num_epochs is None
          else grain.MapDataset.range(per_host * num_epochs // local))
    ds = ds.map_with_index(_TrainBatch(source, transform, int(seed), local, index, count))
    return _batches(ds, local, num_threads, prefetch_buffer_size)


def make_eval_iterator(
    source: Any,
    *,
    global_batch_size: int,
    transform: Transform | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int = 0,
    prefetch_buffer_size: int = 256,
) -> grain.DatasetIterator:
    """One pass over ``source`` in record order, padded to whole global batches, as a grain iterator.

    Every host yields ``eval_num_batches(len(source), global_batch_size)`` batches of
    ``global // process_count`` rows. Global batch ``b`` is records ``b*G .. b*G + G - 1`` (host ``h``
    holds rows ``h*L .. h*L + L - 1`` of it); positions ``>= len(source)`` are padding rows with
    ``mask=False`` that repeat record ``position mod len(source)``. Metrics must weight rows by
    ``mask``; the real rows of all hosts together are every record exactly once.

    Returns:
      A ``grain.DatasetIterator`` of dicts ``{'image', 'label', 'id', 'mask'}``.
    """
    num_records = _check_source(source)
    index, count = _resolve_processes(process_index, process_count)
    local = local_batch_size(global_batch_size, count)
    ds = grain.MapDataset.range(eval_num_batches(num_records, global_batch_size))
    ds = ds.map(_PaddedBatch(source, transform, num_records, global_batch_size, local, index))
    return _batches(ds, local, num_threads, prefetch_buffer_size)


def make_view_iterator(
    source: Any,
    *,
    global_batch_size: int,
    seed: int,
    epochs: tuple[int, int],
    transform: Transform | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int = 0,
    prefetch_buffer_size: int = 256,
) -> grain.DatasetIterator:
    """Every training view of epochs ``first..last``: one padded pass over all ``(epoch, id)``.

    The views a teacher must see to precompute a view-keyed logit store: row ``(epoch, id)`` is
    exactly :func:`train_example` ``(source, id, seed=seed, epoch=epoch, transform=transform)``, the
    row :func:`make_train_iterator` with the same seed and transform yields for ``id`` in ``epoch``
    on any number of hosts. Positions run epoch-major (``epoch = first + j // N``, ``id = j mod N``),
    padded to whole global batches and split over hosts as in :func:`make_eval_iterator`
    (``mask`` False on padding rows). Every id of every epoch is covered, also the ``N mod P``
    records a train epoch on ``P`` hosts leaves out, so the store serves any host count.

    Returns:
      A ``grain.DatasetIterator`` of dicts ``{'image', 'label', 'id', 'epoch', 'mask'}``;
      ``view_num_batches(len(source), epochs, global_batch_size)`` batches per host.
    """
    num_records = _check_source(source)
    index, count = _resolve_processes(process_index, process_count)
    local = local_batch_size(global_batch_size, count)
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < _MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}.")
    first, last = _check_epochs(epochs)
    ds = grain.MapDataset.range(view_num_batches(num_records, (first, last), global_batch_size))
    ds = ds.map(_PaddedBatch(source, transform, (last - first + 1) * num_records,
                             global_batch_size, local, index, views=(int(seed), first)))
    return _batches(ds, local, num_threads, prefetch_buffer_size)


def _check_epochs(epochs: Any) -> tuple[int, int]:
    if (isinstance(epochs, (str, bytes)) or not hasattr(epochs, "__len__") or len(epochs) != 2
            or not all(isinstance(e, (int, np.integer)) and not isinstance(e, bool) for e in epochs)
            or not 0 <= epochs[0] <= epochs[1]):
        raise ValueError(f"epochs must be (first, last), an inclusive range with 0 <= first <= last, "
                         f"got {epochs!r}.")
    return int(epochs[0]), int(epochs[1])


def view_num_batches(num_records: int, epochs: tuple[int, int], global_batch_size: int) -> int:
    """Global batches of :func:`make_view_iterator`: ``ceil(num_records * num_epochs / global)``."""
    first, last = _check_epochs(epochs)
    return eval_num_batches(num_records * (last - first + 1), global_batch_size)


_END = object()


def _produce(
    inner: Iterator[Any],
    checkpointable: bool,
    shardings: Any,
    device_fn: Callable[[dict[str, jax.Array]], Any] | None,
    out: queue.Queue,
    stop: threading.Event,
) -> None:
    """Producer thread: (global batch, inner state after it) pairs into ``out`` until ``stop``."""

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    try:
        while not stop.is_set():
            try:
                batch = next(inner)
            except StopIteration:
                put((_END, None))
                return
            state = copy.deepcopy(inner.get_state()) if checkpointable else None
            arrays = to_global(batch, shardings)
            if device_fn is not None:
                arrays = device_fn(arrays)
            if not put((arrays, state)):
                return
    except BaseException as error:  # handed to the consumer, which re-raises it
        put((error, None))


def _halt(thread: threading.Thread, q: queue.Queue, stop: threading.Event) -> None:
    """Stops a producer thread: sets ``stop`` and drains ``q`` until the thread exits."""
    stop.set()
    while thread.is_alive():
        try:
            q.get(timeout=0.05)
        except queue.Empty:
            continue
    thread.join()


class DevicePrefetchIterator(grain.DatasetIterator):
    """Iterator of global, sharded batches produced ``size`` steps ahead in a background thread.

    ``get_state()`` is the wrapped iterator's state right after the last batch *returned* to the
    caller (not after the batches buffered ahead), so saving it and restoring with ``set_state`` (or
    with ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore``) resumes exactly at the next
    unseen batch. The thread starts on the first ``next`` (or ``start_prefetch``) and stops on
    ``close()``, on exhaustion, when the iterator is garbage-collected, or at interpreter exit
    (a producer still inside JAX while the runtime shuts down would abort the process).
    """

    def __init__(
        self,
        iterator: Iterator[Any],
        shardings: Mapping[str, jax.sharding.Sharding] | jax.sharding.Sharding,
        size: int = 2,
        device_fn: Callable[[dict[str, jax.Array]], Any] | None = None,
    ):
        super().__init__(iterator if isinstance(iterator, grain.DatasetIterator) else ())
        self._thread: threading.Thread | None = None
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"size must be a positive integer (batches kept ahead), got {size!r}.")
        if not isinstance(shardings, (Mapping, jax.sharding.Sharding)):
            raise TypeError(
                "sharding must be a jax.sharding.Sharding (e.g. NamedSharding(mesh, P('data'))) or a "
                f"dict of them per batch key, got {type(shardings).__name__}."
            )
        self._inner = iterator
        self._shardings = shardings
        self._size = int(size)
        self._device_fn = device_fn
        self._checkpointable = hasattr(iterator, "get_state") and hasattr(iterator, "set_state")
        self._state = iterator.get_state() if self._checkpointable else None
        self._queue: queue.Queue | None = None
        self._halt: weakref.finalize | None = None
        self._exhausted = False

    def start_prefetch(self) -> None:
        if self._thread is None and not self._exhausted:
            self._queue = queue.Queue(maxsize=self._size)
            stop = threading.Event()
            self._thread = threading.Thread(
                target=_produce,
                args=(self._inner, self._checkpointable, self._shardings, self._device_fn,
                      self._queue, stop),
                daemon=True,
                name="kdjax-prefetch-to-device",
            )
            self._thread.start()
            # Runs once: from _stop_thread, when self is collected, or at exit (weakref.finalize).
            self._halt = weakref.finalize(self, _halt, self._thread, self._queue, stop)

    def _stop_thread(self) -> None:
        if self._thread is None:
            return
        self._halt()
        self._thread = self._queue = self._halt = None

    def __next__(self) -> dict[str, jax.Array]:
        self._assert_not_closed()
        if self._exhausted:
            raise StopIteration
        self.start_prefetch()
        item, state = self._queue.get()
        if item is _END:
            self._exhausted = True
            self._stop_thread()
            raise StopIteration
        if isinstance(item, BaseException):
            self._exhausted = True
            self._stop_thread()
            raise item
        self._state = state
        return item

    def get_state(self) -> dict[str, Any]:
        if not self._checkpointable:
            raise TypeError(
                f"the wrapped iterator ({type(self._inner).__name__}) has no get_state/set_state; "
                "wrap an iterator from make_train_iterator/make_eval_iterator to checkpoint it."
            )
        return self._state

    def set_state(self, state: dict[str, Any]) -> None:
        if not self._checkpointable:
            raise TypeError(
                f"the wrapped iterator ({type(self._inner).__name__}) has no get_state/set_state; "
                "wrap an iterator from make_train_iterator/make_eval_iterator to checkpoint it."
            )
        self._stop_thread()
        self._inner.set_state(state)
        self._state = state
        self._exhausted = False

    def close(self) -> None:
        self._stop_thread()
        super().close()

    def __str__(self) -> str:
        return f"DevicePrefetchIterator(size={self._size})"


def prefetch_to_device(
    iterator: Iterator[Mapping[str, Any]],
    sharding: Mapping[str, jax.sharding.Sharding] | jax.sharding.Sharding,
    size: int = 2,
    *,
    device_fn: Callable[[dict[str, jax.Array]], Any] | None = None,
) -> DevicePrefetchIterator:
    """Host-local NumPy batches -> global ``jax.Array`` batches, ``size`` batches ahead.

    Each leaf becomes ``jax.make_array_from_process_local_data(sharding, local)``: on ``P`` hosts the
    global leading axis is ``P * B`` and each host supplies its own rows, which is correct on one or
    many hosts. With ``jax_enable_x64`` off, int64/float64 leaves are cast to 32 bits (an id that
    does not fit raises). ``device_fn`` (e.g. ``jax.jit(kdjax.data.normalize_batch)``) runs on the
    global batch, so uint8 images can cross to the device and be normalised there.

    Args:
      iterator: yields dicts of host-local arrays (e.g. from :func:`make_train_iterator`).
      sharding: one ``Sharding`` for every key (``NamedSharding(mesh, P('data'))`` splits the
        leading axis of any rank) or a dict ``{key: Sharding}`` covering every key.
      size: number of device batches queued ahead (>= 1); the thread may hold one more while it
        waits to enqueue it.
      device_fn: optional function applied to each global batch in the background thread.
    """
    return DevicePrefetchIterator(iterator, sharding, size, device_fn)


__all__ = [
    "ArraySource",
    "DevicePrefetchIterator",
    "Transform",
    "eval_num_batches",
    "example_rng",
    "local_batch_size",
    "make_eval_iterator",
    "make_train_iterator",
    "make_view_iterator",
    "prefetch_to_device",
    "train_example",
    "view_num_batches",
]
