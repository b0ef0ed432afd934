"""Models: Flax Linen modules returning ``(logits [B, num_classes] float32, features dict)``.

Every model's ``__call__(x, train: bool = False)`` returns the float32 logits and a dict of named
feature taps; variables are ``{'params', 'batch_stats'}`` (``batch_stats`` only with BatchNorm).
All accept ``dtype`` (compute dtype, e.g. ``jnp.bfloat16``) and ``param_dtype``.

Names (input shape; feature taps):

* ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``, ``resnet152``: ``[B, H, W, 3]``;
  ``stem``, ``stage1`` .. ``stage4``, ``pre_logits`` (:mod:`kdjax.models.resnet`). ``width``
  (default 64, torchvision's) sets the stem channels and the stage widths ``width * (1, 2, 4, 8)``
  (times 4 at a Bottleneck's output): ``create('resnet101', 1000, width=32)`` is a thinner, deeper
  FitNet student for a ResNet-50 teacher (model spec ``"resnet101:width=32"`` in the experiment
  configs).
* ``cifar_resnet{6n+2}`` (20, 32, 44, 56, 110 listed; any such depth builds) and
  ``wrn_{6n+4}_{k}`` (16_1, 16_2, 16_4, 28_10, 40_1, 40_2, 40_4 listed; any such pair builds):
  ``[B, 32, 32, 3]``; ``stem``, ``stage1`` .. ``stage3``, ``pre_logits`` (:mod:`kdjax.models.cifar`).
* ``mlp``, ``mlp_thin_deep``: ``[B, ...]`` (flattened); ``stage1`` .. ``stage{depth}``, ``pre_logits``.
* ``cnn1d``, ``cnn1d_thin_deep``: ``[B, 40]`` or ``[B, 40, 1]``; ``stage1`` .. ``stage3``, ``pre_logits``.
* ``cnn2d``, ``cnn2d_thin_deep``: ``[B, 8, 8]`` or ``[B, 8, 8, 1]``; ``stage1``, ``stage2``,
  ``pre_logits`` (:mod:`kdjax.models.small`).

``create(name, num_classes, **kwargs)`` builds one; kwargs are the class's attributes (e.g.
``width`` of a ResNet or a small model, ``depth`` of the small models, ``dropout_rate`` of a WRN,
``zero_init_residual``, ``dtype``), except those the name fixes (a ResNet's ``depth``, a WRN's ``widen_factor``).
The ``*_thin_deep`` names are FitNet-style students: more layers, fewer channels than the defaults.
See :mod:`kdjax.models.adapters` for the FitNet regressor / adaptation layer.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, NamedTuple

import flax.linen as nn

from kdjax.models.adapters import Regressor, WithRegressor
from kdjax.models.cifar import CifarResNet, WideResNet
from kdjax.models.resnet import STAGE_SIZES, BasicBlock, Bottleneck, ResNet
from kdjax.models.small import CNN1D, CNN2D, MLP

__all__ = ["create", "list_models", "ResNet", "BasicBlock", "Bottleneck", "CifarResNet", "WideResNet",
           "MLP", "CNN1D", "CNN2D", "Regressor", "WithRegressor"]


class _Spec(NamedTuple):
    cls: type[nn.Module]
    fixed: dict[str, Any]       # set by the name; may not be overridden
    defaults: dict[str, Any]    # overridable defaults


def _cifar(depth: int) -> _Spec:
    return _Spec(CifarResNet, {"depth": depth}, {})


def _wrn(depth: int, k: int) -> _Spec:
    return _Spec(WideResNet, {"depth": depth, "widen_factor": k}, {})


_REGISTRY: dict[str, _Spec] = {
    **{f"resnet{d}": _Spec(ResNet, {"depth": d}, {}) for d in STAGE_SIZES},
    **{f"cifar_resnet{d}": _cifar(d) for d in (20, 32, 44, 56, 110)},
    **{f"wrn_{d}_{k}": _wrn(d, k) for d, k in ((16, 1), (16, 2), (16, 4), (28, 10), (40, 1), (40, 2),
                                               (40, 4))},
    "mlp": _Spec(MLP, {}, {}),
    "mlp_thin_deep": _Spec(MLP, {}, {"width": 32, "depth": 6}),
    "cnn1d": _Spec(CNN1D, {}, {}),
    "cnn1d_thin_deep": _Spec(CNN1D, {}, {"width": 8, "depth": 9}),
    "cnn2d": _Spec(CNN2D, {}, {}),
    "cnn2d_thin_deep": _Spec(CNN2D, {}, {"width": 8, "depth": 6}),
}

#: Names outside the table that still build: any valid depth / widen factor.
_PATTERNS: tuple[tuple[re.Pattern, Callable[[re.Match], _Spec]], ...] = (
    (re.compile(r"cifar_resnet(\d+)"), lambda m: _cifar(int(m[1]))),
    (re.compile(r"wrn_(\d+)_(\d+)"), lambda m: _wrn(int(m[1]), int(m[2]))),
)


def list_models() -> tuple[str, ...]:
    """The registered model names, sorted (``create`` also accepts ``cifar_resnet{D}``, ``wrn_{D}_{K}``)."""
    return tuple(sorted(_REGISTRY))


def _lookup(name: str) -> _Spec:
    if name in _REGISTRY:
        return _REGISTRY[name]
    for pattern, spec in _PATTERNS:
        match = pattern.fullmatch(name)
        if match:
            return spec(match)
    raise ValueError(f"Unknown model name {name!r}. Valid names: {', '.join(list_models())}; "
                     f"also 'cifar_resnet{{6n+2}}' and 'wrn_{{6n+4}}_{{k}}' for other depths / widths.")


def create(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Builds the model ``name`` with ``num_classes`` outputs.

    Args:
      name: one of :func:`list_models`, or ``cifar_resnet{6n+2}`` / ``wrn_{6n+4}_{k}``.
      num_classes: number of logits, an integer >= 1.
      **kwargs: attributes of the model class (``dtype``, ``param_dtype``, ``width``, ...).

    Raises:
      ValueError: unknown ``name``, bad ``num_classes`` or invalid attribute values.
      TypeError: a keyword that the model does not have, or one fixed by ``name``.
    """
    if not isinstance(name, str):
        raise TypeError(f"create: name must be a string; got {type(name).__name__}.")
    spec = _lookup(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"create({name!r}): num_classes must be an integer >= 1; got {num_classes!r}.")
    allowed = sorted(f.name for f in dataclasses.fields(spec.cls)
                     if f.name not in ("parent", "name", "num_classes") and f.name not in spec.fixed)
    bad = sorted(set(kwargs) - set(allowed))
    if bad:
        raise TypeError(f"create({name!r}): unexpected keyword argument(s) {bad}; "
                        f"{spec.cls.__name__} accepts {allowed}.")
    return spec.cls(num_classes=num_classes, **{**spec.defaults, **spec.fixed, **kwargs})
