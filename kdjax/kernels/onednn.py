"""oneDNN convolutions on XLA:CPU: a drop-in for ``lax.conv_general_dilated``.

XLA:CPU runs convolutions through Eigen (and YNNPACK fusions on jax 0.10), reaching about 40% of this
project's CPU peak in a ResNet train step; oneDNN, which PyTorch uses on CPU, reaches more. This module
calls oneDNN's convolution primitives through XLA's FFI (``onednn_conv.cc``): forward, backward-data
and backward-weights, tied together with ``jax.custom_vjp``.

:func:`conv_general_dilated` has ``lax.conv_general_dilated``'s signature and runs oneDNN when all of
these hold, and ``lax.conv_general_dilated`` otherwise (same result up to rounding):

* the program is traced for CPU: the default backend, unless :func:`lowering_for` names another
  (there the library must be built: :func:`require` raises otherwise);
* ``lhs [N, H, W, C]`` and ``rhs [KH, KW, C, O]`` (NHWC / HWIO, Flax's ``nn.Conv`` layout), no
  dilation, ``feature_group_count == batch_group_count == 1``;
* both float32; or both bfloat16 where oneDNN has native bfloat16 kernels for the shape's three
  passes (CPUs with AVX512-BF16 or AMX: :func:`native_bf16`): float32 accumulation and one rounding
  of each result, as XLA's.

So a model that passes ``conv_general_dilated=kdjax.kernels.onednn.conv_general_dilated`` to
``flax.linen.Conv`` runs unchanged on GPU and TPU. Under a multi-device mesh each pass is partitioned
over the batch (``jax.experimental.custom_partitioning``): every device convolves its own examples
with the whole kernel (XLA gathers an FSDP-sharded one) and the weight gradients are summed over
the devices (an all-reduce); any other sharding of the operands is gathered first, and a batch
that does not split evenly over its axes runs whole on every device. Inside ``shard_map`` it is
typed as lax's convolution is (its result varies over the manual axes its operands vary over;
a replicated kernel's gradient is summed over them). Under ``vmap`` the passes run example by
example. Limit: first derivatives only (the backward kernels are not
differentiable again).

Build: on first use, :mod:`kdjax.kernels.build` compiles ``onednn_conv.cc`` against the installed
jaxlib's FFI headers and oneDNN (the ``cpu`` extra's PyPI wheels, ``$DNNL_ROOT`` or the system's) into
a per-user cache. Where it cannot (no compiler, no oneDNN, not Linux), :func:`conv_general_dilated`
runs XLA's convolution and warns once, saying why and how to fix it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import threading
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

#: The three FFI targets, by pass: (XLA target name, exported handler symbol).
TARGETS = {"fwd": ("kdjax_onednn_conv_fwd", "KdjaxOnednnConvFwd"),
           "bwd_data": ("kdjax_onednn_conv_bwd_data", "KdjaxOnednnConvBwdData"),
           "bwd_weights": ("kdjax_onednn_conv_bwd_weights", "KdjaxOnednnConvBwdWeights")}
#: The name scope of every oneDNN custom call: an op under it runs on CPU only.
SCOPE = "kdjax_onednn_conv"
_NHWC_HWIO = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                      out_spec=(0, 3, 1, 2))


_LOWERING = threading.local()


@contextlib.contextmanager
def lowering_for(platform: str):
    """Within the block, trace convolutions for ``platform`` (``'cpu'``, ``'tpu'``, ``'gpu'``)
    instead of ``jax.default_backend()``: a program compiled ahead of time on a CPU host for a
    TPU (:mod:`kdjax.aot`) must use XLA's convolution, not this CPU kernel. Thread-local."""
    before = getattr(_LOWERING, "platform", None)
    _LOWERING.platform = platform
    try:
        yield
    finally:
        _LOWERING.platform = before


