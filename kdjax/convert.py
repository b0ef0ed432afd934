"""torchvision ResNet weights -> kdjax :class:`~kdjax.models.resnet.ResNet` variables.

Nothing is downloaded: the user exports a torchvision ``state_dict`` to a file, e.g.::

    sd = torchvision.models.resnet50(weights="IMAGENET1K_V1").state_dict()
    numpy.savez("resnet50.npz", **{k: v.numpy() for k, v in sd.items()})
    # or: safetensors.torch.save_file(sd, "resnet50.safetensors")

and loads it with ``variables = load_torchvision_resnet("resnet50.npz", depth=50)``, then
``models.create("resnet50", 1000).apply(variables, x)`` (x NHWC, normalised as torchvision expects).

Key mapping (the kdjax module names mirror torchvision's, ``.`` inside a module name -> ``_``):

* ``conv1.weight`` [O, I, kh, kw] -> ``params['conv1']['kernel']`` [kh, kw, I, O] (OIHW -> HWIO);
* ``layer2.0.downsample.0.weight`` -> ``params['layer2_0']['downsample_0']['kernel']`` (same);
* ``bn1.weight`` / ``bn1.bias`` -> ``params['bn1']['scale']`` / ``params['bn1']['bias']``;
* ``bn1.running_mean`` / ``bn1.running_var`` -> ``batch_stats['bn1']['mean']`` / ``['var']``;
* ``fc.weight`` [C, D] -> ``params['fc']['kernel']`` [D, C] (transposed); ``fc.bias`` -> ``['bias']``.

``*.num_batches_tracked`` entries are ignored. The number of classes is read from ``fc.weight``.
torchvision's ResNets have width 64 (``conv1`` has 64 output channels), so the result fits
``ResNet(width=64)`` (the default) only; a state_dict of another width is rejected with a message
that names the width it has.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.models.resnet import BOTTLENECK, STAGE_SIZES, ResNet

_LEAF_TO_TORCH = {("params", "kernel"): "weight", ("params", "scale"): "weight",
                  ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
                  ("batch_stats", "var"): "running_var"}
_MAX_LISTED = 8
#: Stem channels of every torchvision ResNet (``ResNet.width`` of the converted model).
TORCHVISION_WIDTH = 64


def _template(depth: int, num_classes: int) -> dict[str, Any]:
    """Shapes/dtypes of ``ResNet(depth, num_classes, width=64)``'s variables (no computation)."""
    model = ResNet(depth=depth, num_classes=num_classes, width=TORCHVISION_WIDTH)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))


def _torch_key(collection: str, path: tuple[str, ...]) -> str:
    """``('params', ('layer1_0', 'downsample_0', 'kernel'))`` -> ``'layer1.0.downsample.0.weight'``."""
    modules = [name.replace("_", ".") for name in path[:-1]]
    return ".".join(modules + [_LEAF_TO_TORCH[(collection, path[-1])]])


def _to_torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """kdjax shape -> torchvision shape: HWIO -> OIHW, (in, out) -> (out, in), vectors unchanged."""
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def _from_torch(value: np.ndarray) -> np.ndarray:
    """torchvision array -> kdjax layout (the inverse of :func:`_to_torch_shape` on the data)."""
    if value.ndim == 4:
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    if value.ndim == 2:
        return np.ascontiguousarray(value.T)
    return value


def _guess_depth(keys) -> int | None:
    """The torchvision depth whose key set ``keys`` resembles (blocks per stage, bottleneck), or None."""
    blocks = [0, 0, 0, 0]
    bottleneck = False
    for key in keys:
        match = re.match(r"layer([1-4])\.(\d+)\.", key)
        if match:
            stage = int(match[1]) - 1
            blocks[stage] = max(blocks[stage], int(match[2]) + 1)
            bottleneck = bottleneck or key.startswith(match[0] + "conv3.")
    for depth, sizes in STAGE_SIZES.items():
        if tuple(blocks) == sizes and BOTTLENECK[depth] == bottleneck:
            return depth
    return None


def _stem_width(arrays: Mapping[str, np.ndarray]) -> int | None:
    """Output channels of ``conv1.weight`` [O, I, kh, kw] (the ResNet's ``width``), or None if absent."""
    conv1 = arrays.get("conv1.weight")
    return conv1.shape[0] if conv1 is not None and conv1.ndim == 4 else None


