"""Fingerprint: finiteness flags and checksums of every leaf, one jitted reduction."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_GOLDEN = 0x9E3779B9
_MIX1 = 0x85EBCA6B
_MIX2 = 0xC2B2AE35


def _leaf_words(x: jax.Array) -> jax.Array:
    """The bytes of ``x`` as uint32 words, same leading shape as ``x``.

    4-byte dtypes are bit-cast; 1- and 2-byte dtypes (bool, int8, bf16, f16, ...) are bit-cast and
    zero-extended; 8-byte dtypes become ``x.shape + (2,)``; complex leaves are split into
    ``(real, imag)`` on a trailing axis first; typed PRNG keys use their raw key data.
    """
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _checksum(words: jax.Array) -> jax.Array:
    """Order-sensitive 32-bit checksum of a uint32 array of any shape (all arithmetic mod 2**32).

    With ``i`` the row-major flat index of a word ``w``:
    ``h = w ^ (i * 0x9E3779B9); h *= 0x85EBCA6B; h ^= h >> 13; h *= 0xC2B2AE35; h ^= h >> 16``
    and the checksum is ``sum(h)``.  For a fixed ``i`` the map ``w -> h`` is a bijection, so any
    change confined to one word always changes the checksum; wider damage collides with
    probability about ``2**-32``.  The index is built from per-axis iotas (no reshape), so sharded
    leaves are hashed in place and only the scalar sum crosses devices.
    """
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        iota = jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
        index = index + iota * jnp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    h = words ^ (index * jnp.uint32(_GOLDEN))
    h = h * jnp.uint32(_MIX1)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(_MIX2)
    h = h ^ (h >> 16)
    return jnp.sum(h, dtype=jnp.uint32)


@jax.jit
def _fingerprint(leaves: list) -> tuple[list[jax.Array], list[jax.Array]]:
    # Per-leaf scalars, not stacked: leaves may live on different meshes over the same devices.
    finite = [
        jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
        for x in leaves
    ]
    sums = [_checksum(_leaf_words(x)) for x in leaves]
    return finite, sums


def state_fingerprint(state: Any) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Key paths, finiteness flags and checksums of every array leaf of ``state``.

    Returns ``(paths, finite, checksums)``: ``paths[k]`` is ``jax.tree_util.keystr`` of leaf ``k``;
    ``finite`` is bool ``[n_leaves]`` (True for non-float leaves); ``checksums`` is uint32
    ``[n_leaves]`` (see :func:`_checksum`).  Computed on device by one jitted call per device set
    (usually one), then one device-to-host transfer of ``2 * n_leaves`` scalars.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    if not flat:
        raise ValueError("state has no array leaves; pass the pytree of jax.Arrays to checkpoint.")
    paths = [jax.tree_util.keystr(path) for path, _ in flat]
    for path, (_, leaf) in zip(paths, flat):
        if not isinstance(leaf, jax.Array):
            raise TypeError(
                f"state leaf {path} is a {type(leaf).__name__}; every leaf must be a jax.Array "
                f"(wrap Python/NumPy values with jnp.asarray before checkpointing)."
            )
    # One jitted call per distinct device set (a jit needs all its inputs on the same devices;
    # a state usually has one group, or two when scalars live on one device).
    groups: dict[tuple, list[int]] = {}
    for k, (_, leaf) in enumerate(flat):
        devices = tuple(sorted(d.id for d in leaf.sharding.device_set))
        groups.setdefault(devices, []).append(k)
    results = jax.device_get(
        [_fingerprint([flat[k][1] for k in members]) for members in groups.values()]
    )
    finite = np.zeros(len(flat), dtype=bool)
    sums = np.zeros(len(flat), dtype=np.uint32)
    for members, (group_finite, group_sums) in zip(groups.values(), results):
        finite[members] = group_finite
        sums[members] = group_sums
    return paths, finite, sums
