"""Precomputed-teacher logit store: write a teacher's logits once, read them by example id.

A store is a directory::

    <store>/
      shards/shard-00000-of-00002/     one directory per writer process (process_index of process_count)
        spec.json                      the StoreSpec the writer was opened with (atomic write)
        ids.bin                        int64 [rows]           example id of every appended row
        values.bin                     dtype [rows, width]    width = num_classes ('full') or k ('topk')
        indices.bin                    int32 [rows, k]        class index of each value ('topk' only)
        progress.json                  {"rows": n}: the first n rows of every .bin file are durable
        DONE                           {"rows": n}: the writer closed cleanly after n rows
      index.npy                        int64 [num_examples, 2]: (shard, row) of every example id
      metadata.json                    spec, kdjax version, shard layout
      COMPLETE                         written last by finalize(); a store without it is never read

Rows are appended in arrival order, so a writer may receive any subset of ids (whatever the data
pipeline hands its process) and several processes write at once without sharing a file. Every
marker and JSON file is written to a temporary name, fsynced and renamed with ``os.replace``, so a
reader sees either the old or the new file, never a partial one. Data rows become durable only
when ``progress.json`` is replaced after the ``.bin`` files were fsynced: after a crash, bytes past
the committed row count are truncated away on resume (``resume=True``), and the ids already
committed are skipped. ``finalize`` (process 0, after every writer closed) checks that every id in
``[0, num_examples)`` was written exactly once, builds the id -> (shard, row) index and writes
``COMPLETE``.

Values are stored as float16, bfloat16 (``ml_dtypes.bfloat16``, NumPy has no native bf16) or
float32; top-k indices as int32. See docs/logit_store.md.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import ml_dtypes
import numpy as np

import kdjax

LAYOUT_VERSION = 1
FORMATS = ("full", "topk")
DTYPES: dict[str, np.dtype] = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
}
PRECOMPUTE_COMMAND = "python -m experiments.precompute_teacher_logits"

_SHARDS_DIR = "shards"
_SHARD_RE = re.compile(r"^shard-(\d{5})-of-(\d{5})$")
_COMPLETE = "COMPLETE"
_METADATA = "metadata.json"
_INDEX = "index.npy"
_DONE = "DONE"
_PROGRESS = "progress.json"
_SPEC = "spec.json"
_INDEX_DTYPE = np.dtype(np.int32)


# ----------------------------------------------------------------------------------------------
# Spec
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StoreSpec:
    """What a store holds; recorded in its metadata and checked when it is opened.

    Attributes:
      dataset: dataset name, e.g. ``'imagenet2012'`` or ``'mnist1d'``.
      split: split name as the data pipeline spells it, e.g. ``'train'``.
      num_examples: number of examples in the split; ids are ``0 .. num_examples - 1``.
      num_classes: number of teacher classes ``C``.
      teacher: teacher identity, e.g. ``'resnet50:torchvision-IMAGENET1K_V2'``.
      preprocessing: description of the teacher's input preprocessing, e.g.
        ``'resize256-center224-imagenet-mean-std'``.
      format: ``'full'`` (all ``C`` logits per example) or ``'topk'`` (the ``k`` largest logits and
        their class indices, largest first, ties to the lower class index).
      k: number of kept logits for ``'topk'`` (``1 <= k <= num_classes``); ``None`` for ``'full'``.
      dtype: stored value dtype: ``'float16'``, ``'bfloat16'`` or ``'float32'``.
    """

    dataset: str
    split: str
    num_examples: int
    num_classes: int
    teacher: str
    preprocessing: str
    format: str = "full"
    k: int | None = None
    dtype: str = "float16"

    def __post_init__(self):
        for name in ("dataset", "split", "teacher"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"StoreSpec.{name} must be a non-empty string, got {value!r}")
        if not isinstance(self.preprocessing, str):
            raise ValueError(
                f"StoreSpec.preprocessing must be a string describing the teacher's input "
                f"preprocessing, got {self.preprocessing!r}")
        for name in ("num_examples", "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"StoreSpec.{name} must be a positive integer, got {value!r}")
        if self.format not in FORMATS:
            raise ValueError(f"StoreSpec.format must be one of {FORMATS}, got {self.format!r}")
        if self.format == "full" and self.k is not None:
            raise ValueError(f"StoreSpec.k must be None for format 'full', got k={self.k!r}; "
                             f"use format='topk' to keep only the top k logits")
        if self.format == "topk":
            if (isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer))
                    or not 1 <= self.k <= self.num_classes):
                raise ValueError(f"StoreSpec.k must be an integer in [1, num_classes={self.num_classes}] "
                                 f"for format 'topk', got k={self.k!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"StoreSpec.dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        object.__setattr__(self, "num_examples", int(self.num_examples))
        object.__setattr__(self, "num_classes", int(self.num_classes))
        if self.k is not None:
            object.__setattr__(self, "k", int(self.k))

    @property
    def width(self) -> int:
        """Values per example: ``num_classes`` for 'full', ``k`` for 'topk'."""
        return self.num_classes if self.format == "full" else self.k

    @property
    def value_dtype(self) -> np.dtype:
        """NumPy dtype of the stored values (``ml_dtypes.bfloat16`` for 'bfloat16')."""
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StoreSpec":
        fields = {f.name for f in dataclasses.fields(cls)}
        if set(d) != fields:
            raise ValueError(f"StoreSpec fields {sorted(d)} do not match the expected {sorted(fields)}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file, fsync it, then rename it."""
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _write_json(path: str, obj: Any) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True).encode()))


