"""Shared machinery of the experiment entry points: command line, config checks, data, models,
optimizer, loss recipes, teachers, and the stages that :func:`kdjax.loop.fit` runs.

An experiment is a list of *stages*; each stage is one ``loop.fit`` run with its own directory
``<workdir>/stages/<name>/`` (``checkpoints/``, ``metrics.jsonl``, ``tb/``), and leaves

* ``final/`` - the trained variables (``variables/``, an orbax checkpoint of
  ``{'params', 'batch_stats'}``) and ``meta.json`` (model spec, epoch, step, last eval);
* ``epochs/epoch_<E>/`` - the same, at the end of epoch ``E`` for every requested epoch (the
  early-epoch teacher of ESKD's second reading, ``run.save_epochs``);
* ``summary.json`` - the stage's result row, written last: a stage with it is complete and is
  skipped when the run is started again (the next stage resumes from its own checkpoints).

Experiments (each also a function callable from Python, returning :class:`RunOutcome`):

* :func:`run_kd` - optional teacher training, an optional teacher-assistant chain (each stage's
  trained student is the next stage's teacher), then the student: from scratch, full KD or ESKD.
* :func:`run_fitnet` - FitNet stage 1 (the student up to its guided layer + a regressor, on the hint
  loss; every other parameter frozen) and stage 2 (KD of the whole student, annealed weight).
* :func:`run_teacher` - one model trained on labels, keeping early-epoch snapshots.

A preempted stage returns ``stopped_early=True`` and no later stage runs; the entry point exits 0
and the next start resumes. At the end :mod:`experiments.report` writes ``report.md`` and plots.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kdjax import models, recipe as recipe_lib, schedules, sharding, teachers

# ------------------------------------------------------------------------------------------------
# Names and layout.
# ------------------------------------------------------------------------------------------------

EXPERIMENTS = ("kd", "fitnet", "teacher")
DATASETS = ("imagenet2012", "mnist1d", "digits")
SMALL_SPLITS = ("train", "test")
IMAGENET_SPLITS = ("train", "validation")
KD_MODES = ("scratch", "full", "eskd")
ESKD_READINGS = ("stop_kd", "early_teacher")
TEACHER_SOURCES = ("none", "train", "checkpoint", "torchvision")
OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("step", "cosine", "constant")
DTYPES = ("float32", "bfloat16")
STORE_FORMATS = ("full", "topk")
STORE_DTYPES = ("float16", "bfloat16", "float32")
PARAM_MODES = ("replicate", "fsdp")
NONFINITE = ("stop", "skip")
BEST_METRICS = ("accuracy", "ce", "teacher_accuracy", "agreement", "kl")
REGRESSOR_KINDS = ("conv", "dense")
PADDINGS = ("SAME", "VALID")

STAGES_DIR = "stages"
FINAL_DIR = "final"
EPOCHS_DIR = "epochs"
VARIABLES_DIR = "variables"
META_FILE = "meta.json"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
TEACHER_STAGE = "teacher"


class ConfigError(ValueError):
    """A bad command line or config value; the message names the key, the value and the fix."""


def log(message: str) -> None:
    """Prints ``message`` on process 0 (stdout, flushed)."""
    if jax.process_index() == 0:
        print(message, flush=True)


# ------------------------------------------------------------------------------------------------
# Command line.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Args:
    """A parsed command line: the locked config, ``--workdir`` and the entry point's own flags."""
    config: ml_collections.ConfigDict
    workdir: str | None
    distributed: bool
    flags: dict[str, Any]


def _check_override_key(config: ml_collections.ConfigDict, key: str) -> None:
    """Raises ConfigError unless ``config.<key>`` exists (``key`` is dotted, e.g. ``kd.mode``)."""
    node, path = config, []
    for part in key.split("."):
        where = "config" + "".join(f".{p}" for p in path)
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(f"--config.{key}: {where} is a value ({node!r}), not a group of keys; "
                              f"override {where} itself.")
        if part not in node:
            raise ConfigError(f"--config.{key}: unknown config key {part!r} in {where}; valid keys "
                              f"there: {', '.join(sorted(node.keys()))}.")
        node = node[part]
        path.append(part)


def _override_keys(argv: Sequence[str]) -> list[str]:
    keys = []
    for arg in argv:
        for prefix in ("--config.", "--noconfig."):
            if arg.startswith(prefix):
                keys.append(arg[len(prefix):].split("=", 1)[0])
    return keys


def _load_config_file(argv: Sequence[str], prog: str) -> ml_collections.ConfigDict:
    from absl import flags
    from ml_collections import config_flags

    values = [a for a in argv if a.startswith("--config=")]
    if not values:
        raise ConfigError(f"{prog}: --config=FILE[:ARG] is required, e.g. "
                          f"--config=experiments/configs/mnist1d_eskd.py:teacher=large,mode=eskd.")
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "experiment config", flag_values=fv,
                                    lock_config=True, sys_argv=[prog, values[-1]])
    try:
        fv([prog, values[-1]])
    except flags.Error as e:
        raise ConfigError(f"{prog}: {e}") from None
    return fv.config


