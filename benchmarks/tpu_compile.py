r"""Compile kdjax's ImageNet programs for real TPU slices on this CPU and tabulate what they cost.

    python benchmarks/tpu_compile.py --json benchmarks/results/tpu_compile.json \
        --markdown benchmarks/results/tpu_compile.md [--sections grid,fsdp,slices,batch,colab]

Needs libtpu (``pip install -e '.[tpu]'``, Python 3.12). Every figure comes from
``jax.jit(...).lower(...).compile()`` for the slice (:mod:`experiments.compile_check`,
:mod:`kdjax.aot`); times are roofline **estimates**. Sections:

* ``grid``: the ESKD grid (ResNet-18 student; scratch; ESKD from live ResNet-18 / 34 / 50
  teachers; ESKD from a precomputed ResNet-50 store) and FitNet's two stages at the configs' batch
  sizes on v5e-16, v4-32 and v5p-64. float32: every program (train, eval, precompute); bfloat16
  compute (``student.dtype`` / ``teacher.dtype``): the train steps of scratch, R50 ESKD (live
  and precomputed) and FitNet (section ``grid_bf16``; ``grid`` compiles every cell in both). Full KD compiles to the
  ESKD program but for its constant KD weight (one scalar), so the ESKD rows stand for both.
* ``fsdp``: the R50 -> R18 live-KD step on v5e-16, data-parallel (16 x 1) against ``fsdp=4``
  (``param_mode`` / ``teacher_mode`` = fsdp): per-device bytes of the state and the teacher
  against ``1/N`` of replicated (+5%), and the collectives of both.
* ``slices``: the same step data-parallel on 1 x v5e-16 (global batch 256) and 2 x v5e-16 (512,
  the data axis across the slices): the collectives per device.
* ``batch``: the largest global batch per chip kind for the R50 -> R18 live-KD step in float32
  on one host (v5e-4, v4-8, v5p-8, v6e-4), bracketed by compiling (:func:`largest_batch`).
* ``colab``: the Colab demo's programs (notebooks/kdjax_demo.ipynb: MNIST-1D cnn1d teacher, scratch,
  KD and ESKD steps, AdamW, batch 128) on the TPU runtimes Colab offers: v5e-1, v6e-1, v2-8.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from experiments import compile_check  # noqa: E402
from experiments.configs import imagenet_eskd, imagenet_fitnet  # noqa: E402
from kdjax import aot, models, recipe, schedules, sharding, teachers, train  # noqa: E402
from kdjax.aot.chips import GiB  # noqa: E402

GRID_TOPOLOGIES = ("v5e-16", "v4-32", "v5p-64")
_SINK: list = []  # a JSONL path: every row is appended as soon as it is compiled (--partial)


def _emit(rows: list[dict]) -> list[dict]:
    if _SINK:
        with open(_SINK[0], "a") as f:
            for row in rows:
                f.write(json.dumps(row, default=str) + "\n")
    return rows
ESKD_CELLS = (("scratch", "teacher=none"), ("R18 ESKD", "teacher=resnet18,mode=eskd"),
              ("R34 ESKD", "teacher=resnet34,mode=eskd"), ("R50 ESKD", "teacher=resnet50,mode=eskd"),
              ("R50 ESKD precomputed", "teacher=resnet50,mode=eskd,precomputed"))
KD_CELL = "teacher=resnet50,mode=eskd"
BATCH_SLICES = ("v5e-4", "v4-8", "v5p-8", "v6e-4")
COLAB_SLICES = ("v5e-1", "v6e-1", "v2-8")


def _config(module, arg: str, **overrides):
    c = module.get_config(arg)
    for key, value in overrides.items():
        node = c
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return c


def _dtype(dtype: str) -> dict:
    return {"student.dtype": dtype, "teacher.dtype": dtype}


def grid(dtypes=("float32", "bfloat16"), eskd_cells=ESKD_CELLS) -> list[dict]:
    rows = []
    for dtype in dtypes:
        kinds = ("train", "eval", "precompute") if dtype == "float32" else ("train",)
        for topology in GRID_TOPOLOGIES:
            cells = [(label, imagenet_eskd, arg) for label, arg in eskd_cells]
            cells.append(("FitNet R50 -> R101/2", imagenet_fitnet, ""))
            for label, module, arg in cells:
                report = compile_check.check(_config(module, arg, **_dtype(dtype)), topology,
                                             kinds=kinds)
                rows += _emit([dict(section="grid", topology=topology, dtype=dtype, cell=label,
                                    devices=report["devices"], hosts=report["hosts"], **p)
                               for p in report["programs"]])
                print(f"grid {topology} {dtype} {label}: "
                      f"{report['total_seconds'] / 3600:.1f} h", flush=True)
    return rows


def _kd_step(topology: str, num_slices: int = 1, **overrides) -> dict:
    report = compile_check.check(_config(imagenet_eskd, KD_CELL, **overrides), topology,
                                 num_slices, kinds=("train",))
    (row,) = report["programs"]
    return dict(topology=topology, num_slices=num_slices, devices=report["devices"],
                overrides=overrides, **row)


def fsdp() -> list[dict]:
    dp = _kd_step("v5e-16")
    sharded = _kd_step("v5e-16", **{"run.mesh_fsdp": 4, "run.param_mode": "fsdp",
                                    "run.teacher_mode": "fsdp"})
    out = []
    for name, row in (("data-parallel 16x1", dp), ("fsdp 4x4", sharded)):
        out.append(dict(section="fsdp", variant=name, **row))
    n = 4
    for arg, what in ((0, "student state"), (1, "teacher")):
        bound = dp["input_bytes"][arg] / n * 1.05
        out.append(dict(section="fsdp_check", what=what, fsdp=n,
                        replicated_bytes=dp["input_bytes"][arg],
                        fsdp_bytes=sharded["input_bytes"][arg], bound_bytes=bound,
                        ratio=sharded["input_bytes"][arg] / dp["input_bytes"][arg],
                        within=sharded["input_bytes"][arg] <= bound))
    return out


def slices() -> list[dict]:
    one = _kd_step("v5e-16")
    two = _kd_step("v5e-16", 2, **{"dataset.batch_size": 512})
    return [dict(section="slices", variant="1 x v5e-16, batch 256", **one),
            dict(section="slices", variant="2 x v5e-16, batch 512", **two)]


def largest_batch() -> list[dict]:
    """HBM use is not linear in the batch (the TPU compiler trades memory for recomputation), so
    the largest batch is bracketed by compiling: 128 per device, then the size a proportional
    model predicts, then geometric bisection until the bracket is within 15% (or 6 compiles)."""
    out = []
    for topology in BATCH_SLICES:
        spec = aot.parse_slice(topology)
        n = spec.num_devices
        tried = {}

        def fits(per_device: int) -> bool:
            if per_device not in tried:
                tried[per_device] = _kd_step(topology, **{"dataset.batch_size": per_device * n,
                                                          "dataset.eval_batch_size": per_device * n})
            return tried[per_device]["fits"]

        lo, hi = (128, None) if fits(128) else (0, 128)
        if hi is None:
            guess = max(136, int(128 * spec.chip.hbm_bytes / tried[128]["total_bytes"]) // 8 * 8)
            lo, hi = (guess, None) if fits(guess) else (lo, guess)
            if hi is None:  # the prediction fits: try twice as much (None: it fits too)
                lo, hi = (2 * lo, None) if fits(2 * lo) else (lo, 2 * lo)
        while hi is not None and lo and hi / lo > 1.15 and len(tried) < 6:
            mid = int((lo * hi) ** 0.5) // 8 * 8
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        out += _emit([dict(section="batch", topology=topology, chip=spec.chip.name, devices=n,
                           hbm_bytes=spec.chip.hbm_bytes, largest_per_device=lo or None,
                           first_failing_per_device=hi,
                           largest_global=lo * n if lo else None,
                           bytes_at_largest=tried[lo]["total_bytes"] if lo else None,
                           compiled={k: dict(total_bytes=v["total_bytes"], fits=v["fits"],
                                             compiler_oom=bool(v["compiler_oom"]))
                                     for k, v in sorted(tried.items())})])
        print(f"batch {topology}: fits {lo}, fails {hi} per device", flush=True)
    return out


def colab() -> list[dict]:
    """The demo's four programs, built as the notebook's ``loop.fit`` calls build them."""
    steps = 1500
    tx = optax.adamw(optax.cosine_decay_schedule(3e-3, steps), weight_decay=1e-4)
    teacher_model = models.create("cnn1d", 10, width=128)
    student_model = models.create("cnn1d", 10, width=32)
    sample = np.zeros((128, 40, 1), np.float32)
    kd = (recipe.ce(0.5), recipe.kd(temperature=4.0, weight=0.5))
    eskd = (recipe.ce(0.5), recipe.kd(temperature=4.0,
                                      weight=schedules.eskd(0.5, stop_step=2 * steps // 3)))
    out = []
    for topology in COLAB_SLICES:
        spec = aot.parse_slice(topology)
        mesh = sharding.make_mesh(devices=aot.slice_devices(spec))
        t_vars = jax.eval_shape(lambda: teacher_model.init(jax.random.key(0), sample))
        runs = (("teacher", teacher_model, (recipe.ce(),), None, None),
                ("scratch", student_model, (recipe.ce(),), None, None),
                ("kd", student_model, kd, teachers.from_linen(teacher_model), t_vars),
                ("eskd", student_model, eskd, teachers.from_linen(teacher_model), t_vars))
        for name, module, terms, teacher, variables in runs:
            state, state_sh = train.abstract_train_state(module, tx, sample, seed=0, mesh=mesh)
            step, _, t_sh = train.make_steps(module, tx, terms, teacher, variables, mesh=mesh,
                                             state_shardings=state_sh, evaluate=False)
            batch = sharding.with_shardings(
                {"image": jax.ShapeDtypeStruct((128, 40, 1), jnp.float32),
                 "label": jax.ShapeDtypeStruct((128,), jnp.int32),
                 "id": jax.ShapeDtypeStruct((128,), jnp.int32),
                 "epoch": jax.ShapeDtypeStruct((128,), jnp.int32),
                 "mask": jax.ShapeDtypeStruct((128,), jnp.bool_)}, sharding.batch_sharding(mesh))
            report = aot.compile_program(f"demo {name} step", step, state,
                                         sharding.with_shardings(variables or {}, t_sh), batch,
                                         chip=spec.chip)
            out.append(dict(section="colab", topology=topology, program=name, **report.as_dict()))
        print(f"colab {topology}: compiled", flush=True)
    return out


SECTIONS = {"grid": grid, "grid_f32": lambda: grid(("float32",)),
            # bfloat16: the grid's ends (scratch and the largest teacher, live and stored), as
            # compiling it whole took too long on this 2-core CPU for one session
            "grid_bf16": lambda: grid(("bfloat16",), (ESKD_CELLS[0],) + ESKD_CELLS[3:]),
            "fsdp": fsdp, "slices": slices,
            "batch": largest_batch, "colab": colab}


def _gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def markdown(rows: list[dict]) -> str:
    """The tables README shows, from the rows of :data:`SECTIONS`."""
    from experiments.report import markdown_table

    parts = []
    grid_rows = [r for r in rows if r["section"] == "grid"]
    for dtype in ("float32", "bfloat16"):
        cells: dict = {}
        for r in grid_rows:
            if r["dtype"] != dtype:
                continue
            row = cells.setdefault((r["cell"], r["name"]), {
                "cell": r["cell"], "name": r["name"], "images": r["images"],
                "gflop": f"{r['flops'] / 1e9:.0f}"})
            fit = "" if r["fits"] else " **no**"
            per = (f"{r['epoch_calls'] * r['roofline_seconds'] / 60:.1f} min/epoch"
                   if r["kind"] == "train" else
                   f"{r['calls'] * r['roofline_seconds'] / 60:.1f} min/run") if r["fits"] else "-"
            row[r["topology"]] = (f"{_gib(r['total_bytes'])} GiB{fit}, "
                                  f"{r['roofline_seconds'] * 1e3:.1f} ms, {per}")
        if cells:
            parts.append(f"**{dtype}** (per device: HBM use, roofline time per call, and its "
                         f"roofline time per epoch for train steps, per run for eval and precompute; "
                         f"GFLOP per call on {GRID_TOPOLOGIES[0]})")
            parts.append(markdown_table(list(cells.values()), [
                ("cell", "cell"), ("name", "program"), ("images", "global batch"),
                ("gflop", "GFLOP / device")] + [(t, t) for t in GRID_TOPOLOGIES]))
    if grid_rows:
        totals: dict = {}
        for r in grid_rows:
            t = totals.setdefault((r["dtype"], r["topology"]), [0.0, 0.0, 0])
            t[0] += r["calls"] * r["roofline_seconds"]
            t[1] += r["total_seconds"]
            t[2] += not r["fits"]
        rate = compile_check.default_input_rate()["train"]
        parts.append(markdown_table(
            [{"d": d, "t": t, "c": f"{c / 3600:.1f}", "i": f"{i / 3600:.1f}", "n": n,
              "what": "train, eval, precompute" if d == "float32" else "train steps"}
             for (d, t), (c, i, n) in totals.items()],
            [("d", "compute"), ("t", "slice"), ("c", "hours, roofline only"),
             ("i", f"hours, input-bound at this CPU's rate ({rate:.0f} img/s/host)"),
             ("n", "programs that do not fit"), ("what", "programs summed")]))
    fs = [r for r in rows if r["section"] == "fsdp_check"]
    if fs:
        parts.append(markdown_table([dict(r, rep=_gib(r["replicated_bytes"]), fs=_gib(r["fsdp_bytes"]),
                                          bound=_gib(r["bound_bytes"]), ratio=f"{r['ratio']:.3f}")
                                     for r in fs],
                                    [("what", "per device"), ("rep", "replicated GiB"),
                                     ("fs", f"fsdp={fs[0]['fsdp']} GiB"), ("ratio", "ratio"),
                                     ("bound", "bound 1/N + 5% GiB"), ("within", "within")]))
    coll = [r for r in rows if r["section"] in ("fsdp", "slices")]
    if coll:
        parts.append(markdown_table(
            [dict(r, hbm=_gib(r["total_bytes"]), coll=compile_check.collectives_text(r["collectives"]),
                  ms=f"{r['roofline_seconds'] * 1e3:.1f}") for r in coll],
            [("variant", "R50 -> R18 live-KD step"), ("hbm", "GiB / device"), ("ms", "roofline ms"),
             ("coll", "collectives per device per step")]))
    lb = [r for r in rows if r["section"] == "batch"]
    if lb:
        parts.append(markdown_table(
            [dict(r, hbm=_gib(r["hbm_bytes"]),
                  used="-" if r["bytes_at_largest"] is None else _gib(r["bytes_at_largest"]),
                  tried=", ".join(f"{k}{'' if v['fits'] else ' (no)'}"
                                  for k, v in r["compiled"].items())) for r in lb],
            [("topology", "slice"), ("hbm", "HBM GiB / device"),
             ("largest_per_device", "largest that fits / device"), ("used", "its GiB / device"),
             ("first_failing_per_device", "smallest that does not"),
             ("largest_global", "largest global batch"), ("tried", "per-device batches compiled")]))
    co = [r for r in rows if r["section"] == "colab"]
    if co:
        parts.append(markdown_table(
            [dict(r, mib=f"{r['total_bytes'] / 2 ** 20:.1f}") for r in co],
            [("topology", "Colab TPU"), ("program", "demo step"), ("mib", "MiB / device"),
             ("fits", "fits")]))
    return "\n\n".join(parts) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--json", default="")
    parser.add_argument("--markdown", default="")
    parser.add_argument("--load", default="", help="comma-separated JSON (or --partial JSONL) "
                        "files of earlier runs: tabulate their rows instead of compiling")
    parser.add_argument("--partial", default="", help="append each row to this JSONL file as "
                        "soon as it is compiled")
    args = parser.parse_args(argv)
    if args.partial:
        _SINK.append(args.partial)
    start = time.time()
    rows = []
    for path in filter(None, args.load.split(",")):
        text = Path(path).read_text()
        rows += ([json.loads(line) for line in text.splitlines() if line.strip()]
                 if path.endswith(".jsonl") else json.loads(text)["rows"])
    for name in ([] if args.load else args.sections.split(",")):
        rows += SECTIONS[name]()
    out = {"jax": jax.__version__, "sections": args.sections, "seconds": time.time() - start,
           "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    text = markdown(rows)
    if args.markdown:
        Path(args.markdown).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
