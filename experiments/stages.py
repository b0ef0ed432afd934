"""Stages: one :func:`kdjax.loop.fit` run each, the building blocks of every experiment.

An experiment is a list of *stages*; each stage is one ``loop.fit`` run with its own directory
``<workdir>/stages/<name>/`` (``checkpoints/``, ``metrics.jsonl``, ``tb/``), and leaves

* ``final/`` - the trained variables (``variables/``, an orbax checkpoint of
  ``{'params', 'batch_stats'}``) and ``meta.json`` (model spec, epoch, step, last eval);
* ``epochs/epoch_<E>/`` - the same, at the end of epoch ``E`` for every requested epoch (the
  early-epoch teacher of ESKD's second reading, ``run.save_epochs``);
* ``summary.json`` - the stage's result row, written last: a stage with it is complete and is
  skipped when the run is started again (the next stage resumes from its own checkpoints).

Besides :func:`run_stage`, the run's shared pieces (:class:`Context`, :func:`make_context`, the
optimizer of a stage :func:`stage_tx`, the run's outcome :func:`run_outcome`) and the stage builders
of the students live here: KD (:func:`kd_stage`) and FitNet's annealed KD (:func:`fitnet_kd_stage`).
The teacher's stage and where the teacher comes from are in :mod:`experiments.teachers`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import optax

from experiments.console import log
from experiments.datasets import Data, build_data
from experiments.errors import ConfigError
from experiments.recipes import kd_recipe, learning_rate_schedule, make_optimizer, reading_label
from experiments.rundir import (CONFIG_CHANGES_FILE, CONFIG_FILE, EPOCHS_DIR, FINAL_DIR,
                                META_FILE, RESULTS_FILE, STAGES_DIR, SUMMARY_FILE,
                                abstract_variables, flatten_record, load_variables, read_json,
                                save_variables, write_json)
from experiments.specs import build_model
from experiments.teacher_io import TeacherModel
from kdjax import recipe as recipe_lib, schedules, sharding, teachers


@dataclasses.dataclass
class Context:
    """What every stage of a run shares: config, workdir, data, mesh (all devices), and with
    ``run.teacher_devices`` the ``(student mesh, teacher mesh)`` split that stages distilling from
    a live teacher use (None: the teacher runs inside the step)."""
    config: ml_collections.ConfigDict
    workdir: str
    data: Data
    mesh: Any
    split: Any = None

    def stage_dir(self, name: str) -> str:
        return os.path.join(self.workdir, STAGES_DIR, name)


def make_context(config: ml_collections.ConfigDict, workdir: str) -> Context:
    """Opens the data, builds the mesh, checks the batch sizes and records the config."""
    workdir = os.path.abspath(workdir)
    data = build_data(config.dataset, config.seed)
    mesh, split = make_meshes(config, jax.devices(), jax.process_count())
    record_config(config, workdir)
    return Context(config=config, workdir=workdir, data=data, mesh=mesh, split=split)


def make_meshes(config: ml_collections.ConfigDict, devices: Sequence, processes: int) -> tuple:
    """``(mesh, split)`` of a run over ``devices`` of ``processes`` hosts (see :class:`Context`),
    after checking that both batch sizes divide over every mesh and the hosts (ConfigError)."""
    k, every = config.run.teacher_devices, list(devices)
    mesh = _mesh(config, every, "")
    meshes = [mesh]
    split = None
    if k:
        if k >= len(every):
            raise ConfigError(f"config.run.teacher_devices={k} leaves none of the {len(every)} "
                              f"devices to the student; use fewer (0: the teacher runs inside the "
                              f"step).")
        where = f" (run.teacher_devices={k} of the {len(every)} run the teacher)"
        teacher_fsdp = k if config.run.teacher_mode == "fsdp" else 1
        split = (_mesh(config, every[:len(every) - k], where),
                 sharding.make_mesh(data=k // teacher_fsdp, fsdp=teacher_fsdp,
                                    devices=every[len(every) - k:]))
        meshes += list(split)
    for key in ("batch_size", "eval_batch_size"):
        value = config.dataset[key]
        for m in meshes:
            if value % m.devices.size or value % processes:
                raise ConfigError(
                    f"config.dataset.{key}={value} must be a multiple of the {m.devices.size} "
                    f"devices of each mesh{where if k else ''} (and of the "
                    f"{processes} processes).")
    return mesh, split


def _mesh(config: ml_collections.ConfigDict, devices: list, where: str):
    try:
        return sharding.make_mesh(data=config.run.mesh_data, fsdp=config.run.mesh_fsdp,
                                  devices=devices)
    except ValueError as e:
        raise ConfigError(f"config.run.mesh_data / mesh_fsdp: {e}{where}") from None


#: Keys a resumed run may change: where the data and stores live, how the run is spread over
#: devices, reported and checkpointed. Every other key shapes the results.
RESUMABLE_KEYS = ("name", "paper.", "dataset.data_dir", "dataset.num_threads", "dataset.prefetch",
                  "teacher.store", "run.eval_every_epochs", "run.checkpoint_every_epochs",
                  "run.log_every_steps", "run.keep", "run.progress", "run.mesh_data",
                  "run.mesh_fsdp", "run.param_mode", "run.teacher_mode", "run.teacher_devices",
                  "run.allow_config_change")


def record_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes ``config.json`` on the first start and keeps it: it is the config the run was
    started with. A resume whose config differs appends the differences to
    ``config_changes.jsonl``; it is refused (ConfigError) when a key outside
    :data:`RESUMABLE_KEYS` changed, unless ``run.allow_config_change``: a half-trained stage
    would go on under other settings than the ones its results are reported with."""
    path = os.path.join(workdir, CONFIG_FILE)
    resolved = json.loads(config.to_json_best_effort())
    if not os.path.exists(path):
        write_json(path, resolved)
        return
    before, now = flatten_record(read_json(path)), flatten_record(resolved)
    # A key added to the schema after the run started (absent from its config.json) is no change
    # while it holds its default: the run was started with the default's behaviour.
    from experiments.configs.base import kd_config

    defaults = flatten_record(json.loads(kd_config().to_json_best_effort()))
    changed = {k: [before.get(k), now.get(k)] for k in sorted(set(before) | set(now))
               if before.get(k) != now.get(k)
               and not (k not in before and k in defaults and now.get(k) == defaults[k])}
    if not changed:
        return
    shaping = [k for k in changed if not k.startswith(RESUMABLE_KEYS)]
    listing = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items() if k in shaping)
    if shaping and not config.run.allow_config_change:
        raise ConfigError(
            f"{workdir} was started with another config ({listing}); a resumed run would mix the "
            f"two, and its results would be reported under the new one. Use a new --workdir, or "
            f"pass --config.run.allow_config_change=True to resume anyway (the changes are then "
            f"logged in {CONFIG_CHANGES_FILE}).")
    if shaping:
        log(f"WARNING: resuming {workdir} with changed keys that shape the results ({listing}); "
            f"completed stages are not rerun.")
    if jax.process_index() != 0:
        return
    with open(os.path.join(workdir, CONFIG_CHANGES_FILE), "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changed": changed})
                + "\n")


