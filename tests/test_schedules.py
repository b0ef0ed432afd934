"""Tests for kdjax.schedules: values against plain-Python references, jit/vmap safety, errors."""
import math
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdjax import losses, schedules

SETTINGS = settings(max_examples=25, deadline=None)

values = st.floats(-10.0, 10.0, allow_nan=False, width=32)
steps = st.integers(0, 10_000)


@st.composite
def step_ranges(draw):
    begin = draw(st.integers(0, 5_000))
    end = draw(st.integers(begin + 1, begin + 5_000))
    return begin, end


def ref_linear(step, init, end, begin, stop):
    frac = min(max((step - begin) / (stop - begin), 0.0), 1.0)
    return init + (end - init) * frac


def ref_cosine(step, init, end, begin, stop):
    frac = min(max((step - begin) / (stop - begin), 0.0), 1.0)
    return end + (init - end) * 0.5 * (1.0 + math.cos(math.pi * frac))


def check_scalar_f32(out):
    assert out.dtype == jnp.float32
    assert out.shape == ()


@SETTINGS
@given(value=values, step=steps)
def test_constant(value, step):
    out = schedules.constant(value)(step)
    check_scalar_f32(out)
    np.testing.assert_allclose(float(out), value, rtol=1e-6, atol=1e-30)


@SETTINGS
@given(init=values, end=values, step_range=step_ranges(), step=steps)
def test_linear_matches_reference(init, end, step_range, step):
    begin, stop = step_range
    out = schedules.linear(init, end, begin, stop)(step)
    check_scalar_f32(out)
    np.testing.assert_allclose(float(out), ref_linear(step, init, end, begin, stop), rtol=1e-5, atol=1e-5)


@SETTINGS
@given(init=values, end=values, step_range=step_ranges(), step=steps)
def test_cosine_matches_reference(init, end, step_range, step):
    begin, stop = step_range
    out = schedules.cosine(init, end, begin, stop)(step)
    check_scalar_f32(out)
    np.testing.assert_allclose(float(out), ref_cosine(step, init, end, begin, stop), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.uint16, jnp.uint32])
def test_unsigned_steps_give_the_signed_steps_values(dtype):
    """``step - begin_step`` on an unsigned step used to wrap around before begin_step."""
    for make in (schedules.linear, schedules.cosine):
        schedule = make(1.0, 3.0, 5, 15)
        for step in (0, 4, 5, 10, 15, 20):
            assert float(schedule(jnp.asarray(step, dtype))) == float(schedule(jnp.int32(step)))
    assert float(schedules.linear(1.0, 3.0, 5, 15)(jnp.uint32(0))) == 1.0


@pytest.mark.parametrize("make", [schedules.linear, schedules.cosine])
def test_range_schedules_hit_endpoints_exactly(make):
    schedule = make(0.3, 0.7, 100, 200)
    assert float(schedule(0)) == np.float32(0.3)
    assert float(schedule(100)) == np.float32(0.3)
    assert float(schedule(200)) == np.float32(0.7)
    assert float(schedule(10**9)) == np.float32(0.7)
    # Monotone between the endpoints.
    ramp = np.asarray(schedule(jnp.arange(90, 211)))
    assert np.all(np.diff(ramp) >= 0)


@SETTINGS
@given(
    boundaries=st.lists(st.integers(0, 1_000), min_size=0, max_size=4, unique=True).map(sorted),
    data=st.data(),
    step=st.integers(0, 1_200),
)
def test_piecewise_constant_matches_reference(boundaries, data, step):
    vals = data.draw(st.lists(values, min_size=len(boundaries) + 1, max_size=len(boundaries) + 1))
    out = schedules.piecewise_constant(boundaries, vals)(step)
    check_scalar_f32(out)
    expected = vals[sum(step >= b for b in boundaries)]
    np.testing.assert_allclose(float(out), expected, rtol=1e-6, atol=1e-30)


@SETTINGS
@given(weight=st.floats(0.0, 10.0, width=32), stop=st.integers(0, 1_000), step=st.integers(0, 2_000))
def test_eskd_switches_kd_off_at_stop_step(weight, stop, step):
    out = schedules.eskd(weight, stop)(step)
    check_scalar_f32(out)
    np.testing.assert_allclose(float(out), weight if step < stop else 0.0, rtol=1e-6, atol=1e-30)


def test_eskd_with_hinton_kd_leaves_cross_entropy_after_stop():
    rng = np.random.default_rng(0)
    s = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 6, size=4))
    alpha = schedules.eskd(0.9, stop_step=50)

    @jax.jit
    def loss(step):
        return losses.hinton_kd(s, t, y, temperature=4.0, alpha=alpha(step))

    np.testing.assert_allclose(
        loss(jnp.int32(49)), 0.9 * losses.kd_kl(s, t, 4.0) + 0.1 * losses.cross_entropy(s, y), rtol=1e-5
    )
    np.testing.assert_allclose(loss(jnp.int32(50)), losses.cross_entropy(s, y), rtol=1e-5)
    np.testing.assert_allclose(loss(jnp.int32(5000)), losses.cross_entropy(s, y), rtol=1e-5)


