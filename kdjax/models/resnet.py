"""ImageNet ResNets (He et al., 2016) laid out like torchvision's ``resnet18`` .. ``resnet152`` (v1.5).

Layout: NHWC activations, HWIO kernels. The stem is a 7x7/2 conv (padding 3), BatchNorm, ReLU and a
3x3/2 max-pool (padding 1, padded with -inf as in ``torch.nn.MaxPool2d``); four stages of
:class:`BasicBlock` (ResNet-18/34) or :class:`Bottleneck` (ResNet-50/101/152) follow, with the stride
of a down-sampling Bottleneck on its 3x3 conv (torchvision v1.5). Every padding is explicit and
symmetric, so output sizes equal PyTorch's ``floor((n + 2p - k) / s) + 1`` for odd sizes too (Flax's
``'SAME'`` would pad asymmetrically when striding). ``stem='cifar'`` replaces the stem with the 3x3/1
conv and no max-pool that CIFAR KD codebases use for 32x32 inputs (strides 1, 2, 4, 8 for the stages);
torchvision weights then do not apply to ``conv1``. ``width`` (default 64, torchvision's) scales
every layer: the stem has ``width`` channels and the stages' blocks ``width * (1, 2, 4, 8)``, so
``width=32`` gives FitNet-style thinner students of any depth (torchvision weights fit width 64 only).

Module names mirror torchvision's ``state_dict`` keys with ``.`` replaced by ``_`` inside a name:
``conv1``, ``bn1``, ``layer1_0/{conv1,bn1,conv2,bn2[,conv3,bn3][,downsample_0,downsample_1]}``, ...,
``fc``; :mod:`kdjax.convert` relies on this (e.g. ``layer2.0.downsample.1.running_var`` is
``batch_stats['layer2_0']['downsample_1']['var']``).

``__call__(x [B, H, W, 3], train=False) -> (logits [B, num_classes] float32, features)`` with
features ``stem`` (after the max-pool, [B, H/4, W/4, width]), ``stage1`` .. ``stage4`` (stage
outputs, strides 4, 8, 16, 32; channels ``width * (1, 2, 4, 8) * expansion``, expansion 1 or 4) and
``pre_logits`` (global average pool, [B, 8 * width * expansion], float32). Features other than
``pre_logits`` are in the compute ``dtype``; pooling and the ``fc`` layer run in float32.

BatchNorm: momentum 0.9 (running = 0.9 * running + 0.1 * batch), epsilon 1e-5 (torchvision). One
difference from PyTorch: Flax updates the running variance with the biased batch variance, PyTorch
with the unbiased one (a factor n / (n - 1), n = B * H * W values per channel).

Initialisation follows torchvision: convs He-normal with fan-out (``kaiming_normal_(mode='fan_out')``),
BN scale 1 / bias 0 (scale 0 for the last BN of each block if ``zero_init_residual``), and ``fc``
weights uniform in +-1/sqrt(fan_in) (PyTorch's ``nn.Linear`` default) with zero bias.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax import kernels

Dtype = Any

#: Blocks per stage and whether the blocks are Bottlenecks, by depth (torchvision's table).
STAGE_SIZES: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
BOTTLENECK: dict[int, bool] = {18: False, 34: False, 50: True, 101: True, 152: True}

#: torchvision's conv init, ``kaiming_normal_(mode='fan_out', nonlinearity='relu')``: N(0, 2 / fan_out).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
#: PyTorch's ``nn.Linear`` weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. variance 1 / (3 fan_in).
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def conv_layer(features: int, kernel: int, strides: int, dtype: Dtype, param_dtype: Dtype,
               name: str, conv: str = "xla") -> nn.Conv:
    """A bias-free 2-D conv with PyTorch's symmetric padding ``kernel // 2`` on each side, computed
    by the convolution ``conv`` names (:data:`kdjax.kernels.CONVOLUTIONS`)."""
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                   padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=conv_init,
                   dtype=dtype, param_dtype=param_dtype, name=name,
                   conv_general_dilated=kernels.convolution(conv))


def batch_norm(train: bool, dtype: Dtype, param_dtype: Dtype, name: str,
               zero_scale: bool = False) -> nn.BatchNorm:
    """BatchNorm over the channel (last) axis, momentum 0.9, eps 1e-5; batch statistics iff ``train``."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                        param_dtype=param_dtype,
                        scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
                        name=name)


