"""Checkpoints that survive preemption, crashes, full disks and corrupted files.

A thin, explicit layer over ``orbax.checkpoint.CheckpointManager``.  One checkpoint step is one
directory ``<directory>/<step>/`` holding three orbax items:

* ``state``: the training-state pytree (``StandardSave``; sharded arrays are written by every
  process, each its own shards, as orbax requires on multi-host).
* ``integrity``: a JSON manifest written by process 0 with, per array leaf, its key path, shape,
  dtype and a 32-bit checksum of its bytes (formula in :func:`state_fingerprint`).
* ``data`` (optional): the data-iterator state of every process, one JSON file per process
  (``process_<i>-of-<n>.json``) carrying its own SHA-256.

Guarantees:

* Atomic from a reader's point of view: orbax writes into ``<step>.orbax-checkpoint-tmp`` and
  renames it to ``<step>`` only after every item of every process is written (on object stores
  it writes ``commit_success.txt`` last instead).  Readers list only committed step directories.
* Never writes NaN/Inf: :meth:`Checkpointer.save` checks on device, in one fused reduction, that
  every floating-point leaf is finite and raises :class:`NonFiniteStateError` naming the step and
  the leaf path before anything is written.
* Never loads garbage: :meth:`Checkpointer.restore` recomputes the checksum of every restored leaf
  and compares it with the manifest (orbax alone restores flipped bytes silently), checks the
  iterator SHA-256, and treats any read error as corruption.  A corrupt latest step is reported
  with a warning and the newest good step is loaded; the corrupt step is renamed (never deleted)
  to ``<step>.corrupt`` so that training can write that step again.  Older good steps are never
  touched: orbax deletes old steps (``max_to_keep``) only after a newer step has committed.
* A full disk raises :class:`CheckpointDiskFullError` naming the directory, the step that failed
  and the last good step, which is left intact.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

logger = logging.getLogger(__name__)

_STATE = "state"
_INTEGRITY = "integrity"
_DATA = "data"
_METRICS = ocp.checkpoint_manager.METRIC_ITEM_NAME  # orbax writes <step>/metrics/metrics
_MANIFEST_FORMAT = "kdjax-checkpoint-integrity/1"
_ITERATOR_FORMAT = "kdjax-iterator-state/1"
_TMP_MARKER = ".orbax-checkpoint-tmp"
_CORRUPT_SUFFIX = ".corrupt"


class NonFiniteStateError(ValueError):
    """The state passed to :meth:`Checkpointer.save` has a NaN or Inf; nothing was written."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed; the previously committed steps are intact."""


