"""kdjax.detection.model (the Faster R-CNN-shaped detector) and kdjax.detection.targets (its training
targets and loss): shapes, jit, gradients, a tiny overfit, a teacher scoring a student's RoIs,
sharded == single-device, post-processing on hand-made cases, and errors. Sizes are tiny."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax import sharding
from kdjax.detection import boxes as B
from kdjax.detection import model as M
from kdjax.detection import targets as T

K = 3  # foreground classes
SMALL = dict(num_proposals=16, pre_nms_topk=64)  # keeps NMS loops and compiles short


def canvases(batch=2, height=64, width=72):
    """Images with filled rectangles where the ground truth is (colour channel = class)."""
    gt_boxes = np.zeros((batch, 2, 4), np.float32)
    gt_labels = np.zeros((batch, 2), np.int32)
    gt_valid = np.zeros((batch, 2), bool)
    cases = [[((4, 4, 30, 30), 0), ((30, 30, 60, 62), 2)], [((10, 10, 40, 40), 1)]]
    images = np.zeros((batch, height, width, 3), np.float32)
    for b in range(batch):
        for g, (box, label) in enumerate(cases[b % 2]):
            gt_boxes[b, g], gt_labels[b, g], gt_valid[b, g] = box, label, True
            x1, y1, x2, y2 = box
            images[b, y1:y2, x1:x2, label] = 1.0
    return jnp.asarray(images), gt_boxes, gt_labels, gt_valid


@functools.partial(jax.jit, static_argnums=0)
def _init(model, key):
    return model.init(key, jnp.zeros((1, 16, 16, 3)))


def init(model, key):
    """Variables of ``model``: they do not depend on the image size, so a small image keeps the
    init's compile short (init runs the whole forward, NMS included; jitted, one compile a config)."""
    return _init(model, key)


@functools.partial(jax.jit, static_argnums=0)
def forward(model, variables, x):
    """``model.apply`` jitted once per config and shape, shared by the tests."""
    return model.apply(variables, x)


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_output_shapes_and_dtypes(size):
    model = M.create(size, K, **SMALL)
    x = jax.random.uniform(jax.random.key(0), (2, 64, 72, 3))  # H != W
    variables = init(model, jax.random.key(1))
    out = forward(model, variables, x)
    width = M.SIZES[size]["width"]
    n = 8 * 9 * 9  # cells at stride 8 x anchors
    assert out["tap"].shape == (2, 8, 9, 4 * width)
    assert [out["features"][f"stage{i}"].shape[1:3] for i in (1, 2, 3)] == [(32, 36), (16, 18), (8, 9)]
    expect = {"rpn_logits": (2, n), "rpn_deltas": (2, n, 4), "anchors": (n, 4), "rois": (2, 16, 4),
              "roi_valid": (2, 16), "roi_scores": (2, 16), "roi_logits": (2, 16, K + 1),
              "roi_deltas": (2, 16, K + 1, 4)}
    for key, shape in expect.items():
        assert out[key].shape == shape, key
        assert out[key].dtype == (jnp.bool_ if key == "roi_valid" else jnp.float32), key
    np.testing.assert_array_equal(out["anchors"], model.anchors((64, 72)))
    valid = np.asarray(out["roi_valid"])
    rois = np.asarray(out["rois"])[valid]
    assert valid.sum() > 0
    B.validate_boxes(rois, "rois", image_size=(64, 72))  # inside the image, x1 <= x2
    assert np.all(rois[:, 2] > rois[:, 0]) and np.all(rois[:, 3] > rois[:, 1])
    scores = np.asarray(out["roi_scores"])
    for b in range(2):  # NMS keeps by decreasing objectness, valid slots first
        assert np.all(np.diff(scores[b][valid[b]]) <= 0)
        np.testing.assert_array_equal(valid[b], np.arange(16) < valid[b].sum())
    if size != "tiny":
        return
    # proposals carry no gradient (stop_gradient, as in Faster R-CNN)
    grads = jax.jit(jax.grad(lambda v: model.apply(v, x)["rois"].sum()))(variables)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


@pytest.fixture(scope="module")
def trained():
    """40 adam steps on 2 synthetic images; the loss and grads of each step, and the variables."""
    model = M.create("tiny", K, **SMALL)
    images, gt_boxes, gt_labels, gt_valid = canvases()
    T.check_ground_truth(gt_boxes, gt_labels, gt_valid, K, images.shape[1:3])
    variables = init(model, jax.random.key(0))
    tx = optax.adam(3e-3)
    opt = jax.jit(tx.init)(variables)

    @jax.jit
    def step(variables, opt, key):
        (_, aux), grads = jax.value_and_grad(T.detector_loss, argnums=1, has_aux=True)(
            model, variables, images, gt_boxes, gt_labels, gt_valid, key, rpn_batch_size=64, roi_batch_size=32)
        updates, opt = tx.update(grads, opt, variables)
        return optax.apply_updates(variables, updates), opt, aux["terms"], grads

    history, first_grads = [], None
    for i in range(40):
        variables, opt, terms, grads = step(variables, opt, jax.random.key(i))
        first_grads = grads if first_grads is None else first_grads
        history.append({k: float(v) for k, v in terms.items()})
    return model, variables, history, first_grads, (images, gt_boxes, gt_labels, gt_valid)


