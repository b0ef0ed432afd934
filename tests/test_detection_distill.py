"""kdjax.detection.distill (Chen et al. 2017): every term against a float64 NumPy reference on hand-made
inputs, the student == teacher cases, the background weight, masks, gradients, the ablation switches,
errors, and one jitted run on the real detector."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.detection import distill as D
from kdjax.detection import model as M
from kdjax.detection import targets as T

K = 2  # foreground classes
RPN_BS = 4  # anchors sampled per image (the RPN normaliser)


def hand_made(seed=0, b=2, n=6, s=5):
    """A detector_loss-shaped ``aux`` and a teacher's outputs on its RoIs, all random but consistent:
    positives are sampled/valid, foreground RoIs have classes in 1..K, the rest class 0."""
    rng = np.random.default_rng(seed)
    f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    sampled = np.array([[1, 1, 0, 1, 1, 0], [1, 0, 1, 1, 0, 1]], bool)[:b, :n]
    positive = sampled & np.array([[1, 0, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0]], bool)[:b, :n]
    rpn = T.RPNTargets(positive.astype(np.float32), sampled, positive, np.where(positive[..., None], f32(b, n, 4), 0))
    valid = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], bool)[:b, :s]
    fg = valid & np.array([[1, 0, 1, 0, 0], [0, 1, 0, 0, 0]], bool)[:b, :s]
    classes = np.where(fg, rng.integers(1, K + 1, size=(b, s)), 0).astype(np.int32)
    roi = T.RoITargets(np.zeros((b, s, 4), np.float32), classes, np.where(fg[..., None], f32(b, s, 4), 0), fg, valid,
                       np.zeros((b, s), np.int32))
    anchors = np.tile(np.array([[0, 0, 8, 8]], np.float32), (n, 1)) + np.arange(n, dtype=np.float32)[:, None]

    def outputs(scale):
        return {"rpn_logits": scale * f32(b, n), "rpn_deltas": f32(b, n, 4), "anchors": anchors,
                "roi_logits": scale * f32(b, s, K + 1), "roi_deltas": f32(b, s, K + 1, 4), "tap": f32(b, 3, 3, 4)}

    student, teacher = outputs(1.0), outputs(2.0)
    return aux_of(student, rpn, roi), teacher


def aux_of(student, rpn, roi):
    terms = T.faster_rcnn_loss(student["rpn_logits"], student["rpn_deltas"], rpn, student["roi_logits"],
                               student["roi_deltas"], roi, rpn_batch_size=RPN_BS)
    return {"terms": terms, "outputs": student, "rpn": rpn, "roi": roi}


def log_softmax64(z, t):
    z = np.asarray(z, np.float64) / t
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def soft64(s, t, where, w0, temp):
    """Chen et al.'s L_soft per row (no T^2), float64, zero where masked."""
    w = np.ones(s.shape[-1])
    w[0] = w0
    value = -(w * np.exp(log_softmax64(t, temp)) * log_softmax64(s, temp)).sum(-1)
    return np.where(where, value, 0.0)


def bounded64(s, t, y, where, m):
    d_s = ((np.float64(s) - y) ** 2).sum(-1)
    d_t = ((np.float64(t) - y) ** 2).sum(-1)
    return np.where(where & (d_s + m > d_t), d_s, 0.0)


def pair64(z):
    return np.stack([np.zeros_like(z), z], -1)


