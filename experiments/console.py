"""What a run prints: one line per event, from process 0 only."""

from __future__ import annotations

import jax


def log(message: str) -> None:
    """Prints ``message`` on process 0 (stdout, flushed)."""
    if jax.process_index() == 0:
        print(message, flush=True)
