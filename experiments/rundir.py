"""A run directory on disk: its layout, JSON files (written atomically), exported variables.

Each stage of a run writes ``<workdir>/stages/<name>/`` (see :mod:`experiments.stages`); an
exported state is a directory with ``variables/`` (an orbax checkpoint of
``{'params', 'batch_stats'}``) and ``meta.json``. :func:`resolve_checkpoint_dir` finds the state
that ``teacher.path`` names.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from experiments.errors import ConfigError
from kdjax.atomic import write_json_atomic

STAGES_DIR = "stages"
FINAL_DIR = "final"
EPOCHS_DIR = "epochs"
VARIABLES_DIR = "variables"
META_FILE = "meta.json"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
CONFIG_CHANGES_FILE = "config_changes.jsonl"
RESULTS_FILE = "results.json"
TEACHER_STAGE = "teacher"


def write_json(path: str, obj: Any) -> None:
    """Atomic JSON write (:func:`kdjax.atomic.write_json_atomic`), process 0 only; NumPy scalars
    are written as numbers, tuples as lists, anything else JSON cannot hold as its ``str``."""
    if jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json_atomic(path, obj, default=_json_default)


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
    write_json(os.path.join(directory, META_FILE), dict(meta))


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
                         f"and {META_FILE}); export them with experiments.rundir.save_variables "
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


def abstract_variables(module, sample_input: np.ndarray) -> dict:
    """Shapes/dtypes of ``module.init`` on ``sample_input`` (no computation), always with both
    ``params`` and ``batch_stats`` keys."""
    out = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.asarray(sample_input),
                                             train=False))
    return {"params": out["params"], "batch_stats": out.get("batch_stats", {})}


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


def flatten_record(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}} -> {'a.b': 1}``: nested config/summary dicts as dotted keys, to diff them."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten_record(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