class ResidualBlock(nn.Module):
    """``relu(residual(x) + shortcut(x))``: the attributes and output shared by :class:`BasicBlock`
    and :class:`Bottleneck`, which define ``expansion`` and ``residual(x, conv, norm)``.

    ``shortcut`` is the identity, or ``downsample_1(downsample_0(x))`` (1x1 conv with the block's
    stride to ``features * expansion`` channels, then BN) when ``downsample``. The last BN of
    ``residual`` gets scale 0 at init if ``zero_init_residual``.
    """
    features: int
    strides: int = 1
    downsample: bool = False
    zero_init_residual: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv: str = "xla"
    expansion: ClassVar[int]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(conv_layer, dtype=self.dtype, param_dtype=self.param_dtype,
                                 conv=self.conv)
        norm = functools.partial(batch_norm, train, self.dtype, self.param_dtype)
        y = self.residual(x, conv, norm)
        if self.downsample:
            x = conv(self.features * self.expansion, 1, self.strides, name="downsample_0")(x)
            x = norm("downsample_1")(x)
        return nn.relu(x + y)


class BasicBlock(ResidualBlock):
    """``residual = bn2(conv2(relu(bn1(conv1(x)))))``; 3x3 convs, stride on ``conv1``.

    Output channels: ``features`` (expansion 1).
    """
    expansion: ClassVar[int] = 1

    def residual(self, x: jax.Array, conv: Callable[..., nn.Conv],
                 norm: Callable[..., nn.BatchNorm]) -> jax.Array:
        y = nn.relu(norm("bn1")(conv(self.features, 3, self.strides, name="conv1")(x)))
        return norm("bn2", zero_scale=self.zero_init_residual)(conv(self.features, 3, 1, name="conv2")(y))


class Bottleneck(ResidualBlock):
    """``residual = bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x))))))))`` (torchvision v1.5).

    ``conv1`` 1x1 to ``features``, ``conv2`` 3x3 with the block's stride, ``conv3`` 1x1 to
    ``4 * features`` (expansion 4).
    """
    expansion: ClassVar[int] = 4

    def residual(self, x: jax.Array, conv: Callable[..., nn.Conv],
                 norm: Callable[..., nn.BatchNorm]) -> jax.Array:
        y = nn.relu(norm("bn1")(conv(self.features, 1, 1, name="conv1")(x)))
        y = nn.relu(norm("bn2")(conv(self.features, 3, self.strides, name="conv2")(y)))
        out = self.features * self.expansion
        return norm("bn3", zero_scale=self.zero_init_residual)(conv(out, 1, 1, name="conv3")(y))


def run_stages(x: jax.Array, train: bool, block_cls: Callable[..., nn.Module],
               stage_sizes: tuple[int, ...], widths: tuple[int, ...], first_strides: tuple[int, ...],
               in_channels: int, features: dict[str, jax.Array], **block_kwargs) -> jax.Array:
    """Applies ``len(stage_sizes)`` stages of blocks named ``layer{i}_{j}`` (1-based i, 0-based j).

    The first block of stage ``i`` has stride ``first_strides[i]`` and a projection shortcut when
    the stride is not 1 or the channel count changes. Writes ``features[f'stage{i}']``.
    Must be called from inside a compact ``__call__`` (the blocks are auto-parented there).
    """
    channels = in_channels
    for i, (num_blocks, width, stride) in enumerate(zip(stage_sizes, widths, first_strides)):
        for j in range(num_blocks):
            strides = stride if j == 0 else 1
            out = width * block_cls.expansion
            x = block_cls(width, strides=strides, downsample=(strides != 1 or channels != out),
                          name=f"layer{i + 1}_{j}", **block_kwargs)(x, train)
            channels = out
        features[f"stage{i + 1}"] = x
    return x


