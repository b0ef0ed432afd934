r"""Compile every program of an experiment config for a TPU slice, on any CPU, before renting it.

Usage::

    python -m experiments.compile_check \
        --config=experiments/configs/imagenet_eskd.py:teacher=resnet34,mode=eskd \
        --topology=v5p-64 [--num_slices=2] [--json=report.json] [--config.key=value ...]

``--topology``: a Cloud TPU accelerator type (``v5litepod-16``, ``v5e-16``, ``v4-32``,
``v5p-64``, ``v6e-8``, ``v2-8``) or a libtpu topology (``v5e:4x4``); ``--num_slices``: that many
slices joined over the data-centre network (the mesh's data axis spans them). Needs libtpu
(``pip install -e '.[tpu]'``, Python 3.12), which describes the slice; no TPU is used, nothing is
allocated, parameters are shapes only (``jax.eval_shape``).

It builds the programs the config's stages would run, with the config's real shapes, dtypes,
global batch sizes and mesh (``run.mesh_data`` / ``mesh_fsdp``, ``param_mode``, ``teacher_mode``,
``teacher_devices``): the teacher's training and eval steps (``teacher.source=train``), the
student's train step (from scratch, with a live teacher, or reading precomputed full / top-k
logits), its eval step, the precompute program (``teacher.precomputed``), the teacher on its own
devices (``run.teacher_devices``), FitNet's hint stage; compiles each for the slice
(:mod:`kdjax.aot`) and prints per program and per device: HBM use against the chip's, FLOPs and
bytes per call, collectives, and a roofline time (an estimate), with images/s and the wall time
of the whole config, bounded by the input pipeline where that is slower (``--input_rate`` images/s
per host; by default the rate ``benchmarks/input_pipeline.py`` measured on this project's 2-core
CPU, far below a TPU VM host's: measure yours and pass it).

Exit status 1, naming the program, the chip and the shortfall, when a program does not fit in
HBM; 2 for a bad config or topology; 0 otherwise.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for the slice, never claim a local TPU

import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import cli, validate  # noqa: E402
from experiments.datasets import Data, build_data  # noqa: E402
from experiments.errors import ConfigError  # noqa: E402
from experiments.rundir import abstract_variables, write_json  # noqa: E402
from experiments.specs import build_model  # noqa: E402
from experiments.stages import Context, Stage, fitnet_kd_stage, kd_stage, make_meshes  # noqa: E402
from experiments.teacher_io import TeacherModel, parse_views  # noqa: E402
from experiments.teachers import teacher_stage  # noqa: E402
from kdjax import aot, sharding, teachers, train  # noqa: E402
from kdjax.aot.chips import GiB  # noqa: E402
from kdjax.logit_store import store_outputs  # noqa: E402

PROG = "python -m experiments.compile_check"
#: TFDS imagenet2012 (5.x): classes and split sizes, so that nothing is read to know the shapes.
IMAGENET = {"num_classes": 1000, "train": 1_281_167, "validation": 50_000}
INPUT_PIPELINE_RESULT = (pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results"
                         / "input_pipeline_cpu.json")


@dataclasses.dataclass
class Program:
    """One jitted program of a run with its abstract arguments and how often the run calls it."""
    name: str
    stage: str
    kind: str           # 'train' | 'eval' | 'precompute' | 'teacher' (beside a train step)
    fn: Any
    args: tuple
    images: int         # global examples per call
    calls: int          # calls over the whole run
    epoch_calls: int    # calls per epoch (train: steps per epoch; eval: one pass)
    beside: str = ""    # 'teacher': the train step it runs beside, on its own devices


def abstract_data(config) -> Data:
    """The config's dataset; ImageNet as shapes only (its TFDS split sizes: nothing is read), the
    small sets as they are (generated or shipped locally)."""
    d = config.dataset
    if d.name != "imagenet2012":
        return build_data(d, config.seed)
    sizes = {d.train_split: IMAGENET.get(d.train_split), d.eval_split: IMAGENET.get(d.eval_split)}
    missing = [s for s, n in sizes.items() if n is None]
    if missing:
        raise ConfigError(f"config.dataset splits {missing}: compile_check knows imagenet2012's "
                          f"'train' and 'validation'.")
    sample = np.zeros((1, d.image_size, d.image_size, 3), np.float32)
    return Data(name=d.name, train_split=d.train_split, eval_split=d.eval_split,
                sources={s: range(n) for s, n in sizes.items()}, num_classes=IMAGENET["num_classes"],
                batch_size=d.batch_size, eval_batch_size=d.eval_batch_size, seed=config.seed,
                train_transform=None, eval_transform=None, num_threads=d.num_threads,
                prefetch=d.prefetch, preprocessing="imagenet (shapes only)", sample_input=sample)


def _abstract_teacher(config, data: Data, spec: str, label: str) -> TeacherModel:
    module = build_model(spec, data.num_classes, config.teacher.dtype, key="teacher.model")
    return TeacherModel(label=label, spec=spec, module=module,
                        variables=abstract_variables(module, data.sample_input), source="shapes")


def _batch(mesh, rows: int, data: Data, *, train: bool, extra: dict | None = None) -> dict:
    """Abstract global batch as the pipeline yields it (plus teacher keys), split over ``mesh``."""
    s = data.sample_input
    keys = {"image": ((rows,) + s.shape[1:], s.dtype), "label": ((rows,), jnp.int32),
            "id": ((rows,), jnp.int32), "mask": ((rows,), jnp.bool_)}
    if train:
        keys["epoch"] = ((rows,), jnp.int32)
    keys.update(extra or {})
    return sharding.with_shardings({k: jax.ShapeDtypeStruct(*v) for k, v in keys.items()},
                                   sharding.batch_sharding(mesh))


def _store_keys(config, rows: int, num_classes: int) -> dict:
    t = config.teacher
    dtype = jnp.dtype(t.store_dtype)
    if t.store_format == "topk":
        return {"teacher_topk_values": ((rows, t.store_k), dtype),
                "teacher_topk_indices": ((rows, t.store_k), jnp.int32)}
    return {"teacher_logits": ((rows, num_classes), dtype)}


def _eval_calls(ctx: Context, split: str) -> int:
    return math.ceil(ctx.data.num_examples(split) / ctx.data.eval_batch_size)


def stage_programs(stage: Stage, ctx: Context) -> list[Program]:
    """The programs :func:`experiments.stages.run_stage` would run for ``stage``, as ``fit`` builds
    them (:func:`kdjax.train.make_steps`), over abstract state, teacher and batches."""
    c, data = ctx.config, ctx.data
    live = stage.teacher is not None and stage.stores is None
    mesh, t_mesh = ctx.split if (ctx.split and live) else (ctx.mesh, None)
    state, state_sh = train.abstract_train_state(stage.module, stage.tx, data.sample_input,
                                                 seed=c.seed, mesh=mesh, mode=c.run.param_mode)
    b, eb = data.batch_size, data.eval_batch_size
    train_extra, eval_extra = {}, {}
    teacher_fn, t_vars, out = None, None, []
    train_calls = stage.num_epochs * data.steps_per_epoch
    evals = math.ceil(stage.num_epochs / c.run.eval_every_epochs) if stage.evaluate else 0
    eval_calls = evals * _eval_calls(ctx, data.eval_split)
    if stage.stores is not None:
        teacher_fn = teachers.precomputed()
        train_extra = _store_keys(c, b, data.num_classes)
        eval_extra = _store_keys(c, eb, data.num_classes)
    elif live and t_mesh is not None:
        forward, t_sh = teachers.logits_program(stage.teacher.live(), stage.teacher.variables,
                                                t_mesh, c.run.teacher_mode)
        out.append(Program(
            f"{stage.name}: teacher {stage.teacher.spec} on its own devices", stage.name, "teacher",
            forward, (sharding.with_shardings(stage.teacher.variables, t_sh),
                      _batch(t_mesh, b, data, train=True)), b, train_calls + eval_calls,
            data.steps_per_epoch, beside=f"{stage.name}: train step"))
        teacher_fn = teachers.precomputed()
        train_extra = {"teacher_logits": ((b, data.num_classes), jnp.float32)}
        eval_extra = {"teacher_logits": ((eb, data.num_classes), jnp.float32)}
    elif live:
        teacher_fn, t_vars = stage.teacher.live(), stage.teacher.variables
    train_step, eval_step, t_sh = train.make_steps(
        stage.module, stage.tx, stage.recipe, teacher_fn, t_vars, mesh=mesh,
        state_shardings=state_sh, teacher_mode=c.run.teacher_mode, evaluate=stage.evaluate)
    teacher_args = sharding.with_shardings({} if t_vars is None else t_vars, t_sh)
    out.append(Program(f"{stage.name}: train step", stage.name, "train", train_step,
                       (state, teacher_args, _batch(mesh, b, data, train=True, extra=train_extra)),
                       b, train_calls, data.steps_per_epoch))
    if eval_step is not None:
        out.append(Program(f"{stage.name}: eval step", stage.name, "eval", eval_step,
                           (state, teacher_args,
                            _batch(mesh, eb, data, train=False, extra=eval_extra)), eb, eval_calls,
                           _eval_calls(ctx, data.eval_split)))
    return out


def precompute_programs(ctx: Context, teacher: TeacherModel) -> list[Program]:
    """The store's precompute program (the teacher over eval batches of each split,
    :func:`kdjax.logit_store.store_outputs`), as ``experiments.teacher_io.compute_store`` runs it;
    with ``teacher.store_views`` the train split's pass covers every epoch of the range."""
    c, data = ctx.config, ctx.data
    t = c.teacher
    fn = store_outputs(teacher.live(), data.num_classes, t.store_format,
                       t.store_k if t.store_format == "topk" else None)
    t_sh = sharding.tree_shardings(teacher.variables, ctx.mesh)
    rows = sharding.batch_sharding(ctx.mesh)
    jitted = jax.jit(fn, in_shardings=(t_sh, rows),
                     out_shardings=jax.sharding.NamedSharding(ctx.mesh, jax.sharding.PartitionSpec(
                         sharding.BATCH_AXES)))
    args = (sharding.with_shardings(teacher.variables, t_sh),
            _batch(ctx.mesh, data.eval_batch_size, data, train=False))
    calls = sum(_eval_calls(ctx, s) for s in dict.fromkeys((data.train_split, data.eval_split)))
    views = parse_views(t.store_views)
    if views is not None:  # a view store: the teacher on every (epoch, id) of the train split
        from kdjax.data import view_num_batches

        calls += (view_num_batches(data.num_examples(data.train_split), views, data.eval_batch_size)
                  - _eval_calls(ctx, data.train_split))
    return [Program(f"precompute: teacher {teacher.spec} -> {t.store_format} store", "teacher_store",
                    "precompute", jitted, args, data.eval_batch_size, calls, calls)]


