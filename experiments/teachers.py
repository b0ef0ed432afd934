"""Where a run's teacher comes from, in one place: read it top to bottom.

:func:`obtain_teacher` gives the run its teacher, a frozen
:class:`~experiments.teacher_io.TeacherModel`, from ``config.teacher.source``:

* ``'checkpoint'`` - :func:`load_checkpoint_teacher`: the variables a kdjax run exported (a
  ``train_teacher`` workdir, one of its stage directories, or an exported variables directory;
  :func:`experiments.rundir.resolve_checkpoint_dir` finds the state);
* ``'torchvision'`` - :func:`load_torchvision_teacher`: a torchvision ResNet ``state_dict`` file,
  converted (:mod:`kdjax.convert`);
* ``'train'`` - :func:`train_teacher_in_run`: the :func:`teacher_stage` is run first, in this
  run's workdir, and its variables are read back.

:func:`teacher_epoch` says which state of its own training the teacher is taken from (an ESKD
``early_teacher`` reads an early epoch), :func:`teacher_epochs` how long a teacher trained in a
run trains. :func:`teacher_stores` computes or opens the teacher's logit stores
(``teacher.precomputed``).
"""

from __future__ import annotations

import os

from experiments.datasets import Data
from experiments.errors import ConfigError
from experiments.rundir import (META_FILE, TEACHER_STAGE, abstract_variables, load_variables,
                                read_json, resolve_checkpoint_dir)
from experiments.specs import build_model, parse_model_spec
from experiments.stages import Context, Stage, StageOutcome, run_stage, stage_tx
from experiments.teacher_io import TeacherModel, compute_store, store_spec
from kdjax import convert, recipe as recipe_lib


def teacher_epoch(config) -> int | None:
    """The epoch of its own training the teacher is taken from, or None for its final state.

    ``teacher.early_epoch`` counts only where it has a meaning: ESKD's ``early_teacher`` reading
    of a KD run, or any FitNet / teacher run; a KD run in another mode ignores it (and its result
    rows say ``reading: none`` and ``teacher ... final``).
    """
    c = config
    if c.experiment == "kd" and not (c.kd.mode == "eskd" and c.kd.reading == "early_teacher"):
        return None
    return c.teacher.early_epoch


def teacher_epochs(config) -> int:
    """Training length of a teacher trained in the run (``teacher.num_epochs`` or ``num_epochs``)."""
    return config.teacher.num_epochs if config.teacher.num_epochs is not None else config.num_epochs


def obtain_teacher(ctx: Context) -> tuple[TeacherModel | None, list[StageOutcome]]:
    """The run's teacher from ``teacher.source``; trains it first for ``'train'``.

    Returns ``(teacher, outcomes)``: ``outcomes`` holds the teacher stage's outcome when the
    teacher was trained here, and ``teacher`` is None when that stage was preempted.
    """
    c, data = ctx.config, ctx.data
    if c.teacher.source == "checkpoint":
        return load_checkpoint_teacher(c, data), []
    if c.teacher.source == "torchvision":
        return load_torchvision_teacher(c, data), []
    return train_teacher_in_run(ctx)


def load_checkpoint_teacher(config, data: Data) -> TeacherModel:
    """``teacher.source='checkpoint'``: variables exported by a kdjax run (the layout is in
    :mod:`experiments.rundir`), at :func:`teacher_epoch` (None: the final state)."""
    t = config.teacher
    directory = resolve_checkpoint_dir(t.path, teacher_epoch(config))
    module = build_model(t.model, data.num_classes, t.dtype, key="teacher.model")
    meta = read_json(os.path.join(directory, META_FILE))
    if meta.get("model") not in (None, t.model):
        raise ConfigError(f"config.teacher.model={t.model!r} but {directory} holds a "
                          f"{meta['model']!r} (set teacher.model to it).")
    variables = load_variables(directory, abstract_variables(module, data.sample_input))
    epoch = meta.get("epoch")
    return TeacherModel(label=f"{t.model} (checkpoint, epoch {epoch})", spec=t.model, module=module,
                        variables=variables, source="checkpoint", epoch=teacher_epoch(config))