def target_platform() -> str:
    """The platform convolutions are traced for: :func:`lowering_for`'s, else the default
    backend's."""
    return getattr(_LOWERING, "platform", None) or jax.default_backend()


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The library, built first if need be (:func:`kdjax.kernels.build.build`), with its FFI targets
    registered; or, if it cannot be built or loaded, why (a message naming the fix)."""
    from kdjax.kernels import build  # here: `python -m kdjax.kernels.build` runs it as __main__
    try:
        path = build.build()
        lib = ctypes.cdll.LoadLibrary(str(path))
    except (build.BuildError, OSError) as e:
        return str(e)
    for target, symbol in TARGETS.values():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    lib.KdjaxOnednnImplName.restype = ctypes.c_char_p
    lib.KdjaxOnednnImplName.argtypes = (ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.c_int)
    lib.KdjaxOnednnVersion.restype = ctypes.c_char_p
    return lib


def available() -> bool:
    """True when the library is built (or can be, now) and loaded for the installed jaxlib."""
    return not isinstance(_library(), str)


def require() -> None:
    """Raises ``RuntimeError`` saying why the library is unavailable, unless :func:`available`."""
    if not available():
        raise RuntimeError(f"kdjax's oneDNN convolution is unavailable: {_library()}")


def version() -> str:
    """The version of the oneDNN library the kernel runs on, e.g. ``'3.2.0'``."""
    require()
    return _library().KdjaxOnednnVersion().decode()


@functools.cache
def _warn_unavailable() -> None:
    warnings.warn(f"conv='onednn' runs on XLA's convolution (slower on CPU): kdjax's oneDNN "
                  f"convolution is unavailable: {_library()}", RuntimeWarning, stacklevel=4)


def implementation(pass_: str, x_shape: Sequence[int], w_shape: Sequence[int],
                   strides: Sequence[int], padding: Sequence[tuple[int, int]],
                   dtype: Any = jnp.float32) -> str:
    """oneDNN's name for the kernel that serves one pass (``'fwd'``, ``'bwd_data'`` or
    ``'bwd_weights'``) of a convolution in ``dtype`` (float32 or bfloat16), e.g.
    ``'brgconv:avx512_core'`` (kernel, then the instruction set it uses), or ``'error: ...'`` if
    oneDNN has none; for dispatch, benchmarks and tests."""
    if pass_ not in TARGETS:
        raise ValueError(f"implementation: pass must be one of {list(TARGETS)}; got {pass_!r}.")
    if jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"implementation: dtype must be float32 or bfloat16; got "
                         f"{jnp.dtype(dtype).name}.")
    require()
    geometry = (*x_shape, *w_shape[:2], w_shape[3], *strides, *(p for pair in padding for p in pair))
    arr = (ctypes.c_int64 * 13)(*(int(v) for v in geometry))
    return _library().KdjaxOnednnImplName(list(TARGETS).index(pass_), arr,
                                          int(jnp.dtype(dtype) == jnp.bfloat16)).decode()


def native_bf16(x_shape: Sequence[int], w_shape: Sequence[int], strides: Sequence[int],
                padding: Sequence[tuple[int, int]]) -> bool:
    """Whether oneDNN runs all three passes of this convolution in bfloat16 on bfloat16
    instructions (AVX512-BF16, AMX: the instruction set after the ``:`` names them), not on a
    reference or emulated kernel (``'jit_bf16:avx512_core'``), both slower than XLA's."""
    return _native_bf16(tuple(x_shape), tuple(w_shape), tuple(strides),
                        tuple(tuple(p) for p in padding))


@functools.cache
def _bf16_implementations(x_shape, w_shape, strides, padding) -> tuple[str, ...]:
    """:func:`implementation` of each pass (``TARGETS`` order) in bfloat16, asked of oneDNN once
    per geometry."""
    return tuple(implementation(p, x_shape, w_shape, strides, padding, jnp.bfloat16)
                 for p in TARGETS)


def _native_bf16(x_shape, w_shape, strides, padding) -> bool:
    def native(name):
        kernel, _, isa = name.partition(":")
        return not kernel.startswith(("error", "ref")) and ("bf16" in isa or "amx" in isa)
    return all(native(name) for name in _bf16_implementations(x_shape, w_shape, strides, padding))


#: Each pass's operands and result as factors (``n`` the batch; ``h w``/``oh ow`` the input's and the
#: output's rows and columns; ``kh kw c o`` the kernel's). A mesh may split the batch only.
_RULES = {"fwd": "n h w c, kh kw c o -> n oh ow o",
          "bwd_data": "n oh ow o, kh kw c o -> n h w c",
          "bwd_weights": "n h w c, n oh ow o -> kh kw c o"}


def _varying(*xs: jax.Array) -> frozenset:
    """The manual mesh axes (inside ``shard_map``) over which any of ``xs`` varies."""
    return frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in xs))