def parse_command_line(argv: Sequence[str], *, prog: str, doc: str = "",
                       needs_workdir: bool = True,
                       extra_flags: Sequence[tuple[str, Any, str]] = ()) -> Args:
    """Parses ``--config=FILE[:ARG] [--config.key=value ...] --workdir=DIR [--distributed]``.

    ``argv`` excludes the program name. ``extra_flags``: ``(name, default, help)`` with a str,
    bool or int default (the flag's type). ``--help`` prints ``doc`` and the flags, then exits 0.
    Config overrides are checked against the loaded config first, so an unknown key fails with
    the list of valid keys. Raises :class:`ConfigError` on any problem.
    """
    from absl import flags
    from ml_collections import config_flags

    argv = list(argv)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "experiment config file[:arg]", flag_values=fv,
                                    lock_config=True, sys_argv=[prog] + argv)
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, report); reusing "
                        "it resumes", flag_values=fv)
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() first (multi-host "
                      "TPU pods)", flag_values=fv)
    for name, default, help_text in extra_flags:
        if isinstance(default, bool):
            flags.DEFINE_bool(name, default, help_text, flag_values=fv)
        elif isinstance(default, int):
            flags.DEFINE_integer(name, default, help_text, flag_values=fv)
        else:
            flags.DEFINE_string(name, default, help_text, flag_values=fv)
    if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv):
        print(doc.strip() + "\n\nflags:\n" + fv.get_help())
        raise SystemExit(0)
    base = _load_config_file(argv, prog)
    for key in _override_keys(argv):
        _check_override_key(base, key)
    try:
        rest = fv([prog] + argv)
    except flags.Error as e:
        raise ConfigError(f"{prog}: {e}") from None
    if len(rest) > 1:
        raise ConfigError(f"{prog}: unexpected positional arguments {rest[1:]}; every option is a "
                          f"--flag=value.")
    if needs_workdir and not fv.workdir:
        raise ConfigError(f"{prog}: --workdir=DIR is required (checkpoints, metrics and the report "
                          f"go there; rerunning with the same --workdir resumes).")
    extra = {name: fv[name].value for name, _, _ in extra_flags}
    return Args(config=fv.config, workdir=fv.workdir, distributed=fv.distributed, flags=extra)


