"""Durable small files: atomic write (temporary name, fsync, ``os.replace``) and JSON read/write."""
from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from typing import Any


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file, fsync it, then rename it."""
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
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _write_json(path: str, obj: Any) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True).encode()))


def _read_json(path: str) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())