def load_torchvision_teacher(config, data: Data) -> TeacherModel:
    """``teacher.source='torchvision'``: a torchvision ResNet ``state_dict`` file, converted."""
    t = config.teacher
    name, kwargs = parse_model_spec(t.model, "teacher.model")
    variables = convert.load_torchvision_resnet(t.path, int(name[len("resnet"):]))
    classes = variables["params"]["fc"]["kernel"].shape[1]
    if classes != data.num_classes:
        raise ConfigError(f"config.teacher.path={t.path!r} has a {classes}-class fc layer but "
                          f"{data.name} has {data.num_classes} classes; teacher and student must "
                          f"share the label space.")
    channels = variables["params"]["conv1"]["kernel"].shape[2]
    if data.sample_input.shape[-1] != channels:
        raise ConfigError(f"config.teacher.path={t.path!r} expects {channels}-channel images but "
                          f"{data.name} inputs have {data.sample_input.shape[-1]} channel(s)"
                          + ("; set dataset.rgb=True." if data.name != "imagenet2012" else "."))
    module = build_model(t.model, data.num_classes, t.dtype, key="teacher.model")
    return TeacherModel(label=f"{t.model} (torchvision: {os.path.basename(t.path)})", spec=t.model,
                        module=module, variables=variables, source="torchvision")


def teacher_stage(ctx: Context) -> Stage:
    """The stage that trains ``config.teacher.model`` on labels (CE) for ``teacher_epochs`` at
    ``teacher.lr`` (None: ``optimizer.lr``), keeping the epochs ``teacher.early_epoch`` and
    ``run.save_epochs``. Also the whole of a ``train_teacher`` run
    (:func:`experiments.runs.run_teacher`)."""
    c = ctx.config
    epochs = teacher_epochs(c)
    module = build_model(c.teacher.model, ctx.data.num_classes, c.teacher.dtype, key="teacher.model")
    keep = set(c.run.save_epochs)
    if c.teacher.early_epoch is not None:
        keep.add(c.teacher.early_epoch)
    return Stage(name=TEACHER_STAGE, role="teacher", model=c.teacher.model, module=module,
                 recipe=(recipe_lib.ce(1.0),), tx=stage_tx(c, ctx.data, epochs, lr=c.teacher.lr),
                 num_epochs=epochs,
                 export_epochs=tuple(sorted(keep)),
                 row={"teacher": None, "kd_mode": "scratch", "reading": "none",
                      "paper_error": c.paper.teacher_error, "paper_source": c.paper.source})


def train_teacher_in_run(ctx: Context) -> tuple[TeacherModel | None, list[StageOutcome]]:
    """``teacher.source='train'``: runs (or resumes, or skips if complete) the
    :func:`teacher_stage`, then reads back its variables at :func:`teacher_epoch`.

    Returns ``(teacher, [outcome])``; ``teacher`` is None when the stage was preempted.
    """
    c, data = ctx.config, ctx.data
    stage = teacher_stage(ctx)
    outcome = run_stage(stage, ctx)
    if outcome.stopped_early:
        return None, [outcome]
    epoch = teacher_epoch(c)
    variables = outcome.variables(stage.module, data.sample_input, epoch)
    label = f"{c.teacher.model} (trained here, " + (f"epoch {epoch})" if epoch else "final)")
    return TeacherModel(label=label, spec=c.teacher.model, module=stage.module, variables=variables,
                        source="train", epoch=epoch), [outcome]


def teacher_stores(ctx: Context, teacher: TeacherModel) -> tuple | None:
    """``(train_store, eval_store)`` of ``teacher`` under ``teacher.store``, computed if missing;
    None when a preemption stopped the computation (the next start resumes it)."""
    c, data = ctx.config, ctx.data
    stores = []
    for split in (data.train_split, data.eval_split):
        spec = store_spec(c, data, split, teacher)
        stores.append(compute_store(os.path.join(c.teacher.store, split), spec, teacher, data,
                                    ctx.mesh, resume=True, progress=c.run.progress))
        if stores[-1] is None:
            return None
    return tuple(stores)
