"""kdjax.convert: torchvision-layout ResNet weights -> kdjax variables.

torchvision is not importable here, so the check is an independent float64 NumPy forward pass of
torchvision's ResNet (NCHW, OIHW weights, eval-mode BN, MaxPool2d(3, 2, padding=1)) on random
weights with torchvision's key names and shapes, compared with kdjax on the converted variables.
"""

import re

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from kdjax import convert, models

# torchvision's resnet table: blocks per stage, bottleneck?
ARCH = {18: ((2, 2, 2, 2), False), 34: ((3, 4, 6, 3), False), 50: ((3, 4, 6, 3), True)}
EPS = 1e-5


def random_state_dict(depth, num_classes=10, seed=0, width=64):
    """A torchvision-layout ResNet state_dict (including num_batches_tracked) with random values;
    ``width`` is the stem's channels (torchvision: 64), the stages have ``width * 2**i``."""
    rng = np.random.default_rng(seed)
    sd = {}

    def conv(name, cout, cin, k):
        sd[f"{name}.weight"] = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))
                                ).astype(np.float32)

    def bn(name, c):
        sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[f"{name}.bias"] = (0.1 * rng.standard_normal(c)).astype(np.float32)
        sd[f"{name}.running_mean"] = (0.1 * rng.standard_normal(c)).astype(np.float32)
        sd[f"{name}.running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[f"{name}.num_batches_tracked"] = np.array(7, dtype=np.int64)

    sizes, bottleneck = ARCH[depth]
    expansion = 4 if bottleneck else 1
    conv("conv1", width, 3, 7)
    bn("bn1", width)
    cin = width
    for i, n in enumerate(sizes):
        w = width * 2 ** i
        for j in range(n):
            p = f"layer{i + 1}.{j}"
            stride = 2 if (i > 0 and j == 0) else 1
            if bottleneck:
                conv(f"{p}.conv1", w, cin, 1); bn(f"{p}.bn1", w)
                conv(f"{p}.conv2", w, w, 3); bn(f"{p}.bn2", w)
                conv(f"{p}.conv3", w * 4, w, 1); bn(f"{p}.bn3", w * 4)
            else:
                conv(f"{p}.conv1", w, cin, 3); bn(f"{p}.bn1", w)
                conv(f"{p}.conv2", w, w, 3); bn(f"{p}.bn2", w)
            if stride != 1 or cin != w * expansion:
                conv(f"{p}.downsample.0", w * expansion, cin, 1)
                bn(f"{p}.downsample.1", w * expansion)
            cin = w * expansion
    bound = 1.0 / np.sqrt(cin)
    sd["fc.weight"] = rng.uniform(-bound, bound, (num_classes, cin)).astype(np.float32)
    sd["fc.bias"] = rng.uniform(-bound, bound, num_classes).astype(np.float32)
    return sd


# ---------------------------------------------------------------- float64 NumPy reference (NCHW)

def ref_conv(x, w, stride, pad):
    """torch.nn.functional.conv2d(x, w, stride=stride, padding=pad), no bias; x [N,C,H,W], w [O,I,kh,kw]."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    kh, kw = w.shape[2:]
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
    return np.einsum("nchwij,ocij->nohw", win, w, optimize=True)


def ref_bn(x, sd, name):
    g = lambda s: sd[f"{name}.{s}"].astype(np.float64)[None, :, None, None]
    return (x - g("running_mean")) / np.sqrt(g("running_var") + EPS) * g("weight") + g("bias")


def ref_maxpool(x):
    """MaxPool2d(kernel_size=3, stride=2, padding=1): implicit -inf padding."""
    x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    return np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))[:, :, ::2, ::2].max(axis=(-1, -2))


def ref_resnet(sd, depth, x_nchw):
    """torchvision ResNet forward in eval mode, float64. Returns (logits, {'stem': NCHW, 'stage4': NCHW})."""
    relu = lambda v: np.maximum(v, 0.0)
    w = lambda name: sd[f"{name}.weight"].astype(np.float64)
    sizes, bottleneck = ARCH[depth]
    x = relu(ref_bn(ref_conv(x_nchw, w("conv1"), 2, 3), sd, "bn1"))
    x = ref_maxpool(x)
    taps = {"stem": x}
    for i, n in enumerate(sizes):
        for j in range(n):
            p = f"layer{i + 1}.{j}"
            stride = 2 if (i > 0 and j == 0) else 1
            if bottleneck:
                y = relu(ref_bn(ref_conv(x, w(f"{p}.conv1"), 1, 0), sd, f"{p}.bn1"))
                y = relu(ref_bn(ref_conv(y, w(f"{p}.conv2"), stride, 1), sd, f"{p}.bn2"))
                y = ref_bn(ref_conv(y, w(f"{p}.conv3"), 1, 0), sd, f"{p}.bn3")
            else:
                y = relu(ref_bn(ref_conv(x, w(f"{p}.conv1"), stride, 1), sd, f"{p}.bn1"))
                y = ref_bn(ref_conv(y, w(f"{p}.conv2"), 1, 1), sd, f"{p}.bn2")
            if f"{p}.downsample.0.weight" in sd:
                x = ref_bn(ref_conv(x, w(f"{p}.downsample.0"), stride, 0), sd, f"{p}.downsample.1")
            x = relu(x + y)
    taps["stage4"] = x
    pooled = x.mean(axis=(2, 3))
    logits = pooled @ w("fc").T + sd["fc.bias"].astype(np.float64)
    return logits, taps


def assert_close(actual, ref, rtol=1e-4):
    """Elementwise |a - r| <= rtol * max|r| (relative to the tensor's scale) and rtol * |r|."""
    np.testing.assert_allclose(np.asarray(actual, np.float64), ref, rtol=rtol,
                               atol=rtol * np.abs(ref).max())


def check_against_reference(depth, variables, sd, num_classes):
    # Non-square input, even and odd sizes along the way (48 -> 24 -> 12 -> 6 -> 3 -> 2 and
    # 53 -> 27 -> 14 -> 7 -> 4 -> 2): where a strided layer sees an even size, XLA's 'SAME' padding
    # would be asymmetric, so this catches any deviation from torch's symmetric padding.
    x = np.random.default_rng(1).standard_normal((2, 3, 48, 53))
    ref_logits, ref_taps = ref_resnet(sd, depth, x)
    model = models.create(f"resnet{depth}", num_classes)
    logits, feats = jax.jit(model.apply)(variables, jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32))
    assert logits.shape == (2, num_classes) and logits.dtype == jnp.float32
    assert feats["stem"].shape == (2, 12, 14, 64)
    assert_close(feats["stem"], ref_taps["stem"].transpose(0, 2, 3, 1))
    assert_close(feats["stage4"], ref_taps["stage4"].transpose(0, 2, 3, 1))
    assert_close(logits, ref_logits)
    # The check has teeth: the logits are not degenerate.
    assert np.std(ref_logits) > 1e-2


@pytest.mark.parametrize("depth", [18, 50])
def test_converted_resnet_matches_numpy_reference(depth):
    sd = random_state_dict(depth, num_classes=10)
    variables = convert.torchvision_resnet_to_flax(sd, depth)
    check_against_reference(depth, variables, sd, 10)


def test_converted_structure_and_layouts():
    sd = random_state_dict(18, num_classes=7)
    v = convert.torchvision_resnet_to_flax(sd, 18)
    assert set(v) == {"params", "batch_stats"}
    # Same tree structure and shapes as a freshly initialised model.
    init = jax.eval_shape(lambda: models.create("resnet18", 7).init(jax.random.key(0),
                                                                     jnp.zeros((1, 32, 32, 3))))
    assert jax.tree.structure(v) == jax.tree.structure(init)
    for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(init)):
        assert a.shape == b.shape and a.dtype == np.float32
    np.testing.assert_array_equal(v["params"]["conv1"]["kernel"], sd["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(v["params"]["layer2_0"]["downsample_0"]["kernel"][0, 0],
                                  sd["layer2.0.downsample.0.weight"][:, :, 0, 0].T)
    np.testing.assert_array_equal(v["params"]["fc"]["kernel"], sd["fc.weight"].T)
    np.testing.assert_array_equal(v["params"]["layer3_1"]["bn2"]["scale"], sd["layer3.1.bn2.weight"])
    np.testing.assert_array_equal(v["batch_stats"]["layer3_1"]["bn2"]["var"], sd["layer3.1.bn2.running_var"])
    np.testing.assert_array_equal(v["batch_stats"]["bn1"]["mean"], sd["bn1.running_mean"])
    # dtype argument
    v16 = convert.torchvision_resnet_to_flax(sd, 18, dtype=np.float16)
    assert all(a.dtype == np.float16 for a in jax.tree.leaves(v16))


def test_load_npz_and_safetensors_round_trip(tmp_path):
    from safetensors.numpy import save_file
    sd = random_state_dict(18, num_classes=5, seed=3)
    direct = convert.torchvision_resnet_to_flax(sd, 18)
    np.savez(tmp_path / "r18.npz", **sd)
    save_file(sd, str(tmp_path / "r18.safetensors"))
    for name in ("r18.npz", "r18.safetensors"):
        loaded = convert.load_torchvision_resnet(tmp_path / name, 18)
        assert jax.tree.structure(loaded) == jax.tree.structure(direct)
        for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(direct)):
            np.testing.assert_array_equal(a, b)


