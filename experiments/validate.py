"""Config checks: every value of an experiment config is checked before any heavy work.

:func:`validate_config` lists all problems of a config in one :class:`ConfigError`
(:mod:`experiments.errors`); it builds every model spec (:mod:`experiments.specs`), so a bad spec
fails here, not mid-run. The valid values of each choice are listed below (the optimizers and
schedules with their builders in :mod:`experiments.recipes`).
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

import ml_collections
import numpy as np

from experiments.datasets import AUGMENTATIONS
from experiments.errors import ConfigError
from experiments.recipes import LR_SCHEDULES, OPTIMIZERS
from experiments.specs import build_model, parse_model_spec
from experiments.teacher_io import parse_views
from experiments.teachers import teacher_epochs
from kdjax.convert import TORCHVISION_WIDTH

EXPERIMENTS = ("kd", "fitnet", "teacher")
DATASETS = ("imagenet2012", "mnist1d", "digits")
SMALL_SPLITS = ("train", "test")
IMAGENET_SPLITS = ("train", "validation")
KD_MODES = ("scratch", "full", "eskd")
ESKD_READINGS = ("stop_kd", "early_teacher")
TEACHER_SOURCES = ("none", "train", "checkpoint", "torchvision")
DTYPES = ("float32", "bfloat16")
STORE_FORMATS = ("full", "topk")
STORE_DTYPES = ("float16", "bfloat16", "float32")
PARAM_MODES = ("replicate", "fsdp")
NONFINITE = ("stop", "skip")
BEST_METRICS = ("accuracy", "ce", "teacher_accuracy", "agreement", "kl")
REGRESSOR_KINDS = ("conv", "dense")
PADDINGS = ("SAME", "VALID")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _choice(problems: list, key: str, value: Any, valid: Sequence[str]) -> bool:
    if value not in valid:
        problems.append(f"config.{key}={value!r} is not valid; valid values: "
                        f"{', '.join(repr(v) for v in valid)}.")
        return False
    return True


def _int_at_least(problems: list, key: str, value: Any, minimum: int) -> bool:
    if not _is_int(value) or value < minimum:
        problems.append(f"config.{key}={value!r} must be an integer >= {minimum}.")
        return False
    return True


def _positive(problems: list, key: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value) and (
        value >= 0 if allow_zero else value > 0)
    if not ok:
        problems.append(f"config.{key}={value!r} must be a {'non-negative' if allow_zero else 'positive'}"
                        f" number.")


def _model_ok(problems: list, key: str, spec: Any) -> bool:
    try:
        build_model(spec, 10, key=key)
    except ConfigError as e:
        problems.append(str(e))
        return False
    return True


def _epoch_in_run(problems: list, key: str, value: Any, epochs: Any, what: str) -> None:
    if not _is_int(value) or not _is_int(epochs) or not 1 <= value < epochs:
        problems.append(f"config.{key}={value!r} must be an integer epoch in [1, {epochs}) (inside "
                        f"the {what}'s {epochs} epochs).")


def validate_config(config: ml_collections.ConfigDict, experiment: str | None = None, *,
                    files: bool = True) -> None:
    """Checks every value before any heavy work; raises ConfigError listing all problems.

    ``experiment``: what the entry point runs (``'kd'``, ``'fitnet'``, ``'teacher'``; None skips
    the match with ``config.experiment``). Missing files named by ``teacher.path`` are reported
    unless ``files=False`` (a run that reads no weights: ``experiments.compile_check``).
    """
    p: list[str] = []
    c = config
    if _choice(p, "experiment", c.experiment, EXPERIMENTS) and experiment not in (None, "teacher"):
        if c.experiment != experiment:
            p.append(f"config.experiment={c.experiment!r} but this entry point runs {experiment!r} "
                     f"experiments; use the matching entry point or config file.")
    if _int_at_least(p, "seed", c.seed, 0) and c.seed >= 2**32:
        p.append(f"config.seed={c.seed} must be below 2**32 (the data order's seed is 32-bit).")
    _int_at_least(p, "num_epochs", c.num_epochs, 1)

    d = c.dataset
    if _choice(p, "dataset.name", d.name, DATASETS):
        splits = IMAGENET_SPLITS if d.name == "imagenet2012" else SMALL_SPLITS
        _choice(p, "dataset.train_split", d.train_split, splits)
        _choice(p, "dataset.eval_split", d.eval_split, splits)
        if d.rgb and d.name == "imagenet2012":
            p.append("config.dataset.rgb=True applies to the grey small datasets only; ImageNet is "
                     "RGB already.")
    if d.augment not in AUGMENTATIONS:
        p.append(f"config.dataset.augment={d.augment!r}; valid: "
                 f"{', '.join(repr(a) for a in AUGMENTATIONS)} ('' = no augmentation).")
    elif d.augment and d.name != "mnist1d":
        p.append(f"config.dataset.augment={d.augment!r} is MNIST-1D's augmentation (a shift along "
                 f"the signal); dataset.name={d.name!r} "
                 + ("has its own (random-resized crops and flips)." if d.name == "imagenet2012"
                    else "has none; use ''."))
    sizes = all([_int_at_least(p, f"dataset.{key}", d[key], 1)
                 for key in ("batch_size", "eval_batch_size", "image_size", "resize_size")])
    if sizes and d.name == "imagenet2012" and d.resize_size < d.image_size:
        p.append(f"config.dataset.resize_size={d.resize_size} is below image_size="
                 f"{d.image_size}: the eval centre crop would pad with black; resize to at least "
                 f"the crop (the protocol: 256 for 224).")
    _int_at_least(p, "dataset.num_threads", d.num_threads, 0)
    _int_at_least(p, "dataset.prefetch", d.prefetch, 0)
    if d.num_samples is not None:
        _int_at_least(p, "dataset.num_samples", d.num_samples, 10)

    o = c.optimizer
    _choice(p, "optimizer.name", o.name, OPTIMIZERS)
    _choice(p, "optimizer.schedule", o.schedule, LR_SCHEDULES)
    _positive(p, "optimizer.lr", o.lr)
    _int_at_least(p, "optimizer.lr_batch", o.lr_batch, 1)
    _positive(p, "optimizer.weight_decay", o.weight_decay, allow_zero=True)
    if not (isinstance(o.momentum, (int, float)) and 0 <= o.momentum < 1):
        p.append(f"config.optimizer.momentum={o.momentum!r} must be in [0, 1).")
    if not (isinstance(o.decay_factor, (int, float)) and 0 < o.decay_factor <= 1):
        p.append(f"config.optimizer.decay_factor={o.decay_factor!r} must be in (0, 1].")
    decays = tuple(o.decay_epochs)
    if not all(_is_int(e) and e >= 1 for e in decays) or list(decays) != sorted(set(decays)):
        p.append(f"config.optimizer.decay_epochs={decays!r} must be strictly increasing epochs >= 1.")
    elif o.schedule == "step" and decays and _is_int(c.num_epochs) and decays[-1] >= c.num_epochs:
        p.append(f"config.optimizer.decay_epochs={decays!r}: every decay must fall inside the "
                 f"{c.num_epochs} epochs (config.num_epochs).")
    if _int_at_least(p, "optimizer.warmup_epochs", o.warmup_epochs, 0) and _is_int(c.num_epochs):
        if o.warmup_epochs >= c.num_epochs:
            p.append(f"config.optimizer.warmup_epochs={o.warmup_epochs} must be < num_epochs="
                     f"{c.num_epochs}.")

    _model_ok(p, "student.model", c.student.model)
    _choice(p, "student.dtype", c.student.dtype, DTYPES)
    _validate_teacher(p, c, experiment or c.experiment, files)
    _validate_run(p, c)
    if (experiment or c.experiment) == "fitnet":
        _validate_fitnet(p, c)
    if p:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(p))


def _validate_teacher(p: list, c, experiment: str, files: bool = True) -> None:
    t, k = c.teacher, c.kd
    uses_teacher = experiment == "fitnet" or (experiment == "kd" and k.mode in ("full", "eskd"))
    if experiment == "kd":
        _choice(p, "kd.mode", k.mode, KD_MODES)
        _choice(p, "kd.reading", k.reading, ESKD_READINGS)
        _positive(p, "kd.temperature", k.temperature)
        _positive(p, "kd.weight", k.weight, allow_zero=True)
        _positive(p, "kd.ce_weight", k.ce_weight, allow_zero=True)
        eskd_stop = k.mode == "eskd" and k.reading == "stop_kd"
        if eskd_stop:
            if k.stop_epoch is None:
                p.append("config.kd.stop_epoch is required for kd.mode='eskd' with "
                         "kd.reading='stop_kd' (the epoch from which the KD weight is 0).")
            else:
                _epoch_in_run(p, "kd.stop_epoch", k.stop_epoch, c.num_epochs, "student")
        if k.mode == "scratch" and t.source != "none":
            p.append(f"config.kd.mode='scratch' trains on labels only but config.teacher.source="
                     f"{t.source!r}; set teacher.source='none' (or kd.mode='full'/'eskd').")
        if k.mode == "scratch" and tuple(c.assistants):
            p.append("config.assistants (a teacher-assistant chain) needs kd.mode='full' or 'eskd'.")
        for i, spec in enumerate(c.assistants):
            _model_ok(p, f"assistants[{i}]", spec)
    if t.lr is not None:
        _positive(p, "teacher.lr", t.lr)
    if experiment == "teacher":
        if _model_ok(p, "teacher.model", t.model):
            _choice(p, "teacher.dtype", t.dtype, DTYPES)
        if t.num_epochs is not None:
            _int_at_least(p, "teacher.num_epochs", t.num_epochs, 1)
        if t.early_epoch is not None:
            _epoch_in_run(p, "teacher.early_epoch", t.early_epoch, teacher_epochs(c), "teacher")
        return
    if not _choice(p, "teacher.source", t.source, TEACHER_SOURCES):
        return
    if uses_teacher and t.source == "none":
        p.append(f"config.teacher.source='none' but this {experiment} experiment distils from a "
                 f"teacher; use one of 'train', 'checkpoint', 'torchvision'.")
    if t.source == "none":
        if t.precomputed:
            p.append("config.teacher.precomputed=True needs a teacher (teacher.source != 'none').")
        return
    if _model_ok(p, "teacher.model", t.model):
        _choice(p, "teacher.dtype", t.dtype, DTYPES)
    if t.num_epochs is not None:
        _int_at_least(p, "teacher.num_epochs", t.num_epochs, 1)
    early = experiment == "kd" and k.mode == "eskd" and k.reading == "early_teacher"
    if early and t.early_epoch is None:
        p.append("config.teacher.early_epoch is required for kd.mode='eskd' with "
                 "kd.reading='early_teacher' (the epoch of the teacher's own training to use).")
    if t.early_epoch is not None and (early or experiment != "kd"):
        if t.source == "torchvision":
            p.append("config.teacher.early_epoch: torchvision publishes only final weights; an "
                     "early-epoch teacher needs teacher.source='train' or 'checkpoint' (a "
                     "train_teacher workdir that kept that epoch).")
        elif t.source == "train":
            _epoch_in_run(p, "teacher.early_epoch", t.early_epoch, teacher_epochs(c), "teacher")
    if t.source in ("checkpoint", "torchvision"):
        if not t.path and files:
            what = ("a train_teacher workdir or an exported variables directory"
                    if t.source == "checkpoint" else "a torchvision state_dict .npz / .safetensors "
                    "file")
            p.append(f"config.teacher.path is required for teacher.source={t.source!r} ({what}).")
        elif t.source == "torchvision":
            name, kwargs = parse_model_spec(t.model, "teacher.model")
            if not re.fullmatch(r"resnet(18|34|50|101|152)", name):
                p.append(f"config.teacher.model={t.model!r}: teacher.source='torchvision' loads "
                         f"torchvision ResNets only (resnet18/34/50/101/152).")
            elif kwargs.get("width", TORCHVISION_WIDTH) != TORCHVISION_WIDTH:
                p.append(f"config.teacher.model={t.model!r}: torchvision's ResNets are "
                         f"{TORCHVISION_WIDTH} wide; teacher.source='torchvision' needs "
                         f"width={TORCHVISION_WIDTH} (drop ':width=...').")
            if not files:
                pass
            elif os.path.splitext(t.path)[1].lower() not in (".npz", ".safetensors"):
                p.append(f"config.teacher.path={t.path!r} must be a .npz or .safetensors file for "
                         f"teacher.source='torchvision'.")
            elif not os.path.isfile(t.path):
                p.append(f"config.teacher.path={t.path!r} does not exist.")
        elif files and not os.path.isdir(t.path):
            p.append(f"config.teacher.path={t.path!r} is not a directory (teacher.source='checkpoint' "
                     f"reads a train_teacher workdir or an exported variables directory).")
    if c.run.teacher_devices and experiment == "fitnet":
        p.append(f"config.run.teacher_devices={c.run.teacher_devices}: FitNet stage 1 needs the "
                 f"teacher's hint features and a teacher on its own devices hands over logits "
                 f"only; set run.teacher_devices=0.")
    if t.precomputed:
        if experiment == "fitnet":
            p.append("config.teacher.precomputed=True: FitNet stage 1 needs the teacher's hint "
                     "features and a logit store holds logits only; set teacher.precomputed=False.")
        if not t.store:
            p.append("config.teacher.store is required with teacher.precomputed=True (the store "
                     "root; one sub-directory per split).")
    _choice(p, "teacher.store_format", t.store_format, STORE_FORMATS)
    _choice(p, "teacher.store_dtype", t.store_dtype, STORE_DTYPES)
    if t.store_format == "topk" and t.store_k is None:
        p.append("config.teacher.store_k is required with teacher.store_format='topk'.")
    if t.store_k is not None and t.store_format == "topk":
        _int_at_least(p, "teacher.store_k", t.store_k, 1)
    try:
        views = parse_views(t.store_views)
    except ConfigError as e:
        p.append(str(e))
        views = None
    if views is not None and (views[0] != 0 or views[1] < c.num_epochs - 1):
        p.append(f"config.teacher.store_views={t.store_views!r} holds the views of epochs "
                 f"{views[0]}-{views[1]}, but the run trains epochs 0-{c.num_epochs - 1}; use "
                 f"--views=epochs:0-{c.num_epochs - 1} (config teacher.store_views) so that every "
                 f"view the student draws has the teacher's outputs.")


def _validate_run(p: list, c) -> None:
    r = c.run
    _int_at_least(p, "run.eval_every_epochs", r.eval_every_epochs, 0)
    _int_at_least(p, "run.checkpoint_every_epochs", r.checkpoint_every_epochs, 0)
    _int_at_least(p, "run.log_every_steps", r.log_every_steps, 1)
    _int_at_least(p, "run.keep", r.keep, 1)
    if r.best_metric is not None:
        _choice(p, "run.best_metric", r.best_metric, BEST_METRICS)
    _choice(p, "run.nonfinite", r.nonfinite, NONFINITE)
    _choice(p, "run.param_mode", r.param_mode, PARAM_MODES)
    _choice(p, "run.teacher_mode", r.teacher_mode, PARAM_MODES)
    if not (_is_int(r.mesh_data) and (r.mesh_data == -1 or r.mesh_data >= 1)):
        p.append(f"config.run.mesh_data={r.mesh_data!r} must be -1 (all devices) or >= 1.")
    _int_at_least(p, "run.mesh_fsdp", r.mesh_fsdp, 1)
    _int_at_least(p, "run.teacher_devices", r.teacher_devices, 0)
    for e in r.save_epochs:
        if not _is_int(e) or e < 1:
            p.append(f"config.run.save_epochs={tuple(r.save_epochs)!r} must hold epochs >= 1.")
            break


def _validate_fitnet(p: list, c) -> None:
    f = c.fitnet
    for key in ("hint_layer", "guided_layer"):
        if not isinstance(f[key], str) or not f[key]:
            p.append(f"config.fitnet.{key} must name a feature tap (e.g. 'stage2'); got {f[key]!r}.")
    _choice(p, "fitnet.regressor_kind", f.regressor_kind, REGRESSOR_KINDS)
    _int_at_least(p, "fitnet.regressor_kernel", f.regressor_kernel, 1)
    _choice(p, "fitnet.regressor_padding", f.regressor_padding, PADDINGS)
    _int_at_least(p, "fitnet.stage1_epochs", f.stage1_epochs, 1)
    if f.stage1_lr is not None:
        _positive(p, "fitnet.stage1_lr", f.stage1_lr)
    if not isinstance(f.hint_normalize, bool):
        p.append(f"config.fitnet.hint_normalize={f.hint_normalize!r} must be True or False.")
    _choice(p, "fitnet.stage1_schedule", f.stage1_schedule, LR_SCHEDULES)
    _positive(p, "fitnet.temperature", f.temperature)
    _positive(p, "fitnet.weight_start", f.weight_start, allow_zero=True)
    _positive(p, "fitnet.weight_end", f.weight_end, allow_zero=True)
