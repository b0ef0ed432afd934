"""The training loop: data pipeline -> sharded train step -> metrics, eval, checkpoints, preemption.

:func:`fit` runs ``num_steps`` updates of a student (optionally distilled from a teacher) and is
safe to kill at any moment. It builds (student state, teacher placement, steps), resumes, then
loops. Its settings (eval, checkpoint and log cadence, kept checkpoints, best metric, non-finite
policy, progress, preemption, prefetch) are one frozen, self-checking :class:`FitOptions`; a
precomputed teacher's logit stores are passed by name (``train_store``, ``eval_store``: each
split's batches read their own split's store):

* **Resume.** If ``<workdir>/checkpoints`` holds a checkpoint, the newest good one is restored
  (train state *and* the data iterator's position) and training continues from it. Because the
  dropout key is ``fold_in(state.rng, state.step)`` and the data stream is a pure function of the
  iterator state, a resumed run computes exactly the same updates as an uninterrupted one: its
  final parameters are bit-identical (same config, same device count).
* **Preemption.** A :class:`kdjax.preemption.PreemptionWatcher` records SIGTERM; after the step
  that is running, the state is checkpointed (forced, waited for) and ``fit`` returns with
  ``stopped_early=True``; the entry point should then exit with status 0.
* **Non-finite losses.** The step skips any update whose loss or gradient norm is not finite
  (``make_train_step(guard_nonfinite=True)``), so the state never holds NaN/Inf. With
  ``nonfinite='stop'`` the loop raises :class:`NonFiniteLossError` naming the first bad step and the
  loss term(s) (or ``'gradient'``) before any later checkpoint is written; with ``'skip'`` it
  counts (``FitResult.skipped_steps``), logs a warning and goes on. The Checkpointer refuses
  non-finite state too, so no checkpoint ever holds NaN.

Per step the host only dispatches work: metrics stay on the device and are fetched every
``log_every`` steps (and before each eval, checkpoint or stop, so a non-finite step is always found
before a checkpoint is written). A logged train record holds the mean of each metric over the
finite steps since the previous record, ``skipped`` (cumulative skipped updates) and
``steps_per_sec``.

Checkpoints (``<workdir>/checkpoints``, see :mod:`kdjax.checkpointing`) are written every
``checkpoint_every`` steps, after every eval when ``best_metric`` is set (so the best-by-eval step
is kept besides the newest ``keep``), at a preemption and after the last step. Metrics go to
``<workdir>/metrics.jsonl`` and ``<workdir>/tb`` (see :mod:`kdjax.metrics`), from process 0 only;
on resume the records logged after the restored step are dropped, since those steps are redone.
Process 0 prints ``<name>: resuming from step N of M`` when it resumes; while the progress bar
is shown, log records print above it.

Multi-process: every process runs ``fit`` with the same arguments and its own host-local
``train_iter`` (e.g. ``make_train_iterator`` with the default process index); all take part in
checkpointing; ``history``/``eval_history`` of steps before a resume are re-read from
``metrics.jsonl`` and so are only known to process 0.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import math
import os
import threading
import time
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.traverse_util
from flax.core import unfreeze
import jax
import numpy as np
import optax
from jax.sharding import Mesh

from kdjax import checkpointing, metrics as metrics_lib, sharding, teachers, train
from kdjax.data.pipeline import prefetch_to_device
from kdjax.logit_store import LogitStore
from kdjax.preemption import PreemptionWatcher
from kdjax.recipe import Term, teacher_features as recipe_features
from kdjax.teachers import Teacher

logger = logging.getLogger(__name__)

NONFINITE_POLICIES = ("stop", "skip")
CHECKPOINT_DIR = "checkpoints"
EVAL_METRICS = ("accuracy", "ce")
TEACHER_EVAL_METRICS = ("teacher_accuracy", "agreement", "kl")
_LOWER_IS_BETTER = ("ce", "kl")


class NonFiniteLossError(FloatingPointError):
    """A train step produced a NaN/Inf loss or gradient under ``nonfinite='stop'``.

    Attributes:
      step: 0-based index of the update (the value of ``state.step`` when it ran).
      terms: names of the non-finite loss terms (recipe term names); ``['total']`` when every term
        was finite but the weighted sum was not; ``['gradient']`` when the loss was finite but the
        gradient norm was not.
    """

    def __init__(self, message: str, step: int, terms: Sequence[str]):
        super().__init__(message)
        self.step = step
        self.terms = list(terms)


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns.

    state: the final ``TrainState`` (device arrays on the mesh).
    history: logged train records (``step`` = updates done, metric means over the log window).
    eval_history: eval records (``step``, ``accuracy``, ``ce``, ``num_examples``; with a teacher
      giving logits also ``teacher_accuracy``, ``agreement``, ``kl``).
    best: the eval record with the best ``best_metric`` (None without eval or best_metric).
    stopped_early: True when a preemption signal stopped the run (a checkpoint was written).
    skipped_steps: updates skipped as non-finite (cumulative over resumes).
    """
    state: train.TrainState
    history: list[dict]
    eval_history: list[dict]
    best: dict | None
    stopped_early: bool
    skipped_steps: int


