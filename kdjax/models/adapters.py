"""Feature adapters: FitNet's regressor r(.) (Romero et al., 2015) and the adaptation layer of
Chen et al. (2017), which is the same module.

A hint loss compares the teacher's hint layer ``u_h(x)`` with ``r(v_g(x))``, the student's guided
layer passed through a learned regressor that maps the student's channel count to the teacher's:
``1/2 ||u_h(x) - r(v_g(x))||^2``. :class:`Regressor` is ``r``; :class:`WithRegressor` wraps a
student so that ``r`` is part of the student's parameters and its output is one more feature tap.

Usage (FitNet stage 1 on CIFAR: student ``stage2`` guided by the teacher's 128-channel ``stage2``)::

    student = WithRegressor(models.create('cifar_resnet20', 10), guided='stage2', hint_channels=128)
    logits, feats = student.apply(variables, x)      # feats['stage2_regressed']: [B, h, w, 128]

Parameter layout: the wrapped model's variables stay at the top level (``nn.share_scope``) and the
regressor adds one entry, ``params['regressor']``; so for FitNet's stage 2 (KD on the whole student,
no hint) drop that entry and apply the bare model to the same variables.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models.resnet import Dtype

KINDS = ("conv", "dense")


class Regressor(nn.Module):
    """Maps a feature map ``[B, *spatial, C_s]`` to ``[B, *spatial', features_out]``.

    Attributes:
      features_out: channel count of the teacher's hint layer.
      kind: ``'conv'``: a ``kernel_size``-wide conv over all spatial axes of the input (1-D or 2-D
        maps; ``'SAME'`` padding keeps the spatial size, ``'VALID'`` shrinks each axis by
        ``kernel_size - 1``, which is FitNet's way to match a larger guided map to a smaller hint).
        ``'dense'``: a Dense layer on the last axis (vector features such as ``pre_logits``, or a
        per-position map); ``kernel_size`` must then be 1.
      kernel_size: conv kernel size along every spatial axis.
      padding: ``'SAME'`` or ``'VALID'`` (conv only).
      use_relu: apply ReLU to the output; FitNet asks r(.) to end in the hint layer's
        non-linearity, so set it when the hint is a post-ReLU map.
      dtype / param_dtype: compute / parameter dtypes.
    """
    features_out: int
    kind: str = "conv"
    kernel_size: int = 1
    padding: str = "SAME"
    use_relu: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Regressor kind must be one of {KINDS}; got kind={self.kind!r}.")
        if not (isinstance(self.features_out, int) and self.features_out >= 1):
            raise ValueError(f"Regressor features_out must be an integer >= 1; got {self.features_out!r}.")
        if not (isinstance(self.kernel_size, int) and self.kernel_size >= 1):
            raise ValueError(f"Regressor kernel_size must be an integer >= 1; got {self.kernel_size!r}.")
        if self.kind == "dense" and self.kernel_size != 1:
            raise ValueError(f"Regressor kind='dense' acts on the last axis only; kernel_size must be 1, "
                             f"got {self.kernel_size}. Use kind='conv' for a spatial kernel.")
        if self.padding not in ("SAME", "VALID"):
            raise ValueError(f"Regressor padding must be 'SAME' or 'VALID'; got {self.padding!r}.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind == "conv":
            if x.ndim < 3:
                raise ValueError(f"Regressor kind='conv' needs a feature map [B, *spatial, C]; got shape "
                                 f"{tuple(x.shape)}. Use kind='dense' for vector features.")
            y = nn.Conv(self.features_out, (self.kernel_size,) * (x.ndim - 2), padding=self.padding,
                        dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
        else:
            y = nn.Dense(self.features_out, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="dense")(x)
        return nn.relu(y) if self.use_relu else y


class WithRegressor(nn.Module):
    """A student whose features gain ``f'{guided}_regressed' = Regressor(...)(features[guided])``.

    ``__call__(x, train=False) -> (logits, features)``: the wrapped model's output plus the
    regressed tap. Variables: the model's, plus ``params['regressor']`` (see module docstring).

    Attributes:
      model: a kdjax model (``__call__(x, train) -> (logits, features)``); adopted, sharing this
        module's scope.
      guided: name of the student's guided feature tap, e.g. ``'stage2'``.
      hint_channels: channel count of the teacher's hint layer.
      kind / kernel_size / padding / use_relu: passed to :class:`Regressor`.
      dtype: compute dtype of the regressor; ``None`` uses ``model.dtype`` (float32 if it has none).
      param_dtype: parameter dtype of the regressor.
    """
    model: nn.Module
    guided: str
    hint_channels: int
    kind: str = "conv"
    kernel_size: int = 1
    padding: str = "SAME"
    use_relu: bool = False
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    def setup(self):
        nn.share_scope(self, self.model)
        dtype = self.dtype if self.dtype is not None else getattr(self.model, "dtype", jnp.float32)
        self.regressor = Regressor(self.hint_channels, kind=self.kind, kernel_size=self.kernel_size,
                                   padding=self.padding, use_relu=self.use_relu, dtype=dtype,
                                   param_dtype=self.param_dtype)

    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        logits, features = self.model(x, train=train)
        if self.guided not in features:
            raise ValueError(f"WithRegressor: guided={self.guided!r} is not a feature of "
                             f"{type(self.model).__name__}; available: {sorted(features)}.")
        features = dict(features)
        features[f"{self.guided}_regressed"] = self.regressor(features[self.guided])
        return logits, features
