"""Tests for kdjax.logit_store: formats, random access, several writers, mismatches, crashes, precompute."""
import json
import os
import pickle
import socket
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kdjax import logit_store as ls

N, C, B = 37, 10, 8


def make_spec(**overrides):
    kwargs = dict(dataset="toy", split="train", num_examples=N, num_classes=C, teacher="toy-linear:v1",
                  preprocessing="none")
    kwargs.update(overrides)
    return ls.StoreSpec(**kwargs)


def make_logits(seed=0, scale=3.0):
    return (np.random.default_rng(seed).normal(size=(N, C)) * scale).astype(np.float32)


def batches_of(order, logits, batch_size=B):
    """(ids [B], logits [B, C], mask [B]) in `order`; the last batch padded with garbage ids."""
    out = []
    for start in range(0, len(order), batch_size):
        ids = np.asarray(order[start:start + batch_size], dtype=np.int64)
        pad = batch_size - ids.size
        mask = np.r_[np.ones(ids.size, bool), np.zeros(pad, bool)]
        vals = np.r_[logits[ids], np.full((pad, logits.shape[1]), np.nan, np.float32)]
        out.append((np.r_[ids, np.full(pad, -7, np.int64)], vals, mask))
    return out


def write_all(path, spec, logits, order=None, **writer_kw):
    order = np.random.default_rng(1).permutation(N) if order is None else order
    with ls.LogitStoreWriter(path, spec, **writer_kw) as w:
        for ids, vals, mask in batches_of(order, logits):
            w.write(ids, vals, mask)
    ls.finalize(path, 1)
    return ls.LogitStore.open(path)


def bits(x):
    return np.asarray(x).view(np.uint16 if np.asarray(x).dtype.itemsize == 2 else np.uint32)


def shard_bytes(path, name="shard-00000-of-00001"):
    d = os.path.join(path, "shards", name)
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d)) if f.endswith(".bin")}


# ---------------------------------------------------------------------------------------------
# Spec
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (dict(format="sparse"), "StoreSpec.format must be one of"),
    (dict(format="topk"), r"StoreSpec.k must be an integer in \[1, num_classes=10\]"),
    (dict(format="topk", k=11), r"StoreSpec.k must be an integer in \[1, num_classes=10\]"),
    (dict(k=3), "StoreSpec.k must be None for format 'full'"),
    (dict(dtype="float64"), "StoreSpec.dtype must be one of"),
    (dict(num_examples=0), "StoreSpec.num_examples must be a positive integer"),
    (dict(num_classes=2.5), "StoreSpec.num_classes must be a positive integer"),
    (dict(split=""), "StoreSpec.split must be a non-empty string"),
    (dict(preprocessing=None), "StoreSpec.preprocessing must be a string"),
])
def test_spec_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_spec(**overrides)


def test_spec_dict_round_trip():
    spec = make_spec(format="topk", k=4, dtype="bfloat16")
    assert ls.StoreSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.width == 4 and spec.value_dtype == np.dtype(ml_dtypes.bfloat16)


def test_spec_from_dict_rejects_unknown_fields():
    d = make_spec().to_dict()
    d["temperature"] = 4.0
    with pytest.raises(ValueError, match=r"StoreSpec fields .*'temperature'.* do not match the expected"):
        ls.StoreSpec.from_dict(d)


# ---------------------------------------------------------------------------------------------
# Round trips and random access
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_full_round_trip_bit_exact(tmp_path, dtype):
    logits = make_logits()
    store = write_all(str(tmp_path / "s"), make_spec(dtype=dtype), logits)
    got = store.lookup(np.arange(N))["teacher_logits"]
    want = logits.astype(ls.DTYPES[dtype])
    assert got.dtype == ls.DTYPES[dtype] and got.shape == (N, C)
    np.testing.assert_array_equal(bits(got), bits(want))
    assert store.batch_keys == ("teacher_logits",)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_topk_round_trip_against_argsort(tmp_path, dtype):
    logits, k = make_logits(), 4
    store = write_all(str(tmp_path / "s"), make_spec(format="topk", k=k, dtype=dtype), logits)
    got = store.lookup(np.arange(N))
    ref_idx = np.argsort(-logits.astype(np.float64), axis=1)[:, :k]
    np.testing.assert_array_equal(got["teacher_topk_indices"], ref_idx)
    assert got["teacher_topk_indices"].dtype == np.int32
    ref_vals = np.take_along_axis(logits, ref_idx, axis=1).astype(ls.DTYPES[dtype])
    np.testing.assert_array_equal(bits(got["teacher_topk_values"]), bits(ref_vals))


def test_topk_host_ties_go_to_lower_index():
    x = np.array([[1.0, 3.0, 3.0, 0.0, 3.0]], np.float32)
    values, indices = ls.topk_host(x, 3)
    np.testing.assert_array_equal(indices, [[1, 2, 4]])
    _, jax_idx = jax.lax.top_k(jnp.asarray(x), 3)
    np.testing.assert_array_equal(indices, np.asarray(jax_idx))
    np.testing.assert_array_equal(values, [[3.0, 3.0, 3.0]])


