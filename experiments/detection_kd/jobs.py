"""Running runs in this process or in ``--jobs`` worker processes, preemption included.

One worker (``jobs=1``): each run in this process; a SIGTERM stops the running run after its step
(checkpointed, :func:`~experiments.detection_kd.runs.train_loop`) and no further run starts.

Several workers (spawned, persistent: a worker keeps its compiled steps for the next seed of the
same cell): a SIGTERM to the driver writes ``<workdir>/PREEMPTED`` (runs not yet started return at
once) and is forwarded to the workers, whose running runs checkpoint and stop; workers ignore SIGTERM
between runs. The next start of the command removes the file and resumes. A worker exits within 2 s of
the driver going away (:func:`experiments.grids.exit_when_orphaned`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import signal
from typing import Callable, Sequence

from experiments.detection_kd.runs import STOP_FILE, Run, run_one


def _worker_init(parent: int, cache_dir: str, prng_impl: str) -> None:
    """Worker set-up: SIGTERM ignored between runs (a run's watcher handles it), the compilation
    cache and the PRNG on, and an exit when the driver ``parent`` is gone."""
    import jax

    from experiments.grids import exit_when_orphaned

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    enable_cache(cache_dir)
    jax.config.update("jax_default_prng_impl", prng_impl)
    exit_when_orphaned(parent)


@contextlib.contextmanager
def prng(impl: str):
    """JAX's default PRNG implementation set to ``impl`` in this process, restored afterwards.

    The grid uses ``'rbg'`` (XLA's RngBitGenerator; kdjax's choice): threefry's unrolled rounds
    cost about 2 s of XLA compile per random call site on a 2-core CPU, and a detector's init and
    its RPN / RoI sampling have many, so threefry would make compiling most of a smoke run."""
    import jax

    before = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", impl)
    try:
        yield
    finally:
        jax.config.update("jax_default_prng_impl", before)


def enable_cache(directory: str) -> None:
    """JAX's persistent compilation cache in ``directory`` (the seeds of a cell compile once)."""
    from experiments.grids import enable_compilation_cache

    enable_compilation_cache(directory)


@contextlib.contextmanager
def _forward_sigterm(workdir: str):
    """While running workers: a SIGTERM writes the stop file and is passed on to the workers."""
    def on_term(signum, frame):
        del frame
        open(os.path.join(workdir, STOP_FILE), "w").close()
        for child in multiprocessing.active_children():
            os.kill(child.pid, signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_all(config_json: str, runs: Sequence[Run], workdir: str, jobs: int, prng_impl: str,
            done: Callable[[int, dict], None]) -> list[dict]:
    """Runs every run (``done(i, record)`` after each, in completion order); returns the records.
    A preempted run's record has ``preempted=True``; after one, no further run is started."""
    stop = os.path.join(workdir, STOP_FILE)
    if os.path.exists(stop):
        os.remove(stop)
    cache = os.path.join(workdir, "jax_cache")
    records: list[dict] = []

    def finish(record: dict) -> None:
        records.append(record)
        done(len(records), record)

    if jobs <= 1:
        enable_cache(cache)
        with prng(prng_impl):
            for run in runs:
                finish(run_one(config_json, run, workdir))
                if records[-1].get("preempted"):
                    break
        return records
    context = multiprocessing.get_context("spawn")
    with _forward_sigterm(workdir), concurrent.futures.ProcessPoolExecutor(
            jobs, mp_context=context, initializer=_worker_init,
            initargs=(os.getpid(), cache, prng_impl)) as pool:
        futures = [pool.submit(run_one, config_json, run, workdir) for run in runs]
        for future in concurrent.futures.as_completed(futures):
            finish(future.result())
    return records
