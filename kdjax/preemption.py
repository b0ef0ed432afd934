"""Preemption handling: notice a SIGTERM (or a JAX preemption notice), finish the step, stop.

The training loop asks :meth:`PreemptionWatcher.should_stop` once per step, after the step, and
when it returns True writes a checkpoint (``Checkpointer.save(step, state, force=True)``), waits for
it and exits with status 0.  The signal handler only records which signal arrived; all work
happens in the loop, between steps.

How the decision is made depends on the process layout (``PreemptionWatcher.mode``):

* ``'single_process'``: Python handlers on ``signals``; stop at the first step that ends after a
  signal arrived.
* ``'jax_sync_point'`` (multi-process with ``jax.distributed`` and its preemption service, the
  default on Cloud TPU pods): JAX installs its own SIGTERM notifier, which tells the coordination
  service; :func:`jax.experimental.multihost_utils.reached_preemption_sync_point` then returns True
  on every process at the same step.  The watcher leaves SIGTERM to JAX (a Python handler would
  replace JAX's) and only handles the other ``signals`` itself (combined as below).
* ``'process_allgather'`` (multi-process without the preemption service, e.g. CPU jobs with
  ``jax_enable_preemption_service=False``): Python handlers on every process, and each
  ``should_stop`` all-gathers the per-process flags (one int32 per process) so that every process
  stops at the same step when any of them was signalled.

In both multi-process modes every process must call ``should_stop`` at every step with the same
step number: it is a collective.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Iterable, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

logger = logging.getLogger(__name__)

SINGLE_PROCESS = "single_process"
JAX_SYNC_POINT = "jax_sync_point"
PROCESS_ALLGATHER = "process_allgather"


def _detect_mode() -> str:
    if jax.process_count() == 1:
        return SINGLE_PROCESS
    if jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service:
        return JAX_SYNC_POINT
    return PROCESS_ALLGATHER


class PreemptionWatcher:
    """Records preemption signals and tells the loop when to checkpoint and stop.

    Args:
      signals: signals that request a graceful stop (default SIGTERM, what schedulers and Cloud
        TPU send before preemption).  Add ``signal.SIGINT`` to make Ctrl-C stop gracefully too.

    Use as a context manager (or call :meth:`close`): the previous handlers are restored on exit.
    Must be created in the main thread (Python delivers signals only there).
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM,)):
        try:
            wanted = tuple(dict.fromkeys(signal.Signals(s) for s in signals))
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"signals must be signal numbers, e.g. (signal.SIGTERM,); {e}."
            ) from None
        if not wanted:
            raise ValueError("signals must name at least one signal, e.g. (signal.SIGTERM,).")
        uncatchable = [s.name for s in wanted if s in (signal.SIGKILL, signal.SIGSTOP)]
        if uncatchable:
            raise ValueError(f"signals {uncatchable} cannot be caught; use SIGTERM or SIGINT.")
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "PreemptionWatcher must be created in the main thread: Python runs signal "
                "handlers only there."
            )
        self._mode = _detect_mode()
        handled = [s for s in wanted if not (self._mode == JAX_SYNC_POINT and s == signal.SIGTERM)]
        self._received: Optional[int] = None
        self._stop_step: Optional[int] = None
        self._previous = {}
        for s in handled:
            self._previous[s] = signal.signal(s, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        """Signal handler: records the first signal and returns; no I/O, no locks."""
        del frame
        if self._received is None:
            self._received = signum

    @property
    def mode(self) -> str:
        """``'single_process'``, ``'jax_sync_point'`` or ``'process_allgather'`` (module doc)."""
        return self._mode

    @property
    def handled_signals(self) -> tuple[signal.Signals, ...]:
        """Signals with a Python handler installed by this watcher (empty after :meth:`close`)."""
        return tuple(self._previous)

    @property
    def received_signal(self) -> Optional[signal.Signals]:
        """The first signal this process received, or None."""
        return None if self._received is None else signal.Signals(self._received)

    @property
    def stop_step(self) -> Optional[int]:
        """The step at which :meth:`should_stop` first returned True, or None."""
        return self._stop_step

    def should_stop(self, step: int) -> bool:
        """True once this step should be the last: checkpoint it and exit.

        Stays True after the first True.  On multi-process runs this is a collective: call it on
        every process at every step with the same ``step``.
        """
        if self._stop_step is not None:
            return True
        local = self._received is not None
        if self._mode == SINGLE_PROCESS:
            stop, reason = local, "a signal reached this process"
        else:
            stop = False
            if self._previous:
                flags = multihost_utils.process_allgather(np.asarray([local], dtype=np.int32))
                stop = bool(np.any(flags))
            reason = "a signal reached one of the processes"
            if self._mode == JAX_SYNC_POINT and multihost_utils.reached_preemption_sync_point(step):
                stop, reason = True, "JAX preemption sync point reached"
        if stop:
            self._stop_step = step
            if jax.process_index() == 0:
                received = self.received_signal
                name = f" ({received.name} here)" if received is not None else ""
                logger.warning(
                    f"Preemption requested: {reason}{name}. Stopping after step {step}; "
                    f"checkpoint it and exit."
                )
        return stop

    def close(self) -> None:
        """Restores the handlers that were installed before this watcher (idempotent)."""
        for s, previous in self._previous.items():
            # None: the old handler was installed outside Python (it was replaced on install).
            signal.signal(s, signal.SIG_DFL if previous is None else previous)
        self._previous = {}

    def __enter__(self) -> "PreemptionWatcher":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