def test_write_topk_precomputed(tmp_path):
    logits, k = make_logits(), 3
    spec = make_spec(format="topk", k=k, dtype="float32")
    path = str(tmp_path / "s")
    with ls.LogitStoreWriter(path, spec) as w:
        for ids, vals, mask in batches_of(np.arange(N), logits):
            idx = np.argsort(-np.nan_to_num(vals), axis=1)[:, :k]
            w.write_topk(ids, np.take_along_axis(vals, idx, axis=1), idx.astype(np.int64), mask)
    ls.finalize(path, 1)
    got = ls.LogitStore.open(path).lookup([5, 0])
    ref_idx = np.argsort(-logits[[5, 0]].astype(np.float64), axis=1)[:, :k]
    np.testing.assert_array_equal(got["teacher_topk_indices"], ref_idx)
    np.testing.assert_array_equal(got["teacher_topk_values"], np.take_along_axis(logits[[5, 0]], ref_idx, 1))


def test_write_topk_validation(tmp_path):
    w = ls.LogitStoreWriter(str(tmp_path / "t"), make_spec(format="topk", k=2))
    ids, vals = np.array([0, 1]), np.ones((2, 2), np.float32)
    with pytest.raises(ValueError, match=r"top-k indices must be class indices in \[0, 10\)"):
        w.write_topk(ids, vals, np.array([[0, 10], [1, 2]]))
    with pytest.raises(ValueError, match="repeat a class within a row"):
        w.write_topk(ids, vals, np.array([[3, 3], [1, 2]]))
    with pytest.raises(ValueError, match=r"values must be a float array of shape \[B, k=2\]"):
        w.write_topk(ids, np.ones((2, 3), np.float32), np.array([[0, 1], [1, 2]]))
    with pytest.raises(ValueError, match="indices must be an integer array of shape"):
        w.write_topk(ids, vals, np.array([[0.0, 1.0], [1.0, 2.0]]))
    full = ls.LogitStoreWriter(str(tmp_path / "f"), make_spec())
    with pytest.raises(ValueError, match="write_topk needs a 'topk' store"):
        full.write_topk(ids, vals, np.array([[0, 1], [1, 2]]))


def test_random_access_and_add_to_batch(tmp_path):
    logits = make_logits()
    store = write_all(str(tmp_path / "s"), make_spec(dtype="float32"), logits)
    ids = np.array([36, 0, 5, 5, 17, 36])
    np.testing.assert_array_equal(store.lookup(ids)["teacher_logits"], logits[ids])
    batch = {"id": np.array([3, 10**12, 2, -1]), "mask": np.array([True, False, True, False]),
             "label": np.arange(4, dtype=np.int32)}
    out = store.add_to_batch(batch)
    expected = np.zeros((4, C), np.float32)
    expected[[0, 2]] = logits[[3, 2]]
    np.testing.assert_array_equal(out["teacher_logits"], expected)
    assert "teacher_logits" not in batch and out["label"] is batch["label"]
    no_mask = store.add_to_batch({"id": np.array([1, 2])})
    np.testing.assert_array_equal(no_mask["teacher_logits"], logits[[1, 2]])


def test_lookup_errors(tmp_path):
    store = write_all(str(tmp_path / "s"), make_spec(), make_logits())
    with pytest.raises(ValueError, match=r"example ids must be in \[0, 37\), got \[37, -1\] at batch rows \[1, 2\]"):
        store.lookup([0, 37, -1])
    with pytest.raises(ValueError, match="ids must be a 1-D integer array"):
        store.lookup(np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match="batch needs an 'id' key"):
        store.add_to_batch({"image": np.zeros((2, 3))})
    with pytest.raises(ValueError, match=r"mask must be a bool array of shape \(2,\)"):
        store.add_to_batch({"id": np.array([0, 1]), "mask": np.array([1, 0])})


def test_store_pickles_by_path(tmp_path):
    logits = make_logits()
    store = write_all(str(tmp_path / "s"), make_spec(dtype="float32"), logits)
    store.lookup([0])
    blob = pickle.dumps(store)
    assert len(blob) < 2000
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again.lookup([4, 1])["teacher_logits"], logits[[4, 1]])


# ---------------------------------------------------------------------------------------------
# Several writers, finalize, completeness
# ---------------------------------------------------------------------------------------------


def test_two_writers_disjoint_ids(tmp_path):
    path, logits = str(tmp_path / "s"), make_logits()
    spec = make_spec(dtype="float32")
    order = np.random.default_rng(2).permutation(N)
    writers = [ls.LogitStoreWriter(path, spec, process_index=p, process_count=2) for p in range(2)]
    for i, (ids, vals, mask) in enumerate(batches_of(order, logits)):
        writers[i % 2].write(ids, vals, mask)  # interleaved: both shards open at once
    writers[0].close()
    with pytest.raises(ValueError, match=r"1 of 2 shards are not done \(shard-00001-of-00002: in progress"):
        ls.finalize(path, 2)
    writers[1].close()
    ls.finalize(path, 2)
    ls.finalize(path, 2)  # idempotent
    store = ls.LogitStore.open(path, dataset="toy", split="train", num_examples=N, num_classes=C)
    np.testing.assert_array_equal(store.lookup(np.arange(N))["teacher_logits"], logits)
    meta = json.load(open(os.path.join(path, "metadata.json")))
    assert [s["rows"] for s in meta["shards"]] == [writers[0].rows_written, writers[1].rows_written]
    assert sum(s["rows"] for s in meta["shards"]) == N and min(s["rows"] for s in meta["shards"]) > 0
    assert meta["spec"] == spec.to_dict() and meta["process_count"] == 2 and "kdjax_version" in meta