def _vary_over(x: jax.Array, axes: frozenset) -> jax.Array:
    """``x`` typed as varying over ``axes`` too (``lax.pcast``; inside ``shard_map`` only)."""
    missing = tuple(sorted(axes - _varying(x)))
    return lax.pcast(x, missing, to="varying") if missing else x


def _ffi(pass_: str, out_shape: tuple[int, ...], strides: tuple[int, int],
         padding: tuple[int, int, int, int], a: jax.Array, b: jax.Array) -> jax.Array:
    """One pass on the operands as given; ``out_shape``'s batch (``fwd``, ``bwd_data``) is ``a``'s.
    Inside ``shard_map`` the result varies over the manual axes its operands vary over (an FFI
    call's result would otherwise be typed as equal on every device)."""
    if pass_ != "bwd_weights":
        out_shape = (a.shape[0], *out_shape[1:])
    y = jax.ffi.ffi_call(TARGETS[pass_][0], jax.ShapeDtypeStruct(out_shape, a.dtype),
                         vmap_method="sequential")(
        a, b, strides=np.asarray(strides, np.int64), padding=np.asarray(padding, np.int64))
    return _vary_over(y, _varying(a, b))


def _batch_axes(arg_shapes) -> Any:
    """The mesh axes that split the first operand's batch into equal parts, or None (run whole):
    when it is not split, when the split is uneven (Shardy pads the last parts with rows that
    would add into the weight gradient) and when the sharding names no mesh axes (a
    partially manual ``shard_map``)."""
    shape, sharding = arg_shapes[0].shape, arg_shapes[0].sharding
    spec = getattr(sharding, "spec", None)
    axes = spec[0] if spec else None
    if axes is None:
        return None
    parts = math.prod(sharding.mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
    return axes if shape[0] % parts == 0 else None


def _partition(pass_, ffi, mesh, arg_shapes, result_shape):
    """Per-device program of one pass: activations split over the batch as the first operand is,
    the kernel whole (XLA gathers an FSDP-sharded one); the weight gradient's per-device sums are
    added over the batch axes (XLA:CPU adds bfloat16 ones in float32 and rounds once)."""
    del result_shape
    axes = _batch_axes(arg_shapes)
    acts, whole = NamedSharding(mesh, P(axes)), NamedSharding(mesh, P())
    if pass_ != "bwd_weights":
        return mesh, ffi, acts, (acts, whole)

    def weight_gradient(x, dy):
        dw = ffi(x, dy)
        return dw if axes is None else lax.psum(dw, axes)
    return mesh, weight_gradient, whole, (acts, acts)


def _result_sharding(pass_, mesh, arg_shapes, result_shape):
    del result_shape
    return NamedSharding(mesh, P() if pass_ == "bwd_weights" else P(_batch_axes(arg_shapes)))


@functools.cache
def _pass(pass_: str, out_shape: tuple[int, ...], strides: tuple[int, int],
          padding: tuple[int, int, int, int]):
    """One pass as a function of its two operands that a mesh splits over the batch
    (``custom_partitioning``: the batch is the only factor of :data:`_RULES` that may be sharded,
    and the weight gradient's is a reduction) and ``vmap`` runs example by example."""
    ffi = functools.partial(_ffi, pass_, out_shape, strides, padding)
    partitioned = custom_partitioning(ffi)
    rule = _RULES[pass_]
    partitioned.def_partition(
        partition=functools.partial(_partition, pass_, ffi),
        infer_sharding_from_operands=functools.partial(_result_sharding, pass_),
        sharding_rule=rule,
        need_replication_factors=tuple(f for f in dict.fromkeys(rule.replace(",", " ").split())
                                       if f not in ("n", "->")),
        reduction_factors=("n",) if pass_ == "bwd_weights" else ())
    fn = jax.custom_batching.custom_vmap(partitioned)

    @fn.def_vmap
    def _sequential(axis_size, in_batched, a, b):  # custom_partitioning has no batching rule
        del axis_size
        return jax.vmap(ffi, in_axes=tuple(0 if bt else None for bt in in_batched))(a, b), True
    return fn


def _call(pass_: str, out_shape: Sequence[int], a: jax.Array, b: jax.Array,
          strides: tuple[int, int], padding: tuple[int, int, int, int]) -> jax.Array:
    # Here, on every call: JAX caches the traces of _pass's functions, so a check inside them
    # would not run again.
    require()  # loads the library and registers its targets
    with jax.named_scope(SCOPE):  # names the CPU custom calls in the program (kdjax.aot checks)
        return _pass(pass_, tuple(int(d) for d in out_shape), tuple(strides), tuple(padding))(a, b)


def conv_nhwc(x: jax.Array, w: jax.Array, strides: tuple[int, int],
              padding: tuple[int, int, int, int]) -> jax.Array:
    """``y [N, OH, OW, O] = conv(x [N, H, W, C], w [KH, KW, C, O])`` on oneDNN, in the inputs' dtype
    (float32 or bfloat16).

    ``padding = (top, bottom, left, right)``; ``OH = (H + top + bottom - KH) // strides[0] + 1``.
    Inside ``shard_map`` both operands are first made to vary over the same manual axes, as lax's
    convolution does (a replicated kernel's gradient is then summed over them).
    """
    if x.dtype == jnp.bfloat16 and any(name.startswith("error") for name in _bf16_implementations(
            tuple(x.shape), tuple(w.shape), tuple(strides),
            ((padding[0], padding[1]), (padding[2], padding[3])))):
        raise ValueError(
            f"conv_nhwc: oneDNN has no bfloat16 kernel for this convolution on this CPU (x "
            f"{tuple(x.shape)}, w {tuple(w.shape)}; an AVX2-only CPU has none): use "
            f"conv_general_dilated, which runs it on XLA's convolution, or float32 inputs.")
    axes = _varying(x, w)
    return _conv_nhwc(_vary_over(x, axes), _vary_over(w, axes), strides, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_nhwc(x: jax.Array, w: jax.Array, strides: tuple[int, int],
               padding: tuple[int, int, int, int]) -> jax.Array:
    oh = (x.shape[1] + padding[0] + padding[1] - w.shape[0]) // strides[0] + 1
    ow = (x.shape[2] + padding[2] + padding[3] - w.shape[1]) // strides[1] + 1
    return _call("fwd", (x.shape[0], oh, ow, w.shape[3]), x, w, strides, padding)


def _conv_nhwc_fwd(x, w, strides, padding):
    return _conv_nhwc(x, w, strides, padding), (x, w)


def _conv_nhwc_bwd(strides, padding, residuals, dy):
    x, w = residuals
    return (_call("bwd_data", x.shape, dy, w, strides, padding),
            _call("bwd_weights", w.shape, x, dy, strides, padding))


_conv_nhwc.defvjp(_conv_nhwc_fwd, _conv_nhwc_bwd)


def _explicit_padding(padding: Any, x: jax.Array, w: jax.Array, strides: Sequence[int]):
    if isinstance(padding, str):
        return lax.padtype_to_pads(x.shape[1:3], w.shape[:2], strides, padding)
    return [tuple(p) for p in padding]


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None, dimension_numbers: Any = None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
    """``lax.conv_general_dilated`` on oneDNN where supported (module docstring), else on XLA."""
    fallback = functools.partial(
        lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)
    supported = (
        target_platform() == "cpu" and lhs.ndim == 4 and rhs.ndim == 4
        and lhs.dtype == rhs.dtype and lhs.dtype in (jnp.float32, jnp.bfloat16)
        and preferred_element_type in (None, lhs.dtype)
        and feature_group_count == 1 and batch_group_count == 1
        and lhs.shape[3] > 0 and rhs.shape[3] > 0  # no channels: lax's empty or zero result
        and all(int(st) >= 1 for st in window_strides)
        and all(d == 1 for d in (lhs_dilation or (1, 1))) and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _NHWC_HWIO)
    if not supported:
        return fallback()
    jax.eval_shape(fallback)  # lax's own checks and messages for bad shapes or padding
    strides = tuple(int(s) for s in window_strides)
    (top, bottom), (left, right) = _explicit_padding(padding, lhs, rhs, strides)
    pads = (int(top), int(bottom), int(left), int(right))
    if min(pads) < 0:
        return fallback()
    if not available():
        _warn_unavailable()
        return fallback()
    if (lhs.dtype == jnp.bfloat16 and not native_bf16(
            lhs.shape, rhs.shape, strides, ((pads[0], pads[1]), (pads[2], pads[3])))):
        return fallback()
    return conv_nhwc(lhs, rhs, strides, pads)