def reference(aux, teacher, cfg, hint=None):
    """Every distillation term of chen_loss in float64."""
    out, rpn, roi = aux["outputs"], aux["rpn"], aux["roi"]
    b = out["rpn_logits"].shape[0]
    rpn_norm, roi_norm = b * RPN_BS, max(roi.valid.sum(), 1)
    pick = lambda d: np.take_along_axis(np.asarray(d), roi.classes[..., None, None], 2)[:, :, 0]  # noqa: E731
    ref = {
        "rpn_cls_soft": soft64(pair64(out["rpn_logits"]), pair64(teacher["rpn_logits"]), rpn.sampled,
                               cfg.background_weight, cfg.temperature).sum() / rpn_norm,
        "rpn_box_bounded": bounded64(out["rpn_deltas"], teacher["rpn_deltas"], rpn.deltas, rpn.positive,
                                     cfg.margin).sum() / rpn_norm,
        "roi_cls_soft": soft64(out["roi_logits"], teacher["roi_logits"], roi.valid, cfg.background_weight,
                               cfg.temperature).sum() / roi_norm,
        "roi_box_bounded": bounded64(pick(out["roi_deltas"]), pick(teacher["roi_deltas"]), roi.deltas, roi.positive,
                                     cfg.margin).sum() / roi_norm,
    }
    if hint is not None:
        diff = (np.float64(hint[0]) - hint[1]) ** 2
        per_image = 0.5 * (diff.sum((1, 2, 3)) if cfg.hint_reduction == "sum" else diff.mean((1, 2, 3)))
        ref["hint"] = per_image.mean()
    return ref


@pytest.mark.parametrize("cfg", [D.ChenConfig(),
                                 D.ChenConfig(mu=0.3, background_weight=2.0, temperature=2.0, nu=0.7, margin=0.5,
                                              hint_weight=0.25, hint_reduction="mean")])
def test_terms_match_float64_reference(cfg):
    aux, teacher = hand_made()
    adapted = np.random.default_rng(1).normal(size=teacher["tap"].shape).astype(np.float32)
    got = D.chen_loss(aux, teacher, cfg, rpn_batch_size=RPN_BS, hint=(adapted, teacher["tap"]))
    ref = reference(aux, teacher, cfg, hint=(adapted, teacher["tap"]))
    for key, value in ref.items():
        np.testing.assert_allclose(float(got[key]), value, rtol=2e-5, atol=1e-7, err_msg=key)
        assert got[key].dtype == jnp.float32
    for key in ("rpn_box_bounded", "roi_box_bounded", "rpn_cls_soft", "roi_cls_soft", "hint"):
        assert ref[key] > 0, key  # the hand-made case exercises every term
    hard = {k: float(v) for k, v in aux["terms"].items()}
    for stage in ("rpn", "roi"):
        np.testing.assert_allclose(float(got[f"{stage}_cls"]), cfg.mu * hard[f"{stage}_cls"]
                                   + (1 - cfg.mu) * ref[f"{stage}_cls_soft"], rtol=2e-5)
        np.testing.assert_allclose(float(got[f"{stage}_box"]), hard[f"{stage}_box"]
                                   + cfg.nu * ref[f"{stage}_box_bounded"], rtol=2e-5)
    total = hard["total"] + sum(float(got[k]) - hard[k] for k in ("rpn_cls", "rpn_box", "roi_cls", "roi_box"))
    np.testing.assert_allclose(float(got["total"]), total + cfg.hint_weight * ref["hint"], rtol=2e-5)


def test_student_equals_teacher():
    aux, _ = hand_made()
    teacher = aux["outputs"]
    got = D.chen_loss(aux, teacher, rpn_batch_size=RPN_BS, hint=(teacher["tap"], teacher["tap"]))
    # the bounded terms and the hint vanish (d_s + 0 > d_t is false when d_s = d_t)
    for key in ("rpn_box_bounded", "roi_box_bounded", "hint"):
        assert float(got[key]) == 0.0, key
    for stage in ("rpn", "roi"):
        assert float(got[f"{stage}_box"]) == float(aux["terms"][f"{stage}_box"])
    # the soft terms are the teacher's weighted entropy (Chen et al.'s loss is a cross-entropy, not a KL)
    ref = reference(aux, teacher, D.ChenConfig())
    for key in ("rpn_cls_soft", "roi_cls_soft"):
        np.testing.assert_allclose(float(got[key]), ref[key], rtol=2e-5)
    # with w0 = 1 that is the minimum: no gradient at student == teacher
    cfg = D.ChenConfig(background_weight=1.0, hint_weight=0.0)

    def soft(logits):
        out = {**aux["outputs"], "rpn_logits": logits[0], "roi_logits": logits[1]}
        terms = D.chen_loss({**aux, "outputs": out}, teacher, cfg, rpn_batch_size=RPN_BS)
        return terms["rpn_cls_soft"] + terms["roi_cls_soft"]

    grads = jax.grad(soft)((teacher["rpn_logits"], teacher["roi_logits"]))
    for g in grads:
        np.testing.assert_allclose(g, 0.0, atol=1e-7)
    # and with a background weight the minimum moves off the teacher
    cfg = dataclasses.replace(cfg, background_weight=1.5)
    assert float(jnp.abs(jax.grad(soft)((teacher["rpn_logits"], teacher["roi_logits"]))[1]).max()) > 1e-3


