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

from kdjax.checkpointing.errors import (
    CheckpointDiskFullError,
    CheckpointSaveError,
    CorruptCheckpointError,
    NonFiniteStateError,
    NoValidCheckpointError,
)
from kdjax.checkpointing.fingerprint import state_fingerprint
from kdjax.checkpointing.manager import Checkpointer
from kdjax.checkpointing.restore import abstract_state

# Private names that the tests use directly (manifest, iterator-payload and layout checks).
from kdjax.checkpointing.iterator_state import (  # noqa: F401
    _IteratorStateHandler,
    _iterator_payload,
    _parse_iterator_payload,
)
from kdjax.checkpointing.layout import _TMP_MARKER  # noqa: F401
from kdjax.checkpointing.manifest import (  # noqa: F401
    _MANIFEST_FORMAT,
    _MANIFEST_FORMAT_V1,
    _layout_problem,
    _manifest_digest,
    _parse_manifest,
)

__all__ = [
    "CheckpointDiskFullError",
    "CheckpointSaveError",
    "Checkpointer",
    "CorruptCheckpointError",
    "NoValidCheckpointError",
    "NonFiniteStateError",
    "abstract_state",
    "state_fingerprint",
]