def test_gradients_flow_and_are_finite(trained):
    _, _, history, grads, _ = trained
    assert set(history[0]) == {"rpn_cls", "rpn_box", "roi_cls", "roi_box", "total"}
    assert all(np.isfinite(list(h.values())).all() for h in history)
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    for path, g in flat:
        assert np.isfinite(np.asarray(g)).all(), path
    # every layer of the backbone, the RPN and the RoI head gets a gradient
    for part in ("backbone", "rpn", "roi_head"):
        kernels = [g for path, g in flat if part in (name := jax.tree_util.keystr(path)) and "kernel" in name]
        assert kernels and all(float(jnp.abs(g).max()) > 0 for g in kernels), part


def test_tiny_overfit_drives_the_loss_down(trained):
    model, variables, history, _, (images, gt_boxes, gt_labels, gt_valid) = trained
    mean = lambda hs, k: np.mean([h[k] for h in hs])  # noqa: E731
    assert mean(history[-5:], "total") < 0.5 * mean(history[:5], "total"), [h["total"] for h in history]
    assert mean(history[-5:], "rpn_cls") < 0.3 * mean(history[:5], "rpn_cls")
    assert mean(history[-5:], "roi_cls") < 0.5 * mean(history[:5], "roi_cls")
    # and the detector finds the boxes: each ground truth's class has a detection with IoU > 0.5
    out = forward(model, variables, images)
    det = jax.jit(M.postprocess, static_argnums=4)(out["roi_logits"], out["roi_deltas"], out["rois"],
                                                   out["roi_valid"], (64, 72))
    found = 0
    for b in range(2):
        for g in np.flatnonzero(gt_valid[b]):
            same = np.asarray(det.valid[b]) & (np.asarray(det.classes[b]) == gt_labels[b, g])
            iou = np.asarray(B.iou_matrix(gt_boxes[b, g][None], det.boxes[b]))[0]
            found += bool((iou[same] > 0.5).any())
    assert found >= 2, found  # of 3


def test_teacher_scores_the_students_rois():
    student, teacher = M.create("tiny", K, **SMALL), M.create("small", K, **SMALL)
    x = jax.random.uniform(jax.random.key(0), (2, 64, 72, 3))
    s_vars, t_vars = init(student, jax.random.key(1)), init(teacher, jax.random.key(2))
    s_out = forward(student, s_vars, x)

    @jax.jit
    def run(t_vars, x, rois, valid):
        t_out = M.teacher_on_rois(teacher, t_vars, x, rois, K, roi_valid=valid)
        direct = teacher.apply(t_vars, t_out["tap"], rois, method="score_rois")
        return t_out, direct

    t_out, direct = run(t_vars, x, s_out["rois"], s_out["roi_valid"])
    assert t_out["roi_logits"].shape == (2, 16, K + 1) and t_out["roi_deltas"].shape == (2, 16, K + 1, 4)
    np.testing.assert_array_equal(t_out["rois"], s_out["rois"])
    np.testing.assert_array_equal(t_out["roi_valid"], s_out["roi_valid"])
    np.testing.assert_allclose(t_out["roi_logits"], direct[0], rtol=1e-6, atol=1e-6)
    # the teacher's RPN runs on the same anchors (RPN-level distillation lines up anchor by anchor)
    np.testing.assert_array_equal(t_out["anchors"], s_out["anchors"])
    assert t_out["rpn_logits"].shape == s_out["rpn_logits"].shape
    # a teacher with another class count
    other = M.create("small", K + 2, **SMALL)
    other_vars = {"params": {"roi_head": {"cls_score": {"kernel": np.zeros((128, K + 3), np.float32)}}}}
    with pytest.raises(ValueError, match=r"teacher has \[5\] foreground classes but the student has 3"):
        M.teacher_on_rois(other, other_vars, x, s_out["rois"], K)
    with pytest.raises(ValueError, match=r"teacher has \[3, 5\] foreground classes"):  # module and params disagree
        M.teacher_on_rois(teacher, other_vars, x, s_out["rois"], K)


