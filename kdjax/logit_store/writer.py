"""The writer: :class:`LogitStoreWriter` appends one process's rows to its shard, commits and resumes."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from kdjax.logit_store.files import _FileLock, _fsync_dir, _read_json, _this_holder, _write_json
from kdjax.logit_store.layout import (LAYOUT_VERSION, _DONE, _PROGRESS, _SHARDS_DIR, _SPEC, _list_shards,
                                      _shard_files, _shard_name, _shard_state, is_complete)
from kdjax.logit_store.rows import (_as_ids, _as_mask, _check_finite, _describe_keys, _is_float,
                                    _repeated_ids, _row_keys, topk_host)
from kdjax.logit_store.spec import _INDEX_DTYPE, StoreSpec

_LOCK = "LOCK"


class LogitStoreWriter:
    """Appends one process's teacher outputs to its own shard of a store.

    Each writer process (``process_index`` of ``process_count``) owns the directory
    ``shards/shard-<process_index>-of-<process_count>``; writers never touch each other's files.
    A writer may receive any ids; an id it already holds is skipped (so a resumed run can feed the
    whole split again). Every ``commit_every`` calls to ``write``/``write_topk`` the appended rows are
    fsynced and committed (``progress.json``); ``close()`` commits and writes the shard's ``DONE``
    marker. Leaving the ``with`` block by an exception closes the files without committing or
    marking the shard done: the store stays incomplete until resumed.

    A writer holds an exclusive lock on its shard (``flock`` on ``<shard dir>/LOCK``, which records
    the holder as ``pid@host``) from construction until ``close()``, an exception that leaves the
    ``with`` block, a failed write, or garbage collection; the kernel drops it when the process dies,
    so a killed run never blocks its resume. A second writer on a locked shard (e.g. two runs
    sharing one store directory) raises ValueError naming the holder, before touching any file.
    Caveats: some network file systems do not propagate ``flock`` between hosts (there two hosts
    can both take the lock; give each run its own directory), and a child forked while the lock is
    held shares it until the child exits or the writer releases it.

    Args:
      path: store directory (created if missing).
      spec: what the store holds; must equal the spec of any shard already in ``path``.
      process_index, process_count: this writer's shard and the number of writers.
      resume: continue this process's shard if ``path`` holds one from an interrupted run
        (rows past the last commit are discarded); without it an existing shard is an error.
      commit_every: number of ``write`` calls between commits (1: every call is durable on return).
    """

    def __init__(self, path: str | os.PathLike, spec: StoreSpec, *, process_index: int = 0,
                 process_count: int = 1, resume: bool = False, commit_every: int = 1):
        if not isinstance(spec, StoreSpec):
            raise TypeError(f"spec must be a StoreSpec, got {type(spec).__name__}")
        if not isinstance(process_count, int) or process_count < 1:
            raise ValueError(f"process_count must be a positive integer, got {process_count!r}")
        if not isinstance(process_index, int) or not 0 <= process_index < process_count:
            raise ValueError(f"process_index must be an integer in [0, process_count={process_count}), "
                             f"got {process_index!r}")
        if not isinstance(commit_every, int) or commit_every < 1:
            raise ValueError(f"commit_every must be a positive integer, got {commit_every!r}")
        self.path = os.fspath(path)
        self.spec = spec
        self.process_index = process_index
        self.process_count = process_count
        self.commit_every = commit_every
        self._files_spec = _shard_files(spec)
        self._shard_dir = os.path.join(self.path, _SHARDS_DIR, _shard_name(process_index, process_count))
        self._check_store_dir()

        os.makedirs(self._shard_dir, exist_ok=True)
        self._lock = self._acquire_lock()
        try:
            self._check_partial(resume)
            self._done = np.zeros(spec.num_rows, dtype=bool)  # by row key
            self._rows = 0
            if os.path.exists(os.path.join(self._shard_dir, _SPEC)):
                self._rows = self._recover()
            else:
                _write_json(os.path.join(self._shard_dir, _SPEC), self._shard_spec_json())
            self._committed = self._rows
            self._writes_since_commit = 0
            self._files = {name: open(self._file(name), "ab") for name in self._files_spec}
        except BaseException:
            self._lock.release()
            raise
        self._state = "open"

    # -- setup ---------------------------------------------------------------------------------

    def _file(self, name: str) -> str:
        return os.path.join(self._shard_dir, f"{name}.bin")

    def _shard_spec_json(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict(), "process_index": self.process_index,
                "process_count": self.process_count, "layout_version": LAYOUT_VERSION}

    def _acquire_lock(self) -> _FileLock:
        """Lock this writer's shard, or raise naming the writer that holds it."""
        lock = _FileLock(os.path.join(self._shard_dir, _LOCK))
        holder = lock.acquire()
        if holder is None:
            return lock
        if holder == _this_holder():
            who = f"{holder}, i.e. this process: close its other LogitStoreWriter on the shard first"
        else:
            who = f"pid@host {holder}"
        raise ValueError(
            f"logit store shard {self._shard_dir} is locked by another writer ({who}); two writers on one "
            f"shard would ruin it (e.g. two runs sharing one store directory). Wait for that run to "
            f"finish or stop it, or write this store to another directory")

    def _check_store_dir(self) -> None:
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ValueError(f"logit store path {self.path} exists and is not a directory")
        if is_complete(self.path):
            raise ValueError(f"logit store at {self.path} is already complete; open it with "
                             f"LogitStore.open, or delete the directory to write it again")
        for name, (_, count) in _list_shards(self.path).items():
            if count != self.process_count:
                raise ValueError(
                    f"logit store at {self.path} was started by {count} writer processes ({name}) but this "
                    f"writer has process_count={self.process_count}; resume with the same number of "
                    f"processes or delete the directory")
            spec_file = os.path.join(self.path, _SHARDS_DIR, name, _SPEC)
            if os.path.exists(spec_file):
                other = StoreSpec.from_dict(_read_json(spec_file)["spec"])
                if other != self.spec:
                    raise ValueError(
                        f"logit store at {self.path} is being written for {other} ({name}) but this writer "
                        f"has {self.spec}; use another directory or delete this one")

    def _check_partial(self, resume: bool) -> None:
        if os.path.exists(os.path.join(self._shard_dir, _SPEC)) and not resume:
            raise ValueError(
                f"logit store at {self.path} already holds a partial write of "
                f"{os.path.basename(self._shard_dir)} ({_shard_state(self._shard_dir)}), probably from an "
                f"interrupted run; pass resume=True (the precompute command: --resume) to continue it, "
                f"or delete the directory to start over")

    def _recover(self) -> int:
        """Reopen an interrupted shard: check it, truncate to the committed rows, mark their ids written."""
        progress = os.path.join(self._shard_dir, _PROGRESS)
        rows = _read_json(progress)["rows"] if os.path.exists(progress) else 0
        sizes = {}
        for name, (dtype, width) in self._files_spec.items():
            file, size = self._file(name), rows * width * dtype.itemsize
            have = os.path.getsize(file) if os.path.exists(file) else 0
            if have < size:
                raise ValueError(f"logit store shard {self._shard_dir} is corrupt: {_PROGRESS} commits {rows} "
                                 f"rows but {name}.bin holds {have} bytes < {size}; delete the directory")
            sizes[file] = size
        ids = np.fromfile(self._file("ids"), dtype=np.int64, count=rows)
        self._check_committed_ids(ids)
        for file, size in sizes.items():
            if not os.path.exists(file) or os.path.getsize(file) > size:
                with open(file, "ab") as f:
                    f.truncate(size)
        self._done[ids] = True
        done_marker = os.path.join(self._shard_dir, _DONE)
        if os.path.exists(done_marker):
            os.remove(done_marker)
            _fsync_dir(self._shard_dir)
        return rows

    def _check_committed_ids(self, ids: np.ndarray) -> None:
        """Raise if the committed ids ``[rows]`` are out of range or repeat (a corrupt shard)."""
        fix = f"delete the shard directory {self._shard_dir} (a resume recomputes its rows)"
        n = self.spec.num_rows
        bad = np.flatnonzero((ids < 0) | (ids >= n))
        if bad.size:
            raise ValueError(f"logit store shard {self._shard_dir} is corrupt: ids.bin holds id {ids[bad[0]]} "
                             f"(row {bad[0]}, {bad.size} such rows) outside [0, {'rows' if self.spec.views else 'num_examples'}={n}); {fix}")
        repeated = _repeated_ids(ids)
        if repeated.size:
            raise ValueError(f"logit store shard {self._shard_dir} is corrupt: ids.bin holds "
                             f"{'(epoch, id) ' if self.spec.views else 'id '}"
                             f"{_describe_keys(self.spec, repeated[:1])[0]} "
                             f"more than once ({repeated.size} ids repeat; two writers appended to it at "
                             f"once?); {fix}")

    # -- writing -------------------------------------------------------------------------------

    @property
    def rows_written(self) -> int:
        """Rows appended to this shard so far (committed or not)."""
        return self._rows

    def is_written(self, ids: Any, epochs: Any = None) -> np.ndarray:
        """Bool ``[B]``: whether this writer already holds each id (ids must be in range; for a
        view store, ``epochs [B]`` names the epoch of each id's view)."""
        keys = _row_keys(self.spec, _as_ids(ids), epochs, "LogitStoreWriter.is_written")
        return self._done[keys]

    def _rows_to_write(self, ids: Any, mask: Any, n: int, epochs: Any) -> tuple[np.ndarray, np.ndarray]:
        """Validate ids/epochs/mask; return (row keys [B] (0 on padding rows), bool [B]: real rows
        whose key is not yet written)."""
        if self._state != "open":
            raise ValueError(f"LogitStoreWriter for {self._shard_dir} is {self._state}; open a new writer "
                             f"with resume=True to continue")
        ids = _as_ids(ids)
        if ids.shape[0] != n:
            raise ValueError(f"ids has {ids.shape[0]} rows but the values have {n}")
        mask = _as_mask(mask, n)
        if epochs is not None:
            epochs = np.asarray(epochs)
            if epochs.shape != ids.shape:
                raise ValueError(f"epochs has shape {epochs.shape} but the ids have {ids.shape}")
            epochs = epochs[mask]
        real = _row_keys(self.spec, ids[mask], epochs, "LogitStoreWriter.write")
        repeated = _repeated_ids(real)
        if repeated.size:
            what = "(epoch, id) pairs" if self.spec.views else "ids"
            raise ValueError(f"LogitStoreWriter.write: {what} {_describe_keys(self.spec, repeated[:5])} "
                             f"appear more than once among the real (mask=True) rows of one batch")
        keys = np.zeros(n, dtype=np.int64)
        keys[mask] = real
        keep = mask.copy()
        keep[mask] = ~self._done[real]
        return keys, keep

    def write(self, ids: Any, logits: Any, mask: Any = None, *, epochs: Any = None) -> int:
        """Append the teacher logits of a batch; returns the number of rows appended.

        Args:
          ids: int ``[B]`` example ids.
          logits: float ``[B, num_classes]`` teacher logits (any float dtype, NumPy or JAX).
            For a 'topk' store the top k are taken on the host (``topk_host``).
          mask: bool ``[B]`` or None; rows with False are padding and are ignored.
          epochs: int ``[B]``, the epoch of each row's view: required by a view store
            (``spec.epochs``), ignored otherwise.
        Rows whose id (view store: ``(epoch, id)``) this writer already holds are skipped.
        """
        logits = np.asarray(logits)
        C = self.spec.num_classes
        if logits.ndim != 2 or logits.shape[1] != C or not _is_float(logits.dtype):
            raise ValueError(f"logits must be a float array of shape [B, num_classes={C}], got shape "
                             f"{logits.shape} dtype {logits.dtype}")
        ids, keep = self._rows_to_write(ids, mask, logits.shape[0], epochs)
        logits = logits[keep]
        _check_finite(logits, "teacher logits")
        if self.spec.format == "full":
            return self._append(ids[keep], logits, None)
        values, indices = topk_host(logits, self.spec.k)
        return self._append(ids[keep], values, indices)

    def write_topk(self, ids: Any, values: Any, indices: Any, mask: Any = None, *,
                   epochs: Any = None) -> int:
        """Append precomputed top-k outputs (format 'topk' only); returns the rows appended.

        Args:
          ids: int ``[B]``; values: float ``[B, k]``; indices: int ``[B, k]`` distinct class indices
            in ``[0, num_classes)`` per row; mask: bool ``[B]`` or None; epochs: as in :meth:`write`.
        """
        if self.spec.format != "topk":
            raise ValueError(f"write_topk needs a 'topk' store, this one is '{self.spec.format}'; "
                             f"use write(ids, logits)")
        values, indices = np.asarray(values), np.asarray(indices)
        k, C = self.spec.k, self.spec.num_classes
        if values.ndim != 2 or values.shape[1] != k or not _is_float(values.dtype):
            raise ValueError(f"values must be a float array of shape [B, k={k}], got shape {values.shape} "
                             f"dtype {values.dtype}")
        if indices.shape != values.shape or not np.issubdtype(indices.dtype, np.integer):
            raise ValueError(f"indices must be an integer array of shape {values.shape} like values, got "
                             f"shape {indices.shape} dtype {indices.dtype}")
        ids, keep = self._rows_to_write(ids, mask, values.shape[0], epochs)
        values, indices = values[keep], indices[keep]
        _check_finite(values, "teacher top-k values")
        if indices.size and (indices.min() < 0 or indices.max() >= C):
            raise ValueError(f"top-k indices must be class indices in [0, {C}), got min {indices.min()} "
                             f"max {indices.max()}")
        srt = np.sort(indices, axis=-1)
        if (srt[:, 1:] == srt[:, :-1]).any():
            raise ValueError("top-k indices repeat a class within a row; each row needs k distinct classes")
        return self._append(ids[keep], values, indices.astype(_INDEX_DTYPE))

    def _append(self, ids: np.ndarray, values: np.ndarray, indices: np.ndarray | None) -> int:
        with np.errstate(over="ignore"):  # overflow becomes inf, which the check below reports
            stored = values.astype(self.spec.value_dtype)
        _check_finite(stored, f"teacher values cast to {self.spec.dtype} (too large for the dtype? use "
                              f"'bfloat16' or 'float32')")
        if ids.size == 0:
            return 0
        arrays = {"ids": ids.astype(np.int64), "values": stored}
        if indices is not None:
            arrays["indices"] = indices
        try:
            for name, arr in arrays.items():
                self._files[name].write(np.ascontiguousarray(arr).tobytes())
            self._done[ids] = True
            self._rows += ids.size
            self._writes_since_commit += 1
            if self._writes_since_commit >= self.commit_every:
                self.flush()
        except BaseException:
            self._fail()
            raise
        return int(ids.size)

    def flush(self) -> None:
        """Make every appended row durable: fsync the data files, then commit the row count."""
        if self._state != "open":
            raise ValueError(f"LogitStoreWriter for {self._shard_dir} is {self._state}")
        if self._rows == self._committed and os.path.exists(os.path.join(self._shard_dir, _PROGRESS)):
            return
        try:
            for f in self._files.values():
                f.flush()
                os.fsync(f.fileno())
            _write_json(os.path.join(self._shard_dir, _PROGRESS), {"rows": self._rows})
        except BaseException:
            self._fail()
            raise
        self._committed = self._rows
        self._writes_since_commit = 0

    def _end(self, state: str) -> None:
        """Close the files, unlock the shard and enter ``state`` (no further writes)."""
        for f in self._files.values():
            f.close()
        self._lock.release()
        self._state = state

    def _fail(self) -> None:
        """End after an I/O error; the shard keeps its last commit and stays not done."""
        self._end("failed (an earlier write raised)")

    def close(self) -> None:
        """Commit, mark this shard done (``DONE`` holds its row count) and unlock it. Idempotent."""
        if self._state == "closed":
            return
        self.flush()  # the rows are durable: DONE may come before the files are closed
        try:
            _write_json(os.path.join(self._shard_dir, _DONE), {"rows": self._rows})
        except BaseException:
            self._fail()
            raise
        self._end("closed")

    def suspend(self) -> None:
        """Commit and unlock without marking the shard done (a preempted writer): the store stays
        incomplete, and a writer opened with ``resume=True`` continues after these rows."""
        self.flush()
        self._end("suspended (open a writer with resume=True to continue)")

    def __enter__(self) -> "LogitStoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if not self._state.startswith("suspended"):
                self.close()
        elif self._state == "open":
            self._end("aborted (left by an exception)")
