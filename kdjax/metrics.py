"""Metric writers for training runs: one JSONL file plus TensorBoard event files, process 0 only.

Layout under a run's ``workdir``::

    metrics.jsonl   one JSON object per line: {"kind": "train" | "eval", "step": int, "time": float,
                    <metric name>: float, ...}; non-finite values are written as null
    tb/             TensorBoard event files (tensorboardX); scalar tags are "<kind>/<metric name>"

Only process 0 of a multi-process job writes (the others get a disabled writer that does nothing),
so the files are the same whatever the number of processes.

On resume, :func:`truncate_jsonl` drops the lines logged after the restored checkpoint step (a run
killed between a log line and its next checkpoint logged steps that will be trained again), and the
TensorBoard writer is opened with ``purge_step`` = that step, which tells TensorBoard to discard the
older events at or after it. The files then read as if the run had never been interrupted.

tensorboardX is imported only when a writer is opened on process 0, and without PyTorch (see
:func:`_summary_writer_class`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from typing import Any, Mapping

from kdjax.atomic import write_text_atomic

JSONL_NAME = "metrics.jsonl"
TB_DIR = "tb"
KINDS = ("train", "eval")


def _json_value(value: Any) -> Any:
    """A JSON-safe scalar: Python int/float/bool/str, non-finite floats as None."""
    if isinstance(value, (bool, str)) or value is None:
        return value
    if hasattr(value, "item"):  # NumPy / JAX scalars
        value = value.item()
    if isinstance(value, int):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a metrics JSONL file, in file order; ``[]`` if the file does not exist.

    A last line without its newline (the process died while writing it) is ignored; any other
    unparsable line raises ValueError naming the file and line number.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        text = f.read()
    complete = text.split("\n")[:-1]  # drops "" after the last newline, or a torn last line
    records = []
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path} line {number} is not valid JSON ({e}); the metrics file is "
                             f"damaged. Move it aside to resume with a fresh log.") from None
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(f"{path} line {number} is not a metrics record (a JSON object with "
                             f"'step'): {line[:200]!r}.")
        records.append(record)
    return records


def truncate_jsonl(path: str | os.PathLike, step: int) -> list[dict[str, Any]]:
    """Keeps the records with ``record['step'] <= step``, rewrites the file atomically, returns them.

    Used on resume from checkpoint ``step``: later records describe training that is redone.
    """
    path = os.fspath(path)
    kept = [r for r in read_jsonl(path) if int(r["step"]) <= step]
    if os.path.exists(path):
        write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    return kept


def _summary_writer_class():
    """``tensorboardX.SummaryWriter``, imported without importing PyTorch.

    tensorboardX imports ``torch`` at import time whenever it is installed, only so that it can
    accept torch tensors (several seconds per process); kdjax logs Python floats. Unless torch or
    tensorboardX is already loaded, ``sys.modules['torch'] = None`` (Python's documented way to make
    an import raise ImportError) is set for the duration of the tensorboardX import and removed
    afterwards, so a later ``import torch`` works as usual.
    """
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    """Appends metric records to ``<workdir>/metrics.jsonl`` and ``<workdir>/tb`` event files.

    Args:
      workdir: run directory (created if missing).
      enabled: write anything at all; pass ``jax.process_index() == 0`` on multi-process jobs.
      tensorboard: also write TensorBoard event files.
      purge_step: on resume, the restored step: TensorBoard discards earlier-written events with a
        step at or after it (``SummaryWriter(purge_step=...)``).
    """

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True,
                 tensorboard: bool = True, purge_step: int | None = None):
        self._enabled = bool(enabled)
        self._jsonl = None
        self._tb = None
        if not self._enabled:
            return
        workdir = os.fspath(workdir)
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, JSONL_NAME), "a", encoding="utf-8")
        if tensorboard:
            # Event files are named by the second they were opened in and the host: a suffix
            # unique to this writer keeps a run resumed within that second from overwriting
            # the previous run's file.
            self._tb = _summary_writer_class()(os.path.join(workdir, TB_DIR),
                                               purge_step=purge_step, flush_secs=30,
                                               filename_suffix=f".{os.getpid()}.{uuid.uuid4().hex[:8]}")

    def write(self, kind: str, step: int, values: Mapping[str, Any]) -> dict[str, Any]:
        """Logs ``values`` (metric name -> number) at ``step``; returns the JSON record written.

        The record is ``{'kind': kind, 'step': step, 'time': unix seconds, **values}`` with
        non-finite numbers as None; TensorBoard gets every finite number as ``<kind>/<name>``.
        The line is flushed to the OS at once, so a reader (or a resume after a crash) sees every
        complete line.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}; got {kind!r}.")
        record = {"kind": kind, "step": int(step), "time": time.time()}
        record.update({str(k): _json_value(v) for k, v in values.items()})
        if not self._enabled:
            return record
        self._jsonl.write(json.dumps(record, sort_keys=True) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key in values and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{key}", float(value), global_step=int(step))
        return record

    def close(self) -> None:
        """Flushes and closes the files (idempotent)."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
