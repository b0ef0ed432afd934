"""kdjax.models: registry, shapes/dtypes/feature taps, parameter counts, BatchNorm modes, adapters."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import models
from kdjax.models import resnet as resnet_lib

# rbg keys: compiling a threefry-based model.init is several times slower on CPU.
KEY = jax.random.key(0, impl="rbg")


def n_params(tree):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def abstract_init(model, shape):
    return jax.eval_shape(lambda: model.init(KEY, jnp.zeros(shape)))


# ----------------------------------------------------------------------------- registry / create

REQUIRED = {"resnet18", "resnet34", "resnet50", "cifar_resnet20", "cifar_resnet56", "cifar_resnet110",
            "wrn_16_2", "wrn_40_2", "mlp", "cnn1d", "cnn2d", "cnn1d_thin_deep", "cnn2d_thin_deep"}


def test_list_models_has_the_required_names():
    names = models.list_models()
    assert REQUIRED <= set(names)
    assert list(names) == sorted(names)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"Unknown model name 'resnet19'\. Valid names: .*cifar_resnet20.*"
                                         r"resnet18.*wrn_40_2"):
        models.create("resnet19", 10)


def test_generic_depth_and_width_names():
    m = models.create("cifar_resnet8", 10)
    assert isinstance(m, models.CifarResNet) and m.depth == 8
    w = models.create("wrn_22_3", 100, dropout_rate=0.3)
    assert (w.depth, w.widen_factor, w.num_classes, w.dropout_rate) == (22, 3, 100, 0.3)


@pytest.mark.parametrize("name, kwargs, exc, pattern", [
    ("resnet18", {"num_classes": 0}, ValueError, r"create\('resnet18'\): num_classes must be an integer >= 1; got 0"),
    ("resnet18", {"num_classes": 2.0}, ValueError, r"num_classes must be an integer >= 1; got 2\.0"),
    ("resnet18", {"num_classes": 10, "widen_factor": 3}, TypeError,
     r"create\('resnet18'\): unexpected keyword argument\(s\) \['widen_factor'\]; ResNet accepts "
     r"\['conv', 'dtype', 'param_dtype', 'stem', 'width', 'zero_init_residual'\]"),
    ("resnet18", {"num_classes": 10, "depth": 50}, TypeError, r"unexpected keyword argument\(s\) \['depth'\]"),
    ("wrn_16_2", {"num_classes": 10, "widen_factor": 4}, TypeError, r"\['widen_factor'\]"),
    ("cifar_resnet21", {"num_classes": 10}, ValueError, r"depth must be 6n \+ 2 .*got depth=21"),
    ("wrn_15_2", {"num_classes": 10}, ValueError, r"WRN depth must be 6n \+ 4 .*got depth=15"),
    ("wrn_16_0", {"num_classes": 10}, ValueError, r"widen_factor must be an integer >= 1; got 0"),
    ("wrn_16_2", {"num_classes": 10, "dropout_rate": 1.0}, ValueError, r"dropout_rate must be in \[0, 1\); got 1\.0"),
    ("cnn1d", {"num_classes": 10, "depth": 4}, ValueError, r"CNN1D: depth .* multiple of 3; got depth=4"),
    ("cnn2d", {"num_classes": 10, "depth": 3}, ValueError, r"CNN2D: depth .* multiple of 2; got depth=3"),
    ("mlp", {"num_classes": 10, "width": 0}, ValueError, r"MLP: width must be an integer >= 1; got width=0"),
])
def test_create_errors(name, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        models.create(name, **kwargs)


@pytest.mark.parametrize("width", [0, -8, 2.5, True, "32"])
def test_resnet_rejects_bad_width(width):
    with pytest.raises(ValueError, match=r"ResNet width \(stem channels; stages get width \* \(1, 2, 4, 8\)\) "
                                         r"must be an integer >= 1, e.g\. 64 \(torchvision\) or 32 .*"
                                         rf"got width={re.escape(repr(width))}\."):
        models.create("resnet18", 10, width=width)


def test_resnet_rejects_bad_depth():
    with pytest.raises(ValueError, match=r"ResNet depth must be one of \[18, 34, 50, 101, 152\]; got depth=19"):
        models.ResNet(depth=19)


@pytest.mark.parametrize("name, shape, layout", [
    ("resnet18", (2, 32, 32), r"\[B, H, W, C\] \(NHWC\); got shape \(2, 32, 32\)"),
    ("cifar_resnet20", (32, 32, 3), r"\[B, H, W, C\]"),
    ("wrn_16_2", (2, 32, 32), r"\[B, H, W, C\]"),
    ("cnn1d", (2, 40, 1, 1), r"CNN1D expects input x of shape \[B, L\] or \[B, L, C\]; got shape \(2, 40, 1, 1\)"),
    ("cnn2d", (2, 8), r"CNN2D expects input x of shape \[B, H, W\] or \[B, H, W, C\]"),
    ("mlp", (5,), r"MLP expects input x of shape \[B, \.\.\.\]; got shape \(5,\)"),
])
def test_bad_input_rank(name, shape, layout):
    with pytest.raises(ValueError, match=layout):
        abstract_init(models.create(name, 10), shape)


# ------------------------------------------------------------- shapes, dtypes, taps for every name

def family(name):
    if name.startswith("resnet"):
        return "resnet"
    if name.startswith(("cifar_resnet", "wrn")):
        return "cifar"
    return name.split("_")[0]


INPUT = {"resnet": (2, 32, 32, 3), "cifar": (2, 32, 32, 3), "mlp": (2, 40, 1), "cnn1d": (2, 40, 1),
         "cnn2d": (2, 8, 8, 1)}


def expected_taps(model, name):
    """Feature shapes derived from each architecture's definition for the INPUT shapes above."""
    b = 2
    fam = family(name)
    if fam == "resnet":
        e = 4 if model.depth >= 50 else 1
        return {"stem": (b, 8, 8, 64), "stage1": (b, 8, 8, 64 * e), "stage2": (b, 4, 4, 128 * e),
                "stage3": (b, 2, 2, 256 * e), "stage4": (b, 1, 1, 512 * e), "pre_logits": (b, 512 * e)}
    if fam == "cifar":
        k = getattr(model, "widen_factor", 1)
        return {"stem": (b, 32, 32, 16), "stage1": (b, 32, 32, 16 * k), "stage2": (b, 16, 16, 32 * k),
                "stage3": (b, 8, 8, 64 * k), "pre_logits": (b, 64 * k)}
    w = model.width
    if fam == "mlp":
        return {**{f"stage{i + 1}": (b, w) for i in range(model.depth)}, "pre_logits": (b, w)}
    if fam == "cnn1d":  # 40 -> 19 (k5 s2 p1) -> 10 -> 5
        return {"stage1": (b, 19, w), "stage2": (b, 10, w), "stage3": (b, 5, w), "pre_logits": (b, 5 * w)}
    return {"stage1": (b, 8, 8, w), "stage2": (b, 4, 4, 2 * w), "pre_logits": (b, 2 * w)}


