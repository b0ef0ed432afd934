"""kdjax.kernels.onednn: oneDNN convolutions on XLA:CPU against float64 references, the lax fallbacks,
models and a (sharded) train step on oneDNN vs XLA, concurrency, and the build / missing-library errors.

Tests marked ``needs_onednn`` use the compiled library (built on first use into the kernel cache):
they skip when it cannot be built here, and fail when ``KDJAX_REQUIRE_ONEDNN`` is set (as in CI).
Each test that needs an instruction set says which (``needs_isa``).
"""

import concurrent.futures
import ctypes
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

import local_processes
from kdjax import models, recipe, sharding, train
from kdjax.kernels import build, onednn

REQUIRE_ENV = "KDJAX_REQUIRE_ONEDNN"
NHWC = ("NHWC", "HWIO", "NHWC")
FWD, BWD_DATA, BWD_WEIGHTS = (onednn.TARGETS[p][0] for p in ("fwd", "bwd_data", "bwd_weights"))
# rbg keys: compiling a threefry-based model.init is several times slower on CPU.
KEY = jax.random.key(0, impl="rbg")
F32_TOL = 1e-5  # max |error| / max |reference| for one float32 convolution


def library_gate(available: bool, required: str | None, why: str = "") -> tuple[str, str] | None:
    """What a test that needs the library does: ``None`` (run) when it is available, else
    ``('fail' | 'skip', reason)``: fail when ``$KDJAX_REQUIRE_ONEDNN`` is set (not empty, not '0')."""
    if available:
        return None
    missing = f"kdjax's oneDNN convolution is unavailable: {why}"
    if required not in (None, "", "0"):
        return "fail", f"{REQUIRE_ENV}={required} but {missing}"
    return "skip", f"{missing} (set {REQUIRE_ENV}=1 to fail instead of skipping)"


@pytest.fixture(scope="module")
def onednn_library():
    gate = library_gate(onednn.available(), os.environ.get(REQUIRE_ENV),
                        "" if onednn.available() else onednn._library())
    if gate is not None:
        action, reason = gate
        if action == "fail":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


needs_onednn = pytest.mark.usefixtures("onednn_library")


def clear_caches():
    onednn._library.cache_clear()
    onednn._warn_unavailable.cache_clear()


@pytest.fixture
def missing_library(monkeypatch):
    """The build fails (no oneDNN) and ``_library``'s cache is empty; afterwards the real build is
    restored and the caches cleared (the next use loads the cached library again)."""
    def no_onednn(force=False):
        raise build.BuildError("no oneDNN found (test)")
    monkeypatch.setattr(build, "build", no_onednn)
    clear_caches()
    yield
    monkeypatch.undo()
    clear_caches()


# ----------------------------------------------------------------------------- references / helpers

def conv_reference(x, w, strides, padding):
    """float64 ``y [N, OH, OW, O] = sum_{i, j, c} xpad[n, oh*sh + i, ow*sw + j, c] * w[i, j, c, o]``."""
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    kh, kw = w.shape[:2]
    windows = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(1, 2))  # [N, H', W', C, kh, kw]
    windows = windows[:, ::strides[0], ::strides[1]]
    return np.einsum("nhwcij,ijco->nhwo", windows, np.asarray(w, np.float64))


def normalized_error(actual, reference):
    reference = np.asarray(reference, np.float64)
    return float(np.max(np.abs(np.asarray(actual, np.float64) - reference)) / np.max(np.abs(reference)))


def hlo(fn, *args):
    return jax.jit(fn).lower(*args).as_text()


def random_inputs(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(np.float32) for s in shapes]


def flat_padding(padding):
    (top, bottom), (left, right) = padding
    return (top, bottom, left, right)


# ----------------------------------------------------------------------------- the skip / fail gate

@pytest.mark.parametrize("available, required, expected", [
    (True, None, None), (True, "1", None),
    (False, None, "skip"), (False, "", "skip"), (False, "0", "skip"),
    (False, "1", "fail"), (False, "yes", "fail"),
])
def test_library_gate(available, required, expected):
    gate = library_gate(available, required, "no compiler")
    assert (gate if gate is None else gate[0]) == expected
    if gate is not None:
        assert "unavailable: no compiler" in gate[1] and REQUIRE_ENV in gate[1]


# ----------------------------------------------------------------------------- forward and gradients

GEOMETRIES = [  # x [N, H, W, C], w [KH, KW, C, O], strides, ((top, bottom), (left, right))
    pytest.param((2, 8, 8, 4), (3, 3, 4, 5), (1, 1), ((1, 1), (1, 1)), id="3x3_s1_p1"),
    pytest.param((2, 8, 8, 4), (3, 3, 4, 6), (2, 2), ((1, 1), (1, 1)), id="3x3_s2_p1_even"),
    pytest.param((2, 9, 9, 4), (3, 3, 4, 6), (2, 2), ((1, 1), (1, 1)), id="3x3_s2_p1_odd"),
    # Windows stop before the last input row/column: its gradient is exactly 0.
    pytest.param((2, 8, 8, 4), (3, 3, 4, 6), (2, 2), ((0, 0), (0, 0)), id="3x3_s2_p0_last_unused"),
    pytest.param((2, 8, 8, 4), (1, 1, 4, 8), (2, 2), ((0, 0), (0, 0)), id="1x1_s2_p0"),
    pytest.param((2, 16, 16, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3)), id="7x7_s2_p3_stem"),
    pytest.param((2, 8, 8, 4), (3, 3, 4, 5), (2, 1), ((0, 1), (2, 0)), id="asymmetric_pad"),
    pytest.param((3, 8, 8, 3), (3, 3, 3, 4), (1, 1), ((1, 1), (1, 1)), id="c3"),
    pytest.param((2, 8, 12, 4), (3, 5, 4, 5), (1, 2), ((1, 1), (2, 2)), id="non_square"),
    # The batch is split into one chunk per thread of XLA's pool (2 or 8 here): one example (one
    # chunk), and 11 examples (chunks of unequal sizes for any pool of 2-10 threads) with channels
    # wide enough for blocked kernel layouts, whose weight gradients are added up.
    pytest.param((1, 8, 8, 4), (3, 3, 4, 6), (1, 1), ((1, 1), (1, 1)), id="one_example"),
    pytest.param((11, 6, 6, 32), (3, 3, 32, 48), (1, 1), ((1, 1), (1, 1)), id="unequal_chunks_wide"),
]


@needs_onednn
@pytest.mark.parametrize("x_shape, w_shape, strides, padding", GEOMETRIES)
def test_forward_matches_float64_reference(x_shape, w_shape, strides, padding):
    x, w = random_inputs(0, x_shape, w_shape)
    ref = conv_reference(x, w, strides, padding)
    nhwc = jax.jit(onednn.conv_nhwc, static_argnums=(2, 3))(x, w, strides, flat_padding(padding))
    general = onednn.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)
    for y in (nhwc, general):
        assert y.shape == ref.shape and y.dtype == jnp.float32
        assert normalized_error(y, ref) <= F32_TOL
    text = hlo(lambda a, b: onednn.conv_general_dilated(a, b, strides, padding, dimension_numbers=NHWC),
               x, w)
    assert FWD in text and "convolution" not in text