def programs(config, devices: Sequence, processes: int) -> list[Program]:
    """Every program the config's experiment runs, over ``devices`` of ``processes`` hosts."""
    data = abstract_data(config)
    mesh, split = make_meshes(config, devices, processes)
    ctx = Context(config=config, workdir="", data=data, mesh=mesh, split=split)
    c, out = config, []
    teacher = None
    if c.experiment == "teacher" or (c.teacher.source == "train" and (
            c.experiment == "fitnet" or c.kd.mode != "scratch")):
        out += stage_programs(teacher_stage(ctx), ctx)
    if c.experiment == "teacher":
        return out
    if c.experiment == "fitnet" or c.kd.mode != "scratch":
        teacher = _abstract_teacher(c, data, c.teacher.model, c.teacher.model)
    if c.experiment == "fitnet":
        from experiments.runs import fitnet_hint_stage, fitnet_students

        bare, student1, trained = fitnet_students(ctx)
        out += stage_programs(fitnet_hint_stage(ctx, teacher, student1, trained), ctx)
        return out + stage_programs(fitnet_kd_stage(ctx, teacher, bare, name="fitnet_stage2",
                                                    role="student"), ctx)
    stores = None
    if teacher is not None and c.teacher.precomputed:
        out += precompute_programs(ctx, teacher)
        stores = ("train store", "eval store")
    for i, spec in enumerate(c.assistants, start=1):
        stage = kd_stage(ctx, name=f"assistant{i}", role="assistant", spec=spec, teacher=teacher,
                         mode=c.kd.mode, stores=stores)
        out += stage_programs(stage, ctx)
        teacher = TeacherModel(label=spec, spec=spec, module=stage.module,
                               variables=abstract_variables(stage.module, data.sample_input),
                               source="chain")
        stores = None
    return out + stage_programs(kd_stage(ctx, name="student", role="student",
                                         spec=c.student.model, teacher=teacher, mode=c.kd.mode,
                                         stores=stores), ctx)