# bf16 on one name per model class and block type (the dtype plumbing is per class).
BF16_NAMES = ("resnet18", "resnet50", "cifar_resnet20", "wrn_16_2", "mlp", "cnn1d", "cnn2d_thin_deep")


@pytest.mark.parametrize("name, dtype", [(n, jnp.float32) for n in models.list_models()] +
                         [(n, jnp.bfloat16) for n in BF16_NAMES])
def test_every_model_shapes_dtypes_and_taps(name, dtype):
    model = models.create(name, 7, dtype=dtype)
    shape = INPUT[family(name)]
    variables = abstract_init(model, shape)
    has_bn = family(name) in ("resnet", "cifar")
    assert set(variables) == ({"params", "batch_stats"} if has_bn else {"params"})
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    logits, feats = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, jnp.zeros(shape))
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32
    want = expected_taps(model, name)
    assert {k: v.shape for k, v in feats.items()} == want
    for k, v in feats.items():
        assert v.dtype == (jnp.float32 if k == "pre_logits" else dtype), k


def test_param_dtype_bf16():
    model = models.create("resnet18", 10, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    variables = abstract_init(model, (1, 32, 32, 3))
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(variables["params"]))
    logits, _ = jax.eval_shape(model.apply, variables, jnp.zeros((1, 32, 32, 3)))
    assert logits.dtype == jnp.float32


# --------------------------------------------------------------------------------- parameter counts

@pytest.mark.parametrize("name, count", [("resnet18", 11_689_512), ("resnet34", 21_797_672),
                                         ("resnet50", 25_557_032), ("resnet101", 44_549_160),
                                         ("resnet152", 60_192_808)])
def test_resnet_param_counts_equal_torchvision(name, count):
    assert n_params(abstract_init(models.create(name, 1000), (1, 32, 32, 3))["params"]) == count