def run_main(main: Callable[[Sequence[str]], int]) -> None:
    """``sys.exit(main(sys.argv[1:]))``, printing a ConfigError as one line (exit status 2)."""
    try:
        status = main(sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(status)


# ------------------------------------------------------------------------------------------------
# Models.
# ------------------------------------------------------------------------------------------------


def _literal(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parse_model_spec(spec: Any, key: str) -> tuple[str, dict[str, Any]]:
    """``"name"`` or ``"name:k=v,k2=v2"`` -> ``(name, {k: v, ...})`` (numbers and booleans parsed)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"config.{key} must be a model spec such as 'resnet18' or 'cnn1d:width=32'; "
                          f"got {spec!r}.")
    name, _, rest = spec.partition(":")
    kwargs = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        k, eq, v = item.partition("=")
        if not eq or not k.strip():
            raise ConfigError(f"config.{key}={spec!r}: attribute {item!r} must be key=value "
                              f"(spec format 'name:key=value,key=value').")
        kwargs[k.strip()] = _literal(v.strip())
    return name.strip(), kwargs


def build_model(spec: str, num_classes: int, dtype: str = "float32", key: str = "student.model"):
    """The Linen module of a model spec (``kdjax.models.create``); ``dtype`` is the compute dtype."""
    name, kwargs = parse_model_spec(spec, key)
    if dtype == "bfloat16":
        kwargs.setdefault("dtype", jnp.bfloat16)
    try:
        return models.create(name, num_classes, **kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.{key}={spec!r}: {e}") from None


def abstract_variables(module, sample_input: np.ndarray) -> dict:
    """Shapes/dtypes of ``module.init`` on ``sample_input`` (no computation), always with both
    ``params`` and ``batch_stats`` keys."""
    out = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.asarray(sample_input),
                                             train=False))
    return {"params": out["params"], "batch_stats": out.get("batch_stats", {})}


# ------------------------------------------------------------------------------------------------
# Config validation.
# ------------------------------------------------------------------------------------------------


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


def validate_config(config: ml_collections.ConfigDict, experiment: str | None = None) -> None:
    """Checks every value before any heavy work; raises ConfigError listing all problems.

    ``experiment``: what the entry point runs (``'kd'``, ``'fitnet'``, ``'teacher'``; None skips
    the match with ``config.experiment``). Missing files named by ``teacher.path`` are reported.
    """
    p: list[str] = []
    c = config
    if _choice(p, "experiment", c.experiment, EXPERIMENTS) and experiment not in (None, "teacher"):
        if c.experiment != experiment:
            p.append(f"config.experiment={c.experiment!r} but this entry point runs {experiment!r} "
                     f"experiments; use the matching entry point or config file.")
    _int_at_least(p, "seed", c.seed, 0)
    _int_at_least(p, "num_epochs", c.num_epochs, 1)

    d = c.dataset
    if _choice(p, "dataset.name", d.name, DATASETS):
        splits = IMAGENET_SPLITS if d.name == "imagenet2012" else SMALL_SPLITS
        _choice(p, "dataset.train_split", d.train_split, splits)
        _choice(p, "dataset.eval_split", d.eval_split, splits)
        if d.rgb and d.name == "imagenet2012":
            p.append("config.dataset.rgb=True applies to the grey small datasets only; ImageNet is "
                     "RGB already.")
    for key in ("batch_size", "eval_batch_size", "image_size", "resize_size"):
        _int_at_least(p, f"dataset.{key}", d[key], 1)
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
    _validate_teacher(p, c, experiment or c.experiment)
    _validate_run(p, c)
    if (experiment or c.experiment) == "fitnet":
        _validate_fitnet(p, c)
    if p:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(p))


def _validate_teacher(p: list, c, experiment: str) -> None:
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
        if not t.path:
            what = ("a train_teacher workdir or an exported variables directory"
                    if t.source == "checkpoint" else "a torchvision state_dict .npz / .safetensors "
                    "file")
            p.append(f"config.teacher.path is required for teacher.source={t.source!r} ({what}).")
        elif t.source == "torchvision":
            name = t.model.partition(":")[0].strip() if isinstance(t.model, str) else ""
            if not re.fullmatch(r"resnet(18|34|50|101|152)", name):
                p.append(f"config.teacher.model={t.model!r}: teacher.source='torchvision' loads "
                         f"torchvision ResNets only (resnet18/34/50/101/152).")
            if os.path.splitext(t.path)[1].lower() not in (".npz", ".safetensors"):
                p.append(f"config.teacher.path={t.path!r} must be a .npz or .safetensors file for "
                         f"teacher.source='torchvision'.")
            elif not os.path.isfile(t.path):
                p.append(f"config.teacher.path={t.path!r} does not exist.")
        elif not os.path.isdir(t.path):
            p.append(f"config.teacher.path={t.path!r} is not a directory (teacher.source='checkpoint' "
                     f"reads a train_teacher workdir or an exported variables directory).")
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


# ------------------------------------------------------------------------------------------------
# Data.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
    """One dataset's sources and iterators.

    ``sources[split]`` is a random-access source (ids are record indices); ``sample_input`` is
    one eval example ``[1, ...]`` as the model sees it. Train batches come from
    :func:`kdjax.data.make_train_iterator` (shuffled, augmented for ImageNet; batch dicts carry
    ``epoch``), eval batches from :func:`kdjax.data.make_eval_iterator` (padded, masked).
    """
    name: str
    train_split: str
    eval_split: str
    sources: dict[str, Any]
    num_classes: int
    batch_size: int
    eval_batch_size: int
    seed: int
    train_transform: Any
    eval_transform: Any
    num_threads: int
    prefetch: int
    preprocessing: str
    sample_input: np.ndarray

    def num_examples(self, split: str) -> int:
        return len(self.sources[split])

    @property
    def steps_per_epoch(self) -> int:
        """``len(train) // batch_size`` (at least 1): the steps one epoch is counted as."""
        return max(1, self.num_examples(self.train_split) // self.batch_size)

    def train_iter(self):
        from kdjax import data

        return data.make_train_iterator(
            self.sources[self.train_split], global_batch_size=self.batch_size, seed=self.seed,
            transform=self.train_transform, num_threads=self.num_threads,
            prefetch_buffer_size=self.prefetch)

    def eval_iter(self, split: str | None = None):
        """One padded pass over ``split`` (default the eval split) with the eval transform."""
        from kdjax import data

        return data.make_eval_iterator(
            self.sources[split or self.eval_split], global_batch_size=self.eval_batch_size,
            transform=self.eval_transform, num_threads=self.num_threads,
            prefetch_buffer_size=self.prefetch)


def build_data(dataset: ml_collections.ConfigDict, seed: int) -> Data:
    """Opens the dataset named by ``config.dataset`` (sources, transforms, sample input)."""
    import functools

    from kdjax import data

    splits = (dataset.train_split, dataset.eval_split)
    if dataset.name == "imagenet2012":
        sources = {s: data.imagenet_source(s, dataset.data_dir) for s in dict.fromkeys(splits)}
        train_tf = functools.partial(data.imagenet_train_transform, image_size=dataset.image_size)
        eval_tf = functools.partial(data.imagenet_eval_transform, image_size=dataset.image_size,
                                    resize_size=dataset.resize_size)
        source = sources[dataset.train_split]
        num_classes = int(source.dataset_info.features["label"].num_classes)
        sample = eval_tf(sources[dataset.eval_split][0])["image"][None]
        preprocessing = (f"resize{dataset.resize_size}-center{dataset.image_size}-"
                         f"imagenet-mean-std")
    else:
        if dataset.name == "mnist1d":
            arrays = data.mnist1d_arrays(num_samples=dataset.num_samples)
        else:
            arrays = data.digits_arrays()
        if dataset.rgb:
            arrays = {s: {**a, "image": np.repeat(a["image"], 3, axis=-1)} for s, a in arrays.items()}
        sources = {s: data.ArraySource(arrays[s]) for s in dict.fromkeys(splits)}
        train_tf = eval_tf = None
        num_classes = int(max(a["label"].max() for a in arrays.values())) + 1
        sample = arrays[dataset.eval_split]["image"][:1]
        preprocessing = f"{dataset.name}-standardised" + ("-rgb" if dataset.rgb else "")
    return Data(name=dataset.name, train_split=dataset.train_split, eval_split=dataset.eval_split,
                sources=sources, num_classes=num_classes, batch_size=dataset.batch_size,
                eval_batch_size=dataset.eval_batch_size, seed=seed, train_transform=train_tf,
                eval_transform=eval_tf, num_threads=dataset.num_threads, prefetch=dataset.prefetch,
                preprocessing=preprocessing, sample_input=np.asarray(sample))


# ------------------------------------------------------------------------------------------------
# Optimizer.
# ------------------------------------------------------------------------------------------------


def learning_rate_schedule(opt: ml_collections.ConfigDict, *, steps_per_epoch: int,
                           num_epochs: int, batch_size: int, kind: str | None = None):
    """The optax learning-rate schedule of ``config.optimizer`` over ``num_epochs`` epochs.

    Peak rate ``lr * batch_size / lr_batch`` (the linear scaling rule). ``step``: multiplied by
    ``decay_factor`` at each of ``decay_epochs`` inside the run; ``cosine``: half-cosine to 0 at
    the end; ``constant``. ``warmup_epochs`` > 0 prepends a linear ramp from 0 to the peak.
    ``kind`` overrides ``opt.schedule``.
    """
    spe = steps_per_epoch
    peak = float(opt.lr) * batch_size / opt.lr_batch
    total = num_epochs * spe
    warm = opt.warmup_epochs * spe
    kind = kind or opt.schedule
    if kind == "constant":
        main = optax.constant_schedule(peak)
    elif kind == "step":
        main = optax.piecewise_constant_schedule(
            peak, {e * spe - warm: float(opt.decay_factor) for e in opt.decay_epochs
                   if e < num_epochs and e * spe > warm})
    elif kind == "cosine":
        main = optax.cosine_decay_schedule(peak, max(1, total - warm))
    else:
        raise ConfigError(f"learning-rate schedule {kind!r} is not valid; valid: {LR_SCHEDULES}.")
    if warm:
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), main], [warm])
    return main