# ----------------------------------------------------------------------------------------------
# Options, argument and batch validation.
# ----------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """How :func:`fit` runs, apart from what it trains: eval, checkpoint and log cadence, what is
    kept, the non-finite policy, progress bar, preemption and input pipeline.

    Frozen, and checked when built: a bad value raises the ValueError naming the field that
    ``fit`` gave for it. ``options.replace(**changes)`` returns a checked copy. The checks that
    depend on the run (``eval_every`` needs an ``eval_iter_fn``; teacher metrics for
    ``best_metric`` need a teacher) are made by ``fit``.

    Attributes:
      eval_every: evaluate every this many steps (0: only after the last step, if eval_iter_fn).
      checkpoint_every: checkpoint every this many steps (0: only at eval/preemption/the end).
      log_every: fetch, check and log train metrics every this many steps.
      keep: newest checkpoints kept (plus the best-by-``best_metric`` one).
      best_metric: eval metric that ranks checkpoints and picks ``FitResult.best`` (None: off).
      best_mode: ``'max'``/``'min'``; default (None) ``'min'`` for ``ce``/``kl``, else ``'max'``.
      nonfinite: ``'stop'`` (raise :class:`NonFiniteLossError`) or ``'skip'``.
      progress: tqdm bar on process 0. name: the bar's label.
      input_key: batch key of the student's input.
      handle_preemption: install the SIGTERM watcher (needs the main thread).
      async_checkpoint: write checkpoints in the background while training goes on.
      prefetch: device batches prepared ahead in a background thread.
      announce_resume: print ``<name>: resuming from step N of M`` when resuming (False: the
        caller continues its own run in segments, e.g. to export an epoch's snapshot).
    """
    eval_every: int = 0
    checkpoint_every: int = 0
    log_every: int = 100
    keep: int = 3
    best_metric: str | None = "accuracy"
    best_mode: str | None = None
    nonfinite: str = "stop"
    progress: bool = True
    name: str = "train"
    input_key: str = "image"
    handle_preemption: bool = True
    async_checkpoint: bool = True
    prefetch: int = 2
    announce_resume: bool = True

    def __post_init__(self) -> None:
        _check_int("eval_every", self.eval_every, 0)
        _check_int("checkpoint_every", self.checkpoint_every, 0)
        _check_int("log_every", self.log_every, 1)
        _check_int("keep", self.keep, 1)
        _check_int("prefetch", self.prefetch, 1)
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES} ('stop' raises "
                             f"NonFiniteLossError, 'skip' skips the update and goes on); got "
                             f"{self.nonfinite!r}.")
        if self.best_mode not in (None, "max", "min"):
            raise ValueError(f"best_mode must be None (inferred from best_metric), 'max' or "
                             f"'min'; got {self.best_mode!r}.")
        if not isinstance(self.input_key, str) or not self.input_key:
            raise TypeError(f"input_key must be a batch key (a non-empty str); got "
                            f"{self.input_key!r}.")

    def replace(self, **changes: Any) -> "FitOptions":
        """A copy with ``changes`` (checked like a new one)."""
        return dataclasses.replace(self, **changes)

    @property
    def rank_mode(self) -> str:
        """``best_mode``, or the direction in which ``best_metric`` improves."""
        return self.best_mode or ("min" if self.best_metric in _LOWER_IS_BETTER else "max")

    def _check_run(self, *, evaluates: bool, has_teacher: bool) -> None:
        """The checks that need the run: an eval to schedule, a teacher for teacher metrics."""
        if self.eval_every and not evaluates:
            raise ValueError(f"eval_every={self.eval_every} but no eval_iter_fn was given; pass "
                             f"eval_iter_fn=lambda: make_eval_iterator(...) or set eval_every=0.")
        if self.best_metric is not None:
            allowed = EVAL_METRICS + (TEACHER_EVAL_METRICS if has_teacher else ())
            if self.best_metric not in allowed:
                raise ValueError(f"best_metric {self.best_metric!r} is not an eval metric of this "
                                 f"run; use one of {allowed} or None.")


_OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(FitOptions))


def _removed_arguments(names) -> TypeError:
    """The TypeError for keyword arguments ``fit`` no longer takes."""
    names = sorted(names)
    moved = [n for n in names if n in _OPTION_NAMES]
    if moved:
        return TypeError(
            f"fit() takes {moved} in its options now: pass options=kdjax.loop.FitOptions("
            f"{', '.join(f'{n}=...' for n in moved)}).")
    if "eval_batch_transform" in names:
        return TypeError(
            "fit() no longer takes eval_batch_transform: pass the eval split's logit store as "
            "eval_store=LogitStore.open(...) (and the train split's as train_store=); "
            "batch_transform serves train and eval batches.")
    return TypeError(f"fit() got an unexpected keyword argument {names[0]!r}.")


def _check_model(*, workdir, student, tx, num_steps, sample_input, seed, param_mode,
                 init_params) -> None:
    """Raises ValueError/TypeError naming the first bad argument about what ``fit`` trains."""
    if not isinstance(workdir, (str, os.PathLike)) or not os.fspath(workdir):
        raise TypeError(f"workdir must be a non-empty path; got {workdir!r}.")
    if not (train.is_nnx(student) or (hasattr(student, "init") and hasattr(student, "apply"))):
        raise TypeError(f"student must be a Flax Linen module (e.g. kdjax.models.create('mlp', 10)) "
                        f"or a Flax NNX module; got {type(student).__name__}.")
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(f"tx must be an optax.GradientTransformation (e.g. optax.adam(1e-3)); "
                        f"got {type(tx).__name__}.")
    _check_int("num_steps", num_steps, 1)
    _check_int("seed", seed, 0)
    if np.ndim(sample_input) < 1:
        raise ValueError(f"sample_input must be an example batch [b, ...] (only its shape and dtype "
                         f"matter); got {sample_input!r:.100}.")
    if param_mode not in ("replicate", "fsdp"):
        raise ValueError(f"param_mode must be 'replicate' or 'fsdp'; got {param_mode!r}.")
    if init_params is not None and train.is_nnx(student):
        raise TypeError("init_params is for Linen students; an NNX student starts from its own "
                        "variables: put the weights into it (nnx.update(model, state)) before fit.")


def _check_teacher(*, teacher, teacher_variables, teacher_mode, teacher_mesh, recipe) -> None:
    """Raises ValueError/TypeError naming the first bad teacher argument of ``fit``."""
    if teacher_mode not in ("replicate", "fsdp"):
        raise ValueError(f"teacher_mode must be 'replicate' or 'fsdp'; got {teacher_mode!r}.")
    if teacher is not None and not isinstance(teacher, Teacher):
        raise TypeError(f"teacher must be a kdjax.teachers.Teacher (teachers.from_linen(module), "
                        f"teachers.precomputed(), ...); got {type(teacher).__name__}.")
    if teacher is None and teacher_variables is not None:
        raise ValueError("teacher_variables were given without a teacher; pass teacher=kdjax."
                         "teachers.from_linen(module) (or drop teacher_variables).")
    if teacher is not None and teacher.live and teacher_variables is None:
        raise ValueError("a live teacher needs its frozen variables: pass teacher_variables= "
                         "(e.g. the teacher's {'params': ..., 'batch_stats': ...}).")
    if teacher_mesh is None:
        return
    if teacher is None or not teacher.live:
        raise ValueError("teacher_mesh runs a live teacher on its own devices, but the "
                         "teacher is " + ("missing" if teacher is None else "precomputed")
                         + "; pass a live teacher (teachers.from_linen(...)) and its "
                         "teacher_variables, or drop teacher_mesh.")
    if recipe_features(recipe):
        raise ValueError(
            f"teacher_mesh hands the step the teacher's logits only, but the recipe reads its "
            f"features {recipe_features(recipe)} (hint/attention terms); run the teacher "
            f"inside the step (teacher_mesh=None; experiments: config.run.teacher_devices=0).")


def _check_data(*, train_iter, eval_iter_fn, batch_transform, train_store, eval_store,
                teacher) -> None:
    """Raises ValueError/TypeError naming the first bad data argument of ``fit``, including the
    teacher-data contract: a logit store is passed by name, for its own split, with
    ``teachers.precomputed()``."""
    if not (hasattr(train_iter, "__next__") and hasattr(train_iter, "get_state")
            and hasattr(train_iter, "set_state")):
        raise TypeError(
            f"train_iter must be a checkpointable iterator with __next__, get_state and set_state "
            f"(kdjax.data.make_train_iterator gives one); got {type(train_iter).__name__}. Its state "
            f"is saved with every checkpoint so a resumed run sees the same batches.")
    if eval_iter_fn is not None and not callable(eval_iter_fn):
        raise TypeError(f"eval_iter_fn must be a function returning a fresh eval iterator; got "
                        f"{type(eval_iter_fn).__name__}.")
    if batch_transform is not None and not callable(batch_transform):
        raise TypeError(f"batch_transform must be a function batch -> batch (e.g. an "
                        f"augmentation); got {type(batch_transform).__name__}.")
    stores = {"train_store": train_store, "eval_store": eval_store}
    for arg, store in stores.items():
        if store is not None and not isinstance(store, LogitStore):
            raise TypeError(f"{arg} must be a kdjax.logit_store.LogitStore (LogitStore.open(path)) "
                            f"or None; got {type(store).__name__}.")
    given = [arg for arg, store in stores.items() if store is not None]
    if given and (teacher is None or teacher.live):
        raise ValueError(
            f"{given[0]} holds a precomputed teacher's outputs, which only teachers.precomputed() "
            f"reads, but the teacher is {'missing' if teacher is None else 'live'}; pass "
            f"teacher=kdjax.teachers.precomputed() (or drop the stores).")
    if eval_store is not None and eval_iter_fn is None:
        raise ValueError("eval_store was given but no eval_iter_fn; pass eval_iter_fn=lambda: "
                         "make_eval_iterator(...) for the store's split, or drop eval_store.")
    if train_store is not None and eval_iter_fn is not None and eval_store is None:
        raise ValueError(
            f"train_store is the logit store of split {train_store.spec.split!r}, but the eval "
            f"batches need the teacher outputs of their own split (their example ids index "
            f"another store); pass eval_store=LogitStore.open(<store of the eval split>) (or "
            f"eval_iter_fn=None).")


def _check_store(arg: str, store: LogitStore | None, num_classes: int,
                 best_metric: str | None) -> None:
    """The class-count check of a logit store: refuses a store of a teacher with another class
    count than the student's ``num_classes`` (a top-k store's indices would otherwise train the
    student silently on the wrong label space); and a teacher ``best_metric`` with a top-k store
    for eval (its eval gives no teacher metrics)."""
    if store is None:
        return
    if store.spec.num_classes != num_classes:
        raise ValueError(
            f"{arg} is a logit store of a {store.spec.num_classes}-class teacher "
            f"({store.spec.teacher}) but the student has {num_classes} classes; the teacher "
            f"and student must share the label space (build the student with num_classes="
            f"{store.spec.num_classes}, or use a store of a teacher on these classes).")
    if arg == "eval_store" and store.spec.format == "topk":
        _check_best_metric(best_metric, EVAL_METRICS)


def _check_best_metric(best_metric: str | None, metrics) -> None:
    if best_metric is not None and best_metric not in metrics:
        raise ValueError(
            f"best_metric {best_metric!r} is not among this run's eval metrics {sorted(metrics)}: "
            f"teacher metrics need a teacher with full logits at eval (a top-k store gives none); "
            f"use best_metric='accuracy' (or another of those).")


def _with_index_check(transform: Callable[[Any], Any] | None, num_classes: int, where: str):
    """``transform``, then a host check that the top-k teacher classes it adds
    (``teacher_topk_indices``) are the student's ``[0, num_classes)``: out of range they would
    make the loss NaN, and the run would stop blaming the learning rate."""
    if transform is None:
        return None

    def checked(batch):
        out = transform(batch)
        idx = np.asarray(out.get("teacher_topk_indices", ())) if isinstance(out, Mapping) else ()
        if np.size(idx) and (idx.min() < 0 or idx.max() >= num_classes):
            raise ValueError(
                f"{where} added teacher_topk_indices in [{idx.min()}, {idx.max()}] but the student "
                f"has {num_classes} classes; the teacher and student must share the label space "
                f"(use a store of a teacher on these classes).")
        return out
    return checked


def _host_transform(store: LogitStore | None, batch_transform: Callable[[Any], Any] | None,
                    num_classes: int) -> Callable[[Any], Any] | None:
    """The host transform of one split's batches: the store's teacher outputs added (the store
    was checked against the student by :func:`_check_store`), then ``batch_transform``, whose
    top-k teacher classes are checked."""
    transform = _with_index_check(batch_transform, num_classes, "batch_transform")
    if store is None:
        return transform
    if transform is None:
        return store.add_to_batch
    return lambda batch: transform(store.add_to_batch(batch))


def _check_batch(batch: Any, *, input_key: str, example_shape: tuple[int, ...], num_classes: int,
                 num_devices: int, where: str) -> None:
    """Host-side check of one host-local batch before it goes to the device (cheap: shapes and the
    label range only), so a data/model mismatch fails with its cause instead of deep in XLA."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"{where} yielded a {type(batch).__name__}; batches must be dicts of arrays "
                        f"{{'{input_key}', 'label', ...}}.")
    missing = sorted({input_key, "label"} - set(batch))
    if missing:
        raise ValueError(f"{where} batch is missing key(s) {missing}; it has {sorted(batch)}.")
    shape = tuple(np.shape(batch[input_key]))
    if shape[1:] != example_shape:
        raise ValueError(
            f"{where} batch[{input_key!r}] has shape {shape}, i.e. examples of shape {shape[1:]}, but "
            f"the student was initialised for examples of shape {example_shape} (sample_input "
            f"[b, {', '.join(map(str, example_shape))}]). Make the data pipeline produce that shape "
            f"or build the student and sample_input for {shape[1:]}.")
    rows = shape[0]
    global_rows = rows * jax.process_count()
    if global_rows % num_devices:
        raise ValueError(
            f"{where} batch has {rows} rows per process ({global_rows} global), not divisible by "
            f"the {num_devices} devices of the mesh; use a global batch size that is a multiple "
            f"of {num_devices}.")
    labels = np.asarray(batch["label"])
    if labels.shape != (rows,):
        raise ValueError(f"{where} batch['label'] has shape {labels.shape}; expected ({rows},) "
                         f"integer class indices.")
    mask = batch.get("mask")
    real = labels if mask is None else labels[np.asarray(mask, bool)]
    if real.size and (real.min() < 0 or real.max() >= num_classes):
        raise ValueError(
            f"{where} batch has labels in [{real.min()}, {real.max()}] but the student has "
            f"{num_classes} classes (labels must be in [0, {num_classes})); build the student with "
            f"the dataset's number of classes.")