def resnet_param_shapes(depth, width, num_classes, stem="imagenet"):
    """torchvision's ResNet parameters (``state_dict`` minus running stats) at any stem width, as
    ``{kdjax param path: kdjax shape}``, enumerated from the architecture (He et al. Table 1)."""
    sizes = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    e = 4 if depth >= 50 else 1
    shapes = {}

    def conv(path, k, cin, cout):
        shapes[path + ("kernel",)] = (k, k, cin, cout)

    def bn(path, c):
        shapes[path + ("scale",)] = shapes[path + ("bias",)] = (c,)

    conv(("conv1",), 7 if stem == "imagenet" else 3, 3, width)
    bn(("bn1",), width)
    cin = width
    for i, n in enumerate(sizes):
        c = width * 2 ** i
        for j in range(n):
            b = (f"layer{i + 1}_{j}",)
            convs = ([(1, cin, c), (3, c, c), (1, c, 4 * c)] if e == 4 else [(3, cin, c), (3, c, c)])
            for m, (k, ci, co) in enumerate(convs, 1):
                conv(b + (f"conv{m}",), k, ci, co)
                bn(b + (f"bn{m}",), co)
            if (i > 0 and j == 0) or cin != c * e:
                conv(b + ("downsample_0",), 1, cin, c * e)
                bn(b + ("downsample_1",), c * e)
            cin = c * e
    shapes[("fc", "kernel")] = (cin, num_classes)
    shapes[("fc", "bias")] = (num_classes,)
    return shapes