def make_optimizer(opt: ml_collections.ConfigDict, schedule,
                   trainable: Callable[[str], bool] | None = None) -> optax.GradientTransformation:
    """``config.optimizer`` as optax, optionally training only some top-level modules.

    ``sgd``: ``add_decayed_weights(wd)`` then SGD with momentum (PyTorch's coupled weight decay on
    every parameter); ``adam``: the same L2 term then Adam; ``adamw``: decoupled decay.
    ``trainable(name) -> bool`` for each top-level parameter module: the others get
    ``optax.set_to_zero()`` through ``optax.multi_transform``, so they receive no update at all
    (weight decay and momentum included).
    """
    wd = float(opt.weight_decay)
    if opt.name == "sgd":
        tx = optax.chain(optax.add_decayed_weights(wd),
                         optax.sgd(schedule, momentum=float(opt.momentum) or None,
                                   nesterov=bool(opt.nesterov)))
    elif opt.name == "adam":
        tx = optax.chain(optax.add_decayed_weights(wd), optax.adam(schedule))
    elif opt.name == "adamw":
        tx = optax.adamw(schedule, weight_decay=wd)
    else:
        raise ConfigError(f"config.optimizer.name={opt.name!r} is not valid; valid: {OPTIMIZERS}.")
    if trainable is None:
        return tx

    def labels(params):
        return {name: jax.tree.map(lambda _, n=name: "train" if trainable(n) else "frozen", sub)
                for name, sub in params.items()}
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


# ------------------------------------------------------------------------------------------------
# Loss recipes.
# ------------------------------------------------------------------------------------------------


def kd_recipe(kd: ml_collections.ConfigDict, mode: str, steps_per_epoch: int) -> tuple:
    """The student's loss terms for a KD mode.

    * ``scratch``: ``CE`` (weight 1).
    * ``full`` (and ESKD ``early_teacher``, whose early stopping is in the teacher):
      ``ce_weight * CE + weight * T^2 KL(p_t^T || p_s^T)``.
    * ESKD ``stop_kd``: the same until ``stop_epoch``, then ``1 * CE`` alone: the KD weight is
      ``schedules.eskd(weight, stop_step)`` and the CE weight steps from ``ce_weight`` to 1, so the
      student finishes exactly as a scratch student would.
    """
    if mode == "scratch":
        return (recipe_lib.ce(1.0),)
    if mode == "eskd" and kd.reading == "stop_kd":
        stop = kd.stop_epoch * steps_per_epoch
        return (recipe_lib.ce(schedules.piecewise_constant([stop], [kd.ce_weight, 1.0])),
                recipe_lib.kd(kd.temperature, schedules.eskd(kd.weight, stop)))
    return (recipe_lib.ce(kd.ce_weight), recipe_lib.kd(kd.temperature, kd.weight))