def test_writer_with_no_rows_still_finalizes(tmp_path):
    path, logits = str(tmp_path / "s"), make_logits()
    spec = make_spec(dtype="float32")
    with ls.LogitStoreWriter(path, spec, process_index=1, process_count=2):
        pass
    with ls.LogitStoreWriter(path, spec, process_index=0, process_count=2) as w:
        w.write(np.arange(N), logits)
    ls.finalize(path, 2)
    np.testing.assert_array_equal(ls.LogitStore.open(path).lookup([36])["teacher_logits"], logits[[36]])


def test_missing_ids_refuse_to_finalize(tmp_path):
    path, logits = str(tmp_path / "s"), make_logits()
    keep = np.setdiff1d(np.arange(N), [3, 17])
    with ls.LogitStoreWriter(path, make_spec()) as w:
        w.write(keep, logits[keep])
    with pytest.raises(ValueError, match=r"2 of 37 example ids were never written, e.g. \[3, 17\]"):
        ls.finalize(path, 1)
    assert not ls.is_complete(path)
    with pytest.raises(ValueError, match="is incomplete"):
        ls.LogitStore.open(path)


def test_duplicate_ids_across_shards_refuse_to_finalize(tmp_path):
    path, logits = str(tmp_path / "s"), make_logits()
    for p, ids in enumerate([np.arange(20), np.arange(19, N)]):
        with ls.LogitStoreWriter(path, make_spec(), process_index=p, process_count=2) as w:
            w.write(ids, logits[ids])
    with pytest.raises(ValueError, match=r"1 of 37 example ids were written by more than one shard, e.g. \[19\]"):
        ls.finalize(path, 2)


def test_duplicate_ids_within_one_shard_are_named_as_such(tmp_path):
    path, logits = str(tmp_path / "s"), make_logits()
    for p, ids in enumerate([np.arange(20), np.arange(20, N)]):
        with ls.LogitStoreWriter(path, make_spec(), process_index=p, process_count=2) as w:
            w.write(ids, logits[ids])
    with open(os.path.join(path, "shards", "shard-00001-of-00002", "ids.bin"), "r+b") as f:
        f.write(np.array([21, 21], np.int64).tobytes())  # rows 0, 1 of shard 1 (ids 20, 21) -> 21, 21
    with pytest.raises(ValueError, match=r"1 of 37 example ids were written more than once within shard "
                                         r"shard-00001-of-00002, e.g. \[21\]; the shard is corrupt"):
        ls.finalize(path, 2)
    assert not ls.is_complete(path)


def test_finalize_errors(tmp_path):
    path = str(tmp_path / "s")
    with pytest.raises(ValueError, match=r"1 of 1 shards are not done \(shard-00000-of-00001: missing\)"):
        ls.finalize(path, 1)
    with ls.LogitStoreWriter(path, make_spec(), process_index=0, process_count=2):
        pass
    with pytest.raises(ValueError, match="has shards .* from another process_count than 3"):
        ls.finalize(path, 3)


def test_finalize_detects_corrupt_or_disagreeing_shards(tmp_path):
    logits = make_logits()

    def two_shards(name):
        path = str(tmp_path / name)
        for p, ids in enumerate([np.arange(20), np.arange(20, N)]):
            with ls.LogitStoreWriter(path, make_spec(), process_index=p, process_count=2) as w:
                w.write(ids, logits[ids])
        return path, os.path.join(path, "shards", "shard-00001-of-00002")

    path, shard = two_shards("spec")
    spec_file = os.path.join(shard, "spec.json")
    edited = json.load(open(spec_file))
    edited["spec"]["teacher"] = "other"
    json.dump(edited, open(spec_file, "w"))
    with pytest.raises(ValueError, match="shards of logit store at .* disagree on the spec"):
        ls.finalize(path, 2)

    path, shard = two_shards("short")
    ids_file = os.path.join(shard, "ids.bin")
    with open(ids_file, "ab") as f:
        f.truncate(os.path.getsize(ids_file) - 8)
    with pytest.raises(ValueError, match="shard-00001-of-00002 of logit store at .* is corrupt: DONE says 17 rows"):
        ls.finalize(path, 2)

    path, shard = two_shards("range")
    with open(os.path.join(shard, "ids.bin"), "r+b") as f:
        f.write(np.int64(1000).tobytes())
    with pytest.raises(ValueError, match=r"finalize: shard shard-00001-of-00002: example ids must be in \[0, 37\)"):
        ls.finalize(path, 2)
    with pytest.raises(ValueError, match="process_count must be a positive integer"):
        ls.finalize(path, 0)


# ---------------------------------------------------------------------------------------------
# Mismatches
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("expect, message", [
    (dict(split="validation"), "was written for split 'train' but the run reads split 'validation'"),
    (dict(num_examples=50), "was written for num_examples 37 but the run's split has num_examples = 50"),
    (dict(num_classes=100), "was written for num_classes 10 but the student predicts num_classes = 100"),
    (dict(dataset="cifar10"), "was written for dataset 'toy' but the run reads dataset 'cifar10'"),
    (dict(teacher="resnet50"), "was written for teacher 'toy-linear:v1' but the run expects teacher"),
    (dict(format="topk"), "was written for format 'full' but the run's loss expects format 'topk'"),
    (dict(preprocessing="center-crop"), "was written for preprocessing 'none'"),
])
def test_open_mismatch_errors(tmp_path, expect, message):
    path = str(tmp_path / "s")
    write_all(path, make_spec(), make_logits())
    with pytest.raises(ValueError, match=message) as info:
        ls.LogitStore.open(path, **expect)
    assert "python -m experiments.precompute_teacher_logits" in str(info.value)


