"""The integrity manifest of a step: per-leaf key path, shape, dtype and checksum; building it,
parsing it, and comparing it with a restored state or a restore target."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

import jax
import numpy as np
from etils import epath

_MANIFEST_FORMAT = "kdjax-checkpoint-integrity/2"
#: Written before the manifest carried its own digest; still read (without that check).
_MANIFEST_FORMAT_V1 = "kdjax-checkpoint-integrity/1"
_SIGNED_FIELDS = ("format", "step", "has_data_iterator", "leaves")


def _manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest's :data:`_SIGNED_FIELDS` as canonical JSON (sorted keys, no
    spaces): an edit that leaves valid JSON (a changed shape, path or checksum) changes it."""
    body = {k: manifest.get(k) for k in _SIGNED_FIELDS}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _build_manifest(
    step: int, state: Any, paths: list[str], checksums: np.ndarray, has_data_iterator: bool
) -> dict[str, Any]:
    """The manifest of ``step``: format, step, ``has_data_iterator``, per array leaf of ``state``
    (in ``tree_flatten_with_path`` order) its key path, shape, dtype and checksum, and the
    ``sha256`` of all that (:func:`_manifest_digest`)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    manifest = {
        "format": _MANIFEST_FORMAT,
        "step": step,
        "has_data_iterator": has_data_iterator,
        "leaves": [
            {"path": p, "shape": list(leaf.shape), "dtype": str(leaf.dtype), "checksum": int(c)}
            for p, (_, leaf), c in zip(paths, flat, checksums)
        ],
    }
    return {**manifest, "sha256": _manifest_digest(manifest)}


def _parse_manifest(manifest: Any, step: int) -> tuple[list[dict], bool]:
    """Validates the integrity manifest of ``step``; returns ``(leaves, has_data_iterator)``.

    Raises ValueError naming the first malformed field, or a digest that does not match the
    content (a garbled or edited manifest is corruption)."""
    if not isinstance(manifest, dict) or manifest.get("format") not in (_MANIFEST_FORMAT,
                                                                         _MANIFEST_FORMAT_V1):
        raise ValueError(f"not a {_MANIFEST_FORMAT} manifest")
    if manifest["format"] == _MANIFEST_FORMAT and manifest.get("sha256") != _manifest_digest(manifest):
        raise ValueError("manifest content does not match its sha256 (edited or garbled)")
    if manifest.get("step") != step:
        raise ValueError(f"manifest is for step {manifest.get('step')!r}, not {step}")
    if not isinstance(manifest.get("has_data_iterator"), bool):
        raise ValueError("manifest field has_data_iterator is not a bool")
    leaves = manifest.get("leaves")
    if not isinstance(leaves, list) or not leaves:
        raise ValueError("manifest field leaves is not a non-empty list")
    for k, entry in enumerate(leaves):
        valid = (
            isinstance(entry, dict)
            and isinstance(entry.get("path"), str)
            and isinstance(entry.get("dtype"), str)
            and isinstance(entry.get("checksum"), int)
            and isinstance(entry.get("shape"), list)
            and all(isinstance(n, int) for n in entry["shape"])
        )
        if not valid:
            raise ValueError(f"manifest leaf entry {k} is malformed: {entry!r:.200}")
    return leaves, manifest["has_data_iterator"]


def _layout_problem(state: Any, leaves: list[dict]) -> Optional[str]:
    """Why the restored ``state`` does not have the paths/shapes/dtypes of the manifest, or None.

    Orbax falls back to the stored array type when its own metadata is damaged (e.g. a typed PRNG
    key comes back as raw ``uint32[2]`` with the same bytes), which the checksum alone misses.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    got = [(jax.tree_util.keystr(p), list(x.shape), str(x.dtype)) for p, x in flat]
    want = [(e["path"], e["shape"], e["dtype"]) for e in leaves]
    if got == want:
        return None
    got_paths, want_paths = [g[0] for g in got], [w[0] for w in want]
    if got_paths != want_paths:
        return f"it restored leaves {got_paths[:5]}, the manifest lists {want_paths[:5]}"
    (path, shape, dtype), (_, w_shape, w_dtype) = next((g, w) for g, w in zip(got, want) if g != w)
    return (
        f"leaf {path} came back as {tuple(shape)} {dtype} but was saved as {tuple(w_shape)} "
        f"{w_dtype} (damaged array metadata)"
    )


def _check_target(directory: epath.Path, step: int, leaves: list[dict], target: list) -> None:
    """Raises ValueError when the manifest ``leaves`` of ``step`` in ``directory`` do not have the
    paths/shapes/dtypes of the restore ``target`` (``(path, ShapeDtypeStruct)`` pairs)."""
    saved = [(e["path"], tuple(e["shape"]), e["dtype"]) for e in leaves]
    wanted = [(name, tuple(s.shape), str(s.dtype)) for name, s in target]
    if saved == wanted:
        return
    saved_paths, wanted_paths = [s[0] for s in saved], [w[0] for w in wanted]
    if saved_paths != wanted_paths:
        missing = sorted(set(saved_paths) - set(wanted_paths))
        extra = sorted(set(wanted_paths) - set(saved_paths))
        detail = (
            f"leaves only in the checkpoint: {missing[:5]}; only in the target: {extra[:5]}"
        )
    else:
        (path, s_shape, s_dtype), (_, w_shape, w_dtype) = next(
            (s, w) for s, w in zip(saved, wanted) if s != w
        )
        detail = (
            f"leaf {path} was saved as {s_shape} {s_dtype} but the target asks for "
            f"{w_shape} {w_dtype}"
        )
    raise ValueError(
        f"abstract_state does not match checkpoint step {step} in {directory}: {detail}. "
        f"Build the target from the same model/optimizer config as the run that wrote it."
    )