def test_ablation_switches_parts_off():
    aux, teacher = hand_made()
    hint = (teacher["tap"] + 1.0, teacher["tap"])
    none = D.chen_loss(aux, teacher, D.ablation(), rpn_batch_size=RPN_BS, hint=hint)
    np.testing.assert_allclose(float(none["total"]), float(aux["terms"]["total"]), rtol=1e-6)
    full = D.chen_loss(aux, teacher, D.ablation(*D.PARTS), rpn_batch_size=RPN_BS, hint=hint)
    assert D.ablation(*D.PARTS) == D.ChenConfig()
    for part, changed in (("soft", ("rpn_cls", "roi_cls")), ("bounded", ("rpn_box", "roi_box")), ("hint", ())):
        one = D.chen_loss(aux, teacher, D.ablation(part), rpn_batch_size=RPN_BS, hint=hint)
        for key in ("rpn_cls", "rpn_box", "roi_cls", "roi_box"):
            expect = full[key] if key in changed else none[key]
            np.testing.assert_allclose(float(one[key]), float(expect), rtol=1e-6, err_msg=(part, key))
    one = D.chen_loss(aux, teacher, D.ablation("hint"), rpn_batch_size=RPN_BS, hint=hint)
    np.testing.assert_allclose(float(one["total"] - none["total"]), float(one["hint"]), rtol=1e-5)
    # RoI head only: the RPN keeps its hard terms with weight 1
    roi_only = D.chen_loss(aux, {k: v for k, v in teacher.items() if k.startswith("roi")},
                           D.ChenConfig(distill_rpn=False, hint_weight=0.0), rpn_batch_size=RPN_BS)
    assert float(roi_only["rpn_cls"]) == float(aux["terms"]["rpn_cls"]) and float(roi_only["rpn_cls_soft"]) == 0.0
    assert float(roi_only["rpn_box"]) == float(aux["terms"]["rpn_box"])


def test_background_weight():
    aux, teacher = hand_made()
    soft = {w0: D.chen_loss(aux, teacher, D.ChenConfig(background_weight=w0, hint_weight=0.0),
                            rpn_batch_size=RPN_BS) for w0 in (1.0, 1.5, 3.0)}
    out, rpn, roi = aux["outputs"], aux["rpn"], aux["roi"]
    # L_soft is linear in w0: each step of w0 adds sum p_t,0 (-log p_s,0) over the kept rows
    for key, s, t, where, norm in (
            ("rpn_cls_soft", pair64(out["rpn_logits"]), pair64(teacher["rpn_logits"]), rpn.sampled, 2 * RPN_BS),
            ("roi_cls_soft", out["roi_logits"], teacher["roi_logits"], roi.valid, roi.valid.sum())):
        background = np.where(where, -np.exp(log_softmax64(t, 1.0))[..., 0] * log_softmax64(s, 1.0)[..., 0], 0)
        slope = background.sum() / norm
        assert slope > 0
        np.testing.assert_allclose(float(soft[1.5][key] - soft[1.0][key]), 0.5 * slope, rtol=1e-4)
        np.testing.assert_allclose(float(soft[3.0][key] - soft[1.0][key]), 2.0 * slope, rtol=1e-4)