class CheckpointDiskFullError(CheckpointSaveError, OSError):
    """Writing a checkpoint failed because the filesystem is full (``errno`` is ``ENOSPC``)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


class CorruptCheckpointError(RuntimeError):
    """A checkpoint step is partial, unreadable or fails its integrity check."""


class NoValidCheckpointError(CorruptCheckpointError):
    """Checkpoints exist in the directory but none of them passes the integrity check."""


# ----------------------------------------------------------------------------------------------
# Fingerprint: finiteness flags and checksums of every leaf, one jitted reduction.
# ----------------------------------------------------------------------------------------------

_GOLDEN = 0x9E3779B9
_MIX1 = 0x85EBCA6B
_MIX2 = 0xC2B2AE35


def _leaf_words(x: jax.Array) -> jax.Array:
    """The bytes of ``x`` as uint32 words, same leading shape as ``x``.

    4-byte dtypes are bit-cast; 1- and 2-byte dtypes (bool, int8, bf16, f16, ...) are bit-cast and
    zero-extended; 8-byte dtypes become ``x.shape + (2,)``; complex leaves are split into
    ``(real, imag)`` on a trailing axis first; typed PRNG keys use their raw key data.
    """
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _checksum(words: jax.Array) -> jax.Array:
    """Order-sensitive 32-bit checksum of a uint32 array of any shape (all arithmetic mod 2**32).

    With ``i`` the row-major flat index of a word ``w``:
    ``h = w ^ (i * 0x9E3779B9); h *= 0x85EBCA6B; h ^= h >> 13; h *= 0xC2B2AE35; h ^= h >> 16``
    and the checksum is ``sum(h)``.  For a fixed ``i`` the map ``w -> h`` is a bijection, so any
    change confined to one word always changes the checksum; wider damage collides with
    probability about ``2**-32``.  The index is built from per-axis iotas (no reshape), so sharded
    leaves are hashed in place and only the scalar sum crosses devices.
    """
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        iota = jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
        index = index + iota * jnp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    h = words ^ (index * jnp.uint32(_GOLDEN))
    h = h * jnp.uint32(_MIX1)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(_MIX2)
    h = h ^ (h >> 16)
    return jnp.sum(h, dtype=jnp.uint32)


@jax.jit
def _fingerprint(leaves: list) -> tuple[list[jax.Array], list[jax.Array]]:
    # Per-leaf scalars, not stacked: leaves may live on different meshes over the same devices.
    finite = [
        jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
        for x in leaves
    ]
    sums = [_checksum(_leaf_words(x)) for x in leaves]
    return finite, sums


def state_fingerprint(state: Any) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Key paths, finiteness flags and checksums of every array leaf of ``state``.

    Returns ``(paths, finite, checksums)``: ``paths[k]`` is ``jax.tree_util.keystr`` of leaf ``k``;
    ``finite`` is bool ``[n_leaves]`` (True for non-float leaves); ``checksums`` is uint32
    ``[n_leaves]`` (see :func:`_checksum`).  Computed on device by one jitted call per device set
    (usually one), then one device-to-host transfer of ``2 * n_leaves`` scalars.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    if not flat:
        raise ValueError("state has no array leaves; pass the pytree of jax.Arrays to checkpoint.")
    paths = [jax.tree_util.keystr(path) for path, _ in flat]
    for path, (_, leaf) in zip(paths, flat):
        if not isinstance(leaf, jax.Array):
            raise TypeError(
                f"state leaf {path} is a {type(leaf).__name__}; every leaf must be a jax.Array "
                f"(wrap Python/NumPy values with jnp.asarray before checkpointing)."
            )
    # One jitted call per distinct device set (a jit needs all its inputs on the same devices;
    # a state usually has one group, or two when scalars live on one device).
    groups: dict[tuple, list[int]] = {}
    for k, (_, leaf) in enumerate(flat):
        devices = tuple(sorted(d.id for d in leaf.sharding.device_set))
        groups.setdefault(devices, []).append(k)
    results = jax.device_get(
        [_fingerprint([flat[k][1] for k in members]) for members in groups.values()]
    )
    finite = np.zeros(len(flat), dtype=bool)
    sums = np.zeros(len(flat), dtype=np.uint32)
    for members, (group_finite, group_sums) in zip(groups.values(), results):
        finite[members] = group_finite
        sums[members] = group_sums
    return paths, finite, sums


# ----------------------------------------------------------------------------------------------
# Data-iterator state: one JSON file per process, each with its own SHA-256.
# ----------------------------------------------------------------------------------------------


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _iterator_payload(iterator: Any) -> str:
    """JSON text of ``iterator.get_state()`` (dict for grain ``DatasetIterator``, bytes for
    ``DataLoaderIterator``) with its SHA-256, captured now, in the caller's thread."""
    if not (hasattr(iterator, "get_state") and hasattr(iterator, "set_state")):
        raise TypeError(
            f"data_iterator must have get_state()/set_state() (a grain DatasetIterator from "
            f"iter(MapDataset...to_iter_dataset()) or a DataLoader iterator); got "
            f"{type(iterator).__name__}."
        )
    state = iterator.get_state()
    kind = "bytes" if isinstance(state, bytes) else "json"
    value = state.decode("utf-8") if kind == "bytes" else state
    try:
        canonical = json.dumps(value, sort_keys=True)
    except TypeError as e:
        raise TypeError(
            f"data_iterator.get_state() returned a {type(state).__name__} that is not JSON "
            f"serialisable ({e}); kdjax stores iterator states as JSON."
        ) from None
    return json.dumps(
        {"format": _ITERATOR_FORMAT, "kind": kind, "state": value, "sha256": _sha256(canonical)}
    )


