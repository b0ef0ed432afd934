"""Loss recipes: the weighted sum of :mod:`kdjax.losses` terms that a train step minimises.

A recipe is a tuple of :class:`Term`. Each term maps ``(student, teacher, batch, step)`` to a
per-example loss ``[B]``, computed with ``where=batch['mask']`` (padding rows give exactly zero loss
and gradient); the step averages it over the real rows and multiplies it by the term's weight at that step:

    total(step) = sum_i  w_i(step) * mean_{b: mask_b} loss_i[b]

Weights (and the KD temperature) are floats or schedules ``step -> scalar`` from
:mod:`kdjax.schedules`, e.g. ``schedules.eskd(weight=1.0, stop_step=...)`` switches KD off.

Example, Hinton KD with alpha = 0.9, T = 4 plus a FitNet hint on the regressed stage-2 features::

    recipe = (ce(weight=0.1), kd(temperature=4.0, weight=0.9),
              hint('stage2_regressed', 'stage2', weight=1.0))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import losses, schedules
from kdjax.losses.features import _hint_reduction
from kdjax.teachers import TeacherOutput

Schedule = Callable[[jax.Array], jax.Array]


class StudentOutput(NamedTuple):
    logits: jax.Array                      # [B, C] float32
    features: Mapping[str, jax.Array]      # named taps


@dataclasses.dataclass(frozen=True)
class Term:
    """One weighted loss term. ``loss(student, teacher, batch, step) -> [B]`` per-example values;
    ``teacher_features``: the teacher's feature taps it reads (none: logits only)."""
    name: str
    loss: Callable[[StudentOutput, TeacherOutput, Mapping[str, jax.Array], jax.Array], jax.Array]
    weight: float | Schedule = 1.0
    needs_teacher: bool = True
    teacher_features: tuple[str, ...] = ()


def _value(x, step):
    return schedules.as_schedule(x)(step)


def _positive(name: str, x: float | Schedule) -> float | Schedule:
    """``x`` unless it is a constant that is not a finite number > 0 (a schedule is checked by the
    loss, when its value is concrete); the error names the term's argument ``name``."""
    if not callable(x) and not (np.ndim(x) == 0 and np.isfinite(x) and x > 0):
        raise ValueError(f"{name} must be a finite number > 0 or a schedule step -> value; got "
                         f"{x!r}.")
    return x


def _feature(features: Mapping[str, jax.Array] | None, name: str, who: str) -> jax.Array:
    if not features or name not in features:
        have = sorted(features) if features else []
        raise ValueError(f"{who} has no feature {name!r}; available features: {have}. "
                         f"Pick a tapped layer from that list (or add the tap to the model).")
    return features[name]


def ce(weight: float | Schedule = 1.0) -> Term:
    """Cross-entropy of the student with the integer labels (``batch['label']``)."""
    return Term("ce", lambda s, t, b, step: losses.cross_entropy(s.logits, b["label"],
                                                                     where=b.get("mask")),
                weight, needs_teacher=False)


def kd(temperature: float | Schedule = 4.0, weight: float | Schedule = 1.0) -> Term:
    """Hinton KD, ``T^2 KL(p_t^T || p_s^T)``; uses the top-k form if the teacher is stored top-k."""
    _positive("kd: temperature", temperature)

    def loss(s, t, b, step):
        temp = _value(temperature, step)
        if t.logits is not None:
            return losses.kd_kl(s.logits, t.logits, temp, where=b.get("mask"))
        return losses.kd_kl_topk(s.logits, t.topk_values, t.topk_indices, temp,
                                 where=b.get("mask"))
    return Term("kd", loss, weight)