def test_sharded_forward_equals_single_device():
    model = M.create("tiny", K, **SMALL)
    x = jax.random.uniform(jax.random.key(0), (8, 64, 72, 3))
    variables = init(model, jax.random.key(1))
    # single device, two images at a time (each image's forward is independent of the others)
    chunks = [forward(model, variables, x[i:i + 2]) for i in range(0, 8, 2)]
    single = jax.tree.map(lambda *a: np.concatenate(a) if a[0].ndim and a[0].shape[0] == 2 else a[0], *chunks)
    mesh = sharding.make_mesh(data=-1, fsdp=1)
    assert mesh.devices.size == 8
    batch = sharding.batch_sharding(mesh)
    fn = jax.jit(model.apply, in_shardings=(sharding.replicated(mesh), batch),
                 out_shardings=None)
    sharded = fn(jax.device_put(variables, sharding.replicated(mesh)), jax.device_put(x, batch))
    assert sharded["roi_logits"].sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 3)
    for key in ("rpn_logits", "rpn_deltas", "rois", "roi_scores", "roi_logits", "roi_deltas", "tap"):
        np.testing.assert_allclose(np.asarray(sharded[key]), np.asarray(single[key]), rtol=1e-5, atol=1e-5,
                                   err_msg=key)
    np.testing.assert_array_equal(sharded["roi_valid"], single["roi_valid"])


def test_postprocess_hand_made():
    # three RoIs: two overlapping ones that both say class 1, one that says class 0; zero deltas
    rois = jnp.array([[[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10.0]]])
    logits = jnp.log(jnp.array([[[0.1, 0.1, 0.8, 0.0], [0.2, 0.1, 0.7, 0.0], [0.3, 0.7, 0.0, 0.0]]]) + 1e-9)
    deltas = jnp.zeros((1, 3, 4, 4))
    det = jax.jit(M.postprocess, static_argnums=4, static_argnames="max_detections")(
        logits, deltas, rois, jnp.ones((1, 3), bool), (20, 20), max_detections=4)
    # class 1 (logit index 2): RoI 1 is suppressed by RoI 0 (IoU 90/110 > 0.5); class 0: RoI 2 keeps the same
    # box as class 1's (other class) and suppresses RoIs 0 and 1 (0.1 each); background is never a detection
    got = [(int(c), round(float(s), 4), tuple(np.asarray(b).round(4).tolist())) for c, s, b, v in
           zip(det.classes[0], det.scores[0], det.boxes[0], det.valid[0]) if v]
    assert got == [(1, 0.8, (0.0, 0.0, 10.0, 10.0)), (0, 0.7, (0.0, 0.0, 10.0, 10.0))]
    assert det.boxes.shape == (1, 4, 4) and list(np.asarray(det.valid[0])) == [True, True, False, False]
    # a delta moves the box, decoded with the RoI head weights (10, 10, 5, 5) and clipped
    deltas = deltas.at[0, 0, 2].set(jnp.array([10.0, 0.0, 0.0, 0.0]))  # dx = 1 box width
    det = M.postprocess(logits, deltas, rois, jnp.array([[True, False, False]]), (20, 15), max_detections=1)
    np.testing.assert_allclose(det.boxes[0, 0], [10, 0, 15, 10], atol=1e-5)
    assert int(det.classes[0, 0]) == 1 and bool(det.valid[0, 0])


