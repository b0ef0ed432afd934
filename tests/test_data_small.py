"""kdjax.data on in-memory arrays: MNIST-1D, digits, the shared grain pipeline, prefetch_to_device."""

import random
import threading

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kdjax import data
from kdjax.data import pipeline

KEYS_TRAIN = {"image", "label", "id", "epoch", "mask"}


def _arrays(n, shape=(3,), seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(n, *shape)).astype(np.float32),
        "label": rng.integers(0, 10, size=n).astype(np.int64),
    }


def _noise_transform(record, rng):
    """A random transform: image + N(0, 1) noise drawn from the per-example generator."""
    return {"image": record["image"] + rng.normal(size=record["image"].shape).astype(np.float32),
            "label": record["label"]}


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]), err_msg=key)


# ----------------------------------------------------------------------------- MNIST-1D, digits


def test_mnist1d_matches_published_generator_and_leaves_global_rng(tmp_path, monkeypatch):
    import requests
    from mnist1d.data import get_dataset_args, make_dataset

    def no_network(*args, **kwargs):
        raise AssertionError("mnist1d_arrays must not touch the network")

    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.chdir(tmp_path)
    np.random.seed(123)
    random.seed(7)
    numpy_before, python_before = np.random.get_state()[1].copy(), random.getstate()
    arrays = data.mnist1d_arrays()
    np.testing.assert_array_equal(np.random.get_state()[1], numpy_before)
    assert random.getstate() == python_before
    assert list(tmp_path.iterdir()) == []  # nothing written to the working directory

    reference = make_dataset(get_dataset_args())
    assert arrays["train"]["image"].shape == (4000, 40, 1)
    assert arrays["test"]["image"].shape == (1000, 40, 1)
    assert arrays["train"]["image"].dtype == np.float32 and arrays["train"]["label"].dtype == np.int32
    np.testing.assert_allclose(arrays["train"]["image"][..., 0], reference["x"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(arrays["test"]["image"][..., 0], reference["x_test"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(arrays["train"]["label"], reference["y"])
    np.testing.assert_array_equal(arrays["test"]["label"], reference["y_test"])
    # Callers get their own copies (the generator result is cached).
    arrays["train"]["image"][:] = 0
    assert np.abs(data.mnist1d_arrays()["train"]["image"]).sum() > 0


def test_mnist1d_larger_variant_and_seed():
    arrays = data.mnist1d_arrays(num_samples=6000)
    assert arrays["train"]["image"].shape == (4800, 40, 1)
    assert arrays["test"]["image"].shape == (1200, 40, 1)
    assert np.bincount(np.concatenate([arrays["train"]["label"], arrays["test"]["label"]])).tolist() == [600] * 10
    other = data.mnist1d_arrays(num_samples=100, seed=1)
    same = data.mnist1d_arrays(num_samples=100, seed=1)
    different = data.mnist1d_arrays(num_samples=100, seed=2)
    np.testing.assert_array_equal(other["train"]["image"], same["train"]["image"])
    assert not np.array_equal(other["train"]["image"], different["train"]["image"])


@pytest.mark.parametrize("bad", [0, 5, 2.5, "1000"])
def test_mnist1d_rejects_bad_num_samples(bad):
    with pytest.raises(ValueError, match="num_samples must be None"):
        data.mnist1d_arrays(num_samples=bad)


def test_mnist1d_rejects_bad_seed():
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        data.mnist1d_arrays(seed=-1)


def test_digits_split_is_stratified_disjoint_covering_and_standardised():
    from sklearn.datasets import load_digits

    digits = load_digits()
    arrays = data.digits_arrays(test_fraction=0.2, seed=0)
    train, test = arrays["train"], arrays["test"]
    assert train["image"].shape[1:] == (8, 8, 1) and train["image"].dtype == np.float32
    assert train["label"].dtype == np.int32
    assert len(train["label"]) + len(test["label"]) == 1797
    counts = np.bincount(digits.target, minlength=10)
    np.testing.assert_array_equal(np.bincount(test["label"], minlength=10), np.round(0.2 * counts))
    # Undo the standardisation: raw pixels are 0..16 and the train split holds both extremes.
    lo, hi = float(train["image"].min()), float(train["image"].max())
    std = 16.0 / (hi - lo)
    mean = -lo * std

    def rows(split):
        raw = split["image"][..., 0].astype(np.float64) * std + mean
        assert np.abs(raw - np.rint(raw)).max() < 1e-3
        return [(np.rint(p).astype(np.int64).tobytes(), int(l)) for p, l in zip(raw, split["label"])]

    expected = [(p.astype(np.int64).tobytes(), int(l)) for p, l in zip(digits.images, digits.target)]
    assert sorted(rows(train) + rows(test)) == sorted(expected)  # disjoint and covering
    # mean and std are the train split's pixel statistics (float64 reference).
    train_raw = np.stack([np.frombuffer(p, np.int64) for p, _ in rows(train)]).astype(np.float64)
    np.testing.assert_allclose([mean, std], [train_raw.mean(), train_raw.std()], rtol=1e-5)


def test_digits_seeded_and_validated():
    a, b, c = data.digits_arrays(seed=3), data.digits_arrays(seed=3), data.digits_arrays(seed=4)
    np.testing.assert_array_equal(a["test"]["image"], b["test"]["image"])
    assert not np.array_equal(a["test"]["image"], c["test"]["image"])
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="test_fraction must be in"):
            data.digits_arrays(test_fraction=bad)


# ----------------------------------------------------------------------------- ArraySource


def test_array_source_records_and_errors():
    arrays = _arrays(5)
    source = data.ArraySource(arrays)
    assert len(source) == 5
    np.testing.assert_array_equal(source[3]["image"], arrays["image"][3])
    with pytest.raises(TypeError, match="arrays must be a mapping"):
        data.ArraySource([1, 2, 3])
    with pytest.raises(ValueError, match=r"missing key\(s\) \['label'\]"):
        data.ArraySource({"image": np.zeros((3, 2))})
    with pytest.raises(ValueError, match="same non-zero leading length"):
        data.ArraySource({"image": np.zeros((3, 2)), "label": np.zeros(4)})
    with pytest.raises(ValueError, match="same non-zero leading length"):
        data.ArraySource({"image": np.zeros((0, 2)), "label": np.zeros(0)})


# ----------------------------------------------------------------------------- train iterator


def test_train_batches_cover_each_epoch_once_and_rows_match_records():
    arrays = _arrays(24)
    it = data.make_train_iterator(data.ArraySource(arrays), global_batch_size=8, seed=5)
    batches = _take(it, 6)  # two epochs of 3 batches
    for batch in batches:
        assert set(batch) == KEYS_TRAIN
        assert batch["image"].shape == (8, 3) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32 and batch["id"].dtype == np.int64
        assert batch["epoch"].dtype == np.int32 and batch["mask"].dtype == np.bool_
        assert batch["mask"].all()
        np.testing.assert_array_equal(batch["image"], arrays["image"][batch["id"]])
        np.testing.assert_array_equal(batch["label"], arrays["label"][batch["id"]])
    ids = np.concatenate([b["id"] for b in batches])
    epochs = np.concatenate([b["epoch"] for b in batches])
    np.testing.assert_array_equal(epochs, np.repeat([0, 1], 24))
    assert sorted(ids[:24]) == list(range(24)) and sorted(ids[24:]) == list(range(24))
    assert not np.array_equal(ids[:24], ids[24:])  # reshuffled each epoch
    assert not np.array_equal(ids[:24], np.arange(24))


def test_train_is_deterministic_given_seed():
    source = data.ArraySource(_arrays(30))
    make = lambda seed: data.make_train_iterator(source, global_batch_size=6, seed=seed)
    _assert_batches_equal(_take(make(1), 7), _take(make(1), 7))
    assert not np.array_equal(next(make(1))["id"], next(make(2))["id"])


def test_batches_straddle_epochs_and_finite_epochs_stop():
    source = data.ArraySource(_arrays(10))
    it = data.make_train_iterator(source, global_batch_size=4, seed=0, num_epochs=2)
    batches = list(it)
    assert len(batches) == 5  # 20 examples, 4 per batch
    np.testing.assert_array_equal(batches[2]["epoch"], [0, 0, 1, 1])
    it = data.make_train_iterator(source, global_batch_size=3, seed=0, num_epochs=1)
    assert len(list(it)) == 3  # 10 // 3, the partial batch is dropped


def test_augmentation_is_a_pure_function_of_seed_epoch_id():
    arrays = _arrays(12)
    source = data.ArraySource(arrays)
    # Same data seen through different host layouts and batch sizes: every row is
    # train_example(source, id, seed, epoch), whoever produced it.
    layouts = [dict(global_batch_size=4, process_count=1, process_index=0),
               dict(global_batch_size=6, process_count=3, process_index=2)]
    seen = {}
    for layout in layouts:
        it = data.make_train_iterator(source, seed=9, transform=_noise_transform, num_threads=2, **layout)
        for batch in _take(it, 5):
            for row in range(batch["id"].shape[0]):
                key = (int(batch["epoch"][row]), int(batch["id"][row]))
                expected = data.train_example(source, key[1], seed=9, epoch=key[0], transform=_noise_transform)
                np.testing.assert_array_equal(batch["image"][row], expected["image"])
                seen.setdefault(key[1], set()).add(key[0])
    noisy = {e: data.train_example(source, 0, seed=9, epoch=e, transform=_noise_transform)["image"] for e in (0, 1)}
    assert not np.array_equal(noisy[0], noisy[1])  # a new view every epoch
    np.testing.assert_array_equal(data.example_rng(1, 2, 3).normal(size=4), np.random.default_rng([1, 2, 3]).normal(size=4))


@pytest.mark.parametrize("num_records,process_count", [(24, 3), (100, 3), (11, 5)])
def test_hosts_are_disjoint_covering_and_balanced(num_records, process_count):
    source = data.ArraySource(_arrays(num_records))
    per_host = num_records // process_count
    epochs = 3
    streams = []
    for host in range(process_count):
        it = data.make_train_iterator(
            source, global_batch_size=process_count, seed=4, process_index=host,
            process_count=process_count, num_epochs=epochs)
        batches = list(it)
        assert len(batches) == per_host * epochs  # local batch 1: equal step counts on every host
        streams.append((np.concatenate([b["epoch"] for b in batches]), np.concatenate([b["id"] for b in batches])))
    dropped = []
    for epoch in range(epochs):
        shares = [ids[epochs_of == epoch] for epochs_of, ids in streams]
        assert all(len(share) == per_host for share in shares)
        union = np.concatenate(shares)
        assert len(np.unique(union)) == per_host * process_count  # disjoint
        dropped.append(sorted(set(range(num_records)) - set(union.tolist())))
        assert len(dropped[-1]) == num_records % process_count
    if num_records % process_count:
        assert len({tuple(d) for d in dropped}) > 1  # the remainder changes between epochs


def test_train_iterator_errors():
    source = data.ArraySource(_arrays(10))
    with pytest.raises(ValueError, match=r"global_batch_size=10 is not divisible by process_count=4.*e\.g\. 8 or 12"):
        data.make_train_iterator(source, global_batch_size=10, seed=0, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="global_batch_size must be a positive integer"):
        data.make_train_iterator(source, global_batch_size=0, seed=0)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
        data.make_train_iterator(source, global_batch_size=2, seed=-1)
    with pytest.raises(ValueError, match=r"process_index must be an integer in \[0, process_count=2\)"):
        data.make_train_iterator(source, global_batch_size=2, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="process_count must be a positive integer"):
        data.make_train_iterator(source, global_batch_size=2, seed=0, process_index=0, process_count=0)
    with pytest.raises(ValueError, match="10 records but there are process_count=12 hosts"):
        data.make_train_iterator(source, global_batch_size=12, seed=0, process_index=0, process_count=12)
    with pytest.raises(ValueError, match="fewer than one local batch of 16"):
        data.make_train_iterator(source, global_batch_size=16, seed=0, num_epochs=1)
    with pytest.raises(ValueError, match="num_epochs must be None or a positive integer"):
        data.make_train_iterator(source, global_batch_size=2, seed=0, num_epochs=0)
    with pytest.raises(ValueError, match="num_threads and prefetch_buffer_size must be >= 0"):
        data.make_train_iterator(source, global_batch_size=2, seed=0, num_threads=-1)
    with pytest.raises(TypeError, match="source must support len"):
        data.make_train_iterator(42, global_batch_size=2, seed=0)
    with pytest.raises(ValueError, match="source is empty"):
        data.make_train_iterator([], global_batch_size=2, seed=0)
    bad = data.make_train_iterator(source, global_batch_size=2, seed=0, transform=lambda r, g: {"x": 1})
    with pytest.raises(ValueError, match=r"transform must return a mapping with 'image' and 'label'; got keys \['x'\]"):
        next(bad)


# ----------------------------------------------------------------------------- resuming


def test_state_round_trip_resumes_exactly_across_epochs():
    source = data.ArraySource(_arrays(10))
    make = lambda: data.make_train_iterator(source, global_batch_size=4, seed=3, transform=_noise_transform)
    reference = _take(make(), 8)
    it = make()
    _take(it, 3)
    state = it.get_state()
    resumed = make()
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 5), reference[3:])


def test_orbax_checkpoint_of_iterator_gives_identical_next_batches(tmp_path):
    source = data.ArraySource(_arrays(20))
    make = lambda: data.make_train_iterator(source, global_batch_size=4, seed=11, num_threads=2)
    reference = _take(make(), 6)
    it = make()
    _take(it, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    fresh = make()
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    _assert_batches_equal(_take(fresh, 4), reference[2:])


# ----------------------------------------------------------------------------- eval


@pytest.mark.parametrize("num_records,global_batch,process_count", [(10, 4, 2), (10, 5, 1), (3, 8, 2), (8, 4, 2)])
def test_eval_pads_last_batch_and_masks_exactly_the_padding(num_records, global_batch, process_count):
    arrays = _arrays(num_records)
    source = data.ArraySource(arrays)
    num_batches = data.eval_num_batches(num_records, global_batch)
    assert num_batches == -(-num_records // global_batch)
    local = global_batch // process_count
    host_batches = [list(data.make_eval_iterator(source, global_batch_size=global_batch,
                                                 process_index=h, process_count=process_count))
                    for h in range(process_count)]
    assert all(len(b) == num_batches for b in host_batches)
    for batches in host_batches:
        for batch in batches:
            assert set(batch) == {"image", "label", "id", "mask"}
            assert batch["image"].shape == (local, 3) and batch["mask"].dtype == np.bool_
            np.testing.assert_array_equal(batch["image"], arrays["image"][batch["id"]])
    # Assemble global batches in host order: positions 0..num_batches*G-1.
    ids = np.concatenate([np.concatenate([hb[b]["id"] for hb in host_batches]) for b in range(num_batches)])
    mask = np.concatenate([np.concatenate([hb[b]["mask"] for hb in host_batches]) for b in range(num_batches)])
    positions = np.arange(num_batches * global_batch)
    np.testing.assert_array_equal(mask, positions < num_records)
    np.testing.assert_array_equal(ids, positions % num_records)
    np.testing.assert_array_equal(np.sort(ids[mask]), np.arange(num_records))  # every record once
    # A masked mean over the padded batches equals the plain mean over the split.
    values = arrays["image"][ids, 0].astype(np.float64)
    np.testing.assert_allclose((values * mask).sum() / mask.sum(), arrays["image"][:, 0].astype(np.float64).mean())


def test_eval_iterator_errors():
    source = data.ArraySource(_arrays(10))
    with pytest.raises(ValueError, match="global_batch_size=6 is not divisible by process_count=4"):
        data.make_eval_iterator(source, global_batch_size=6, process_index=0, process_count=4)


# ----------------------------------------------------------------------------- prefetch_to_device


@pytest.fixture(scope="module")
def data_sharding():
    assert jax.device_count() == 8, "tests/conftest.py sets 8 CPU devices"
    mesh = jax.make_mesh((8,), ("data",))
    return NamedSharding(mesh, P("data"))


def test_prefetch_to_device_gives_sharded_global_arrays(data_sharding):
    arrays = _arrays(40, shape=(5, 2))
    source = data.ArraySource(arrays)
    host = _take(data.make_train_iterator(source, global_batch_size=16, seed=0), 3)
    dev = data.prefetch_to_device(data.make_train_iterator(source, global_batch_size=16, seed=0), data_sharding, size=2)
    for expected in host:
        batch = next(dev)
        assert set(batch) == KEYS_TRAIN
        for key, value in batch.items():
            assert isinstance(value, jax.Array)
            assert value.sharding == data_sharding
            assert value.shape == expected[key].shape
            assert len(value.addressable_shards) == 8
            assert value.addressable_shards[0].data.shape[0] == 2  # 16 rows over 8 devices
            np.testing.assert_array_equal(np.asarray(value), expected[key])
        assert batch["id"].dtype == np.int32  # int64 ids cast to 32 bits with x64 off
        assert batch["image"].dtype == np.float32
    dev.close()


def test_prefetch_state_is_that_of_the_last_returned_batch(data_sharding, tmp_path):
    source = data.ArraySource(_arrays(30))
    make = lambda: data.make_train_iterator(source, global_batch_size=8, seed=2)
    reference = _take(make(), 8)
    dev = data.prefetch_to_device(make(), data_sharding, size=3)
    _take(dev, 3)
    threading.Event().wait(0.2)  # let the producer run ahead
    state = dev.get_state()
    assert state == {"next_index": 3}  # batches: one grain element per host batch
    resumed = make()
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 1), reference[3:4])
    # Orbax round trip of the prefetching iterator itself.
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(dev)))
        manager.wait_until_finished()
    _take(dev, 2)
    fresh = data.prefetch_to_device(make(), data_sharding)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    _assert_batches_equal(_take(fresh, 2), reference[3:5])
    # set_state on a running prefetcher rewinds it.
    dev.set_state({"next_index": 1})
    _assert_batches_equal(_take(dev, 2), reference[1:3])
    dev.close()
    fresh.close()


