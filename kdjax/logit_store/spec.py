"""What a logit store holds: :class:`StoreSpec`, the value formats and the stored dtypes."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

FORMATS = ("full", "topk")
DTYPES: dict[str, np.dtype] = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
}
_INDEX_DTYPE = np.dtype(np.int32)
_VIEW_FIELDS = ("epochs", "seed", "transform")


@dataclasses.dataclass(frozen=True)
class StoreSpec:
    """What a store holds; recorded in its metadata and checked when it is opened.

    Attributes:
      dataset: dataset name, e.g. ``'imagenet2012'`` or ``'mnist1d'``.
      split: split name as the data pipeline spells it, e.g. ``'train'``.
      num_examples: number of examples in the split; ids are ``0 .. num_examples - 1``.
      num_classes: number of teacher classes ``C``.
      teacher: teacher identity, e.g. ``'resnet50:torchvision-IMAGENET1K_V2'``.
      preprocessing: description of the teacher's input preprocessing, e.g.
        ``'resize256-center224-imagenet-mean-std'``.
      format: ``'full'`` (all ``C`` logits per example) or ``'topk'`` (the ``k`` largest logits and
        their class indices, largest first, ties to the lower class index).
      k: number of kept logits for ``'topk'`` (``1 <= k <= num_classes``); ``None`` for ``'full'``.
      dtype: stored value dtype: ``'float16'``, ``'bfloat16'`` or ``'float32'``.
      epochs: ``None`` for a store of one (unaugmented) view per example; for a *view store*
        ``(first, last)``, the inclusive range of training epochs whose augmented views it holds:
        one row per ``(epoch, id)``, the teacher's outputs on
        ``kdjax.data.train_example(source, id, seed=seed, epoch=epoch, transform=...)``.
      seed: the data seed of those views (view store only; ``None`` otherwise).
      transform: the fingerprint of the train transform that made them
        (:func:`kdjax.data.transform_fingerprint`; view store only, ``None`` otherwise).
    """

    dataset: str
    split: str
    num_examples: int
    num_classes: int
    teacher: str
    preprocessing: str
    format: str = "full"
    k: int | None = None
    dtype: str = "float16"
    epochs: tuple[int, int] | None = None
    seed: int | None = None
    transform: str | None = None

    def __post_init__(self):
        for name in ("dataset", "split", "teacher"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"StoreSpec.{name} must be a non-empty string, got {value!r}")
        if not isinstance(self.preprocessing, str):
            raise ValueError(
                f"StoreSpec.preprocessing must be a string describing the teacher's input "
                f"preprocessing, got {self.preprocessing!r}")
        for name in ("num_examples", "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"StoreSpec.{name} must be a positive integer, got {value!r}")
        if self.format not in FORMATS:
            raise ValueError(f"StoreSpec.format must be one of {FORMATS}, got {self.format!r}")
        if self.format == "full" and self.k is not None:
            raise ValueError(f"StoreSpec.k must be None for format 'full', got k={self.k!r}; "
                             f"use format='topk' to keep only the top k logits")
        if self.format == "topk":
            if (isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer))
                    or not 1 <= self.k <= self.num_classes):
                raise ValueError(f"StoreSpec.k must be an integer in [1, num_classes={self.num_classes}] "
                                 f"for format 'topk', got k={self.k!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"StoreSpec.dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        object.__setattr__(self, "num_examples", int(self.num_examples))
        object.__setattr__(self, "num_classes", int(self.num_classes))
        if self.k is not None:
            object.__setattr__(self, "k", int(self.k))
        self._check_views()

    def _check_views(self) -> None:
        views = {"epochs": self.epochs, "seed": self.seed, "transform": self.transform}
        if all(v is None for v in views.values()):
            return
        unset = [name for name, v in views.items() if v is None]
        if unset:
            raise ValueError(f"StoreSpec: a view store needs epochs, seed and transform together; "
                             f"{', '.join(unset)} {'is' if len(unset) == 1 else 'are'} None (leave all "
                             f"three None for a store of one unaugmented view per example)")
        epochs = self.epochs
        if (isinstance(epochs, (str, bytes)) or not hasattr(epochs, "__len__") or len(epochs) != 2
                or not all(isinstance(e, (int, np.integer)) and not isinstance(e, bool) for e in epochs)
                or not 0 <= epochs[0] <= epochs[1]):
            raise ValueError(f"StoreSpec.epochs must be (first, last) with 0 <= first <= last (an "
                             f"inclusive range of training epochs), got {epochs!r}")
        object.__setattr__(self, "epochs", (int(epochs[0]), int(epochs[1])))
        if (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                or not 0 <= self.seed < 2**32):
            raise ValueError(f"StoreSpec.seed must be an integer in [0, 2**32) (the data seed of the "
                             f"views), got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))
        if not isinstance(self.transform, str) or not self.transform:
            raise ValueError(f"StoreSpec.transform must be a non-empty string (the train transform's "
                             f"fingerprint, kdjax.data.transform_fingerprint), got {self.transform!r}")

    @property
    def views(self) -> bool:
        """Whether this is a view store: one row per ``(epoch, id)`` of :attr:`epochs`."""
        return self.epochs is not None

    @property
    def num_epochs(self) -> int:
        """Epochs of views held: ``last - first + 1`` for a view store, 1 otherwise."""
        return self.epochs[1] - self.epochs[0] + 1 if self.views else 1

    @property
    def num_rows(self) -> int:
        """Rows of a complete store: ``num_examples * num_epochs``; row key of ``(epoch, id)`` is
        ``(epoch - first) * num_examples + id`` (just ``id`` when not a view store)."""
        return self.num_examples * self.num_epochs

    @property
    def bytes_per_row(self) -> int:
        """Disk bytes per row (per example; a view store: per ``(epoch, id)``) of a complete store:
        ``ids.bin`` 8 + ``values.bin`` ``width x itemsize`` + ``indices.bin`` ``4 k`` ('topk') +
        ``index.npy`` 16 (int64 shard and row). The store is ``num_rows x bytes_per_row`` plus a
        few small JSON files and the 128-byte ``.npy`` header."""
        indices = _INDEX_DTYPE.itemsize * self.k if self.format == "topk" else 0
        return 8 + self.width * self.value_dtype.itemsize + indices + 16

    def describe_views(self) -> str:
        """``'epochs 0-89 of seed 0, transform <fingerprint>'`` or ``'one unaugmented view'``."""
        if not self.views:
            return "one unaugmented view per example"
        return (f"the augmented views of epochs {self.epochs[0]}-{self.epochs[1]} under seed {self.seed}, "
                f"transform {self.transform}")

    @property
    def width(self) -> int:
        """Values per example: ``num_classes`` for 'full', ``k`` for 'topk'."""
        return self.num_classes if self.format == "full" else self.k

    @property
    def value_dtype(self) -> np.dtype:
        """NumPy dtype of the stored values (``ml_dtypes.bfloat16`` for 'bfloat16')."""
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StoreSpec":
        fields = {f.name for f in dataclasses.fields(cls)}
        d = {**{name: None for name in _VIEW_FIELDS}, **d}  # stores written before views existed
        if d.get("epochs") is not None:
            d["epochs"] = tuple(d["epochs"])  # JSON keeps a list
        if set(d) != fields:
            raise ValueError(f"StoreSpec fields {sorted(d)} do not match the expected {sorted(fields)}")
        return cls(**d)