def test_open_with_a_spec_names_every_differing_field(tmp_path):
    path = str(tmp_path / "s")
    stored = make_spec(format="topk", k=4, dtype="bfloat16")
    write_all(path, stored, make_logits())
    assert ls.LogitStore.open(path, spec=stored).spec == stored
    with pytest.raises(ValueError, match=r"was written for k 4 but the run expects k = 3; for dtype 'bfloat16' "
                                         r"but the run expects dtype 'float32' \(store: .*format 'topk', k 4, "
                                         r"dtype 'bfloat16'\); .* or point the run at the matching store \(or "
                                         rf"delete {path}, if nothing else uses it, and precompute it again\)"):
        ls.LogitStore.open(path, spec=make_spec(format="topk", k=3, dtype="float32"))
    with pytest.raises(ValueError, match="was written for format 'topk' but the run's loss expects format 'full'"):
        ls.LogitStore.open(path, spec=make_spec(dtype="bfloat16"))
    with pytest.raises(ValueError, match="written for teacher 'toy-linear:v1' but the run expects teacher 'u'"):
        ls.LogitStore.open(path, spec=make_spec(format="topk", k=4, dtype="bfloat16", teacher="u"))
    assert ls.LogitStore.open(path, k=4, dtype="bfloat16").spec == stored
    with pytest.raises(ValueError, match="was written for k 4 but the run expects k = 5"):
        ls.LogitStore.open(path, k=5)
    with pytest.raises(ValueError, match="was written for dtype 'bfloat16' but the run expects dtype 'float16'"):
        ls.LogitStore.open(path, dtype="float16")


def test_open_spec_argument_errors(tmp_path):
    path = str(tmp_path / "s")
    write_all(path, make_spec(), make_logits())
    with pytest.raises(TypeError, match=r"pass either spec or the field keywords \['num_classes', 'split'\]"):
        ls.LogitStore.open(path, spec=make_spec(), split="train", num_classes=C)
    with pytest.raises(TypeError, match="spec must be a StoreSpec or None, got dict"):
        ls.LogitStore.open(path, spec=make_spec().to_dict())


