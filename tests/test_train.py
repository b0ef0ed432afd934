"""The sharded distillation step: sharded == single device, a frozen teacher, live == precomputed."""

import functools
import os
import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import losses, models, recipe, sharding, teachers, train

NUM_CLASSES = 10


class TinyNet(nn.Module):
    """Conv-BN-ReLU, strided conv, dense; taps 'stage1'/'stage2' (+ a 1x1 regressor of stage1)."""
    width: int = 8
    hint_channels: int = 0

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(
            nn.Conv(self.width, (3, 3), use_bias=False)(x)))
        feats = {"stage1": x}
        if self.hint_channels:
            feats["stage1_regressed"] = nn.Conv(self.hint_channels, (1, 1))(x)
        x = nn.relu(nn.Conv(2 * self.width, (3, 3), strides=2)(x))
        feats["stage2"] = x
        return nn.Dense(NUM_CLASSES)(x.mean((1, 2))), feats


def make_batch(seed, n=16):
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(n, 8, 8, 3)).astype(np.float32),
            "label": rng.integers(0, NUM_CLASSES, n).astype(np.int32),
            "mask": np.ones(n, bool)}


def teacher_setup(mesh, mode="replicate"):
    module = TinyNet(width=16)
    variables = module.init(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 3)))
    # Non-trivial running statistics, so inference mode differs from train mode.
    variables = jax.tree.map(lambda x: x + 0.1, variables)
    variables, shardings = train.put_teacher(variables, mesh, mode)
    return teachers.from_linen(module), variables, shardings


RECIPE = (recipe.ce(weight=0.5), recipe.kd(temperature=4.0, weight=0.5),
          recipe.hint("stage1_regressed", "stage1", weight=0.1))


def take_steps(step, state, t_vars, mesh, steps=3):
    """``steps`` steps on batches 0, 1, ...; returns the final state and each step's metrics."""
    history = []
    for i in range(steps):
        state, metrics = step(state, t_vars, sharding.global_batch(make_batch(i), mesh))
        history.append(jax.device_get(metrics))
    return state, history


def run(mesh, mode="replicate", steps=3, teacher_mode="replicate", guard=True):
    student = TinyNet(width=8, hint_channels=16)
    tx = optax.adam(1e-2)
    state, st_sh = train.init_train_state(student, tx, jnp.zeros((1, 8, 8, 3)), seed=0,
                                          mesh=mesh, mode=mode)
    teacher, t_vars, t_sh = teacher_setup(mesh, teacher_mode)
    step = train.make_train_step(train.linen_student(student), tx, RECIPE, teacher, mesh=mesh,
                                 state_shardings=st_sh, teacher_shardings=t_sh,
                                 guard_nonfinite=guard)
    state, history = take_steps(step, state, t_vars, mesh, steps)
    return jax.device_get(state), history, t_vars


def assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


@pytest.fixture(scope="module")
def single_device_run():
    return run(sharding.make_mesh(devices=jax.devices()[:1]))


@pytest.mark.parametrize("data,fsdp,mode", [(8, 1, "replicate"), (4, 2, "fsdp"), (1, 8, "fsdp")])
def test_sharded_step_equals_single_device(single_device_run, data, fsdp, mode):
    assert jax.device_count() == 8
    mesh = sharding.make_mesh(data=data, fsdp=fsdp)
    state, history, _ = run(mesh, mode=mode, teacher_mode=mode)
    ref_state, ref_history, _ = single_device_run
    assert int(state.step) == 3
    assert_trees_close(state.params, ref_state.params)
    assert_trees_close(state.batch_stats, ref_state.batch_stats)
    assert_trees_close(state.opt_state, ref_state.opt_state)
    for m, r in zip(history, ref_history):
        assert_trees_close(m, r, rtol=1e-4, atol=1e-5)


def test_fsdp_actually_shards_large_leaves():
    mesh = sharding.make_mesh(data=1, fsdp=8)
    spec = sharding.leaf_spec((3, 3, 64, 128), mesh, "fsdp")
    assert spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    assert sharding.leaf_spec((128,), mesh, "fsdp") == jax.sharding.PartitionSpec()
    assert sharding.leaf_spec((3, 3, 64, 128), mesh, "replicate") == jax.sharding.PartitionSpec()


