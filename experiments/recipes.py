"""Training recipes of an experiment config: learning-rate schedule, optimizer, KD loss terms."""

from __future__ import annotations

from typing import Callable

import jax
import ml_collections
import optax

from experiments.errors import ConfigError
from kdjax import recipe as recipe_lib, schedules

#: The optimizers and learning-rate schedules built here (``config.optimizer.name`` / ``schedule``).
OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("step", "cosine", "constant")


def learning_rate_schedule(opt: ml_collections.ConfigDict, *, steps_per_epoch: int,
                           num_epochs: int, batch_size: int, kind: str | None = None):
    """The optax learning-rate schedule of ``config.optimizer`` over ``num_epochs`` epochs.

    Peak rate ``lr * batch_size / lr_batch`` (the linear scaling rule). ``step``: multiplied by
    ``decay_factor`` at each of ``decay_epochs`` inside the run; ``cosine``: half-cosine to 0 at
    the end; ``constant``. ``warmup_epochs`` > 0 prepends a linear ramp from 0 to the peak.
    ``kind`` overrides ``opt.schedule``.
    """
    spe = steps_per_epoch
    peak = float(opt.lr) * batch_size / opt.lr_batch
    total = num_epochs * spe
    warm = opt.warmup_epochs * spe
    kind = kind or opt.schedule
    if kind == "constant":
        main = optax.constant_schedule(peak)
    elif kind == "step":
        main = optax.piecewise_constant_schedule(
            peak, {e * spe - warm: float(opt.decay_factor) for e in opt.decay_epochs
                   if e < num_epochs and e * spe > warm})
    elif kind == "cosine":
        main = optax.cosine_decay_schedule(peak, max(1, total - warm))
    else:
        raise ConfigError(f"learning-rate schedule {kind!r} is not valid; valid: {LR_SCHEDULES}.")
    if warm:
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), main], [warm])
    return main


def make_optimizer(opt: ml_collections.ConfigDict, schedule,
                   trainable: Callable[[str], bool] | None = None) -> optax.GradientTransformation:
    """``config.optimizer`` as optax, optionally training only some top-level modules.

    ``sgd``: ``add_decayed_weights(wd)`` then SGD with momentum (PyTorch's coupled weight decay on
    every parameter); ``adam``: the same L2 term then Adam; ``adamw``: decoupled decay.
    ``trainable(name) -> bool`` for each top-level parameter module: the others get
    ``optax.set_to_zero()`` through ``optax.multi_transform``, so they receive no update at all
    (weight decay and momentum included).
    """
    wd = float(opt.weight_decay)
    if opt.name == "sgd":
        tx = optax.chain(optax.add_decayed_weights(wd),
                         optax.sgd(schedule, momentum=float(opt.momentum) or None,
                                   nesterov=bool(opt.nesterov)))
    elif opt.name == "adam":
        tx = optax.chain(optax.add_decayed_weights(wd), optax.adam(schedule))
    elif opt.name == "adamw":
        tx = optax.adamw(schedule, weight_decay=wd)
    else:
        raise ConfigError(f"config.optimizer.name={opt.name!r} is not valid; valid: {OPTIMIZERS}.")
    if trainable is None:
        return tx

    def labels(params):
        return {name: jax.tree.map(lambda _, n=name: "train" if trainable(n) else "frozen", sub)
                for name, sub in params.items()}
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


# ------------------------------------------------------------------------------------------------
# Loss recipes.
# ------------------------------------------------------------------------------------------------


def kd_recipe(kd: ml_collections.ConfigDict, mode: str, steps_per_epoch: int) -> tuple:
    """The student's loss terms for a KD mode.

    * ``scratch``: ``CE`` (weight 1).
    * ``full`` (and ESKD ``early_teacher``, whose early stopping is in the teacher):
      ``ce_weight * CE + weight * T^2 KL(p_t^T || p_s^T)``.
    * ESKD ``stop_kd``: the same until ``stop_epoch``, then ``1 * CE`` alone: the KD weight is
      ``schedules.eskd(weight, stop_step)`` and the CE weight steps from ``ce_weight`` to 1, so the
      student finishes exactly as a scratch student would.
    """
    if mode == "scratch":
        return (recipe_lib.ce(1.0),)
    if mode == "eskd" and kd.reading == "stop_kd":
        stop = kd.stop_epoch * steps_per_epoch
        return (recipe_lib.ce(schedules.piecewise_constant([stop], [kd.ce_weight, 1.0])),
                recipe_lib.kd(kd.temperature, schedules.eskd(kd.weight, stop)))
    return (recipe_lib.ce(kd.ce_weight), recipe_lib.kd(kd.temperature, kd.weight))


def reading_label(config, mode: str, first_teacher: bool = True) -> str:
    """Which early stopping a KD result used, in words (every result row carries it).

    ``first_teacher``: the stage distils from the config's teacher (not from a chain's assistant,
    which is never an early-epoch snapshot).
    """
    if mode != "eskd":
        return "none"
    if config.kd.reading == "stop_kd":
        return f"stop_kd (KD term off from epoch {config.kd.stop_epoch})"
    if not first_teacher:
        return "none (early_teacher applies to the chain's first teacher)"
    return f"early_teacher (teacher from its epoch {config.teacher.early_epoch})"