@dataclasses.dataclass
class Stage:
    """One ``loop.fit`` run of a model (see the module docstring for the directory it writes).

    ``export_epochs``: epochs whose variables are kept under ``epochs/epoch_<E>/``.
    ``row``: fields copied into the stage's summary (teacher label, KD mode, reading, paper numbers).
    """
    name: str
    role: str
    model: str
    module: Any
    recipe: tuple
    tx: optax.GradientTransformation
    num_epochs: int
    teacher: TeacherModel | None = None
    stores: tuple | None = None
    init_params: Mapping[str, Any] | None = None
    export_epochs: tuple[int, ...] = ()
    evaluate: bool = True
    row: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class StageOutcome:
    """A finished (``summary`` set) or preempted (``stopped_early``) stage."""
    name: str
    directory: str
    summary: dict | None
    stopped_early: bool

    def variables(self, module, sample_input, epoch: int | None = None) -> dict:
        """The stage's final (or epoch ``epoch``) variables, read back from its export."""
        sub = FINAL_DIR if epoch is None else os.path.join(EPOCHS_DIR, f"epoch_{epoch}")
        return load_variables(os.path.join(self.directory, sub),
                              abstract_variables(module, sample_input))


def _state_variables(state) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}


def run_stage(stage: Stage, ctx: Context) -> StageOutcome:
    """Runs (or resumes, or skips if complete) one stage; exports its variables and summary.

    With ``export_epochs`` the stage is trained in segments (``fit`` to the end of each listed
    epoch, export, then on: ``fit`` resumes from its own checkpoint), so the snapshot is exactly
    the state after that epoch.
    """
    from kdjax import loop

    c, data = ctx.config, ctx.data
    directory = ctx.stage_dir(stage.name)
    summary_path = os.path.join(directory, SUMMARY_FILE)
    if os.path.exists(summary_path):
        log(f"[{stage.name}] complete, skipped (delete {directory} to rerun it).")
        return StageOutcome(stage.name, directory, read_json(summary_path), False)
    spe = data.steps_per_epoch
    num_steps = stage.num_epochs * spe
    teacher_fn, teacher_vars, train_store, eval_store = None, None, None, None
    evaluate = stage.evaluate
    if stage.stores is not None:  # the train split's store, the eval split's
        teacher_fn, train_store = teachers.precomputed(), stage.stores[0]
        eval_store = stage.stores[1] if evaluate else None
    elif stage.teacher is not None:
        teacher_fn, teacher_vars = stage.teacher.live(), stage.teacher.variables
    # A live teacher on its own devices (run.teacher_devices) beside the student's; else all.
    mesh, teacher_mesh = (ctx.split if ctx.split and teacher_vars is not None
                          else (ctx.mesh, None))
    kwargs = dict(
        workdir=directory, student=stage.module, tx=stage.tx, recipe=stage.recipe,
        teacher=teacher_fn, teacher_variables=teacher_vars, train_store=train_store,
        eval_store=eval_store, eval_iter_fn=data.eval_iter if evaluate else None,
        sample_input=data.sample_input, seed=c.seed, mesh=mesh, teacher_mesh=teacher_mesh,
        param_mode=c.run.param_mode, teacher_mode=c.run.teacher_mode,
        init_params=stage.init_params, options=loop.FitOptions(
            eval_every=c.run.eval_every_epochs * spe if evaluate else 0,
            checkpoint_every=c.run.checkpoint_every_epochs * spe,
            log_every=c.run.log_every_steps, keep=c.run.keep,
            best_metric=(c.run.best_metric if evaluate and (
                teacher_fn is not None or c.run.best_metric in ("accuracy", "ce")) else None),
            nonfinite=c.run.nonfinite, progress=c.run.progress, name=stage.name))
    epochs = sorted({e for e in stage.export_epochs if 0 < e < stage.num_epochs})
    log(f"[{stage.name}] {stage.model}: {stage.num_epochs} epochs x {spe} steps"
        + (f", teacher {stage.teacher.label}" if stage.teacher is not None else "")
        + (" (precomputed logits)" if stage.stores is not None else "")
        + (f", keeping epochs {epochs}" if epochs else ""))
    result = None
    for end_epoch in epochs + [stage.num_epochs]:
        export = (os.path.join(directory, FINAL_DIR) if end_epoch == stage.num_epochs
                  else os.path.join(directory, EPOCHS_DIR, f"epoch_{end_epoch}"))
        if end_epoch != stage.num_epochs and os.path.exists(os.path.join(export, META_FILE)):
            continue
        end = end_epoch * spe
        result = loop.fit(num_steps=end, train_iter=data.train_iter(), **kwargs)
        # The next segment continues this process's own run: no "resuming" line for it.
        kwargs["options"] = dataclasses.replace(kwargs["options"], announce_resume=False)
        if result.stopped_early:
            log(f"[{stage.name}] preempted: checkpoint written; start the same command again to "
                f"resume.")
            return StageOutcome(stage.name, directory, None, True)
        step = int(jax.device_get(result.state.step))
        if step != end:
            raise RuntimeError(f"[{stage.name}] the checkpoint in {directory} is at step {step}, past "
                               f"the end of epoch {end_epoch} (step {end}), so that epoch cannot be "
                               f"exported; delete {directory} to retrain the stage.")
        last_eval = result.eval_history[-1] if result.eval_history else None
        save_variables(export, _state_variables(result.state),
                       {"model": stage.model, "epoch": end_epoch, "step": end, "eval": last_eval,
                        "stage": stage.name, "role": stage.role})
    summary = dict(stage.row)
    summary.update(
        stage=stage.name, role=stage.role, model=stage.model, epochs=stage.num_epochs,
        steps=num_steps, steps_per_epoch=spe,
        final=result.eval_history[-1] if result.eval_history else None,
        final_train=result.history[-1] if result.history else None,
        best=result.best, skipped_steps=result.skipped_steps,
        exported_epochs=epochs)
    write_json(summary_path, summary)
    return StageOutcome(stage.name, directory, summary, False)