def test_loss_decreases_and_metrics_present(single_device_run):
    _, history, _ = single_device_run
    m = history[0]
    for key in ("loss/ce", "loss/kd", "loss/hint/stage1_regressed", "weight/kd", "loss/total",
                "accuracy", "teacher_accuracy", "grad_norm", "finite", "skipped"):
        assert key in m, key
    total = 0.5 * m["loss/ce"] + 0.5 * m["loss/kd"] + 0.1 * m["loss/hint/stage1_regressed"]
    np.testing.assert_allclose(m["loss/total"], total, rtol=1e-6)
    assert bool(m["finite"]) and int(m["skipped"]) == 0


def test_teacher_is_frozen_bit_identical(single_device_run):
    _, _, t_vars_after = single_device_run          # the teacher's variables after 3 steps
    _, before, _ = teacher_setup(sharding.make_mesh(devices=jax.devices()[:1]))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(before),
                 jax.device_get(t_vars_after))


def test_teacher_gradient_is_never_computed():
    """A teacher whose backward pass raises: the step must still compile and run."""
    @jax.custom_vjp
    def no_grad(x):
        return x

    def fwd(x):
        return x, None

    def bwd(_, g):
        raise AssertionError("a gradient reached the teacher")
    no_grad.defvjp(fwd, bwd)

    mesh = sharding.make_mesh()
    t_module = TinyNet(width=16)
    t_vars = t_module.init(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 3)))
    teacher = teachers.from_apply_fn(
        lambda v, x: jax.tree.map(no_grad, t_module.apply(v, x, train=False)))
    student = TinyNet(width=8, hint_channels=16)
    tx = optax.sgd(0.1)
    state, st_sh = train.init_train_state(student, tx, jnp.zeros((1, 8, 8, 3)), seed=0, mesh=mesh)
    step = train.make_train_step(train.linen_student(student), tx, RECIPE, teacher, mesh=mesh,
                                 state_shardings=st_sh)
    state, metrics = step(state, t_vars, sharding.global_batch(make_batch(0), mesh))
    assert bool(metrics["finite"])


def _precomputed_batches(mesh, topk=None):
    """The same batches with the live teacher's logits stored in them (as a store would)."""
    teacher, t_vars, _ = teacher_setup(mesh)
    out = []
    for i in range(3):
        b = make_batch(i)
        logits = np.asarray(teacher(t_vars, jax.tree.map(jnp.asarray, b)).logits)
        if topk is None:
            b["teacher_logits"] = logits
        else:
            idx = np.argsort(-logits, axis=-1)[:, :topk]
            b["teacher_topk_values"] = np.take_along_axis(logits, idx, -1)
            b["teacher_topk_indices"] = idx.astype(np.int32)
        out.append(b)
    return out


def run_precomputed(mesh, batches):
    student = TinyNet(width=8, hint_channels=16)
    tx = optax.adam(1e-2)
    state, st_sh = train.init_train_state(student, tx, jnp.zeros((1, 8, 8, 3)), seed=0, mesh=mesh)
    rec = (recipe.ce(weight=0.5), recipe.kd(temperature=4.0, weight=0.5))
    step = train.make_train_step(train.linen_student(student), tx, rec, teachers.precomputed(),
                                 mesh=mesh, state_shardings=st_sh)
    history = []
    for b in batches:
        state, m = step(state, {}, sharding.global_batch(b, mesh))
        history.append(jax.device_get(m))
    return history


