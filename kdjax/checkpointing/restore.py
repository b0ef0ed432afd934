"""Restore: restore targets, verified reads of one step, and the fallback from a corrupt latest step
to the newest good one (the corrupt step is renamed aside, never deleted)."""

from __future__ import annotations

from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath

from kdjax.checkpointing.common import _all_processes_agree, _info, _one_line, _warn
from kdjax.checkpointing.errors import CorruptCheckpointError, NoValidCheckpointError
from kdjax.checkpointing.fingerprint import state_fingerprint
from kdjax.checkpointing.housekeeping import _quarantine
from kdjax.checkpointing.iterator_state import _IteratorStateRestore
from kdjax.checkpointing.layout import _DATA, _INTEGRITY, _STATE
from kdjax.checkpointing.manifest import _check_target, _layout_problem, _parse_manifest


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


def _restore_verified(
    mngr: ocp.CheckpointManager,
    directory: epath.Path,
    abstract: Any,
    target: list,
    data_iterator: Any,
    step: Optional[int],
) -> Optional[tuple[Any, int]]:
    """The body of :meth:`Checkpointer.restore` after its target was validated (``target``, from
    :func:`_validate_target`) and pending writes finished; same arguments, returns and raises."""
    mngr.reload()
    steps = sorted(mngr.all_steps(), reverse=True)
    if step is not None:
        if step not in steps:
            raise FileNotFoundError(
                f"No committed checkpoint for step {step} in {directory}; "
                f"available steps: {sorted(steps)}."
            )
        result, problem = _try_restore(mngr, directory, step, abstract, target, data_iterator)
        if problem is not None:
            raise CorruptCheckpointError(
                f"Checkpoint step {step} in {directory} is corrupt: {problem}"
            )
        return _finish_restore(directory, step, result, data_iterator)
    if not steps:
        return None

    bad: list[tuple[int, str]] = []
    for candidate in steps:
        result, problem = _try_restore(mngr, directory, candidate, abstract, target, data_iterator)
        if problem is None:
            for bad_step, reason in bad:
                moved = _quarantine(directory, bad_step)
                _warn(
                    f"Checkpoint step {bad_step} in {directory} is corrupt ({reason}); "
                    f"it was moved to {moved} and is not loaded. Falling back to step "
                    f"{candidate}."
                )
            mngr.reload()
            return _finish_restore(directory, candidate, result, data_iterator)
        bad.append((candidate, problem))
    listing = "; ".join(f"step {s}: {reason}" for s, reason in bad)
    raise NoValidCheckpointError(
        f"No valid checkpoint in {directory}: every committed step is corrupt "
        f"({listing}). Nothing was loaded or moved. Restore the directory from a backup or "
        f"start a fresh run in a new directory."
    )


def _finish_restore(
    directory: epath.Path, step: int, result: tuple[Any, Any], data_iterator: Any
) -> tuple[Any, int]:
    state, iterator_state = result
    if data_iterator is not None:
        data_iterator.set_state(iterator_state)
    _info(f"Restored checkpoint step {step} from {directory}.")
    return state, step


def _try_restore(
    mngr: ocp.CheckpointManager,
    directory: epath.Path,
    step: int,
    abstract: Any,
    target: list,
    data_iterator: Any,
) -> tuple[Optional[tuple[Any, Any]], Optional[str]]:
    """Returns ``((state, iterator_state), None)`` or ``(None, problem)``; the verdict is the
    same on every process.  Raises ValueError for a target/checkpoint mismatch."""
    result, problem = None, None
    try:
        manifest = mngr.restore(
            step, args=ocp.args.Composite(**{_INTEGRITY: ocp.args.JsonRestore()})
        )[_INTEGRITY]
        leaves, has_data = _parse_manifest(manifest, step)
    except Exception as e:  # noqa: BLE001 - any failure to read the manifest is corruption
        problem = f"its integrity manifest is missing or unreadable ({_one_line(e)})"
    if problem is None:
        _check_target(directory, step, leaves, target)
        if data_iterator is not None and not has_data:
            raise ValueError(
                f"Checkpoint step {step} in {directory} was saved without a data "
                f"iterator, but restore() got data_iterator; pass data_iterator=None or "
                f"save with data_iterator=."
            )
        items = {_STATE: ocp.args.StandardRestore(abstract_state(abstract))}
        if data_iterator is not None:
            items[_DATA] = _IteratorStateRestore()
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(**items))
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