def _read_json(path: str) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())


def _shard_name(process_index: int, process_count: int) -> str:
    return f"shard-{process_index:05d}-of-{process_count:05d}"


def _shard_files(spec: StoreSpec) -> dict[str, tuple[np.dtype, int]]:
    """Data files of one shard: name -> (dtype, values per row)."""
    files = {"ids": (np.dtype(np.int64), 1), "values": (spec.value_dtype, spec.width)}
    if spec.format == "topk":
        files["indices"] = (_INDEX_DTYPE, spec.k)
    return files


def _list_shards(path: str) -> dict[str, tuple[int, int]]:
    """Shard directory name -> (process_index, process_count) for every shard under ``path``."""
    root = os.path.join(path, _SHARDS_DIR)
    if not os.path.isdir(root):
        return {}
    out = {}
    for name in sorted(os.listdir(root)):
        m = _SHARD_RE.match(name)
        if m:
            out[name] = (int(m.group(1)), int(m.group(2)))
    return out


def _shard_state(shard_dir: str) -> str:
    """Human-readable state of one shard directory: done / committed rows / not started."""
    if os.path.exists(os.path.join(shard_dir, _DONE)):
        return f"done ({_read_json(os.path.join(shard_dir, _DONE))['rows']} rows)"
    if os.path.exists(os.path.join(shard_dir, _PROGRESS)):
        return f"in progress ({_read_json(os.path.join(shard_dir, _PROGRESS))['rows']} rows committed)"
    return "started, no rows committed"