def test_live_and_precomputed_teacher_give_same_losses():
    mesh = sharding.make_mesh()
    student = TinyNet(width=8, hint_channels=16)
    tx = optax.adam(1e-2)
    state, st_sh = train.init_train_state(student, tx, jnp.zeros((1, 8, 8, 3)), seed=0, mesh=mesh)
    teacher, t_vars, t_sh = teacher_setup(mesh)
    rec = (recipe.ce(weight=0.5), recipe.kd(temperature=4.0, weight=0.5))
    step = train.make_train_step(train.linen_student(student), tx, rec, teacher, mesh=mesh,
                                 state_shardings=st_sh, teacher_shardings=t_sh)
    _, live = take_steps(step, state, t_vars, mesh)
    stored = run_precomputed(mesh, _precomputed_batches(mesh))
    for a, b in zip(live, stored):
        np.testing.assert_allclose(a["loss/kd"], b["loss/kd"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a["loss/ce"], b["loss/ce"], rtol=1e-5, atol=1e-6)


def test_topk_teacher_agrees_with_live_within_the_documented_bound():
    """A store keeping the teacher's top k logits: the KD loss moves by at most kd_kl_topk_bound."""
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    teacher, t_vars, _ = teacher_setup(mesh)
    b = make_batch(0)
    t_logits = teacher(t_vars, jax.tree.map(jnp.asarray, b)).logits
    s_logits = jax.random.normal(jax.random.PRNGKey(3), t_logits.shape)
    for k in (NUM_CLASSES, 5, 2):
        stored = _precomputed_batches(mesh, topk=k)[0]
        values, indices = stored["teacher_topk_values"], stored["teacher_topk_indices"]
        full = losses.kd_kl(s_logits, t_logits, 4.0)
        topk = losses.kd_kl_topk(s_logits, values, indices, 4.0)
        bound = losses.kd_kl_topk_bound(s_logits, t_logits, indices, 4.0)
        assert np.all(np.abs(np.asarray(full) - np.asarray(topk)) <= np.asarray(bound) + 1e-5)
        if k == NUM_CLASSES:
            np.testing.assert_allclose(topk, full, rtol=1e-5, atol=1e-6)


def test_nonfinite_update_is_skipped():
    mesh = sharding.make_mesh()
    student = TinyNet(width=8)
    tx = optax.sgd(0.1)
    state, st_sh = train.init_train_state(student, tx, jnp.zeros((1, 8, 8, 3)), seed=0, mesh=mesh)
    before = jax.device_get(state)
    step = train.make_train_step(train.linen_student(student), tx, (recipe.ce(),), mesh=mesh,
                                 state_shardings=st_sh, donate=False)
    bad = make_batch(0)
    bad["image"][3] = np.nan
    state, m = step(state, {}, sharding.global_batch(bad, mesh))
    assert not bool(m["finite"]) and int(m["skipped"]) == 1 and int(state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, before.params, jax.device_get(state.params))
    state, m = step(state, {}, sharding.global_batch(make_batch(1), mesh))
    assert bool(m["finite"]) and int(m["skipped"]) == 1


def test_nonfinite_optimizer_update_is_skipped_though_loss_and_gradients_are_finite():
    """An optimizer can make NaN updates from finite gradients (here a learning rate that is NaN
    from its second step): the guard skips them too, so the parameters stay finite."""
    mesh = sharding.make_mesh()
    student = TinyNet(width=8)
    tx = optax.sgd(lambda count: jnp.where(count >= 1, jnp.nan, 0.1))
    state, st_sh = train.init_train_state(student, tx, jnp.zeros((1, 8, 8, 3)), seed=0, mesh=mesh)
    step = train.make_train_step(train.linen_student(student), tx, (recipe.ce(),), mesh=mesh,
                                 state_shardings=st_sh, donate=False)
    state, m = step(state, {}, sharding.global_batch(make_batch(0), mesh))
    assert bool(m["finite"]) and int(m["skipped"]) == 0
    after_one = jax.device_get(state.params)
    state, m = step(state, {}, sharding.global_batch(make_batch(1), mesh))
    assert np.isfinite(float(m["loss/total"])) and np.isfinite(float(m["grad_norm"]))
    assert not bool(m["finite"]) and int(m["skipped"]) == 1
    jax.tree.map(np.testing.assert_array_equal, after_one, jax.device_get(state.params))


def test_class_count_mismatch_is_a_clear_error():
    mesh = sharding.make_mesh()
    student = TinyNet(width=8)
    tx = optax.sgd(0.1)
    state, st_sh = train.init_train_state(student, tx, jnp.zeros((1, 8, 8, 3)), seed=0, mesh=mesh)
    step = train.make_train_step(train.linen_student(student), tx, (recipe.kd(),),
                                 teachers.precomputed(), mesh=mesh, state_shardings=st_sh)
    b = make_batch(0)
    b["teacher_logits"] = np.zeros((16, NUM_CLASSES + 1), np.float32)
    with pytest.raises(ValueError, match="teacher has 11 classes but the student has 10"):
        step(state, {}, sharding.global_batch(b, mesh))


def test_recipe_errors():
    mesh = sharding.make_mesh()
    student = TinyNet(width=8)
    tx = optax.sgd(0.1)
    state, st_sh = train.init_train_state(student, tx, jnp.zeros((1, 8, 8, 3)), seed=0, mesh=mesh)
    with pytest.raises(ValueError, match="no teacher was given"):
        train.make_train_step(train.linen_student(student), tx, (recipe.kd(),), mesh=mesh,
                              state_shardings=st_sh)
    teacher, t_vars, t_sh = teacher_setup(mesh)
    step = train.make_train_step(train.linen_student(student), tx,
                                 (recipe.hint("nope", "stage1"),), teacher, mesh=mesh,
                                 state_shardings=st_sh, teacher_shardings=t_sh)
    with pytest.raises(ValueError, match=r"student has no feature 'nope'.*stage1"):
        step(state, t_vars, sharding.global_batch(make_batch(0), mesh))
    build = functools.partial(train.make_train_step, train.linen_student(student), tx,
                              mesh=mesh, state_shardings=st_sh)
    for bad, error, match in (
            ((recipe.ce(), recipe.ce()), ValueError, "duplicate term names"),
            ((), ValueError, "recipe is empty"),
            ((recipe.ce, recipe.kd), TypeError, r"recipe\[0\] is a function, not a Term; call"),
            (recipe.ce(), TypeError, r"wrap a single term: \(term,\)")):
        with pytest.raises(error, match=match):
            build(bad)
    # A constant temperature is checked where the term is built (a traced one could not be).
    for make, value in ((recipe.kd, -4.0), (recipe.kd, 0.0), (recipe.kd, float("nan")),
                        (lambda t: recipe.dkd(temperature=t), 0)):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            make(value)
    recipe.kd(temperature=lambda step: 4.0 - step / 100)  # a schedule is accepted
    with pytest.raises(ValueError, match="fsdp=3 must be a positive divisor"):
        sharding.make_mesh(fsdp=3)
    one_axis = jax.make_mesh((8,), ("data",))
    with pytest.raises(ValueError, match=r"needs a mesh with axes \('data', 'fsdp'\); this one "
                                         r"has \('data',\)\. Build it with kdjax.sharding.make_mesh"):
        train.init_train_state(student, tx, jnp.zeros((1, 8, 8, 3)), seed=0, mesh=one_axis)


def test_teacher_input_and_topk_outputs_errors_name_the_fix():
    """A teacher reading a key the batch lacks; DKD on a top-k teacher; top-k values without
    their class indices: each a clear error at the first step, not a KeyError deep in a trace."""
    mesh = sharding.make_mesh()
    student = TinyNet(width=8)
    tx = optax.sgd(0.1)
    state, st_sh = train.init_train_state(student, tx, jnp.zeros((1, 8, 8, 3)), seed=0, mesh=mesh)
    module = TinyNet(width=8)
    t_vars = module.init(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 3)))
    step = train.make_train_step(
        train.linen_student(student), tx, (recipe.kd(),),
        teachers.from_linen(module, input_key="image_hr"), mesh=mesh, state_shardings=st_sh)
    with pytest.raises(ValueError, match=r"the teacher reads batch\['image_hr'\] but the batch has "
                                         r"keys \['image', 'label', 'mask'\]; pass input_key="):
        step(state, t_vars, sharding.global_batch(make_batch(0), mesh))
    topk = _precomputed_batches(mesh, topk=3)[0]
    for rec, batch, match in (
            ((recipe.dkd(),), topk, "dkd needs the teacher's full logits, but this teacher gives "
                                    "top-k outputs"),
            ((recipe.kd(),), {k: v for k, v in topk.items() if k != "teacher_topk_indices"},
             "has 'teacher_topk_values' but no 'teacher_topk_indices'")):
        step = train.make_train_step(train.linen_student(student), tx, rec, teachers.precomputed(),
                                     mesh=mesh, state_shardings=st_sh)
        with pytest.raises(ValueError, match=match):
            step(state, {}, sharding.global_batch(batch, mesh))


