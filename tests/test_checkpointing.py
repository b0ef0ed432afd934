"""Tests for kdjax.checkpointing: round trips, retention, integrity, corruption fallback, faults."""

import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from typing import Any

import flax.struct
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kdjax import checkpointing as ck
from kdjax.checkpointing import (
    CheckpointDiskFullError,
    Checkpointer,
    CheckpointSaveError,
    CorruptCheckpointError,
    NoValidCheckpointError,
    NonFiniteStateError,
    abstract_state,
    state_fingerprint,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((4, 2), ("data", "fsdp"))


def _put(x, mesh, spec):
    return jax.device_put(x, NamedSharding(mesh, spec))


def make_state(mesh, seed=0, updates=2, big=False):
    """A TrainState with sharded params, Adam moments after ``updates`` steps, a typed key."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {
        "dense": {
            "kernel": _put(jax.random.normal(k1, (8, 16)), mesh, P("data", "fsdp")),
            "bias": _put(jnp.linspace(-1.0, 1.0, 16), mesh, P("fsdp")),
        },
        "scale": jnp.full((3,), 1.5 + seed, jnp.bfloat16),
    }
    if big:  # > 1 KiB so orbax stores it out of line (not inside a CRC-protected b-tree node)
        params["embed"] = jax.random.normal(k2, (4096,))
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    for _ in range(updates):
        grads = jax.tree.map(lambda p: p * 0.5 + 1.0, params)
        upd, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, upd)
    batch_stats = {"mean": _put(jnp.arange(16.0) + seed, mesh, P("fsdp"))}
    return TrainState(
        step=jnp.asarray(updates + seed, jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        rng=jax.random.key(seed + 100),
    )


def _bits(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8)


def assert_bit_equal(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(_bits(x), _bits(y))


def _iterator(n=60):
    ds = grain.MapDataset.range(n).seed(7).shuffle().map(lambda i: i * 3).batch(4)
    return iter(ds.to_iter_dataset())


def _largest_file(directory):
    files = [p for p in directory.rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def _flip_at(path, offset, n=8):
    data = bytearray(path.read_bytes())
    for i in range(offset, min(offset + n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _flip_middle(path, n=8):
    _flip_at(path, path.stat().st_size // 2, n)


# --------------------------------------------------------------------------------------------
# Round trips.
# --------------------------------------------------------------------------------------------


def test_round_trip_bit_exact_sharded(tmp_path, mesh):
    state = make_state(mesh)
    with Checkpointer(tmp_path / "ck") as ckpt:
        assert ckpt.save(2, state)
        ckpt.wait()
        assert ckpt.all_steps() == [2] and ckpt.latest_step() == 2
        target = abstract_state(state)
        restored, step = ckpt.restore(target)
    assert step == 2
    assert isinstance(restored, TrainState)
    assert_bit_equal(restored, state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim)
    assert jax.random.key_data(restored.rng).shape == (2,)


def test_restore_onto_a_different_sharding(tmp_path, mesh):
    state = make_state(mesh)
    with Checkpointer(tmp_path / "ck") as ckpt:
        ckpt.save(2, state)
        other = jax.make_mesh((2, 4), ("data", "fsdp"))
        target = abstract_state(state)
        kernel = target.params["dense"]["kernel"]
        new_kernel = jax.ShapeDtypeStruct(
            kernel.shape, kernel.dtype, sharding=NamedSharding(other, P("fsdp", None))
        )
        target = target.replace(params={**target.params, "dense": {
            **target.params["dense"], "kernel": new_kernel}})
        restored, _ = ckpt.restore(target)
    got = restored.params["dense"]["kernel"]
    assert got.sharding.is_equivalent_to(new_kernel.sharding, 2)
    assert len(got.addressable_shards) == 8
    assert got.addressable_shards[0].data.shape == (2, 16)
    assert_bit_equal(restored, state)


def test_data_iterator_state_round_trip(tmp_path, mesh):
    it = _iterator()
    for _ in range(3):
        next(it)
    with Checkpointer(tmp_path / "ck") as ckpt:
        ckpt.save(3, make_state(mesh), data_iterator=it)
        expected = [next(it) for _ in range(5)]
        fresh = _iterator()
        ckpt.restore(abstract_state(make_state(mesh)), data_iterator=fresh)
    resumed = [next(fresh) for _ in range(5)]
    for a, b in zip(resumed, expected):
        np.testing.assert_array_equal(a, b)
    assert payload_files(tmp_path / "ck" / "3" / "data") == ["process_0-of-1.json"]


def payload_files(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("process_"))


def test_data_loader_iterator_bytes_state_round_trip(tmp_path, mesh):
    def loader():
        return iter(grain.DataLoader(
            data_source=grain.sources.RangeDataSource(0, 20, 1),
            sampler=grain.samplers.IndexSampler(20, shuffle=True, seed=3, num_epochs=1),
            worker_count=0,
        ))

    it = loader()
    [next(it) for _ in range(4)]
    assert isinstance(it.get_state(), bytes)
    with Checkpointer(tmp_path / "ck") as ckpt:
        ckpt.save(1, make_state(mesh), data_iterator=it)
        expected = [next(it) for _ in range(3)]
        fresh = loader()
        ckpt.restore(abstract_state(make_state(mesh)), data_iterator=fresh)
    assert [next(fresh) for _ in range(3)] == expected


def test_async_save_is_safe_against_donation(tmp_path, mesh):
    state = make_state(mesh)
    expected = jax.tree.map(np.asarray, state.params)
    bump = jax.jit(lambda p: jax.tree.map(lambda x: x + 1, p), donate_argnums=0)
    with Checkpointer(tmp_path / "ck", async_save=True) as ckpt:
        ckpt.save(2, state)
        bumped = bump(state.params)  # donates the buffers being written in the background
        ckpt.wait()
        restored, _ = ckpt.restore(abstract_state(state.replace(params=bumped)))
    for got, want in zip(jax.tree.leaves(restored.params), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(got), want)


# --------------------------------------------------------------------------------------------
# Save policy and retention.
# --------------------------------------------------------------------------------------------


def test_save_interval_force_and_existing_step(tmp_path, mesh):
    state = make_state(mesh)
    with Checkpointer(tmp_path / "ck", save_interval_steps=3, async_save=False) as ckpt:
        saved = [ckpt.save(s, state) for s in range(1, 7)]
        assert saved == [False, False, True, False, False, True]
        assert ckpt.save(7, state, force=True)
        assert not ckpt.save(7, state, force=True)  # already there: not rewritten
        assert ckpt.all_steps() == [3, 6, 7]


def test_max_to_keep_keeps_newest(tmp_path, mesh):
    state = make_state(mesh)
    with Checkpointer(tmp_path / "ck", max_to_keep=2) as ckpt:
        for s in range(1, 6):
            ckpt.save(s, state)
        ckpt.wait()
        assert ckpt.all_steps() == [4, 5]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["4", "5"]


@pytest.mark.parametrize(
    "mode, values, best",
    [("max", [0.1, 0.9, 0.3, 0.2, 0.25], 2), ("min", [0.5, 0.4, 0.1, 0.3, 0.35], 3)],
)
def test_best_by_metric_is_kept_with_the_newest(tmp_path, mesh, mode, values, best):
    state = make_state(mesh)
    with Checkpointer(
        tmp_path / "ck", max_to_keep=1, best_metric="score", best_mode=mode, async_save=False
    ) as ckpt:
        for s, v in enumerate(values, start=1):
            ckpt.save(s, state, metrics={"score": v, "other": 1.0})
        assert ckpt.all_steps() == sorted({best, len(values)})
        assert ckpt.best_step() == best
    reopened = Checkpointer(tmp_path / "ck", max_to_keep=1, best_metric="score", best_mode=mode)
    assert reopened.best_step() == best
    reopened.close()


# --------------------------------------------------------------------------------------------
# Refusing bad state, bad arguments.
# --------------------------------------------------------------------------------------------


def _with_value(x, index, value):
    """Copy of ``x`` (same sharding) with ``x[index] = value``."""
    host = np.array(x)
    host[index] = value
    return jax.device_put(host, x.sharding)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_non_finite_state_is_refused_and_nothing_written(tmp_path, mesh, bad):
    state = make_state(mesh)
    with Checkpointer(tmp_path / "ck", async_save=False) as ckpt:
        ckpt.save(1, state)
        kernel = _with_value(state.params["dense"]["kernel"], (3, 5), bad)
        broken = state.replace(params={**state.params, "dense": {
            **state.params["dense"], "kernel": kernel}})
        with pytest.raises(NonFiniteStateError) as info:
            ckpt.save(2, broken)
        assert ckpt.all_steps() == [1]
    message = str(info.value)
    assert "step 2" in message and ".params['dense']['kernel']" in message
    assert "Nothing was written; the last complete checkpoint (step 1) is intact" in message
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["1"]


def test_non_finite_names_every_bad_leaf_including_bf16(tmp_path, mesh):
    state = make_state(mesh)
    broken = state.replace(
        params={**state.params, "scale": _with_value(state.params["scale"], 0, jnp.inf)},
        batch_stats={"mean": _with_value(state.batch_stats["mean"], 0, jnp.nan)},
    )
    with Checkpointer(tmp_path / "ck") as ckpt:
        with pytest.raises(NonFiniteStateError, match=r"2 of 13 leaves are non-finite") as info:
            ckpt.save(1, broken)
    assert ".params['scale']" in str(info.value) and ".batch_stats['mean']" in str(info.value)
    assert "there is no earlier complete checkpoint" in str(info.value)
    assert not (tmp_path / "ck" / "1").exists()


def test_integer_and_key_leaves_do_not_trigger_the_finite_check(tmp_path):
    state = {"count": jnp.arange(4, dtype=jnp.int32), "rng": jax.random.key(0),
             "flag": jnp.array([True, False])}
    with Checkpointer(tmp_path / "ck") as ckpt:
        assert ckpt.save(0, state)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_to_keep": 0}, "max_to_keep must be an int >= 1; got 0"),
        ({"save_interval_steps": 1.5}, "save_interval_steps must be an int >= 1; got 1.5"),
        ({"keep_best": True}, "keep_best must be an int >= 1; got True"),
        ({"best_mode": "avg"}, "best_mode must be 'max' or 'min'; got 'avg'"),
    ],
)
def test_constructor_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Checkpointer(tmp_path / "ck", **kwargs)


def test_constructor_rejects_non_string_metric(tmp_path):
    with pytest.raises(TypeError, match="best_metric must be a metric name"):
        Checkpointer(tmp_path / "ck", best_metric=3)


def test_save_rejects_bad_arguments(tmp_path, mesh):
    state = make_state(mesh)
    with Checkpointer(tmp_path / "ck", best_metric="acc") as ckpt:
        with pytest.raises(ValueError, match=r"step must be an int >= 0; got -1"):
            ckpt.save(-1, state)
        with pytest.raises(ValueError,
                           match=r"must contain best_metric 'acc'; got keys \['loss'\]"):
            ckpt.save(1, state, metrics={"loss": 0.3})
        with pytest.raises(ValueError, match=r"metrics\['acc'\] is nan"):
            ckpt.save(1, state, metrics={"acc": float("nan")})
        with pytest.raises(TypeError, match="metrics must be a dict"):
            ckpt.save(1, state, metrics=[0.5])
        with pytest.raises(TypeError, match=r"state leaf \['n'\] is a int"):
            ckpt.save(1, {"n": 3}, force=True)
        with pytest.raises(ValueError, match="state has no array leaves"):
            ckpt.save(1, {}, force=True)
        with pytest.raises(TypeError, match="data_iterator must have get_state"):
            ckpt.save(1, state, data_iterator=[1, 2, 3])
        assert ckpt.all_steps() == []
    with Checkpointer(tmp_path / "ck2") as plain:
        with pytest.raises(ValueError, match="best_step\\(\\) needs Checkpointer"):
            plain.best_step()


def test_iterator_state_must_be_json(tmp_path, mesh):
    class OddIterator:
        def get_state(self):
            return {"position": object()}

        def set_state(self, state):
            raise AssertionError("not reached")

    with Checkpointer(tmp_path / "ck") as ckpt:
        with pytest.raises(TypeError, match="not JSON serialisable"):
            ckpt.save(1, make_state(mesh), data_iterator=OddIterator())


def test_restore_rejects_mismatched_target(tmp_path, mesh):
    state = make_state(mesh)
    with Checkpointer(tmp_path / "ck") as ckpt:
        ckpt.save(2, state)
        target = abstract_state(state)
        wrong_shape = target.replace(batch_stats={"mean": jax.ShapeDtypeStruct(
            (8,), jnp.float32, sharding=target.batch_stats["mean"].sharding)})
        with pytest.raises(ValueError, match=(
            r"leaf .batch_stats\['mean'\] was saved as \(16,\) float32 but the target asks for "
            r"\(8,\) float32")):
            ckpt.restore(wrong_shape)
        with pytest.raises(ValueError, match=r"only in the target: \[\".batch_stats\['var'\]\"\]"):
            ckpt.restore(target.replace(batch_stats={**target.batch_stats,
                                                     "var": target.batch_stats["mean"]}))
        no_sharding = target.replace(step=jax.ShapeDtypeStruct((), jnp.int32))
        with pytest.raises(ValueError, match=r"leaf .step \(shape \(\), int32\) has no sharding"):
            ckpt.restore(no_sharding)
        with pytest.raises(ValueError, match="saved without a data iterator"):
            ckpt.restore(target, data_iterator=_iterator())
        with pytest.raises(FileNotFoundError, match=r"No committed checkpoint for step 5.*\[2\]"):
            ckpt.restore(target, step=5)
        assert ckpt.all_steps() == [2]


def test_restore_target_must_be_arrays_or_structs(tmp_path, mesh):
    with Checkpointer(tmp_path / "ck") as ckpt:
        ckpt.save(0, {"w": jnp.ones(3)})
        with pytest.raises(TypeError, match=r"abstract_state leaf \['w'\] is a int; expected"):
            ckpt.restore({"w": 3})
        with pytest.raises(ValueError, match="abstract_state has no leaves"):
            ckpt.restore({})


def test_restore_of_empty_directory_returns_none(tmp_path, mesh):
    with Checkpointer(tmp_path / "ck") as ckpt:
        assert ckpt.restore(abstract_state(make_state(mesh))) is None
        assert ckpt.latest_step() is None


# --------------------------------------------------------------------------------------------
# Fingerprint (checksum) against an independent NumPy reference.
# --------------------------------------------------------------------------------------------


def _numpy_checksum(words):
    """Reference of the documented formula, in uint64 NumPy arithmetic reduced mod 2**32."""
    m = np.uint64(2**32)
    w = np.asarray(words, dtype=np.uint64).reshape(-1)
    i = np.arange(w.size, dtype=np.uint64)
    h = w ^ ((i * np.uint64(0x9E3779B9)) % m)
    h = (h * np.uint64(0x85EBCA6B)) % m
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(0xC2B2AE35)) % m
    h ^= h >> np.uint64(16)
    return int(h.sum() % m)


def test_fingerprint_matches_numpy_reference_for_every_dtype(mesh):
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((4, 6)).astype(np.float32)
    bf16 = rng.standard_normal(5).astype(jnp.bfloat16)
    i8 = rng.integers(-100, 100, (3, 2)).astype(np.int8)
    c64 = (rng.standard_normal(3) + 1j * rng.standard_normal(3)).astype(np.complex64)
    flags = np.array([True, False, True])
    key = jax.random.key(5)
    state = {"f32": _put(f32, mesh, P("data", "fsdp")), "bf16": jnp.asarray(bf16),
             "i8": jnp.asarray(i8), "c64": jnp.asarray(c64), "flags": jnp.asarray(flags),
             "key": key, "scalar": jnp.float32(2.5)}
    paths, finite, sums = state_fingerprint(state)
    expected_words = {
        "['f32']": f32.view(np.uint32),
        "['bf16']": bf16.view(np.uint16).astype(np.uint32),
        "['i8']": i8.view(np.uint8).astype(np.uint32),
        "['c64']": np.stack([c64.real, c64.imag], -1).view(np.uint32),
        "['flags']": flags.astype(np.uint32),
        "['key']": np.asarray(jax.random.key_data(key)),
        "['scalar']": np.float32(2.5).reshape(()).view(np.uint32),
    }
    assert sorted(paths) == sorted(expected_words)
    for path, s in zip(paths, sums):
        assert int(s) == _numpy_checksum(expected_words[path]), path
    assert finite.all()


def test_fingerprint_of_8_byte_dtypes_matches_numpy_reference():
    f64 = np.array([1.5, -2.25e300, np.pi], np.float64)
    with jax.enable_x64(True):
        _, finite, sums = state_fingerprint({"x": jnp.asarray(f64)})
    assert finite.all()
    assert int(sums[0]) == _numpy_checksum(f64.view(np.uint32))


def test_checksum_detects_every_single_word_change_and_ignores_sharding(mesh):
    base = np.arange(24, dtype=np.float32).reshape(4, 6) / 7
    reference = int(state_fingerprint({"x": jnp.asarray(base)})[2][0])
    for spec in (P("data", "fsdp"), P(None, "fsdp"), P()):
        assert int(state_fingerprint({"x": _put(base, mesh, spec)})[2][0]) == reference
    for flat_index in range(base.size):
        for bit in (0, 22, 31):
            changed = base.copy().reshape(-1).view(np.uint32)
            changed[flat_index] ^= np.uint32(1 << bit)
            changed = changed.view(np.float32).reshape(4, 6)
            assert int(state_fingerprint({"x": jnp.asarray(changed)})[2][0]) != reference
    swapped = base.copy()
    swapped[0, 0], swapped[0, 1] = base[0, 1], base[0, 0]
    assert int(state_fingerprint({"x": jnp.asarray(swapped)})[2][0]) != reference


# --------------------------------------------------------------------------------------------
# Integrity records: every way a manifest or iterator file can be malformed is named.
# --------------------------------------------------------------------------------------------

_GOOD_LEAF = {"path": "['w']", "shape": [3], "dtype": "float32", "checksum": 7}




def _signed(**manifest):
    """A manifest of the current format with its digest, as _build_manifest writes it."""
    manifest = {"format": ck._MANIFEST_FORMAT, **manifest}
    return {**manifest, "sha256": ck._manifest_digest(manifest)}


@pytest.mark.parametrize(
    "manifest, match",
    [
        ([1, 2], "not a kdjax-checkpoint-integrity/2 manifest"),
        ({"format": "other"}, "not a kdjax-checkpoint-integrity/2 manifest"),
        (_signed(step=4), "manifest is for step 4, not 5"),
        (_signed(step=5, has_data_iterator="yes"), "has_data_iterator is not a bool"),
        (_signed(step=5, has_data_iterator=False, leaves=[]), "leaves is not a non-empty list"),
        (_signed(step=5, has_data_iterator=False,
                 leaves=[_GOOD_LEAF, {**_GOOD_LEAF, "checksum": "7"}]),
         "manifest leaf entry 1 is malformed"),
        (_signed(step=5, has_data_iterator=False, leaves=[{**_GOOD_LEAF, "shape": [3.0]}]),
         "manifest leaf entry 0 is malformed"),
        ({**_signed(step=5, has_data_iterator=False, leaves=[_GOOD_LEAF]), "step": 5.0},
         "manifest content does not match its sha256"),
        ({"format": ck._MANIFEST_FORMAT, "step": 5, "has_data_iterator": False,
          "leaves": [_GOOD_LEAF]}, "manifest content does not match its sha256"),
    ],
)
def test_malformed_manifest_is_rejected(manifest, match):
    with pytest.raises(ValueError, match=match):
        ck._parse_manifest(manifest, 5)


def test_wellformed_manifest_is_accepted():
    manifest = _signed(step=5, has_data_iterator=True, leaves=[_GOOD_LEAF])
    assert ck._parse_manifest(manifest, 5) == ([_GOOD_LEAF], True)
    # Manifests written before the digest existed are still read.
    older = {k: v for k, v in manifest.items() if k != "sha256"}
    assert ck._parse_manifest({**older, "format": ck._MANIFEST_FORMAT_V1}, 5) == ([_GOOD_LEAF], True)


class _FixedIterator:
    def __init__(self, state):
        self.state = state

    def get_state(self):
        return self.state

    def set_state(self, state):
        self.state = state


@pytest.mark.parametrize("state", [{"next_index": 4, "epoch": [1, 2]}, b'{"v": 1}'])
def test_iterator_payload_round_trip(state):
    text = ck._iterator_payload(_FixedIterator(state))
    assert ck._parse_iterator_payload(text, "f.json") == state


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda p: "{not json", r"f.json is not valid \(JSONDecodeError"),
        (lambda p: json.dumps([1]), r"f.json is not valid \(TypeError"),
        (lambda p: json.dumps({k: v for k, v in p.items() if k != "sha256"}),
         r"f.json is not valid \(KeyError\('sha256'\)\)"),
        (lambda p: json.dumps({**p, "format": "v0"}), r"has format 'v0' and kind 'json'; expected"),
        (lambda p: json.dumps({**p, "kind": "pickle"}), r"has format .* and kind 'pickle'"),
        (lambda p: json.dumps({**p, "state": {"next_index": 5}}), "fails its SHA-256 check"),
    ],
)
def test_malformed_iterator_payload_is_rejected(edit, match):
    payload = json.loads(ck._iterator_payload(_FixedIterator({"next_index": 4})))
    with pytest.raises(CorruptCheckpointError, match=match):
        ck._parse_iterator_payload(edit(payload), "f.json")


def test_layout_problem_names_the_first_differing_leaf():
    leaves = [{"path": "['a']", "shape": [2], "dtype": "float32"},
              {"path": "['b']", "shape": [], "dtype": "key<fry>"}]
    good = {"a": jnp.zeros(2), "b": jax.random.key(0)}
    assert ck._layout_problem(good, leaves) is None
    raw_key = {"a": jnp.zeros(2), "b": jax.random.key_data(jax.random.key(0))}
    assert ck._layout_problem(raw_key, leaves) == (
        "leaf ['b'] came back as (2,) uint32 but was saved as () key<fry> (damaged array metadata)")
    assert ck._layout_problem({"a": jnp.zeros(2)}, leaves) == (
        "it restored leaves [\"['a']\"], the manifest lists [\"['a']\", \"['b']\"]")


# --------------------------------------------------------------------------------------------
# Partial, corrupt and garbled checkpoints.
# --------------------------------------------------------------------------------------------


def _two_steps(directory, mesh, big=False, data=True):
    """Saves steps 1 and 2 (different states, iterator one element apart); returns both."""
    it = _iterator()
    states = {}
    with Checkpointer(directory, async_save=False) as ckpt:
        for step in (1, 2):
            next(it)
            states[step] = make_state(mesh, seed=step, big=big)
            ckpt.save(step, states[step], data_iterator=it if data else None)
    return states


def test_partial_tmp_checkpoint_is_ignored_and_cleaned(tmp_path, mesh, caplog):
    directory = tmp_path / "ck"
    states = _two_steps(directory, mesh)
    # A crash during the write of step 3 leaves an uncommitted tmp directory behind.
    partial = directory / "3.orbax-checkpoint-tmp"
    shutil.copytree(directory / "2", partial)
    for p in list((partial / "state").rglob("*"))[:3]:
        if p.is_file():
            p.unlink()
    with caplog.at_level(logging.WARNING, logger="kdjax.checkpointing"):
        ckpt = Checkpointer(directory)
    assert "partial checkpoint(s) from an interrupted save" in caplog.text
    assert "3.orbax-checkpoint-tmp" in caplog.text
    assert ckpt.latest_step() == 2
    restored, step = ckpt.restore(abstract_state(states[2]))
    assert step == 2
    assert_bit_equal(restored, states[2])
    ckpt.save(4, states[2], force=True)
    ckpt.close()
    assert not partial.exists()


CORRUPTIONS = {
    # name: (function of the step-2 directory, regex that the warning must contain)
    # A flip in the middle of the largest data file lands in the embed leaf's chunk or in another
    # one, compressed or not, depending on the chunk order of the async write: the chunk then
    # fails to decompress or decodes to other values that the checksum catches.  Both are
    # detections; test_orbax_alone_restores_flipped_bytes_silently pins the checksum path.
    "array_bytes_flipped": (lambda d: _flip_middle(_largest_file(d / "state")),
                            r"checksum mismatch in leaf \S+ \(\d+ of 16 leaves|reading it failed"),
    "array_file_truncated": (lambda d: _largest_file(d / "state").write_bytes(b"\0" * 7),
                             "reading it failed"),
    "array_metadata_deleted": (lambda d: (d / "state" / "_METADATA").unlink(),
                               "reading it failed"),
    "array_type_metadata_deleted": (
        lambda d: (d / "state" / "array_metadatas" / "process_0").unlink(),
        re.escape("leaf .rng came back as (2,) uint32 but was saved as () key<fry> "
                  "(damaged array metadata)")),
    "manifest_garbled": (lambda d: (d / "integrity" / "metadata").write_text('{"format": 1'),
                         "integrity manifest is missing or unreadable"),
    "manifest_deleted": (lambda d: shutil.rmtree(d / "integrity"),
                         "integrity manifest is missing or unreadable"),
    # Still valid JSON, so only the manifest's own digest tells it from a target mismatch.
    "manifest_shape_edited": (
        lambda d: (d / "integrity" / "metadata").write_text(
            re.sub(r'"shape": \[(\d+)', r'"shape": [1\1',
                   (d / "integrity" / "metadata").read_text(), count=1)),
        "manifest content does not match its sha256"),
    "iterator_state_edited": (
        lambda d: (d / "data" / "process_0-of-1.json").write_text(
            (d / "data" / "process_0-of-1.json").read_text().replace(
                '"next_index": 2', '"next_index": 3')),
        "fails its SHA-256 check"),
}


# When TensorStore fails to read a damaged file, orbax abandons its other read coroutines, which
# Python reports as "Exception ignored in ... coroutine"; that noise is expected in these tests.
_IGNORE_ABANDONED_READS = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")


@_IGNORE_ABANDONED_READS
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_latest_falls_back_to_previous(tmp_path, mesh, caplog, corruption):
    directory = tmp_path / "ck"
    states = _two_steps(directory, mesh, big=True)
    corrupt, expected_reason = CORRUPTIONS[corruption]
    corrupt(directory / "2")
    ckpt = Checkpointer(directory)
    it = _iterator()
    with caplog.at_level(logging.WARNING, logger="kdjax.checkpointing"):
        restored, step = ckpt.restore(abstract_state(states[1]), data_iterator=it)
    assert step == 1
    assert_bit_equal(restored, states[1])
    np.testing.assert_array_equal(next(it), _nth_batch(1))  # step 1 had consumed one batch
    assert "Checkpoint step 2" in caplog.text and "is corrupt" in caplog.text
    assert re.search(expected_reason, caplog.text), caplog.text
    assert "Falling back to step 1" in caplog.text
    assert (directory / "1").is_dir()
    assert (directory / "2.corrupt").is_dir() and not (directory / "2").exists()
    # Training continues and writes step 2 again.
    assert ckpt.save(2, states[2], force=True)
    ckpt.wait()
    again, step = ckpt.restore(abstract_state(states[2]))
    assert step == 2
    assert_bit_equal(again, states[2])
    ckpt.close()


def _nth_batch(n):
    it = _iterator()
    for _ in range(n):
        next(it)
    return next(it)


@_IGNORE_ABANDONED_READS
def test_orbax_alone_restores_flipped_bytes_silently(tmp_path, mesh):
    """Why the manifest exists: orbax's chunks carry no checksum, so a flip may decode to other
    values without an error (or fail to decompress, depending on where it lands and on the chunk
    order of the async write). Flip at several offsets until one slips past orbax, then check that
    the Checkpointer catches that very corruption."""
    pristine = tmp_path / "pristine"
    states = _two_steps(pristine, mesh, big=True, data=False)
    target = abstract_state(states[2])
    largest = _largest_file(pristine / "2" / "state").relative_to(pristine)
    size = (pristine / largest).stat().st_size
    for i, fraction in enumerate(np.linspace(0.5, 0.95, 10)):
        directory = tmp_path / f"ck{i}"
        shutil.copytree(pristine, directory)
        _flip_at(directory / largest, int(size * fraction))
        raw = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
        try:
            got = raw.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        except Exception:  # noqa: BLE001 - orbax raises a bare Exception when decompression fails
            continue
        finally:
            raw.close()
        differs = [not np.array_equal(_bits(a), _bits(b))
                   for a, b in zip(jax.tree.leaves(got["state"]), jax.tree.leaves(states[2]))]
        if sum(differs) == 1:  # one leaf silently changed, no error from orbax
            break
    else:
        pytest.fail("orbax detected every flipped chunk: the premise of this test no longer holds")
    with Checkpointer(directory) as ckpt:
        with pytest.raises(CorruptCheckpointError,
                           match=r"checksum mismatch in leaf \S+\['embed'\] \(1 of 16 leaves"):
            ckpt.restore(target, step=2)
        assert ckpt.all_steps() == [1, 2]  # explicit step: raise, move nothing


def test_all_checkpoints_corrupt_raises_and_moves_nothing(tmp_path, mesh):
    directory = tmp_path / "ck"
    states = _two_steps(directory, mesh, big=True)
    for step in (1, 2):
        (directory / str(step) / "integrity" / "metadata").write_text("garbage")
    with Checkpointer(directory) as ckpt:
        with pytest.raises(NoValidCheckpointError) as info:
            ckpt.restore(abstract_state(states[1]))
    message = str(info.value)
    assert f"No valid checkpoint in {directory}" in message
    assert "step 2: its integrity manifest" in message
    assert "step 1: its integrity manifest" in message
    assert "Nothing was loaded or moved" in message
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]


@pytest.mark.slow
@_IGNORE_ABANDONED_READS
def test_every_file_flipped_truncated_or_deleted_never_loads_garbage(tmp_path, mesh):
    """Exhaustive: damage each file of the newest step in three ways; restore must give the exact
    newest state (file not needed for it) or fall back to the exact previous one."""
    template = tmp_path / "template"
    states = _two_steps(template, mesh, big=True)
    newest = template / "2"
    files = sorted(p.relative_to(newest) for p in newest.rglob("*") if p.is_file())
    assert len(files) > 15
    outcomes = {}
    for k, rel in enumerate(files):
        for mode in ("flip", "truncate", "delete"):
            directory = tmp_path / f"case{k}_{mode}"
            shutil.copytree(template, directory)
            target = directory / "2" / rel
            if mode == "flip":
                if target.stat().st_size == 0:
                    continue
                _flip_middle(target, n=1)
            elif mode == "truncate":
                target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
            else:
                target.unlink()
            it = _iterator()
            with Checkpointer(directory) as ckpt:
                restored, step = ckpt.restore(abstract_state(states[1]), data_iterator=it)
            assert_bit_equal(restored, states[step])
            np.testing.assert_array_equal(next(it), _nth_batch(step))
            outcomes[(str(rel), mode)] = step
            shutil.rmtree(directory)
    # The data files and manifests are always needed: damaging them must cause a fall back.
    for (rel, mode), step in outcomes.items():
        if rel.startswith(("integrity/metadata", "data/process_", "state/_METADATA")):
            assert step == 1, (rel, mode)
    assert 1 in outcomes.values() and 2 in outcomes.values()


def test_iterator_state_from_another_process_count_is_reported(tmp_path, mesh):
    directory = tmp_path / "ck"
    states = _two_steps(directory, mesh)
    for step in (1, 2):  # as if written by a 2-process job
        data = directory / str(step) / "data"
        (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
    with Checkpointer(directory) as ckpt:
        with pytest.raises(NoValidCheckpointError, match=(
                r"data-iterator file \S+process_0-of-1.json is missing \(was the checkpoint "
                r"written with a different number of processes than the current 1\?\)")):
            ckpt.restore(abstract_state(states[2]), data_iterator=_iterator())
        restored, step = ckpt.restore(abstract_state(states[2]))  # the model state alone loads
    assert step == 2
    assert_bit_equal(restored, states[2])


def test_garbled_metrics_file_is_set_aside_and_step_stays_restorable(tmp_path, mesh, caplog):
    directory = tmp_path / "ck"
    state = make_state(mesh)
    with Checkpointer(directory, best_metric="acc", async_save=False) as ckpt:
        ckpt.save(1, state, metrics={"acc": 0.5})
        ckpt.save(2, state, metrics={"acc": 0.7})
    (directory / "2" / "metrics" / "metrics").write_text('{"acc": 0.7')
    with caplog.at_level(logging.WARNING, logger="kdjax.checkpointing"):
        ckpt = Checkpointer(directory, best_metric="acc")
    assert "metrics file of checkpoint step 2 is garbled" in caplog.text
    assert (directory / "2" / "metrics" / "metrics.corrupt").exists()
    assert ckpt.best_step() == 1
    restored, step = ckpt.restore(abstract_state(state))
    assert step == 2
    assert_bit_equal(restored, state)
    ckpt.close()


# --------------------------------------------------------------------------------------------
# Write failures: disk full, crash at each phase.
# --------------------------------------------------------------------------------------------


def _fail_writes_into_tmp(monkeypatch, error):
    path_cls = type(epath.Path("/"))
    original = path_cls.write_text

    def write_text(self, *args, **kwargs):
        if ".orbax-checkpoint-tmp" in str(self):
            raise error(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(path_cls, "write_text", write_text)


@pytest.mark.parametrize("async_save", [False, True])
def test_disk_full_simulated_keeps_previous_checkpoint(tmp_path, mesh, monkeypatch, async_save):
    directory = tmp_path / "ck"
    states = _two_steps(directory, mesh)
    ckpt = Checkpointer(directory, async_save=async_save)
    _fail_writes_into_tmp(
        monkeypatch, lambda p: OSError(errno.ENOSPC, "No space left on device", str(p)))
    with pytest.raises(CheckpointDiskFullError) as info:
        ckpt.save(3, states[2], data_iterator=_iterator())
        ckpt.wait()  # with async_save the failure surfaces here
    monkeypatch.undo()
    err = info.value
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert f"No space left on device while writing checkpoint step 3 to {directory}" in str(err)
    assert "The last complete checkpoint (step 2) is intact" in str(err)
    assert ckpt.all_steps() == [1, 2]
    restored, step = ckpt.restore(abstract_state(states[2]))
    assert step == 2
    assert_bit_equal(restored, states[2])
    ckpt.close()


def test_other_write_failure_is_reported_with_step_and_directory(tmp_path, mesh, monkeypatch):
    directory = tmp_path / "ck"
    states = _two_steps(directory, mesh)
    ckpt = Checkpointer(directory, async_save=False)
    _fail_writes_into_tmp(monkeypatch, lambda p: PermissionError(errno.EACCES, "denied", str(p)))
    with pytest.raises(CheckpointSaveError) as info:
        ckpt.save(3, states[2], data_iterator=_iterator())
    monkeypatch.undo()
    assert not isinstance(info.value, CheckpointDiskFullError)
    assert f"Writing checkpoint step 3 to {directory} failed (PermissionError" in str(info.value)
    assert "(step 2) is intact" in str(info.value)
    assert ckpt.all_steps() == [1, 2]
    ckpt.close()


_REAL_DISK_FULL = textwrap.dedent("""
    import os, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp
    from kdjax.checkpointing import Checkpointer, CheckpointDiskFullError, abstract_state
    ckpt = Checkpointer(sys.argv[1], async_save=True)
    small = {"w": jnp.ones(8)}
    ckpt.save(1, small); ckpt.wait()
    try:
        ckpt.save(2, {"w": jax.random.normal(jax.random.key(0), (300_000,))}); ckpt.wait()
    except CheckpointDiskFullError as e:
        print("DISKFULL", e)
    restored, step = ckpt.restore(abstract_state(small))
    print("RESTORED", step, float(restored["w"].sum()))
""")


def _can_mount_tmpfs():
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare -rm to mount a tiny tmpfs")
def test_disk_full_on_a_real_full_filesystem(tmp_path):
    """TensorStore's real ENOSPC (a 512 KiB tmpfs) is classified as disk full."""
    script = tmp_path / "fill.py"
    script.write_text(_REAL_DISK_FULL)
    mount = tmp_path / "tiny"
    mount.mkdir()
    cmd = (f"mount -t tmpfs -o size=512k tmpfs {mount} && "
           f"{sys.executable} {script} {mount}/ck")
    out = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    expected = f"DISKFULL No space left on device while writing checkpoint step 2 to {mount}/ck"
    assert expected in out.stdout
    assert "The last complete checkpoint (step 1) is intact" in out.stdout
    assert "RESTORED 1 8.0" in out.stdout


def _crash_during(monkeypatch, phase):
    """Makes save number 3 die at ``phase``: while items are written, or at the final rename."""
    if phase == "writing_items":
        def save(self, directory, args):
            raise RuntimeError("simulated crash while writing")
        monkeypatch.setattr(ck._IteratorStateHandler, "save", save)
    else:
        path_cls = type(epath.Path("/"))
        original = path_cls.rename

        def rename(self, target):
            if self.name == "3.orbax-checkpoint-tmp":
                raise RuntimeError("simulated crash before the commit rename")
            return original(self, target)
        monkeypatch.setattr(path_cls, "rename", rename)


@pytest.mark.parametrize("phase", ["writing_items", "committing"])
def test_crash_at_each_save_phase_leaves_last_good_step(tmp_path, mesh, monkeypatch, phase):
    directory = tmp_path / "ck"
    states = _two_steps(directory, mesh)
    ckpt = Checkpointer(directory, async_save=False)
    _crash_during(monkeypatch, phase)
    with pytest.raises(CheckpointSaveError, match="simulated crash"):
        ckpt.save(3, make_state(mesh, seed=3), data_iterator=_iterator())
    monkeypatch.undo()
    # Steps 1 and 2 intact, step 3 never committed; whether orbax's tmp dir of step 3 is still there
    # depends on how far its concurrent item writers got, so it may or may not remain.
    leftovers = sorted(p.name for p in directory.iterdir())
    assert leftovers in (["1", "2"], ["1", "2", "3.orbax-checkpoint-tmp"]), leftovers
    # A restarted run (new Checkpointer) sees step 2 as the newest and loads it exactly.
    restarted = Checkpointer(directory)
    restored, step = restarted.restore(abstract_state(states[2]))
    assert step == 2
    assert_bit_equal(restored, states[2])
    restarted.close()


_KILL_DURING_SAVE = textwrap.dedent("""
    import os, pathlib, signal, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    import grain, jax, jax.numpy as jnp
    from etils import epath
    from kdjax import checkpointing as ck
    directory, phase = sys.argv[1], sys.argv[2]

    def state(seed):
        return {"w": jax.random.normal(jax.random.key(seed), (64,)), "step": jnp.int32(seed)}

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    ckpt = ck.Checkpointer(directory, max_to_keep=2, async_save=True)
    for s in (1, 2):
        ckpt.save(s, state(s)); ckpt.wait()
    path_cls = type(epath.Path("/"))
    if phase == "writing_items":
        ck._IteratorStateHandler.save = die
    elif phase == "committing":
        rename = path_cls.rename
        path_cls.rename = (
            lambda self, t: die() if self.name == "3" + ck._TMP_MARKER else rename(self, t))
    else:  # deleting_old_step: killed half-way through removing step 1 after step 3 committed
        def rmtree(self, *args, **kwargs):
            files = sorted(p for p in pathlib.Path(str(self)).rglob("*") if p.is_file())
            for f in files[: len(files) // 2]:
                f.unlink()
            die()
        path_cls.rmtree = rmtree
    it = iter(grain.MapDataset.range(10).to_iter_dataset())
    ckpt.save(3, state(3), data_iterator=it)
    ckpt.wait()
    print("NOT KILLED")
""")


@pytest.mark.slow
@pytest.mark.parametrize("phase, newest", [("writing_items", 2), ("committing", 2),
                                           ("deleting_old_step", 3)])
def test_sigkill_at_each_save_phase(tmp_path, phase, newest):
    """A real SIGKILL inside save: the newest committed step restores exactly, never garbage."""
    script = tmp_path / "kill.py"
    script.write_text(_KILL_DURING_SAVE)
    directory = tmp_path / "ck"
    out = subprocess.run([sys.executable, str(script), str(directory), phase], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stdout + out.stderr[-3000:]

    def state(seed):
        return {"w": jax.random.normal(jax.random.key(seed), (64,)),
                "step": jnp.asarray(seed, jnp.int32)}

    with Checkpointer(directory) as ckpt:
        restored, step = ckpt.restore(abstract_state(state(0)))
        assert step == newest
        assert_bit_equal(restored, state(newest))
        if phase == "deleting_old_step":  # step 1 is half deleted but still listed
            assert ckpt.all_steps() == [1, 2, 3]
            with pytest.raises(CorruptCheckpointError, match="Checkpoint step 1 .* is corrupt"):
                ckpt.restore(abstract_state(state(0)), step=1)


def test_readers_never_see_a_step_before_it_is_committed(tmp_path, mesh, monkeypatch):
    directory = tmp_path / "ck"
    states = _two_steps(directory, mesh, data=False)
    release, started = threading.Event(), threading.Event()
    original = ck._IteratorStateHandler.save

    def slow_save(self, d, args):
        started.set()
        release.wait(30)
        return original(self, d, args)

    monkeypatch.setattr(ck._IteratorStateHandler, "save", slow_save)
    ckpt = Checkpointer(directory, async_save=False)
    writer = threading.Thread(
        target=lambda: ckpt.save(3, make_state(mesh, seed=3), data_iterator=_iterator()))
    writer.start()
    assert started.wait(30)
    reader = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
    assert reader.latest_step() == 2
    assert (directory / "3.orbax-checkpoint-tmp").is_dir() and not (directory / "3").exists()
    release.set()
    writer.join(30)
    reader.reload()
    assert reader.latest_step() == 3
    reader.close()
    ckpt.close()
