"""The config schema every experiment config fills in, and the parser of ``--config=file.py:ARG``.

Every experiment config is a Python file with ``get_config(arg=None)`` returning a *locked*
``ml_collections.ConfigDict`` (big_vision style). ``arg`` selects a grid cell, e.g.
``--config=experiments/configs/imagenet_eskd.py:teacher=resnet34,mode=eskd``; single words are
boolean switches (``...:teacher=resnet50,smoke``). Individual keys are then overridden on the
command line with ``--config.key=value`` (unknown keys are an error).

All configs share one schema (built by :func:`kd_config`), so every key below exists in every
config and can be overridden; :func:`experiments.validate.validate_config` checks the values.

Model specs are strings ``"name"`` or ``"name:key=value,key=value"`` with the model attributes
of :func:`kdjax.models.create` (e.g. ``"cnn1d:width=64"``, ``"resnet50"``).

Schema (``placeholder`` keys may be None):

* ``experiment``: ``'kd'`` (scratch / KD / ESKD / teacher-assistant chains), ``'fitnet'`` or
  ``'teacher'`` (train one model on labels, keeping early-epoch snapshots).
* ``name``: a label for the run (report title).
* ``seed``: integer seed (data order, augmentation and initialisation).
* ``num_epochs``: epochs of each student stage.
* ``dataset``: ``name`` (``imagenet2012`` | ``mnist1d`` | ``digits``), ``data_dir`` (TFDS
  directory, ImageNet), ``train_split`` / ``eval_split``, ``num_samples`` (MNIST-1D size),
  ``image_size`` / ``resize_size`` (ImageNet crops), ``batch_size`` / ``eval_batch_size`` (global),
  ``num_threads`` / ``prefetch`` (grain reader threads and buffer), ``rgb`` (small datasets:
  repeat the grey channel 3 times, so ImageNet-layout models such as a torchvision teacher apply),
  ``augment`` (small datasets' train transform: ``''`` none, the default; ``'shift_noise'`` the demo
  notebook's MNIST-1D augmentation, a roll by a shift in [-4, 4] plus N(0, 0.2^2) noise,
  :func:`experiments.datasets.shift_noise`; the eval view stays unaugmented).
* ``optimizer``: ``name`` (``sgd`` | ``adam`` | ``adamw``), ``lr`` (peak learning rate at batch
  ``lr_batch``; the rate used is ``lr * batch_size / lr_batch``), ``momentum``, ``nesterov``,
  ``weight_decay``, ``schedule`` (``step`` | ``cosine`` | ``constant``), ``decay_epochs`` /
  ``decay_factor`` (step schedule), ``warmup_epochs``.
* ``student`` / ``teacher``: ``model`` (spec), ``dtype`` (compute dtype ``float32`` | ``bfloat16``).
  Teacher only: ``source`` (``none`` | ``train`` | ``checkpoint`` | ``torchvision``), ``path`` (a
  checkpoint directory or a torchvision ``.npz`` / ``.safetensors`` file), ``early_epoch`` (take the
  teacher from this epoch of its own training), ``num_epochs`` (teacher training length when
  ``source='train'``; None: ``num_epochs``), ``lr`` (its own peak learning rate when trained in the
  run; None: ``optimizer.lr``), ``precomputed`` / ``store`` / ``store_format`` / ``store_k`` /
  ``store_dtype`` (read the teacher's logits from a logit store instead of running it),
  ``store_views`` (``''``: the train store holds the unaugmented eval view of each example;
  ``'epochs:0-89'``: a view store, the teacher's outputs on every augmented view the run draws in
  those epochs, keyed by ``(epoch, id)``; must cover ``0 .. num_epochs - 1``).
* ``kd``: ``mode`` (``scratch`` | ``full`` | ``eskd``), ``reading`` of early stopping for ``eskd``
  (``stop_kd``: KD weight 0 from ``stop_epoch`` on; ``early_teacher``: the teacher from
  ``teacher.early_epoch``), ``temperature``, ``weight`` (KD weight), ``ce_weight``, ``stop_epoch``.
* ``assistants``: model specs of the teacher-assistant chain, largest first (empty: no chain).
* ``fitnet``: ``hint_layer`` (teacher feature), ``guided_layer`` (student feature),
  ``regressor_kind`` / ``regressor_kernel`` / ``regressor_padding`` / ``regressor_relu`` (default
  True: end ``r`` in a ReLU, as the paper asks when the hint is a post-ReLU map), ``stage1_epochs``,
  ``stage1_schedule`` (learning-rate schedule of stage 1: ``cosine`` | ``constant`` | ``step``),
  ``stage1_lr`` (stage 1's peak learning rate at batch ``optimizer.lr_batch``; None: ``optimizer.lr``),
  ``hint_normalize`` (hint loss as the mean over feature elements instead of the paper's sum: the
  same direction, the gradient divided by the feature size, so one learning rate fits any layer),
  ``temperature``, ``weight_start`` / ``weight_end`` (stage 2's KD weight lambda, annealed linearly).
* ``run``: ``eval_every_epochs``, ``checkpoint_every_epochs``, ``log_every_steps``, ``keep``
  (checkpoints kept), ``best_metric``, ``nonfinite`` (``stop`` | ``skip``), ``progress``,
  ``mesh_data`` / ``mesh_fsdp`` (device mesh), ``param_mode`` / ``teacher_mode``
  (``replicate`` | ``fsdp``), ``teacher_devices`` (0: a live teacher runs inside the step on the
  mesh; k > 0: on the last k devices of its own, ahead of the student, whose mesh takes the rest:
  ``kdjax.teachers.on_devices``, one process; on a CPU with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` and k = 1 the two overlap on its cores),
  ``save_epochs`` (extra epochs at which a trained model's variables are kept under
  ``<stage>/epochs/``), ``allow_config_change`` (resume a workdir although keys that shape the
  results changed since it started: refused otherwise, see ``experiments.stages.RESUMABLE_KEYS``).
* ``paper``: the published numbers for this cell (display only; see the config files).
"""