def check_input(x: jax.Array, ndims: tuple[int, ...], layout: str, model: str) -> None:
    """Raises ValueError unless ``x.ndim`` is one of ``ndims`` (``layout`` describes the shapes)."""
    if x.ndim not in ndims:
        raise ValueError(f"{model} expects input x of shape {layout}; got shape {tuple(x.shape)}.")


class ResNet(nn.Module):
    """torchvision-layout ImageNet ResNet of depth 18, 34, 50, 101 or 152 (see module docstring).

    Attributes:
      depth: one of :data:`STAGE_SIZES`.
      num_classes: width of the ``fc`` layer.
      zero_init_residual: init the last BN scale of every block to 0 (each block starts as identity).
      stem: ``'imagenet'`` (7x7/2 conv + 3x3/2 max-pool) or ``'cifar'`` (3x3/1 conv, no pool).
      dtype: compute dtype of convs and BN (e.g. ``jnp.bfloat16``); logits are float32 regardless.
      param_dtype: dtype of the parameters.
      width: stem channels, an integer >= 1; stage ``i`` (1-based) has blocks of ``width * 2**(i-1)``
        channels (times the expansion at a Bottleneck's output). 64 is torchvision's ResNet.
      conv: which convolution computes every conv layer: ``'xla'`` (``lax.conv_general_dilated``) or
        ``'onednn'`` (:mod:`kdjax.kernels.onednn` on CPU, XLA's elsewhere); same parameters and outputs.
    """
    depth: int
    num_classes: int = 1000
    zero_init_residual: bool = False
    stem: str = "imagenet"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    width: int = 64
    conv: str = "xla"

    def __post_init__(self):
        kernels.convolution(self.conv)  # validates the name
        if self.depth not in STAGE_SIZES:
            raise ValueError(f"ResNet depth must be one of {sorted(STAGE_SIZES)}; got depth={self.depth!r}.")
        if self.stem not in ("imagenet", "cifar"):
            raise ValueError(f"ResNet stem must be 'imagenet' (7x7/2 conv + 3x3/2 max-pool) or 'cifar' "
                             f"(3x3/1 conv, no pool, for 32x32 inputs); got stem={self.stem!r}.")
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"ResNet width (stem channels; stages get width * (1, 2, 4, 8)) must be an "
                             f"integer >= 1, e.g. 64 (torchvision) or 32 (2x thinner); "
                             f"got width={self.width!r}.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        check_input(x, (4,), "[B, H, W, C] (NHWC)", f"ResNet-{self.depth}")
        features: dict[str, jax.Array] = {}
        imagenet_stem = self.stem == "imagenet"
        x = conv_layer(self.width, 7 if imagenet_stem else 3, 2 if imagenet_stem else 1, self.dtype,
                       self.param_dtype, name="conv1", conv=self.conv)(x)
        x = nn.relu(batch_norm(train, self.dtype, self.param_dtype, name="bn1")(x))
        if imagenet_stem:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        features["stem"] = x
        block_cls = Bottleneck if BOTTLENECK[self.depth] else BasicBlock
        widths = tuple(self.width * 2 ** i for i in range(4))
        x = run_stages(x, train, block_cls, STAGE_SIZES[self.depth], widths, (1, 2, 2, 2), self.width,
                       features, zero_init_residual=self.zero_init_residual, dtype=self.dtype,
                       param_dtype=self.param_dtype, conv=self.conv)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        features["pre_logits"] = x
        logits = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=self.param_dtype,
                          kernel_init=dense_init, name="fc")(x)
        return logits, features
