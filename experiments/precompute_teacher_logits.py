r"""Precompute a teacher's logits once into a logit store, for KD runs with a precomputed teacher.

The teacher (``config.teacher``: ``source=checkpoint`` or ``torchvision``, ``model``, ``path``,
``early_epoch``) runs in inference mode over each split with the eval preprocessing (no
augmentation), one padded pass; every process writes its own shard of the rows it reads, process 0
finalizes. The store format is ``teacher.store_format`` (``full`` or ``topk`` with
``teacher.store_k``) in ``teacher.store_dtype``. One store per split under ``--store``
(``<store>/<split>``), the layout ``teacher.precomputed=True`` runs read::

    python -m experiments.precompute_teacher_logits \
        --config=experiments/configs/imagenet_eskd.py:teacher=resnet50,mode=full,precomputed \
        --config.teacher.path=/ckpt/resnet50.npz --config.teacher.store_format=topk \
        --config.teacher.store_k=32 --config.dataset.data_dir=$TFDS_DATA_DIR \
        --store=/stores/r50 [--splits=train,validation] [--resume] [--distributed]

``--resume`` continues an interrupted precompute (rows already written are skipped); a complete
store is never recomputed. On a pod, run the same command on every host with ``--distributed``.

``--views=epochs:0-89`` (the same as ``--config.teacher.store_views=epochs:0-89``) makes the train
split's store a *view store*: the teacher runs on every augmented view the student run will draw,
``kdjax.data.train_example(source, id, seed=config.seed, epoch=e, transform=<train transform>)``
for each epoch ``e`` of the range and every id (``kdjax.data.make_view_iterator``), and the store
is keyed by ``(epoch, id)``; its metadata records the epochs, the seed and the train transform's
fingerprint. The student run reads it with the same ``teacher.store_views`` (and seed, dataset
settings and teacher); any difference is refused, naming it. The range must cover the run's
epochs, ``0 .. num_epochs - 1``. The eval split's store stays the unaugmented eval view::

    python -m experiments.precompute_teacher_logits \
        --config=experiments/configs/imagenet_eskd.py:teacher=resnet50,mode=full,precomputed \
        --config.teacher.path=/ckpt/resnet50.npz --config.teacher.store_format=topk \
        --config.teacher.store_k=10 --config.dataset.data_dir=$TFDS_DATA_DIR \
        --store=/stores/r50_views --views=epochs:0-89 [--resume] [--distributed]
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from experiments import cli, datasets, teacher_io, teachers, validate
from experiments.console import log
from experiments.errors import ConfigError
from kdjax import sharding

PROG = "python -m experiments.precompute_teacher_logits"


def precompute_teacher_logits(config, store: str, splits: Sequence[str] | None = None, *,
                              resume: bool = False, progress: bool | None = None,
                              views: str | None = None) -> dict:
    """Writes (or opens, if complete) ``<store>/<split>`` for each split; returns split -> store,
    or None when a preemption stopped it (rerun with ``resume=True`` to continue).

    ``splits`` default: the config's train and eval splits. ``views`` (``'epochs:A-B'``) sets
    ``config.teacher.store_views`` (a view store for the train split).
    """
    if views:
        config.teacher.store_views = views
    validate.validate_config(config, None)
    t = config.teacher
    if t.source not in ("checkpoint", "torchvision"):
        raise ConfigError(
            f"config.teacher.source={t.source!r}: precompute needs a trained teacher, "
            f"teacher.source='checkpoint' (a train_teacher workdir) or 'torchvision' (a file).")
    if not store:
        raise ConfigError("--store=DIR (or config.teacher.store) is required: the store "
                          "root, one sub-directory per split.")
    data = datasets.build_data(config.dataset, config.seed)
    splits = list(splits or dict.fromkeys((data.train_split, data.eval_split)))
    valid = sorted(data.sources)
    for split in splits:
        if split not in data.sources:
            raise ConfigError(f"--splits: {split!r} is not a split of this config; valid: "
                              f"{', '.join(valid)} (config.dataset.train_split/eval_split).")
    try:
        mesh = sharding.make_mesh(data=config.run.mesh_data, fsdp=config.run.mesh_fsdp)
    except ValueError as e:
        raise ConfigError(f"config.run.mesh_data / mesh_fsdp: {e}") from None
    if data.eval_batch_size % mesh.devices.size:
        raise ConfigError(f"config.dataset.eval_batch_size={data.eval_batch_size} must be a "
                          f"multiple of the {mesh.devices.size} devices.")
    teacher = (teachers.load_checkpoint_teacher(config, data) if t.source == "checkpoint"
               else teachers.load_torchvision_teacher(config, data))
    show = config.run.progress if progress is None else progress
    out = {}
    for split in splits:
        spec = teacher_io.store_spec(config, data, split, teacher)
        out[split] = teacher_io.compute_store(os.path.join(store, split), spec, teacher, data, mesh,
                                              resume=resume, progress=show)
        if out[split] is None:
            return None
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; ``argv`` excludes the program name. Returns the exit status."""
    args = cli.parse_command_line(
        sys.argv[1:] if argv is None else argv, prog=PROG, doc=__doc__, needs_workdir=False,
        extra_flags=(("store", "", "store root (default: config.teacher.store)"),
                     ("splits", "", "comma-separated splits (default: train and eval split)"),
                     ("resume", False, "continue an interrupted precompute"),
                     ("views", "", "epochs:FIRST-LAST: a view store of the train split, the teacher "
                                   "on every augmented view of those epochs (default: "
                                   "config.teacher.store_views)")))
    cli.initialize(args)
    store = args.flags["store"] or args.config.teacher.store
    splits = [s for s in args.flags["splits"].split(",") if s]
    stores = precompute_teacher_logits(args.config, store, splits, resume=args.flags["resume"],
                                       views=args.flags["views"])
    if stores is None:
        log(f"stopped early (preemption); rerun the same command with --resume to continue "
            f"{store}.")
        return 0
    for split, s in stores.items():
        views = f", {s.spec.describe_views()}" if s.spec.views else ""
        log(f"{split}: {s.path} ({s.spec.num_examples} examples, {s.spec.format}, "
            f"{s.spec.dtype}{views})")
    return 0


if __name__ == "__main__":
    cli.run_main(main)