def test_load_rejects_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"unsupported file type '\.pt'.*\.npz or \.safetensors"):
        convert.load_torchvision_resnet(tmp_path / "r18.pt", 18)


def test_error_unsupported_depth():
    with pytest.raises(ValueError, match=r"depth must be one of \[18, 34, 50, 101, 152\]; got depth=20"):
        convert.torchvision_resnet_to_flax(random_state_dict(18), 20)


def test_error_missing_key():
    sd = random_state_dict(18)
    del sd["layer3.1.bn2.running_var"]
    with pytest.raises(ValueError, match=r"missing keys: layer3\.1\.bn2\.running_var\."):
        convert.torchvision_resnet_to_flax(sd, 18)


def test_error_unexpected_key():
    sd = random_state_dict(18)
    sd["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"unexpected keys: extra\.weight"):
        convert.torchvision_resnet_to_flax(sd, 18)


def test_error_shape_mismatch_names_key_and_shapes():
    sd = random_state_dict(18)
    sd["layer1.0.conv2.weight"] = np.zeros((64, 64, 5, 5), np.float32)
    with pytest.raises(ValueError, match=r"shape mismatch for 'layer1\.0\.conv2\.weight': got "
                                         r"\(64, 64, 5, 5\), ResNet-18 expects \(64, 64, 3, 3\)"):
        convert.torchvision_resnet_to_flax(sd, 18)


def test_error_wrong_depth_suggests_the_right_one():
    sd = random_state_dict(50)
    with pytest.raises(ValueError, match=r"ResNet-18.*unexpected keys: .*layer1\.0\.bn3.*"
                                         r"look like a ResNet-50 state_dict; pass depth=50"):
        convert.torchvision_resnet_to_flax(sd, 18)
    sd34 = random_state_dict(34)
    with pytest.raises(ValueError, match=r"look like a ResNet-34 state_dict; pass depth=34"):
        convert.torchvision_resnet_to_flax(sd34, 50)


def test_error_dataparallel_prefix_hint():
    sd = {f"module.{k}": v for k, v in random_state_dict(18).items()}
    with pytest.raises(ValueError, match=r"missing keys: .*strip the 'module\.' prefix"):
        convert.torchvision_resnet_to_flax(sd, 18)


def test_long_key_lists_are_truncated():
    sd = {k: v for k, v in random_state_dict(18).items() if not k.startswith("layer4")}
    with pytest.raises(ValueError, match=r"missing keys: (layer4\.\S+, ){7}layer4\.\S+ \.\.\. and \d+ more"):
        convert.torchvision_resnet_to_flax(sd, 18)


@pytest.mark.parametrize("depth", [18, 50])
def test_error_non_torchvision_width_names_the_width(depth):
    # A width-32 state_dict (e.g. exported from a thin ResNet) has every key but no shape right:
    # the message names the width, lists 8 mismatches and counts the rest.
    sd = random_state_dict(depth, width=32)
    n_mismatched = sum(1 for k in sd if not k.endswith("num_batches_tracked") and k != "fc.bias")
    with pytest.raises(ValueError) as info:
        convert.torchvision_resnet_to_flax(sd, depth)
    message = str(info.value)
    assert re.search(rf"shape mismatch for 'bn1\.bias': got \(32,\), ResNet-{depth} expects \(64,\)", message)
    assert message.count("shape mismatch for") == 8
    assert f"... and {n_mismatched - 8} more shape mismatches." in message
    assert ("Hint: conv1.weight has 32 output channels, so this is a width-32 ResNet, but kdjax.convert "
            "maps torchvision's width-64 ResNets only (ResNet(width=64)).") in message
    assert "missing keys" not in message and "look like" not in message


def test_width_hint_only_for_a_non_64_stem():
    sd = random_state_dict(18)
    sd["layer1.0.conv2.weight"] = np.zeros((64, 64, 5, 5), np.float32)
    with pytest.raises(ValueError) as info:
        convert.torchvision_resnet_to_flax(sd, 18)
    assert "output channels" not in str(info.value) and "more shape mismatches" not in str(info.value)