def default_input_rate() -> dict[str, float]:
    """Images/s per host of the ImageNet input pipeline as ``benchmarks/input_pipeline.py``
    measured it here (threaded, 2 cores): ``{'train', 'eval'}``."""
    result = json.loads(INPUT_PIPELINE_RESULT.read_text())
    rates = {r["case"]: r["images_per_s_threaded"] for r in result["results"]}
    return {"train": rates["train_normalize_on_host"], "eval": rates["eval_normalize_on_host"]}


def check(config, topology: str, num_slices: int = 1,
          input_rate: dict[str, float] | None = None,
          kinds: Sequence[str] = ("train", "eval", "precompute", "teacher")) -> dict:
    """Compiles every program of ``config`` (of the given ``kinds``) for ``num_slices`` x
    ``topology``; returns the report (JSON-ready): the slice, one row per program
    (:class:`kdjax.aot.ProgramReport` fields plus images, calls, per-call time with its bound and
    images/s), and the whole run's estimate (over the programs compiled)."""
    try:
        spec = aot.parse_slice(topology)
    except ValueError as e:
        raise ConfigError(f"--topology: {e}") from None
    devices = aot.slice_devices(spec, num_slices)
    hosts = len({d.process_index for d in devices})
    rate = dict(input_rate or default_input_rate())
    if config.dataset.name != "imagenet2012":
        rate = {}  # the small sets are in memory: no decode bound
    rows, reports = [], {}
    for program in programs(config, devices, hosts):
        if program.kind not in kinds:
            continue
        report = aot.compile_program(program.name, program.fn, *program.args, chip=spec.chip)
        reports[program.name] = report
        row = report.as_dict()
        row.update(stage=program.stage, kind=program.kind, images=program.images,
                   calls=program.calls, epoch_calls=program.epoch_calls, beside=program.beside)
        pipeline = rate.get("eval" if program.kind in ("eval", "precompute") else "train")
        input_seconds = program.images / (pipeline * hosts) if pipeline else 0.0
        row["input_seconds"] = input_seconds
        row["seconds_per_call"] = max(report.roofline_seconds, input_seconds)
        row["bound_by"] = "input" if input_seconds > report.roofline_seconds else report.bound
        rows.append(row)
    by_name = {r["name"]: r for r in rows}
    for r in rows:  # a teacher on its own devices runs beside its train step: the slower sets the pace
        if r["beside"]:
            step = by_name[r["beside"]]
            step["seconds_per_call"] = max(step["seconds_per_call"], r["seconds_per_call"])
    for r in rows:  # a program the TPU compiler refused has no cost figures
        known = not r["compiler_oom"] and r["seconds_per_call"] > 0
        r["images_per_second"] = r["images"] / r["seconds_per_call"] if known else None
        r["total_seconds"] = 0.0 if r["beside"] or not known else r["calls"] * r["seconds_per_call"]
        r["epoch_seconds"] = r["epoch_calls"] * r["seconds_per_call"] if known else None
    return {"config": config.name or config.experiment, "topology": topology,
            "libtpu_topology": spec.topology, "num_slices": num_slices, "chip": spec.chip.name,
            "chip_source": spec.chip.source, "devices": len(devices), "hosts": hosts,
            "input_rate_per_host": rate, "programs": rows,
            "total_seconds": sum(r["total_seconds"] for r in rows),
            "fits": all(r["fits"] for r in rows),
            "note": "roofline times are estimates: max(FLOPs / peak, bytes / HBM bandwidth) per "
                    "device, no collective latency or overlap; the input bound uses "
                    "input_rate_per_host x hosts"}


