"""View-keyed logit stores (issue 19): the teacher's outputs on the exact augmented views a run draws.

The reference everywhere is the live teacher run on the views the train iterator yields (or on
``kdjax.data.train_example``): a view store must hold exactly that, per ``(epoch, id)``, on any host
layout, and a KD run reading it must equal the same run with the live teacher (full store) or stay
within the top-k bound (``losses.kd_kl_topk_bound``) of it.
"""
import dataclasses
import functools
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from PIL import Image

from kdjax import data, logit_store as ls, loop, losses, models, recipe, sharding, teachers

SEED, EPOCHS = 5, (0, 2)


def augment(record, rng):
    """The demo notebook's augmentation: [40, 1] signal -> roll by a shift in [-4, 4] plus N(0, 0.2^2)."""
    image = np.roll(record["image"], rng.integers(-4, 5), axis=0)
    image = image + 0.2 * rng.standard_normal(image.shape)
    return {"image": image.astype(np.float32), "label": record["label"]}


@pytest.fixture(scope="module")
def mnist1d():
    arrays = data.mnist1d_arrays(num_samples=200)  # 160 train, 40 test
    return {split: data.ArraySource(a) for split, a in arrays.items()}


@pytest.fixture(scope="module")
def mlp_teacher():
    module = models.create("mlp", 10, width=32)
    variables = module.init(jax.random.PRNGKey(7), np.zeros((1, 40, 1), np.float32))
    return teachers.from_linen(module), variables


def live_logits(teacher, variables, images):
    """The reference: the live teacher on these images."""
    return np.asarray(teacher(variables, {"image": np.asarray(images)}).logits)


def view_spec(source, tf, **overrides):
    kwargs = dict(dataset="mnist1d", split="train", num_examples=len(source), num_classes=10,
                  teacher="mlp-test", preprocessing="mnist1d-standardised", dtype="float32",
                  epochs=EPOCHS, seed=SEED, transform=data.transform_fingerprint(tf))
    kwargs.update(overrides)
    return ls.StoreSpec(**kwargs)


def precompute_views(path, spec, source, transform, teacher, variables, *, process_count=1,
                     global_batch_size=24):
    """Every writer process's pass over its part of the views, then finalize."""
    for index in range(process_count):
        views = data.make_view_iterator(source, global_batch_size=global_batch_size, seed=spec.seed,
                                        epochs=spec.epochs, transform=transform, process_index=index,
                                        process_count=process_count)
        with ls.LogitStoreWriter(path, spec, process_index=index, process_count=process_count) as w:
            ls.precompute(teacher, variables, views, w, show_progress=False)
    ls.finalize(path, process_count)
    return ls.LogitStore.open(path, spec=spec)


# ---------------------------------------------------------------------------------------------
# Spec and the view iterator
# ---------------------------------------------------------------------------------------------



def assert_same_rows(store, reference, tol: float) -> None:
    """Every ``(epoch, id)`` row of the 3 epochs x 160 ids of ``store`` equals ``reference``'s
    (within ``tol``; 0: bit for bit), in dtype and shape too."""
    ids, epochs = np.tile(np.arange(160), 3), np.repeat([0, 1, 2], 160)
    for key in reference.batch_keys:
        a, b = store.lookup(ids, epochs)[key], reference.lookup(ids, epochs)[key]
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)

def test_view_spec_fields_round_trip_and_old_stores_read_as_one_view(mnist1d):
    spec = view_spec(mnist1d["train"], augment, format="topk", k=3)
    assert spec.views and spec.num_epochs == 3 and spec.num_rows == 3 * 160
    assert spec.epochs == (0, 2) and isinstance(spec.epochs, tuple)
    back = ls.StoreSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back == spec and back.epochs == (0, 2)
    old = {k: v for k, v in spec.to_dict().items() if k not in ("epochs", "seed", "transform")}
    centre = ls.StoreSpec.from_dict(old)  # metadata written before views existed
    assert not centre.views and centre.num_rows == 160 and centre.epochs is None