@needs_onednn
@pytest.mark.parametrize("x_shape, w_shape, strides, padding", GEOMETRIES)
def test_gradients_match_float64_xla(x_shape, w_shape, strides, padding):
    x, w = random_inputs(1, x_shape, w_shape)
    ref_y = conv_reference(x, w, strides, padding)
    r = np.random.default_rng(2).normal(size=ref_y.shape)

    def loss(conv, r, x, w):  # non-linear in y: sum(sin(y) * r)
        return jnp.sum(jnp.sin(conv(x, w, strides, padding, dimension_numbers=NHWC)) * r)

    def dnn_loss(a, b):
        return loss(onednn.conv_general_dilated, r.astype(np.float32), a, b)

    def reference(a, b):  # float64 XLA: y and its gradients
        return (lax.conv_general_dilated(a, b, strides, padding, dimension_numbers=NHWC),
                jax.grad(lambda a, b: loss(lax.conv_general_dilated, r, a, b), argnums=(0, 1))(a, b))

    lowered = jax.jit(jax.grad(dnn_loss, argnums=(0, 1))).lower(x, w)
    gx, gw = lowered.compile()(x, w)
    with jax.enable_x64(True):
        y64, (rx, rw) = jax.device_get(jax.jit(reference)(x.astype(np.float64), w.astype(np.float64)))
    assert rx.dtype == y64.dtype == np.float64
    np.testing.assert_allclose(y64, ref_y, rtol=1e-12, atol=1e-12)  # the two references agree
    assert gx.shape == x.shape and gw.shape == w.shape and gx.dtype == gw.dtype == jnp.float32
    assert normalized_error(gx, rx) <= F32_TOL
    assert normalized_error(gw, rw) <= F32_TOL
    np.testing.assert_array_equal(np.asarray(gx)[rx == 0], 0.0)  # untouched inputs: exactly 0
    text = lowered.as_text()
    assert all(t in text for t in (FWD, BWD_DATA, BWD_WEIGHTS)) and "convolution" not in text


@needs_onednn
def test_vmap_runs_each_example():
    xs, w = random_inputs(3, (3, 2, 8, 8, 4), (3, 3, 4, 5))
    ys = jax.vmap(lambda x: onednn.conv_nhwc(x, w, (1, 1), (1, 1, 1, 1)))(xs)
    assert ys.shape == (3, 2, 8, 8, 5)
    for x, y in zip(xs, ys):
        assert normalized_error(y, conv_reference(x, w, (1, 1), ((1, 1), (1, 1)))) <= F32_TOL


# ----------------------------------------------------------------------------- bfloat16

BF16_TOL = 2.0 ** -8  # one bfloat16 rounding of the result (8 significant bits), relative to max |y|


def bf16_inputs(seed, x_shape, w_shape):
    return [jnp.asarray(a, jnp.bfloat16) for a in random_inputs(seed, x_shape, w_shape)]


@needs_onednn
@pytest.mark.parametrize("x_shape, w_shape, strides, padding", GEOMETRIES)
def test_bfloat16_forward_matches_float64_reference(x_shape, w_shape, strides, padding):
    x, w = bf16_inputs(5, x_shape, w_shape)
    fn = lambda a, b: onednn.conv_general_dilated(a, b, strides, padding, dimension_numbers=NHWC)
    y = jax.jit(fn)(x, w)
    assert y.dtype == jnp.bfloat16
    # The reference takes the same bfloat16 inputs exactly; oneDNN accumulates in float32 and
    # rounds the result once.
    assert normalized_error(np.asarray(y, np.float32), conv_reference(
        np.asarray(x, np.float32), np.asarray(w, np.float32), strides, padding)) <= BF16_TOL
    # oneDNN runs it where the CPU has native bfloat16 kernels, XLA elsewhere.
    assert (FWD in hlo(fn, x, w)) == onednn.native_bf16(x_shape, w_shape, strides, padding)


#: oneDNN's instruction sets in order, as ONEDNN_MAX_CPU_ISA names them (a cap, e.g. to mimic an
#: older CPU), and the CPU flags each needs.
ISAS = (("AVX2", "avx2"), ("AVX512_CORE", "avx512f"), ("AVX512_CORE_BF16", "avx512_bf16"),
        ("AVX512_CORE_AMX", "amx_bf16"))


def cpu_has(isa: str) -> bool:
    """Whether oneDNN may use ``isa`` here: the CPU has it, and no ONEDNN_MAX_CPU_ISA caps below it."""
    names = [name for name, _ in ISAS]
    flags = set(pathlib.Path("/proc/cpuinfo").read_text().split())
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).upper()
    capped = cap in names and names.index(cap) < names.index(isa)
    if isa == "AVX512_CORE_BF16":  # AMX CPUs have AVX512-BF16 too
        return not capped and bool(flags & {"avx512_bf16", "amx_bf16"})
    return not capped and dict(ISAS)[isa] in flags


def needs_isa(isa: str, why: str):
    return pytest.mark.skipif(not cpu_has(isa), reason=f"needs {isa} ({why}); this CPU (or "
                              f"ONEDNN_MAX_CPU_ISA) stops below it")


@needs_onednn
def test_bfloat16_runs_on_onednn_where_the_cpu_has_bfloat16_instructions():
    has_bf16 = cpu_has("AVX512_CORE_BF16")  # this project's machines: AVX2, AVX512-BF16 or AMX
    geometry = ((64, 32, 32, 64), (3, 3, 64, 64), (1, 1), ((1, 1), (1, 1)))
    assert onednn.native_bf16(*geometry) == has_bf16, [
        onednn.implementation(p, *geometry, jnp.bfloat16) for p in onednn.TARGETS]


def run_with_isa(isa: str, script: str, lines: bool = False) -> list[str]:
    """Runs ``script`` in a fresh Python with oneDNN capped to instruction set ``isa`` (as on an
    older CPU) and glibc's heap checks on (``MALLOC_CHECK_=3``: a stray write aborts); returns the
    words it printed (``lines=True``: its lines). It must exit cleanly."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=isa, MALLOC_CHECK_="3", JAX_PLATFORMS="cpu")
    env.pop("LD_PRELOAD", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.splitlines() if lines else proc.stdout.split()


@needs_onednn
@pytest.mark.parametrize("isa", [
    pytest.param("AVX2", marks=needs_isa("AVX2", "capping oneDNN to an ISA the CPU has")),
    pytest.param("AVX512_CORE", marks=needs_isa(
        "AVX512_CORE", "oneDNN's emulated bfloat16 kernel runs on AVX-512 CPUs only"))])
def test_bfloat16_without_bfloat16_instructions_falls_back_to_xla(isa):
    """Capped below AVX512-BF16, oneDNN offers an emulated bfloat16 kernel, slower than XLA's
    (AVX-512: Skylake, Ice Lake) or none at all (AVX2): bfloat16 goes to XLA's convolution, float32
    stays on oneDNN; the direct kernel call ``conv_nhwc`` runs the emulated kernel where it exists
    and raises a clear error where none does."""
    script = """