class _HostBatches:
    """Host-side stage of the input pipeline: check each batch, then apply ``batch_transform``."""

    def __init__(self, iterator: Iterator, check: Callable[[Any], None],
                 transform: Callable[[Any], Any] | None):
        self._it = iterator
        self._check = check
        self._transform = transform

    def __iter__(self) -> "_HostBatches":
        return self

    def __next__(self) -> Any:
        batch = next(self._it)
        self._check(batch)
        return batch if self._transform is None else self._transform(batch)


class _TrainBatches(_HostBatches):
    """:class:`_HostBatches` whose ``get_state``/``set_state`` are those of the wrapped iterator,
    so the state saved in a checkpoint is the position of the user's ``train_iter``."""

    def get_state(self) -> Any:
        return self._it.get_state()

    def set_state(self, state: Any) -> None:
        self._it.set_state(state)


# ----------------------------------------------------------------------------------------------
# Initial parameters.
# ----------------------------------------------------------------------------------------------

_INIT_COLLECTIONS = ("params", "batch_stats")


def merge_init_params(state: train.TrainState, init_params: Mapping[str, Any], tx,
                      state_shardings: train.TrainState) -> train.TrainState:
    """Overwrites leaves of a freshly initialised ``state`` with those of ``init_params``.

    Merge rule: ``init_params`` is ``{'params': tree, 'batch_stats': tree}`` with either key
    optional; each tree may be partial. Every leaf it has replaces the leaf at the same path of
    the fresh state (the path must exist in the student, with the same shape and dtype, else
    ValueError); leaves it does not have keep their fresh initialisation. The optimizer state is
    then re-initialised with ``tx.init`` on the merged parameters; ``step``, ``rng`` and
    ``skipped`` are unchanged. This is how FitNet stage 2 starts from stage 1's weights and a run
    starts from another run's checkpoint (``{'params': s.params, 'batch_stats': s.batch_stats}``).
    """
    if not isinstance(init_params, Mapping):
        raise TypeError(f"init_params must be a dict {{'params': ..., 'batch_stats': ...}}; got "
                        f"{type(init_params).__name__}.")
    unknown = sorted(set(init_params) - set(_INIT_COLLECTIONS))
    if unknown:
        raise ValueError(f"init_params has unknown key(s) {unknown}; it may hold only "
                         f"{list(_INIT_COLLECTIONS)} (pass a Linen variables dict).")
    merged = {}
    for collection in _INIT_COLLECTIONS:
        fresh_tree = getattr(state, collection)
        shardings = getattr(state_shardings, collection)
        given = init_params.get(collection)
        if given is None:
            merged[collection] = fresh_tree
            continue
        fresh = flax.traverse_util.flatten_dict(unfreeze(fresh_tree), sep="/")
        flat_sh = flax.traverse_util.flatten_dict(unfreeze(shardings), sep="/")
        new = flax.traverse_util.flatten_dict(unfreeze(given), sep="/")
        extra = sorted(set(new) - set(fresh))
        if extra:
            raise ValueError(
                f"init_params[{collection!r}] has leaves the student does not have: {extra[:5]}; "
                f"the student's {collection} are {sorted(fresh)[:10]}. Use the same model (and "
                f"module names) as the run the weights come from.")
        for path, value in new.items():
            want = fresh[path]
            value = value if hasattr(value, "dtype") else np.asarray(value)
            if tuple(value.shape) != tuple(want.shape) or np.dtype(value.dtype) != want.dtype:
                raise ValueError(
                    f"init_params[{collection!r}] leaf {path!r} is {tuple(value.shape)} "
                    f"{np.dtype(value.dtype)} but the student's is {tuple(want.shape)} {want.dtype}; "
                    f"shapes and dtypes must match (cast or rebuild the student).")
            # A copy: the step donates the state, which would delete the caller's arrays (and
            # a teacher's own, when a student starts from its teacher's weights).
            fresh[path] = jax.device_put(value, flat_sh[path], may_alias=False)
        merged[collection] = flax.traverse_util.unflatten_dict(fresh, sep="/")
    opt_state = jax.jit(tx.init, out_shardings=state_shardings.opt_state)(merged["params"])
    return state.replace(params=merged["params"], batch_stats=merged["batch_stats"],
                         opt_state=opt_state)