ALL = {
    "constant": schedules.constant(1.5),
    "linear": schedules.linear(0.0, 1.0, 10, 30),
    "cosine": schedules.cosine(8.0, 1.0, 5, 25),
    "piecewise": schedules.piecewise_constant([10, 20], [4.0, 2.0, 1.0]),
    "eskd": schedules.eskd(0.7, 15),
}


@pytest.mark.parametrize("name", sorted(ALL))
def test_jit_with_traced_step_matches_eager(name):
    schedule = ALL[name]
    jitted = jax.jit(schedule)
    for step in [0, 9, 10, 14, 15, 16, 24, 25, 30, 1000]:
        out = jitted(jnp.int32(step))
        check_scalar_f32(out)
        np.testing.assert_allclose(float(out), float(schedule(step)), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(ALL))
def test_vmap_and_array_steps_give_one_value_per_step(name):
    schedule = ALL[name]
    step_array = jnp.arange(0, 40, dtype=jnp.int32)
    expected = np.array([float(schedule(int(i))) for i in step_array], np.float32)
    batched = jax.vmap(schedule)(step_array)
    assert batched.dtype == jnp.float32 and batched.shape == (40,)
    np.testing.assert_allclose(batched, expected, rtol=1e-6)
    np.testing.assert_allclose(schedule(step_array), expected, rtol=1e-6)


def test_large_int_steps_keep_integer_boundaries_exact():
    big = 2**30
    schedule = schedules.eskd(1.0, big)
    assert float(schedule(jnp.int32(big - 1))) == 1.0
    assert float(schedule(jnp.int32(big))) == 0.0
    pw = schedules.piecewise_constant([big], [1.0, 2.0])
    assert float(pw(jnp.int32(big - 1))) == 1.0 and float(pw(jnp.int32(big))) == 2.0


def test_schedules_pickle_and_repr_show_their_arguments():
    schedule = schedules.cosine(1.0, 0.0, 0, 100)
    restored = pickle.loads(pickle.dumps(schedule))
    assert float(restored(50)) == float(schedule(50))
    assert "init_value=1.0" in repr(schedule) and "end_step=100" in repr(schedule)
    assert "stop_step=7" in repr(schedules.eskd(0.5, 7))


def test_as_schedule_accepts_numbers_and_schedules():
    as_const = schedules.as_schedule(0.25)
    check_scalar_f32(as_const(jnp.int32(3)))
    assert float(as_const(123)) == 0.25
    assert float(schedules.as_schedule(np.float32(2.0))(0)) == 2.0
    assert float(schedules.as_schedule(3)(0)) == 3.0
    linear = schedules.linear(0.0, 1.0, 0, 10)
    assert schedules.as_schedule(linear) is linear

    def custom(step):
        return jnp.float32(step) * 0.5

    assert schedules.as_schedule(custom) is custom


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: schedules.as_schedule("0.5"), TypeError, "expected a number or a schedule"),
        (lambda: schedules.as_schedule([0.1, 0.2]), TypeError, "expected a number or a schedule"),
        (lambda: schedules.as_schedule(True), TypeError, "expected a number or a schedule"),
        (lambda: schedules.constant(float("nan")), ValueError, "value must be finite"),
        (lambda: schedules.constant("a"), TypeError, "value must be a real number"),
        (lambda: schedules.linear(1.0, 0.0, 10, 10), ValueError, "end_step > begin_step.*piecewise_constant"),
        (lambda: schedules.cosine(1.0, 0.0, 20, 10), ValueError, "end_step > begin_step"),
        (lambda: schedules.linear(1.0, 0.0, -1, 10), ValueError, "begin_step must be >= 0"),
        (lambda: schedules.linear(1.0, 0.0, 0, 10.5), TypeError, "end_step must be a Python int"),
        (lambda: schedules.linear(1.0, float("inf"), 0, 10), ValueError, "end_value must be finite"),
        (lambda: schedules.piecewise_constant([10], [1.0]), ValueError, "len\\(values\\) == len\\(boundaries\\) \\+ 1"),
        (lambda: schedules.piecewise_constant([10, 10], [1.0, 2.0, 3.0]), ValueError, "strictly increase"),
        (lambda: schedules.piecewise_constant([10, 5], [1.0, 2.0, 3.0]), ValueError, "strictly increase"),
        (lambda: schedules.piecewise_constant([10], [1.0, None]), TypeError, r"values\[1\] must be a real number"),
        (lambda: schedules.eskd(1.0, -5), ValueError, "stop_step must be >= 0"),
        (lambda: schedules.eskd(1.0, True), TypeError, "stop_step must be a Python int"),
        (lambda: schedules.eskd([1.0], 5), TypeError, "weight must be a real number"),
    ],
)
def test_bad_arguments_raise_clear_errors(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_building_from_a_traced_value_is_refused():
    @jax.jit
    def build(value):
        return schedules.constant(value)(0)

    with pytest.raises(TypeError, match="concrete number when the schedule is built"):
        build(jnp.float32(1.0))


def test_non_numeric_step_is_refused():
    with pytest.raises(TypeError, match="step must be an integer step count"):
        schedules.linear(0.0, 1.0, 0, 10)(jnp.array(True))


def test_import_pulls_in_only_jax_and_numpy():
    code = (
        "import sys, kdjax.schedules, kdjax.losses; "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('flax', 'optax', 'tensorflow', 'tensorflow_datasets', 'grain', 'orbax', 'chex', 'scipy')); "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
