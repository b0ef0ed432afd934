"""What the grid commands (``experiments.reproduce_cpu``, ``experiments.detection_kd``) share:
strict JSON files, JAX's persistent compilation cache, worker processes that end with their
driver, and the history of a command's invocations in its workdir."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from typing import Any, Mapping

import jax

from kdjax.atomic import write_json_atomic

#: The invocation history in a grid's workdir (:func:`record_invocation`).
INVOCATIONS_FILE = "invocations.json"


def finite_or_none(tree: Any) -> Any:
    """``tree`` with every non-finite float (an undefined std or p-value) as None: strict JSON."""
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    if isinstance(tree, Mapping):
        return {k: finite_or_none(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [finite_or_none(v) for v in tree]
    return tree


def write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as strict JSON (non-finite floats as null, one-space indent) atomically
    (:func:`kdjax.atomic.write_json_atomic`), creating its directory."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json_atomic(path, finite_or_none(obj), indent=1, allow_nan=False)


def enable_compilation_cache(directory: str) -> None:
    """Turns on JAX's persistent compilation cache in ``directory`` for this process.

    The seeds of a cell compile exactly the same train and eval steps, so with the cache only the
    first seed of each cell pays for XLA's compiles (seconds per run on a busy 2-core CPU, more
    than the training itself in smoke runs). Results are unchanged: the cache stores compiled
    executables keyed by the computation and the compile options.
    """
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def exit_when_orphaned(parent: int) -> None:
    """Worker initializer: a daemon thread ends the worker (``os._exit``) within 2 s of the driver
    process ``parent`` going away, so a killed driver never leaves workers writing into the
    workdir (an unfinished run resumes or restarts cleanly next time)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2.0)
        os._exit(1)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def record_invocation(workdir: str, entry: Mapping[str, Any]) -> list[dict]:
    """Appends ``entry`` to ``<workdir>/invocations.json`` and returns the whole history, so a
    report regenerated from reused runs still states when and how long they were measured.
    An invocation that reused no run trained every run of the report: it starts a new history."""
    path = os.path.join(workdir, INVOCATIONS_FILE)
    history = []
    if os.path.exists(path) and entry["reused"]:
        with open(path, encoding="utf-8") as fh:
            history = json.load(fh)
    history.append(dict(entry))
    write_json(path, history)
    return history