@dataclasses.dataclass
class RunOutcome:
    """What an experiment function returns: the completed stages' summaries in order, and
    whether a preemption stopped it (then ``summaries`` holds only the stages finished so far)."""
    workdir: str
    summaries: list[dict]
    stopped_early: bool


def stage_tx(config, data: Data, num_epochs: int, trainable=None, kind: str | None = None,
             lr: float | None = None) -> optax.GradientTransformation:
    """``config.optimizer`` over a stage of ``num_epochs`` (:func:`make_optimizer` with
    :func:`learning_rate_schedule`); ``trainable``, ``kind`` and ``lr`` override the module filter,
    the schedule kind and the base learning rate (FitNet's stage 1)."""
    opt = config.optimizer
    if lr is not None:
        opt = ml_collections.ConfigDict(opt.to_dict())
        opt.lr = float(lr)
    schedule = learning_rate_schedule(opt, steps_per_epoch=data.steps_per_epoch,
                                      num_epochs=num_epochs, batch_size=data.batch_size, kind=kind)
    return make_optimizer(opt, schedule, trainable)


def kd_stage(ctx: Context, *, name: str, role: str, spec: str, teacher: TeacherModel | None,
             mode: str, stores: tuple | None = None, row: Mapping[str, Any] | None = None) -> Stage:
    """A stage distilling ``teacher`` into ``spec`` with the config's KD mode (or from scratch)."""
    c, data = ctx.config, ctx.data
    module = build_model(spec, data.num_classes, c.student.dtype, key=f"{role}.model")
    terms = kd_recipe(c.kd, mode, data.steps_per_epoch)
    info = {"teacher": teacher.label if teacher is not None else None, "kd_mode": mode,
            "reading": reading_label(c, mode, teacher is None or teacher.source != "chain"),
            "temperature": c.kd.temperature if mode != "scratch" else None,
            "precomputed": stores is not None,
            "kd_stop_step": (c.kd.stop_epoch * data.steps_per_epoch
                             if mode == "eskd" and c.kd.reading == "stop_kd" else None)}
    info.update(row or {})
    return Stage(name=name, role=role, model=spec, module=module, recipe=terms,
                 tx=stage_tx(c, data, c.num_epochs), num_epochs=c.num_epochs, teacher=teacher,
                 stores=stores, export_epochs=tuple(c.run.save_epochs), row=info)