from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections import config_dict


def _parse_value(text: str, default: Any, key: str) -> Any:
    """``text`` converted to the type of ``default`` (bool switches, ints, floats, strings)."""
    if isinstance(default, bool):
        lowered = text.lower()
        if lowered in ("1", "true", "yes"):
            return True
        if lowered in ("0", "false", "no"):
            return False
        raise ValueError(f"config arg {key}={text!r}: expected a boolean (true/false).")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"config arg {key}={text!r}: expected an integer.") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"config arg {key}={text!r}: expected a number.") from None
    return text


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses a config file's ``ARG`` (``"k=v,k2=v2,switch"``) against ``defaults``.

    A bare word ``switch`` sets the boolean default ``switch`` to True. Values take the type of
    their default. Unknown keys raise ValueError listing the valid ones.
    """
    out = dict(defaults)
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, eq, text = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"unknown config arg {key!r} in {arg!r}; valid args: "
                             f"{', '.join(sorted(defaults))}.")
        if not eq:
            if not isinstance(defaults[key], bool):
                raise ValueError(f"config arg {key!r} needs a value ({key}=...); only boolean args "
                                 f"are bare switches.")
            out[key] = True
        else:
            out[key] = _parse_value(text.strip(), defaults[key], key)
    return ml_collections.ConfigDict(out)


def kd_config() -> ml_collections.ConfigDict:
    """The full schema with neutral defaults; experiment configs fill in the values (unlocked)."""
    c = ml_collections.ConfigDict()
    c.experiment = "kd"
    c.name = ""
    c.seed = 0
    c.num_epochs = 1

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "mnist1d"
    c.dataset.data_dir = config_dict.placeholder(str)
    c.dataset.train_split = "train"
    c.dataset.eval_split = "test"
    c.dataset.num_samples = config_dict.placeholder(int)
    c.dataset.image_size = 224
    c.dataset.resize_size = 256
    c.dataset.batch_size = 128
    c.dataset.eval_batch_size = 256
    c.dataset.num_threads = 0
    c.dataset.prefetch = 256
    c.dataset.rgb = False
    c.dataset.augment = ""

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "sgd"
    c.optimizer.lr = 0.1
    c.optimizer.lr_batch = 256
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = False
    c.optimizer.weight_decay = 1e-4
    c.optimizer.schedule = "step"
    c.optimizer.decay_epochs = (30, 60)
    c.optimizer.decay_factor = 0.1
    c.optimizer.warmup_epochs = 0

    c.student = ml_collections.ConfigDict()
    c.student.model = "cnn1d"
    c.student.dtype = "float32"

    c.teacher = ml_collections.ConfigDict()
    c.teacher.model = ""
    c.teacher.dtype = "float32"
    c.teacher.source = "none"
    c.teacher.path = config_dict.placeholder(str)
    c.teacher.early_epoch = config_dict.placeholder(int)
    c.teacher.num_epochs = config_dict.placeholder(int)
    c.teacher.lr = config_dict.placeholder(float)
    c.teacher.precomputed = False
    c.teacher.store = config_dict.placeholder(str)
    c.teacher.store_format = "full"
    c.teacher.store_k = config_dict.placeholder(int)
    c.teacher.store_dtype = "float32"
    c.teacher.store_views = ""

    c.kd = ml_collections.ConfigDict()
    c.kd.mode = "scratch"
    c.kd.reading = "stop_kd"
    c.kd.temperature = 4.0
    c.kd.weight = 0.9
    c.kd.ce_weight = 0.1
    c.kd.stop_epoch = config_dict.placeholder(int)

    c.assistants = ()

    c.fitnet = ml_collections.ConfigDict()
    c.fitnet.hint_layer = "stage2"
    c.fitnet.guided_layer = "stage2"
    c.fitnet.regressor_kind = "conv"
    c.fitnet.regressor_kernel = 1
    c.fitnet.regressor_padding = "SAME"
    c.fitnet.regressor_relu = True
    c.fitnet.stage1_epochs = 1
    c.fitnet.stage1_schedule = "cosine"
    c.fitnet.hint_normalize = True
    c.fitnet.stage1_lr = config_dict.placeholder(float)
    c.fitnet.temperature = 3.0
    c.fitnet.weight_start = 4.0
    c.fitnet.weight_end = 1.0

    c.run = ml_collections.ConfigDict()
    c.run.eval_every_epochs = 1
    c.run.checkpoint_every_epochs = 1
    c.run.log_every_steps = 50
    c.run.keep = 3
    c.run.best_metric = "accuracy"
    c.run.nonfinite = "stop"
    c.run.progress = True
    c.run.mesh_data = -1
    c.run.mesh_fsdp = 1
    c.run.param_mode = "replicate"
    c.run.teacher_mode = "replicate"
    c.run.teacher_devices = 0
    c.run.save_epochs = ()
    c.run.allow_config_change = False

    c.paper = ml_collections.ConfigDict()
    c.paper.source = ""
    c.paper.student_error = config_dict.placeholder(float)
    c.paper.teacher_error = config_dict.placeholder(float)
    c.paper.note = ""
    return c


def imagenet_protocol(c: ml_collections.ConfigDict) -> None:
    """The ImageNet data and optimizer settings every ImageNet config shares (set in place).

    TFDS imagenet2012 train / validation at 224 (eval: resize 256, centre crop 224), global batch
    256; torchvision's reference recipe: SGD momentum 0.9, lr 0.1 per 256 examples, weight decay
    1e-4, 90 epochs, lr / 10 at epochs 30 and 60.
    """
    c.num_epochs = 90
    c.dataset.name = "imagenet2012"
    c.dataset.train_split = "train"
    c.dataset.eval_split = "validation"
    c.dataset.image_size = 224
    c.dataset.resize_size = 256
    c.dataset.batch_size = 256
    c.dataset.eval_batch_size = 1024
    c.dataset.num_threads = 16
    c.dataset.prefetch = 256
    c.optimizer.name = "sgd"
    c.optimizer.lr = 0.1
    c.optimizer.lr_batch = 256
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 1e-4
    c.optimizer.schedule = "step"
    c.optimizer.decay_epochs = (30, 60)
    c.optimizer.decay_factor = 0.1


def smoke_on_digits(c: ml_collections.ConfigDict, source: str) -> None:
    """An ImageNet config's ``smoke`` mode (set in place): the same cell for two short epochs on
    scikit-learn digits on a CPU (CI), with the teacher (if any) trained in the run instead of
    loaded from torchvision weights. The caller swaps in its tiny models."""
    c.name += "/smoke"
    c.num_epochs = 2
    c.dataset.name = "digits"
    c.dataset.train_split = "train"
    c.dataset.eval_split = "test"
    c.dataset.batch_size = 128
    c.dataset.eval_batch_size = 384
    c.dataset.num_threads = 0
    c.optimizer.decay_epochs = (1,)
    if c.teacher.model:
        c.teacher.source = "train" if source == "torchvision" else source
        c.teacher.num_epochs = 2
    c.run.log_every_steps = 5
    c.run.progress = False