import jax, jax.numpy as jnp
from kdjax.kernels import onednn
g = ((2, 8, 8, 16), (3, 3, 16, 16), (1, 1), ((1, 1), (1, 1)))
print(onednn.implementation("fwd", *g, jnp.bfloat16))
print(onednn.native_bf16(*g))
for dt in (jnp.bfloat16, jnp.float32):
    x, w = jnp.ones(g[0], dt), jnp.ones(g[1], dt)
    f = lambda x, w: onednn.conv_general_dilated(x, w, (1, 1), g[3],
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    print("kdjax_onednn_conv_fwd" in jax.jit(f).lower(x, w).as_text(), float(f(x, w).max()))
x, w = jnp.ones(g[0], jnp.bfloat16), jnp.ones(g[1], jnp.bfloat16)
try:
    print(float(onednn.conv_nhwc(x, w, (1, 1), (1, 1, 1, 1)).max()))
except ValueError as e:
    print("ValueError", "no bfloat16 kernel" in str(e) and "conv_general_dilated" in str(e))
"""
    name, native, bf16, f32, direct = run_with_isa(isa, script, lines=True)
    if isa == "AVX2":
        assert name.startswith("error")
        assert direct == "ValueError True"
    else:
        assert "bf16" not in name.partition(":")[2]  # e.g. jit_bf16:avx512_core (emulated)
        assert direct == "144.0"
    assert native == "False"
    assert (bf16, f32) == ("False 144.0", "True 144.0")  # bf16 on XLA; f32 on oneDNN; 16 * 9


@needs_onednn
@needs_isa("AVX2", "capping oneDNN to an ISA the CPU has")
def test_avx2_kernels_keep_the_heap_intact():
    """On AVX2 (a laptop; here oneDNN capped to it), oneDNN's strided 1x1 kernels write past the
    scratchpad they ask for when channels are padded (4 -> 8): the heap checks must stay quiet and
    the results must be right."""
    script = """
import numpy as np, jax, jax.numpy as jnp
from kdjax.kernels import onednn
dn = ("NHWC", "HWIO", "NHWC")
rng = np.random.default_rng(0)
for n, c, o in ((2, 4, 8), (3, 3, 5), (2, 12, 8)):
    x = jnp.asarray(rng.normal(size=(n, 8, 8, c)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(1, 1, c, o)), jnp.float32)
    print(onednn.implementation("bwd_weights", x.shape, w.shape, (2, 2), ((0, 0), (0, 0))))
    loss = lambda conv: lambda x, w: jnp.sum(jnp.sin(conv(x, w, (2, 2), "VALID", dimension_numbers=dn)))
    for _ in range(20):
        got = jax.jit(jax.grad(loss(onednn.conv_general_dilated), (0, 1)))(x, w)
    want = jax.grad(loss(jax.lax.conv_general_dilated), (0, 1))(x, w)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
print("ok")
"""
    lines = run_with_isa("AVX2", script)
    assert lines[-1] == "ok" and all(name.endswith(":avx2") for name in lines[:-1]), lines


@needs_onednn
def test_the_callers_openmp_threads_are_kept():
    # Building a plan and running a call hold OpenMP to one thread for oneDNN; the caller (here
    # the Python thread, on which XLA runs small programs, and which PyTorch would share) gets its
    # setting back.
    gomp = ctypes.CDLL("libgomp.so.1")
    before = gomp.omp_get_max_threads()
    gomp.omp_set_num_threads(3)
    try:
        onednn.implementation("fwd", (5, 7, 7, 3), (3, 3, 3, 5), (1, 1), ((1, 1), (1, 1)))  # new
        assert gomp.omp_get_max_threads() == 3
        x, w = random_inputs(21, (1, 4, 4, 3), (3, 3, 3, 4))
        jax.block_until_ready(jax.jit(lambda a, b: onednn.conv_nhwc(a, b, (1, 1), (1, 1, 1, 1)))(x, w))
        assert gomp.omp_get_max_threads() == 3
        jax.block_until_ready(sin_loss_grads(x, w))
        assert gomp.omp_get_max_threads() == 3
    finally:
        gomp.omp_set_num_threads(before)


@needs_onednn
@pytest.mark.parametrize("x_shape, w_shape, strides, padding", GEOMETRIES)
def test_bfloat16_gradients_match_float64_reference(x_shape, w_shape, strides, padding):
    x, w = bf16_inputs(6, x_shape, w_shape)
    dy_shape = conv_reference(np.zeros(x_shape), np.zeros(w_shape), strides, padding).shape
    dy = jnp.asarray(random_inputs(7, dy_shape)[0], jnp.bfloat16)

    def loss(conv, x, w, dy):  # <conv(x, w), dy>: its gradients are dx and dw of the convolution
        y = conv(x, w, strides, padding, dimension_numbers=NHWC)
        return jnp.sum(y.astype(jnp.float64 if dy.dtype == jnp.float64 else jnp.float32) * dy)

    fn = jax.grad(lambda a, b: loss(onednn.conv_general_dilated, a, b, dy), (0, 1))
    lowered = jax.jit(fn).lower(x, w)
    gx, gw = lowered.compile()(x, w)
    with jax.enable_x64(True):  # float64 XLA on the same bfloat16 values
        rx, rw = jax.device_get(jax.jit(jax.grad(lambda a, b: loss(
            lax.conv_general_dilated, a, b, jnp.asarray(dy, jnp.float64)), (0, 1)))(
                jnp.asarray(x, jnp.float64), jnp.asarray(w, jnp.float64)))
    assert gx.dtype == gw.dtype == jnp.bfloat16
    assert normalized_error(np.asarray(gx, np.float32), rx) <= BF16_TOL
    assert normalized_error(np.asarray(gw, np.float32), rw) <= BF16_TOL
    # (The loss is linear in y: the forward pass is not needed, and not compiled.)
    text = lowered.as_text()
    if onednn.native_bf16(x_shape, w_shape, strides, padding):
        assert BWD_DATA in text and BWD_WEIGHTS in text and "convolution" not in text
    else:
        assert "kdjax_onednn" not in text


@needs_onednn
def test_mixed_dtypes_are_a_clear_error():
    x, w = random_inputs(8, (2, 8, 8, 4), (3, 3, 4, 6))
    with pytest.raises(Exception, match="operands and result must all be float32 or all bfloat16"):
        jax.block_until_ready(onednn.conv_nhwc(jnp.asarray(x), jnp.asarray(w, jnp.bfloat16),
                                               (1, 1), (1, 1, 1, 1)))


def test_implementation_rejects_other_dtypes():
    with pytest.raises(ValueError, match="dtype must be float32 or bfloat16; got float16"):
        onednn.implementation("fwd", (2, 8, 8, 4), (3, 3, 4, 6), (1, 1), ((1, 1), (1, 1)),
                              jnp.float16)


# ----------------------------------------------------------------------------- which path runs

X, W = random_inputs(4, (2, 8, 8, 4), (3, 3, 4, 6))
FALLBACKS = [  # (lhs, rhs, window_strides, padding, keyword arguments)
    pytest.param(X.astype(jnp.float16), W.astype(jnp.float16), (1, 1), ((1, 1), (1, 1)),
                 {"dimension_numbers": NHWC}, id="float16"),
    pytest.param(X.astype(jnp.bfloat16), W.astype(jnp.bfloat16), (1, 1), ((1, 1), (1, 1)),
                 {"dimension_numbers": NHWC, "preferred_element_type": jnp.float32},
                 id="bfloat16_to_float32"),
    pytest.param(X, W, (1, 1), ((1, 1), (1, 1)), {"dimension_numbers": NHWC, "rhs_dilation": (2, 2)},
                 id="rhs_dilation"),
    pytest.param(X, W, (1, 1), ((1, 1), (1, 1)), {"dimension_numbers": NHWC, "lhs_dilation": (2, 1)},
                 id="lhs_dilation"),
    pytest.param(X, W[:, :, :2], (1, 1), ((1, 1), (1, 1)),
                 {"dimension_numbers": NHWC, "feature_group_count": 2}, id="feature_groups"),
    pytest.param(X, W, (1, 1), ((1, 1), (1, 1)), {"dimension_numbers": NHWC, "batch_group_count": 2},
                 id="batch_groups"),
    pytest.param(X.transpose(0, 3, 1, 2), W.transpose(3, 2, 0, 1), (1, 1), ((1, 1), (1, 1)),
                 {"dimension_numbers": ("NCHW", "OIHW", "NCHW")}, id="nchw"),
    pytest.param(X, W, (1, 1), ((-1, 1), (1, 1)), {"dimension_numbers": NHWC}, id="negative_padding"),
    pytest.param(X[:, 0], W[0], (1,), ((1, 1),), {"dimension_numbers": ("NWC", "WIO", "NWC")}, id="conv1d"),
]


@pytest.mark.parametrize("lhs, rhs, strides, padding, kwargs", FALLBACKS)
def test_unsupported_convolutions_fall_back_to_lax(missing_library, lhs, rhs, strides, padding, kwargs):
    # The library is made unavailable: a fallback must never need it.
    y = onednn.conv_general_dilated(lhs, rhs, strides, padding, **kwargs)
    ref = lax.conv_general_dilated(lhs, rhs, strides, padding, **kwargs)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(ref, np.float32))
    text = hlo(lambda a, b: onednn.conv_general_dilated(a, b, strides, padding, **kwargs), lhs, rhs)
    assert "kdjax_onednn" not in text and "convolution" in text


@needs_onednn
def test_negative_padding_falls_back_to_lax():
    y = onednn.conv_general_dilated(X, W, (1, 1), ((-1, 1), (1, 1)), dimension_numbers=NHWC)
    ref = lax.conv_general_dilated(X, W, (1, 1), ((-1, 1), (1, 1)), dimension_numbers=NHWC)
    np.testing.assert_array_equal(y, ref)
    assert "kdjax_onednn" not in hlo(lambda a, b: onednn.conv_general_dilated(
        a, b, (1, 1), ((-1, 1), (1, 1)), dimension_numbers=NHWC), X, W)


@needs_onednn
@pytest.mark.parametrize("rhs, strides, message", [
    (W[:, :, :3], (1, 1), r"lhs feature dimension size .* must equal the rhs input feature dimension size"),
    (W, (0, 1), r"positive stride"),
], ids=["channel_mismatch", "zero_stride"])
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # lax's own shape rule, stride 0
def test_bad_shapes_raise_lax_errors(rhs, strides, message):
    with pytest.raises(ValueError, match=message):  # what lax.conv_general_dilated raises
        lax.conv_general_dilated(X, rhs, strides, ((1, 1), (1, 1)), dimension_numbers=NHWC)
    with pytest.raises(ValueError, match=message):
        jax.block_until_ready(onednn.conv_general_dilated(X, rhs, strides, ((1, 1), (1, 1)),
                                                          dimension_numbers=NHWC))


@needs_onednn
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
def test_string_padding_runs_on_onednn(padding, strides):
    y = onednn.conv_general_dilated(X, W, strides, padding, dimension_numbers=NHWC)
    ref = lax.conv_general_dilated(X, W, strides, padding, dimension_numbers=NHWC,
                                   precision=lax.Precision.HIGHEST)
    assert y.shape == ref.shape
    assert normalized_error(y, ref) <= F32_TOL
    assert FWD in hlo(lambda a, b: onednn.conv_general_dilated(a, b, strides, padding,
                                                               dimension_numbers=NHWC), X, W)


@needs_onednn
@pytest.mark.parametrize("pass_", list(onednn.TARGETS))
def test_implementation_names_a_onednn_kernel(pass_):
    name = onednn.implementation(pass_, (2, 8, 8, 4), (3, 3, 4, 6), (2, 2), ((1, 1), (1, 1)))
    assert isinstance(name, str) and name and not name.startswith("error")


def test_implementation_rejects_unknown_pass():
    with pytest.raises(ValueError, match=r"pass must be one of \['fwd', 'bwd_data', 'bwd_weights'\]; "
                                         r"got 'bwd'"):
        onednn.implementation("bwd", (2, 8, 8, 4), (3, 3, 4, 6), (1, 1), ((1, 1), (1, 1)))


# ----------------------------------------------------------------------------- models

MODELS = [pytest.param("resnet18", {"stem": "cifar", "width": 8}, id="resnet18_cifar"),
          pytest.param("cifar_resnet20", {}, id="cifar_resnet20"),
          pytest.param("wrn_16_2", {}, id="wrn_16_2")]


def assert_trees_close(a, b, tol):
    """Same structure; every leaf within ``tol`` of ``b`` relative to the leaf's largest entry."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_allclose(x, y, rtol=0, atol=tol * max(float(np.max(np.abs(y))), 1e-6))


@needs_onednn
def test_bfloat16_teacher_on_onednn_matches_xla():
    """A bfloat16 ResNet in inference mode (a teacher): the same logits on oneDNN as on XLA, up to
    bfloat16 rounding, with oneDNN serving the convolutions where the CPU has the kernels."""
    x = np.random.default_rng(9).normal(size=(4, 16, 16, 3)).astype(np.float32)
    kwargs = dict(stem="cifar", width=16, dtype=jnp.bfloat16)
    m_xla = models.create("resnet18", 10, conv="xla", **kwargs)
    m_dnn = models.create("resnet18", 10, conv="onednn", **kwargs)
    v = m_xla.init(KEY, x)

    def logits(model):
        fn = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
        return fn(v, x), fn.lower(v, x).as_text()
    (y_xla, text_xla), (y_dnn, text_dnn) = logits(m_xla), logits(m_dnn)
    assert y_dnn.dtype == y_xla.dtype == jnp.float32
    assert (FWD in text_dnn) == onednn.native_bf16((4, 16, 16, 16), (3, 3, 16, 16), (1, 1), ((1, 1), (1, 1)))
    # 18 layers of bfloat16 rounding, in a different order on each side.
    np.testing.assert_allclose(y_dnn, y_xla, rtol=0, atol=0.01 * float(np.max(np.abs(y_xla))))


@needs_onednn
@pytest.mark.parametrize("name, kwargs", MODELS)
def test_model_on_onednn_matches_xla(name, kwargs):
    """Same init; train-mode logits, features, batch statistics and parameter gradients agree.
    Batch 4: with 2 examples the train-mode BatchNorm at 2x2 / 1x1 spatial sizes amplifies float32
    rounding ~1e3-fold, in XLA's convolution and oneDNN's alike."""
    x = np.random.default_rng(5).normal(size=(4, 8, 8, 3)).astype(np.float32)
    r = np.random.default_rng(6).normal(size=(4, 10)).astype(np.float32)
    m_xla = models.create(name, 10, conv="xla", **kwargs)
    m_dnn = models.create(name, 10, conv="onednn", **kwargs)
    v_xla, v_dnn = m_xla.init(KEY, x), m_dnn.init(KEY, x)
    assert jax.tree.structure(v_dnn) == jax.tree.structure(v_xla)
    jax.tree.map(np.testing.assert_array_equal, v_dnn, v_xla)  # init does not depend on the conv

    def grads(model):
        def loss(params):  # sum(sin(logits) * r); aux: logits, features, new batch_stats
            (logits, features), updates = model.apply({**v_xla, "params": params}, x, train=True,
                                                      mutable=["batch_stats"])
            return jnp.sum(jnp.sin(logits) * r), (logits, features, updates)
        lowered = jax.jit(jax.grad(loss, has_aux=True)).lower(v_xla["params"])
        return lowered.compile()(v_xla["params"]), lowered.as_text()

    (g_xla, out_xla), text_xla = grads(m_xla)
    (g_dnn, out_dnn), text_dnn = grads(m_dnn)
    assert all(t in text_dnn for t in (FWD, BWD_DATA, BWD_WEIGHTS)) and "kdjax_onednn" not in text_xla
    assert_trees_close(out_dnn, out_xla, 1e-4)
    assert_trees_close(g_dnn, g_xla, 1e-4)


@pytest.mark.parametrize("name", ["resnet18", "cifar_resnet20", "wrn_16_2"])
def test_unknown_conv_name_lists_the_choices(name):
    with pytest.raises(ValueError, match=r"conv must be one of \['onednn', 'xla'\] .*"
                                         r"XLA's convolution elsewhere.*got conv='cudnn'\."):
        models.create(name, 10, conv="cudnn")


# ----------------------------------------------------------------------------- train step

def make_batch(seed, n=8):
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(n, 8, 8, 3)).astype(np.float32),
            "label": rng.integers(0, 10, n).astype(np.int32), "mask": np.ones(n, bool)}