def is_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a finalized store (its COMPLETE marker exists)."""
    return os.path.exists(os.path.join(os.fspath(path), _COMPLETE))


def _describe_partial(path: str) -> str:
    shards = _list_shards(path)
    if not shards:
        return "no shard has started"
    states = [f"{name}: {_shard_state(os.path.join(path, _SHARDS_DIR, name))}" for name in shards]
    return "; ".join(states)


# ----------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------


class LogitStoreWriter:
    """Appends one process's teacher outputs to its own shard of a store.

    Each writer process (``process_index`` of ``process_count``) owns the directory
    ``shards/shard-<process_index>-of-<process_count>``; writers never touch each other's files.
    A writer may receive any ids; an id it already holds is skipped (so a resumed run can feed the
    whole split again). Every ``commit_every`` calls to ``write``/``write_topk`` the appended rows are
    fsynced and committed (``progress.json``); ``close()`` commits and writes the shard's ``DONE``
    marker. Leaving the ``with`` block by an exception closes the files without committing or
    marking the shard done: the store stays incomplete until resumed.

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
        self._check_store_dir(resume)

        os.makedirs(self._shard_dir, exist_ok=True)
        self._done = np.zeros(spec.num_examples, dtype=bool)
        self._rows = 0
        if os.path.exists(os.path.join(self._shard_dir, _SPEC)):
            self._rows = self._recover()
        else:
            _write_json(os.path.join(self._shard_dir, _SPEC), self._shard_spec_json())
        self._committed = self._rows
        self._writes_since_commit = 0
        self._files = {name: open(self._file(name), "ab") for name in self._files_spec}
        self._state = "open"

    # -- setup ---------------------------------------------------------------------------------

    def _file(self, name: str) -> str:
        return os.path.join(self._shard_dir, f"{name}.bin")

    def _shard_spec_json(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict(), "process_index": self.process_index,
                "process_count": self.process_count, "layout_version": LAYOUT_VERSION}

    def _check_store_dir(self, resume: bool) -> None:
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
        if os.path.exists(os.path.join(self._shard_dir, _SPEC)) and not resume:
            raise ValueError(
                f"logit store at {self.path} already holds a partial write of "
                f"{os.path.basename(self._shard_dir)} ({_shard_state(self._shard_dir)}), probably from an "
                f"interrupted run; pass resume=True to continue it, or delete the directory to start over")

    def _recover(self) -> int:
        """Reopen an interrupted shard: truncate to the committed rows, mark their ids written."""
        progress = os.path.join(self._shard_dir, _PROGRESS)
        rows = _read_json(progress)["rows"] if os.path.exists(progress) else 0
        for name, (dtype, width) in self._files_spec.items():
            file, size = self._file(name), rows * width * dtype.itemsize
            have = os.path.getsize(file) if os.path.exists(file) else 0
            if have < size:
                raise ValueError(f"logit store shard {self._shard_dir} is corrupt: {_PROGRESS} commits {rows} "
                                 f"rows but {name}.bin holds {have} bytes < {size}; delete the directory")
            if have > size or not os.path.exists(file):
                with open(file, "ab") as f:
                    f.truncate(size)
        ids = np.fromfile(self._file("ids"), dtype=np.int64, count=rows)
        self._done[ids] = True
        done_marker = os.path.join(self._shard_dir, _DONE)
        if os.path.exists(done_marker):
            os.remove(done_marker)
            _fsync_dir(self._shard_dir)
        return rows

    # -- writing -------------------------------------------------------------------------------

    @property
    def rows_written(self) -> int:
        """Rows appended to this shard so far (committed or not)."""
        return self._rows

    def is_written(self, ids: Any) -> np.ndarray:
        """Bool ``[B]``: whether this writer already holds each id (ids must be in range)."""
        ids = _as_ids(ids)
        _check_id_range(ids, self.spec.num_examples, "LogitStoreWriter.is_written")
        return self._done[ids]

    def _rows_to_write(self, ids: Any, mask: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Validate ids/mask; return (ids [B], bool [B]: real rows whose id is not yet written)."""
        if self._state != "open":
            raise ValueError(f"LogitStoreWriter for {self._shard_dir} is {self._state}; open a new writer "
                             f"with resume=True to continue")
        ids = _as_ids(ids)
        if ids.shape[0] != n:
            raise ValueError(f"ids has {ids.shape[0]} rows but the values have {n}")
        mask = _as_mask(mask, n)
        real = ids[mask]
        _check_id_range(real, self.spec.num_examples, "LogitStoreWriter.write")
        uniq, counts = np.unique(real, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"LogitStoreWriter.write: ids {uniq[counts > 1][:5].tolist()} appear more than "
                             f"once among the real (mask=True) rows of one batch")
        keep = mask.copy()
        keep[mask] = ~self._done[real]
        return ids, keep

    def write(self, ids: Any, logits: Any, mask: Any = None) -> int:
        """Append the teacher logits of a batch; returns the number of rows appended.

        Args:
          ids: int ``[B]`` example ids.
          logits: float ``[B, num_classes]`` teacher logits (any float dtype, NumPy or JAX).
            For a 'topk' store the top k are taken on the host (``topk_host``).
          mask: bool ``[B]`` or None; rows with False are padding and are ignored.
        Rows whose id this writer already holds are skipped.
        """
        logits = np.asarray(logits)
        C = self.spec.num_classes
        if logits.ndim != 2 or logits.shape[1] != C or not _is_float(logits.dtype):
            raise ValueError(f"logits must be a float array of shape [B, num_classes={C}], got shape "
                             f"{logits.shape} dtype {logits.dtype}")
        ids, keep = self._rows_to_write(ids, mask, logits.shape[0])
        logits = logits[keep]
        _check_finite(logits, "teacher logits")
        if self.spec.format == "full":
            return self._append(ids[keep], logits, None)
        values, indices = topk_host(logits, self.spec.k)
        return self._append(ids[keep], values, indices)

    def write_topk(self, ids: Any, values: Any, indices: Any, mask: Any = None) -> int:
        """Append precomputed top-k outputs (format 'topk' only); returns the rows appended.

        Args:
          ids: int ``[B]``; values: float ``[B, k]``; indices: int ``[B, k]`` distinct class indices
            in ``[0, num_classes)`` per row; mask: bool ``[B]`` or None.
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
        ids, keep = self._rows_to_write(ids, mask, values.shape[0])
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

    def _fail(self) -> None:
        """Close the files after an I/O error; the shard keeps its last commit and stays not done."""
        for f in self._files.values():
            f.close()
        self._state = "failed (an earlier write raised)"

    def close(self) -> None:
        """Commit and mark this shard done (``DONE`` holds its row count). Idempotent."""
        if self._state == "closed":
            return
        self.flush()
        for f in self._files.values():
            f.close()
        _write_json(os.path.join(self._shard_dir, _DONE), {"rows": self._rows})
        self._state = "closed"

    def __enter__(self) -> "LogitStoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._state == "open":
            for f in self._files.values():
                f.close()
            self._state = "aborted (left by an exception)"


# ----------------------------------------------------------------------------------------------
# Finalize
# ----------------------------------------------------------------------------------------------


def _missing_message(what: str, ids: np.ndarray, total: int) -> str:
    return f"{ids.size} of {total} example ids {what}, e.g. {ids[:10].tolist()}"


def finalize(path: str | os.PathLike, process_count: int) -> None:
    """Check every shard and write the index, metadata and COMPLETE marker (process 0 only).

    Call it once every writer has closed (after a barrier the caller provides, e.g.
    ``jax.experimental.multihost_utils.sync_global_devices``). Raises ValueError, writing nothing,
    if a shard is missing or not done, if shards disagree on the spec, or if the shards do not hold
    every id in ``[0, num_examples)`` exactly once. Running it again rewrites the same files.
    """
    path = os.fspath(path)
    if not isinstance(process_count, int) or process_count < 1:
        raise ValueError(f"process_count must be a positive integer, got {process_count!r}")
    shards = _list_shards(path)
    wrong = [name for name, (_, count) in shards.items() if count != process_count]
    if wrong:
        raise ValueError(f"logit store at {path} has shards {wrong} from another process_count than "
                         f"{process_count}; delete the directory and precompute again")
    names = [_shard_name(i, process_count) for i in range(process_count)]
    not_done = [n for n in names if not os.path.exists(os.path.join(path, _SHARDS_DIR, n, _DONE))]
    if not_done:
        states = [f"{n}: {_shard_state(os.path.join(path, _SHARDS_DIR, n)) if n in shards else 'missing'}"
                  for n in not_done]
        raise ValueError(f"cannot finalize logit store at {path}: {len(not_done)} of {process_count} shards "
                         f"are not done ({'; '.join(states)}); every writer must close() before finalize, "
                         f"and an interrupted one must be resumed (resume=True)")
    specs = [_read_json(os.path.join(path, _SHARDS_DIR, n, _SPEC))["spec"] for n in names]
    if any(s != specs[0] for s in specs):
        raise ValueError(f"shards of logit store at {path} disagree on the spec: {specs}")
    spec = StoreSpec.from_dict(specs[0])

    index = np.full((spec.num_examples, 2), -1, dtype=np.int64)
    shard_ids, layout = [], []
    for s, name in enumerate(names):
        rows = _read_json(os.path.join(path, _SHARDS_DIR, name, _DONE))["rows"]
        ids = np.fromfile(os.path.join(path, _SHARDS_DIR, name, "ids.bin"), dtype=np.int64, count=rows)
        if ids.size != rows:
            raise ValueError(f"shard {name} of logit store at {path} is corrupt: DONE says {rows} rows but "
                             f"ids.bin holds {ids.size}; delete the directory and precompute again")
        _check_id_range(ids, spec.num_examples, f"finalize: shard {name}")
        index[ids, 0] = s
        index[ids, 1] = np.arange(rows)
        shard_ids.append(ids)
        layout.append({"name": name, "rows": int(rows)})
    counts = np.bincount(np.concatenate(shard_ids), minlength=spec.num_examples)
    missing = np.flatnonzero(counts == 0)
    if missing.size:
        raise ValueError(f"cannot finalize logit store at {path}: "
                         f"{_missing_message('were never written', missing, spec.num_examples)}; "
                         f"the data pipeline must visit every example of split '{spec.split}' once "
                         f"(no drop_remainder), then resume the writers (resume=True) to fill them in")
    dup = np.flatnonzero(counts > 1)
    if dup.size:
        raise ValueError(f"cannot finalize logit store at {path}: "
                         f"{_missing_message('were written by more than one shard', dup, spec.num_examples)}; "
                         f"each process must receive a disjoint part of the split")

    _atomic_write(os.path.join(path, _INDEX), lambda f: np.save(f, index))
    _write_json(os.path.join(path, _METADATA), {
        "layout_version": LAYOUT_VERSION,
        "kdjax_version": kdjax.__version__,
        "spec": spec.to_dict(),
        "process_count": process_count,
        "shards": layout,
    })
    _write_json(os.path.join(path, _COMPLETE), {"num_examples": spec.num_examples})


# ----------------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------------


def _check_expectations(path: str, spec: StoreSpec, expect: Mapping[str, Any]) -> None:
    """Raise a ValueError naming the first field of ``spec`` that differs from the run's ``expect``."""
    hint = (f"precompute the teacher logits for the run's dataset/split with `{PRECOMPUTE_COMMAND}` "
            f"or point the run at the matching store")
    reads = {"dataset": "the run reads dataset", "split": "the run reads split",
             "num_examples": "the run's split has num_examples =",
             "num_classes": "the student predicts num_classes =",
             "teacher": "the run expects teacher", "format": "the run's loss expects format",
             "preprocessing": "the run expects preprocessing"}
    for name, value in expect.items():
        if value is None:
            continue
        have = getattr(spec, name)
        if have != value:
            raise ValueError(f"logit store at {path} was written for {name} {have!r} but {reads[name]} "
                             f"{value!r} (store: dataset {spec.dataset!r}, split {spec.split!r}, "
                             f"{spec.num_examples} examples, {spec.num_classes} classes, teacher "
                             f"{spec.teacher!r}); {hint}")


def _read_spec_any(path: str) -> StoreSpec | None:
    """The spec from metadata.json, else from any shard's spec.json, else None."""
    if os.path.exists(os.path.join(path, _METADATA)):
        return StoreSpec.from_dict(_read_json(os.path.join(path, _METADATA))["spec"])
    for name in _list_shards(path):
        spec_file = os.path.join(path, _SHARDS_DIR, name, _SPEC)
        if os.path.exists(spec_file):
            return StoreSpec.from_dict(_read_json(spec_file)["spec"])
    return None


class LogitStore:
    """Read-only random access to a complete store by example id, from any process.

    Open with ``LogitStore.open``. Arrays are memory-mapped lazily per process; the object pickles
    by path (so it can be shipped to data-loader workers). ``lookup`` returns, for ``ids [B]``:
    'full' -> ``{'teacher_logits': [B, C]}``; 'topk' -> ``{'teacher_topk_values': [B, k],
    'teacher_topk_indices': [B, k] int32}``; values in the stored dtype.
    """

    def __init__(self, path: str, spec: StoreSpec, layout: list[dict[str, Any]]):
        self.path = path
        self.spec = spec
        self._layout = layout
        self._arrays: list[dict[str, np.ndarray] | None] | None = None
        self._index: np.ndarray | None = None

    @classmethod
    def open(cls, path: str | os.PathLike, *, dataset: str | None = None, split: str | None = None,
             num_examples: int | None = None, num_classes: int | None = None,
             teacher: str | None = None, format: str | None = None,
             preprocessing: str | None = None) -> "LogitStore":
        """Open the store at ``path``, checking it against what the run expects.

        Every keyword that is not None must equal the store's spec field, else ValueError naming
        the field, both values and the precompute command. A store without its COMPLETE marker
        (half-written or never finalized) is refused with its shards' states.
        """
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise ValueError(f"no logit store at {path}; precompute one with `{PRECOMPUTE_COMMAND}`")
        spec = _read_spec_any(path)
        if spec is None:
            raise ValueError(f"{path} is not a logit store (no metadata.json and no shards); precompute "
                             f"one with `{PRECOMPUTE_COMMAND}`")
        _check_expectations(path, spec, {
            "dataset": dataset, "split": split, "num_examples": num_examples,
            "num_classes": num_classes, "teacher": teacher, "format": format,
            "preprocessing": preprocessing})
        if not is_complete(path):
            raise ValueError(
                f"logit store at {path} is incomplete (half-written or not finalized): "
                f"{_describe_partial(path)}; resume the precompute (LogitStoreWriter(..., resume=True), "
                f"the resume option of `{PRECOMPUTE_COMMAND}`) and finalize it, or delete the directory")
        meta = _read_json(os.path.join(path, _METADATA))
        store = cls(path, spec, meta["shards"])
        store._check_files()
        return store

    def _check_files(self) -> None:
        """Check that every shard file has the size its metadata promises."""
        for entry in self._layout:
            for name, (dtype, width) in _shard_files(self.spec).items():
                file = os.path.join(self.path, _SHARDS_DIR, entry["name"], f"{name}.bin")
                need = entry["rows"] * width * dtype.itemsize
                have = os.path.getsize(file) if os.path.exists(file) else -1
                if have != need:
                    raise ValueError(f"logit store at {self.path} is corrupt: {entry['name']}/{name}.bin has "
                                     f"{have} bytes, metadata expects {need}; precompute it again")

    def _load(self) -> None:
        self._index = np.load(os.path.join(self.path, _INDEX), mmap_mode="r")
        arrays = []
        for entry in self._layout:
            if entry["rows"] == 0:
                arrays.append(None)
                continue
            arrays.append({
                name: np.memmap(os.path.join(self.path, _SHARDS_DIR, entry["name"], f"{name}.bin"),
                                dtype=dtype, mode="r", shape=(entry["rows"], width))
                for name, (dtype, width) in _shard_files(self.spec).items() if name != "ids"})
        self._arrays = arrays

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "spec": self.spec, "layout": self._layout}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["spec"], state["layout"])

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """Batch keys that ``lookup``/``add_to_batch`` produce."""
        if self.spec.format == "full":
            return ("teacher_logits",)
        return ("teacher_topk_values", "teacher_topk_indices")

    def lookup(self, ids: Any) -> dict[str, np.ndarray]:
        """Teacher outputs for example ``ids [B]`` (any order, repeats allowed); see the class doc."""
        ids = _as_ids(ids)
        _check_id_range(ids, self.spec.num_examples, f"LogitStore.lookup ({self.path})")
        if self._arrays is None:
            self._load()
        loc = np.asarray(self._index[ids])
        files = {"values": self.batch_keys[0]}
        if self.spec.format == "topk":
            files["indices"] = "teacher_topk_indices"
        out = {key: np.empty((ids.size, self.spec.width), dtype=_shard_files(self.spec)[name][0])
               for name, key in files.items()}
        for s in np.unique(loc[:, 0]):
            sel = loc[:, 0] == s
            rows = loc[sel, 1]
            for name, key in files.items():
                out[key][sel] = self._arrays[s][name][rows]
        return out

    def add_to_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Return ``batch`` plus the teacher keys for its ``'id'`` rows.

        Rows with ``batch['mask']`` False (padding) get zeros and their ids are not looked up (they
        may hold any value). Without a ``'mask'`` key every row is real. The input is not modified.
        """
        if "id" not in batch:
            raise ValueError(f"batch needs an 'id' key (int64 [B] example ids) to look up teacher outputs, "
                             f"got keys {sorted(batch)}")
        ids = _as_ids(batch["id"], "batch['id']")
        mask = _as_mask(batch.get("mask"), ids.size)
        found = self.lookup(ids[mask])
        out = dict(batch)
        for key, val in found.items():
            full = np.zeros((ids.size, self.spec.width), dtype=val.dtype)
            full[mask] = val
            out[key] = full
        return out


# ----------------------------------------------------------------------------------------------
# Precompute
# ----------------------------------------------------------------------------------------------


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


def precompute(teacher_fn: Callable[[Any, dict[str, Any]], Any], teacher_variables: Any,
               batches: Iterable[Mapping[str, np.ndarray]], writer: LogitStoreWriter, *,
               sharding: jax.sharding.NamedSharding | None = None, show_progress: bool = True,
               total: int | None = None) -> dict[str, int]:
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

    Returns ``{'batches', 'batches_skipped', 'rows_written'}`` counts for this process. The caller
    closes the writer, synchronises the processes and calls ``finalize`` on process 0.
    """
    spec = writer.spec
    if sharding is not None and not isinstance(sharding, jax.sharding.NamedSharding):
        raise TypeError(f"sharding must be a jax.sharding.NamedSharding over the batch axis, got "
                        f"{type(sharding).__name__}")
    if spec.num_examples > np.iinfo(np.int32).max:
        raise ValueError(f"precompute carries ids through the device as int32; num_examples="
                         f"{spec.num_examples} does not fit")
    row_sharding = None
    if sharding is not None:
        lead = sharding.spec[0] if len(sharding.spec) else None
        row_sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(lead))

    def forward(variables, batch):
        out = teacher_fn(variables, batch)
        if hasattr(out, "logits"):
            logits = out.logits
        else:
            logits = out[0] if isinstance(out, tuple) else out
        if logits.ndim != 2 or logits.shape[1] != spec.num_classes:
            raise ValueError(f"teacher_fn returned logits of shape {logits.shape}; the store expects "
                             f"[B, num_classes={spec.num_classes}]")
        if spec.format == "topk":
            return jax.lax.top_k(logits.astype(np.float32), spec.k)
        return (logits,)

    fwd = jax.jit(forward, out_shardings=row_sharding)

    def to_device(x: np.ndarray) -> Any:
        return x if sharding is None else jax.make_array_from_process_local_data(row_sharding, x)

    def to_host(x: Any) -> np.ndarray:
        return np.asarray(x) if sharding is None else _local_rows(x)

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
            stats["batches"] += 1
            bar.update(1)
            if _all_processes_agree(bool(writer.is_written(ids[mask]).all()), sharding is not None):
                stats["batches_skipped"] += 1
                continue
            device_batch = {key: to_device(np.asarray(val)) for key, val in batch.items() if key != "id"}
            outputs = fwd(teacher_variables, device_batch)
            local_ids = to_host(to_device(np.where(mask, ids, 0).astype(np.int32)))
            local_mask = to_host(to_device(mask))
            host = [to_host(o) for o in outputs]
            if spec.format == "topk":
                n = writer.write_topk(local_ids, host[0], host[1], local_mask)
            else:
                n = writer.write(local_ids, host[0], local_mask)
            stats["rows_written"] += n
            bar.set_postfix(rows=stats["rows_written"], refresh=False)
    finally:
        bar.close()
    return stats
