"""kdjax.detection.train: the jitted, sharded detector train step. KD on 8 devices (data=8) equals KD
on one device (loss terms and gradients), a few KD steps reduce the loss, scratch runs FSDP-sharded
(data=4, fsdp=2) and skips a non-finite batch, and a bad setup gives a clear error."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import sharding
from kdjax import train as train_lib
from kdjax.detection import distill
from kdjax.detection import model as M
from kdjax.detection import train as DT
from kdjax.detection.targets import check_ground_truth

K = 3
SMALL = dict(num_proposals=16, pre_nms_topk=64)
SAMPLES = dict(rpn_batch_size=32, roi_batch_size=16)
LR = 0.05
TX = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(LR, momentum=0.9))


def batch_of(size=8, side=64):
    """``size`` canvases with one or two filled rectangles each (colour channel = class)."""
    rng = np.random.default_rng(0)
    images = np.zeros((size, side, side, 3), np.float32)
    boxes = np.zeros((size, 2, 4), np.float32)
    labels = np.zeros((size, 2), np.int32)
    valid = np.zeros((size, 2), bool)
    for b in range(size):
        for g in range(1 + b % 2):
            w, h = rng.integers(14, 30, size=2)
            x1, y1 = rng.integers(0, side - w), rng.integers(0, side - h)
            boxes[b, g], labels[b, g], valid[b, g] = (x1, y1, x1 + w, y1 + h), rng.integers(K), True
            images[b, y1:y1 + h, x1:x1 + w, labels[b, g]] = 1.0
    check_ground_truth(boxes, labels, valid, K, (side, side))
    return {"image": images, "boxes": boxes, "labels": labels, "valid": valid}


@functools.partial(jax.jit, static_argnums=0)
def _init(model, key):
    return model.init(key, jnp.zeros((1, 16, 16, 3)))


STUDENT, TEACHER = M.create("tiny", K, **SMALL), M.create("small", K, **SMALL)
ADAPTER = distill.adaptation_layer(4 * M.SIZES["small"]["width"])  # the teacher's tap channels


def kd_run(mesh):
    """A KD step on ``mesh`` (hint included), its initial state and the placed teacher."""
    state, shardings = DT.init_detection_state(STUDENT, TX, seed=0, mesh=mesh, adapter=ADAPTER)
    t_vars, t_shardings = train_lib.put_teacher(_init(TEACHER, jax.random.key(7)), mesh)
    step = DT.make_detection_train_step(STUDENT, TX, mesh=mesh, state_shardings=shardings, teacher=TEACHER,
                                        teacher_shardings=t_shardings, config=distill.ChenConfig(), adapter=ADAPTER,
                                        donate=False, **SAMPLES)
    return step, state, t_vars


@pytest.fixture(scope="module")
def single():
    return kd_run(sharding.make_mesh(devices=jax.devices()[:1]))


def test_sharded_kd_step_equals_single_device(single):
    mesh = sharding.make_mesh(data=-1, fsdp=1)
    assert mesh.devices.size == 8
    batch = batch_of()
    results = []
    for step, state, t_vars in (single, kd_run(mesh)):
        new, metrics = step(state, t_vars, sharding.global_batch(batch, step_mesh(state)))
        grads = jax.tree.map(lambda old, new: (np.asarray(old) - np.asarray(new)) / LR, state.params, new.params)
        results.append((jax.device_get(metrics), grads))
    (m1, g1), (m8, g8) = results
    assert set(m1) >= {"loss/total", "loss/hint", "loss/rpn_cls_soft", "loss/roi_box_bounded", "grad_norm"}
    assert bool(m1["finite"]) and float(m1["loss/hint"]) > 0
    for key in [k for k in m1 if k.startswith("loss/")] + ["grad_norm"]:
        np.testing.assert_allclose(m8[key], m1[key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert bool(m8["finite"]) and int(m8["skipped"]) == 0
    assert float(m1["grad_norm"]) > 0
    # grad_norm matches, and so does every parameter's (clipped, first-momentum) update
    scale = min(1.0, 1.0 / float(m1["grad_norm"]))
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g1)[0], jax.tree.leaves(g8)):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))
    assert float(np.abs(g1["adapter"]["conv"]["kernel"]).max()) > 0  # the hint trains the adaptation layer


def step_mesh(state):
    return state.step.sharding.mesh


def test_kd_steps_reduce_the_loss(single):
    step, state, t_vars = single
    batch = sharding.global_batch(batch_of(), step_mesh(state))
    history = []
    for _ in range(25):
        state, metrics = step(state, t_vars, batch)
        history.append({k: float(v) for k, v in metrics.items() if k.startswith("loss/")})
    assert int(state.step) == 25 and int(state.skipped) == 0
    mean = lambda hs, k: np.mean([h[k] for h in hs])  # noqa: E731
    # the paper's summed hint dominates the total at first (the adaptation layer learns it fast); the
    # detector's own regression improves too
    for key in ("loss/total", "loss/hint", "loss/roi_box"):
        assert mean(history[-5:], key) < 0.7 * mean(history[:5], key), [h[key] for h in history]


def test_scratch_fsdp_and_nonfinite_guard():
    mesh = sharding.make_mesh(data=4, fsdp=2)
    state, shardings = DT.init_detection_state(STUDENT, TX, seed=0, mesh=mesh, mode="fsdp")
    fc1 = shardings.params["detector"]["roi_head"]["fc1"]["kernel"]
    assert sharding.FSDP in fc1.spec  # the large fc kernel is split over the fsdp axis
    step = DT.make_detection_train_step(STUDENT, TX, mesh=mesh, state_shardings=shardings, **SAMPLES)
    batch = batch_of()
    totals = []
    for _ in range(10):
        state, metrics = step(state, {}, sharding.global_batch(batch, mesh))
        totals.append(float(metrics["loss/total"]))
    assert set(metrics) == {"loss/rpn_cls", "loss/rpn_box", "loss/roi_cls", "loss/roi_box", "loss/total",
                            "grad_norm", "finite", "skipped"}
    assert totals[-1] < totals[0], totals
    before = jax.device_get(state.params)
    bad = {**batch, "image": np.full_like(batch["image"], np.nan)}
    state, metrics = step(state, {}, sharding.global_batch(bad, mesh))
    assert not bool(metrics["finite"]) and int(metrics["skipped"]) == 1 and int(state.step) == 11
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params))):
        np.testing.assert_array_equal(a, b)


def test_setup_errors(single):
    _, state, t_vars = single
    mesh = step_mesh(state)
    common = dict(mesh=mesh, state_shardings=None)
    with pytest.raises(ValueError, match="KD mode needs both a teacher and a ChenConfig"):
        DT.make_detection_train_step(STUDENT, TX, teacher=TEACHER, **common)
    with pytest.raises(ValueError, match="KD mode needs both"):
        DT.make_detection_train_step(STUDENT, TX, config=distill.ChenConfig(), **common)
    with pytest.raises(ValueError, match="needs an adaptation layer"):
        DT.make_detection_train_step(STUDENT, TX, teacher=TEACHER, config=distill.ChenConfig(), **common)
    with pytest.raises(ValueError, match="teacher has 5 foreground classes but the student has 3"):
        DT.make_detection_train_step(STUDENT, TX, teacher=M.create("small", K + 2), config=distill.ChenConfig(),
                                     adapter=ADAPTER, **common)
    with pytest.raises(ValueError, match="only read by the hint"):
        DT.make_detection_train_step(STUDENT, TX, adapter=ADAPTER, **common)
    # a teacher with other anchors: caught when the step is traced, before any compute
    other = M.create("small", K, anchor_sizes=(8.0, 16.0, 32.0), **SMALL)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    step = DT.make_detection_train_step(STUDENT, TX, mesh=mesh, state_shardings=shardings, teacher=other,
                                        config=distill.ChenConfig(), adapter=ADAPTER, **SAMPLES)
    batch = sharding.global_batch(batch_of(2), mesh)
    with pytest.raises(ValueError, match=r"anchors differ from the student's.*distill_rpn=False"):
        jax.eval_shape(step, state, t_vars, batch)
    with pytest.raises(ValueError, match=r"batch lacks \['valid'\]"):
        jax.eval_shape(step, state, t_vars, {k: v for k, v in batch.items() if k != "valid"})
    with pytest.raises(ValueError, match="unknown hint layer 'stage9'"):
        DT.hint_features({"tap": None, "features": {"stage1": None}}, "stage9")



def test_init_state_has_the_models_own_initial_parameters():
    """init_detection_state initialises by scoring one given RoI (no proposal NMS to compile): the
    detector's parameters are exactly ``model.init``'s (whole forward) with the same key."""
    state, _ = DT.init_detection_state(STUDENT, TX, seed=3, mesh=sharding.make_mesh(devices=jax.devices()[:1]))
    det_key = jax.random.split(jax.random.PRNGKey(3), 3)[0]
    expected = _init(STUDENT, det_key)["params"]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params["detector"]), jax.device_get(expected))
