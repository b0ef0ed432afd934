"""Directory housekeeping: reporting partial saves, renaming a corrupt step to ``<step>.corrupt``
and setting aside garbled metrics files (process 0 renames; every process syncs)."""

from __future__ import annotations

import json

import jax
from etils import epath
from jax.experimental import multihost_utils

from kdjax.checkpointing.common import _warn
from kdjax.checkpointing.layout import _CORRUPT_SUFFIX, _METRICS, _TMP_MARKER


def _quarantine(directory: epath.Path, step: int) -> epath.Path:
    """Renames ``<dir>/<step>`` to the first free ``<dir>/<step>.corrupt[-k]`` (process 0)."""
    source = directory / str(step)
    dest = directory / f"{step}{_CORRUPT_SUFFIX}"
    k = 0
    while dest.exists():
        k += 1
        dest = directory / f"{step}{_CORRUPT_SUFFIX}-{k}"
    if jax.process_index() == 0:
        source.rename(dest)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"kdjax_checkpoint_quarantine_{step}")
    return dest


def _set_aside_unreadable_metrics(directory: epath.Path) -> None:
    """Renames a garbled ``<step>/metrics/metrics`` file to ``metrics.corrupt`` (process 0).

    Orbax parses every step's metrics file when the manager starts and would fail on a garbled
    one.  The metrics only rank steps for ``best_metric``; the step itself stays restorable
    (its state is verified by :meth:`Checkpointer.restore` as usual) and is kept by
    ``max_to_keep`` only.
    """
    if directory.exists() and jax.process_index() == 0:
        for step_dir in sorted(directory.iterdir()):
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


def _warn_partial_saves(directory: epath.Path) -> None:
    """Warns about ``<step>.orbax-checkpoint-tmp`` leftovers of an interrupted save."""
    if not directory.exists():
        return
    partial = sorted(p.name for p in directory.iterdir() if _TMP_MARKER in p.name)
    if partial:
        _warn(
            f"Found partial checkpoint(s) from an interrupted save in {directory}: "
            f"{partial}. They were never committed, are never loaded, and are removed now."
        )
