"""Model specs of a config: ``"name"`` or ``"name:k=v,k2=v2"``, parsed and built into a module.

:func:`experiments.validate.validate_config` builds every spec of a config, so a bad spec fails at
validation, not mid-run.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from experiments.errors import ConfigError
from kdjax import models


def _literal(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parse_model_spec(spec: Any, key: str) -> tuple[str, dict[str, Any]]:
    """``"name"`` or ``"name:k=v,k2=v2"`` -> ``(name, {k: v, ...})`` (numbers and booleans parsed)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"config.{key} must be a model spec such as 'resnet18' or 'cnn1d:width=32'; "
                          f"got {spec!r}.")
    name, _, rest = spec.partition(":")
    kwargs = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        k, eq, v = item.partition("=")
        if not eq or not k.strip():
            raise ConfigError(f"config.{key}={spec!r}: attribute {item!r} must be key=value "
                              f"(spec format 'name:key=value,key=value').")
        kwargs[k.strip()] = _literal(v.strip())
    return name.strip(), kwargs


def build_model(spec: str, num_classes: int, dtype: str = "float32", key: str = "student.model"):
    """The Linen module of a model spec (``kdjax.models.create``); ``dtype`` is the compute dtype."""
    name, kwargs = parse_model_spec(spec, key)
    if dtype == "bfloat16":
        kwargs.setdefault("dtype", jnp.bfloat16)
    try:
        return models.create(name, num_classes, **kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.{key}={spec!r}: {e}") from None