def test_prefetch_finite_iterator_stops_and_applies_device_fn(data_sharding):
    source = data.ArraySource(_arrays(16))
    it = data.make_eval_iterator(source, global_batch_size=8)
    double = jax.jit(lambda b: {**b, "image": b["image"] * 2})
    batches = list(data.prefetch_to_device(it, data_sharding, device_fn=double))
    assert len(batches) == 2
    expected = list(data.make_eval_iterator(source, global_batch_size=8))
    for got, want in zip(batches, expected):
        np.testing.assert_allclose(np.asarray(got["image"]), 2 * want["image"])


def test_prefetch_errors(data_sharding):
    source = data.ArraySource(_arrays(16))
    with pytest.raises(ValueError, match="size must be a positive integer"):
        data.prefetch_to_device(iter([]), data_sharding, size=0)
    with pytest.raises(TypeError, match="sharding must be a jax.sharding.Sharding"):
        data.prefetch_to_device(iter([]), P("data"))
    plain = data.prefetch_to_device(iter([{"image": np.zeros((8, 2), np.float32)}]), data_sharding)
    with pytest.raises(TypeError, match="has no get_state/set_state"):
        plain.get_state()
    with pytest.raises(TypeError, match="has no get_state/set_state"):
        plain.set_state({})
    partial = data.prefetch_to_device(iter([{"image": np.zeros((8, 2), np.float32), "id": np.zeros(8, np.int64)}]),
                                      {"image": data_sharding})
    with pytest.raises(ValueError, match=r"no entry for batch key 'id' \(keys: \['image'\]\)"):
        next(partial)
    big = [{"id": np.full((8,), 2**40, np.int64)}]
    with pytest.raises(ValueError, match=r"batch\['id'\] has values .* do not fit int32"):
        next(data.prefetch_to_device(iter(big), data_sharding))

    def failing():
        yield from data.make_eval_iterator(source, global_batch_size=8)
        raise RuntimeError("reader failed")

    dev = data.prefetch_to_device(failing(), data_sharding)
    _take(dev, 2)
    with pytest.raises(RuntimeError, match="reader failed"):
        next(dev)


