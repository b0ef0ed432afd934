"""Finalize: check that the shards hold every id once, write the index, metadata and COMPLETE."""
from __future__ import annotations

import os

import numpy as np

import kdjax
from kdjax.logit_store.files import _atomic_write, _read_json, _write_json
from kdjax.logit_store.layout import (LAYOUT_VERSION, _COMPLETE, _DONE, _INDEX, _METADATA, _SHARDS_DIR, _SPEC,
                                      _list_shards, _shard_name, _shard_state)
from kdjax.logit_store.rows import _check_id_range, _describe_keys, _repeated_ids
from kdjax.logit_store.spec import StoreSpec


def _missing_message(what: str, keys: np.ndarray, spec: StoreSpec) -> str:
    rows = "(epoch, example id) pairs" if spec.views else "example ids"
    return f"{keys.size} of {spec.num_rows} {rows} {what}, e.g. {_describe_keys(spec, keys[:10])}"


def finalize(path: str | os.PathLike, process_count: int) -> None:
    """Check every shard and write the index, metadata and COMPLETE marker (process 0 only).

    Call it once every writer has closed (after a barrier the caller provides, e.g.
    ``jax.experimental.multihost_utils.sync_global_devices``). Raises ValueError, writing nothing,
    if a shard is missing or not done, if shards disagree on the spec, if one shard holds an id
    twice (a corrupt shard), or if the shards do not hold every id in ``[0, num_examples)``
    (a view store: every ``(epoch, id)`` of its epochs) exactly once. Running it again rewrites
    the same files.
    """
    path = os.fspath(path)
    if not isinstance(process_count, int) or process_count < 1:
        raise ValueError(f"process_count must be a positive integer, got {process_count!r}")
    shards = _list_shards(path)
    wrong = [name for name, (_, count) in shards.items() if count != process_count]
    if wrong:
        raise ValueError(f"logit store at {path} has shards {wrong} from another process_count than "
                         f"{process_count}; delete the directory and precompute again")
    names = [_shard_name(i, process_count) for i in range(process_count)]
    not_done = [n for n in names if not os.path.exists(os.path.join(path, _SHARDS_DIR, n, _DONE))]
    if not_done:
        states = [f"{n}: {_shard_state(os.path.join(path, _SHARDS_DIR, n)) if n in shards else 'missing'}"
                  for n in not_done]
        raise ValueError(f"cannot finalize logit store at {path}: {len(not_done)} of {process_count} shards "
                         f"are not done ({'; '.join(states)}); every writer must close() before finalize, "
                         f"and an interrupted one must be resumed (resume=True)")
    specs = [_read_json(os.path.join(path, _SHARDS_DIR, n, _SPEC))["spec"] for n in names]
    if any(s != specs[0] for s in specs):
        raise ValueError(f"shards of logit store at {path} disagree on the spec: {specs}")
    spec = StoreSpec.from_dict(specs[0])

    index = np.full((spec.num_rows, 2), -1, dtype=np.int64)  # by row key
    shard_ids, layout = [], []
    for s, name in enumerate(names):
        rows = _read_json(os.path.join(path, _SHARDS_DIR, name, _DONE))["rows"]
        ids = np.fromfile(os.path.join(path, _SHARDS_DIR, name, "ids.bin"), dtype=np.int64, count=rows)
        if ids.size != rows:
            raise ValueError(f"shard {name} of logit store at {path} is corrupt: DONE says {rows} rows but "
                             f"ids.bin holds {ids.size}; delete the directory and precompute again")
        bad = (ids < 0) | (ids >= spec.num_rows)
        if not spec.views:
            _check_id_range(ids, spec.num_examples, f"finalize: shard {name}")
        elif bad.any():
            raise ValueError(f"shard {name} of logit store at {path} is corrupt: row keys "
                             f"{ids[bad][:5].tolist()} lie outside [0, {spec.num_rows}); delete that shard "
                             f"directory and resume its writer (resume=True)")
        repeated = _repeated_ids(ids)
        if repeated.size:
            what = f"were written more than once within shard {name}"
            raise ValueError(f"cannot finalize logit store at {path}: "
                             f"{_missing_message(what, repeated, spec)}; the shard is "
                             f"corrupt (two writers appended to it at once?); delete that shard directory "
                             f"and resume its writer (resume=True), or delete the store and precompute again")
        index[ids, 0] = s
        index[ids, 1] = np.arange(rows)
        shard_ids.append(ids)
        layout.append({"name": name, "rows": int(rows)})
    counts = np.bincount(np.concatenate(shard_ids), minlength=spec.num_rows)
    missing = np.flatnonzero(counts == 0)
    if missing.size:
        raise ValueError(f"cannot finalize logit store at {path}: "
                         f"{_missing_message('were never written', missing, spec)}; "
                         f"the data pipeline must visit every example of split '{spec.split}' once"
                         f"{' per epoch of the views (kdjax.data.make_view_iterator)' if spec.views else ''} "
                         f"(no drop_remainder), then resume the writers (resume=True) to fill them in")
    dup = np.flatnonzero(counts > 1)
    if dup.size:
        raise ValueError(f"cannot finalize logit store at {path}: "
                         f"{_missing_message('were written by more than one shard', dup, spec)}; "
                         f"each process must receive a disjoint part of the split")

    _atomic_write(os.path.join(path, _INDEX), lambda f: np.save(f, index))
    _write_json(os.path.join(path, _METADATA), {
        "layout_version": LAYOUT_VERSION,
        "kdjax_version": kdjax.__version__,
        "spec": spec.to_dict(),
        "process_count": process_count,
        "shards": layout,
    })
    _write_json(os.path.join(path, _COMPLETE), {"num_examples": spec.num_examples, "rows": spec.num_rows})