TX = optax.sgd(0.1, momentum=0.9)


@pytest.fixture(scope="module")
def initial_state():
    """A CIFAR ResNet-8's initial train state (:class:`kdjax.train.TrainState`; init does not depend
    on the conv), built from an eager ``init``: compiling ``train.init_train_state`` costs seconds."""
    variables = models.create("cifar_resnet8", 10).init(KEY, jnp.zeros((1, 8, 8, 3)))
    return jax.device_get(train.TrainState(
        step=jnp.zeros((), jnp.int32), params=variables["params"], batch_stats=variables["batch_stats"],
        opt_state=TX.init(variables["params"]), rng=jax.random.PRNGKey(0), skipped=jnp.zeros((), jnp.int32)))


def run_steps(state, conv, mesh, steps=2, mode="replicate"):
    """``steps`` SGD-momentum steps of a CIFAR ResNet-8 with ``conv`` on ``mesh`` (state sharded by
    ``mode``, every parameter a candidate) on 8x8 inputs; returns the final state and the compiled
    (per-device) HLO."""
    model = models.create("cifar_resnet8", 10, conv=conv)
    shardings = sharding.tree_shardings(state, mesh, mode, min_size=1)
    step = train.make_train_step(train.linen_student(model), TX, (recipe.ce(),), mesh=mesh,
                                 state_shardings=shardings, donate=False)
    state = jax.device_put(state, shardings)
    compiled = step.lower(state, {}, sharding.global_batch(make_batch(0), mesh)).compile()
    for i in range(steps):
        state, metrics = compiled(state, {}, sharding.global_batch(make_batch(i), mesh))
        assert bool(metrics["finite"])
    return jax.device_get(state), compiled.as_text()


