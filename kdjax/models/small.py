"""Small models for MNIST-1D (length-40 signals) and scikit-learn digits (8x8 images).

All return ``(logits [B, num_classes] float32, features)``; the features are ``stage1`` ..
``stage{S}`` (the output of each hidden layer for :class:`MLP`, of each stage for the CNNs) and
``pre_logits`` (the float32 vector the ``head`` Dense layer reads). There is no BatchNorm (except
in a :class:`CNN1D` with ``norm=True``), so the variables are ``{'params'}`` only. Hidden layers
use He-normal (fan-in) init and zero biases; ``head`` uses PyTorch's ``nn.Linear`` weight init.
Widths and depths are attributes, so one class gives teachers of several sizes and thin-and-deep
FitNet students (same stage taps, same strides, so a student's ``stage2`` lines up with a
teacher's ``stage2`` in length / spatial size).

* :class:`MLP`: flattens any ``[B, ...]`` input, ``depth`` hidden Dense + ReLU layers of ``width``
  (``dense1`` ..), taps ``stage{i}`` after hidden layer ``i``. Defaults (100 x 2) are the MNIST-1D
  paper's MLP.
* :class:`CNN1D`: input ``[B, L]`` or ``[B, L, C]`` (MNIST-1D: ``[B, 40]`` or ``[B, 40, 1]``, the
  same result). Three stages of ``depth / 3`` conv + ReLU layers (``conv1`` ..) with ``width``
  channels; the first layer of each stage has stride 2 (the very first: kernel 5, padding 1; all
  others kernel 3, padding 1), so L = 40 gives lengths 19, 10, 5. Then flatten (``pre_logits``
  ``[B, 5 * width]``) and ``head``. Defaults (width 25, depth 3) are the MNIST-1D paper's CNN
  (~94% test accuracy reported there).
  ``norm=True`` puts a BatchNorm (``bn1`` .., :func:`kdjax.models.resnet.batch_norm`: momentum
  0.9, eps 1e-5) between each conv and its ReLU, the convs then without bias, and the variables
  gain ``batch_stats``; the default ``norm=False`` is the BatchNorm-free CNN above.
* :class:`CNN2D`: input ``[B, H, W]`` or ``[B, H, W, C]`` (digits: ``[B, 8, 8, 1]``). Two stages of
  ``depth / 2`` 3x3 conv + ReLU layers (padding 1): stage 1 with ``width`` channels at stride 1,
  stage 2 with ``2 * width`` channels whose first conv has stride 2; global average pool
  (``pre_logits`` ``[B, 2 * width]``) and ``head``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models.resnet import Dtype, batch_norm, check_input, dense_init

#: He-normal for ReLU layers: N(0, 2 / fan_in).
he_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _check_size(model: str, **sizes: int) -> None:
    for name, value in sizes.items():
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{model}: {name} must be an integer >= 1; got {name}={value!r}.")


def _head(x: jax.Array, num_classes: int, param_dtype: Dtype) -> jax.Array:
    """The float32 classifier ``head``: ``x [B, D] -> logits [B, num_classes]``."""
    return nn.Dense(num_classes, dtype=jnp.float32, param_dtype=param_dtype, kernel_init=dense_init,
                    name="head")(x)


class MLP(nn.Module):
    """``depth`` hidden ReLU layers of ``width`` units on the flattened input (see module docstring)."""
    num_classes: int = 10
    width: int = 100
    depth: int = 2
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        _check_size("MLP", width=self.width, depth=self.depth)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        if x.ndim < 2:
            raise ValueError(f"MLP expects input x of shape [B, ...]; got shape {tuple(x.shape)}.")
        features: dict[str, jax.Array] = {}
        x = x.reshape(x.shape[0], -1)
        for i in range(self.depth):
            x = nn.relu(nn.Dense(self.width, kernel_init=he_init, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name=f"dense{i + 1}")(x))
            features[f"stage{i + 1}"] = x
        x = x.astype(jnp.float32)
        features["pre_logits"] = x
        return _head(x, self.num_classes, self.param_dtype), features


def _check_stages(model: str, depth: int, stages: int) -> None:
    if depth % stages:
        raise ValueError(f"{model}: depth (total conv layers, {stages} stages) must be a multiple of "
                         f"{stages}; got depth={depth}.")


def _channels_last(x: jax.Array, spatial: int, layout: str, model: str) -> jax.Array:
    """``x [B, *S]`` or ``[B, *S, C]`` with ``len(S) == spatial`` -> ``[B, *S, C]`` (``C = 1`` added).

    Raises ValueError (naming ``layout``) for any other rank.
    """
    check_input(x, (spatial + 1, spatial + 2), layout, model)
    return x[..., None] if x.ndim == spatial + 1 else x


def conv_stages(x: jax.Array, widths: tuple[int, ...], strides: tuple[int, ...], per_stage: int,
                first_kernel: int, dtype: Dtype, param_dtype: Dtype,
                features: dict[str, jax.Array], norm: bool = False, train: bool = False) -> jax.Array:
    """Stages of conv + ReLU layers ``conv1`` .. over the ``x.ndim - 2`` spatial axes of ``x [B, *S, C]``.

    Stage ``s`` has ``per_stage`` convs of ``widths[s]`` channels, the first with stride
    ``strides[s]`` on every spatial axis, the others stride 1. Kernels are 3 wide on every axis
    (``first_kernel`` for the very first conv), padding 1 on each side, so a stride-``t`` conv of
    kernel ``k`` maps a size ``n`` to ``floor((n + 2 - k) / t) + 1``. With ``norm``, a BatchNorm
    ``bn{i}`` (batch statistics iff ``train``) sits between conv ``i`` (then without bias) and its
    ReLU. Writes ``features[f'stage{s+1}']``. Must be called from inside a compact ``__call__``
    (the layers are auto-parented there).
    """
    spatial = x.ndim - 2
    for s, (width, stride) in enumerate(zip(widths, strides)):
        for j in range(per_stage):
            index = s * per_stage + j
            kernel = first_kernel if index == 0 else 3
            x = nn.Conv(width, (kernel,) * spatial, strides=(stride if j == 0 else 1,) * spatial,
                        padding=((1, 1),) * spatial, use_bias=not norm, kernel_init=he_init,
                        dtype=dtype, param_dtype=param_dtype, name=f"conv{index + 1}")(x)
            if norm:
                x = batch_norm(train, dtype, param_dtype, f"bn{index + 1}")(x)
            x = nn.relu(x)
        features[f"stage{s + 1}"] = x
    return x


class CNN1D(nn.Module):
    """Three-stage 1-D CNN, ``depth`` conv layers of ``width`` channels, BatchNorm iff ``norm``
    (see module docstring)."""
    num_classes: int = 10
    width: int = 25
    depth: int = 3
    norm: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        _check_size("CNN1D", width=self.width, depth=self.depth)
        _check_stages("CNN1D", self.depth, 3)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        x = _channels_last(x, 1, "[B, L] or [B, L, C]", "CNN1D")
        features: dict[str, jax.Array] = {}
        x = conv_stages(x, (self.width,) * 3, (2, 2, 2), self.depth // 3, 5, self.dtype,
                        self.param_dtype, features, norm=self.norm, train=train)
        x = x.reshape(x.shape[0], -1).astype(jnp.float32)
        features["pre_logits"] = x
        return _head(x, self.num_classes, self.param_dtype), features


class CNN2D(nn.Module):
    """Two-stage 2-D CNN, ``depth`` 3x3 conv layers, ``width`` / ``2 * width`` channels (see module docstring)."""
    num_classes: int = 10
    width: int = 32
    depth: int = 2
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        _check_size("CNN2D", width=self.width, depth=self.depth)
        _check_stages("CNN2D", self.depth, 2)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        x = _channels_last(x, 2, "[B, H, W] or [B, H, W, C]", "CNN2D")
        features: dict[str, jax.Array] = {}
        x = conv_stages(x, (self.width, 2 * self.width), (1, 2), self.depth // 2, 3, self.dtype,
                        self.param_dtype, features)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        features["pre_logits"] = x
        return _head(x, self.num_classes, self.param_dtype), features
