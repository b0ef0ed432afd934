"""Running several local JAX processes for the multi-process tests (loopback only)."""

from __future__ import annotations

import socket
import subprocess
import time
from typing import Callable, Mapping


def free_port() -> int:
    """A TCP port free on 127.0.0.1 (for the ``jax.distributed`` coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(argv: Callable[[int, int], list[str]], num_processes: int = 2,
        env: Mapping[str, str] | None = None, timeout: float = 240, **popen) -> list[str]:
    """Starts ``argv(process_id, port)`` for each process id with one free coordinator ``port``
    and waits for all, ``timeout`` seconds in total; returns their combined stdout/stderr. Fails
    naming the process and its output's end unless every one exits 0 in time (the others are
    then killed)."""
    port = free_port()
    procs = [subprocess.Popen(argv(i, port), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, **popen)
             for i in range(num_processes)]
    deadline = time.monotonic() + timeout
    outputs, late = [], None
    for i, p in enumerate(procs):
        try:
            outputs.append(p.communicate(timeout=max(deadline - time.monotonic(), 0.1))[0])
        except subprocess.TimeoutExpired:
            late = i
            break
    if late is not None:
        for p in procs:
            p.kill()
        outputs += [p.communicate()[0] for p in procs[len(outputs):]]
        raise AssertionError(f"process {late} did not finish within {timeout} s:\n"
                             f"{outputs[late][-4000:]}")
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{out[-4000:]}"
    return outputs