@pytest.fixture(scope="module")
def onednn_single_device(onednn_library, initial_state):
    return run_steps(initial_state, "onednn", sharding.make_mesh(devices=jax.devices()[:1]))


def tree_relative_error(a, b) -> float:
    """``||a - b|| / ||b||`` over all leaves of two trees of one structure, as one vector."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    diff = sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return (diff / sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in jax.tree.leaves(b))) ** 0.5


@needs_onednn
def test_train_step_on_onednn_matches_xla(initial_state, onednn_single_device):
    state, text = onednn_single_device
    ref, ref_text = run_steps(initial_state, "xla", sharding.make_mesh(devices=jax.devices()[:1]))
    assert all(t in text for t in (FWD, BWD_DATA, BWD_WEIGHTS)) and "kdjax_onednn" not in ref_text
    assert int(state.step) == int(ref.step) == 2
    # The whole tree, not leaf by leaf: a ReLU input within rounding of 0 may flip between the two
    # convolutions (oneDNN 3.2's AVX2 kernels on these images; XLA flips it too when the images
    # change by 1e-7 of their size), which moves the layers below it by up to 2% and the tree by
    # 5e-4. A miswired pass moves it by O(1); each convolution's accuracy is tested above, strictly.
    for got, want in ((state.params, ref.params), (state.batch_stats, ref.batch_stats)):
        assert tree_relative_error(got, want) <= 2e-3
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), state.params, initial_state.params)
    assert min(jax.tree.leaves(moved)) > 0  # every parameter was updated


def onednn_calls(text):
    """``(target, first operand's shape)`` of every oneDNN custom call in compiled HLO text."""
    return re.findall(r"custom-call\(.*?custom_call_target=\"(kdjax_onednn_conv_\w+)\", "
                      r"operand_layout_constraints=\{(?:f32|bf16)\[([\d,]+)\]", text)


@needs_onednn
@pytest.mark.parametrize("data,fsdp,mode", [(8, 1, "replicate"), (4, 2, "fsdp")])
def test_sharded_onednn_step_splits_the_batch_and_matches_single_device(
        initial_state, onednn_single_device, data, fsdp, mode):
    """Each device convolves its own examples (8 over 8 devices: one each), the weight gradients
    are summed over the devices, and an FSDP-sharded kernel is gathered: same result as one device."""
    assert jax.device_count() == 8
    state, text = run_steps(initial_state, "onednn", sharding.make_mesh(data, fsdp), mode=mode)
    ref, _ = onednn_single_device
    calls = onednn_calls(text)
    assert {target for target, _ in calls} == {FWD, BWD_DATA, BWD_WEIGHTS}
    assert all(shape.split(",")[0] == "1" for _, shape in calls), calls  # local batch, not 8
    assert text.count(" all-reduce(") >= sum(target == BWD_WEIGHTS for target, _ in calls)
    if fsdp > 1:
        assert " all-gather(" in text
        assert any(s.spec != P() for s in jax.tree.leaves(sharding.tree_shardings(
            initial_state.params, sharding.make_mesh(data, fsdp), mode, min_size=1)))
    assert int(state.step) == 2
    assert_trees_close(state.params, ref.params, 2e-5)
    assert_trees_close(state.batch_stats, ref.batch_stats, 2e-5)
    assert_trees_close(state.opt_state, ref.opt_state, 2e-5)


@needs_onednn
@needs_isa("AVX512_CORE_BF16", "it calls oneDNN's bfloat16 kernel directly, which needs "
           "AVX512-BF16 or AMX")
def test_sharded_bfloat16_weight_gradient_adds_the_devices_in_float32():
    """bfloat16 on a data-parallel mesh: each device's weight gradient is rounded once, the devices'
    are added in float32 and rounded once more; against a float64 reference."""
    x, dy = bf16_inputs(7, (16, 8, 8, 16), (16, 8, 8, 32))
    grad = jax.jit(lambda a, b: onednn._call("bwd_weights", (3, 3, 16, 32), a, b, (1, 1),
                                             (1, 1, 1, 1)))
    split = sharding.batch_sharding(sharding.make_mesh(data=8))
    x, dy = jax.device_put(x, split), jax.device_put(dy, split)
    text = grad.lower(x, dy).compile().as_text()
    assert onednn_calls(text) == [(BWD_WEIGHTS, "2,8,8,16")]
    assert re.search(r"f32\[3,3,16,32\]\S* all-reduce\(", text), text
    got = grad(x, dy)
    with jax.enable_x64(True):
        _, vjp = jax.vjp(lambda w: lax.conv_general_dilated(
            np.asarray(x, np.float64), w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC),
            np.zeros((3, 3, 16, 32)))
        want, = vjp(np.asarray(dy, np.float64))
    assert got.dtype == jnp.bfloat16 and got.sharding.is_fully_replicated
    assert normalized_error(np.asarray(got, np.float32), want) <= 2 * BF16_TOL


def sin_loss_grads(x, w):
    """Gradients of ``sum(sin(conv(x, w)))`` (3x3, stride 1, padding 1) on oneDNN."""
    return jax.grad(lambda a, b: jnp.sum(jnp.sin(onednn.conv_nhwc(a, b, (1, 1), (1, 1, 1, 1)))),
                    argnums=(0, 1))(x, w)


def sin_loss_grads_f64(x, w):
    with jax.enable_x64(True):
        return jax.device_get(jax.grad(lambda a, b: jnp.sum(jnp.sin(lax.conv_general_dilated(
            a, b, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC))), argnums=(0, 1))(
            np.asarray(x, np.float64), np.asarray(w, np.float64)))


@needs_onednn
def test_inside_shard_map_with_its_type_checks():
    """Under shard_map with check_vma (its default) the convolution is typed as lax's: gradients
    equal float64's (the replicated kernel's summed over the devices by JAX itself), and a
    per-device result cannot pass as replicated (it used to return device 0's part silently)."""
    x, w = random_inputs(12, (8, 8, 8, 4), (3, 3, 4, 6))
    mesh = sharding.make_mesh(data=8)
    fn = jax.jit(jax.shard_map(sin_loss_grads, mesh=mesh, in_specs=(P("data"), P()),
                               out_specs=(P("data"), P())))
    for got, want in zip(fn(x, w), sin_loss_grads_f64(x, w)):
        assert normalized_error(got, want) <= F32_TOL
    total = jax.shard_map(lambda a, b: jnp.sum(onednn.conv_nhwc(a, b, (1, 1), (1, 1, 1, 1))),
                          mesh=mesh, in_specs=(P("data"), P()), out_specs=P())
    with pytest.raises(ValueError, match="out_specs which require replication"):
        jax.jit(total)(x, w)


def test_no_channels_go_to_lax():
    """A convolution with no input or output channels is lax's (an empty or zero result), not a
    oneDNN descriptor error."""
    x = jnp.ones((2, 6, 6, 3))
    for lhs, rhs in ((x, jnp.ones((3, 3, 3, 0))), (x[..., :0], jnp.ones((3, 3, 0, 4)))):
        got = onednn.conv_general_dilated(lhs, rhs, (1, 1), "SAME", dimension_numbers=NHWC)
        want = lax.conv_general_dilated(lhs, rhs, (1, 1), "SAME", dimension_numbers=NHWC)
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)