def reading_label(config, mode: str, first_teacher: bool = True) -> str:
    """Which early stopping a KD result used, in words (every result row carries it).

    ``first_teacher``: the stage distils from the config's teacher (not from a chain's assistant,
    which is never an early-epoch snapshot).
    """
    if mode != "eskd":
        return "none"
    if config.kd.reading == "stop_kd":
        return f"stop_kd (KD term off from epoch {config.kd.stop_epoch})"
    if not first_teacher:
        return "none (early_teacher applies to the chain's first teacher)"
    return f"early_teacher (teacher from its epoch {config.teacher.early_epoch})"


# ------------------------------------------------------------------------------------------------
# Variables on disk.
# ------------------------------------------------------------------------------------------------


def _write_json(path: str, obj: Any) -> None:
    """Atomic JSON write (process 0 only)."""
    if jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return str(value)


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_variables(directory: str, variables: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """Writes ``variables`` (an orbax checkpoint in ``directory/variables``) and ``meta.json``.

    Every process calls it (orbax writes each process's shards); ``meta.json`` is written last,
    by process 0, so a directory with it holds complete variables.
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(directory, VARIABLES_DIR),
                      {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})},
                      force=True)
    checkpointer.wait_until_finished()
    checkpointer.close()
    _write_json(os.path.join(directory, META_FILE), dict(meta))


def _flat_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
            for path, leaf in flat}


def load_variables(directory: str, expected: Any = None) -> dict:
    """Reads variables written by :func:`save_variables` as NumPy arrays.

    ``expected``: a tree of shapes (e.g. :func:`abstract_variables`); the saved tree must have the
    same leaves, shapes and dtypes, else ValueError listing the differences.
    """
    import orbax.checkpoint as ocp

    path = os.path.join(os.path.abspath(directory), VARIABLES_DIR)
    if not os.path.isdir(path) or not os.path.exists(os.path.join(directory, META_FILE)):
        raise ValueError(f"{directory} holds no complete exported variables (no {VARIABLES_DIR}/ "
                         f"and {META_FILE}); export them with experiments.common.save_variables "
                         f"or point at a finished run.")
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(path)
    tree = getattr(getattr(metadata, "item_metadata", None), "tree", None) or metadata
    if expected is not None:
        have, want = _flat_shapes(tree), _flat_shapes(expected)
        if have != want:
            missing = sorted(set(want) - set(have))[:5]
            extra = sorted(set(have) - set(want))[:5]
            shapes = [f"{k}: saved {have[k]}, model {want[k]}" for k in sorted(set(have) & set(want))
                      if have[k] != want[k]][:5]
            raise ValueError(f"variables in {directory} do not fit the model: missing {missing}, "
                             f"unexpected {extra}, shape/dtype mismatches {shapes}. Check that the "
                             f"model spec is the one the checkpoint was trained with.")
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    out = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    return {"params": out["params"], "batch_stats": out.get("batch_stats", {})}


# ------------------------------------------------------------------------------------------------
# Teachers.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TeacherModel:
    """A frozen teacher: its module, variables and a label saying where it came from."""
    label: str
    spec: str
    module: Any
    variables: dict
    source: str
    epoch: int | None = None

    def live(self) -> teachers.Teacher:
        return teachers.from_linen(self.module)


def resolve_checkpoint_dir(path: str, early_epoch: int | None) -> str:
    """The exported-variables directory that ``teacher.path`` (+ ``early_epoch``) names.

    ``path`` may be a run workdir (``stages/teacher/`` inside), a stage directory (``final/`` and
    ``epochs/``) or an exported variables directory itself (``variables/`` + ``meta.json``).
    """
    stage = None
    if os.path.isdir(os.path.join(path, VARIABLES_DIR)):
        if early_epoch is None:
            return path
        meta = read_json(os.path.join(path, META_FILE))
        if meta.get("epoch") == early_epoch:
            return path
        raise ConfigError(f"config.teacher.path={path!r} holds one exported state (epoch "
                          f"{meta.get('epoch')}), not epoch teacher.early_epoch={early_epoch}; point "
                          f"teacher.path at the teacher's train_teacher workdir instead.")
    if os.path.isdir(os.path.join(path, FINAL_DIR)) or os.path.isdir(os.path.join(path, EPOCHS_DIR)):
        stage = path
    elif os.path.isdir(os.path.join(path, STAGES_DIR, TEACHER_STAGE)):
        stage = os.path.join(path, STAGES_DIR, TEACHER_STAGE)
    if stage is None:
        raise ConfigError(f"config.teacher.path={path!r} is neither a train_teacher workdir (with "
                          f"{STAGES_DIR}/{TEACHER_STAGE}/), a stage directory (with {FINAL_DIR}/) "
                          f"nor exported variables (with {VARIABLES_DIR}/ and {META_FILE}).")
    if early_epoch is None:
        target = os.path.join(stage, FINAL_DIR)
    else:
        target = os.path.join(stage, EPOCHS_DIR, f"epoch_{early_epoch}")
    if not os.path.exists(os.path.join(target, META_FILE)):
        kept = sorted(os.listdir(os.path.join(stage, EPOCHS_DIR))) if os.path.isdir(
            os.path.join(stage, EPOCHS_DIR)) else []
        raise ConfigError(f"config.teacher.path={path!r}: {target} is missing (the teacher run has "
                          f"not finished, or did not keep that epoch; kept epochs: {kept or 'none'}). "
                          f"Train the teacher with teacher.early_epoch / run.save_epochs listing it.")
    return target


def load_checkpoint_teacher(config, data: Data) -> TeacherModel:
    """``teacher.source='checkpoint'``: variables exported by a kdjax run (see the module doc)."""
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
    from kdjax import convert

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


# ------------------------------------------------------------------------------------------------
# Logit stores (precomputed teacher).
# ------------------------------------------------------------------------------------------------


def store_spec(config, data: Data, split: str, teacher: TeacherModel):
    """The :class:`kdjax.logit_store.StoreSpec` of ``teacher`` on ``split`` under ``config``."""
    from kdjax import logit_store

    t = config.teacher
    return logit_store.StoreSpec(
        dataset=data.name, split=split, num_examples=data.num_examples(split),
        num_classes=data.num_classes, teacher=teacher.label, preprocessing=data.preprocessing,
        format=t.store_format, k=t.store_k if t.store_format == "topk" else None,
        dtype=t.store_dtype)


def compute_store(path: str, spec, teacher: TeacherModel, data: Data, mesh, *, resume: bool = True,
                  progress: bool = True):
    """Runs ``teacher`` over ``spec.split`` (eval transform, unaugmented) into a store at ``path``.

    Every process writes its own shard of the rows its eval iterator yields; process 0 finalizes
    after all writers closed. A complete store is opened without recomputing. Returns the open
    :class:`kdjax.logit_store.LogitStore`.
    """
    from jax.experimental import multihost_utils

    from kdjax import data as data_lib, logit_store, train

    if logit_store.is_complete(path):
        return open_store(path, spec)
    writer = logit_store.LogitStoreWriter(path, spec, process_index=jax.process_index(),
                                          process_count=jax.process_count(), resume=resume)
    batch_sharding = sharding.batch_sharding(mesh)
    variables, _ = train.put_teacher(teacher.variables, mesh)
    total = data_lib.eval_num_batches(spec.num_examples, data.eval_batch_size)
    with writer:
        stats = logit_store.precompute(teacher.live(), variables, data.eval_iter(spec.split), writer,
                                       sharding=batch_sharding, show_progress=progress, total=total)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"logit store {path} written")
    if jax.process_index() == 0:
        logit_store.finalize(path, jax.process_count())
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"logit store {path} finalized")
    log(f"logit store {path}: {stats}")
    return open_store(path, spec)


def open_store(path: str, spec):
    """Opens a complete store, checking that it holds what ``spec`` describes."""
    from kdjax import logit_store

    return logit_store.LogitStore.open(
        path, dataset=spec.dataset, split=spec.split, num_examples=spec.num_examples,
        num_classes=spec.num_classes, teacher=spec.teacher, format=spec.format,
        preprocessing=spec.preprocessing)


def store_batch_transform(train_store, eval_store) -> Callable[[Mapping[str, Any]], dict]:
    """Adds the precomputed teacher outputs to a host batch.

    Train batches (they carry ``epoch``, see :func:`kdjax.data.make_train_iterator`) read the
    train-split store, eval batches the eval-split store: the ids of each split index its own store.
    """
    def add(batch):
        return (train_store if "epoch" in batch else eval_store).add_to_batch(batch)
    return add


# ------------------------------------------------------------------------------------------------
# Stages.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
    """What every stage of a run shares: config, workdir, data, mesh."""
    config: ml_collections.ConfigDict
    workdir: str
    data: Data
    mesh: Any

    def stage_dir(self, name: str) -> str:
        return os.path.join(self.workdir, STAGES_DIR, name)


def make_context(config: ml_collections.ConfigDict, workdir: str) -> Context:
    """Opens the data, builds the mesh, checks the batch sizes and records the config."""
    workdir = os.path.abspath(workdir)
    data = build_data(config.dataset, config.seed)
    mesh = sharding.make_mesh(data=config.run.mesh_data, fsdp=config.run.mesh_fsdp)
    devices = mesh.devices.size
    for key in ("batch_size", "eval_batch_size"):
        value = config.dataset[key]
        if value % devices or value % jax.process_count():
            raise ConfigError(f"config.dataset.{key}={value} must be a multiple of the {devices} "
                              f"devices (and {jax.process_count()} processes).")
    _record_config(config, workdir)
    return Context(config=config, workdir=workdir, data=data, mesh=mesh)


def _record_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes ``config.json``; on a resume, warns about keys that changed since the first start."""
    path = os.path.join(workdir, CONFIG_FILE)
    now = json.loads(config.to_json_best_effort())
    if os.path.exists(path):
        before = read_json(path)
        changed = sorted(k for k in set(_flatten(before)) | set(_flatten(now))
                         if _flatten(before).get(k) != _flatten(now).get(k))
        if changed:
            log(f"WARNING: resuming {workdir} with a changed config ({', '.join(changed)}); "
                f"completed stages are not rerun.")
    _write_json(path, now)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


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
    teacher_fn, teacher_vars, transform = None, None, None
    if stage.stores is not None:
        teacher_fn, transform = teachers.precomputed(), store_batch_transform(*stage.stores)
    elif stage.teacher is not None:
        teacher_fn, teacher_vars = stage.teacher.live(), stage.teacher.variables
    evaluate = stage.evaluate
    kwargs = dict(
        workdir=directory, student=stage.module, tx=stage.tx, recipe=stage.recipe,
        teacher=teacher_fn, teacher_variables=teacher_vars,
        eval_iter_fn=data.eval_iter if evaluate else None, sample_input=data.sample_input,
        seed=c.seed, mesh=ctx.mesh, param_mode=c.run.param_mode, teacher_mode=c.run.teacher_mode,
        eval_every=c.run.eval_every_epochs * spe if evaluate else 0,
        checkpoint_every=c.run.checkpoint_every_epochs * spe, log_every=c.run.log_every_steps,
        keep=c.run.keep, best_metric=(c.run.best_metric if evaluate and (
            teacher_fn is not None or c.run.best_metric in ("accuracy", "ce")) else None),
        nonfinite=c.run.nonfinite, batch_transform=transform, init_params=stage.init_params,
        progress=c.run.progress, name=stage.name)
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
    _write_json(summary_path, summary)
    return StageOutcome(stage.name, directory, summary, False)


# ------------------------------------------------------------------------------------------------
# Experiments.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunOutcome:
    """What an experiment function returns: the completed stages' summaries in order, and
    whether a preemption stopped it (then ``summaries`` holds only the stages finished so far)."""
    workdir: str
    summaries: list[dict]
    stopped_early: bool


def _stage_tx(config, data: Data, num_epochs: int, trainable=None, kind: str | None = None,
              lr: float | None = None):
    opt = config.optimizer
    if lr is not None:
        opt = ml_collections.ConfigDict(opt.to_dict())
        opt.lr = float(lr)
    schedule = learning_rate_schedule(opt, steps_per_epoch=data.steps_per_epoch,
                                      num_epochs=num_epochs, batch_size=data.batch_size, kind=kind)
    return make_optimizer(opt, schedule, trainable)


def teacher_stage(ctx: Context) -> Stage:
    """The stage that trains ``config.teacher.model`` on labels (CE) for ``teacher_epochs``,
    keeping the epochs ``teacher.early_epoch`` and ``run.save_epochs``."""
    c = ctx.config
    epochs = teacher_epochs(c)
    module = build_model(c.teacher.model, ctx.data.num_classes, c.teacher.dtype, key="teacher.model")
    keep = set(c.run.save_epochs)
    if c.teacher.early_epoch is not None:
        keep.add(c.teacher.early_epoch)
    return Stage(name=TEACHER_STAGE, role="teacher", model=c.teacher.model, module=module,
                 recipe=(recipe_lib.ce(1.0),), tx=_stage_tx(c, ctx.data, epochs), num_epochs=epochs,
                 export_epochs=tuple(sorted(keep)),
                 row={"teacher": None, "kd_mode": "scratch", "reading": "none",
                      "paper_error": c.paper.teacher_error, "paper_source": c.paper.source})


def obtain_teacher(ctx: Context) -> tuple[TeacherModel | None, list[StageOutcome]]:
    """The run's teacher from ``teacher.source``; trains it first for ``'train'``.

    Returns ``(teacher, outcomes)``; ``teacher`` is None when the teacher stage was preempted.
    """
    c, data = ctx.config, ctx.data
    if c.teacher.source == "checkpoint":
        return load_checkpoint_teacher(c, data), []
    if c.teacher.source == "torchvision":
        return load_torchvision_teacher(c, data), []
    stage = teacher_stage(ctx)
    outcome = run_stage(stage, ctx)
    if outcome.stopped_early:
        return None, [outcome]
    epoch = teacher_epoch(c)
    variables = outcome.variables(stage.module, data.sample_input, epoch)
    label = f"{c.teacher.model} (trained here, " + (f"epoch {epoch})" if epoch else "final)")
    return TeacherModel(label=label, spec=c.teacher.model, module=stage.module, variables=variables,
                        source="train", epoch=epoch), [outcome]


def teacher_stores(ctx: Context, teacher: TeacherModel) -> tuple:
    """``(train_store, eval_store)`` of ``teacher`` under ``teacher.store``, computed if missing."""
    c, data = ctx.config, ctx.data
    stores = []
    for split in (data.train_split, data.eval_split):
        spec = store_spec(c, data, split, teacher)
        stores.append(compute_store(os.path.join(c.teacher.store, split), spec, teacher, data,
                                    ctx.mesh, resume=True, progress=c.run.progress))
    return tuple(stores)


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
                 tx=_stage_tx(c, data, c.num_epochs), num_epochs=c.num_epochs, teacher=teacher,
                 stores=stores, export_epochs=tuple(c.run.save_epochs), row=info)


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
            return _outcome(ctx, outcomes)
    stores = teacher_stores(ctx, teacher) if teacher is not None and c.teacher.precomputed else None
    for i, spec in enumerate(c.assistants, start=1):
        stage = kd_stage(ctx, name=f"assistant{i}", role="assistant", spec=spec, teacher=teacher,
                         mode=mode, stores=stores)
        outcome = run_stage(stage, ctx)
        outcomes.append(outcome)
        if outcome.stopped_early:
            return _outcome(ctx, outcomes)
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
    return _outcome(ctx, outcomes)


