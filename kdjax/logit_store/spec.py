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
        if set(d) != fields:
            raise ValueError(f"StoreSpec fields {sorted(d)} do not match the expected {sorted(fields)}")
        return cls(**d)
