"""``kdjax.loop.fit`` on scikit-learn digits: the run that the kill/resume and multi-process tests
start as a subprocess, and import to run the same configuration in the test process.

Usage::

    python tests/fit_worker.py WORKDIR NUM_STEPS [--checkpoint-every K] [--sleep SECONDS]
        [--num-processes P --process-id I --port PORT]

With ``--num-processes`` > 1 the process joins a ``jax.distributed`` job on 127.0.0.1:PORT with
gloo CPU collectives; each process reads its own rows of every global batch. Process 0 writes the
final parameters to ``WORKDIR/final_params.npz`` (keys: '/'-joined parameter paths) and prints
``FIT_DONE step=<step> stopped_early=<bool>``; the exit status is 0 after a preemption stop too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time

GLOBAL_BATCH = 32
LEARNING_RATE = 3e-3


def run(workdir: str, num_steps: int, *, checkpoint_every: int = 10, sleep: float = 0.0,
        mesh=None, process_index: int | None = None, process_count: int | None = None,
        eval_every: int = 0, log_every: int = 5, async_checkpoint: bool = True, **overrides):
    """fit() of an MLP on digits (global batch 32, Adam 3e-3, CE), seed 0; returns the FitResult.

    ``sleep`` seconds are spent in ``batch_transform`` per batch (to give a test time to send a
    signal mid-run); ``overrides`` are passed on to ``fit``, those named like a ``FitOptions``
    field in its ``options`` (so a bad value raises while they are built, before ``fit``).
    """
    import numpy as np
    import optax

    from kdjax import data, loop, models, recipe

    arrays = data.digits_arrays()
    train_source = data.ArraySource(arrays["train"])
    test_source = data.ArraySource(arrays["test"])
    train_iter = data.make_train_iterator(train_source, global_batch_size=GLOBAL_BATCH, seed=0,
                                          process_index=process_index,
                                          process_count=process_count)

    def slow(batch):
        time.sleep(sleep)
        return batch

    options = dict(eval_every=eval_every, checkpoint_every=checkpoint_every, log_every=log_every,
                   progress=False, async_checkpoint=async_checkpoint)
    fields = {f.name for f in dataclasses.fields(loop.FitOptions)}
    options.update({k: overrides.pop(k) for k in list(overrides) if k in fields})
    kwargs = dict(
        workdir=workdir, student=models.create("mlp", 10), tx=optax.adam(LEARNING_RATE),
        recipe=(recipe.ce(),), train_iter=train_iter,
        eval_iter_fn=lambda: data.make_eval_iterator(
            test_source, global_batch_size=4 * GLOBAL_BATCH, process_index=process_index,
            process_count=process_count),
        num_steps=num_steps, sample_input=np.zeros((1, 8, 8, 1), np.float32), seed=0,
        mesh=mesh, batch_transform=slow if sleep else None, options=loop.FitOptions(**options))
    kwargs.update(overrides)
    return loop.fit(**kwargs)


@contextlib.contextmanager
def compilation_cache(directory: str):
    """Enables JAX's persistent compilation cache in ``directory`` inside the block.

    Every ``fit`` call builds new jitted functions, so without it each call compiles its train,
    eval and checkpoint programs again (seconds each on a busy CPU); with it, a program already
    compiled for the same HLO and devices is loaded. The previous settings are restored after.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    previous = {name: getattr(jax.config, name) for name in names}
    for name, value in zip(names, (directory, 0.0, 0)):
        jax.config.update(name, value)
    cc.reset_cache()
    try:
        yield
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)
        cc.reset_cache()


def cache_env(directory: str) -> dict[str, str]:
    """Environment variables giving a worker subprocess the same persistent compilation cache."""
    return {"JAX_COMPILATION_CACHE_DIR": directory,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def flat_params(params) -> dict:
    """``{'/'-joined path: np.ndarray}`` of a (replicated) parameter tree."""
    import jax
    import numpy as np

    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf.addressable_data(0))
            for path, leaf in flat}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir")
    parser.add_argument("num_steps", type=int)
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)

    import jax
    import numpy as np

    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                                   num_processes=args.num_processes, process_id=args.process_id,
                                   initialization_timeout=60)
    result = run(args.workdir, args.num_steps, checkpoint_every=args.checkpoint_every,
                 sleep=args.sleep)
    params = flat_params(result.state.params)
    step = int(result.state.step.addressable_data(0))
    if jax.process_index() == 0:
        np.savez(os.path.join(args.workdir, "final_params.npz"), **params)
        print(f"FIT_DONE step={step} stopped_early={result.stopped_early}", flush=True)
    if args.num_processes > 1:
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