# ----------------------------------------------------------------------------------------------
# Eval.
# ----------------------------------------------------------------------------------------------


def evaluate(eval_step, state: train.TrainState, teacher_variables: Any, eval_iter: Iterator,
             mesh: Mesh, batch_transform: Callable[[Any], Any] | None = None, *,
             check: Callable[[Any], None] | None = None,
             device_fn: Callable[[dict], dict] | None = None) -> dict[str, float]:
    """One full pass of ``eval_iter`` through ``eval_step`` (from :func:`kdjax.train.make_eval_step`).

    Each host batch (``{'image', 'label', 'mask', ...}``, padded rows have ``mask=False``) goes
    through ``batch_transform`` (e.g. ``LogitStore.add_to_batch`` for a precomputed teacher) and
    onto the mesh (then through ``device_fn``, e.g. :func:`kdjax.teachers.on_devices`'s); the
    per-batch sums stay on the device until the pass ends, then are added in
    float64 on the host. With ``n = sum(mask)``: ``accuracy = correct / n``, ``ce = sum CE / n``;
    with a teacher giving logits also ``teacher_accuracy``, ``agreement`` (same top-1 as the
    teacher) and ``kl`` (``KL(p_t || p_s)`` at T = 1), each divided by ``n``. Padding never counts.
    Returns those plus ``num_examples = n``.
    """
    batches = _HostBatches(iter(eval_iter), check or (lambda b: None), batch_transform)
    device_batches = prefetch_to_device(batches, sharding.batch_sharding(mesh), device_fn=device_fn)
    try:
        sums, inflight = [], InFlight()
        for batch in device_batches:
            sums.append(eval_step(state, teacher_variables, batch))
            inflight.push(sums[-1])
    finally:
        device_batches.close()
    if not sums:
        raise ValueError("eval_iter yielded no batches; eval_iter_fn must return a fresh iterator "
                         "over the eval split each time it is called.")
    host = jax.device_get(sums)
    totals = {key: math.fsum(float(s[key]) for s in host) for key in host[0]}
    count = totals.pop("count")
    if count <= 0:
        raise ValueError("the eval pass had no real rows (every mask was False); check the eval "
                         "iterator's mask.")
    out = {"accuracy": totals["correct"] / count, "ce": totals["ce"] / count}
    if "teacher_correct" in totals:
        out.update(teacher_accuracy=totals["teacher_correct"] / count,
                   agreement=totals["agreement"] / count, kl=totals["kl"] / count)
    out["num_examples"] = int(round(count))
    return out