def collectives_text(collectives: dict) -> str:
    return ", ".join(f"{k} x{v['count']} ({v['bytes'] / 2 ** 20:.1f} MiB)"
                     for k, v in sorted(collectives.items())) or "none"


def format_report(report: dict) -> str:
    """The report as a readable markdown table with the slice, totals and any shortfall."""
    from experiments.report import markdown_table

    columns = [("name", "program"), ("images", "global batch"), ("hbm", "HBM per device"),
               ("gflops", "GFLOP / call / device"), ("ms", "roofline ms / call"),
               ("rate", "images/s (bound)"), ("hours", "run hours"), ("coll", "collectives")]
    table = []
    for r in report["programs"]:
        table.append({
            "name": r["name"], "images": r["images"],
            "hbm": f"{r['total_bytes'] / GiB:.2f} / {r['hbm_bytes'] / GiB:.0f} GiB"
                   + ("" if r["fits"] else " **does not fit**"),
            "gflops": f"{r['flops'] / 1e9:.0f}", "ms": f"{r['roofline_seconds'] * 1e3:.1f}",
            "rate": (f"{r['images_per_second']:.0f} ({r['bound_by']})"
                     if r["images_per_second"] else "-"),
            "hours": "beside step" if r["beside"] else f"{r['total_seconds'] / 3600:.2f}",
            "coll": collectives_text(r["collectives"])})
    head = (f"{report['config']} on {report['num_slices']} x {report['topology']} "
            f"({report['libtpu_topology']}, {report['devices']} devices, {report['hosts']} hosts, "
            f"chip {report['chip']}): estimated {report['total_seconds'] / 3600:.1f} h for the "
            f"whole run (estimate: {report['note']}).")
    return head + "\n\n" + markdown_table(table, columns)


