"""Atomic file writes: the one way kdjax and experiments replace a small file.

The content goes to a temporary file next to ``path`` (``<path>.tmp-<pid>-<random>``), is flushed
and fsynced, then renamed over ``path`` with ``os.replace`` and the directory fsynced. A reader
sees the old file or the new one, never a torn one, and a crash at any point leaves no partial
``path`` (a failed write removes its temporary file).
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, BinaryIO, Callable


def fsync_dir(path: str) -> None:
    """Makes the directory ``path``'s entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Writes ``path`` through ``write(file)`` (a file open for binary writing) atomically."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2,
                      default: Callable[[Any], Any] | None = None,
                      allow_nan: bool = True) -> None:
    """Writes ``obj`` as JSON (sorted keys, ``indent``, a final newline) to ``path`` atomically.

    ``default`` converts what JSON cannot hold (``json.dumps``'s); ``allow_nan=False`` raises
    ValueError on a non-finite float instead of writing ``NaN`` (strict JSON). The text is built
    before the file is touched, so an object JSON cannot hold leaves ``path`` as it was.
    """
    text = json.dumps(obj, indent=indent, sort_keys=True, default=default, allow_nan=allow_nan)
    write_text_atomic(path, text + "\n")
