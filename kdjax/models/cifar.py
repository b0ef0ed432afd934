"""CIFAR ResNets (He et al., 2016, Sec. 4.2) and Wide ResNets (Zagoruyko & Komodakis, 2016).

Both take NHWC images (32x32x3 for CIFAR; any size works) and return
``(logits [B, num_classes] float32, features)`` with features ``stem``, ``stage1`` .. ``stage3``
(strides 1, 2, 4) and ``pre_logits`` ([B, C], float32, after global average pooling).

:class:`CifarResNet` (depth ``6n + 2``: 20, 32, 44, 56, 110, ...): a 3x3 conv to 16 channels, BN,
ReLU, then three stages of ``n`` :class:`~kdjax.models.resnet.BasicBlock` with 16, 32, 64 channels.
Shortcut **option B**: where the shape changes (first block of stages 2 and 3) the shortcut is a
1x1 strided conv + BN (the paper's CIFAR nets used option A, zero-padding identity shortcuts). B adds
2,560 conv weights and 192 BN parameters: ResNet-20 for 10 classes has 272,474 parameters here,
269,722 with option A. Names follow the ImageNet ResNet (``conv1``, ``bn1``, ``layer1_0``, ..., ``fc``).

:class:`WideResNet` WRN-d-k (depth ``6n + 4``, widen factor k): pre-activation blocks
``conv2(dropout(relu(bn2(conv1(relu(bn1(x))))))) + shortcut``; the shortcut is ``x`` when the
channel count is unchanged, else a 1x1 strided conv applied to ``relu(bn1(x))`` (the authors' code).
Widths 16 (stem ``conv1``), 16k, 32k, 64k; a final BN + ReLU (``bn``) before pooling and ``fc``.
Dropout (``dropout_rate``, between the two convs) is active only when ``train=True`` and then needs
a ``'dropout'`` PRNG key in ``apply(..., rngs={'dropout': key})``. The ``stage`` taps are the raw
(pre-activation) block outputs; the last BN + ReLU is applied after ``stage3``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax import kernels
from kdjax.models.resnet import (BasicBlock, Dtype, batch_norm, check_input, conv_layer, dense_init,
                                 run_stages)


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth ``6n + 2`` with option-B shortcuts (see module docstring).

    Attributes:
      depth: 20, 32, 44, 56, 110, ... (``(depth - 2) % 6 == 0``).
      num_classes: width of ``fc``.
      zero_init_residual: init each block's ``bn2`` scale to 0.
      dtype / param_dtype: compute / parameter dtypes; logits are float32.
      conv: the convolution, ``'xla'`` or ``'onednn'`` (see :class:`kdjax.models.ResNet`).
    """
    depth: int
    num_classes: int = 10
    zero_init_residual: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv: str = "xla"

    def __post_init__(self):
        kernels.convolution(self.conv)  # validates the name
        if not (isinstance(self.depth, int) and self.depth >= 8 and (self.depth - 2) % 6 == 0):
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...); "
                             f"got depth={self.depth!r}.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        check_input(x, (4,), "[B, H, W, C] (NHWC)", f"CIFAR ResNet-{self.depth}")
        features: dict[str, jax.Array] = {}
        x = conv_layer(16, 3, 1, self.dtype, self.param_dtype, name="conv1", conv=self.conv)(x)
        x = nn.relu(batch_norm(train, self.dtype, self.param_dtype, name="bn1")(x))
        features["stem"] = x
        n = (self.depth - 2) // 6
        x = run_stages(x, train, BasicBlock, (n, n, n), (16, 32, 64), (1, 2, 2), 16, features,
                       zero_init_residual=self.zero_init_residual, dtype=self.dtype,
                       param_dtype=self.param_dtype, conv=self.conv)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        features["pre_logits"] = x
        logits = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=self.param_dtype,
                          kernel_init=dense_init, name="fc")(x)
        return logits, features


class WideBlock(nn.Module):
    """Pre-activation wide block (see module docstring); output channels ``features``."""
    features: int
    strides: int = 1
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(conv_layer, dtype=self.dtype, param_dtype=self.param_dtype,
                                 conv=self.conv)
        norm = functools.partial(batch_norm, train, self.dtype, self.param_dtype)
        o = nn.relu(norm("bn1")(x))
        if x.shape[-1] == self.features and self.strides == 1:
            shortcut = x
        else:
            shortcut = conv(self.features, 1, self.strides, name="shortcut")(o)
        y = conv(self.features, 3, self.strides, name="conv1")(o)
        y = nn.relu(norm("bn2")(y))
        if self.dropout_rate > 0.0:
            y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        y = conv(self.features, 3, 1, name="conv2")(y)
        return y + shortcut


class WideResNet(nn.Module):
    """WRN-depth-widen_factor (see module docstring).

    Attributes:
      depth: 10, 16, 22, 28, 40, ... (``(depth - 4) % 6 == 0``).
      widen_factor: k >= 1; stage widths 16k, 32k, 64k.
      num_classes: width of ``fc``.
      dropout_rate: dropout probability between the block's convs (0 disables it).
      dtype / param_dtype: compute / parameter dtypes; logits are float32.
      conv: the convolution, ``'xla'`` or ``'onednn'`` (see :class:`kdjax.models.ResNet`).
    """
    depth: int
    widen_factor: int
    num_classes: int = 10
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv: str = "xla"

    def __post_init__(self):
        kernels.convolution(self.conv)  # validates the name
        if not (isinstance(self.depth, int) and self.depth >= 10 and (self.depth - 4) % 6 == 0):
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...); "
                             f"got depth={self.depth!r}.")
        if not (isinstance(self.widen_factor, int) and self.widen_factor >= 1):
            raise ValueError(f"WRN widen_factor must be an integer >= 1; got {self.widen_factor!r}.")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1); got {self.dropout_rate!r}.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        check_input(x, (4,), "[B, H, W, C] (NHWC)", f"WRN-{self.depth}-{self.widen_factor}")
        features: dict[str, jax.Array] = {}
        x = conv_layer(16, 3, 1, self.dtype, self.param_dtype, name="conv1", conv=self.conv)(x)
        features["stem"] = x
        n = (self.depth - 4) // 6
        k = self.widen_factor
        for i, (width, stride) in enumerate(zip((16 * k, 32 * k, 64 * k), (1, 2, 2))):
            for j in range(n):
                x = WideBlock(width, strides=stride if j == 0 else 1, dropout_rate=self.dropout_rate,
                              dtype=self.dtype, param_dtype=self.param_dtype, conv=self.conv,
                              name=f"layer{i + 1}_{j}")(x, train)
            features[f"stage{i + 1}"] = x
        x = nn.relu(batch_norm(train, self.dtype, self.param_dtype, name="bn")(x))
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        features["pre_logits"] = x
        logits = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=self.param_dtype,
                          kernel_init=dense_init, name="fc")(x)
        return logits, features
