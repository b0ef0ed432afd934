"""Loss-weight and temperature schedules as pure functions of the training step.

A schedule is any callable ``schedule(step) -> float32 array`` (optax's ``Schedule`` type has the same
shape, so optax schedules can be passed wherever a kdjax schedule is accepted). The ones here are
``functools.partial`` objects over module-level functions: picklable, with a readable ``repr``, and
jit-safe: ``step`` may be a Python int or a (traced) integer array. A scalar step gives a scalar; an
array of steps gives one value per step (handy for plotting), as does ``jax.vmap``.

Their arguments are configuration (Python numbers) and are validated when the schedule is built.
Use :func:`as_schedule` where either a number or a schedule is accepted. To express epochs, multiply by
the steps per epoch: ``eskd(weight=1.0, stop_step=stop_epoch * steps_per_epoch)``.

This module imports only JAX and NumPy.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Schedule", "as_schedule", "constant", "cosine", "eskd", "linear", "piecewise_constant"]

Schedule = Callable[[Union[int, jax.Array]], jax.Array]


def _value(value, name: str) -> float:
    """A finite Python float from a real scalar (Python or concrete array)."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a concrete number when the schedule is built, got a traced value; build "
            "schedules outside jit (or pass the traced value itself instead of a schedule)"
        )
    if isinstance(value, (jax.Array, np.ndarray)):
        real = value.ndim == 0 and (
            jnp.issubdtype(value.dtype, jnp.integer) or jnp.issubdtype(value.dtype, jnp.floating)
        )
    else:
        real = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if not real:
        raise TypeError(f"{name} must be a real number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}")
    return number