# ----------------------------------------------------------------------------------------------
# Train metrics: fetched every log_every steps, non-finite steps found, window means logged.
# ----------------------------------------------------------------------------------------------


def _nonfinite_terms(m: Mapping[str, Any]) -> list[str]:
    """The loss terms of one step's host metrics that are NaN/Inf; else ``['total']`` if only the
    weighted sum is (a NaN/Inf weight), else ``['gradient']``."""
    terms = [k[len("loss/"):] for k, v in m.items()
             if k.startswith("loss/") and k != "loss/total" and not np.isfinite(v)]
    if terms:
        return terms
    if not np.isfinite(m["loss/total"]):
        return ["total"]
    return ["gradient"]


class InFlight:
    """Bounds how far a loop's dispatched computations run ahead of the host.

    ``push(outputs)`` records the outputs of a computation just dispatched; when more than
    ``limit`` are recorded, it waits for the oldest (for its first leaf: the outputs of one
    computation become ready together, on every device). JAX dispatches
    asynchronously, so a loop that fetches results only every ``log_every`` steps queues that many
    steps. XLA's CPU client admits 32 computations in flight per device and runs them on a pool of
    about one thread per device: with a multi-device mesh, launches waiting for that admission can
    hold every pool thread while a collective of an earlier step waits for a participant that has
    no thread left, and XLA aborts the process after its rendezvous timeout (seen with 8 CPU
    devices and 50 steps between fetches). The default, 16, is half that admission; that many steps
    ahead keep dispatch overlapped with compute.
    """

    def __init__(self, limit: int = 16):
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive integer (computations ahead), got {limit!r}.")
        self._limit = limit
        self._queue: collections.deque = collections.deque()

    def push(self, outputs: Any) -> None:
        self._queue.append(jax.tree_util.tree_leaves(outputs)[:1])
        while len(self._queue) > self._limit:
            jax.block_until_ready(self._queue.popleft())

    def __len__(self) -> int:
        return len(self._queue)


@dataclasses.dataclass
class _Window:
    """Sums of the finite steps' metrics since the last log record."""
    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    finite_steps: int = 0
    steps: int = 0
    skipped: int = 0
    start_time: float = dataclasses.field(default_factory=time.perf_counter)

    def add(self, m: Mapping[str, Any]) -> None:
        self.steps += 1
        self.skipped = int(m["skipped"])
        if not bool(m["finite"]):
            return
        self.finite_steps += 1
        for key, value in m.items():
            if key not in ("finite", "skipped"):
                self.sums[key] = self.sums.get(key, 0.0) + float(value)

    def record(self) -> dict[str, float]:
        out = {k: v / self.finite_steps for k, v in self.sums.items()} if self.finite_steps else {}
        out["skipped"] = self.skipped
        out["steps_per_sec"] = self.steps / max(time.perf_counter() - self.start_time, 1e-9)
        return out