@needs_onednn
def test_batch_that_does_not_split_evenly_runs_whole():
    """12 rows of a batch sharded 8 ways: Shardy would pad the parts with rows that add into the
    weight gradient, so the passes run on the whole batch; the gradients stay exact."""
    x, w = random_inputs(11, (16, 8, 8, 4), (3, 3, 4, 6))
    grads = jax.jit(lambda a, b: sin_loss_grads(a[:12], b))
    xs = jax.device_put(x, sharding.batch_sharding(sharding.make_mesh(data=8)))
    calls = onednn_calls(grads.lower(xs, w).compile().as_text())
    assert calls and all(shape.startswith("12,") for _, shape in calls), calls
    for got, want in zip(grads(xs, w), sin_loss_grads_f64(x[:12], w)):
        assert normalized_error(got, want) <= F32_TOL


@needs_onednn
def test_inside_a_partially_manual_shard_map():
    """Under shard_map over 'data' of a data x fsdp mesh (fsdp left to XLA) the passes see
    shardings without mesh axes names and run whole on each 'data' shard; correct gradients."""
    x, w = random_inputs(12, (8, 8, 8, 4), (3, 3, 4, 6))
    mesh = sharding.make_mesh(data=4, fsdp=2)

    def body(a, b):
        gx, gw = sin_loss_grads(a, b)
        return gx, lax.psum(gw, "data")
    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("data"), P()),
                               out_specs=(P("data"), P()), axis_names={"data"}, check_vma=False))
    for got, want in zip(fn(x, w), sin_loss_grads_f64(x, w)):
        assert normalized_error(got, want) <= F32_TOL


