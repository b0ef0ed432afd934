"""Save guards: the refusal of a non-finite state and the classification of a failed write
(disk full, other error, or a failure after the step committed)."""

from __future__ import annotations

import errno
from typing import Optional

import numpy as np
from etils import epath

from kdjax.checkpointing.common import _one_line
from kdjax.checkpointing.errors import (
    CheckpointDiskFullError,
    CheckpointSaveError,
    NonFiniteStateError,
)
from kdjax.checkpointing.layout import _TMP_MARKER


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


def _non_finite_error(
    directory: epath.Path, step: int, paths: list[str], finite: np.ndarray, latest: Optional[int]
) -> NonFiniteStateError:
    """The refusal to save ``step``: names the first non-finite leaf (``finite`` is bool
    ``[n_leaves]`` aligned with ``paths``) and the last good step ``latest``."""
    bad = [p for p, ok in zip(paths, finite) if not ok]
    return NonFiniteStateError(
        f"Refusing to save checkpoint step {step} to {directory}: leaf {bad[0]} "
        f"contains NaN or Inf ({len(bad)} of {len(paths)} leaves are non-finite: "
        f"{', '.join(bad[:5])}). "
        f"Nothing was written; {_last_good(latest)}. "
        f"Find the cause (learning rate, loss scale, a bad batch) and resume from it."
    )


def _save_failure(
    directory: epath.Path, step: int, exc: Exception, latest: Optional[int], committed: bool
) -> CheckpointSaveError:
    """The error for a failed write of ``step``: ``committed`` says whether ``step`` is among the
    committed steps anyway (the failure came while removing older steps); ``latest`` is the newest
    committed step."""
    partial = directory / f"{step}{_TMP_MARKER}"
    if committed:
        return CheckpointSaveError(
            f"Checkpoint step {step} in {directory} was committed, but removing older "
            f"steps afterwards failed ({_one_line(exc)}). Check the filesystem; a half-removed "
            f"old step is detected as corrupt if it is ever needed."
        )
    if _is_disk_full(exc):
        return CheckpointDiskFullError(
            f"No space left on device while writing checkpoint step {step} to "
            f"{directory}. {_last_good(latest).capitalize()}; the "
            f"partial write {partial} is never loaded and is removed on the next start. Free "
            f"space on that filesystem (or lower max_to_keep) and resume from the directory.",
        )
    return CheckpointSaveError(
        f"Writing checkpoint step {step} to {directory} failed ({_one_line(exc)}). "
        f"{_last_good(latest).capitalize()}."
    )
