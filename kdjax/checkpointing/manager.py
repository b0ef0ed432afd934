"""The orbax ``CheckpointManager`` wrapper: :class:`Checkpointer` (retention, save policy,
async writes, guarded saves and verified restores)."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Optional

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from kdjax.checkpointing.common import _info, _one_line, logger
from kdjax.checkpointing.errors import CheckpointSaveError
from kdjax.checkpointing.fingerprint import state_fingerprint
from kdjax.checkpointing.guards import _non_finite_error, _save_failure
from kdjax.checkpointing.housekeeping import _set_aside_unreadable_metrics, _warn_partial_saves
from kdjax.checkpointing.iterator_state import _IteratorStateSave, _iterator_payload
from kdjax.checkpointing.layout import _DATA, _INTEGRITY, _STATE
from kdjax.checkpointing.manifest import _build_manifest
from kdjax.checkpointing.restore import _restore_verified, _validate_target


#: What orbax logs (absl, WARNING) for every save without metrics while it ranks checkpoints by
#: one, although its ``BestN`` policy handles such steps (``keep_checkpoints_without_metrics``):
#: a Checkpointer with ``best_metric`` saves them by design (checkpoints between evals, on
#: preemption) and ranks them worst.
_NO_METRICS_WARNING = "Requested `tracked_metric`; did not provide metrics."


def _not_the_no_metrics_warning(record: logging.LogRecord) -> bool:
    return record.getMessage() != _NO_METRICS_WARNING


@contextlib.contextmanager
def _quiet_metricless_save(active: bool):
    """Drops orbax's :data:`_NO_METRICS_WARNING` (only that message) while ``active``."""
    absl_logger = logging.getLogger("absl")
    if active:
        absl_logger.addFilter(_not_the_no_metrics_warning)
    try:
        yield
    finally:
        absl_logger.removeFilter(_not_the_no_metrics_warning)


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
        _warn_partial_saves(self._directory)
        _set_aside_unreadable_metrics(self._directory)

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
            raise _non_finite_error(self._directory, step, paths, finite, self.latest_step())
        manifest = _build_manifest(step, state, paths, checksums, data_iterator is not None)
        items = {_STATE: ocp.args.StandardSave(state), _INTEGRITY: ocp.args.JsonSave(manifest)}
        if data_iterator is not None:
            items[_DATA] = _IteratorStateSave(_iterator_payload(data_iterator))

        self.wait()
        try:
            with _quiet_metricless_save(self._best_metric is not None and metrics is None):
                self._mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                                force=True)
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
        return _save_failure(self._directory, step, exc, latest, step in self._mngr.all_steps())

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
        return _restore_verified(
            self._mngr, self._directory, abstract_state, target, data_iterator, step
        )