def shortfalls(report: dict) -> list[str]:
    """One line per program that does not fit, naming the program, chip, need and a fix."""
    lines = []
    for r in report["programs"]:
        if not r["fits"]:
            lines.append(
                f"{r['name']} needs {r['total_bytes'] / GiB:.2f} GiB of {r['hbm_bytes'] / GiB:.0f} "
                f"GiB HBM per device on {report['chip']} (temporaries {r['temp_bytes'] / GiB:.2f} "
                f"GiB{'; the TPU compiler refused it' if r['compiler_oom'] else ''}); try "
                f"run.param_mode=fsdp / run.teacher_mode=fsdp with run.mesh_fsdp > 1, or a "
                f"smaller dataset.batch_size.")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; ``argv`` excludes the program name. Returns the exit status."""
    args = cli.parse_command_line(
        sys.argv[1:] if argv is None else argv, prog=PROG, doc=__doc__, needs_workdir=False,
        extra_flags=(("topology", "", "TPU slice: accelerator type (v5p-64) or libtpu "
                      "topology (v5e:4x4)"),
                     ("num_slices", 1, "slices joined over the data-centre network"),
                     ("json", "", "write the report as JSON to this path"),
                     ("input_rate", "", "input pipeline images/s per host, 'train,eval' (default: "
                      "benchmarks/results/input_pipeline_cpu.json)")))
    flags = args.flags
    if not flags["topology"]:
        raise ConfigError(f"{PROG}: --topology is required (e.g. --topology=v5e-16).")
    validate.validate_config(args.config, args.config.experiment, files=False)  # no weights read
    rate = None
    if flags["input_rate"]:
        try:
            train_rate, eval_rate = (float(v) for v in flags["input_rate"].split(","))
        except ValueError:
            raise ConfigError(f"--input_rate={flags['input_rate']!r}: give 'TRAIN,EVAL' images/s "
                              f"per host, e.g. --input_rate=3000,4000.") from None
        rate = {"train": train_rate, "eval": eval_rate}
    report = check(args.config, flags["topology"], flags["num_slices"], rate)
    print(format_report(report))
    if flags["json"]:
        write_json(os.path.abspath(flags["json"]), report)
    problems = shortfalls(report)
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    cli.run_main(main)