@pytest.mark.parametrize("overrides, message", [
    (dict(seed=None), r"a view store needs epochs, seed and transform together; seed is None"),
    (dict(epochs=None, transform=None), r"epochs, transform are None"),
    (dict(epochs=(3, 1)), r"StoreSpec.epochs must be \(first, last\) with 0 <= first <= last"),
    (dict(epochs=(0, 1, 2)), r"StoreSpec.epochs must be \(first, last\)"),
    (dict(seed=-1), r"StoreSpec.seed must be an integer in \[0, 2\*\*32\)"),
    (dict(transform=""), r"StoreSpec.transform must be a non-empty string"),
])
def test_view_spec_validation(mnist1d, overrides, message):
    with pytest.raises(ValueError, match=message):
        view_spec(mnist1d["train"], augment, **overrides)


def test_transform_fingerprint_follows_code_and_parameters():
    fp = data.transform_fingerprint
    assert fp(None) == "identity"
    assert fp(augment) == fp(augment) and fp(augment).startswith("test_view_store.augment@")
    a = functools.partial(data.imagenet_train_transform, image_size=16)
    b = functools.partial(data.imagenet_train_transform, image_size=32)
    assert fp(a) != fp(b) and "image_size=16" in fp(a)
    assert fp(a) == fp(functools.partial(data.imagenet_train_transform, image_size=16))

    def noise(scale):
        def transform(record, rng):
            return {"image": record["image"] + scale * rng.standard_normal(), "label": record["label"]}
        return transform
    assert fp(noise(0.1)) != fp(noise(0.2))  # a closure's captured parameter
    assert fp(noise(0.1)) == fp(noise(0.1))

    def other(record, rng):  # same parameters, other code
        return {"image": record["image"] * 2, "label": record["label"]}

    def other2(record, rng):
        return {"image": record["image"] * 3, "label": record["label"]}
    assert fp(other).split("@")[1] != fp(other2).split("@")[1]
    words = frozenset(f"w{i}" for i in range(20))
    assert fp(functools.partial(augment, words)) == fp(functools.partial(augment, frozenset(sorted(words))))
    script = ("import functools; from kdjax import data; from test_view_store import augment; "
              "print(data.transform_fingerprint(functools.partial(augment, scale=frozenset("
              "'w%d' % i for i in range(20)))))")
    runs = {subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONHASHSEED": str(seed),
                                                               "PYTHONPATH": os.path.dirname(__file__)},
                           capture_output=True, text=True, check=True).stdout for seed in (1, 2)}
    assert len(runs) == 1  # the same in every process, whatever the hash seed
    pinned = functools.partial(augment)
    pinned.kdjax_fingerprint = "demo-shift-noise:v1"
    assert fp(pinned).startswith("demo-shift-noise:v1@")
    with pytest.raises(TypeError, match="transform must be a callable"):
        fp(3)


def test_view_iterator_rows_are_the_train_views_of_every_epoch_and_id(mnist1d):
    source = mnist1d["train"]
    rows = {}
    for host in range(3):  # 3 hosts, padded: every (epoch, id) exactly once among the real rows
        it = data.make_view_iterator(source, global_batch_size=21, seed=SEED, epochs=(1, 2),
                                     transform=augment, process_index=host, process_count=3)
        batches = list(it)
        assert len(batches) == data.view_num_batches(160, (1, 2), 21) == 16
        for b in batches:
            assert b["image"].shape == (7, 40, 1) and b["image"].dtype == np.float32
            assert b["epoch"].dtype == np.int32 and b["id"].dtype == np.int64 and b["mask"].dtype == bool
            for r in np.flatnonzero(b["mask"]):
                key = (int(b["epoch"][r]), int(b["id"][r]))
                assert key not in rows
                rows[key] = b["image"][r]
    assert sorted(rows) == [(e, i) for e in (1, 2) for i in range(160)]
    for key in [(1, 0), (2, 159), (1, 77)]:
        expect = data.train_example(source, key[1], seed=SEED, epoch=key[0], transform=augment)
        np.testing.assert_array_equal(rows[key], expect["image"])
    with pytest.raises(ValueError, match=r"epochs must be \(first, last\)"):
        data.make_view_iterator(source, global_batch_size=4, seed=0, epochs=(2, 1))