def param_shapes(tree):
    return {tuple(k.key for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("depth, count", [(18, 11_689_512), (50, 25_557_032), (101, 44_549_160)])
def test_resnet_shape_table_reproduces_torchvision_counts(depth, count):
    # Validates the independent enumeration used below against torchvision's published sizes.
    assert sum(math.prod(s) for s in resnet_param_shapes(depth, 64, 1000).values()) == count


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("width", [16, 64])
def test_resnet_width_param_tree(depth, width):
    kwargs = {} if width == 64 else {"width": width}  # the default is width 64
    model = models.create(f"resnet{depth}", 10, stem="cifar", **kwargs)
    got = param_shapes(abstract_init(model, (2, 16, 16, 3))["params"])
    assert got == resnet_param_shapes(depth, width, 10, stem="cifar")


def test_resnet_width16_hand_counted_size():
    # ResNet-18, width 16, CIFAR stem, 10 classes, counted by hand (kernels + BN scale/bias + fc):
    #   stem 3*3*3*16 + 2*16 = 464; stage1 2 blocks * 2 * (9*16*16 + 32) = 9_344;
    #   stage2 (9*16*32 + 9*32*32 + 128 + 16*32 + 64) + (2 * 9*32*32 + 128) = 14_528 + 18_560 = 33_088;
    #   stage3 (9*32*64 + 9*64*64 + 256 + 32*64 + 128) + (2 * 9*64*64 + 256) = 57_728 + 73_984 = 131_712;
    #   stage4 (9*64*128 + 9*128*128 + 512 + 64*128 + 256) + (2 * 9*128*128 + 512) = 230_144 + 295_424
    #   = 525_568; fc 128*10 + 10 = 1_290. Total 701_466.
    model = models.create("resnet18", 10, stem="cifar", width=16)
    assert n_params(abstract_init(model, (2, 16, 16, 3))["params"]) == 701_466


@pytest.mark.parametrize("depth, e", [(18, 1), (50, 4)])
def test_resnet_width_feature_taps(depth, e):
    model = models.create(f"resnet{depth}", 10, stem="cifar", width=16)
    x = jnp.zeros((2, 32, 32, 3))
    (logits, feats), variables = jax.eval_shape(lambda: model.init_with_output(KEY, x))
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert {k: v.shape for k, v in feats.items()} == {
        "stem": (2, 32, 32, 16), "stage1": (2, 32, 32, 16 * e), "stage2": (2, 16, 16, 32 * e),
        "stage3": (2, 8, 8, 64 * e), "stage4": (2, 4, 4, 128 * e), "pre_logits": (2, 128 * e)}
    assert param_shapes(variables["batch_stats"]) == {
        k[:-1] + (s,): v for k, v in resnet_param_shapes(depth, 16, 10, "cifar").items()
        if k[0] != "fc" and k[-1] == "scale" for s in ("mean", "var")}


def test_thin_deep_resnet_builds_from_a_config_model_spec():
    from experiments import validate
    model = validate.build_model("resnet101:width=32", 1000)
    assert isinstance(model, models.ResNet) and (model.depth, model.width) == (101, 32)
    assert model == models.create("resnet101", 1000, width=32)
    x = jnp.zeros((1, 32, 32, 3))
    variables = abstract_init(model, x.shape)
    assert param_shapes(variables["params"]) == resnet_param_shapes(101, 32, 1000)
    _, feats = jax.eval_shape(model.apply, variables, x)
    assert feats["stem"].shape == (1, 8, 8, 32) and feats["stage2"].shape == (1, 4, 4, 256)
    assert feats["pre_logits"].shape == (1, 1024)
    with pytest.raises(validate.ConfigError, match=r"config\.student\.model='resnet50:width=0': "
                                                   r"ResNet width .* got width=0\."):
        validate.build_model("resnet50:width=0", 1000)


def cifar_resnet_count(depth, c):
    """Conv weights + BN (scale, bias) + fc of a CIFAR ResNet with option-B shortcuts."""
    n = (depth - 2) // 6
    total = 3 * 16 * 9 + 2 * 16
    cin = 16
    for w in (16, 32, 64):
        for j in range(n):
            total += 9 * cin * w + 9 * w * w + 4 * w
            if cin != w:
                total += cin * w + 2 * w
            cin = w
    return total + 64 * c + c


def wrn_count(depth, k, c):
    n = (depth - 4) // 6
    total = 3 * 16 * 9
    cin = 16
    for w in (16 * k, 32 * k, 64 * k):
        for j in range(n):
            total += 2 * cin + 9 * cin * w + 2 * w + 9 * w * w + (cin * w if cin != w else 0)
            cin = w
    return total + 2 * cin + cin * c + c


@pytest.mark.parametrize("name", [n for n in models.list_models() if family(n) == "cifar"])
def test_cifar_param_counts(name):
    model = models.create(name, 10)
    got = n_params(abstract_init(model, (1, 32, 32, 3))["params"])
    if name.startswith("wrn"):
        assert got == wrn_count(model.depth, model.widen_factor, 10)
    else:
        assert got == cifar_resnet_count(model.depth, 10)


def test_cifar_resnet20_is_027m_and_wrn_sizes():
    assert cifar_resnet_count(20, 10) == 272_474  # ~0.27M (option A would be 269,722)
    assert n_params(abstract_init(models.create("cifar_resnet20", 10), (1, 32, 32, 3))["params"]) == 272_474
    # Published sizes: WRN-40-2 ~2.2M, WRN-28-10 ~36.5M (Zagoruyko & Komodakis, Table 1 / 4).
    assert wrn_count(40, 2, 10) == 2_243_546
    assert round(wrn_count(28, 10, 10) / 1e6, 1) == 36.5


def test_small_model_param_counts():
    def count(name, **kw):
        return n_params(abstract_init(models.create(name, 10, **kw), INPUT[family(name)])["params"])
    assert count("mlp") == 40 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10
    assert count("cnn1d") == (5 * 25 + 25) + 2 * (3 * 25 * 25 + 25) + (125 * 10 + 10)
    assert count("cnn2d") == (9 * 32 + 32) + (9 * 32 * 64 + 64) + (64 * 10 + 10)
    # thin-and-deep students are deeper and smaller than the default teachers
    assert count("cnn1d_thin_deep") < count("cnn1d")
    assert models.create("cnn1d_thin_deep", 10).depth > models.create("cnn1d", 10).depth
    assert count("cnn2d_thin_deep") < count("cnn2d")
    assert count("mlp_thin_deep") < count("mlp")
    assert count("cnn1d", width=64) > count("cnn1d", width=32) > count("cnn1d")


# ------------------------------------------------------------------ numerics, BatchNorm, gradients

def random_variables(model, shape, seed=0):
    """Init-like variables drawn in NumPy (He-normal kernels, N(0, 0.01) biases, BN scale 1, running
    mean 0 / var 1): avoids compiling a big ``model.init`` (slow on CPU) in tests that only need values."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / math.prod(leaf.shape[:-1]))).astype(np.float32)
        if name == "bias":
            return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
        return (np.ones if name in ("scale", "var") else np.zeros)(leaf.shape, np.float32)
    return jax.tree_util.tree_map_with_path(draw, abstract_init(model, shape))


def test_resnet18_train_vs_eval_batch_stats_and_grads():
    model = models.create("resnet18", 10)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = random_variables(model, x.shape)
    stats = variables["batch_stats"]
    is_stem_conv = lambda mdl, _: mdl.name == "conv1" and isinstance(mdl.parent, models.ResNet)

    def loss(params):
        (logits, _), upd = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                       mutable=["batch_stats", "intermediates"],
                                       capture_intermediates=is_stem_conv)
        return -jnp.mean(jax.nn.log_softmax(logits)[:, 0]), (logits, upd)

    (_, (logits_t, upd)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(g).all() for g in leaves)
    assert all(np.abs(g).max() > 0 for g in leaves)

    new_stats = upd["batch_stats"]
    # Every running statistic moved in train mode.
    for old, new in zip(jax.tree.leaves(stats), jax.tree.leaves(new_stats)):
        assert not np.allclose(old, new)
    # momentum 0.9: running = 0.9 * running + 0.1 * batch (mean starts at 0, var at 1; biased var).
    conv1 = np.asarray(upd["intermediates"]["conv1"]["__call__"][0], np.float64)
    np.testing.assert_allclose(new_stats["bn1"]["mean"], 0.1 * conv1.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new_stats["bn1"]["var"], 0.9 + 0.1 * conv1.var(axis=(0, 1, 2)), rtol=1e-4)

    # Eval mode reads but never writes the running statistics.
    (logits_e, _), upd_e = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["batch_stats"]))(
        variables, x)
    for old, new in zip(jax.tree.leaves(stats), jax.tree.leaves(upd_e["batch_stats"])):
        np.testing.assert_array_equal(old, new)
    assert np.isfinite(logits_e).all()
    assert not np.allclose(logits_t, logits_e)


def test_bn_momentum_and_epsilon_are_torchvisions():
    bn = resnet_lib.batch_norm(True, jnp.float32, jnp.float32, "bn")
    assert (bn.momentum, bn.epsilon, bn.use_running_average) == (0.9, 1e-5, False)
    assert resnet_lib.batch_norm(False, jnp.float32, jnp.float32, "bn").use_running_average


def test_zero_init_residual():
    x = jnp.ones((1, 4, 4, 8))
    blocks = [(block, last, zero) for block, last in ((resnet_lib.BasicBlock, "bn2"), (resnet_lib.Bottleneck, "bn3"))
              for zero in (False, True)]
    inits = jax.jit(lambda k: [block(4, strides=2, downsample=True, zero_init_residual=zero).init(k, x, train=False)
                               for block, _, zero in blocks])(KEY)
    for (_, last, zero), v in zip(blocks, inits):
        np.testing.assert_array_equal(v["params"][last]["scale"], 0.0 if zero else 1.0)
        np.testing.assert_array_equal(v["params"]["bn1"]["scale"], 1.0)
        np.testing.assert_array_equal(v["params"]["downsample_1"]["scale"], 1.0)
    model = models.create("cifar_resnet8", 10, zero_init_residual=True)
    v = jax.jit(model.init)(KEY, jnp.zeros((1, 8, 8, 3)))
    assert all(np.all(v["params"][f"layer{i}_0"]["bn2"]["scale"] == 0) for i in (1, 2, 3))
    np.testing.assert_array_equal(v["params"]["bn1"]["scale"], 1.0)


def test_bf16_compute_close_to_f32():
    x = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
    f32 = models.create("cifar_resnet8", 10)
    bf16 = models.create("cifar_resnet8", 10, dtype=jnp.bfloat16)
    variables = random_variables(f32, x.shape)
    l32, _ = jax.jit(f32.apply)(variables, x)
    l16, f_16 = jax.jit(bf16.apply)(variables, x)
    assert l16.dtype == jnp.float32 and f_16["stage3"].dtype == jnp.bfloat16
    assert not np.array_equal(l16, l32)  # really computed in bf16
    np.testing.assert_allclose(l16, l32, atol=0.1 * np.abs(l32).max() + 1e-3)


def test_wrn_dropout_only_in_train():
    model = models.create("wrn_10_2", 10, dropout_rate=0.3)
    no_dropout = models.create("wrn_10_2", 10)  # same params, dropout disabled
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
    v = random_variables(model, x.shape)

    @jax.jit
    def outputs(v, x):
        train = lambda k: model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": k})[0][0]
        return (train(jax.random.key(10)), train(jax.random.key(11)), train(jax.random.key(10)),
                model.apply(v, x)[0], no_dropout.apply(v, x)[0])

    a, b, c, e, e_plain = outputs(v, x)
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(e, e_plain)  # eval: deterministic, needs no rng, dropout off
    assert not np.allclose(a, e)


# ------------------------------------------------------------------ small models vs NumPy float64

def np_conv1d(x, w, b, stride, pad):
    """x [B, L, Cin], w [K, Cin, Cout] (Flax layout), symmetric zero padding."""
    x = np.pad(x, ((0, 0), (pad, pad), (0, 0)))
    k = w.shape[0]
    win = np.lib.stride_tricks.sliding_window_view(x, k, axis=1)[:, ::stride]  # [B, Lo, Cin, K]
    return np.einsum("blck,kco->blo", win, w) + b


def f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def test_cnn1d_matches_numpy_and_accepts_both_input_ranks():
    model = models.create("cnn1d", 10)
    x = np.random.default_rng(0).standard_normal((3, 40)).astype(np.float32)
    v = random_variables(model, x.shape)
    p = f64(v["params"])
    h = x[..., None].astype(np.float64)
    h = np.maximum(np_conv1d(h, p["conv1"]["kernel"], p["conv1"]["bias"], 2, 1), 0)
    h = np.maximum(np_conv1d(h, p["conv2"]["kernel"], p["conv2"]["bias"], 2, 1), 0)
    h = np.maximum(np_conv1d(h, p["conv3"]["kernel"], p["conv3"]["bias"], 2, 1), 0)
    ref = h.reshape(3, -1) @ p["head"]["kernel"] + p["head"]["bias"]
    logits2, feats = jax.jit(model.apply)(v, x)
    logits3, _ = jax.jit(model.apply)(v, x[..., None])
    np.testing.assert_allclose(logits2, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(logits2, logits3)
    np.testing.assert_allclose(feats["stage3"], h, rtol=1e-5, atol=1e-5)


def test_mlp_matches_numpy_on_digits_shape():
    model = models.create("mlp", 10, width=16, depth=3)
    x = np.random.default_rng(1).standard_normal((4, 8, 8, 1)).astype(np.float32)
    v = random_variables(model, x.shape)
    p = f64(v["params"])
    h = x.reshape(4, -1).astype(np.float64)
    for i in (1, 2, 3):
        h = np.maximum(h @ p[f"dense{i}"]["kernel"] + p[f"dense{i}"]["bias"], 0)
    logits, feats = jax.jit(model.apply)(v, x)
    np.testing.assert_allclose(logits, h @ p["head"]["kernel"] + p["head"]["bias"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(feats["pre_logits"], h, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, shape", [("mlp_thin_deep", (4, 40, 1)), ("cnn1d_thin_deep", (4, 40)),
                                         ("cnn2d_thin_deep", (4, 8, 8))])
def test_small_models_jit_and_finite_grads(name, shape):
    model = models.create(name, 10)
    x = jax.random.normal(jax.random.key(4), shape)
    v = random_variables(model, x.shape)

    def loss(params):
        logits, _ = model.apply({"params": params}, x, train=True)
        return -jnp.mean(jax.nn.log_softmax(logits)[:, 1])

    value, grads = jax.jit(jax.value_and_grad(loss))(v["params"])
    assert np.isfinite(value)
    assert all(np.isfinite(g).all() and np.abs(g).max() > 0 for g in jax.tree.leaves(grads))


def np_conv2d(x, w, b, stride):
    """x [B, H, W, Cin], w [3, 3, Cin, Cout] (Flax layout), zero padding 1 on each side."""
    x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    win = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2))[:, ::stride, ::stride]
    return np.einsum("bhwcij,ijco->bhwo", win, w) + b


def test_cnn2d_matches_numpy():
    # depth 4: stage 1 = conv1, conv2 (width, stride 1); stage 2 = conv3 (2 * width, stride 2), conv4.
    model = models.create("cnn2d", 10, width=3, depth=4)
    x = np.random.default_rng(2).standard_normal((2, 8, 8, 1)).astype(np.float32)
    v = random_variables(model, x.shape)
    p = f64(v["params"])
    h = x.astype(np.float64)
    for i, stride in zip((1, 2, 3, 4), (1, 1, 2, 1)):
        h = np.maximum(np_conv2d(h, p[f"conv{i}"]["kernel"], p[f"conv{i}"]["bias"], stride), 0)
        if i == 2:
            stage1 = h
    pooled = h.mean(axis=(1, 2))
    logits, feats = jax.jit(model.apply)(v, x)
    assert p["conv3"]["kernel"].shape == (3, 3, 3, 6) and feats["stage2"].shape == (2, 4, 4, 6)
    np.testing.assert_allclose(feats["stage1"], stage1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(feats["pre_logits"], pooled, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits, pooled @ p["head"]["kernel"] + p["head"]["bias"], rtol=1e-5, atol=1e-5)


def test_cnn2d_accepts_both_input_ranks():
    model = models.create("cnn2d", 10)
    x = jax.random.normal(jax.random.key(5), (2, 8, 8))
    v = random_variables(model, x.shape)
    np.testing.assert_array_equal(jax.jit(model.apply)(v, x)[0], jax.jit(model.apply)(v, x[..., None])[0])


# --------------------------------------------------------------------------------------- adapters

@pytest.mark.parametrize("kwargs, shape, out", [
    (dict(features_out=64), (2, 4, 4, 32), (2, 4, 4, 64)),
    (dict(features_out=25), (2, 10, 8), (2, 10, 25)),
    (dict(features_out=16, kernel_size=3, padding="VALID"), (2, 6, 6, 8), (2, 4, 4, 16)),
    (dict(features_out=16, kernel_size=3), (2, 6, 6, 8), (2, 6, 6, 16)),
    (dict(features_out=128, kind="dense"), (2, 64), (2, 128)),
])
def test_regressor_shapes(kwargs, shape, out):
    r = models.Regressor(**kwargs)
    x = jnp.ones(shape)
    assert jax.eval_shape(r.apply, abstract_init(r, shape), x).shape == out


def test_regressor_1x1_conv_is_a_per_position_affine_map_and_relu():
    x = jax.random.normal(jax.random.key(6), (2, 3, 3, 5))
    r = models.Regressor(7)
    v = random_variables(r, x.shape)
    p = f64(v["params"]["conv"])
    ref = np.asarray(x, np.float64) @ p["kernel"][0, 0] + p["bias"]
    np.testing.assert_allclose(r.apply(v, x), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(models.Regressor(7, use_relu=True).apply(v, x), np.maximum(ref, 0),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, shape, pattern", [
    (dict(features_out=8, kind="mlp"), (2, 4), r"kind must be one of \('conv', 'dense'\); got kind='mlp'"),
    (dict(features_out=8, kind="dense", kernel_size=3), (2, 4), r"kernel_size must be 1, got 3"),
    (dict(features_out=0), (2, 4, 4, 3), r"features_out must be an integer >= 1; got 0"),
    (dict(features_out=8, kernel_size=0), (2, 4, 4, 3), r"kernel_size must be an integer >= 1; got 0"),
    (dict(features_out=8, padding="FULL"), (2, 4, 4, 3), r"padding must be 'SAME' or 'VALID'; got 'FULL'"),
    (dict(features_out=8), (2, 4), r"kind='conv' needs a feature map \[B, \*spatial, C\]; got shape \(2, 4\)"),
])
def test_regressor_errors(kwargs, shape, pattern):
    with pytest.raises(ValueError, match=pattern):
        abstract_init(models.Regressor(**kwargs), shape)


def test_with_regressor_small_models_fitnet_layout():
    teacher = models.create("cnn1d", 10, width=32)
    bare = models.create("cnn1d_thin_deep", 10)
    student = models.WithRegressor(bare, guided="stage2", hint_channels=32)
    x = jax.random.normal(jax.random.key(7), (3, 40))
    t_feats = jax.eval_shape(teacher.apply, abstract_init(teacher, x.shape), x)[1]
    v = jax.jit(student.init)(KEY, x)
    bare_v = abstract_init(bare, x.shape)
    # The model's params stay at the top level; the regressor adds one entry.
    assert set(v["params"]) == set(bare_v["params"]) | {"regressor"}
    logits, feats = student.apply(v, x)
    assert feats["stage2_regressed"].shape == t_feats["stage2"].shape == (3, 10, 32)
    assert set(feats) == set(t_feats) | {"stage2_regressed"}
    stripped = {"params": {k: p for k, p in v["params"].items() if k != "regressor"}}
    np.testing.assert_array_equal(logits, bare.apply(stripped, x)[0])
    np.testing.assert_array_equal(feats["stage2"], bare.apply(stripped, x)[1]["stage2"])


def test_with_regressor_resnet_hint_loss_trains_the_regressor():
    teacher = models.create("wrn_16_2", 10)
    student = models.WithRegressor(models.create("cifar_resnet8", 10), guided="stage2", hint_channels=64)
    x = jax.random.normal(jax.random.key(8), (2, 16, 16, 3))
    hint_shape = jax.eval_shape(teacher.apply, abstract_init(teacher, x.shape), x)[1]["stage2"].shape
    assert hint_shape == (2, 8, 8, 64)
    hint = jax.random.normal(jax.random.key(9), hint_shape)
    v = random_variables(student, x.shape)
    assert set(v) == {"params", "batch_stats"} and "regressor" not in v["batch_stats"]

    def hint_loss(params):
        (_, feats), upd = student.apply({"params": params, "batch_stats": v["batch_stats"]}, x, train=True,
                                        mutable=["batch_stats"])
        return 0.5 * jnp.mean((feats["stage2_regressed"] - hint) ** 2), upd

    (value, upd), grads = jax.jit(jax.value_and_grad(hint_loss, has_aux=True))(v["params"])
    assert np.isfinite(value) and value > 0
    assert np.abs(grads["regressor"]["conv"]["kernel"]).max() > 0
    assert np.abs(grads["layer2_0"]["conv1"]["kernel"]).max() > 0       # flows into the guided layers
    assert np.abs(grads["layer3_0"]["conv1"]["kernel"]).max() == 0      # and not above them
    assert not np.allclose(upd["batch_stats"]["bn1"]["mean"], v["batch_stats"]["bn1"]["mean"])


def test_with_regressor_dtype_follows_model():
    student = models.WithRegressor(models.create("cnn2d", 10, dtype=jnp.bfloat16), guided="stage1",
                                   hint_channels=12)
    x = jnp.ones((2, 8, 8, 1))
    v = abstract_init(student, x.shape)
    _, feats = jax.eval_shape(student.apply, v, x)
    assert feats["stage1_regressed"].shape == (2, 8, 8, 12)
    assert feats["stage1_regressed"].dtype == jnp.bfloat16


def test_with_regressor_unknown_guided_layer():
    student = models.WithRegressor(models.create("mlp", 10), guided="stage9", hint_channels=4, kind="dense")
    with pytest.raises(ValueError, match=r"guided='stage9' is not a feature of MLP; available: "
                                         r"\['pre_logits', 'stage1', 'stage2'\]"):
        abstract_init(student, (2, 40))


def test_resnet_cifar_stem_keeps_resolution_and_rejects_unknown_stem():
    model = models.create("resnet18", 10, stem="cifar")
    x = jnp.zeros((2, 32, 32, 3))
    (logits, feats), variables = jax.eval_shape(
        lambda: model.init_with_output(jax.random.PRNGKey(0), x))
    assert logits.shape == (2, 10)
    assert feats["stem"].shape == (2, 32, 32, 64) and feats["stage4"].shape == (2, 4, 4, 512)
    assert variables["params"]["conv1"]["kernel"].shape == (3, 3, 3, 64)
    with pytest.raises(ValueError, match="stem must be 'imagenet'.*or 'cifar'.*got stem='tiny'"):
        models.create("resnet18", 10, stem="tiny").init(jax.random.PRNGKey(0), x)


def test_cnn1d_norm_adds_batchnorm_before_each_relu():
    plain = models.create("cnn1d", 10, width=4)
    model = models.create("cnn1d", 10, width=4, norm=True)
    x = np.random.default_rng(2).standard_normal((6, 40)).astype(np.float32)
    v = model.init(jax.random.PRNGKey(0), x)
    assert sorted(v) == ["batch_stats", "params"] and sorted(v["batch_stats"]) == ["bn1", "bn2", "bn3"]
    assert "bias" not in v["params"]["conv1"] and "bias" in plain.init(jax.random.PRNGKey(0), x)["params"]["conv1"]
    # Train mode normalises with the batch statistics and updates the running ones (momentum 0.9).
    (_, feats), updates = model.apply(v, x, train=True, mutable=["batch_stats"])
    h = jax.lax.conv_general_dilated(x[..., None], v["params"]["conv1"]["kernel"], (2,), [(1, 1)],
                                     dimension_numbers=("NWC", "WIO", "NWC"))
    np.testing.assert_allclose(updates["batch_stats"]["bn1"]["mean"], 0.1 * h.mean(axis=(0, 1)),
                               rtol=1e-5, atol=1e-6)
    assert float(feats["stage1"].min()) >= 0.0
    # Eval mode uses the running statistics and leaves them alone.
    logits, _ = model.apply(v, x)
    assert logits.shape == (6, 10) and np.all(np.isfinite(logits))