def run_teacher(config: ml_collections.ConfigDict, workdir: str) -> RunOutcome:
    """Trains ``config.teacher.model`` on labels, keeping ``teacher.early_epoch`` and
    ``run.save_epochs`` snapshots; the workdir then serves as ``teacher.source='checkpoint'``."""
    validate_config(config, "teacher")
    ctx = make_context(config, workdir)
    outcome = run_stage(teacher_stage(ctx), ctx)
    return _outcome(ctx, [outcome])


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
    ``weight_start`` to ``weight_end`` over the stage: as ``recipe.kd`` is ``T^2 KL`` (same
    gradient as the cross-entropy ``H``, times ``T^2``), its weight is ``lambda / T^2``.
    """
    from kdjax.models import WithRegressor

    validate_config(config, "fitnet")
    ctx = make_context(config, workdir)
    c, data, f = ctx.config, ctx.data, ctx.config.fitnet
    teacher, outcomes = obtain_teacher(ctx)
    if teacher is None:
        return _outcome(ctx, outcomes)
    hint_shape = _feature_shape(teacher.module, teacher.variables, data.sample_input, f.hint_layer,
                                "fitnet.hint_layer")
    bare = build_model(c.student.model, data.num_classes, c.student.dtype)
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
    stage1 = Stage(
        name="fitnet_stage1", role="fitnet_stage1", model=c.student.model, module=student1,
        recipe=(recipe_lib.hint(f"{f.guided_layer}_regressed", f.hint_layer, weight=1.0,
                                normalize=bool(f.hint_normalize)),),
        tx=_stage_tx(c, data, f.stage1_epochs, trainable=lambda name: name in trained,
                     kind=f.stage1_schedule, lr=f.stage1_lr),
        num_epochs=f.stage1_epochs, teacher=teacher, evaluate=False,
        row={"teacher": teacher.label, "kd_mode": "hint", "reading": "none",
             "trained_modules": sorted(trained)})
    outcome1 = run_stage(stage1, ctx)
    outcomes.append(outcome1)
    if outcome1.stopped_early:
        return _outcome(ctx, outcomes)
    stage1_vars = outcome1.variables(student1, data.sample_input)
    init2 = {"params": {k: v for k, v in stage1_vars["params"].items() if k != "regressor"},
             "batch_stats": stage1_vars["batch_stats"]}
    steps = c.num_epochs * data.steps_per_epoch
    t2 = float(f.temperature) ** 2
    weight = schedules.linear(f.weight_start / t2, f.weight_end / t2, 0, max(steps, 1))
    stage2 = Stage(
        name="fitnet_stage2", role="student", model=c.student.model, module=bare,
        recipe=(recipe_lib.ce(1.0), recipe_lib.kd(f.temperature, weight)),
        tx=_stage_tx(c, data, c.num_epochs), num_epochs=c.num_epochs, teacher=teacher,
        init_params=init2, export_epochs=tuple(c.run.save_epochs),
        row={"teacher": teacher.label, "kd_mode": "fitnet", "reading": "none",
             "temperature": f.temperature, "paper_error": c.paper.student_error,
             "paper_teacher_error": c.paper.teacher_error, "paper_source": c.paper.source,
             "paper_note": c.paper.note})
    outcomes.append(run_stage(stage2, ctx))
    return _outcome(ctx, outcomes)


def _outcome(ctx: Context, outcomes: Sequence[StageOutcome]) -> RunOutcome:
    stopped = any(o.stopped_early for o in outcomes)
    summaries = [o.summary for o in outcomes if o.summary is not None]
    for s in summaries:
        s["dir"] = os.path.join(STAGES_DIR, s["stage"])
    if not stopped:
        _write_json(os.path.join(ctx.workdir, RESULTS_FILE),
                    {"name": ctx.config.name, "stages": summaries})
    return RunOutcome(workdir=ctx.workdir, summaries=summaries, stopped_early=stopped)


def finish(config: ml_collections.ConfigDict, outcome: RunOutcome) -> int:
    """Writes the report of a finished run (process 0) and returns the exit status (0).

    A preempted run writes nothing more: the next start resumes it.
    """
    if outcome.stopped_early:
        log(f"stopped early (preemption); rerun the same command to resume {outcome.workdir}.")
        return 0
    if jax.process_index() == 0:
        from experiments import report

        path = report.write_report(outcome.workdir, title=config.name or config.experiment,
                                   summaries=outcome.summaries, paper_source=config.paper.source)
        log(f"report: {path}")
    return 0


def initialize(args: Args) -> None:
    """Multi-host set-up (``--distributed``: ``jax.distributed.initialize()``, before any JAX work)."""
    if args.distributed:
        jax.distributed.initialize()