def test_bfloat16_teacher_computes_in_bfloat16():
    module = models.create("cnn2d", NUM_CLASSES)
    x = jnp.asarray(make_batch(0)["image"])
    variables = module.init(jax.random.PRNGKey(0), x)
    batch = {"image": x}
    f32 = teachers.from_linen(module)(variables, batch).logits
    bf16_teacher = teachers.from_linen(module, compute_dtype=jnp.bfloat16)
    out = bf16_teacher(variables, batch).logits
    # The same as a model built in bfloat16 with its variables in bfloat16...
    twin = models.create("cnn2d", NUM_CLASSES, dtype=jnp.bfloat16)
    cast = jax.tree.map(lambda v: v.astype(jnp.bfloat16), variables)
    np.testing.assert_array_equal(out, twin.apply(cast, x.astype(jnp.bfloat16), train=False)[0])
    # ...whose convolutions take bfloat16 operands (casting only the inputs would not do this)...
    jaxpr = str(jax.make_jaxpr(lambda v, b: bf16_teacher(v, b).logits)(variables, batch))
    assert re.search(r"conv_general_dilated\[[^\]]*\][^\n]*", jaxpr)
    assert all("bf16" in line for line in jaxpr.splitlines() if "conv_general_dilated" in line)
    # ...so its logits (float32) differ from the float32 teacher's by bfloat16 rounding.
    assert out.dtype == jnp.float32 and not np.array_equal(out, f32)
    np.testing.assert_allclose(out, f32, rtol=0.05, atol=0.05 * float(jnp.abs(f32).max()))