# ---------------------------------------------------------------------------------------------
# The store holds the live teacher's outputs on the train views
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["full", "topk"])
def test_view_store_holds_the_live_teacher_on_every_train_view(tmp_path, mnist1d, mlp_teacher, fmt):
    source = mnist1d["train"]
    teacher, variables = mlp_teacher
    k = 4 if fmt == "topk" else None
    spec = view_spec(source, augment, format=fmt, k=k)
    store = precompute_views(str(tmp_path / "s"), spec, source, augment, teacher, variables,
                             process_count=2)
    meta = json.load(open(tmp_path / "s" / "metadata.json"))
    assert meta["spec"]["epochs"] == [0, 2] and meta["spec"]["seed"] == SEED
    assert meta["spec"]["transform"] == data.transform_fingerprint(augment)
    assert np.load(tmp_path / "s" / "index.npy").shape == (3 * 160, 2)
    # The student's pipeline on two host layouts: every row's stored outputs are the live
    # teacher's on that very row's image.
    for layout in (dict(process_count=1, process_index=0), dict(process_count=3, process_index=1)):
        it = data.make_train_iterator(source, global_batch_size=12, seed=SEED, transform=augment,
                                      num_epochs=3, **layout)
        n = 0
        for batch in it:
            out = store.add_to_batch(batch)
            live = live_logits(teacher, variables, batch["image"])
            if fmt == "full":
                assert out["teacher_logits"].dtype == np.float32
                assert out["teacher_logits"].shape == (batch["id"].size, 10)
                np.testing.assert_allclose(out["teacher_logits"], live, rtol=1e-5, atol=1e-5)
            else:
                assert out["teacher_topk_values"].dtype == np.float32
                assert out["teacher_topk_indices"].dtype == np.int32
                assert out["teacher_topk_indices"].shape == (batch["id"].size, k)
                want = np.argsort(-live, axis=1, kind="stable")[:, :k]
                np.testing.assert_array_equal(out["teacher_topk_indices"], want)
                np.testing.assert_allclose(out["teacher_topk_values"],
                                           np.take_along_axis(live, want, 1), rtol=1e-5, atol=1e-5)
            n += 1
        assert n == 3 * (160 // layout["process_count"]) // (12 // layout["process_count"])
    # A new view every epoch: the stored outputs of one id differ between epochs, and none is the
    # teacher's output on the unaugmented example (what a centre store would hold).
    ids = np.arange(160)
    per_epoch = [store.lookup(ids, np.full(160, e))[store.batch_keys[0]] for e in (0, 1, 2)]
    assert not np.allclose(per_epoch[0], per_epoch[1])
    if fmt == "full":
        centre = live_logits(teacher, variables, np.stack([source[i]["image"] for i in ids]))
        assert np.abs(per_epoch[0] - centre).max() > 1e-2


def test_device_sharded_precompute_writes_the_same_view_store(tmp_path, mnist1d, mlp_teacher):
    """precompute(sharding=...) over 8 CPU devices (batch axis split, ids and epochs carried through
    the devices with the outputs) gives the store of the unsharded pass, row for row."""
    from jax.sharding import NamedSharding, PartitionSpec

    source = mnist1d["train"]
    teacher, variables = mlp_teacher
    spec = view_spec(source, augment, format="topk", k=4)
    plain = precompute_views(str(tmp_path / "plain"), spec, source, augment, teacher, variables)
    mesh = sharding.make_mesh(devices=jax.devices()[:8])
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    views = data.make_view_iterator(source, global_batch_size=24, seed=SEED, epochs=EPOCHS, transform=augment)
    path = str(tmp_path / "sharded")
    with ls.LogitStoreWriter(path, spec) as w:
        stats = ls.precompute(teacher, jax.device_put(variables, NamedSharding(mesh, PartitionSpec())),
                              views, w, sharding=batch_sharding, show_progress=False)
    assert stats["rows_written"] == 3 * 160
    ls.finalize(path, 1)
    assert_same_rows(ls.LogitStore.open(path, spec=spec), plain, tol=1e-6)


_TWO_PROCESS_WORKER = r'''
import os, sys
process_id, port, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from kdjax import data, logit_store as ls

def augment(record, rng):
    image = np.roll(record["image"], rng.integers(-4, 5), axis=0)
    image = image + 0.2 * rng.standard_normal(image.shape)
    return {"image": image.astype(np.float32), "label": record["label"]}

N, C = 29, 10
rng = np.random.default_rng(3)
source = data.ArraySource({"image": rng.normal(size=(N, 40, 1)).astype(np.float32), "label": np.arange(N) % C})
variables = {"w": rng.normal(size=(40, C)).astype(np.float32)}
teacher = lambda v, b: b["image"].reshape(b["image"].shape[0], -1) @ v["w"]
spec = ls.StoreSpec(dataset="toy", split="train", num_examples=N, num_classes=C, teacher="linear",
                    preprocessing="none", format="topk", k=3, dtype="float32", epochs=(1, 3), seed=11,
                    transform=data.transform_fingerprint(augment))
views = data.make_view_iterator(source, global_batch_size=16, seed=11, epochs=(1, 3), transform=augment)
sharding = NamedSharding(jax.make_mesh((4, 2), ("data", "fsdp")), PartitionSpec(("data", "fsdp")))
with ls.LogitStoreWriter(path, spec, process_index=jax.process_index(), process_count=2) as w:
    stats = ls.precompute(teacher, variables, views, w, sharding=sharding, show_progress=False)
multihost_utils.sync_global_devices("closed")
if process_id == 0:
    ls.finalize(path, 2)
multihost_utils.sync_global_devices("finalized")
store = ls.LogitStore.open(path, spec=spec)
for epoch in (1, 2, 3):
    images = np.stack([data.train_example(source, i, seed=11, epoch=epoch, transform=augment)["image"]
                       for i in range(N)])
    live = images.reshape(N, -1) @ variables["w"]
    got = store.lookup(np.arange(N), np.full(N, epoch))
    order = np.argsort(-live, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(got["teacher_topk_indices"], order)
    np.testing.assert_allclose(got["teacher_topk_values"], np.take_along_axis(live, order, 1), rtol=1e-5, atol=1e-5)
print("STATS", process_id, stats["batches"], stats["rows_written"], flush=True)
'''


def test_two_jax_processes_write_one_view_store(tmp_path):
    """Two jax.distributed CPU processes (4 devices each) write their shards of a view store of
    29 ids x epochs 1-3 (87 rows, 6 global batches of 16, the last padded); both read back the live
    teacher's top-3 on every (epoch, id) view."""
    import sys

    import local_processes

    script = tmp_path / "worker.py"
    script.write_text(_TWO_PROCESS_WORKER)
    path = str(tmp_path / "store")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    outs = local_processes.run(lambda i, port: [sys.executable, str(script), str(i), str(port), path],
                               env=env, timeout=180)
    stats = sorted(line.split()[1:] for out in outs for line in out.splitlines() if line.startswith("STATS"))
    # Global batch b holds positions 16b .. 16b + 15 (real below 87), process p its rows 8p .. 8p + 7:
    # process 0 positions 80-87 of the last batch (87 is padding), process 1 88-95 (all padding).
    assert stats == [["0", "6", "47"], ["1", "6", "40"]]
    meta = json.load(open(os.path.join(path, "metadata.json")))
    assert meta["spec"]["epochs"] == [1, 3] and meta["process_count"] == 2
    assert sum(s["rows"] for s in meta["shards"]) == 87


def test_view_store_lookups_need_an_epoch_of_its_range(tmp_path, mnist1d, mlp_teacher):
    source = mnist1d["train"]
    store = precompute_views(str(tmp_path / "s"), view_spec(source, augment, epochs=(1, 1)), source,
                             augment, *mlp_teacher)
    with pytest.raises(ValueError, match=r"rows of epochs \[0, 3\] \(batch rows \[0, 2\]\) but the logit "
                                         r"store holds the views of epochs 1-1 only; precompute a view "
                                         r"store that covers every epoch of the run \(--views=epochs:"):
        store.lookup([0, 1, 2], [0, 1, 3])
    with pytest.raises(ValueError, match=r"pass the epoch of every row \(a train batch's 'epoch' key\)"):
        store.lookup([0, 1])
    eval_batch = next(data.make_eval_iterator(mnist1d["test"], global_batch_size=8))
    with pytest.raises(ValueError, match=r"keyed by \(epoch, id\), but the batch has no 'epoch' key .* "
                                         r"eval batches read a store of the unaugmented eval view"):
        store.add_to_batch(eval_batch)
    with pytest.raises(ValueError, match=r"example ids must be in \[0, 160\)"):
        store.lookup([160], [1])


def test_interrupted_view_precompute_resumes_to_the_same_store(tmp_path, mnist1d, mlp_teacher):
    source = mnist1d["train"]
    teacher, variables = mlp_teacher
    spec = view_spec(source, augment, format="topk", k=3, dtype="float16")
    whole = precompute_views(str(tmp_path / "whole"), spec, source, augment, teacher, variables)
    path = str(tmp_path / "cut")
    views = lambda: data.make_view_iterator(source, global_batch_size=24, seed=SEED, epochs=EPOCHS,
                                            transform=augment)
    w = ls.LogitStoreWriter(path, spec)
    stats = ls.precompute(teacher, variables, views(), w, show_progress=False,
                          should_stop=lambda n: n == 7)
    w.suspend()
    assert stats["stopped"] == 1 and stats["rows_written"] == 7 * 24
    with pytest.raises(ValueError, match="already holds a partial write"):
        ls.LogitStoreWriter(path, spec)
    with ls.LogitStoreWriter(path, spec, resume=True) as w:
        stats = ls.precompute(teacher, variables, views(), w, show_progress=False)
    assert stats["batches_skipped"] == 7 and stats["rows_written"] == 3 * 160 - 7 * 24
    ls.finalize(path, 1)
    assert_same_rows(ls.LogitStore.open(path, spec=spec), whole, tol=0)


def test_finalize_names_the_missing_epoch_id_pairs(tmp_path, mnist1d, mlp_teacher):
    source = mnist1d["train"]
    teacher, variables = mlp_teacher
    spec = view_spec(source, augment)
    path = str(tmp_path / "s")
    with ls.LogitStoreWriter(path, spec) as w:
        ids = np.arange(160)
        for epoch in (0, 2):  # epoch 1 never written
            images = np.stack([data.train_example(source, i, seed=SEED, epoch=epoch,
                                                  transform=augment)["image"] for i in ids])
            w.write(ids, live_logits(teacher, variables, images), epochs=np.full(160, epoch))
        with pytest.raises(ValueError, match=r"pass the epoch of every row"):
            w.write(ids[:2], np.zeros((2, 10), np.float32))
        with pytest.raises(ValueError, match=r"\(epoch, id\) pairs \[\(0, 3\)\] appear more than once"):
            w.write([3, 3], np.zeros((2, 10), np.float32), epochs=[0, 0])
    with pytest.raises(ValueError, match=r"160 of 480 \(epoch, example id\) pairs were never written, "
                                         r"e.g. \[\(1, 0\), \(1, 1\),"):
        ls.finalize(path, 1)


@pytest.mark.parametrize("fmt, k, dtype, per_row", [("topk", 3, "float16", 8 + 3 * 2 + 3 * 4 + 16),
                                                     ("full", None, "float32", 8 + 10 * 4 + 16),
                                                     ("topk", 10, "bfloat16", 84)])
def test_disk_bytes_per_row_are_the_documented_formula(tmp_path, mnist1d, mlp_teacher, fmt, k, dtype,
                                                       per_row):
    """README's sizes: bytes per (epoch, id) = 8 (id) + width x itemsize + 4k (top-k indices) + 16
    (index), checked against the files a finalized view store really holds."""
    source = mnist1d["train"]
    spec = view_spec(source, augment, format=fmt, k=k, dtype=dtype)
    assert spec.bytes_per_row == per_row
    path = tmp_path / "s"
    precompute_views(str(path), spec, source, augment, *mlp_teacher, process_count=2)
    data_bytes = sum(os.path.getsize(f) for f in path.glob("shards/*/*.bin"))
    with open(path / "index.npy", "rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        header = f.tell()
    assert header == 128
    index_bytes = os.path.getsize(path / "index.npy") - header
    assert data_bytes + index_bytes == spec.num_rows * per_row == 3 * 160 * per_row


# ---------------------------------------------------------------------------------------------
# Mismatches are refused, naming the field and the fix
# ---------------------------------------------------------------------------------------------


def test_a_view_store_of_another_run_is_refused(tmp_path, mnist1d, mlp_teacher):
    source = mnist1d["train"]
    spec = view_spec(source, augment)
    path = str(tmp_path / "s")
    precompute_views(path, spec, source, augment, *mlp_teacher)
    fix = (r"a view store holds the teacher's outputs on the exact augmented views of one run \(its seed, "
           r"train transform and epochs\): precompute one for this run with `python -m "
           r"experiments.precompute_teacher_logits --views=epochs:<first>-<last>` \(config "
           r"teacher.store_views\)")
    other_transform = functools.partial(augment)
    cases = [
        (dict(seed=6), r"was written for seed 5 but the run's data seed is 6"),
        (dict(epochs=(0, 89)), r"was written for epochs \(0, 2\) but the run expects the views of epochs \(0, 89\)"),
        (dict(transform=data.transform_fingerprint(other_transform)),
         r"was written for transform 'test_view_store.augment@\w+' but the run's train transform is "
         r"'partial\(test_view_store.augment\)@\w+'"),
        (dict(epochs=None, seed=None, transform=None),
         r"was written for epochs \(0, 2\) but the run expects the views of epochs None"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message + r".*" + fix):
            ls.LogitStore.open(path, spec=view_spec(source, augment, **overrides))
    with pytest.raises(ValueError, match=r"was written for teacher 'mlp-test' but the run expects teacher "
                                         r"'other'"):
        ls.LogitStore.open(path, spec=view_spec(source, augment, teacher="other"))
    # The reverse: a store of one unaugmented view where the run expects a view store.
    centre_spec = view_spec(source, augment, epochs=None, seed=None, transform=None)
    centre_path = str(tmp_path / "centre")
    with ls.LogitStoreWriter(centre_path, centre_spec) as w:
        w.write(np.arange(160), np.zeros((160, 10), np.float32))
    ls.finalize(centre_path, 1)
    with pytest.raises(ValueError, match=r"was written for epochs None but the run expects the views of "
                                         r"epochs \(0, 2\); for seed None .*" + fix):
        ls.LogitStore.open(centre_path, spec=spec)
    # A writer for another view spec is refused on a partly written directory.
    part = str(tmp_path / "part")
    ls.LogitStoreWriter(part, spec).suspend()
    with pytest.raises(ValueError, match=r"is being written for .*seed=5.* but this writer has .*seed=6"):
        ls.LogitStoreWriter(part, view_spec(source, augment, seed=6), resume=True)


# ---------------------------------------------------------------------------------------------
# A KD run with a view store equals the live-teacher run
# ---------------------------------------------------------------------------------------------


def _fit(workdir, source, transform, steps, num_classes=10, batch=16, **kwargs):
    sample = data.train_example(source, 0, seed=SEED, epoch=0, transform=transform)["image"][None]
    return loop.fit(
        workdir=workdir, student=models.create("mlp", num_classes, width=16), tx=optax.adam(3e-3),
        recipe=(recipe.ce(0.5), recipe.kd(temperature=2.0, weight=0.5)),
        train_iter=data.make_train_iterator(source, global_batch_size=batch, seed=SEED, transform=transform),
        num_steps=steps, sample_input=sample, seed=0,
        mesh=sharding.make_mesh(devices=jax.devices()[:2]),
        options=loop.FitOptions(log_every=5, checkpoint_every=0, progress=False, best_metric=None,
                                handle_preemption=False, async_checkpoint=False), **kwargs)


def _params(result):
    return jax.tree.leaves(jax.device_get(result.state.params))


def test_kd_run_with_a_view_store_equals_the_run_with_the_live_teacher(tmp_path, mnist1d, mlp_teacher):
    """30 steps (3 epochs of 160 at batch 16) of CE + KD with the demo's augmentation: the run
    reading a full float32 view store logs the same losses and ends at the same weights as the run
    with the live teacher; a top-k view store's KD loss on every train batch stays within
    kd_kl_topk_bound of the live teacher's, for the student the run ends with."""
    source = mnist1d["train"]
    teacher, variables = mlp_teacher
    store = precompute_views(str(tmp_path / "full"), view_spec(source, augment), source, augment,
                             teacher, variables)
    live = _fit(str(tmp_path / "live"), source, augment, 30, teacher=teacher, teacher_variables=variables)
    stored = _fit(str(tmp_path / "stored"), source, augment, 30, teacher=teachers.precomputed(),
                  train_store=store)
    assert len(live.history) == len(stored.history) == 6
    for a, b in zip(live.history, stored.history):
        for key in ("loss/kd", "loss/ce", "loss/total", "accuracy"):
            np.testing.assert_allclose(b[key], a[key], rtol=2e-4, atol=1e-6, err_msg=key)
    for a, b in zip(_params(live), _params(stored)):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5)
    # Top-k: the run's KD term against the live one, batch by batch, for the trained student.
    topk = precompute_views(str(tmp_path / "topk"), view_spec(source, augment, format="topk", k=3),
                            source, augment, teacher, variables)
    run = _fit(str(tmp_path / "topk_run"), source, augment, 30, teacher=teachers.precomputed(),
               train_store=topk)
    assert np.isfinite(run.history[-1]["loss/kd"])
    student = models.create("mlp", 10, width=16)
    params = jax.device_get(run.state.params)
    it = data.make_train_iterator(source, global_batch_size=16, seed=SEED, transform=augment, num_epochs=3)
    gaps = []
    for batch in it:
        b = topk.add_to_batch(batch)
        s = student.apply({"params": params}, batch["image"], train=False)[0]
        t = live_logits(teacher, variables, batch["image"])
        exact = np.asarray(losses.kd_kl(s, t, 2.0))
        sparse = np.asarray(losses.kd_kl_topk(s, b["teacher_topk_values"], b["teacher_topk_indices"], 2.0))
        bound = np.asarray(losses.kd_kl_topk_bound(s, t, b["teacher_topk_indices"], 2.0))
        assert np.all(np.abs(exact - sparse) <= bound + 1e-5)
        gaps.append(np.abs(exact - sparse).max())
    assert len(gaps) == 30 and max(gaps) > 0  # k=3 of 10 classes: a real (bounded) difference


def _png(height, width, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([255 * x / (width - 1), 255 * y / (height - 1),
                       rng.uniform(0, 255, (height, width))], -1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_fake_imagenet_random_resized_crops(tmp_path):
    """A fake ImageNet (encoded images of assorted sizes, 1000 classes) through
    imagenet_train_transform (random-resized crop + flip): the top-10 view store holds the live
    teacher's outputs on each crop the student's batches hold, and the KD run reading it equals the
    live one within the top-k bound."""
    images = np.empty(24, dtype=object)
    images[:] = [_png(40 + 3 * i, 60 - i, i) for i in range(24)]
    labels = np.random.default_rng(0).integers(0, 1000, 24)
    source = data.ArraySource({"image": images, "label": labels})
    transform = functools.partial(data.imagenet_train_transform, image_size=16)
    module = models.create("mlp", 1000, width=32)
    variables = module.init(jax.random.PRNGKey(1), np.zeros((1, 16, 16, 3), np.float32))
    teacher = teachers.from_linen(module)
    spec = ls.StoreSpec(dataset="fake-imagenet", split="train", num_examples=24, num_classes=1000,
                        teacher="mlp-1000", preprocessing="random-resized-crop16", format="topk", k=10,
                        dtype="float32", epochs=(0, 1), seed=SEED, transform=data.transform_fingerprint(transform))
    store = precompute_views(str(tmp_path / "s"), spec, source, transform, teacher, variables,
                             process_count=2, global_batch_size=8)
    assert "imagenet_train_transform, image_size=16" in store.spec.transform
    it = data.make_train_iterator(source, global_batch_size=8, seed=SEED, transform=transform, num_epochs=2)
    student = models.create("mlp", 1000, width=8)
    s_vars = student.init(jax.random.PRNGKey(2), np.zeros((1, 16, 16, 3), np.float32))
    n = 0
    for batch in it:
        assert batch["image"].shape == (8, 16, 16, 3)
        b = store.add_to_batch(batch)
        t = live_logits(teacher, variables, batch["image"])
        assert b["teacher_topk_indices"].shape == (8, 10) and b["teacher_topk_indices"].dtype == np.int32
        np.testing.assert_array_equal(b["teacher_topk_indices"], np.argsort(-t, 1, kind="stable")[:, :10])
        np.testing.assert_allclose(b["teacher_topk_values"], np.sort(t, 1)[:, ::-1][:, :10], rtol=1e-5,
                                   atol=1e-5)
        s = student.apply(s_vars, batch["image"], train=False)[0]
        exact = np.asarray(losses.kd_kl(s, t, 4.0))
        sparse = np.asarray(losses.kd_kl_topk(s, b["teacher_topk_values"], b["teacher_topk_indices"], 4.0))
        assert np.all(np.abs(exact - sparse) <= np.asarray(
            losses.kd_kl_topk_bound(s, t, b["teacher_topk_indices"], 4.0)) + 1e-5)
        n += 1
    assert n == 6
    # The crops differ between epochs (and from the centre crop the eval transform gives).
    e0 = store.lookup(np.arange(24), np.zeros(24, int))["teacher_topk_values"]
    e1 = store.lookup(np.arange(24), np.ones(24, int))["teacher_topk_values"]
    assert not np.allclose(e0, e1)
    # The runs (6 steps x 8 rows: epochs 0 and 1). A full float32 view store replays exactly what
    # the live teacher computes on each crop: same losses, same final weights. The top-10 store's
    # run trains (its per-batch KD term is within the bound of the live one's, checked above).
    full_spec = dataclasses.replace(spec, format="full", k=None)
    full = precompute_views(str(tmp_path / "full"), full_spec, source, transform, teacher, variables,
                            global_batch_size=8)
    live = _fit(str(tmp_path / "live"), source, transform, 6, num_classes=1000, batch=8,
                teacher=teacher, teacher_variables=variables)
    stored = _fit(str(tmp_path / "stored"), source, transform, 6, num_classes=1000, batch=8,
                  teacher=teachers.precomputed(), train_store=full)
    assert len(live.history) == len(stored.history) >= 1
    for a, b in zip(live.history, stored.history):
        for key in ("loss/kd", "loss/ce", "loss/total"):
            np.testing.assert_allclose(b[key], a[key], rtol=2e-4, atol=1e-6, err_msg=key)
    for a, b in zip(_params(live), _params(stored)):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5)
    result = _fit(str(tmp_path / "run"), source, transform, 6, num_classes=1000, batch=8,
                  teacher=teachers.precomputed(), train_store=store)
    assert np.isfinite(result.history[-1]["loss/kd"])