def test_masks_respected():
    aux, teacher = hand_made()
    base = D.chen_loss(aux, teacher, rpn_batch_size=RPN_BS, hint=(teacher["tap"], teacher["tap"]))
    rpn, roi = aux["rpn"], aux["roi"]

    def poison(outputs):  # NaN wherever no distillation term may read
        out = dict(outputs)
        out["rpn_logits"] = np.where(rpn.sampled, out["rpn_logits"], np.nan)
        out["rpn_deltas"] = np.where(rpn.positive[..., None], out["rpn_deltas"], np.nan)
        out["roi_logits"] = np.where(roi.valid[..., None], out["roi_logits"], np.nan)
        out["roi_deltas"] = np.where(roi.positive[..., None, None], out["roi_deltas"], np.nan)
        return out

    poisoned_teacher = poison(teacher)
    student = poison(aux["outputs"])
    kd_keys = ("rpn_cls_soft", "rpn_box_bounded", "roi_cls_soft", "roi_box_bounded")

    def kd(student_out):
        a = {**aux, "outputs": student_out}
        terms = {**D.rpn_terms(a, poisoned_teacher, D.ChenConfig(), RPN_BS), **D.roi_terms(a, poisoned_teacher,
                                                                                           D.ChenConfig())}
        return sum(terms[k] for k in kd_keys), terms

    (total, terms), grads = jax.value_and_grad(kd, has_aux=True)(
        {k: jnp.asarray(v) for k, v in student.items()})
    for key in kd_keys:
        assert float(terms[key]) == pytest.approx(float(base[key]), rel=1e-6), key
    assert np.isfinite(float(total))
    for key in ("rpn_logits", "rpn_deltas", "roi_logits", "roi_deltas"):
        g = np.asarray(grads[key])
        assert np.isfinite(g).all(), key
    np.testing.assert_array_equal(np.asarray(grads["rpn_logits"])[~rpn.sampled], 0.0)
    np.testing.assert_array_equal(np.asarray(grads["rpn_deltas"])[~rpn.positive], 0.0)
    np.testing.assert_array_equal(np.asarray(grads["roi_logits"])[~roi.valid], 0.0)


def test_gradients_finite_and_teacher_frozen():
    aux, teacher = hand_made()
    adapted = teacher["tap"] + 0.5

    @jax.jit
    def total(student_out, teacher_out, adapted):
        a = {**aux, "outputs": student_out}
        return D.chen_loss(a, teacher_out, rpn_batch_size=RPN_BS, hint=(adapted, teacher_out["tap"]))["total"]

    student = {k: jnp.asarray(v) for k, v in aux["outputs"].items()}
    teacher_j = {k: jnp.asarray(v) for k, v in teacher.items()}
    g_student, g_teacher, g_adapted = jax.grad(total, argnums=(0, 1, 2))(student, teacher_j, jnp.asarray(adapted))
    for key in ("rpn_logits", "rpn_deltas", "roi_logits", "roi_deltas"):
        assert np.isfinite(np.asarray(g_student[key])).all() and float(jnp.abs(g_student[key]).max()) > 0, key
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_teacher))  # stop_gradient
    np.testing.assert_allclose(g_adapted, 0.5 / adapted.shape[0] * D.ChenConfig().hint_weight, rtol=1e-5)  # (V - Z) / B