def test_open_missing_or_foreign_directory(tmp_path):
    with pytest.raises(ValueError, match="no logit store at .*precompute one with"):
        ls.LogitStore.open(str(tmp_path / "nothing"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="is not a logit store"):
        ls.LogitStore.open(str(tmp_path / "empty"))


def test_mismatch_is_reported_before_incompleteness(tmp_path):
    path = str(tmp_path / "s")
    w = ls.LogitStoreWriter(path, make_spec())
    w.write([0, 1], make_logits()[:2])
    with pytest.raises(ValueError, match="was written for split 'train' but the run reads split 'test'"):
        ls.LogitStore.open(path, split="test")


def test_truncated_shard_file_is_detected_at_open(tmp_path):
    path = str(tmp_path / "s")
    write_all(path, make_spec(), make_logits())
    values = os.path.join(path, "shards", "shard-00000-of-00001", "values.bin")
    with open(values, "ab") as f:
        f.truncate(os.path.getsize(values) - 2)
    with pytest.raises(ValueError, match="is corrupt: shard-00000-of-00001/values.bin has"):
        ls.LogitStore.open(path)


# ---------------------------------------------------------------------------------------------
# Writer errors, half-written stores, resume, atomicity
# ---------------------------------------------------------------------------------------------


def test_write_validation_errors(tmp_path):
    w = ls.LogitStoreWriter(str(tmp_path / "s"), make_spec())
    good = np.ones((2, C), np.float32)
    with pytest.raises(ValueError, match=r"example ids must be in \[0, 37\), got \[40\]"):
        w.write([0, 40], good)
    with pytest.raises(ValueError, match=r"ids \[4\] appear more than once"):
        w.write([4, 4], good)
    with pytest.raises(ValueError, match=r"logits must be a float array of shape \[B, num_classes=10\]"):
        w.write([0, 1], np.ones((2, C + 1), np.float32))
    with pytest.raises(ValueError, match=r"teacher logits are not finite in batch rows \[1\]"):
        w.write([0, 1], np.array([np.ones(C), np.full(C, np.nan)], np.float32))
    with pytest.raises(ValueError, match="cast to float16 .*use 'bfloat16' or 'float32'"):
        w.write([0, 1], np.full((2, C), 1e5, np.float32))
    with pytest.raises(ValueError, match="ids has 3 rows but the values have 2"):
        w.write([0, 1, 2], good)
    assert w.rows_written == 0
    assert w.write([0, 1], good, np.array([True, False])) == 1
    assert w.write([0, 1], good) == 1  # id 0 is already written and is skipped
    np.testing.assert_array_equal(w.is_written([0, 1, 2]), [True, True, False])
    w.close()
    with pytest.raises(ValueError, match="is closed; open a new writer with resume=True"):
        w.write([2], good[:1])


def test_writer_argument_errors(tmp_path):
    path = str(tmp_path / "s")
    with pytest.raises(ValueError, match=r"process_index must be an integer in \[0, process_count=2\), got 2"):
        ls.LogitStoreWriter(path, make_spec(), process_index=2, process_count=2)
    with pytest.raises(ValueError, match="commit_every must be a positive integer"):
        ls.LogitStoreWriter(path, make_spec(), commit_every=0)
    with pytest.raises(TypeError, match="spec must be a StoreSpec"):
        ls.LogitStoreWriter(path, make_spec().to_dict())
    with pytest.raises(ValueError, match="process_count must be a positive integer, got 0"):
        ls.LogitStoreWriter(path, make_spec(), process_count=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        ls.LogitStoreWriter(str(tmp_path / "file"), make_spec())


def test_resume_detects_shard_shorter_than_its_commit(tmp_path):
    path = str(tmp_path / "s")
    w = ls.LogitStoreWriter(path, make_spec())
    w.write(np.arange(5), make_logits()[:5])
    del w
    values = os.path.join(path, "shards", "shard-00000-of-00001", "values.bin")
    with open(values, "ab") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match=r"is corrupt: progress.json commits 5 rows but values.bin holds 10 bytes < 100"):
        ls.LogitStoreWriter(path, make_spec(), resume=True)


@pytest.mark.parametrize("bad_id", [99, -3])
def test_resume_refuses_shard_with_out_of_range_ids(tmp_path, bad_id):
    path = str(tmp_path / "s")
    w = ls.LogitStoreWriter(path, make_spec())
    w.write(np.arange(5), make_logits()[:5])
    del w
    shard = os.path.join(path, "shards", "shard-00000-of-00001")
    with open(os.path.join(shard, "ids.bin"), "r+b") as f:
        f.seek(16)
        f.write(np.int64(bad_id).tobytes())
    with open(os.path.join(shard, "values.bin"), "ab") as f:
        f.write(b"\x01\x02\x03")  # uncommitted tail: a refused resume must not truncate it either
    before = shard_bytes(path)
    with pytest.raises(ValueError, match=rf"shard .*shard-00000-of-00001 is corrupt: ids.bin holds id {bad_id} "
                                         r"\(row 2, 1 such rows\) outside \[0, num_examples=37\); delete the "
                                         r"shard directory .*shard-00000-of-00001 \(a resume recomputes"):
        ls.LogitStoreWriter(path, make_spec(), resume=True)
    assert shard_bytes(path) == before


def test_resume_refuses_shard_with_repeated_ids(tmp_path):
    path = str(tmp_path / "s")
    w = ls.LogitStoreWriter(path, make_spec())
    w.write(np.arange(5), make_logits()[:5])
    del w
    with open(os.path.join(path, "shards", "shard-00000-of-00001", "ids.bin"), "r+b") as f:
        f.seek(8)
        f.write(np.int64(3).tobytes())
    with pytest.raises(ValueError, match=r"is corrupt: ids.bin holds id 3 more than once \(1 ids repeat; two "
                                         r"writers appended to it at once\?\); delete the shard directory"):
        ls.LogitStoreWriter(path, make_spec(), resume=True)


def test_second_writer_on_a_locked_shard_is_refused(tmp_path):
    path, logits = str(tmp_path / "s"), make_logits()
    first = ls.LogitStoreWriter(path, make_spec())
    first.write(np.arange(10), logits[:10])
    before = shard_bytes(path)
    me = f"{os.getpid()}@{socket.gethostname()}"
    for resume in (True, False):
        with pytest.raises(ValueError, match=rf"shard .*shard-00000-of-00001 is locked by another writer "
                                             rf"\({me}, i.e. this process: close its other LogitStoreWriter.*"
                                             r"Wait for that run to finish or stop it, or write this store to "
                                             r"another directory"):
            ls.LogitStoreWriter(path, make_spec(), resume=resume)
    assert shard_bytes(path) == before  # the refused writer truncated nothing
    first.write(np.arange(10, 20), logits[10:20])
    first.close()
    with ls.LogitStoreWriter(path, make_spec(), resume=True) as again:  # close() released the lock
        assert again.rows_written == 20
        again.write(np.arange(N), logits)
    ls.finalize(path, 1)
    np.testing.assert_array_equal(bits(ls.LogitStore.open(path).lookup(np.arange(N))["teacher_logits"]),
                                  bits(logits.astype(np.float16)))


# The child touches no JAX state and leaves by os._exit, so JAX's fork warning does not apply.
@pytest.mark.filterwarnings(r"ignore:os.fork\(\) was called:RuntimeWarning")
def test_forked_child_releasing_its_copy_keeps_the_parent_lock(tmp_path):
    path = str(tmp_path / "s")
    w = ls.LogitStoreWriter(path, make_spec())
    pid = os.fork()
    if pid == 0:  # child: drop its inherited copy of the writer's lock, as its garbage collection would
        try:
            w._lock.release()
        finally:
            os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    with pytest.raises(ValueError, match="is locked by another writer"):
        ls.LogitStoreWriter(path, make_spec(), resume=True)
    w.close()
    ls.LogitStoreWriter(path, make_spec(), resume=True).close()


_LOCK_HOLDER = r'''
import sys, time
import numpy as np
from kdjax import logit_store as ls
path, n, c = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
spec = ls.StoreSpec(dataset="toy", split="train", num_examples=n, num_classes=c, teacher="toy-linear:v1",
                    preprocessing="none")
w = ls.LogitStoreWriter(path, spec)
w.write(np.arange(12), np.ones((12, c), np.float32))
print("READY", flush=True)
time.sleep(60)
'''


def test_killed_writer_does_not_block_resume(tmp_path):
    """A writer in another process holds the lock (the error names its pid@host); SIGKILL frees it."""
    path, logits = str(tmp_path / "s"), make_logits()
    script = tmp_path / "holder.py"
    script.write_text(_LOCK_HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), path, str(N), str(C)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        output = []
        for line in proc.stdout:
            if line == "READY\n":
                break
            output.append(line)
        else:
            raise AssertionError(f"the lock holder exited {proc.wait()} before READY:\n{''.join(output)}")
        with pytest.raises(ValueError, match=rf"is locked by another writer \(pid@host "
                                             rf"{proc.pid}@{socket.gethostname()}\)"):
            ls.LogitStoreWriter(path, make_spec(), resume=True)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
    with ls.LogitStoreWriter(path, make_spec(), resume=True) as w:
        assert w.rows_written == 12
        assert w.write(np.arange(N), logits) == N - 12
    ls.finalize(path, 1)
    got = ls.LogitStore.open(path).lookup(np.arange(N))["teacher_logits"]
    np.testing.assert_array_equal(got[:12], np.ones((12, C), np.float16))
    np.testing.assert_array_equal(bits(got[12:]), bits(logits[12:].astype(np.float16)))


def test_flush_after_close_is_an_error(tmp_path):
    w = ls.LogitStoreWriter(str(tmp_path / "s"), make_spec())
    w.close()
    w.close()  # idempotent
    with pytest.raises(ValueError, match="is closed"):
        w.flush()


def test_writer_refuses_foreign_or_complete_store(tmp_path):
    path = str(tmp_path / "s")
    ls.LogitStoreWriter(path, make_spec(), process_index=0, process_count=2).close()
    with pytest.raises(ValueError, match="started by 2 writer processes .* process_count=1"):
        ls.LogitStoreWriter(path, make_spec(), process_index=0, process_count=1)
    with pytest.raises(ValueError, match="is being written for StoreSpec.*split='train'.*split='test'"):
        ls.LogitStoreWriter(path, make_spec(split="test"), process_index=1, process_count=2)
    done = str(tmp_path / "done")
    write_all(done, make_spec(), make_logits())
    with pytest.raises(ValueError, match="is already complete"):
        ls.LogitStoreWriter(done, make_spec(), resume=True)


def test_half_written_store_refused_then_resumed(tmp_path):
    logits, order = make_logits(), np.random.default_rng(3).permutation(N)
    reference = str(tmp_path / "ref")
    write_all(reference, make_spec(), logits, order=order)

    path = str(tmp_path / "s")
    all_batches = batches_of(order, logits)
    w = ls.LogitStoreWriter(path, make_spec(), commit_every=2)
    for ids, vals, mask in all_batches[:3]:
        w.write(ids, vals, mask)
    del w  # crash: 2 writes committed, the third appended but never committed, no DONE marker

    with pytest.raises(ValueError, match=r"is incomplete .*shard-00000-of-00001: in progress \(16 rows committed\)"
                                         r".*resume=True"):
        ls.LogitStore.open(path, split="train")
    with pytest.raises(ValueError, match="1 of 1 shards are not done"):
        ls.finalize(path, 1)
    with pytest.raises(ValueError, match=r"already holds a partial write .*16 rows committed.*pass resume=True"):
        ls.LogitStoreWriter(path, make_spec())

    with ls.LogitStoreWriter(path, make_spec(), resume=True) as w:
        assert w.rows_written == 16
        written = [w.write(ids, vals, mask) for ids, vals, mask in all_batches]
    assert written[:2] == [0, 0] and sum(written) == N - 16
    ls.finalize(path, 1)
    assert shard_bytes(path) == shard_bytes(reference)
    np.testing.assert_array_equal(bits(ls.LogitStore.open(path).lookup(np.arange(N))["teacher_logits"]),
                                  bits(logits.astype(np.float16)))


class _FailAfter:
    """A file wrapper that writes `n` bytes of the next write, then raises (a crash mid-write)."""

    def __init__(self, f, n):
        self.f, self.n = f, n

    def write(self, data):
        self.f.write(data[:self.n])
        self.f.flush()
        raise OSError("disk full (simulated)")

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_crash_mid_write_is_never_read_as_complete(tmp_path):
    logits, order = make_logits(), np.arange(N)
    all_batches = batches_of(order, logits)
    path = str(tmp_path / "s")
    with pytest.raises(OSError, match="simulated"):
        with ls.LogitStoreWriter(path, make_spec()) as w:
            w.write(*all_batches[0])
            w._files["ids"] = _FailAfter(w._files["ids"], 5)
            w.write(*all_batches[1])
    shard = os.path.join(path, "shards", "shard-00000-of-00001")
    assert not os.path.exists(os.path.join(shard, "DONE")) and not ls.is_complete(path)
    assert os.path.getsize(os.path.join(shard, "ids.bin")) == B * 8 + 5  # partial bytes on disk
    with pytest.raises(ValueError, match="is failed .* resume=True"):
        w.write(*all_batches[2])
    with pytest.raises(ValueError, match=r"in progress \(8 rows committed\)"):
        ls.LogitStore.open(path)
    with pytest.raises(ValueError, match="not done"):
        ls.finalize(path, 1)

    with ls.LogitStoreWriter(path, make_spec(), resume=True) as w:
        for b in all_batches:
            w.write(*b)
    ls.finalize(path, 1)
    np.testing.assert_array_equal(bits(ls.LogitStore.open(path).lookup(np.arange(N))["teacher_logits"]),
                                  bits(logits.astype(np.float16)))


def test_exception_in_with_block_leaves_shard_not_done(tmp_path):
    path, logits = str(tmp_path / "s"), make_logits()
    with pytest.raises(RuntimeError, match="teacher died"):
        with ls.LogitStoreWriter(path, make_spec()) as w:
            w.write(np.arange(N), logits)
            raise RuntimeError("teacher died")
    with pytest.raises(ValueError, match=r"is incomplete .*in progress \(37 rows committed\)"):
        ls.LogitStore.open(path)


def test_markers_are_written_atomically(tmp_path, monkeypatch):
    """A failure while a marker is being written leaves the previous marker (or none), never a torn one."""
    path, logits = str(tmp_path / "s"), make_logits()
    w = ls.LogitStoreWriter(path, make_spec())
    w.write(np.arange(10), logits[:10])
    real_replace = os.replace

    def failing_replace(src, dst):
        raise OSError("power cut (simulated)")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="power cut"):
        w.write(np.arange(10, 20), logits[10:20])
    monkeypatch.setattr(os, "replace", real_replace)
    shard = os.path.join(path, "shards", "shard-00000-of-00001")
    assert json.load(open(os.path.join(shard, "progress.json"))) == {"rows": 10}
    assert not [f for f in os.listdir(shard) if ".tmp-" in f]
    with ls.LogitStoreWriter(path, make_spec(), resume=True) as w2:
        assert w2.rows_written == 10
        w2.write(np.arange(N), logits)
    ls.finalize(path, 1)
    np.testing.assert_array_equal(bits(ls.LogitStore.open(path).lookup(np.arange(N))["teacher_logits"]),
                                  bits(logits.astype(np.float16)))


