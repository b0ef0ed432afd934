"""On-disk layout of a store: file names, shard directories, their states and the recorded spec."""
from __future__ import annotations

import os
import re

import numpy as np

from kdjax.logit_store.files import _read_json
from kdjax.logit_store.spec import _INDEX_DTYPE, StoreSpec

LAYOUT_VERSION = 1

_SHARDS_DIR = "shards"
_SHARD_RE = re.compile(r"^shard-(\d{5})-of-(\d{5})$")
_COMPLETE = "COMPLETE"
_METADATA = "metadata.json"
_INDEX = "index.npy"
_DONE = "DONE"
_PROGRESS = "progress.json"
_SPEC = "spec.json"


def _shard_name(process_index: int, process_count: int) -> str:
    return f"shard-{process_index:05d}-of-{process_count:05d}"


def _shard_files(spec: StoreSpec) -> dict[str, tuple[np.dtype, int]]:
    """Data files of one shard: name -> (dtype, values per row)."""
    files = {"ids": (np.dtype(np.int64), 1), "values": (spec.value_dtype, spec.width)}
    if spec.format == "topk":
        files["indices"] = (_INDEX_DTYPE, spec.k)
    return files


def _list_shards(path: str) -> dict[str, tuple[int, int]]:
    """Shard directory name -> (process_index, process_count) for every shard under ``path``."""
    root = os.path.join(path, _SHARDS_DIR)
    if not os.path.isdir(root):
        return {}
    out = {}
    for name in sorted(os.listdir(root)):
        m = _SHARD_RE.match(name)
        if m:
            out[name] = (int(m.group(1)), int(m.group(2)))
    return out


def _shard_state(shard_dir: str) -> str:
    """Human-readable state of one shard directory: done / committed rows / not started."""
    if os.path.exists(os.path.join(shard_dir, _DONE)):
        return f"done ({_read_json(os.path.join(shard_dir, _DONE))['rows']} rows)"
    if os.path.exists(os.path.join(shard_dir, _PROGRESS)):
        return f"in progress ({_read_json(os.path.join(shard_dir, _PROGRESS))['rows']} rows committed)"
    return "started, no rows committed"


def is_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a finalized store (its COMPLETE marker exists)."""
    return os.path.exists(os.path.join(os.fspath(path), _COMPLETE))


def _describe_partial(path: str) -> str:
    shards = _list_shards(path)
    if not shards:
        return "no shard has started"
    states = [f"{name}: {_shard_state(os.path.join(path, _SHARDS_DIR, name))}" for name in shards]
    return "; ".join(states)


def _read_spec_any(path: str) -> StoreSpec | None:
    """The spec from metadata.json, else from any shard's spec.json, else None."""
    if os.path.exists(os.path.join(path, _METADATA)):
        return StoreSpec.from_dict(_read_json(os.path.join(path, _METADATA))["spec"])
    for name in _list_shards(path):
        spec_file = os.path.join(path, _SHARDS_DIR, name, _SPEC)
        if os.path.exists(spec_file):
            return StoreSpec.from_dict(_read_json(spec_file)["spec"])
    return None