def fitnet_kd_stage(ctx: Context, teacher: TeacherModel, module, *, name: str, role: str,
                    init_params: Mapping[str, Any] | None = None,
                    export_epochs: Sequence[int] = (),
                    row: Mapping[str, Any] | None = None) -> Stage:
    """FitNet's KD stage: ``module`` (the bare student) distilled from ``teacher`` for
    ``num_epochs`` with the config's optimizer.

    Loss ``CE + lambda(step) * H(p_t^T, p_s^T)`` with lambda annealed linearly from
    ``fitnet.weight_start`` to ``fitnet.weight_end`` over the stage; as ``recipe.kd`` is
    ``T^2 KL`` (same gradient as the cross-entropy ``H``, times ``T^2``), its weight is
    ``lambda / T^2``. ``init_params``: the starting variables (None: a random initialisation).
    ``row`` is added to ``{teacher, reading: 'none', temperature}`` (it sets ``kd_mode``).
    """
    c, data, f = ctx.config, ctx.data, ctx.config.fitnet
    steps = c.num_epochs * data.steps_per_epoch
    t2 = float(f.temperature) ** 2
    weight = schedules.linear(f.weight_start / t2, f.weight_end / t2, 0, max(steps, 1))
    info = {"teacher": teacher.label, "reading": "none", "temperature": f.temperature}
    info.update(row or {})
    return Stage(name=name, role=role, model=c.student.model, module=module,
                 recipe=(recipe_lib.ce(1.0), recipe_lib.kd(f.temperature, weight)),
                 tx=stage_tx(c, data, c.num_epochs), num_epochs=c.num_epochs, teacher=teacher,
                 init_params=init_params, export_epochs=tuple(export_epochs), row=info)


def run_outcome(ctx: Context, outcomes: Sequence[StageOutcome]) -> RunOutcome:
    """The run's outcome from its stages (in order); a run that no preemption stopped also writes
    ``results.json`` (config name and every stage summary, each with its ``dir``)."""
    stopped = any(o.stopped_early for o in outcomes)
    summaries = [o.summary for o in outcomes if o.summary is not None]
    for s in summaries:
        s["dir"] = os.path.join(STAGES_DIR, s["stage"])
    if not stopped:
        write_json(os.path.join(ctx.workdir, RESULTS_FILE),
                   {"name": ctx.config.name, "stages": summaries})
    return RunOutcome(workdir=ctx.workdir, summaries=summaries, stopped_early=stopped)
