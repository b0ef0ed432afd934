"""The experiments, each a function returning :class:`~experiments.stages.RunOutcome`.

* :func:`run_kd` - optional teacher training, an optional teacher-assistant chain (each stage's
  trained student is the next stage's teacher), then the student: from scratch, full KD or ESKD.
* :func:`run_fitnet` - FitNet stage 1 (the student up to its guided layer + a regressor, on the hint
  loss; every other parameter frozen) and stage 2 (KD of the whole student, annealed weight).
* :func:`run_teacher` - one model trained on labels, keeping early-epoch snapshots.

A preempted stage returns ``stopped_early=True`` and no later stage runs; the entry point exits 0
and the next start resumes. At the end :mod:`experiments.report` writes ``report.md`` and plots.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments.errors import ConfigError
from experiments.rundir import abstract_variables
from experiments.specs import build_model
from experiments.stages import (RunOutcome, Stage, StageOutcome, fitnet_kd_stage, kd_stage,
                                make_context, run_outcome, run_stage, stage_tx)
from experiments.teacher_io import TeacherModel
from experiments.teachers import obtain_teacher, teacher_stage, teacher_stores
from experiments.validate import validate_config
from kdjax import recipe as recipe_lib


def run_kd(config: ml_collections.ConfigDict, workdir: str) -> RunOutcome:
    """Scratch / full KD / ESKD of ``config.student.model``, through ``config.assistants`` if any.

    Stages: ``teacher`` (if ``teacher.source='train'``), ``assistant1`` .. (each distilled from the
    previous teacher, then the next one's teacher), ``student``. The precomputed store, if asked
    for, serves the first distillation from the config's teacher; later chain stages run live.
    """
    validate_config(config, "kd")
    ctx = make_context(config, workdir)
    c, data = ctx.config, ctx.data
    outcomes: list[StageOutcome] = []
    teacher = None
    mode = c.kd.mode
    if mode != "scratch":
        teacher, teacher_outcomes = obtain_teacher(ctx)
        outcomes += teacher_outcomes
        if teacher is None:
            return run_outcome(ctx, outcomes)
    stores = None
    if teacher is not None and c.teacher.precomputed:
        stores = teacher_stores(ctx, teacher)
        if stores is None:  # preempted while computing them
            outcomes.append(StageOutcome(name="teacher_store", directory=c.teacher.store,
                                         summary=None, stopped_early=True))
            return run_outcome(ctx, outcomes)
    for i, spec in enumerate(c.assistants, start=1):
        stage = kd_stage(ctx, name=f"assistant{i}", role="assistant", spec=spec, teacher=teacher,
                         mode=mode, stores=stores)
        outcome = run_stage(stage, ctx)
        outcomes.append(outcome)
        if outcome.stopped_early:
            return run_outcome(ctx, outcomes)
        teacher = TeacherModel(label=f"assistant{i} ({spec})", spec=spec, module=stage.module,
                               variables=outcome.variables(stage.module, data.sample_input),
                               source="chain")
        stores = None
    paper = {"paper_error": c.paper.student_error, "paper_teacher_error": c.paper.teacher_error,
             "paper_source": c.paper.source, "paper_note": c.paper.note,
             "chain": list(c.assistants)}
    stage = kd_stage(ctx, name="student", role="student", spec=c.student.model, teacher=teacher,
                     mode=mode, stores=stores, row=paper)
    outcomes.append(run_stage(stage, ctx))
    return run_outcome(ctx, outcomes)


def run_teacher(config: ml_collections.ConfigDict, workdir: str) -> RunOutcome:
    """Trains ``config.teacher.model`` on labels, keeping ``teacher.early_epoch`` and
    ``run.save_epochs`` snapshots; the workdir then serves as ``teacher.source='checkpoint'``."""
    validate_config(config, "teacher")
    ctx = make_context(config, workdir)
    outcome = run_stage(teacher_stage(ctx), ctx)
    return run_outcome(ctx, [outcome])


# -- FitNet ---------------------------------------------------------------------------------------


def guided_modules(module, variables: Mapping[str, Any], sample_input: np.ndarray,
                   guided: str) -> frozenset[str]:
    """Top-level parameter modules that the feature ``guided`` depends on ("up to the guided layer").

    Read from the program itself, without running or compiling it: ``features[guided]`` is traced
    as a function of the parameters (``jax.make_jaxpr``; ``variables`` may be arrays or
    ``jax.ShapeDtypeStruct``s) and its equations are walked backwards from the
    output, marking every variable the output depends on; a module is in the set when any of its
    parameters is marked. The answer is structural, so it does not depend on the values (a
    zero-initialised scale or a ReLU that happens to be off changes nothing).
    """
    from jax.extend.core import Literal

    x = jax.ShapeDtypeStruct((1,) + tuple(np.shape(sample_input))[1:], np.asarray(sample_input).dtype)
    rest = {k: v for k, v in variables.items() if k != "params"}

    def tapped(params, rest, x):
        _, features = module.apply({"params": params, **rest}, x, train=False)
        if guided not in features:
            raise ConfigError(f"config.fitnet.guided_layer={guided!r} is not a feature of the "
                              f"student; available: {sorted(features)}.")
        return features[guided]

    params = variables["params"]
    jaxpr = jax.make_jaxpr(tapped)(params, rest, x).jaxpr  # invars: params' leaves first
    needed = {v for v in jaxpr.outvars if not isinstance(v, Literal)}
    for eqn in reversed(jaxpr.eqns):
        if any(v in needed for v in eqn.outvars):
            needed.update(v for v in eqn.invars if not isinstance(v, Literal))
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return frozenset(path[0].key for path, var in zip(paths, jaxpr.invars) if var in needed)


def _feature_shape(module, variables, sample_input, name: str, key: str) -> tuple[int, ...]:
    _, features = jax.eval_shape(lambda v, x: module.apply(v, x, train=False), variables,
                                 jnp.asarray(sample_input))
    if name not in features:
        raise ConfigError(f"config.{key}={name!r} is not a feature of the model; available: "
                          f"{sorted(features)}.")
    return tuple(features[name].shape)


def fitnet_students(ctx) -> tuple[Any, Any, frozenset[str]]:
    """FitNet's students, checked on shapes alone (no weights, no compute): ``(bare, student1,
    trained)`` with ``bare`` the student, ``student1`` it wrapped in
    :class:`kdjax.models.WithRegressor` (a regressor on ``fitnet.guided_layer`` to the teacher's
    ``fitnet.hint_layer`` channels) and ``trained`` the top-level modules stage 1 trains (those
    the guided layer depends on, :func:`guided_modules`, and the regressor)."""
    from kdjax.models import WithRegressor

    c, data, f = ctx.config, ctx.data, ctx.config.fitnet
    t_module = build_model(c.teacher.model, data.num_classes, c.teacher.dtype, key="teacher.model")
    hint_shape = _feature_shape(t_module, abstract_variables(t_module, data.sample_input),
                                data.sample_input, f.hint_layer, "fitnet.hint_layer")
    bare = build_model(c.student.model, data.num_classes, c.student.dtype)
    _feature_shape(bare, abstract_variables(bare, data.sample_input), data.sample_input,
                   f.guided_layer, "fitnet.guided_layer")
    student1 = WithRegressor(bare, guided=f.guided_layer, hint_channels=hint_shape[-1],
                             kind=f.regressor_kind, kernel_size=f.regressor_kernel,
                             padding=f.regressor_padding, use_relu=bool(f.regressor_relu))
    abstract = abstract_variables(student1, data.sample_input)
    regressed = _feature_shape(student1, abstract, data.sample_input, f"{f.guided_layer}_regressed",
                               "fitnet.guided_layer")
    if regressed[1:] != hint_shape[1:]:
        raise ConfigError(f"FitNet regressor output {regressed[1:]} != teacher hint "
                          f"{f.hint_layer!r} {hint_shape[1:]}: choose layers of matching spatial "
                          f"size or a 'VALID' regressor with kernel = guided size - hint size + 1 "
                          f"(config.fitnet.regressor_padding / regressor_kernel).")
    bare_vars = {**abstract,
                 "params": {k: v for k, v in abstract["params"].items() if k != "regressor"}}
    trained = guided_modules(bare, bare_vars, data.sample_input, f.guided_layer) | {"regressor"}
    return bare, student1, trained


def fitnet_hint_stage(ctx, teacher: TeacherModel, student1, trained: frozenset[str]) -> Stage:
    """FitNet's stage 1 (:func:`run_fitnet`): ``student1`` on the hint loss, only ``trained``
    modules updated, for ``fitnet.stage1_epochs`` with the ``fitnet.stage1_schedule``."""
    c, f = ctx.config, ctx.config.fitnet
    return Stage(
        name="fitnet_stage1", role="fitnet_stage1", model=c.student.model, module=student1,
        recipe=(recipe_lib.hint(f"{f.guided_layer}_regressed", f.hint_layer, weight=1.0,
                                reduction="mean" if f.hint_normalize else "sum"),),
        tx=stage_tx(c, ctx.data, f.stage1_epochs, trainable=lambda name: name in trained,
                    kind=f.stage1_schedule, lr=f.stage1_lr),
        num_epochs=f.stage1_epochs, teacher=teacher, evaluate=False,
        row={"teacher": teacher.label, "kd_mode": "hint", "reading": "none",
             "trained_modules": sorted(trained)})


def run_fitnet(config: ml_collections.ConfigDict, workdir: str) -> RunOutcome:
    """FitNets (Romero et al., 2015): hint training, then KD of the whole student.

    Stage ``fitnet_stage1``: the student wrapped in :class:`kdjax.models.WithRegressor` (a
    regressor ``r`` on ``fitnet.guided_layer`` mapping to the teacher's ``fitnet.hint_layer``
    channels), loss ``1/2 ||u_h - r(v_g)||^2`` (``recipe.hint``; divided by the number of feature
    elements with ``fitnet.hint_normalize``); only the modules the guided layer
    depends on and the regressor are trained (:func:`guided_modules`; the rest get
    ``optax.set_to_zero``), for ``fitnet.stage1_epochs`` with the ``fitnet.stage1_schedule``.
    Stage ``fitnet_stage2``: the bare student starting from stage 1's weights (regressor dropped),
    loss ``CE + lambda(step) * H(p_t^T, p_s^T)`` with lambda annealed linearly from
    ``weight_start`` to ``weight_end`` over the stage (:func:`experiments.stages.fitnet_kd_stage`).
    """
    validate_config(config, "fitnet")
    ctx = make_context(config, workdir)
    c = ctx.config
    bare, student1, trained = fitnet_students(ctx)  # checked on shapes before any teacher work
    teacher, outcomes = obtain_teacher(ctx)
    if teacher is None:
        return run_outcome(ctx, outcomes)
    stage1 = fitnet_hint_stage(ctx, teacher, student1, trained)
    outcome1 = run_stage(stage1, ctx)
    outcomes.append(outcome1)
    if outcome1.stopped_early:
        return run_outcome(ctx, outcomes)
    stage1_vars = outcome1.variables(student1, ctx.data.sample_input)
    init2 = {"params": {k: v for k, v in stage1_vars["params"].items() if k != "regressor"},
             "batch_stats": stage1_vars["batch_stats"]}
    stage2 = fitnet_kd_stage(
        ctx, teacher, bare, name="fitnet_stage2", role="student", init_params=init2,
        export_epochs=c.run.save_epochs,
        row={"kd_mode": "fitnet", "paper_error": c.paper.student_error,
             "paper_teacher_error": c.paper.teacher_error, "paper_source": c.paper.source,
             "paper_note": c.paper.note})
    outcomes.append(run_stage(stage2, ctx))
    return run_outcome(ctx, outcomes)
