"""The reader: :class:`LogitStore` opens a complete store, checks it against the run, looks up ids."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from kdjax.logit_store.files import _read_json
from kdjax.logit_store.layout import (_INDEX, _METADATA, _SHARDS_DIR, _describe_partial, _read_spec_any,
                                      _shard_files, is_complete)
from kdjax.logit_store.rows import _as_ids, _as_mask, _row_keys
from kdjax.logit_store.spec import StoreSpec

PRECOMPUTE_COMMAND = "python -m experiments.precompute_teacher_logits"


_READS = {"dataset": "the run reads dataset", "split": "the run reads split",
          "num_examples": "the run's split has num_examples =",
          "num_classes": "the student predicts num_classes =",
          "teacher": "the run expects teacher", "preprocessing": "the run expects preprocessing",
          "format": "the run's loss expects format", "k": "the run expects k =",
          "dtype": "the run expects dtype", "epochs": "the run expects the views of epochs",
          "seed": "the run's data seed is", "transform": "the run's train transform is"}
_VIEW_FIX = ("a view store holds the teacher's outputs on the exact augmented views of one run "
             "(its seed, train transform and epochs): precompute one for this run with "
             "`{command} --views=epochs:<first>-<last>` (config teacher.store_views) and the run's seed "
             "and dataset settings")


def _check_expectations(path: str, spec: StoreSpec, expect: Mapping[str, Any],
                        views: bool | None = None) -> None:
    """Raise a ValueError naming every field of ``spec`` that differs from the run's ``expect``.

    ``expect`` maps StoreSpec field names to the run's values; a value of None is not checked.
    ``views`` (not None: the run gave a whole spec) is whether the run expects a view store: a
    view store where one unaugmented view is expected (or the reverse) is refused through its
    ``epochs``.
    """
    differ = [name for name, value in expect.items() if value is not None and getattr(spec, name) != value]
    if views is not None and views != spec.views and "epochs" not in differ:
        differ.append("epochs")
    wrong = [f"{name} {getattr(spec, name)!r} but {_READS[name]} {expect[name]!r}" for name in differ]
    if wrong:
        views_differ = any(name in ("epochs", "seed", "transform") for name in differ)
        raise ValueError(
            f"logit store at {path} was written for {'; for '.join(wrong)} (store: dataset {spec.dataset!r}, "
            f"split {spec.split!r}, {spec.num_examples} examples, {spec.num_classes} classes, teacher "
            f"{spec.teacher!r}, format {spec.format!r}, k {spec.k!r}, dtype {spec.dtype!r}"
            f"{', ' + spec.describe_views() if spec.views else ''}); "
            + (_VIEW_FIX.format(command=PRECOMPUTE_COMMAND) + "; or " if views_differ else "")
            + f"precompute the teacher logits for the run's dataset/split with `{PRECOMPUTE_COMMAND}` or "
            f"point the run at the matching store (or delete {path}, if nothing else uses it, and "
            f"precompute it again)")


def _expected_fields(spec: StoreSpec | None, fields: Mapping[str, Any]) -> dict[str, Any]:
    """The expectations of ``LogitStore.open``: every field of ``spec``, or the given keywords.

    A None value is not checked; with ``spec`` that is ``k`` of a 'full' spec, whose difference
    from a 'topk' store is reported through ``format``, and the view fields of a spec of one
    unaugmented view, whose difference from a view store ``_check_expectations`` reports.
    """
    if spec is None:
        return dict(fields)
    if not isinstance(spec, StoreSpec):
        raise TypeError(f"LogitStore.open: spec must be a StoreSpec or None, got {type(spec).__name__}")
    given = sorted(name for name, value in fields.items() if value is not None)
    if given:
        raise TypeError(f"LogitStore.open: pass either spec or the field keywords {given}, not both "
                        f"(spec already fixes every field)")
    return spec.to_dict()


class LogitStore:
    """Read-only random access to a complete store by example id, from any process.

    Open with ``LogitStore.open``. Arrays are memory-mapped lazily per process; the object pickles
    by path (so it can be shipped to data-loader workers). ``lookup`` returns, for ``ids [B]``:
    'full' -> ``{'teacher_logits': [B, C]}``; 'topk' -> ``{'teacher_topk_values': [B, k],
    'teacher_topk_indices': [B, k] int32}``; values in the stored dtype. A view store
    (``spec.views``) is keyed by ``(epoch, id)``: ``lookup(ids, epochs)``, and ``add_to_batch``
    reads each train batch row's ``'epoch'``.
    """

    def __init__(self, path: str, spec: StoreSpec, layout: list[dict[str, Any]]):
        self.path = path
        self.spec = spec
        self._layout = layout
        self._arrays: list[dict[str, np.ndarray] | None] | None = None
        self._index: np.ndarray | None = None

    @classmethod
    def open(cls, path: str | os.PathLike, *, dataset: str | None = None, split: str | None = None,
             num_examples: int | None = None, num_classes: int | None = None,
             teacher: str | None = None, format: str | None = None,
             preprocessing: str | None = None, k: int | None = None, dtype: str | None = None,
             epochs: tuple[int, int] | None = None, seed: int | None = None,
             transform: str | None = None, spec: StoreSpec | None = None) -> "LogitStore":
        """Open the store at ``path``, checking it against what the run expects.

        Either ``spec`` (the whole :class:`StoreSpec` the run needs: every field must match) or
        any of the field keywords (each one that is not None must match); passing both is a
        TypeError. A mismatch raises ValueError naming every differing field with both values
        and the fix; with ``spec``, a view store is refused where a store of one unaugmented view
        is expected and the reverse, and a view store of another seed, transform or epoch range. A store without its COMPLETE marker (half-written or never finalized) is
        refused with its shards' states (after the expectations are checked).
        """
        expect = _expected_fields(spec, {
            "dataset": dataset, "split": split, "num_examples": num_examples,
            "num_classes": num_classes, "teacher": teacher, "preprocessing": preprocessing,
            "format": format, "k": k, "dtype": dtype,
            "epochs": None if epochs is None else tuple(epochs), "seed": seed, "transform": transform})
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise ValueError(f"no logit store at {path}; precompute one with `{PRECOMPUTE_COMMAND}`")
        stored = _read_spec_any(path)
        if stored is None:
            raise ValueError(f"{path} is not a logit store (no metadata.json and no shards); precompute "
                             f"one with `{PRECOMPUTE_COMMAND}`")
        _check_expectations(path, stored, expect, None if spec is None else spec.views)
        if not is_complete(path):
            raise ValueError(
                f"logit store at {path} is incomplete (half-written or not finalized): "
                f"{_describe_partial(path)}; resume the precompute (LogitStoreWriter(..., resume=True), "
                f"the resume option of `{PRECOMPUTE_COMMAND}`) and finalize it, or delete the directory")
        meta = _read_json(os.path.join(path, _METADATA))
        store = cls(path, stored, meta["shards"])
        store._check_files()
        return store

    def _check_files(self) -> None:
        """Check that every shard file has the size its metadata promises."""
        for entry in self._layout:
            for name, (dtype, width) in _shard_files(self.spec).items():
                file = os.path.join(self.path, _SHARDS_DIR, entry["name"], f"{name}.bin")
                need = entry["rows"] * width * dtype.itemsize
                have = os.path.getsize(file) if os.path.exists(file) else -1
                if have != need:
                    raise ValueError(f"logit store at {self.path} is corrupt: {entry['name']}/{name}.bin has "
                                     f"{have} bytes, metadata expects {need}; precompute it again")

    def _load(self) -> None:
        self._index = np.load(os.path.join(self.path, _INDEX), mmap_mode="r")
        arrays = []
        for entry in self._layout:
            if entry["rows"] == 0:
                arrays.append(None)
                continue
            arrays.append({
                name: np.memmap(os.path.join(self.path, _SHARDS_DIR, entry["name"], f"{name}.bin"),
                                dtype=dtype, mode="r", shape=(entry["rows"], width))
                for name, (dtype, width) in _shard_files(self.spec).items() if name != "ids"})
        self._arrays = arrays

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "spec": self.spec, "layout": self._layout}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["spec"], state["layout"])

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """Batch keys that ``lookup``/``add_to_batch`` produce."""
        if self.spec.format == "full":
            return ("teacher_logits",)
        return ("teacher_topk_values", "teacher_topk_indices")

    def lookup(self, ids: Any, epochs: Any = None) -> dict[str, np.ndarray]:
        """Teacher outputs for example ``ids [B]`` (any order, repeats allowed); see the class doc.

        A view store needs ``epochs [B]``, the epoch of each id's view (in ``spec.epochs``); other
        stores ignore it."""
        keys = _row_keys(self.spec, _as_ids(ids), epochs, f"LogitStore.lookup ({self.path})")
        if self._arrays is None:
            self._load()
        loc = np.asarray(self._index[keys])
        files = {"values": self.batch_keys[0]}
        if self.spec.format == "topk":
            files["indices"] = "teacher_topk_indices"
        out = {key: np.empty((keys.size, self.spec.width), dtype=_shard_files(self.spec)[name][0])
               for name, key in files.items()}
        for s in np.unique(loc[:, 0]):
            sel = loc[:, 0] == s
            rows = loc[sel, 1]
            for name, key in files.items():
                out[key][sel] = self._arrays[s][name][rows]
        return out

    def add_to_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Return ``batch`` plus the teacher keys for its ``'id'`` rows.

        Rows with ``batch['mask']`` False (padding) get zeros and their ids are not looked up (they
        may hold any value). Without a ``'mask'`` key every row is real. A view store looks up each
        row's ``(batch['epoch'], batch['id'])``: the outputs on the very view the batch holds. The
        input is not modified.
        """
        if "id" not in batch:
            raise ValueError(f"batch needs an 'id' key (int64 [B] example ids) to look up teacher outputs, "
                             f"got keys {sorted(batch)}")
        ids = _as_ids(batch["id"], "batch['id']")
        mask = _as_mask(batch.get("mask"), ids.size)
        epochs = None
        if self.spec.views:
            if "epoch" not in batch:
                raise ValueError(
                    f"logit store at {self.path} holds {self.spec.describe_views()}, keyed by (epoch, id), "
                    f"but the batch has no 'epoch' key (got keys {sorted(batch)}); a view store serves train "
                    f"batches (kdjax.data.make_train_iterator); eval batches read a store of the "
                    f"unaugmented eval view")
            epochs = np.asarray(batch["epoch"])
            if epochs.shape != ids.shape:
                raise ValueError(f"batch['epoch'] has shape {epochs.shape} but batch['id'] has {ids.shape}")
            epochs = epochs[mask]
        found = self.lookup(ids[mask], epochs)
        out = dict(batch)
        for key, val in found.items():
            full = np.zeros((ids.size, self.spec.width), dtype=val.dtype)
            full[mask] = val
            out[key] = full
        return out