def test_nnx_teacher_matches_its_linen_twin():
    from flax import nnx

    class NnxNet(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(8 * 8 * 3, NUM_CLASSES, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            return self.dense(self.drop(x.reshape(x.shape[0], -1)))

    model = NnxNet(nnx.Rngs(0))
    teacher, t_vars = teachers.from_nnx(model)
    batch = {"image": jnp.asarray(make_batch(0)["image"])}
    out1 = teacher(t_vars, batch).logits
    out2 = teacher(t_vars, batch).logits  # eval mode: dropout off, deterministic
    np.testing.assert_array_equal(out1, out2)
    w, b = t_vars["dense"]["kernel"][...], t_vars["dense"]["bias"][...]
    ref = batch["image"].reshape(16, -1) @ w + b
    np.testing.assert_allclose(out1, ref, rtol=1e-5, atol=1e-5)


def test_teacher_on_its_own_devices_gives_the_live_step():
    """teachers.on_devices: the teacher on devices 4-7, its logits added to batches on the student's
    devices 0-3 and read by precomputed(); the same 3 KD steps as the teacher inside the step."""
    student_mesh = sharding.make_mesh(devices=jax.devices()[:4])
    teacher_mesh = sharding.make_mesh(data=2, fsdp=2, devices=jax.devices()[4:])
    teacher, t_vars, t_sh = teacher_setup(student_mesh)
    rec = (recipe.ce(weight=0.5), recipe.kd(temperature=4.0, weight=0.5))
    student, tx = TinyNet(width=8), optax.adam(1e-2)
    state, st_sh = train.init_train_state(student, tx, jnp.zeros((1, 8, 8, 3)), seed=0,
                                          mesh=student_mesh)
    live = train.make_train_step(train.linen_student(student), tx, rec, teacher, mesh=student_mesh,
                                 state_shardings=st_sh, teacher_shardings=t_sh, donate=False)
    ref_state, ref = take_steps(live, state, t_vars, student_mesh)
    t_host = jax.device_get(t_vars)
    assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(
        sharding.tree_shardings(t_host, teacher_mesh, "fsdp", min_size=64)))
    add_logits = teachers.on_devices(teacher, t_host, teacher_mesh, student_mesh=student_mesh,
                                     mode="fsdp", min_size=64)
    ahead = train.make_train_step(train.linen_student(student), tx, rec, teachers.precomputed(),
                                  mesh=student_mesh, state_shardings=st_sh, donate=False)
    got = []
    for i in range(3):
        batch = add_logits(sharding.global_batch(make_batch(i), student_mesh))
        assert batch["teacher_logits"].sharding == sharding.batch_sharding(student_mesh)
        np.testing.assert_allclose(batch["teacher_logits"], teacher(t_vars, batch).logits,
                                   rtol=1e-6, atol=1e-6)
        state, metrics = ahead(state, {}, batch)
        got.append(jax.device_get(metrics))
    assert_trees_close(jax.device_get(state.params), jax.device_get(ref_state.params), 1e-5, 1e-6)
    for m, r in zip(got, ref):
        for key in ("loss/ce", "loss/kd", "teacher_accuracy"):
            np.testing.assert_allclose(m[key], r[key], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="on_devices needs a live teacher"):
        teachers.on_devices(teachers.precomputed(), {}, teacher_mesh, student_mesh=student_mesh)


def nnx_tiny_net(linen_params, dropout=0.0):
    """The NNX twin of ``TinyNet(width=8, hint_channels=16)`` holding ``linen_params``' values (plus
    a dropout layer before the head, rate ``dropout``). It returns the ``stage1`` tap and sows the
    other two (``nnx.Intermediate``)."""
    from flax import nnx

    class NnxTinyNet(nnx.Module):
        def __init__(self, rngs):
            self.conv1 = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
            self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
            self.regressor = nnx.Conv(8, 16, (1, 1), rngs=rngs)
            self.conv2 = nnx.Conv(8, 16, (3, 3), strides=2, rngs=rngs)
            self.drop = nnx.Dropout(dropout, rngs=rngs)
            self.head = nnx.Linear(16, NUM_CLASSES, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.bn(self.conv1(x)))
            self.sow(nnx.Intermediate, "stage1_regressed", self.regressor(x))
            y = nnx.relu(self.conv2(x))
            self.sow(nnx.Intermediate, "stage2", y)
            return self.head(self.drop(y.mean((1, 2)))), {"stage1": x}

    model = NnxTinyNet(nnx.Rngs(params=5, dropout=6))
    for name, linen in NNX_TWIN.items():
        for key, value in linen_params[linen].items():
            getattr(getattr(model, name), key)[...] = jnp.asarray(value)
    return model


# NNX attribute -> Linen module name in TinyNet(width=8, hint_channels=16).
NNX_TWIN = {"conv1": "Conv_0", "bn": "BatchNorm_0", "regressor": "Conv_1", "conv2": "Conv_2",
            "head": "Dense_0"}


def as_linen_names(nnx_tree):
    return {linen: nnx_tree[name] for name, linen in NNX_TWIN.items() if name in nnx_tree}


def test_nnx_student_sharded_step_matches_its_linen_twin(single_device_run):
    """An NNX student (its Param/BatchStat state split out by train.nnx_student), FSDP over a
    4 x 2 mesh, takes the same 3 KD + hint steps as the Linen student on one device; the module
    passed in is left as it was."""
    from flax import nnx

    tx = optax.adam(1e-2)
    linen_state, _ = train.init_train_state(TinyNet(width=8, hint_channels=16), tx,
                                            jnp.zeros((1, 8, 8, 3)), seed=0,
                                            mesh=sharding.make_mesh(devices=jax.devices()[:1]))
    model = nnx_tiny_net(jax.device_get(linen_state.params))
    weights = lambda: jax.device_get([nnx.to_pure_dict(nnx.state(model, kind))
                                      for kind in (nnx.Param, nnx.BatchStat)])
    before = weights()
    mesh = sharding.make_mesh(data=4, fsdp=2)
    state, _ = train.init_train_state(model, tx, None, seed=0, mesh=mesh, mode="fsdp")
    st_sh = sharding.tree_shardings(state, mesh, "fsdp", min_size=1)  # this net's leaves are small
    state = jax.device_put(state, st_sh)
    assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(st_sh.params))
    teacher, t_vars, t_sh = teacher_setup(mesh, "fsdp")
    step = train.make_train_step(train.student_apply(model), tx, RECIPE, teacher, mesh=mesh,
                                 state_shardings=st_sh, teacher_shardings=t_sh)
    state, history = take_steps(step, state, t_vars, mesh)
    ref_state, ref_history, _ = single_device_run
    state = jax.device_get(state)
    assert int(state.step) == 3
    params = as_linen_names(nnx.to_pure_dict(state.params))
    stats = as_linen_names(nnx.to_pure_dict(state.batch_stats))
    assert set(params) == set(ref_state.params) and set(stats) == set(ref_state.batch_stats)
    assert_trees_close(params, ref_state.params)
    assert_trees_close(stats, ref_state.batch_stats)
    for m, r in zip(history, ref_history):
        assert_trees_close(m, r, rtol=1e-4, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, weights(), before)