# ---------------------------------------------------------------------------------------------
# precompute
# ---------------------------------------------------------------------------------------------

D = 6


def tiny_teacher(variables, batch):
    h = jnp.tanh(batch["image"] @ variables["w1"])
    logits = h @ variables["w2"] * 4.0
    return logits, {"pre_logits": h}


def teacher_setup():
    rng = np.random.default_rng(4)
    variables = {"w1": rng.normal(size=(D, 16)).astype(np.float32),
                 "w2": rng.normal(size=(16, C)).astype(np.float32)}
    images = rng.normal(size=(N, D)).astype(np.float32)
    direct = np.asarray(jax.jit(tiny_teacher)(variables, {"image": images})[0])
    return variables, images, direct


def image_batches(images, order, batch_size=16):
    out = []
    for start in range(0, len(order), batch_size):
        ids = np.asarray(order[start:start + batch_size], np.int64)
        pad = batch_size - ids.size
        out.append({"image": np.r_[images[ids], np.zeros((pad, D), np.float32)],
                    "id": np.r_[ids, np.full(pad, 99999, np.int64)],
                    "mask": np.r_[np.ones(ids.size, bool), np.zeros(pad, bool)],
                    "label": np.zeros(batch_size, np.int32)})
    return out


def meshes():
    devices = np.array(jax.devices()[:8]).reshape(4, 2)
    return {"auto": Mesh(devices, ("data", "fsdp")), "make_mesh": jax.make_mesh((4, 2), ("data", "fsdp"))}