# Run by two processes (2 CPU devices each): the gradients of sum(sin(conv(x, w))) for a batch of
# 8 split over the 4 devices of both; each process saves its rows of dx, and dw.
TWO_PROCESS_WORKER = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from kdjax import sharding
from kdjax.kernels import onednn
port, pid, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           initialization_timeout=60)
rng = np.random.default_rng(0)
x = rng.normal(size=(8, 8, 8, 4)).astype(np.float32)
w = rng.normal(size=(3, 3, 4, 6)).astype(np.float32)
mesh = sharding.make_mesh()
xs = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), x[4 * pid:4 * pid + 4])
ws = jax.device_put(w, NamedSharding(mesh, P()))
grad = jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.sin(onednn.conv_nhwc(a, b, (1, 1), (1, 1, 1, 1)))),
                        argnums=(0, 1)))
text = grad.lower(xs, ws).compile().as_text()
gx, gw = grad(xs, ws)
rows = np.concatenate([np.asarray(s.data) for s in sorted(gx.addressable_shards,
                                                          key=lambda s: s.index[0].start)])
np.savez(out, dx=rows, dw=np.asarray(gw.addressable_data(0)), hlo=np.array(text))
jax.distributed.shutdown()
"""


@needs_onednn
def test_two_processes_split_the_batch_and_add_the_weight_gradients(tmp_path):
    """jax.distributed over two local processes (gloo, loopback): each device convolves its own 2
    examples and the weight gradient is summed across the processes; both equal float64 XLA."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    local_processes.run(lambda i, port: [sys.executable, "-c", TWO_PROCESS_WORKER, str(port), str(i),
                                         str(tmp_path / f"p{i}.npz")], env=env)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 8, 8, 4))
    w = rng.normal(size=(3, 3, 4, 6))
    rx, rw = sin_loss_grads_f64(x, w)
    for i in range(2):
        with np.load(tmp_path / f"p{i}.npz") as got:
            assert normalized_error(got["dx"], rx[4 * i:4 * i + 4]) <= F32_TOL
            assert normalized_error(got["dw"], rw) <= F32_TOL
            calls = onednn_calls(str(got["hlo"]))
            assert sorted(target for target, _ in calls) == sorted((FWD, BWD_DATA, BWD_WEIGHTS))
            assert all(shape.startswith("2,") for _, shape in calls), calls
            assert " all-reduce(" in str(got["hlo"])


# ----------------------------------------------------------------------------- concurrency

@needs_onednn
def test_concurrent_convolutions_of_one_geometry():
    """Two independent convs of the same geometry in one jit (XLA may run them at once), called
    from several Python threads: each result equals the conv run alone."""
    def value_and_grads(x, w):
        y = onednn.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)
        return y, jax.grad(lambda a, b: jnp.sum(jnp.sin(onednn.conv_general_dilated(
            a, b, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC))), argnums=(0, 1))(x, w)

    alone = jax.jit(value_and_grads)
    pair = jax.jit(lambda x1, w1, x2, w2: (value_and_grads(x1, w1), value_and_grads(x2, w2)))
    inputs = [random_inputs(10 + i, (4, 16, 16, 8), (3, 3, 8, 16), (4, 16, 16, 8), (3, 3, 8, 16))
              for i in range(24)]
    assert len(re.findall(FWD, hlo(pair, *inputs[0]))) >= 2
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda args: jax.device_get(pair(*args)), inputs))
    for (x1, w1, x2, w2), (r1, r2) in zip(inputs, results):
        for got, want in ((r1, alone(x1, w1)), (r2, alone(x2, w2))):
            for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                assert normalized_error(g, e) <= 1e-6


# ----------------------------------------------------------------------------- errors and the build

def test_without_the_library_a_supported_conv_runs_on_xla_and_warns_once(missing_library):
    message = r"kdjax's oneDNN convolution is unavailable: no oneDNN found \(test\)"
    assert not onednn.available()
    with pytest.raises(RuntimeError, match=message):
        onednn.require()
    with pytest.raises(RuntimeError, match=message):
        onednn.implementation("fwd", X.shape, W.shape, (1, 1), ((1, 1), (1, 1)))
    with pytest.warns(RuntimeWarning, match="conv='onednn' runs on XLA's convolution.*" + message):
        y = onednn.conv_general_dilated(X, W, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)
    np.testing.assert_array_equal(y, lax.conv_general_dilated(X, W, (1, 1), ((1, 1), (1, 1)),
                                                              dimension_numbers=NHWC))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second use is silent
        onednn.conv_general_dilated(X, W, (2, 2), ((1, 1), (1, 1)), dimension_numbers=NHWC)


@needs_onednn
def test_library_reloads_after_its_cache_is_cleared():
    onednn._library.cache_clear()
    assert onednn.available()  # loads again and registers the same FFI targets a second time
    x, w = random_inputs(7, (2, 10, 6, 5), (3, 3, 5, 7))  # a geometry no other test compiles
    y = onednn.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)
    assert normalized_error(y, conv_reference(x, w, (1, 1), ((1, 1), (1, 1)))) <= F32_TOL


def _adjacent(cmd, first, second):
    return any(cmd[i:i + 2] == [first, second] for i in range(len(cmd) - 1))


def test_compile_command(monkeypatch, tmp_path):
    out = tmp_path / "lib.so"
    monkeypatch.delenv("CXX", raising=False)
    system = build.OneDnn(None, None, "2.6.3", "system")
    cmd = build.compile_command(out, system)
    assert cmd[0] == "g++" and cmd[-1] == "-ldnnl"
    assert {"-shared", "-fPIC", "-std=c++17", "-fopenmp", str(build.SOURCE)} <= set(cmd)
    assert _adjacent(cmd, "-isystem", jax.ffi.include_dir()) and _adjacent(cmd, "-o", str(out))
    assert not any("rpath" in c for c in cmd) and cmd.count("-isystem") == 1

    monkeypatch.setenv("CXX", "clang++")
    wheel = build.OneDnn(pathlib.Path("/venv/include"), pathlib.Path("/venv/lib"), "3.2.0", "PyPI")
    cmd = build.compile_command(out, wheel)
    assert cmd[0] == "clang++" and cmd[-1] == "-ldnnl"
    assert _adjacent(cmd, "-isystem", "/venv/include")
    assert _adjacent(cmd, "-isystem", jax.ffi.include_dir())
    assert {"-L/venv/lib", "-Wl,-rpath,/venv/lib"} <= set(cmd)
    # /usr/include is the compiler's own: naming it breaks libstdc++'s #include_next.
    usr = build.OneDnn(pathlib.Path("/usr/include"), pathlib.Path("/usr/lib"), "2.6.3", "DNNL_ROOT=/usr")
    assert "/usr/include" not in build.compile_command(out, usr)


def test_find_onednn_honours_dnnl_root_then_the_wheel(monkeypatch, tmp_path):
    header = tmp_path / "include" / "oneapi" / "dnnl" / "dnnl_version.h"
    header.parent.mkdir(parents=True)
    header.write_text("#define DNNL_VERSION_MAJOR 3\n#define DNNL_VERSION_MINOR 9\n#define DNNL_VERSION_PATCH 1\n")
    monkeypatch.setenv("DNNL_ROOT", str(tmp_path))
    assert build.find_onednn() == build.OneDnn(tmp_path / "include", tmp_path / "lib", "3.9.1",
                                               f"DNNL_ROOT={tmp_path}")
    monkeypatch.setenv("DNNL_ROOT", str(tmp_path / "nothing"))
    with pytest.raises(build.BuildError, match=r"no oneDNN headers in .*nothing.*cpu extra.*DNNL_ROOT"):
        build.find_onednn()