def test_nnx_student_dropout_follows_the_step_key():
    """Train mode draws dropout masks from the key apply gets (same key, same masks; another key,
    others); eval mode is deterministic and drops nothing; the BatchNorm statistics move only in
    train mode."""
    model = nnx_tiny_net(jax.device_get(TinyNet(width=8, hint_channels=16).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]), dropout=0.5)
    apply, variables = train.nnx_student(model)
    apply = jax.jit(apply, static_argnums=3)
    x = jnp.asarray(make_batch(0)["image"])
    params, stats = variables["params"], variables["batch_stats"]
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    (a, s1), (b, _), (c, _) = (apply(params, stats, x, True, k) for k in (k1, k1, k2))
    np.testing.assert_array_equal(a.logits, b.logits)
    assert not np.allclose(a.logits, c.logits)
    (e1, s2), (e2, _) = (apply(params, stats, x, False, k) for k in (k1, k2))
    np.testing.assert_array_equal(e1.logits, e2.logits)
    jax.tree.map(np.testing.assert_array_equal, s2, stats)
    assert not np.allclose(s1["bn"]["mean"][...], stats["bn"]["mean"][...])
    # Eval equals the same network without dropout.
    no_drop, _ = train.nnx_student(nnx_tiny_net(jax.device_get(TinyNet(
        width=8, hint_channels=16).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"])))
    np.testing.assert_allclose(no_drop(params, stats, x, False, k1)[0].logits, e1.logits,
                               rtol=1e-6, atol=1e-6)


def test_nnx_student_with_stacked_layers_trains():
    """Dropout layers stacked with nnx.vmap hold one RNG key per layer; apply reseeds them all
    from the step key (same key, same masks; another key, others) and the step runs."""
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(4, 4, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            return self.drop(self.dense(x))

    class Stack(nnx.Module):
        def __init__(self, rngs):
            make = nnx.split_rngs(splits=3)(nnx.vmap(Block, in_axes=0, out_axes=0))
            self.blocks = make(rngs)
            self.head = nnx.Linear(4, NUM_CLASSES, rngs=rngs)

        def __call__(self, x):
            scan = nnx.scan(lambda h, block: block(h), in_axes=(nnx.Carry, 0),
                            out_axes=nnx.Carry)
            return self.head(scan(x.reshape(x.shape[0], -1)[:, :4], self.blocks))

    model = Stack(nnx.Rngs(params=0, dropout=1))
    apply, variables = train.nnx_student(model)
    apply = jax.jit(apply, static_argnums=3)
    x = jnp.asarray(make_batch(0)["image"])
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    a, b, c = (apply(variables["params"], variables["batch_stats"], x, True, k)[0].logits
               for k in (k1, k1, k2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    state, st_sh = train.init_train_state(model, optax.sgd(0.1), None, seed=0, mesh=mesh)
    step = train.make_train_step(train.student_apply(model), optax.sgd(0.1), (recipe.ce(),),
                                 mesh=mesh, state_shardings=st_sh)
    state, _ = take_steps(step, state, {}, mesh, steps=2)
    assert int(state.step) == 2 and int(state.skipped) == 0


NNX_NET = """
from flax import nnx

class Net(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(6, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.bn(self.dense(x))))

def two_steps(mesh, rows):
    import numpy as np, optax
    from kdjax import recipe, sharding, train
    model = Net(nnx.Rngs(0))
    state, sh = train.init_train_state(model, optax.sgd(0.1), None, seed=0, mesh=mesh)
    step = train.make_train_step(train.student_apply(model), optax.sgd(0.1), (recipe.ce(),),
                                 mesh=mesh, state_shardings=sh)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(8, 6)).astype(np.float32),
             "label": rng.integers(0, 3, 8).astype(np.int32)}
    for _ in range(2):
        state, metrics = step(state, {}, sharding.global_batch(
            {k: v[rows] for k, v in batch.items()}, mesh))
    return state, metrics
"""

NNX_WORKER = """
import sys
import jax, numpy as np
port, pid, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           initialization_timeout=60)
from kdjax import sharding
exec(sys.argv[4])
state, metrics = two_steps(sharding.make_mesh(), slice(4 * pid, 4 * pid + 4))
from kdjax import teachers
try:  # a teacher on its own devices is one process's: a mesh over both processes is refused
    teachers.on_devices(teachers.from_apply_fn(lambda v, x: x), {}, sharding.make_mesh(),
                        student_mesh=sharding.make_mesh(devices=jax.local_devices()))
    refusal = "accepted"
except ValueError as e:
    refusal = str(e)
np.savez(out, kernel=np.asarray(state.params["head"]["kernel"][...].addressable_data(0)),
         mean=np.asarray(state.batch_stats["bn"]["mean"][...].addressable_data(0)),
         loss=np.asarray(metrics["loss/ce"].addressable_data(0)), refusal=refusal)
jax.distributed.shutdown()
"""


def test_two_processes_nnx_student_matches_one_process_and_on_devices_refuses(tmp_path):
    """An NNX student trained by two jax.distributed processes (gloo, loopback; 2 CPU devices
    each, 4 rows of the batch each) ends where one process with 4 devices does; in each process
    ``teachers.on_devices`` refuses a teacher mesh holding the other process's devices."""
    import local_processes

    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    local_processes.run(lambda i, port: [sys.executable, "-c", NNX_WORKER, str(port), str(i),
                                         str(tmp_path / f"p{i}.npz"), NNX_NET], env=env)
    scope = {}
    exec(NNX_NET, scope)
    state, metrics = scope["two_steps"](sharding.make_mesh(devices=jax.devices()[:4]), slice(0, 8))
    for i in range(2):
        with np.load(tmp_path / f"p{i}.npz") as got:
            np.testing.assert_allclose(got["kernel"], state.params["head"]["kernel"][...],
                                       rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got["mean"], state.batch_stats["bn"]["mean"][...],
                                       rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got["loss"], metrics["loss/ce"], rtol=1e-5)
            assert "mesh holds devices of other processes" in str(got["refusal"])


def test_nnx_teacher_sown_taps_join_its_features():
    """A teacher NNX module that sows taps (its own and a submodule's, one name twice) gives them
    as features next to the ones it returns; the hint loss reads them."""
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, x):
            y = self.dense(x)
            self.sow(nnx.Intermediate, "out", y)
            return y

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.block1 = Block(rngs)
            self.head = nnx.Linear(4, NUM_CLASSES, rngs=rngs)

        def __call__(self, x):
            h = self.block1(x)
            self.sow(nnx.Intermediate, "stage1", x)
            self.sow(nnx.Intermediate, "stage1", h)  # sown twice: the last value counts
            self.sow(nnx.Intermediate, "reduced", h, reduce_fn=lambda old, new: old + new,
                     init_fn=lambda: 1.0)  # a custom reduction: its value, as it is
            return self.head(h), {"returned": 2 * h}

    model = Net(nnx.Rngs(0))
    teacher, t_vars = teachers.from_nnx(model)
    x = jax.random.normal(jax.random.key(3), (5, 4))
    out = jax.jit(teacher)(t_vars, {"image": x})
    h = x @ model.block1.dense.kernel[...] + model.block1.dense.bias[...]
    assert set(out.features) == {"block1/out", "stage1", "reduced", "returned"}
    for name, want in (("block1/out", h), ("stage1", h), ("reduced", h + 1), ("returned", 2 * h)):
        np.testing.assert_allclose(out.features[name], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.logits, h @ model.head.kernel[...] + model.head.bias[...],
                               rtol=1e-5, atol=1e-5)
    student = recipe.StudentOutput(out.logits, {"s": h + 1.0})
    loss, _ = recipe.evaluate((recipe.hint("s", "block1/out"),), student, out, {}, 0)
    np.testing.assert_allclose(loss, 0.5 * 4, rtol=1e-6)  # 1/2 ||1||^2 over 4 channels


def test_eval_step_honours_mask():
    mesh = sharding.make_mesh()
    student = TinyNet(width=8)
    tx = optax.sgd(0.1)
    state, st_sh = train.init_train_state(student, tx, jnp.zeros((1, 8, 8, 3)), seed=0, mesh=mesh)
    teacher, t_vars, t_sh = teacher_setup(mesh)
    eval_step = train.make_eval_step(train.linen_student(student), teacher, mesh=mesh,
                                     state_shardings=st_sh, teacher_shardings=t_sh)
    b = make_batch(0)
    b["mask"][11:] = False
    sums = jax.device_get(eval_step(state, t_vars, sharding.global_batch(b, mesh)))
    logits, _ = student.apply({"params": state.params, "batch_stats": state.batch_stats},
                              b["image"])
    logits = np.asarray(logits, np.float64)[:11]
    labels = b["label"][:11]
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    assert sums["count"] == 11
    assert sums["correct"] == (logits.argmax(-1) == labels).sum()
    np.testing.assert_allclose(sums["ce"], -logp[np.arange(11), labels].sum(), rtol=1e-5)
    for k in ("teacher_correct", "agreement", "kl"):
        assert k in sums