@pytest.mark.parametrize("mesh_kind", ["auto", "make_mesh"])
def test_precompute_on_mesh_matches_direct_teacher(tmp_path, mesh_kind):
    assert jax.device_count() == 8
    variables, images, direct = teacher_setup()
    mesh = meshes()[mesh_kind]
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    variables = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
    order = np.random.default_rng(5).permutation(N)
    path = str(tmp_path / "s")
    with ls.LogitStoreWriter(path, make_spec(dtype="float32")) as w:
        stats = ls.precompute(tiny_teacher, variables, image_batches(images, order), w, sharding=sharding,
                              show_progress=False)
    assert stats == {"batches": 3, "batches_skipped": 0, "rows_written": N}
    ls.finalize(path, 1)
    got = ls.LogitStore.open(path).lookup(np.arange(N))["teacher_logits"]
    np.testing.assert_allclose(got, direct, rtol=1e-6, atol=1e-6)


def test_precompute_topk_on_mesh(tmp_path):
    variables, images, direct = teacher_setup()
    mesh, k = meshes()["auto"], 3
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    path = str(tmp_path / "s")
    with ls.LogitStoreWriter(path, make_spec(format="topk", k=k, dtype="float32")) as w:
        ls.precompute(lambda v, b: tiny_teacher(v, b)[0], variables, image_batches(images, np.arange(N)), w,
                      sharding=sharding, show_progress=False)
    ls.finalize(path, 1)
    got = ls.LogitStore.open(path, format="topk").lookup(np.arange(N))
    ref_idx = np.argsort(-direct.astype(np.float64), axis=1)[:, :k]
    np.testing.assert_array_equal(got["teacher_topk_indices"], ref_idx)
    np.testing.assert_allclose(got["teacher_topk_values"], np.take_along_axis(direct, ref_idx, 1),
                               rtol=1e-6, atol=1e-6)


def test_precompute_accepts_an_output_with_a_logits_attribute(tmp_path):
    variables, images, direct = teacher_setup()
    path = str(tmp_path / "s")

    def teacher(v, b):
        logits, features = tiny_teacher(v, b)
        return types.SimpleNamespace(logits=logits, features=features)

    with ls.LogitStoreWriter(path, make_spec(dtype="float32")) as w:
        ls.precompute(teacher, variables, image_batches(images, np.arange(N)), w, show_progress=False)
    ls.finalize(path, 1)
    np.testing.assert_allclose(ls.LogitStore.open(path).lookup(np.arange(N))["teacher_logits"], direct,
                               rtol=1e-6, atol=1e-6)