PREFETCH_LEFT_OPEN = """
import gc, sys, threading
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
from kdjax import data

source = data.ArraySource(data.digits_arrays()["train"])
mesh = jax.make_mesh((jax.device_count(),), ("data",))
first = data.prefetch_to_device(data.make_train_iterator(source, global_batch_size=16, seed=0),
                                NamedSharding(mesh, P("data")))
next(first)  # its thread now waits, the queue full, for the batch after the next
del first
gc.collect()
assert not any(t.name == "kdjax-prefetch-to-device" for t in threading.enumerate()), "leaked"
left_open = data.prefetch_to_device(data.make_train_iterator(source, global_batch_size=16, seed=0),
                                    NamedSharding(mesh, P("data")))
next(left_open)  # never closed: the interpreter exits with its thread running
"""


def test_prefetch_thread_stops_when_collected_and_at_exit():
    """An iterator nobody closes: collected, its thread stops; alive at interpreter exit, its
    thread is stopped first (it used to abort the process: 'terminate called without an active
    exception', exit status 134)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", PREFETCH_LEFT_OPEN], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "terminate called" not in proc.stderr


def test_pipeline_module_imports_no_tensorflow():
    import subprocess
    import sys

    code = ("import sys, kdjax.data; "
            "assert 'tensorflow' not in sys.modules and 'tensorflow_datasets' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert pipeline.example_rng is data.example_rng
