"""Does a data-parallel mesh divide the work of a CPU train step, or repeat it on every device?

Setup: ResNet-18 (CIFAR stem) plain CE step, batch 64, 32x32x3, SGD with momentum, once with XLA's
convolutions and once with oneDNN's (:mod:`kdjax.kernels.onednn`), each on one CPU device and on a
``data`` mesh over ``--devices`` CPU devices (``--xla_force_host_platform_device_count``; they
share this machine's cores). Measured in rounds as ``step_overhead.py`` does; reported per conv:

* ``mesh_over_single_<conv>`` = step on the mesh / step on one device, median over rounds of the
  ratio within each round. About 1 when the devices split the batch (the same work, now in pieces,
  plus the gradient all-reduce); about ``--devices`` when each device runs the whole batch.

Usage: ``python benchmarks/data_parallel.py [--devices 2] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    os.environ["XLA_FLAGS"] = " ".join(filter(None, (
        os.environ.get("XLA_FLAGS", ""),
        f"--xla_force_host_platform_device_count={args.devices}")))

    import jax
    import jax.numpy as jnp
    import optax

    import step_overhead
    from kdjax import models, recipe, sharding, train
    from kdjax.kernels import onednn

    if len(jax.devices()) != args.devices:
        sys.exit(f"found {len(jax.devices())} devices, not {args.devices}: run in a fresh process "
                 f"whose XLA_FLAGS set no other device count")
    tx = optax.sgd(step_overhead.LR, momentum=0.9)
    sample = jnp.zeros((1, step_overhead.SIZE, step_overhead.SIZE, 3))
    convs = ("xla", "onednn") if onednn.available() else ("xla",)
    meshes = {"single": sharding.make_mesh(devices=jax.devices()[:1]),
              "mesh": sharding.make_mesh(data=args.devices)}
    runs = {}
    for conv in convs:
        model = models.create("resnet18", step_overhead.CLASSES, stem="cifar", conv=conv,
                              width=args.width)
        for where, mesh in meshes.items():
            state, shardings = train.init_train_state(model, tx, sample, seed=0, mesh=mesh)
            step = train.make_train_step(train.linen_student(model), tx, (recipe.ce(),),
                                         mesh=mesh, state_shardings=shardings,
                                         guard_nonfinite=False)
            batch = sharding.global_batch(step_overhead.make_batch(0, args.batch), mesh)
            holder = {"state": state}

            def run(step=step, holder=holder, batch=batch):
                holder["state"], metrics = step(holder["state"], {}, batch)
                jax.block_until_ready(metrics)
            runs[f"{conv}_{where}"] = run
    times, _ = step_overhead.measure(runs, args.rounds, args.warmup)
    result = {"devices": args.devices, "batch": args.batch, "jax": jax.__version__,
              "xla_flags": os.environ["XLA_FLAGS"], "ld_preload": os.environ.get("LD_PRELOAD", ""),
              "seconds": {k: statistics.median(v) for k, v in times.items()}}
    for conv in convs:
        per_round = [m / s for m, s in zip(times[f"{conv}_mesh"], times[f"{conv}_single"])]
        result[f"mesh_over_single_{conv}"] = statistics.median(per_round)
        result.setdefault("ratio_range_over_rounds", {})[f"mesh_over_single_{conv}"] = [
            min(per_round), max(per_round)]
        print(f"{conv:7s} one device {result['seconds'][f'{conv}_single'] * 1e3:7.1f} ms   "
              f"{args.devices}-device mesh {result['seconds'][f'{conv}_mesh'] * 1e3:7.1f} ms   "
              f"mesh/single {result[f'mesh_over_single_{conv}']:.3f} "
              f"(range {min(per_round):.3f}-{max(per_round):.3f})")
    if args.json:
        step_overhead.write_json(args.json, result)
    return result


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import step_overhead as _so  # noqa: E402  (tcmalloc, as in step_overhead.py, before JAX starts)
    _so.preload_tcmalloc_or_continue("auto")
    main()
