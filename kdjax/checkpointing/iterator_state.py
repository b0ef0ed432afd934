"""Data-iterator state: one JSON file per process, each with its own SHA-256 (an orbax handler)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from kdjax.checkpointing.errors import CorruptCheckpointError

_ITERATOR_FORMAT = "kdjax-iterator-state/1"


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
