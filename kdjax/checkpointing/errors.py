"""The exceptions a save or restore raises."""

from __future__ import annotations

import errno


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