def _drain(pending: list, first_step: int, window: _Window, nonfinite: str,
           last_checkpoint: Callable[[], int | None]) -> None:
    """Fetches the pending per-step metrics (one transfer), checks finiteness, adds to window.

    ``pending[i]`` is the metrics dict of the update with 0-based index ``first_step + i``.
    """
    host = jax.device_get(pending)
    pending.clear()
    for i, m in enumerate(host):
        if not bool(m["finite"]):
            step = first_step + i
            terms = _nonfinite_terms(m)
            values = {k: float(v) for k, v in m.items() if k.startswith("loss/")}
            values["grad_norm"] = float(m["grad_norm"])
            what = {"gradient": "the loss was finite but the gradient norm was not",
                    "total": "every loss term was finite but their weighted sum was not (check "
                             "the term weights / schedules)"}.get(terms[0], f"loss term(s) "
                                                                           f"{terms} went NaN/Inf")
            if nonfinite == "stop":
                raise NonFiniteLossError(
                    f"Non-finite update at step {step} (0-based; the update was not applied): "
                    f"{what}; values {values}. Nothing from this step on was checkpointed; the "
                    f"last checkpoint is step {last_checkpoint()}. Lower the learning rate or find "
                    f"the bad batch, or pass nonfinite='skip' to skip such updates.", step, terms)
            if jax.process_index() == 0:
                logger.warning("Skipped non-finite update at step %d: %s (%s).", step, what,
                               values)
        window.add(m)


# ----------------------------------------------------------------------------------------------
# fit.
# ----------------------------------------------------------------------------------------------


def _progress_bar_class() -> type:
    """``tqdm.auto``'s bar (a widget under Jupyter) when ipywidgets is installed, else the text
    bar: without ipywidgets, ``tqdm.auto`` in a Jupyter kernel warns "IProgress not found"."""
    import importlib.util

    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm.std import tqdm
    return tqdm


def _logs_above(bar_class: type):
    """A context in which console log lines (a preemption, a skipped update) print above the
    progress bar, not onto its line (``tqdm.contrib.logging.logging_redirect_tqdm``)."""
    from tqdm import TqdmWarning

    with warnings.catch_warnings():  # tqdm.contrib imports tqdm.auto: see _progress_bar_class
        warnings.simplefilter("ignore", TqdmWarning)
        from tqdm.contrib.logging import logging_redirect_tqdm
    return logging_redirect_tqdm(tqdm_class=bar_class)


def _best(eval_history: list[dict], metric: str | None, mode: str) -> dict | None:
    scored = [r for r in eval_history if metric is not None and r.get(metric) is not None]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda r: r[metric])


def _strip(record: Mapping[str, Any]) -> dict:
    return {k: v for k, v in record.items() if k != "kind"}


def _log_window(writer: metrics_lib.MetricWriter, bar, history: list, window: _Window,
                step: int) -> _Window:
    """Writes the window's train record at ``step``; returns a fresh window."""
    record = writer.write("train", step, window.record())
    history.append(_strip(record))
    if bar is not None:
        bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss/total", "accuracy")
                         if record.get(k) is not None}, refresh=False)
    return _Window()


@dataclasses.dataclass(frozen=True)
class _Built:
    """What :func:`_build` makes besides the fresh state: the programs that train the student."""
    state_shardings: Any
    train_step: Callable
    eval_step: Callable | None
    teacher_variables: Any  # on the student's mesh ({} when the teacher is precomputed)
    device_fn: Callable[[dict], dict] | None  # adds the logits of a teacher on its own devices
    num_classes: int  # the student's


def _build(student, tx: optax.GradientTransformation, recipe: Sequence[Term],
           teacher: Teacher | None, teacher_variables: Any, *, sample_input, seed: int,
           mesh: Mesh, param_mode: str, teacher_mode: str, teacher_mesh: Mesh | None,
           input_key: str, evaluate: bool) -> tuple[train.TrainState, _Built]:
    """Initialises the student into its shardings, places the teacher and builds the steps;
    returns ``(fresh state, the rest)`` (the state apart, so that a restored one replaces it).

    The teacher runs inside the steps with its variables on ``mesh`` (``teacher_mode``), or with
    ``teacher_mesh`` on those devices, ahead of the steps (:func:`kdjax.teachers.on_devices`),
    which then read its logits as a precomputed teacher's. The steps are
    :func:`kdjax.train.make_steps`'s.
    """
    state, state_shardings = train.init_train_state(student, tx, sample_input, seed=seed,
                                                    mesh=mesh, mode=param_mode)
    device_fn = None
    if teacher_mesh is not None:
        device_fn = teachers.on_devices(teacher, teacher_variables, teacher_mesh,
                                        student_mesh=mesh, mode=teacher_mode)
        teacher, teacher_variables = teachers.precomputed(), None
    train_step, eval_step, t_shardings = train.make_steps(
        student, tx, recipe, teacher, teacher_variables, mesh=mesh,
        state_shardings=state_shardings, teacher_mode=teacher_mode, input_key=input_key,
        evaluate=evaluate)
    t_vars = jax.device_put({} if teacher_variables is None else teacher_variables, t_shardings)
    apply = train.student_apply(student)
    logits_shape = jax.eval_shape(lambda s, x: apply(s.params, s.batch_stats, x, False, s.rng)[0]
                                  .logits, state, sample_input)
    return state, _Built(state_shardings=state_shardings, train_step=train_step,
                         eval_step=eval_step, teacher_variables=t_vars, device_fn=device_fn,
                         num_classes=int(logits_shape.shape[-1]))