def _parse_iterator_payload(text: str, filename: str) -> Any:
    """Inverse of :func:`_iterator_payload`; raises ``CorruptCheckpointError`` on any mismatch."""
    try:
        payload = json.loads(text)
        fmt, kind, value, digest = (payload[k] for k in ("format", "kind", "state", "sha256"))
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(
            f"data-iterator file {filename} is not valid ({e!r})."
        ) from None
    if fmt != _ITERATOR_FORMAT or kind not in ("json", "bytes"):
        raise CorruptCheckpointError(
            f"data-iterator file {filename} has format {fmt!r} and kind {kind!r}; expected "
            f"{_ITERATOR_FORMAT!r} with kind 'json' or 'bytes'."
        )
    if _sha256(json.dumps(value, sort_keys=True)) != digest:
        raise CorruptCheckpointError(
            f"data-iterator file {filename} fails its SHA-256 check (garbled bytes)."
        )
    return value.encode("utf-8") if kind == "bytes" else value


class _IteratorStateHandler(ocp.CheckpointHandler):
    """Orbax handler writing each process's iterator payload to ``process_<i>-of-<n>.json``."""

    def save(self, directory: epath.Path, args: "_IteratorStateSave") -> None:
        (directory / _iterator_filename()).write_text(args.payload)

    def restore(self, directory: epath.Path, args: "_IteratorStateRestore") -> Any:
        del args
        path = directory / _iterator_filename()
        if not path.exists():
            raise CorruptCheckpointError(
                f"data-iterator file {path} is missing (was the checkpoint written with a "
                f"different number of processes than the current {jax.process_count()}?)."
            )
        return _parse_iterator_payload(path.read_text(), str(path))

    def metadata(self, directory: epath.Path) -> None:
        del directory

    def finalize(self, directory: epath.Path) -> None:
        del directory

    def close(self) -> None:
        pass


def _iterator_filename() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


@ocp.args.register_with_handler(_IteratorStateHandler, for_save=True)
@dataclasses.dataclass
class _IteratorStateSave(ocp.args.CheckpointArgs):
    payload: str


@ocp.args.register_with_handler(_IteratorStateHandler, for_restore=True)
@dataclasses.dataclass
class _IteratorStateRestore(ocp.args.CheckpointArgs):
    pass


# ----------------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------------