def test_errors():
    aux, teacher = hand_made()
    hint = (teacher["tap"], teacher["tap"])
    extra = {**teacher, "roi_logits": np.zeros((2, 5, K + 2), np.float32)}
    with pytest.raises(ValueError, match="teacher has 3 foreground classes but the student has 2"):
        D.chen_loss(aux, extra, rpn_batch_size=RPN_BS, hint=hint)
    fewer = {**teacher, "anchors": teacher["anchors"][:4], "rpn_logits": teacher["rpn_logits"][:, :4]}
    with pytest.raises(ValueError, match=r"teacher's RPN has anchors of shape \(4, 4\) but the student's has "
                                         r"\(6, 4\).*distill_rpn=False"):
        D.chen_loss(aux, fewer, rpn_batch_size=RPN_BS, hint=hint)
    with pytest.raises(ValueError, match="anchors differ from the student's"):
        D.chen_loss(aux, {**teacher, "anchors": teacher["anchors"] * 2}, rpn_batch_size=RPN_BS, hint=hint)
    with pytest.raises(ValueError, match="scored RoIs of shape"):
        D.chen_loss(aux, {**teacher, "roi_logits": teacher["roi_logits"][:, :3]}, rpn_batch_size=RPN_BS, hint=hint)
    with pytest.raises(ValueError, match="no hint was given"):
        D.chen_loss(aux, teacher, rpn_batch_size=RPN_BS)
    with pytest.raises(ValueError, match=r"adaptation layer must output the teacher's channels"):
        D.chen_loss(aux, teacher, rpn_batch_size=RPN_BS, hint=(teacher["tap"][..., :2], teacher["tap"]))
    for bad in (dict(mu=1.5), dict(background_weight=-1.0), dict(temperature=0.0), dict(nu=-0.1),
                dict(margin=float("inf")), dict(hint_weight=-1.0), dict(hint_reduction="max")):
        with pytest.raises(ValueError, match=f"ChenConfig: {next(iter(bad))} must be"):
            D.ChenConfig(**bad)
    with pytest.raises(ValueError, match=r"unknown distillation part\(s\) \['logits'\]"):
        D.ablation("soft", "logits")


SMALL = dict(num_proposals=16, pre_nms_topk=64)


@functools.partial(jax.jit, static_argnums=0)
def _init(model, key):
    return model.init(key, jnp.zeros((1, 16, 16, 3)))


def test_on_the_detector_student_equals_teacher():
    """The real forward, jitted: with the teacher = the student, only the soft terms remain (a margin of
    -1e-6 keeps the bounded loss, a step function of d_s - d_t, off float rounding between the two forwards)."""
    model = M.create("tiny", K, **SMALL)
    variables = _init(model, jax.random.key(0))
    images = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))
    gt_boxes = np.array([[[4, 4, 30, 30], [30, 30, 60, 62]], [[10, 10, 40, 40], [0, 0, 1, 1]]], np.float32)
    gt_labels = np.array([[0, 1], [1, 0]], np.int32)
    gt_valid = np.array([[True, True], [True, False]])
    D.check_same_anchors(model.anchors((64, 64)), model.anchors((64, 64)))
    with pytest.raises(ValueError, match="anchors differ"):
        D.check_same_anchors(model.anchors((64, 64)),
                             M.create("small", K, anchor_sizes=(8.0, 16.0, 32.0)).anchors((64, 64)))

    @jax.jit
    def run(variables):
        def loss(variables):
            _, aux = T.detector_loss(model, variables, images, gt_boxes, gt_labels, gt_valid, jax.random.key(2),
                                     rpn_batch_size=32, roi_batch_size=16)
            teacher = M.teacher_on_rois(model, variables, images, aux["roi"].rois, K, roi_valid=aux["roi"].valid)
            terms = D.chen_loss(aux, teacher, D.ChenConfig(margin=-1e-6), rpn_batch_size=32,
                                hint=(aux["outputs"]["tap"], teacher["tap"]))
            return terms["total"], terms
        return jax.value_and_grad(loss, has_aux=True)(variables)

    (_, terms), grads = run(variables)
    for key in ("rpn_box_bounded", "roi_box_bounded"):
        assert float(terms[key]) == 0.0, key
    assert float(terms["hint"]) < 1e-10
    assert float(terms["rpn_cls_soft"]) > 0 and float(terms["roi_cls_soft"]) > 0
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