def test_targets_rpn_and_roi():
    model = M.create("tiny", K, **SMALL)
    anchors = jnp.asarray(model.anchors((64, 64)))
    _, gt_boxes, gt_labels, gt_valid = canvases()
    gt_valid[1] = False  # an image with no objects: all background
    gt_boxes[1, 1] = np.nan  # padding is never read
    rpn = jax.jit(T.rpn_targets, static_argnames="batch_size_per_image")(
        jax.random.key(0), anchors, gt_boxes, gt_labels, gt_valid, batch_size_per_image=64)
    assert rpn.objectness.shape == rpn.sampled.shape == (2, anchors.shape[0])
    assert np.isfinite(np.asarray(rpn.deltas)).all()
    counts = np.asarray(rpn.sampled).sum(1)
    assert list(counts) == [64, 64] and np.asarray(rpn.positive).sum(1)[1] == 0
    assert 1 <= np.asarray(rpn.positive).sum(1)[0] <= 32
    pos = np.asarray(rpn.positive[0])
    decoded = np.asarray(B.decode(rpn.deltas[0][pos], anchors[pos]))
    iou = np.asarray(B.iou_matrix(decoded, gt_boxes[0]))
    np.testing.assert_allclose(iou.max(1), 1.0, atol=1e-5)  # deltas decode to the matched gt box
    # proposals: a far-away valid one, and invalid copies of the gt (never sampled)
    proposals = jnp.array([[[50, 0, 60, 8], [4, 4, 30, 30], [30, 30, 60, 62]]] * 2, jnp.float32)
    valid = jnp.array([[True, False, False]] * 2)
    targets = jax.jit(T.roi_targets, static_argnames=("batch_size_per_image", "add_ground_truth"))
    for add_gt in (False, True):
        roi = targets(jax.random.key(1), proposals, valid, gt_boxes, gt_labels, gt_valid,
                      batch_size_per_image=8, add_ground_truth=add_gt)
        assert roi.rois.shape == (2, 8, 4) and roi.classes.shape == (2, 8)
        positive = np.asarray(roi.positive)
        if not add_gt:
            assert not positive.any() and list(np.asarray(roi.valid).sum(1)) == [1, 1]
            continue
        assert list(positive.sum(1)) == [2, 0] and list(np.asarray(roi.valid).sum(1)) == [3, 1]
        classes = np.asarray(roi.classes[0])[positive[0]]
        assert sorted(classes) == [1, 3]  # labels 0 and 2, plus one for background
        np.testing.assert_allclose(roi.deltas[0][positive[0]], 0.0, atol=1e-6)  # the gt boxes themselves
        assert np.all(np.asarray(roi.classes)[~positive] == 0)
    # the loss on these targets (random model outputs): finite with the empty image and NaN padding
    rng = np.random.default_rng(0)
    terms = jax.jit(T.faster_rcnn_loss, static_argnames="rpn_batch_size")(
        jnp.asarray(rng.normal(size=rpn.objectness.shape), jnp.float32),
        jnp.asarray(rng.normal(size=rpn.deltas.shape), jnp.float32), rpn,
        jnp.asarray(rng.normal(size=(2, 8, K + 1)), jnp.float32),
        jnp.asarray(rng.normal(size=(2, 8, K + 1, 4)), jnp.float32), roi, rpn_batch_size=64)
    assert all(np.isfinite(float(v)) and float(v) > 0 for v in terms.values()), terms
    np.testing.assert_allclose(float(terms["total"]), sum(float(terms[k]) for k in
                                                          ("rpn_cls", "rpn_box", "roi_cls", "roi_box")), rtol=1e-6)


def test_errors():
    model = M.create("tiny", K, **SMALL)
    x = jnp.zeros((1, 64, 64, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)  # the errors come before any compute
    with pytest.raises(ValueError, match=r"images of shape \[B, H, W, 3\]"):
        model.apply(variables, jnp.zeros((1, 64, 64)))
    with pytest.raises(TypeError, match="floating-point images"):
        model.apply(variables, jnp.zeros((1, 64, 64, 3), jnp.uint8))
    with pytest.raises(ValueError, match="empty or smaller than the stride 8"):
        model.apply(variables, jnp.zeros((1, 4, 64, 3)))
    with pytest.raises(ValueError, match=r"rois must be \[B, R, 4\] with B = 1"):
        model.apply(variables, x, rois=jnp.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="stride must be a power of two"):
        M.FasterRCNN(K, stride=6)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        M.create("tiny", 0)
    with pytest.raises(ValueError, match="unknown detector size 'huge'"):
        M.create("huge", K)
    _, boxes, labels, valid = canvases()
    T.check_ground_truth(boxes, labels, valid, K, (64, 64))
    bad = boxes.copy()
    bad[0, 1, 2] = 20.0  # x2 < x1
    with pytest.raises(ValueError, match=r"gt_boxes\[0, 1\] .* x2 < x1"):
        T.check_ground_truth(bad, labels, valid, K, (64, 64))
    with pytest.raises(ValueError, match=r"outside the image \[0, 48\] x \[0, 64\]"):
        T.check_ground_truth(boxes, labels, valid, K, (64, 48))
    bad_labels = labels.copy()
    bad_labels[1, 0] = K
    with pytest.raises(ValueError, match=r"gt_labels\[1, 0\] = 3 is out of range: class ids must lie in \[0, 3\)"):
        T.check_ground_truth(boxes, bad_labels, valid, K, (64, 64))
    bad_labels[1, 0] = -1
    with pytest.raises(ValueError, match="out of range"):
        T.check_ground_truth(boxes, bad_labels, valid, K, (64, 64))
    bad_labels[1, 1] = 99  # padding rows are not checked
    bad_labels[1, 0] = 0
    T.check_ground_truth(boxes, bad_labels, valid, K, (64, 64))
    with pytest.raises(ValueError, match=r"gt_boxes \[B, G, 4\], gt_labels \[B, G\]"):
        T.check_ground_truth(boxes, labels[:, :1], valid, K, (64, 64))
    with pytest.raises(TypeError, match="gt_valid must be bool"):
        T.check_ground_truth(boxes, labels, valid.astype(int), K, (64, 64))
    with pytest.raises(ValueError, match=r"gt_boxes \[B, G, 4\]"):
        T.rpn_targets(jax.random.key(0), model.anchors((64, 64)), boxes[0], labels, valid)