def hint(student_feature: str, teacher_feature: str, weight: float | Schedule = 1.0,
         normalize: bool | None = None, *, reduction: str | None = None) -> Term:
    """FitNet hint ``1/2 ||u_h - r(v_g)||^2`` between a (regressed) student feature and a teacher one.

    ``reduction``: ``'sum'`` over the feature elements (None, the default: the paper's) or ``'mean'``
    (:func:`kdjax.losses.fitnet_hint`). ``normalize`` is its deprecated spelling (True: ``'mean'``);
    it warns, and passing both is a TypeError."""
    how = _hint_reduction(reduction, normalize, "recipe.hint")

    def loss(s, t, b, step):
        return losses.fitnet_hint(_feature(s.features, student_feature, "student"),
                                  _feature(t.features, teacher_feature, "teacher"),
                                  where=b.get("mask"), reduction=how)
    return Term(f"hint/{student_feature}", loss, weight, teacher_features=(teacher_feature,))


def attention(pairs: Sequence[tuple[str, str]], weight: float | Schedule = 1000.0,
              p: int = 2) -> Term:
    """Attention transfer (Zagoruyko & Komodakis 2017) summed over ``(student, teacher)`` pairs."""
    def loss(s, t, b, step):
        return sum(losses.attention_transfer(_feature(s.features, sf, "student"),
                                             _feature(t.features, tf, "teacher"), p=p,
                                             where=b.get("mask"))
                   for sf, tf in pairs)
    return Term("at", loss, weight, teacher_features=tuple(tf for _, tf in pairs))


def dkd(alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
        weight: float | Schedule = 1.0) -> Term:
    """Decoupled KD (Zhao et al. 2022), ``alpha * TCKD + beta * NCKD``; needs the teacher's full
    logits (its target-class and non-target parts)."""
    _positive("dkd: temperature", temperature)

    def loss(s, t, b, step):
        if t.logits is None:
            raise ValueError("dkd needs the teacher's full logits, but this teacher gives top-k "
                             "outputs (a top-k logit store); write the store with format='full', "
                             "or use kd(), which has a top-k form.")
        return losses.dkd(s.logits, t.logits, b["label"], alpha=alpha, beta=beta,
                          temperature=temperature, where=b.get("mask"))
    return Term("dkd", loss, weight)


def validate(recipe: Sequence[Term]) -> tuple[Term, ...]:
    """``recipe`` as a tuple, or ValueError/TypeError when it is not a non-empty sequence of
    :class:`Term` with distinct names."""
    if isinstance(recipe, Term) or not isinstance(recipe, Sequence):
        raise TypeError(f"recipe must be a tuple of terms, e.g. (recipe.ce(0.1), recipe.kd(4.0, "
                        f"0.9)); got {type(recipe).__name__} (wrap a single term: (term,)).")
    if not recipe:
        raise ValueError("recipe is empty: the step would minimise nothing; give at least one "
                         "term, e.g. (recipe.ce(),).")
    for i, term in enumerate(recipe):
        if not isinstance(term, Term):
            raise TypeError(f"recipe[{i}] is a {type(term).__name__}, not a Term; call the term's "
                            f"constructor (recipe.ce(), not recipe.ce).")
    names = [term.name for term in recipe]
    if len(set(names)) != len(names):
        raise ValueError(f"recipe has duplicate term names {names}; each term must be unique.")
    return tuple(recipe)


def needs_teacher(recipe: Sequence[Term]) -> bool:
    return any(term.needs_teacher for term in recipe)


def teacher_features(recipe: Sequence[Term]) -> list[str]:
    """The teacher's feature taps that the recipe's terms read."""
    return sorted({f for term in recipe for f in term.teacher_features})


def evaluate(recipe: Sequence[Term], student: StudentOutput, teacher: TeacherOutput | None,
             batch: Mapping[str, jax.Array], step: jax.Array) -> tuple[jax.Array, dict[str, Any]]:
    """Total loss and metrics ``{'loss/<name>': mean, 'weight/<name>': w}`` for one batch."""
    recipe = validate(recipe)
    mask = batch.get("mask")
    total = jnp.zeros((), jnp.float32)
    metrics = {}
    for term in recipe:
        value = losses.masked_mean(term.loss(student, teacher, batch, step), mask)
        w = jnp.asarray(_value(term.weight, step), jnp.float32)
        total = total + w * value
        metrics[f"loss/{term.name}"] = value
        metrics[f"weight/{term.name}"] = w
    metrics["loss/total"] = total
    return total, metrics