def abstract_state(state: Any) -> Any:
    """Restore target for ``state``: every array leaf becomes ``jax.ShapeDtypeStruct(shape, dtype,
    sharding=leaf.sharding)``; ``ShapeDtypeStruct`` leaves pass through unchanged.

    To restore onto another mesh or layout, build the structs yourself with the wanted
    ``NamedSharding`` (e.g. from ``jax.eval_shape(init_fn)`` plus your sharding rules).
    """

    def to_struct(path, x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        raise TypeError(
            f"abstract_state leaf {jax.tree_util.keystr(path)} is a {type(x).__name__}; expected "
            f"a jax.Array or a jax.ShapeDtypeStruct with a sharding."
        )

    return jax.tree_util.tree_map_with_path(to_struct, state)


def _validate_target(abstract: Any) -> list[tuple[str, jax.ShapeDtypeStruct]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract_state(abstract))
    if not flat:
        raise ValueError("abstract_state has no leaves; pass the structure of the saved state.")
    out = []
    for path, leaf in flat:
        name = jax.tree_util.keystr(path)
        if leaf.sharding is None:
            raise ValueError(
                f"abstract_state leaf {name} (shape {leaf.shape}, {leaf.dtype}) has no sharding; "
                f"restore needs jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, "
                f"spec)) for every leaf so arrays land where the mesh wants them "
                f"(kdjax.checkpointing.abstract_state(state) builds it from a live state)."
            )
        out.append((name, leaf))
    return out


def _parse_manifest(manifest: Any, step: int) -> tuple[list[dict], bool]:
    """Validates the integrity manifest of ``step``; returns ``(leaves, has_data_iterator)``.

    Raises ValueError naming the first malformed field (a garbled manifest is corruption)."""
    if not isinstance(manifest, dict) or manifest.get("format") != _MANIFEST_FORMAT:
        raise ValueError(f"not a {_MANIFEST_FORMAT} manifest")
    if manifest.get("step") != step:
        raise ValueError(f"manifest is for step {manifest.get('step')!r}, not {step}")
    if not isinstance(manifest.get("has_data_iterator"), bool):
        raise ValueError("manifest field has_data_iterator is not a bool")
    leaves = manifest.get("leaves")
    if not isinstance(leaves, list) or not leaves:
        raise ValueError("manifest field leaves is not a non-empty list")
    for k, entry in enumerate(leaves):
        valid = (
            isinstance(entry, dict)
            and isinstance(entry.get("path"), str)
            and isinstance(entry.get("dtype"), str)
            and isinstance(entry.get("checksum"), int)
            and isinstance(entry.get("shape"), list)
            and all(isinstance(n, int) for n in entry["shape"])
        )
        if not valid:
            raise ValueError(f"manifest leaf entry {k} is malformed: {entry!r:.200}")
    return leaves, manifest["has_data_iterator"]


def _layout_problem(state: Any, leaves: list[dict]) -> Optional[str]:
    """Why the restored ``state`` does not have the paths/shapes/dtypes of the manifest, or None.

    Orbax falls back to the stored array type when its own metadata is damaged (e.g. a typed PRNG
    key comes back as raw ``uint32[2]`` with the same bytes), which the checksum alone misses.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    got = [(jax.tree_util.keystr(p), list(x.shape), str(x.dtype)) for p, x in flat]
    want = [(e["path"], e["shape"], e["dtype"]) for e in leaves]
    if got == want:
        return None
    got_paths, want_paths = [g[0] for g in got], [w[0] for w in want]
    if got_paths != want_paths:
        return f"it restored leaves {got_paths[:5]}, the manifest lists {want_paths[:5]}"
    (path, shape, dtype), (_, w_shape, w_dtype) = next((g, w) for g, w in zip(got, want) if g != w)
    return (
        f"leaf {path} came back as {tuple(shape)} {dtype} but was saved as {tuple(w_shape)} "
        f"{w_dtype} (damaged array metadata)"
    )


def _is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` or its cause chain is ENOSPC (Python ``OSError`` or TensorStore's
    ``... No space left on device [os_error_code='28']`` message)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _last_good(latest: Optional[int]) -> str:
    if latest is None:
        return "there is no earlier complete checkpoint"
    return f"the last complete checkpoint (step {latest}) is intact"


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    text = text if len(text) <= limit else text[:limit] + " ..."
    return f"{type(exc).__name__}: {text}"


def _all_processes_agree(ok: bool) -> bool:
    """True iff ``ok`` is True on every process (a tiny all-gather on multi-host)."""
    if jax.process_count() == 1:
        return ok
    flags = multihost_utils.process_allgather(np.asarray([ok], dtype=np.int32))
    return bool(np.all(flags))


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        logger.warning(message)


def _info(message: str) -> None:
    if jax.process_index() == 0:
        logger.info(message)


# ----------------------------------------------------------------------------------------------
# Checkpointer.
# ----------------------------------------------------------------------------------------------


class Checkpointer:
    """Saves and restores a training state (plus data-iterator state) under ``directory``.

    Args:
      directory: checkpoint root (local path or ``gs://...``); created if missing.
      max_to_keep: the newest ``max_to_keep`` steps are always kept (resume needs them).
      save_interval_steps: :meth:`save` writes when ``step % save_interval_steps == 0``, at a JAX
        preemption sync point, or when ``force=True``.
      async_save: write in a background thread after the arrays are copied to host; the state may
        be donated or mutated as soon as :meth:`save` returns.  Errors of a background write are
        raised by the next :meth:`save`, :meth:`wait` or :meth:`close`.
      best_metric: name of a key of ``metrics``; if set, the ``keep_best`` steps with the best value
        are kept in addition to the newest ``max_to_keep`` (steps saved without metrics, or whose
        metrics lack the key, rank worst).
      best_mode: ``'max'`` or ``'min'``: which direction of ``best_metric`` is better.
      keep_best: how many best-by-metric steps to keep (used only with ``best_metric``).

    Every process of a multi-host job must construct the Checkpointer and call ``save``/``restore``
    with the same arguments; orbax coordinates the writes, and logs come from process 0 only.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
        best_metric: Optional[str] = None,
        best_mode: str = "max",
        keep_best: int = 1,
    ):
        for name, value in (
            ("max_to_keep", max_to_keep),
            ("save_interval_steps", save_interval_steps),
            ("keep_best", keep_best),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value!r}.")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min'; got {best_mode!r}.")
        if best_metric is not None and not isinstance(best_metric, str):
            raise TypeError(
                f"best_metric must be a metric name (str) or None; got {best_metric!r}."
            )
        text = os.fspath(directory)
        self._directory = epath.Path(text if "://" in text else os.path.abspath(text))
        self._best_metric = best_metric
        self._pending_step: Optional[int] = None
        self._warn_partial_saves()
        self._set_aside_unreadable_metrics()

        policies = [ocp.checkpoint_managers.LatestN(n=max_to_keep)]
        best_fn = None
        if best_metric is not None:
            worst = float("-inf") if best_mode == "max" else float("inf")
            best_fn = lambda metrics: float(metrics.get(best_metric, worst))  # noqa: E731
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=best_fn,
                    reverse=(best_mode == "min"),
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=None,
            best_fn=best_fn,
            best_mode=best_mode,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(
                [
                    ocp.checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
                    ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
                ]
            ),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._mngr = ocp.CheckpointManager(self._directory, options=self._options)

    # -- queries ---------------------------------------------------------------------------------

    @property
    def directory(self) -> epath.Path:
        return self._directory

    def all_steps(self) -> list[int]:
        """Committed steps, ascending (committed is not yet verified: see :meth:`restore`)."""
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> Optional[int]:
        """Newest committed step, or None."""
        return self._mngr.latest_step()

    def best_step(self) -> Optional[int]:
        """Step with the best ``best_metric`` among kept steps saved with metrics, or None."""
        if self._best_metric is None:
            raise ValueError("best_step() needs Checkpointer(..., best_metric='<metric name>').")
        return self._mngr.best_step()

    # -- save ------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_iterator: Any = None,
        metrics: Optional[dict[str, float]] = None,
        force: bool = False,
    ) -> bool:
        """Writes ``state`` (and the state of ``data_iterator``) as checkpoint ``step`` if due.

        Call it every step; it returns False without touching the device unless
        ``step % save_interval_steps == 0``, a JAX preemption sync point is reached, or ``force``.
        A step that already exists is not rewritten (returns False).

        Raises:
          NonFiniteStateError: a float leaf of ``state`` has NaN/Inf; nothing is written.
          CheckpointDiskFullError: the filesystem is full; earlier steps are intact.
          CheckpointSaveError: any other write failure; earlier steps are intact.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be an int >= 0; got {step!r}.")
        step = int(step)
        metrics = self._validate_metrics(metrics)
        if self._pending_step is not None and not self._mngr.is_saving_in_progress():
            self.wait()
        if not force and not self._mngr.should_save(step):
            return False
        if step in self._mngr.all_steps():
            _info(f"Checkpoint step {step} already exists in {self._directory}; not rewritten.")
            return False

        paths, finite, checksums = state_fingerprint(state)
        if not finite.all():
            bad = [p for p, ok in zip(paths, finite) if not ok]
            raise NonFiniteStateError(
                f"Refusing to save checkpoint step {step} to {self._directory}: leaf {bad[0]} "
                f"contains NaN or Inf ({len(bad)} of {len(paths)} leaves are non-finite: "
                f"{', '.join(bad[:5])}). "
                f"Nothing was written; {_last_good(self.latest_step())}. "
                f"Find the cause (learning rate, loss scale, a bad batch) and resume from it."
            )
        flat, _ = jax.tree_util.tree_flatten_with_path(state)
        manifest = {
            "format": _MANIFEST_FORMAT,
            "step": step,
            "has_data_iterator": data_iterator is not None,
            "leaves": [
                {"path": p, "shape": list(leaf.shape), "dtype": str(leaf.dtype), "checksum": int(c)}
                for p, (_, leaf), c in zip(paths, flat, checksums)
            ],
        }
        items = {_STATE: ocp.args.StandardSave(state), _INTEGRITY: ocp.args.JsonSave(manifest)}
        if data_iterator is not None:
            items[_DATA] = _IteratorStateSave(_iterator_payload(data_iterator))

        self.wait()
        try:
            self._mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
        except Exception as e:  # noqa: BLE001 - classified and re-raised with context
            raise self._save_error(step, e) from e
        self._pending_step = step
        return True

    def _validate_metrics(self, metrics: Optional[dict[str, Any]]) -> Optional[dict[str, float]]:
        if metrics is None:
            return None
        if not isinstance(metrics, dict):
            raise TypeError(
                f"metrics must be a dict of name -> number; got {type(metrics).__name__}."
            )
        out = {str(k): float(v) for k, v in metrics.items()}
        if self._best_metric is not None:
            if self._best_metric not in out:
                raise ValueError(
                    f"metrics must contain best_metric {self._best_metric!r}; "
                    f"got keys {sorted(out)}."
                )
            if not np.isfinite(out[self._best_metric]):
                raise ValueError(
                    f"metrics[{self._best_metric!r}] is {out[self._best_metric]}; the value that "
                    f"ranks checkpoints must be finite."
                )
        return out

    def _save_error(self, step: int, exc: Exception) -> CheckpointSaveError:
        self._reset_manager()
        latest = self._mngr.latest_step()
        partial = self._directory / f"{step}{_TMP_MARKER}"
        if step in self._mngr.all_steps():
            return CheckpointSaveError(
                f"Checkpoint step {step} in {self._directory} was committed, but removing older "
                f"steps afterwards failed ({_one_line(exc)}). Check the filesystem; a half-removed "
                f"old step is detected as corrupt if it is ever needed."
            )
        if _is_disk_full(exc):
            return CheckpointDiskFullError(
                f"No space left on device while writing checkpoint step {step} to "
                f"{self._directory}. {_last_good(latest).capitalize()}; the "
                f"partial write {partial} is never loaded and is removed on the next start. Free "
                f"space on that filesystem (or lower max_to_keep) and resume from the directory.",
            )
        return CheckpointSaveError(
            f"Writing checkpoint step {step} to {self._directory} failed ({_one_line(exc)}). "
            f"{_last_good(latest).capitalize()}."
        )

    def _reset_manager(self) -> None:
        """Replaces the orbax manager after a failed save.

        A failed save can leave background writers (e.g. orbax's step-metadata writer) holding an
        error that the old manager would raise on its next, unrelated call, such as reading an
        older, good step.  A fresh manager starts from what is on disk.
        """
        try:
            self._mngr.close()
        except Exception as e:  # noqa: BLE001 - the failure was already reported by the caller
            logger.debug("Closing the orbax manager after a failed save raised %s", _one_line(e))
        self._pending_step = None
        self._mngr = ocp.CheckpointManager(self._directory, options=self._options)

    def wait(self) -> None:
        """Blocks until a background write has committed; raises its error if it failed."""
        step, self._pending_step = self._pending_step, None
        if step is None:
            return
        try:
            self._mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - classified and re-raised with context
            raise self._save_error(step, e) from e

    def close(self) -> None:
        """Waits for the pending write (raising its error) and releases orbax resources."""
        try:
            self.wait()
        finally:
            self._mngr.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- restore ---------------------------------------------------------------------------------

    def restore(
        self, abstract_state: Any, *, data_iterator: Any = None, step: Optional[int] = None
    ) -> Optional[tuple[Any, int]]:
        """Loads the newest good checkpoint (or exactly ``step``) onto the target shardings.

        Args:
          abstract_state: pytree with the structure of the saved state whose leaves are
            ``jax.ShapeDtypeStruct`` with ``sharding`` (or live arrays); arrays are restored with
            exactly these shardings, so a different mesh/partitioning than at save time works.
          data_iterator: if given, its state is set (``set_state``) to the saved one, and only
            after the whole checkpoint is verified.
          step: restore this step; corruption then raises instead of falling back.

        Returns:
          ``(state, step)``, or None when the directory holds no committed checkpoint.

        Raises:
          ValueError: the target does not match the saved structure/shapes/dtypes, or a
            data_iterator is passed for a checkpoint saved without one.
          FileNotFoundError: ``step`` is not a committed checkpoint.
          CorruptCheckpointError: ``step`` was given and is corrupt.
          NoValidCheckpointError: every committed checkpoint is corrupt (none is moved).
        """
        target = _validate_target(abstract_state)
        self.wait()
        self._mngr.reload()
        steps = sorted(self._mngr.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(
                    f"No committed checkpoint for step {step} in {self._directory}; "
                    f"available steps: {sorted(steps)}."
                )
            result, problem = self._try_restore(step, abstract_state, target, data_iterator)
            if problem is not None:
                raise CorruptCheckpointError(
                    f"Checkpoint step {step} in {self._directory} is corrupt: {problem}"
                )
            return self._finish_restore(step, result, data_iterator)
        if not steps:
            return None

        bad: list[tuple[int, str]] = []
        for candidate in steps:
            result, problem = self._try_restore(candidate, abstract_state, target, data_iterator)
            if problem is None:
                for bad_step, reason in bad:
                    moved = self._quarantine(bad_step)
                    _warn(
                        f"Checkpoint step {bad_step} in {self._directory} is corrupt ({reason}); "
                        f"it was moved to {moved} and is not loaded. Falling back to step "
                        f"{candidate}."
                    )
                self._mngr.reload()
                return self._finish_restore(candidate, result, data_iterator)
            bad.append((candidate, problem))
        listing = "; ".join(f"step {s}: {reason}" for s, reason in bad)
        raise NoValidCheckpointError(
            f"No valid checkpoint in {self._directory}: every committed step is corrupt "
            f"({listing}). Nothing was loaded or moved. Restore the directory from a backup or "
            f"start a fresh run in a new directory."
        )

    def _finish_restore(self, step: int, result: tuple[Any, Any], data_iterator: Any):
        state, iterator_state = result
        if data_iterator is not None:
            data_iterator.set_state(iterator_state)
        _info(f"Restored checkpoint step {step} from {self._directory}.")
        return state, step

    def _try_restore(
        self, step: int, abstract: Any, target: list, data_iterator: Any
    ) -> tuple[Optional[tuple[Any, Any]], Optional[str]]:
        """Returns ``((state, iterator_state), None)`` or ``(None, problem)``; the verdict is the
        same on every process.  Raises ValueError for a target/checkpoint mismatch."""
        result, problem = None, None
        try:
            manifest = self._mngr.restore(
                step, args=ocp.args.Composite(**{_INTEGRITY: ocp.args.JsonRestore()})
            )[_INTEGRITY]
            leaves, has_data = _parse_manifest(manifest, step)
        except Exception as e:  # noqa: BLE001 - any failure to read the manifest is corruption
            problem = f"its integrity manifest is missing or unreadable ({_one_line(e)})"
        if problem is None:
            self._check_target(step, leaves, target)
            if data_iterator is not None and not has_data:
                raise ValueError(
                    f"Checkpoint step {step} in {self._directory} was saved without a data "
                    f"iterator, but restore() got data_iterator; pass data_iterator=None or "
                    f"save with data_iterator=."
                )
            items = {_STATE: ocp.args.StandardRestore(abstract_state(abstract))}
            if data_iterator is not None:
                items[_DATA] = _IteratorStateRestore()
            try:
                restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001 - unreadable data is corruption
                problem = f"reading it failed ({_one_line(e)})"
        if problem is None:
            state = restored[_STATE]
            problem = _layout_problem(state, leaves)
        if problem is None:
            _, _, sums = state_fingerprint(state)
            mismatched = [e["path"] for e, c in zip(leaves, sums) if int(c) != e["checksum"]]
            if mismatched:
                problem = (
                    f"checksum mismatch in leaf {mismatched[0]} ({len(mismatched)} of "
                    f"{len(leaves)} leaves differ from what was saved: garbled bytes)"
                )
            else:
                result = (state, restored[_DATA] if data_iterator is not None else None)
        if not _all_processes_agree(problem is None):
            return None, problem or "another process could not read its part of this checkpoint"
        return result, problem

    def _check_target(self, step: int, leaves: list[dict], target: list) -> None:
        saved = [(e["path"], tuple(e["shape"]), e["dtype"]) for e in leaves]
        wanted = [(name, tuple(s.shape), str(s.dtype)) for name, s in target]
        if saved == wanted:
            return
        saved_paths, wanted_paths = [s[0] for s in saved], [w[0] for w in wanted]
        if saved_paths != wanted_paths:
            missing = sorted(set(saved_paths) - set(wanted_paths))
            extra = sorted(set(wanted_paths) - set(saved_paths))
            detail = (
                f"leaves only in the checkpoint: {missing[:5]}; only in the target: {extra[:5]}"
            )
        else:
            (path, s_shape, s_dtype), (_, w_shape, w_dtype) = next(
                (s, w) for s, w in zip(saved, wanted) if s != w
            )
            detail = (
                f"leaf {path} was saved as {s_shape} {s_dtype} but the target asks for "
                f"{w_shape} {w_dtype}"
            )
        raise ValueError(
            f"abstract_state does not match checkpoint step {step} in {self._directory}: {detail}. "
            f"Build the target from the same model/optimizer config as the run that wrote it."
        )

    def _quarantine(self, step: int) -> epath.Path:
        """Renames ``<dir>/<step>`` to the first free ``<dir>/<step>.corrupt[-k]`` (process 0)."""
        source = self._directory / str(step)
        dest = self._directory / f"{step}{_CORRUPT_SUFFIX}"
        k = 0
        while dest.exists():
            k += 1
            dest = self._directory / f"{step}{_CORRUPT_SUFFIX}-{k}"
        if jax.process_index() == 0:
            source.rename(dest)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"kdjax_checkpoint_quarantine_{step}")
        return dest

    def _set_aside_unreadable_metrics(self) -> None:
        """Renames a garbled ``<step>/metrics/metrics`` file to ``metrics.corrupt`` (process 0).

        Orbax parses every step's metrics file when the manager starts and would fail on a garbled
        one.  The metrics only rank steps for ``best_metric``; the step itself stays restorable
        (its state is verified by :meth:`restore` as usual) and is kept by ``max_to_keep`` only.
        """
        if self._directory.exists() and jax.process_index() == 0:
            for step_dir in sorted(self._directory.iterdir()):
                path = step_dir / _METRICS / _METRICS
                if not (step_dir.name.isdigit() and path.exists()):
                    continue
                try:
                    readable = isinstance(json.loads(path.read_text()), dict)
                except (ValueError, UnicodeDecodeError):
                    readable = False
                if not readable:
                    moved = path.parent / f"{_METRICS}{_CORRUPT_SUFFIX}"
                    path.rename(moved)
                    _warn(
                        f"The metrics file of checkpoint step {step_dir.name} is garbled; moved it "
                        f"to {moved}. The step is still restorable but no longer ranked by "
                        f"best_metric."
                    )
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("kdjax_checkpoint_metrics_scan")

    def _warn_partial_saves(self) -> None:
        if not self._directory.exists():
            return
        partial = sorted(p.name for p in self._directory.iterdir() if _TMP_MARKER in p.name)
        if partial:
            _warn(
                f"Found partial checkpoint(s) from an interrupted save in {self._directory}: "
                f"{partial}. They were never committed, are never loaded, and are removed now."
            )