def _step_count(value, name: str) -> int:
    """A non-negative Python int step boundary."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a Python int (a step count), got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def _steps(step) -> jax.Array:
    step = jnp.asarray(step)
    if not (jnp.issubdtype(step.dtype, jnp.integer) or jnp.issubdtype(step.dtype, jnp.floating)):
        raise TypeError(f"step must be an integer step count, got dtype {step.dtype}")
    if jnp.issubdtype(step.dtype, jnp.unsignedinteger):  # step - begin_step must not wrap around
        step = step.astype(jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)
    return step


def _progress(step, begin_step: int, end_step: int) -> jax.Array:
    """Fraction of the way from begin_step to end_step, clipped to [0, 1], as float32."""
    elapsed = jnp.clip(_steps(step) - begin_step, 0, end_step - begin_step)
    return elapsed.astype(jnp.float32) / jnp.float32(end_step - begin_step)


def _constant(step, *, value: float) -> jax.Array:
    return jnp.full(jnp.shape(step), value, jnp.float32)


def _linear(step, *, init_value: float, end_value: float, begin_step: int, end_step: int) -> jax.Array:
    frac = _progress(step, begin_step, end_step)
    return jnp.float32(init_value) + (jnp.float32(end_value) - jnp.float32(init_value)) * frac


def _cosine(step, *, init_value: float, end_value: float, begin_step: int, end_step: int) -> jax.Array:
    frac = _progress(step, begin_step, end_step)
    weight = 0.5 * (1.0 + jnp.cos(jnp.float32(math.pi) * frac))
    return jnp.float32(end_value) + (jnp.float32(init_value) - jnp.float32(end_value)) * weight


def _piecewise_constant(step, *, boundaries: tuple, values: tuple) -> jax.Array:
    step = _steps(step)
    index = jnp.zeros(step.shape, jnp.int32)
    for boundary in boundaries:
        index = index + (step >= boundary).astype(jnp.int32)
    return jnp.asarray(values, jnp.float32)[index]


def _eskd(step, *, weight: float, stop_step: int) -> jax.Array:
    return jnp.where(_steps(step) < stop_step, jnp.float32(weight), jnp.float32(0.0))


def constant(value) -> Schedule:
    """``schedule(step) = value`` for every step."""
    return functools.partial(_constant, value=_value(value, "value"))


def _range(init_value, end_value, begin_step, end_step, kind: str):
    begin_step = _step_count(begin_step, "begin_step")
    end_step = _step_count(end_step, "end_step")
    if end_step <= begin_step:
        raise ValueError(
            f"{kind} needs end_step > begin_step, got begin_step={begin_step}, end_step={end_step}; for an "
            "instant switch use piecewise_constant"
        )
    return dict(
        init_value=_value(init_value, "init_value"),
        end_value=_value(end_value, "end_value"),
        begin_step=begin_step,
        end_step=end_step,
    )


def linear(init_value, end_value, begin_step: int, end_step: int) -> Schedule:
    """Linear ramp: ``init_value`` up to ``begin_step``, ``end_value`` from ``end_step`` on.

    ``schedule(step) = init + (end - init) * clip((step - begin_step) / (end_step - begin_step), 0, 1)``.
    E.g. DKD's warm-up of its loss weight over ``w`` steps: ``linear(0.0, 1.0, 0, w)``.
    """
    return functools.partial(_linear, **_range(init_value, end_value, begin_step, end_step, "linear"))


def cosine(init_value, end_value, begin_step: int, end_step: int) -> Schedule:
    """Half-cosine from ``init_value`` (at ``begin_step`` and before) to ``end_value`` (at ``end_step`` and after).

    ``schedule(step) = end + (init - end) * (1 + cos(pi * f)) / 2`` with
    ``f = clip((step - begin_step) / (end_step - begin_step), 0, 1)``.
    """
    return functools.partial(_cosine, **_range(init_value, end_value, begin_step, end_step, "cosine"))


def piecewise_constant(boundaries: Sequence[int], values: Sequence[float]) -> Schedule:
    """Step function: ``values[i]`` where ``i`` is the number of boundaries ``<= step``.

    ``values[0]`` applies before ``boundaries[0]``, ``values[1]`` from ``boundaries[0]`` up to
    ``boundaries[1]``, and so on; ``len(values) == len(boundaries) + 1`` and the boundaries strictly
    increase. Covers step decay, e.g. a temperature lowered at fixed steps:
    ``piecewise_constant([1000, 2000], [8.0, 4.0, 2.0])``.
    """
    boundaries = tuple(_step_count(b, f"boundaries[{i}]") for i, b in enumerate(boundaries))
    values = tuple(_value(v, f"values[{i}]") for i, v in enumerate(values))
    if len(values) != len(boundaries) + 1:
        raise ValueError(
            f"piecewise_constant needs len(values) == len(boundaries) + 1 (one value before the first "
            f"boundary and one after each), got {len(boundaries)} boundaries and {len(values)} values"
        )
    if any(b >= c for b, c in zip(boundaries, boundaries[1:])):
        raise ValueError(f"boundaries must strictly increase, got {list(boundaries)}")
    return functools.partial(_piecewise_constant, boundaries=boundaries, values=values)


def eskd(weight, stop_step: int) -> Schedule:
    """Early-stopped KD (Cho & Hariharan, ICCV 2019): the KD weight is ``weight`` before ``stop_step``, 0 after.

    ``schedule(step) = weight if step < stop_step else 0``. Used as the KD weight, training continues on
    the label loss alone from ``stop_step`` on: with :func:`kdjax.losses.hinton_kd` pass it as ``alpha``
    (``alpha = 0`` leaves ``cross_entropy``); with a separate sum ``ce + w * kd`` pass it as ``w``. This
    is the "switch the KD term off" reading of ESKD; the paper's other reading, an early-epoch teacher
    checkpoint, is a choice of teacher, not a schedule.
    """
    return functools.partial(_eskd, weight=_value(weight, "weight"), stop_step=_step_count(stop_step, "stop_step"))


def as_schedule(value_or_schedule) -> Schedule:
    """A schedule from a number (a :func:`constant` schedule) or a schedule (returned unchanged).

    Lets a train step accept either, e.g. ``alpha=0.9`` or ``alpha=eskd(0.9, 10_000)``.
    """
    if callable(value_or_schedule):
        return value_or_schedule
    try:
        return constant(value_or_schedule)
    except TypeError as error:
        raise TypeError(
            f"expected a number or a schedule (a callable step -> value), got {value_or_schedule!r} ({error})"
        ) from None