def _resume(ckpt: checkpointing.Checkpointer, state: train.TrainState, state_shardings: Any,
            train_iter, tx, init_params: Mapping[str, Any] | None, workdir: str, chief: bool):
    """The state to start from: the newest good checkpoint's (and ``train_iter``'s position),
    else the fresh ``state`` with ``init_params`` merged in. Returns ``(state, start, history,
    eval_history)``, the logs of the steps before ``start`` re-read (process 0) and those after it
    dropped, since those steps are redone."""
    restored = ckpt.restore(checkpointing.abstract_state(state), data_iterator=train_iter)
    if restored is not None:
        state, _ = restored
        if init_params is not None and chief:
            logger.info("Resuming from %s: init_params are ignored.", ckpt.directory)
    elif init_params is not None:
        state = merge_init_params(state, init_params, tx, state_shardings)
    start = int(jax.device_get(state.step))
    previous = (metrics_lib.truncate_jsonl(os.path.join(workdir, metrics_lib.JSONL_NAME), start)
                if chief else [])
    history = [_strip(r) for r in previous if r.get("kind") == "train"]
    eval_history = [_strip(r) for r in previous if r.get("kind") == "eval"]
    return state, start, history, eval_history


def fit(*, workdir: str, student, tx: optax.GradientTransformation, recipe: Sequence[Term],
        train_iter, num_steps: int, sample_input, seed: int,
        teacher: Teacher | None = None, teacher_variables: Any = None,
        train_store: LogitStore | None = None, eval_store: LogitStore | None = None,
        eval_iter_fn: Callable[[], Iterator] | None = None,
        batch_transform: Callable[[Any], Any] | None = None,
        init_params: Mapping[str, Any] | None = None, mesh: Mesh | None = None,
        param_mode: str = "replicate", teacher_mode: str = "replicate",
        teacher_mesh: Mesh | None = None, options: FitOptions = FitOptions(),
        **removed: Any) -> FitResult:
    """Trains ``student`` for ``num_steps`` updates in total (counting steps done before a resume).

    Args:
      workdir: local (or shared-filesystem) run directory: ``checkpoints/``, ``metrics.jsonl``,
        ``tb/``. Reusing it resumes.
      student: Flax Linen module returning ``(logits, features)`` (:mod:`kdjax.models`), or a
        Flax NNX module returning ``logits`` or ``(logits, features)``, trained from its current
        variables (:func:`kdjax.train.nnx_student`; the module itself is left unchanged).
      tx: optax optimizer (schedules inside it see the update count, which is restored on resume).
      recipe: loss terms (:mod:`kdjax.recipe`).
      train_iter: checkpointable iterator (``get_state``/``set_state``) of host-local NumPy batch
        dicts ``{'image', 'label', 'id', 'mask', ...}`` (``kdjax.data.make_train_iterator``); on
        ``P`` processes each yields its ``global_batch / P`` rows.
      num_steps: total updates; a resumed run stops at the same step as an uninterrupted one.
      sample_input: an example input batch ``[b, ...]`` (shape and dtype used for init and checks).
      seed: initialisation and dropout seed.
      teacher, teacher_variables: a :class:`kdjax.teachers.Teacher` and its frozen variables
        (omit the variables for ``teachers.precomputed()``).
      train_store, eval_store: a precomputed teacher's outputs (``teacher=teachers.precomputed()``):
        the :class:`kdjax.logit_store.LogitStore` of the train split, whose ``add_to_batch`` every
        train batch goes through, and that of the eval split, for the eval batches (example ids
        index their own split). Both must hold the student's class count (checked before any
        step); with a train store and an eval, the eval store is needed; a top-k eval store gives
        no teacher eval metrics.
      eval_iter_fn: ``() -> iterator`` of padded, masked eval batches (``make_eval_iterator``).
      batch_transform: host function ``batch -> batch`` applied to every train and eval batch
        after the checks and the store's outputs; it runs in the prefetch thread, ahead of the
        step that uses the batch. Train batches carry an ``'epoch'`` key and eval batches do not.
      init_params: initial ``{'params', 'batch_stats'}`` (partial allowed) for a fresh run, merged
        as in :func:`merge_init_params`; ignored when resuming (the checkpoint wins).
      mesh: ``('data', 'fsdp')`` mesh (default :func:`kdjax.sharding.make_mesh` over all devices).
      param_mode, teacher_mode: ``'replicate'`` or ``'fsdp'`` for the student state / teacher.
      teacher_mesh: run the live teacher on these devices (normally others than ``mesh``'s),
        ahead of the student's steps (:func:`kdjax.teachers.on_devices`; logits only, one
        process; ``teacher_mode`` shards it over the mesh's ``fsdp`` axis); by default the
        teacher runs inside the step on ``mesh``.
      options: :class:`FitOptions`: eval, checkpoint and log cadence, kept checkpoints, best
        metric, non-finite policy, progress bar, preemption, prefetch.

    Returns:
      :class:`FitResult`.

    Raises:
      NonFiniteLossError: ``options.nonfinite='stop'`` and an update was non-finite.
      ValueError / TypeError: bad arguments or batches (message names the argument and the fix);
        a TypeError names :class:`FitOptions` for a setting passed as a keyword argument.
      kdjax.checkpointing.CheckpointSaveError (and its CheckpointDiskFullError): a save failed;
        the previous checkpoints are intact, rerun to resume from the last one.
    """
    if removed:
        raise _removed_arguments(removed)
    if not isinstance(options, FitOptions):
        raise TypeError(f"options must be a kdjax.loop.FitOptions; got {type(options).__name__}.")
    _check_model(workdir=workdir, student=student, tx=tx, num_steps=num_steps,
                 sample_input=sample_input, seed=seed, param_mode=param_mode,
                 init_params=init_params)
    _check_teacher(teacher=teacher, teacher_variables=teacher_variables,
                   teacher_mode=teacher_mode, teacher_mesh=teacher_mesh, recipe=recipe)
    _check_data(train_iter=train_iter, eval_iter_fn=eval_iter_fn, batch_transform=batch_transform,
                train_store=train_store, eval_store=eval_store, teacher=teacher)
    options._check_run(evaluates=eval_iter_fn is not None, has_teacher=teacher is not None)
    if options.handle_preemption and threading.current_thread() is not threading.main_thread():
        raise RuntimeError("fit() installs a SIGTERM handler for preemption, which Python allows "
                           "only in the main thread; call fit() from the main thread or pass "
                           "handle_preemption=False.")
    eval_every, checkpoint_every = options.eval_every, options.checkpoint_every
    log_every, nonfinite = options.log_every, options.nonfinite
    workdir = os.path.abspath(os.fspath(workdir))
    mesh = sharding.make_mesh() if mesh is None else mesh
    chief = jax.process_index() == 0
    do_eval_at_all = eval_iter_fn is not None
    track_best = options.best_metric is not None and do_eval_at_all
    best_metric, best_mode = (options.best_metric if track_best else None), options.rank_mode

    state, built = _build(student, tx, recipe, teacher, teacher_variables, sample_input=sample_input,
                   seed=seed, mesh=mesh, param_mode=param_mode, teacher_mode=teacher_mode,
                   teacher_mesh=teacher_mesh, input_key=options.input_key, evaluate=do_eval_at_all)
    train_step, eval_step, t_vars = built.train_step, built.eval_step, built.teacher_variables
    add_logits, num_classes = built.device_fn, built.num_classes
    _check_store("train_store", train_store, num_classes, best_metric)
    _check_store("eval_store", eval_store, num_classes, best_metric)
    train_transform = _host_transform(train_store, batch_transform, num_classes)
    eval_transform = _host_transform(eval_store, batch_transform, num_classes)
    check = functools.partial(_check_batch, input_key=options.input_key,
                              example_shape=tuple(np.shape(sample_input))[1:],
                              num_classes=num_classes,
                              num_devices=int(mesh.devices.size))

    with contextlib.ExitStack() as stack:
        ckpt = checkpointing.Checkpointer(
            os.path.join(workdir, CHECKPOINT_DIR), max_to_keep=options.keep,
            best_metric=best_metric, best_mode=best_mode, async_save=options.async_checkpoint)
        stack.callback(ckpt.close)
        state, start, history, eval_history = _resume(
            ckpt, state, built.state_shardings, train_iter, tx, init_params, workdir, chief)
        writer = stack.enter_context(metrics_lib.MetricWriter(workdir, enabled=chief,
                                                              purge_step=start))
        watcher = (stack.enter_context(PreemptionWatcher()) if options.handle_preemption else None)
        batches = prefetch_to_device(_TrainBatches(train_iter, functools.partial(
            check, where="train_iter"), train_transform), sharding.batch_sharding(mesh),
            size=options.prefetch, device_fn=add_logits)
        stack.callback(batches.close)
        bar = None
        if options.progress and chief and start < num_steps:
            tqdm = _progress_bar_class()
            bar = stack.enter_context(tqdm(total=num_steps, initial=start, desc=options.name,
                                           unit="step", dynamic_ncols=True))
            stack.enter_context(_logs_above(tqdm))
        if start and chief and options.announce_resume:
            resuming = f"{options.name}: resuming from step {start} of {num_steps} ({workdir})"
            if bar is not None:
                bar.write(resuming)
            else:
                print(resuming, flush=True)

        pending: list = []
        inflight = InFlight()
        pending_first = start
        window = _Window()
        stopped = False
        for step in range(start, num_steps):
            try:
                batch = next(batches)
            except StopIteration:
                raise ValueError(
                    f"train_iter ran out after {step} steps but num_steps={num_steps}; use an "
                    f"endless iterator (make_train_iterator(num_epochs=None)) or lower "
                    f"num_steps.") from None
            state, step_metrics = train_step(state, t_vars, batch)
            pending.append(step_metrics)
            inflight.push(step_metrics)
            done = step + 1
            if bar is not None:
                bar.update(1)
            last = done == num_steps
            evaluate_now = do_eval_at_all and (last or (eval_every and done % eval_every == 0))
            save_now = (last or (checkpoint_every and done % checkpoint_every == 0)
                        or (evaluate_now and track_best))
            log_now = last or done % log_every == 0
            if log_now or save_now or evaluate_now:
                _drain(pending, pending_first, window, nonfinite, ckpt.latest_step)
                pending_first = done
            if log_now:
                window = _log_window(writer, bar, history, window, done)
            eval_record = None
            if evaluate_now:
                eval_record = evaluate(eval_step, state, t_vars, eval_iter_fn(), mesh,
                                       eval_transform, check=functools.partial(
                                           check, where="eval_iter_fn()"), device_fn=add_logits)
                eval_history.append(_strip(writer.write("eval", done, eval_record)))
                _check_best_metric(best_metric, eval_record)
            if save_now:
                ckpt.save(done, state, data_iterator=batches,
                          metrics=eval_record if track_best else None, force=True)
            # A signal that arrived during this step, its eval or its save stops the run here.
            if not last and watcher is not None and watcher.should_stop(done):
                if not log_now:
                    _drain(pending, pending_first, window, nonfinite, ckpt.latest_step)
                    window = _log_window(writer, bar, history, window, done)
                if not save_now:
                    ckpt.save(done, state, data_iterator=batches, force=True)
                ckpt.wait()
                stopped = True
                break
        skipped = int(jax.device_get(state.skipped))
    return FitResult(state=state, history=history, eval_history=eval_history,
                     best=_best(eval_history, best_metric, best_mode) if track_best else None,
                     stopped_early=stopped, skipped_steps=skipped)
