"""Durable small files: JSON read/write (atomic writes: :mod:`kdjax.atomic`) and an exclusive
advisory file lock."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import weakref
from typing import Any

# The writer and finalize write their files through these (kdjax.atomic: the project's one way).
from kdjax.atomic import atomic_write as _atomic_write, fsync_dir as _fsync_dir  # noqa: F401
from kdjax.atomic import write_json_atomic


def _write_json(path: str, obj: Any) -> None:
    write_json_atomic(path, obj)


def _read_json(path: str) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())


def _this_holder() -> str:
    """How a lock file records its holder: ``'<pid>@<hostname>'`` of this process."""
    return f"{os.getpid()}@{socket.gethostname()}"


def _unlock_and_close(fd: int, owner_pid: int) -> None:
    """Unlock (only in the process that locked: a forked child shares the lock) and close ``fd``."""
    try:
        if os.getpid() == owner_pid:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class _FileLock:
    """An exclusive, non-blocking ``flock`` on the file ``path``, held until ``release()``.

    The lock belongs to the open file description, so two ``_FileLock`` objects on one path
    exclude each other even inside one process, and the kernel drops it when the holder dies
    (also by SIGKILL). While held, the file records the holder as ``'<pid>@<hostname>'``.
    Garbage collection (or interpreter exit) releases a lock that was not released explicitly.
    """

    def __init__(self, path: str):
        self.path = path
        self._release: weakref.finalize | None = None

    def acquire(self) -> str | None:
        """Take the lock; return None on success, else the holder's record (``'pid@host'``)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return self._holder()
        except BaseException:
            os.close(fd)
            raise
        self._release = weakref.finalize(self, _unlock_and_close, fd, os.getpid())
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{_this_holder()}\n".encode(), 0)
        except BaseException:
            self.release()
            raise
        return None

    def _holder(self) -> str:
        with open(self.path, "rb") as f:
            record = f.read().decode(errors="replace").strip()
        return record or "a process that has not recorded itself yet"

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._release is not None:
            self._release()