def _listed(keys) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def torchvision_resnet_to_flax(state_dict: Mapping[str, Any], depth: int,
                               dtype: Any = np.float32) -> dict[str, dict[str, Any]]:
    """Converts a torchvision ResNet ``state_dict`` to kdjax ``{'params', 'batch_stats'}``.

    Args:
      state_dict: torchvision key -> array (NumPy arrays, or anything ``np.asarray`` accepts).
      depth: 18, 34, 50, 101 or 152.
      dtype: dtype of the returned arrays.

    Returns:
      Nested dicts of NumPy arrays, ``{'params': ..., 'batch_stats': ...}``, matching
      ``ResNet(depth, num_classes)`` (width 64) with ``num_classes = state_dict['fc.weight'].shape[0]``.

    Raises:
      ValueError: unsupported ``depth``; missing or unexpected keys; shape mismatches (the first
        8 listed). The message names the keys and shapes, the depth the keys look like when it
        differs from ``depth``, and the width when ``conv1.weight`` does not have 64 channels.
    """
    if depth not in STAGE_SIZES:
        raise ValueError(f"depth must be one of {sorted(STAGE_SIZES)}; got depth={depth!r}.")
    arrays = {k: np.asarray(v) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    fc = arrays.get("fc.weight")
    num_classes = fc.shape[0] if fc is not None and fc.ndim == 2 else 1000

    expected: dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]] = {}
    for collection, tree in _template(depth, num_classes).items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            names = tuple(entry.key for entry in path)
            expected[_torch_key(collection, names)] = (collection, names, tuple(leaf.shape))

    problems = []
    missing = set(expected) - set(arrays)
    unexpected = set(arrays) - set(expected)
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    mismatches = []
    for key in sorted(set(expected) & set(arrays)):
        want = _to_torch_shape(expected[key][2])
        if arrays[key].shape != want:
            mismatches.append(f"shape mismatch for {key!r}: got {arrays[key].shape}, ResNet-{depth} "
                              f"expects {want}")
    problems += mismatches[:_MAX_LISTED]
    if len(mismatches) > _MAX_LISTED:
        problems.append(f"... and {len(mismatches) - _MAX_LISTED} more shape mismatches")
    if problems:
        hints = []
        guess = _guess_depth(arrays)
        if guess is not None and guess != depth:
            hints.append(f"the keys look like a ResNet-{guess} state_dict; pass depth={guess}")
        width = _stem_width(arrays)
        if width not in (None, TORCHVISION_WIDTH):
            hints.append(f"conv1.weight has {width} output channels, so this is a width-{width} ResNet, "
                         f"but kdjax.convert maps torchvision's width-{TORCHVISION_WIDTH} ResNets only "
                         f"(ResNet(width={TORCHVISION_WIDTH}))")
        if any(k.startswith("module.") for k in arrays):
            hints.append("strip the 'module.' prefix that DataParallel adds to every key")
        hint = f" Hint: {'; '.join(hints)}." if hints else ""
        raise ValueError(f"state_dict does not match torchvision ResNet-{depth}: "
                         + "; ".join(problems) + "." + hint)

    variables: dict[str, dict[str, Any]] = {}
    for key, (collection, names, _) in expected.items():
        node = variables.setdefault(collection, {})
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = _from_torch(arrays[key]).astype(dtype)
    return variables


def load_torchvision_resnet(path: str | os.PathLike, depth: int,
                            dtype: Any = np.float32) -> dict[str, dict[str, Any]]:
    """Loads a torchvision ResNet ``state_dict`` from ``.npz`` or ``.safetensors`` and converts it.

    ``.safetensors`` files are read with ``safetensors.numpy.load_file`` (the ``safetensors``
    package is imported only then). See :func:`torchvision_resnet_to_flax` for the result.
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            state_dict = {name: archive[name] for name in archive.files}
    elif suffix == ".safetensors":
        from safetensors.numpy import load_file
        state_dict = load_file(path)
    else:
        raise ValueError(f"load_torchvision_resnet: unsupported file type {suffix!r} for {path!r}; "
                         f"expected a .npz or .safetensors file.")
    return torchvision_resnet_to_flax(state_dict, depth, dtype)
