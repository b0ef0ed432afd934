"""A frozen teacher (:class:`TeacherModel`) and its precomputed logit stores.

Where a run's teacher comes from (a kdjax run's export, a torchvision file, or trained in the run)
is :mod:`experiments.teachers`. Here: :func:`compute_store` runs a teacher over a split into a
:mod:`kdjax.logit_store` store, named by :func:`store_spec` (the teacher's origin and the digest of
its weights, :func:`weights_digest`); :func:`open_store` opens a complete one; ``kdjax.loop.fit`` reads
it through its ``train_store`` / ``eval_store`` arguments. With ``teacher.store_views`` (e.g.
``'epochs:0-89'``, :func:`parse_views`) the train split's store is a *view store*: the teacher's
outputs on every augmented view ``(epoch, id)`` the run's train iterator draws (its seed and train
transform), computed over :func:`kdjax.data.make_view_iterator`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any

import jax

from experiments.console import log
from experiments.datasets import Data
from experiments.errors import ConfigError
from kdjax import sharding, teachers


@dataclasses.dataclass
class TeacherModel:
    """A frozen teacher: its module, variables and a label saying where it came from.

    ``source``: ``'checkpoint'``, ``'torchvision'``, ``'train'`` (see :mod:`experiments.teachers`)
    or ``'chain'`` (an assistant of a teacher-assistant chain); ``epoch``: the epoch of its own
    training it was taken from (None: its final state).
    """
    label: str
    spec: str
    module: Any
    variables: dict
    source: str
    epoch: int | None = None

    def live(self) -> teachers.Teacher:
        return teachers.from_linen(self.module)


# ------------------------------------------------------------------------------------------------
# Logit stores (precomputed teacher).
# ------------------------------------------------------------------------------------------------


def weights_digest(variables) -> str:
    """12 hex digits of SHA-256 over each leaf's key path, shape, dtype and 32-bit checksum of its
    bytes (:func:`kdjax.checkpointing.state_fingerprint`, computed where the leaves live, so
    sharded ones too): any change of one weight changes it."""
    from kdjax.checkpointing import state_fingerprint

    leaves = jax.tree.map(jax.numpy.asarray, variables)
    paths, _, sums = state_fingerprint(leaves)
    shapes = [f"{x.shape}{x.dtype}" for x in jax.tree.leaves(leaves)]
    text = ";".join(f"{p}{s}:{c}" for p, s, c in zip(paths, shapes, sums.tolist()))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


_VIEWS = re.compile(r"epochs:(\d+)-(\d+)")


def parse_views(text: str | None) -> tuple[int, int] | None:
    """``teacher.store_views`` (``--views``): ``'epochs:FIRST-LAST'`` -> ``(FIRST, LAST)``
    (inclusive); empty or None -> None (a store of the unaugmented eval view)."""
    if not text:
        return None
    m = _VIEWS.fullmatch(str(text).strip())
    if not m or int(m.group(1)) > int(m.group(2)):
        raise ConfigError(f"config.teacher.store_views={text!r} (--views): expected "
                          f"'epochs:FIRST-LAST', an inclusive range of training epochs with FIRST <= "
                          f"LAST, e.g. 'epochs:0-89' for a 90-epoch run.")
    return int(m.group(1)), int(m.group(2))


def store_spec(config, data: Data, split: str, teacher: TeacherModel):
    """The :class:`kdjax.logit_store.StoreSpec` of ``teacher`` on ``split`` under ``config``.

    Its ``teacher`` names the teacher's origin and its weights' :func:`weights_digest`, so a store
    written by another teacher (retrained, another file or epoch) is refused, not reused. With
    ``teacher.store_views``, the train split's spec is a view store's: the epochs, the run's data
    seed and its train transform's :func:`kdjax.data.transform_fingerprint`, so a store of another
    seed, augmentation or epoch range is refused too."""
    from kdjax import data as data_lib, logit_store

    t = config.teacher
    epochs = parse_views(t.store_views) if split == data.train_split else None
    views = {}
    if epochs is not None:
        views = dict(epochs=epochs, seed=data.seed,
                     transform=data_lib.transform_fingerprint(data.train_transform))
    return logit_store.StoreSpec(
        dataset=data.name, split=split, num_examples=data.num_examples(split),
        num_classes=data.num_classes,
        teacher=f"{teacher.label}, weights {weights_digest(teacher.variables)}",
        preprocessing="train-transform-views" if views else data.preprocessing,
        format=t.store_format, k=t.store_k if t.store_format == "topk" else None,
        dtype=t.store_dtype, **views)


def compute_store(path: str, spec, teacher: TeacherModel, data: Data, mesh, *, resume: bool = True,
                  progress: bool = True):
    """Runs ``teacher`` over ``spec.split`` (eval transform, unaugmented) into a store at ``path``;
    for a view store (``spec.views``) over every train view of ``spec.epochs`` instead
    (:func:`kdjax.data.make_view_iterator`: the run's seed and train transform, eval batch size).

    Every process writes its own shard of the rows its eval iterator yields; process 0 finalizes
    after all writers closed. A complete store is opened without recomputing. Returns the open
    :class:`kdjax.logit_store.LogitStore`, or None when a preemption (SIGTERM, JAX's notice on a
    pod) stopped the pass: the rows so far are committed, and the same call with ``resume=True``
    continues after them.
    """
    from jax.experimental import multihost_utils

    from kdjax import data as data_lib, logit_store, train
    from kdjax.preemption import PreemptionWatcher

    if logit_store.is_complete(path):
        return open_store(path, spec)
    writer = logit_store.LogitStoreWriter(path, spec, process_index=jax.process_index(),
                                          process_count=jax.process_count(), resume=resume)
    batch_sharding = sharding.batch_sharding(mesh)
    variables, _ = train.put_teacher(teacher.variables, mesh)
    if spec.views:
        batches = data_lib.make_view_iterator(
            data.sources[spec.split], global_batch_size=data.eval_batch_size, seed=spec.seed,
            epochs=spec.epochs, transform=data.train_transform, num_threads=data.num_threads,
            prefetch_buffer_size=data.prefetch)
        total = data_lib.view_num_batches(spec.num_examples, spec.epochs, data.eval_batch_size)
    else:
        batches = data.eval_iter(spec.split)
        total = data_lib.eval_num_batches(spec.num_examples, data.eval_batch_size)
    with writer, PreemptionWatcher() as watcher:
        stats = logit_store.precompute(teacher.live(), variables, batches, writer,
                                       sharding=batch_sharding, show_progress=progress, total=total,
                                       should_stop=watcher.should_stop)
        if stats.get("stopped"):
            writer.suspend()
            log(f"logit store {path}: stopped by a preemption after {stats['rows_written']} new "
                f"rows (committed); rerun to resume it.")
            return None
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"logit store {path} written")
    if jax.process_index() == 0:
        logit_store.finalize(path, jax.process_count())
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"logit store {path} finalized")
    log(f"logit store {path}: {stats}")
    return open_store(path, spec)


def open_store(path: str, spec):
    """Opens a complete store, checking that it holds what ``spec`` describes (every field:
    dataset, split, counts, teacher and its weights, preprocessing, format, k, dtype, and a view
    store's epochs, seed and transform)."""
    from kdjax import logit_store

    return logit_store.LogitStore.open(path, spec=spec)