def test_precompute_resume_skips_written_batches(tmp_path):
    variables, images, direct = teacher_setup()
    all_batches = image_batches(images, np.arange(N))
    path = str(tmp_path / "s")
    w = ls.LogitStoreWriter(path, make_spec(dtype="float32"))
    ls.precompute(tiny_teacher, variables, all_batches[:2], w, show_progress=False)
    del w  # interrupted before close()
    with ls.LogitStoreWriter(path, make_spec(dtype="float32"), resume=True) as w:
        stats = ls.precompute(tiny_teacher, variables, all_batches, w, show_progress=True)
    assert stats == {"batches": 3, "batches_skipped": 2, "rows_written": N - 32}
    ls.finalize(path, 1)
    np.testing.assert_allclose(ls.LogitStore.open(path).lookup(np.arange(N))["teacher_logits"], direct,
                               rtol=1e-6, atol=1e-6)


def test_precompute_errors(tmp_path):
    variables, images, _ = teacher_setup()
    w = ls.LogitStoreWriter(str(tmp_path / "s"), make_spec(num_classes=C + 1))
    with pytest.raises(ValueError, match=r"teacher_fn returned logits of shape \(16, 10\); .*num_classes=11"):
        ls.precompute(tiny_teacher, variables, image_batches(images, np.arange(N)), w, show_progress=False)
    with pytest.raises(TypeError, match="sharding must be a jax.sharding.NamedSharding"):
        ls.precompute(tiny_teacher, variables, [], w, sharding=jax.devices()[0], show_progress=False)
    with pytest.raises(ValueError, match="precompute batches need an 'id' key"):
        ls.precompute(tiny_teacher, variables, [{"image": images[:4]}], w, show_progress=False)
    huge = types.SimpleNamespace(spec=make_spec(num_examples=2**31), path="unused")
    with pytest.raises(ValueError, match="carries ids through the device as int32; num_examples=2147483648"):
        ls.precompute(tiny_teacher, variables, [], huge, show_progress=False)


# ---------------------------------------------------------------------------------------------
# Two real JAX processes (jax.distributed on CPU, 4 devices each): disjoint writes, agreed skips
# ---------------------------------------------------------------------------------------------

_WORKER = r'''
import os, sys
process_id, port, path, phase = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from kdjax import logit_store as ls

N, C, D, LOCAL_B = 37, 10, 6, 8
rng = np.random.default_rng(4)
variables = {"w": rng.normal(size=(D, C)).astype(np.float32)}
images = rng.normal(size=(N, D)).astype(np.float32)
sharding = NamedSharding(jax.make_mesh((4, 2), ("data", "fsdp")), PartitionSpec(("data", "fsdp")))
batches = []
for start in range(0, 48, 2 * LOCAL_B):  # process p reads rows [start + 8p, start + 8p + 8) of each global batch
    ids = np.arange(N)[start + process_id * LOCAL_B: start + (process_id + 1) * LOCAL_B]
    pad = LOCAL_B - ids.size
    batches.append({"image": np.r_[images[ids], np.zeros((pad, D), np.float32)],
                    "id": np.r_[ids, np.full(pad, -1)],
                    "mask": np.r_[np.ones(ids.size, bool), np.zeros(pad, bool)]})
spec = ls.StoreSpec(dataset="toy", split="train", num_examples=N, num_classes=C, teacher="linear",
                    preprocessing="none", dtype="float32")
teacher = lambda v, b: b["image"] @ v["w"]
w = ls.LogitStoreWriter(path, spec, process_index=jax.process_index(), process_count=jax.process_count(),
                        resume=phase == "resume")
if phase == "crash":  # both run batch 0; process 0 also writes its part of batch 1; then both die
    ls.precompute(teacher, variables, batches[:1], w, sharding=sharding, show_progress=False)
    if process_id == 0:
        b = batches[1]
        w.write(b["id"], b["image"] @ variables["w"], b["mask"])
    multihost_utils.sync_global_devices("crashed")
    os._exit(0)
stats = ls.precompute(teacher, variables, batches, w, sharding=sharding, show_progress=False)
w.close()
multihost_utils.sync_global_devices("closed")
if process_id == 0:
    ls.finalize(path, jax.process_count())
multihost_utils.sync_global_devices("finalized")
got = ls.LogitStore.open(path, num_examples=N, num_classes=C).lookup(np.arange(N))["teacher_logits"]
np.testing.assert_allclose(got, images @ variables["w"], rtol=1e-5, atol=1e-5)
print("STATS", process_id, stats["batches_skipped"], stats["rows_written"], flush=True)
'''


def _run_two_processes(script, path, phase):
    import sys

    import local_processes

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return local_processes.run(lambda i, port: [sys.executable, str(script), str(i), str(port),
                                                path, phase], env=env, timeout=120)


def test_two_jax_processes_write_disjoint_rows_and_resume(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    path = str(tmp_path / "store")
    _run_two_processes(script, path, "crash")
    with pytest.raises(ValueError, match=r"shard-00000-of-00002: in progress \(16 rows committed\); "
                                         r"shard-00001-of-00002: in progress \(8 rows committed\)"):
        ls.LogitStore.open(path)
    outs = _run_two_processes(script, path, "resume")
    stats = sorted(line.split()[1:] for out in outs for line in out.splitlines() if line.startswith("STATS"))
    # Process 0 holds ids 0-7, 16-23, 32-36 (21 rows, 16 committed), process 1 ids 8-15, 24-31 (16, 8 committed;
    # its part of batch 2 is all padding). Batch 0 is skipped by both; batches 1 and 2 run on both, because
    # one process still needs each of them: the skip is agreed, else the two would run different programs.
    assert stats == [["0", "1", "5"], ["1", "1", "8"]]
    meta = json.load(open(os.path.join(path, "metadata.json")))
    assert [s["rows"] for s in meta["shards"]] == [21, 16]