def test_the_cache_key_follows_source_jaxlib_onednn_and_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("KDJAX_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    a = build.OneDnn(None, None, "2.6.3", "system")
    base = build.library_path(a)
    assert base.parent == tmp_path and base.name.startswith("onednn_conv-jaxlib")
    assert build.library_path(a) == base
    assert build.library_path(build.OneDnn(pathlib.Path("/x/include"), pathlib.Path("/x/lib"), "3.2.0",
                                           "PyPI")) != base
    monkeypatch.setenv("CXX", "clang++")
    assert build.library_path(a) != base
    monkeypatch.delenv("CXX")
    source = tmp_path / "onednn_conv.cc"
    source.write_text(build.SOURCE.read_text() + "// changed\n")
    monkeypatch.setattr(build, "SOURCE", source)
    assert build.library_path(a) != base
    import jaxlib
    monkeypatch.setattr(jaxlib, "__version__", "9.9.9")
    assert "jaxlib9.9.9" in build.library_path(a).name


FAKE_COMPILER = """#!/bin/sh
# Records each run, waits (a slow compile), then writes its -o file like a compiler.
echo run >> "$FAKE_CXX_LOG"
sleep 1
while [ "$#" -gt 0 ]; do [ "$1" = "-o" ] && printf built > "$2"; shift; done
"""


@pytest.fixture
def fake_compiler(monkeypatch, tmp_path):
    """$CXX is a script that logs its runs to the returned file; the cache is in tmp_path."""
    cxx = tmp_path / "fake-g++"
    cxx.write_text(FAKE_COMPILER)
    cxx.chmod(0o755)
    log = tmp_path / "runs.log"
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv("FAKE_CXX_LOG", str(log))
    monkeypatch.setenv("KDJAX_CACHE_DIR", str(tmp_path / "cache"))
    fake_onednn(monkeypatch, tmp_path)
    return log


def fake_onednn(monkeypatch, tmp_path):
    """DNNL_ROOT is a fake oneDNN prefix holding only its version header (the fake or failing
    compilers read nothing; child processes see it too; no system oneDNN needed)."""
    header = tmp_path / "onednn" / "include" / "oneapi" / "dnnl" / "dnnl_version.h"
    header.parent.mkdir(parents=True)
    header.write_text("#define DNNL_VERSION_MAJOR 0\n#define DNNL_VERSION_MINOR 0\n"
                      "#define DNNL_VERSION_PATCH 0\n")
    monkeypatch.setenv("DNNL_ROOT", str(tmp_path / "onednn"))


def runs(log):
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_build_compiles_once_then_uses_the_cache(fake_compiler, capsys):
    out = build.build()
    assert out.read_text() == "built" and runs(fake_compiler) == 1
    assert "kdjax: compiling the oneDNN convolution" in capsys.readouterr().err
    assert build.build() == out and runs(fake_compiler) == 1
    assert capsys.readouterr().err == ""
    assert build.build(force=True) == out and runs(fake_compiler) == 2
    assert not list(out.parent.glob("*.tmp*"))


def test_parallel_builds_compile_once(fake_compiler):
    """Four processes ask for the library at once (as pytest-xdist workers do): the lock lets one
    compile and the others load its result."""
    script = "from kdjax.kernels import build; print(build.build())"
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    paths = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(paths) == 1 and runs(fake_compiler) == 1
    assert pathlib.Path(paths.pop()).read_text() == "built"


def test_failed_build_raises_and_leaves_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("KDJAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    fake_onednn(monkeypatch, tmp_path)
    with pytest.raises(build.BuildError, match=r"(?s)building kdjax's oneDNN convolution failed:\n  false .*"
                                               r"-ldnnl\n.*cpu extra"):
        build.build()
    assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob("*.tmp*"))
    assert build.main(["--force"]) == 1
    assert "building kdjax's oneDNN convolution failed" in capsys.readouterr().err


@pytest.mark.parametrize("env, message", [
    ({"CXX": "g++-missing"}, r"no C\+\+ compiler: 'g\+\+-missing' \(from \$CXX, default g\+\+\) is not on PATH"),
    ({"KDJAX_CACHE_DIR": "/proc/kdjax-cache"}, r"cannot write kdjax's kernel cache /proc/kdjax-cache .*KDJAX_CACHE_DIR"),
])
def test_a_missing_compiler_or_cache_is_one_clear_error(monkeypatch, tmp_path, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    fake_onednn(monkeypatch, tmp_path)
    with pytest.raises(build.BuildError, match=message):
        build.build()


PYPI_BUILD = """
import os, sys
import numpy as np
from jax import lax
from kdjax.kernels import build, onednn
dnnl = build.find_onednn()
assert dnnl.origin.startswith("PyPI"), dnnl
x = np.random.default_rng(0).normal(size=(4, 9, 9, 3)).astype(np.float32)
w = np.random.default_rng(1).normal(size=(3, 3, 3, 5)).astype(np.float32)
y = onednn.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
ref = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
print(float(np.abs(y - ref).max() / np.abs(ref).max()))
print(onednn.version(), dnnl.version)
print(os.listdir(os.environ["KDJAX_CACHE_DIR"]))
print([line.split()[-1] for line in open("/proc/self/maps") if "libdnnl.so" in line][0])
"""


def test_the_kernel_builds_from_the_pypi_onednn_alone(tmp_path):
    """A fresh cache, no DNNL_ROOT: the kernel compiles against the cpu extra's wheels and runs on
    the library they installed (not a system oneDNN), with the same result as XLA."""
    if build._wheel_file(build.WHEELS[0], "/libdnnl.so") is None:
        gate = library_gate(False, os.environ.get(REQUIRE_ENV), "the cpu extra's oneDNN wheels "
                            f"({', '.join(build.WHEELS)}) are not installed")
        (pytest.fail if gate[0] == "fail" else pytest.skip)(gate[1])
    env = {k: v for k, v in os.environ.items() if k != "DNNL_ROOT"}
    env.update(KDJAX_CACHE_DIR=str(tmp_path), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", PYPI_BUILD], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    error, versions, files, loaded = proc.stdout.strip().splitlines()
    assert float(error) <= F32_TOL
    runtime, header = versions.split()
    assert runtime == header and int(runtime.split(".")[0]) >= 3
    assert any(f.endswith(".so") and f"onednn{header}" in f for f in eval(files))
    assert pathlib.Path(loaded).resolve().is_relative_to(pathlib.Path(sys.prefix).resolve()), loaded
    assert "kdjax: compiling the oneDNN convolution" in proc.stderr
