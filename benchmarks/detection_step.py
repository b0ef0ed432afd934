"""Where the detection experiment's train step spends its time: a fixed cost per step against a
cost per image (issue 18).

The step is the CPU grid's (``experiments/configs/detection_digits.py``: 64 px canvases, the RPN,
proposals by score + NMS, RoIAlign and the box head), built by the experiment's own
:func:`experiments.detection_kd.runs.programs`, for the ``tiny`` student from scratch and distilled
from the ``large`` teacher with every part of Chen et al.'s recipe. It is timed, on one device, at
several batch sizes (median of ``--steps`` steps after a warm-up, in rotating rounds), and a least-
squares line ``ms = fixed + per_image * batch`` is fitted per arm. FLOPs per step come from XLA's
cost analysis, so the fraction of the CPU's f32 peak is printed too::

    python benchmarks/detection_step.py [--batches 1,2,4,8] [--steps 20] [--rounds 3] \
        [--measure-peak] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_overhead import cpu_description, flops_of, measured_matmul_peak  # noqa: E402

from experiments.configs import detection_digits  # noqa: E402
from experiments.detection_kd import runs  # noqa: E402

ARMS = {"scratch": (None, ()), "kd_large": ("large", None)}


def make_arm(config, arm: str, batch_sizes):
    """``{batch: zero-arg callable running one step}`` and ``{batch: FLOPs}`` of one arm."""
    from kdjax import sharding
    from kdjax.data.detection_digits import keep_record
    from kdjax.detection import distill
    from kdjax.detection import train as det_train

    teacher, parts = ARMS[arm]
    parts = distill.PARTS if parts is None else parts
    prog = runs.programs(json.dumps(config.to_dict()), "tiny", teacher, tuple(parts),
                         int(config.train.steps))
    arrays = runs.dataset(config)["train"]
    t_vars = {}
    if teacher is not None:
        t_module = runs.detector(config, teacher)
        side = 2 * t_module.stride
        t_vars = jax.device_put(
            {"params": t_module.init(jax.random.key(1), np.zeros((1, side, side, 3),
                                                                np.float32))["params"]},
            prog.teacher_shardings)
    calls, flops = {}, {}
    for b in batch_sizes:
        rows = [keep_record({k: v[i] for k, v in arrays.items()}, None) for i in range(b)]
        batch = sharding.global_batch({k: np.stack([r[k] for r in rows])
                                       for k in det_train.BATCH_KEYS}, prog.mesh)
        state = [det_train.init_detection_state(prog.student, prog.tx, seed=0, mesh=prog.mesh,
                                                adapter=prog.adapter)[0]]
        flops[b] = flops_of(prog.train_step, state[0], t_vars, batch)

        def call(state=state, batch=batch):
            state[0], metrics = prog.train_step(state[0], t_vars, batch)
            return metrics

        calls[b] = call
    return calls, flops


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--measure-peak", type=int, nargs="?", const=8192, metavar="N")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    batch_sizes = [int(b) for b in args.batches.split(",")]
    config = detection_digits.get_config()
    config.unlock()
    config.data.num_train = max(batch_sizes)
    arms = {arm: make_arm(config, arm, batch_sizes) for arm in ARMS}
    for calls, _ in arms.values():  # compile and warm up
        for call in calls.values():
            jax.block_until_ready(call())
    times = {arm: {b: [] for b in batch_sizes} for arm in ARMS}
    for r in range(args.rounds):
        order = [(arm, b) for arm in ARMS for b in batch_sizes]
        for arm, b in order[r % len(order):] + order[:r % len(order)]:
            call = arms[arm][0][b]
            t0 = time.perf_counter()
            for _ in range(args.steps):
                out = call()
            jax.block_until_ready(out)
            times[arm][b].append(1e3 * (time.perf_counter() - t0) / args.steps)
    peak = measured_matmul_peak(np.float32, args.measure_peak) if args.measure_peak else 333e9
    print(f"CPU: {cpu_description()['model']}; jax {jax.__version__}; peak "
          f"{peak / 1e9:.0f} GFLOP/s ({'measured' if args.measure_peak else 'nominal'})")
    result = {"cpu": cpu_description(), "jax": jax.__version__, "peak_gflops": peak / 1e9,
              "steps": args.steps, "rounds": args.rounds, "arms": {}}
    for arm in ARMS:
        ms = {b: statistics.median(times[arm][b]) for b in batch_sizes}
        per_image, fixed = np.polyfit(batch_sizes, [ms[b] for b in batch_sizes], 1)
        gflops = {b: arms[arm][1][b] / 1e9 for b in batch_sizes}
        frac = {b: gflops[b] / (ms[b] / 1e3) / (peak / 1e9) for b in batch_sizes}
        print(f"{arm}: " + ", ".join(f"batch {b}: {ms[b]:.1f} ms ({100 * frac[b]:.1f}% of peak)"
                                     for b in batch_sizes)
              + f"; fit: {fixed:.1f} ms fixed + {per_image:.1f} ms per image")
        result["arms"][arm] = {"ms": ms, "gflops": gflops, "fraction_of_peak": frac,
                               "fixed_ms": float(fixed), "per_image_ms": float(per_image)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
