"""Experiment entry points end to end on scikit-learn digits (the ImageNet configs' ``smoke`` cells
and the small configs, a few CPU steps each), their configs, config errors, the report, and
resuming after a preemption stop.

One teacher is trained once per module (``train_teacher`` on the ImageNet ESKD config's smoke cell,
keeping epoch 1) and serves as the ``teacher.source=checkpoint`` teacher of most runs. Runs call
each entry point's ``main(argv)`` in-process, as the command line does.
"""

import glob
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import (datasets, errors, imagenet_eskd, imagenet_fitnet,
                         precompute_teacher_logits, recipes, report, rundir, runs, specs,
                         stages, teacher_io, teachers, train_teacher, validate)
from experiments.configs import (base, digits_eskd, digits_fitnet, imagenet_eskd as imagenet_cfg,
                                 imagenet_fitnet as fitnet_cfg, mnist1d_eskd, mnist1d_fitnet)
from kdjax import data as data_lib, loop, models, train
from test_convert import random_state_dict   # a random torchvision-layout state_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_ESKD = os.path.join(REPO, "experiments", "configs", "digits_eskd.py")
DIGITS_FITNET = os.path.join(REPO, "experiments", "configs", "digits_fitnet.py")
IMAGENET_ESKD = os.path.join(REPO, "experiments", "configs", "imagenet_eskd.py")
IMAGENET_FITNET = os.path.join(REPO, "experiments", "configs", "imagenet_fitnet.py")
TEACHER = imagenet_cfg.SMOKE_MODELS["resnet50"]  # the smoke cells' stand-in for ResNet-50
SPE = 1437 // 128  # digits smoke: 1437 train images, batch 128 -> 11 steps per epoch


def cell(arg, teacher_dir=None):
    """``--config=`` of an ImageNet ESKD smoke cell (with the module's checkpoint teacher)."""
    path = f",source=checkpoint,path={teacher_dir}" if teacher_dir else ""
    return f"--config={IMAGENET_ESKD}:{arg}{path},smoke"


def summary(workdir, stage):
    with open(os.path.join(workdir, "stages", stage, "summary.json")) as f:
        return json.load(f)


def records(workdir, stage, kind):
    train, evals = report.read_stage_metrics(os.path.join(workdir, "stages", stage))
    return train if kind == "train" else evals


def flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A trained digits teacher (2 epochs, epoch 1 kept), from the train_teacher entry point."""
    workdir = str(tmp_path_factory.mktemp("teacher"))
    status = train_teacher.main([cell("teacher=resnet50,mode=eskd,reading=early_teacher"),
                                 f"--workdir={workdir}"])
    assert status == 0
    return workdir


@pytest.fixture(scope="module")
def digits():
    return data_lib.digits_arrays()


def teacher_accuracy(teacher_dir, digits, sub="final"):
    """Top-1 of the exported teacher on the digits test split, computed here with flax directly."""
    module = models.create("cnn2d", 10, width=8)
    variables = rundir.load_variables(os.path.join(teacher_dir, "stages", "teacher", sub))
    logits, _ = module.apply({"params": variables["params"]}, digits["test"]["image"])
    return float(np.mean(np.argmax(np.asarray(logits), -1) == digits["test"]["label"]))


# ------------------------------------------------------------------------------------------------
# train_teacher: exports and early epochs.
# ------------------------------------------------------------------------------------------------


def test_train_teacher_exports_final_and_early_epoch(teacher_dir, digits):
    stage = os.path.join(teacher_dir, "stages", "teacher")
    early = rundir.read_json(os.path.join(stage, "epochs", "epoch_1", "meta.json"))
    final = rundir.read_json(os.path.join(stage, "final", "meta.json"))
    assert (early["epoch"], early["step"], early["model"]) == (1, SPE, TEACHER)
    assert (final["epoch"], final["step"]) == (2, 2 * SPE)
    # The exported states are the ones the run evaluated at those steps.
    assert teacher_accuracy(teacher_dir, digits) == pytest.approx(final["eval"]["accuracy"], abs=1e-9)
    assert teacher_accuracy(teacher_dir, digits, "epochs/epoch_1") == pytest.approx(
        early["eval"]["accuracy"], abs=1e-9)
    s = summary(teacher_dir, "teacher")
    assert s["role"] == "teacher" and s["exported_epochs"] == [1] and s["steps"] == 2 * SPE
    assert os.path.exists(os.path.join(teacher_dir, "report.md"))


# ------------------------------------------------------------------------------------------------
# ESKD entry point: scratch, full KD, both ESKD readings, report.
# ------------------------------------------------------------------------------------------------


def test_scratch_student_trains_on_labels_only(tmp_path):
    workdir = str(tmp_path / "scratch")
    assert imagenet_eskd.main([f"--config={DIGITS_ESKD}:teacher=none,smoke",
                               f"--workdir={workdir}"]) == 0
    s = summary(workdir, "student")
    assert (s["kd_mode"], s["reading"], s["teacher"]) == ("scratch", "none", None)
    train = records(workdir, "student", "train")
    assert train[-1]["step"] == 2 * SPE
    assert all("loss/kd" not in r and r["weight/ce"] == 1.0 for r in train)
    assert "teacher_accuracy" not in s["final"]
    assert sorted(os.listdir(os.path.join(workdir, "stages"))) == ["student"]


@pytest.fixture(scope="module")
def full_kd_dir(tmp_path_factory, teacher_dir):
    """The full-KD smoke cell distilled from the module's teacher (live)."""
    workdir = str(tmp_path_factory.mktemp("full"))
    assert imagenet_eskd.main([cell("teacher=resnet50,mode=full", teacher_dir),
                               f"--workdir={workdir}"]) == 0
    return workdir


def test_full_kd_from_checkpoint_teacher_and_report(full_kd_dir, teacher_dir, digits):
    workdir = full_kd_dir
    s = summary(workdir, "student")
    assert s["kd_mode"] == "full" and s["reading"] == "none" and "checkpoint, epoch 2" in s["teacher"]
    # The student was distilled from the exported final teacher: its eval sees that teacher.
    assert s["final"]["teacher_accuracy"] == pytest.approx(teacher_accuracy(teacher_dir, digits),
                                                           abs=1e-9)
    train = records(workdir, "student", "train")
    assert all(r["weight/kd"] == pytest.approx(0.9) and r["weight/ce"] == pytest.approx(0.1)
               for r in train)
    assert all(r["loss/kd"] > 0 for r in train)
    # Report: table row, reading note, three PNG plots.
    text = open(os.path.join(workdir, "report.md")).read()
    assert f"| student | `{imagenet_cfg.SMOKE_MODELS['resnet18']}` |" in text
    assert "early stopping" in text
    assert "`stop_kd`" in text and "`early_teacher`" in text
    for name in (report.LOSS_PLOT, report.ACCURACY_PLOT, report.MIMIC_PLOT):
        with open(os.path.join(workdir, name), "rb") as f:
            head = f.read(8)
        assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(os.path.join(workdir, name)) > 5000
        assert f"]({name})" in text
    results = rundir.read_json(os.path.join(workdir, "results.json"))
    assert [st["stage"] for st in results["stages"]] == ["student"]


def test_full_kd_with_the_teacher_on_its_own_devices(full_kd_dir, teacher_dir, tmp_path):
    """config.run.teacher_devices=4: the teacher on devices 4-7, the student on 0-3; the run's
    losses and final eval equal the run with the teacher inside the step (full_kd_dir)."""
    workdir = str(tmp_path / "ahead")
    assert imagenet_eskd.main([cell("teacher=resnet50,mode=full", teacher_dir),
                               "--config.run.teacher_devices=4", f"--workdir={workdir}"]) == 0
    got, want = summary(workdir, "student")["final"], summary(full_kd_dir, "student")["final"]
    for key in ("accuracy", "ce", "teacher_accuracy", "agreement", "kl"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    for a, b in zip(records(workdir, "student", "train"), records(full_kd_dir, "student", "train")):
        assert a["loss/kd"] == pytest.approx(b["loss/kd"], rel=1e-4)
    with pytest.raises(errors.ConfigError, match="teacher_devices=8 leaves none of the 8"):
        imagenet_eskd.main([cell("teacher=resnet50,mode=full", teacher_dir),
                            "--config.run.teacher_devices=8", f"--workdir={tmp_path / 'none'}"])
    with pytest.raises(errors.ConfigError, match=r"must be a multiple of the 5 devices of each "
                                                   r"mesh \(run.teacher_devices=3 of the 8"):
        imagenet_eskd.main([cell("teacher=resnet50,mode=full", teacher_dir),
                            "--config.run.teacher_devices=3", f"--workdir={tmp_path / 'odd'}"])
    with pytest.raises(errors.ConfigError, match=r"mesh_fsdp: fsdp=8 must be a positive divisor "
                                                   r"of the device count 4\. \(run.teacher_devices"):
        imagenet_eskd.main([cell("teacher=resnet50,mode=full", teacher_dir),
                            "--config.run.teacher_devices=4", "--config.run.mesh_fsdp=8",
                            f"--workdir={tmp_path / 'fsdp'}"])


def test_eskd_stop_kd_switches_kd_off_at_the_stop_epoch(tmp_path, teacher_dir):
    workdir = str(tmp_path / "eskd")
    assert imagenet_eskd.main([cell("teacher=resnet50,mode=eskd", teacher_dir),
                               "--config.run.log_every_steps=1", f"--workdir={workdir}"]) == 0
    s = summary(workdir, "student")
    assert s["reading"] == "stop_kd (KD term off from epoch 1)" and s["kd_stop_step"] == SPE
    train = records(workdir, "student", "train")
    assert len(train) == 2 * SPE  # one record per step
    for r in train:
        before = r["step"] <= SPE  # record step = updates done; update index step - 1 < SPE
        assert r["weight/kd"] == pytest.approx(0.9 if before else 0.0)
        assert r["weight/ce"] == pytest.approx(0.1 if before else 1.0)
        kd_part = r["weight/kd"] * r["loss/kd"]
        assert r["loss/total"] == pytest.approx(r["weight/ce"] * r["loss/ce"] + kd_part, rel=1e-5)
    assert "stop_kd (KD term off from epoch 1)" in open(os.path.join(workdir, "report.md")).read()


def test_eskd_early_teacher_uses_the_teachers_early_epoch(tmp_path, teacher_dir, digits):
    workdir = str(tmp_path / "early")
    assert imagenet_eskd.main([cell("teacher=resnet50,mode=eskd,reading=early_teacher", teacher_dir),
                               f"--workdir={workdir}"]) == 0
    s = summary(workdir, "student")
    assert s["reading"] == "early_teacher (teacher from its epoch 1)"
    assert "epoch 1" in s["teacher"]
    stage = os.path.join(teacher_dir, "stages", "teacher")
    early_params = flat(rundir.load_variables(os.path.join(stage, "epochs", "epoch_1"))["params"])
    final_params = flat(rundir.load_variables(os.path.join(stage, "final"))["params"])
    assert any(not np.array_equal(early_params[k], final_params[k]) for k in early_params)
    early = teacher_accuracy(teacher_dir, digits, "epochs/epoch_1")
    assert s["final"]["teacher_accuracy"] == pytest.approx(early, abs=1e-9)
    train = records(workdir, "student", "train")
    assert all(r["weight/kd"] == pytest.approx(0.9) for r in train)


@pytest.mark.slow
def test_eskd_smoke_with_teacher_trained_in_the_run(tmp_path):
    """The CI smoke cell of the ImageNet grid: the teacher stage, then the ESKD student."""
    workdir = str(tmp_path / "inrun")
    assert imagenet_eskd.main([f"--config={IMAGENET_ESKD}:teacher=resnet50,mode=eskd,"
                               "reading=early_teacher,smoke", f"--workdir={workdir}"]) == 0
    assert [s["stage"] for s in report.load_results(workdir)] == ["teacher", "student"]
    assert os.path.isdir(os.path.join(workdir, "stages", "teacher", "epochs", "epoch_1"))
    assert summary(workdir, "student")["teacher"] == "cnn2d:width=8 (trained here, epoch 1)"


def test_teacher_assistant_chain_distils_through_the_assistant(tmp_path, teacher_dir):
    workdir = str(tmp_path / "chain")
    assert imagenet_eskd.main([cell("teacher=resnet50,mode=full,ta=resnet34", teacher_dir),
                               f"--workdir={workdir}"]) == 0
    stages = [s["stage"] for s in report.load_results(workdir)]
    assert stages == ["assistant1", "student"]
    assistant, student = summary(workdir, "assistant1"), summary(workdir, "student")
    middle = imagenet_cfg.SMOKE_MODELS["resnet34"]
    assert assistant["model"] == middle and TEACHER in assistant["teacher"]
    assert student["teacher"] == f"assistant1 ({middle})" and student["chain"] == [middle]
    assert assistant["reading"] == student["reading"] == "none"
    # The student's teacher is the trained assistant: same accuracy on the same eval split.
    assert student["final"]["teacher_accuracy"] == pytest.approx(assistant["final"]["accuracy"],
                                                                 abs=1e-9)


# ------------------------------------------------------------------------------------------------
# Precomputed teacher and torchvision teacher.
# ------------------------------------------------------------------------------------------------


def test_precomputed_store_matches_the_teacher_and_gives_the_live_losses(tmp_path, teacher_dir,
                                                                         full_kd_dir, digits,
                                                                         monkeypatch):
    from kdjax import logit_store

    store = str(tmp_path / "store")
    full = cell("teacher=resnet50,mode=full", teacher_dir)
    assert precompute_teacher_logits.main([full, f"--store={store}"]) == 0
    module = models.create("cnn2d", 10, width=8)
    variables = rundir.load_variables(os.path.join(teacher_dir, "stages", "teacher", "final"))

    topk = str(tmp_path / "topk")
    assert precompute_teacher_logits.main([full, "--config.teacher.store_format=topk",
                                           "--config.teacher.store_k=3", "--splits=test",
                                           f"--store={topk}"]) == 0
    assert sorted(os.listdir(topk)) == ["test"]
    logits, _ = module.apply({"params": rundir.load_variables(os.path.join(
        teacher_dir, "stages", "teacher", "final"))["params"]}, digits["test"]["image"])
    order = np.argsort(-np.asarray(logits), axis=-1, kind="stable")[:, :3]
    got = logit_store.LogitStore.open(os.path.join(topk, "test")).lookup(np.arange(len(order)))
    np.testing.assert_array_equal(got["teacher_topk_indices"], order)
    np.testing.assert_allclose(got["teacher_topk_values"],
                               np.take_along_axis(np.asarray(logits), order, -1), rtol=1e-5,
                               atol=1e-6)  # batched vs whole-split forward: float32 reassociation
    for split in ("train", "test"):
        opened = logit_store.LogitStore.open(os.path.join(store, split))
        n = len(digits[split]["label"])
        assert opened.spec.num_examples == n and opened.spec.dtype == "float32"
        assert opened.spec.teacher.endswith(f", weights {teacher_io.weights_digest(variables)}")
        logits, _ = module.apply({"params": variables["params"]}, digits[split]["image"])
        stored = opened.lookup(np.arange(n))["teacher_logits"]
        np.testing.assert_allclose(stored, np.asarray(logits), rtol=1e-5, atol=1e-5)

    # A preemption mid-way: exit 0 with the rows so far committed; --resume completes the same store.
    real_precompute = logit_store.precompute

    def preempted(fn, variables, batches, writer, **kwargs):
        def signal_at_second(it=iter(batches)):
            for i, batch in enumerate(it):
                if i == 0:  # the pass stops after this batch, the first of three
                    signal.raise_signal(signal.SIGTERM)
                yield batch
        return real_precompute(fn, variables, signal_at_second(), writer, **kwargs)
    again = [full, f"--store={tmp_path / 'again'}", "--splits=test",
             "--config.dataset.eval_batch_size=128"]
    monkeypatch.setattr(logit_store, "precompute", preempted)
    assert precompute_teacher_logits.main(again) == 0
    shard, = glob.glob(str(tmp_path / "again" / "test" / "shards" / "*"))
    assert not logit_store.is_complete(str(tmp_path / "again" / "test"))
    assert rundir.read_json(os.path.join(shard, "progress.json")) == {"rows": 128}
    monkeypatch.setattr(logit_store, "precompute", real_precompute)
    with pytest.raises(ValueError, match=r"partial write.*--resume"):
        precompute_teacher_logits.main(again)
    assert precompute_teacher_logits.main(again + ["--resume"]) == 0
    ids = np.arange(len(digits["test"]["label"]))
    np.testing.assert_array_equal(
        logit_store.LogitStore.open(str(tmp_path / "again" / "test")).lookup(ids)["teacher_logits"],
        logit_store.LogitStore.open(os.path.join(store, "test")).lookup(ids)["teacher_logits"])

    live, pre = full_kd_dir, str(tmp_path / "pre")
    kd_argv = [full.replace(",smoke", ",precomputed,smoke"), f"--workdir={pre}"]
    # A KD run computes a missing store first; preempted there, it stops (exit 0, no stage)...
    monkeypatch.setattr(logit_store, "precompute", preempted)
    fresh = f"--config.teacher.store={tmp_path / 'fresh'}"
    assert imagenet_eskd.main(kd_argv + [fresh]) == 0
    assert not os.path.exists(os.path.join(pre, "stages", "student"))
    monkeypatch.setattr(logit_store, "precompute", real_precompute)
    # ... and resumes it on the next start, then trains.
    assert imagenet_eskd.main(kd_argv + [fresh]) == 0
    assert logit_store.is_complete(str(tmp_path / "fresh" / "train"))
    assert summary(pre, "student")["precomputed"] is True
    live_train, pre_train = records(live, "student", "train"), records(pre, "student", "train")
    assert [r["step"] for r in live_train] == [r["step"] for r in pre_train]
    for a, b in zip(live_train, pre_train):
        for key in ("loss/ce", "loss/kd", "loss/total", "teacher_accuracy"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    for key in ("accuracy", "teacher_accuracy", "agreement", "kl"):
        assert summary(pre, "student")["final"][key] == pytest.approx(
            summary(live, "student")["final"][key], rel=1e-4, abs=1e-6)


def test_view_store_from_the_command_line_and_a_run_reading_it(tmp_path, teacher_dir, full_kd_dir,
                                                                 digits):
    """``--views=epochs:0-1``: the train split's store holds the teacher on every (epoch, id) view of
    the run's seed and train transform (digits smoke: no augmentation, so each view is the image);
    the KD run with ``teacher.store_views`` reads it and logs the live run's losses; a run of another
    seed or epoch range, or one expecting the unaugmented store, is refused naming the difference."""
    from kdjax import logit_store

    store = str(tmp_path / "views")
    full = cell("teacher=resnet50,mode=full", teacher_dir)
    assert precompute_teacher_logits.main([full, f"--store={store}", "--views=epochs:0-1"]) == 0
    train = logit_store.LogitStore.open(os.path.join(store, "train"))
    test = logit_store.LogitStore.open(os.path.join(store, "test"))
    assert train.spec.views and train.spec.epochs == (0, 1) and train.spec.seed == 0
    assert train.spec.transform == "identity" and not test.spec.views
    n = len(digits["train"]["label"])
    variables = rundir.load_variables(os.path.join(teacher_dir, "stages", "teacher", "final"))
    logits, _ = models.create("cnn2d", 10, width=8).apply({"params": variables["params"]},
                                                          digits["train"]["image"])
    for epoch in (0, 1):
        got = train.lookup(np.arange(n), np.full(n, epoch))["teacher_logits"]
        assert got.shape == (n, 10) and got.dtype == np.float32
        np.testing.assert_allclose(got, np.asarray(logits), rtol=1e-5, atol=1e-5)

    pre = str(tmp_path / "pre")
    kd_argv = [full.replace(",smoke", ",precomputed,smoke"), f"--workdir={pre}",
               f"--config.teacher.store={store}", "--config.teacher.store_views=epochs:0-1"]
    assert imagenet_eskd.main(kd_argv) == 0
    live_train, pre_train = records(full_kd_dir, "student", "train"), records(pre, "student", "train")
    assert [r["step"] for r in live_train] == [r["step"] for r in pre_train]
    for a, b in zip(live_train, pre_train):
        for key in ("loss/ce", "loss/kd", "loss/total"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key

    base_argv = [full.replace(",smoke", ",precomputed,smoke"), f"--config.teacher.store={store}"]
    with pytest.raises(ValueError, match=r"was written for seed 0 but the run's data seed is 3.*"
                                         r"--views=epochs:<first>-<last>"):
        imagenet_eskd.main(base_argv + [f"--workdir={tmp_path / 'seed'}", "--config.seed=3",
                                        "--config.teacher.store_views=epochs:0-1"])
    with pytest.raises(ValueError, match=r"was written for preprocessing 'train-transform-views' but "
                                         r"the run expects preprocessing 'digits-standardised'; for "
                                         r"epochs \(0, 1\) but the run expects the views of epochs None"):
        imagenet_eskd.main(base_argv + [f"--workdir={tmp_path / 'centre'}"])
    with pytest.raises(ValueError, match=r"was written for epochs \(0, 1\) but the run expects the "
                                         r"views of epochs \(0, 2\)"):
        imagenet_eskd.main(base_argv + [f"--workdir={tmp_path / 'range'}", "--config.num_epochs=3",
                                        "--config.teacher.store_views=epochs:0-2"])


def test_store_views_config_errors():
    c = imagenet_cfg.get_config("teacher=resnet50,mode=full,smoke")
    c.teacher.store_views = "epochs:0-0"
    with pytest.raises(errors.ConfigError, match=r"store_views='epochs:0-0' holds the views of epochs "
                                                 r"0-0, but the run trains epochs 0-1; use "
                                                 r"--views=epochs:0-1"):
        validate.validate_config(c, None, files=False)
    for bad in ("0-89", "epochs:5-2", "epochs:a-b"):
        with pytest.raises(errors.ConfigError, match=r"expected 'epochs:FIRST-LAST'"):
            teacher_io.parse_views(bad)
    assert teacher_io.parse_views("epochs:0-89") == (0, 89) and teacher_io.parse_views("") is None


def test_weights_digest_changes_with_any_weight_and_not_with_placement():
    """The teacher identity a store records: equal weights give one digest wherever they live
    (NumPy, one device, sharded over 8); one changed float, a renamed or reshaped leaf, another."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from kdjax import sharding

    rng = np.random.default_rng(0)
    w = {"params": {"conv": {"kernel": rng.normal(size=(8, 4)).astype(np.float32)},
                    "fc": {"bias": np.zeros(3, np.float32)}}}
    digest = teacher_io.weights_digest(w)
    assert len(digest) == 12 and int(digest, 16) >= 0
    mesh = sharding.make_mesh()
    spread = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P(mesh.axis_names[0]))
                                                   if x.shape[0] % 8 == 0 else None), w)
    assert spread["params"]["conv"]["kernel"].sharding.num_devices == 8
    assert teacher_io.weights_digest(spread) == digest
    assert teacher_io.weights_digest(jax.tree.map(jnp.asarray, w)) == digest
    nudged = jax.tree.map(np.copy, w)
    nudged["params"]["conv"]["kernel"][3, 1] = np.nextafter(nudged["params"]["conv"]["kernel"][3, 1],
                                                            np.float32(np.inf))
    renamed = {"params": {"conv": w["params"]["conv"], "head": w["params"]["fc"]}}
    reshaped = jax.tree.map(lambda x: x.reshape(4, 8) if x.ndim == 2 else x, w)
    others = {teacher_io.weights_digest(v) for v in (nudged, renamed, reshaped)}
    assert len(others) == 3 and digest not in others


def test_torchvision_teacher_loads_the_converted_weights(tmp_path, digits):
    from kdjax import convert

    path = str(tmp_path / "resnet18.npz")
    np.savez(path, **random_state_dict(18, 10))
    config = digits_eskd.get_config("teacher=large,mode=full,smoke").unlock()
    config.teacher.model, config.teacher.source, config.teacher.path = "resnet18", "torchvision", path
    config.dataset.rgb = True
    validate.validate_config(config, "kd")
    data = datasets.build_data(config.dataset, config.seed)
    teacher = teachers.load_torchvision_teacher(config, data)
    assert teacher.label == "resnet18 (torchvision: resnet18.npz)"
    x = data.sources["test"][np.arange(16)]["image"]
    np.testing.assert_array_equal(x, np.repeat(digits["test"]["image"][:16], 3, axis=-1))
    got, _ = teacher.module.apply(teacher.variables, x)
    want, _ = models.create("resnet18", 10).apply(convert.load_torchvision_resnet(path, 18), x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_torchvision_teacher_from_a_random_npz(tmp_path, digits):
    from kdjax import convert

    path = str(tmp_path / "resnet18.npz")
    np.savez(path, **random_state_dict(18, 10))
    workdir = str(tmp_path / "tv")
    assert imagenet_eskd.main([f"--config={DIGITS_ESKD}:teacher=large,mode=full,smoke",
                               "--config.teacher.model=resnet18",
                               "--config.teacher.source=torchvision", f"--config.teacher.path={path}",
                               "--config.dataset.rgb=True", f"--workdir={workdir}"]) == 0
    s = summary(workdir, "student")
    assert s["teacher"] == "resnet18 (torchvision: resnet18.npz)"
    # Independent: the converted ResNet-18 on the grey digits repeated to 3 channels.
    variables = convert.load_torchvision_resnet(path, 18)
    rgb = np.repeat(digits["test"]["image"], 3, axis=-1)
    logits, _ = models.create("resnet18", 10).apply(variables, rgb)
    expected = float(np.mean(np.argmax(np.asarray(logits), -1) == digits["test"]["label"]))
    assert s["final"]["teacher_accuracy"] == pytest.approx(expected, abs=1e-9)


def test_torchvision_teacher_errors_name_the_fix(tmp_path):
    path = str(tmp_path / "resnet18.npz")
    np.savez(path, **random_state_dict(18, 7))
    argv = [f"--config={DIGITS_ESKD}:teacher=large,mode=full,smoke",
            "--config.teacher.model=resnet18", "--config.teacher.source=torchvision",
            f"--config.teacher.path={path}", f"--workdir={tmp_path / 'w'}"]
    with pytest.raises(errors.ConfigError, match=r"7-class fc layer but digits has 10 classes"):
        imagenet_eskd.main(argv)
    np.savez(path, **random_state_dict(18, 10))
    with pytest.raises(errors.ConfigError, match=r"expects 3-channel images .* set dataset.rgb=True"):
        imagenet_eskd.main(argv)
    thin = [a.replace("model=resnet18", "model=resnet18:width=32") for a in argv]
    with pytest.raises(errors.ConfigError, match=r"64 wide; .* needs width=64 \(drop ':width=...'\)"):
        imagenet_eskd.main(thin)


# ------------------------------------------------------------------------------------------------
# FitNet.
# ------------------------------------------------------------------------------------------------


def test_fitnet_stage1_trains_only_up_to_the_guided_layer(tmp_path, teacher_dir, monkeypatch):
    # Record each stage's initial parameters as fit creates them (host copies: the state is donated).
    initial = {}
    real_init = train.init_train_state

    def recording_init(module, *args, **kwargs):
        state, shardings = real_init(module, *args, **kwargs)
        initial[type(module).__name__] = jax.device_get(state.params)
        return state, shardings

    merged = []
    real_merge = loop.merge_init_params

    def recording_merge(state, init_params, *args, **kwargs):
        merged.append(jax.device_get(init_params))
        return real_merge(state, init_params, *args, **kwargs)

    monkeypatch.setattr(train, "init_train_state", recording_init)
    monkeypatch.setattr(loop, "merge_init_params", recording_merge)
    workdir = str(tmp_path / "fitnet")
    assert imagenet_fitnet.main([f"--config={IMAGENET_FITNET}:source=checkpoint,path={teacher_dir},"
                                 "smoke", f"--workdir={workdir}"]) == 0
    config = fitnet_cfg.get_config(f"source=checkpoint,path={teacher_dir},smoke")
    assert (config.student.model, config.teacher.model) == ("cnn2d_thin_deep:width=4", TEACHER)
    assert sorted(initial) == ["CNN2D", "WithRegressor"]  # stage 2 runs the bare student
    stage1 = rundir.load_variables(os.path.join(workdir, "stages", "fitnet_stage1", "final"))
    before, after = flat(initial["WithRegressor"]), flat(stage1["params"])
    assert sorted(before) == sorted(after)
    changed = {k.split("'")[1] for k in before if not np.array_equal(before[k], after[k])}
    # cnn2d_thin_deep: depth 6 = two stages of 3 convs; the guided tap 'stage1' is conv1..conv3.
    assert changed == {"conv1", "conv2", "conv3", "regressor"}
    s1, s2 = summary(workdir, "fitnet_stage1"), summary(workdir, "fitnet_stage2")
    assert s1["trained_modules"] == ["conv1", "conv2", "conv3", "regressor"]
    assert s1["final"] is None and "loss/hint/stage1_regressed" in s1["final_train"]
    # Stage 2: the bare student (no regressor), KD with lambda annealed 4 -> 1 (weight lambda/T^2).
    stage2 = rundir.load_variables(os.path.join(workdir, "stages", "fitnet_stage2", "final"))
    assert "regressor" not in stage2["params"]
    (start2,) = merged  # stage 2 started from stage 1's weights, regressor dropped
    expected = {k: v for k, v in after.items() if not k.startswith("['regressor']")}
    started = flat(start2["params"])
    assert started.keys() == expected.keys()
    assert all(np.array_equal(started[k], expected[k]) for k in expected)
    train2 = records(workdir, "fitnet_stage2", "train")
    weights = [r["weight/kd"] for r in train2]
    assert weights[0] < 4.0 / 9.0 and weights[-1] >= 1.0 / 9.0 - 1e-6
    assert all(a > b for a, b in zip(weights, weights[1:]))
    assert s2["kd_mode"] == "fitnet" and s2["final"]["accuracy"] > 0
    text = open(os.path.join(workdir, "report.md")).read()
    assert "trained modules conv1, conv2, conv3, regressor" in text


def test_guided_modules_follow_the_architecture():
    x = np.zeros((1, 40, 1), np.float32)
    cnn = models.create("cnn1d_thin_deep", 10)  # depth 9: three stages of 3 convs
    variables = cnn.init(jax.random.key(0), x)
    assert runs.guided_modules(cnn, variables, x, "stage2") == {f"conv{i}" for i in range(1, 7)}
    mlp = models.create("mlp", 10, depth=3)
    variables = mlp.init(jax.random.key(0), x)
    assert runs.guided_modules(mlp, variables, x, "stage1") == {"dense1"}
    # ResNet-18 (its last BN scale of each block zero-initialised): stage2 needs the stem, stage 1
    # and stage 2 blocks, nothing after.
    image = np.zeros((1, 32, 32, 3), np.float32)
    resnet = models.create("resnet18", 10, zero_init_residual=True)
    abstract = jax.eval_shape(lambda: resnet.init(jax.random.key(0), image))
    assert runs.guided_modules(resnet, abstract, image, "stage2") == {
        "conv1", "bn1", "layer1_0", "layer1_1", "layer2_0", "layer2_1"}
    with pytest.raises(errors.ConfigError, match=r"guided_layer='stage9' is not a feature"):
        runs.guided_modules(mlp, variables, x, "stage9")


def test_frozen_modules_get_no_update_not_even_weight_decay():
    opt = base.kd_config().optimizer
    opt.weight_decay = 0.1
    tx = recipes.make_optimizer(opt, 0.5, trainable=lambda name: name == "a")
    params = {"a": {"w": jnp.ones(3)}, "b": {"w": jnp.ones(3)}}
    grads = {"a": {"w": jnp.full(3, 2.0)}, "b": {"w": jnp.full(3, 2.0)}}
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["b"]["w"], np.zeros(3))
    np.testing.assert_allclose(updates["a"]["w"], -0.5 * (2.0 + 0.1 * 1.0) * np.ones(3), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Resume after a preemption stop.
# ------------------------------------------------------------------------------------------------


def test_preempted_run_exits_zero_runs_no_later_stage_and_resumes(tmp_path, monkeypatch):
    workdir = str(tmp_path / "resume")
    argv = [cell("teacher=resnet18,mode=full"), f"--workdir={workdir}"]
    real_fit = loop.fit

    def fit_with_sigterm(**kwargs):
        if kwargs["options"].name == "teacher":
            seen = []
            inner = kwargs.get("batch_transform")

            def transform(batch):
                if "epoch" in batch:
                    seen.append(1)
                    if len(seen) == 5:
                        signal.raise_signal(signal.SIGTERM)
                return batch if inner is None else inner(batch)
            kwargs["batch_transform"] = transform
        return real_fit(**kwargs)

    monkeypatch.setattr(loop, "fit", fit_with_sigterm)
    assert imagenet_eskd.main(argv) == 0
    teacher_stage = os.path.join(workdir, "stages", "teacher")
    assert not os.path.exists(os.path.join(teacher_stage, "summary.json"))
    assert not os.path.exists(os.path.join(workdir, "stages", "student"))
    assert not os.path.exists(os.path.join(workdir, "report.md"))
    stopped_at = max(int(s) for s in os.listdir(os.path.join(teacher_stage, "checkpoints"))
                     if s.isdigit())
    assert 0 < stopped_at < 2 * SPE

    monkeypatch.setattr(loop, "fit", real_fit)
    # A key that shapes the results may not change under a half-trained stage ...
    with pytest.raises(errors.ConfigError, match=(
            r"was started with another config \(optimizer.lr: 0.05 -> 0.5\); a resumed run would "
            r"mix the two.*--config.run.allow_config_change=True")):
        imagenet_eskd.main(argv + ["--config.optimizer.lr=0.5"])
    first_config = rundir.read_json(os.path.join(workdir, "config.json"))
    # ... one that does not (checkpoints kept) may: logged, config.json stays the first one.
    assert imagenet_eskd.main(argv + ["--config.run.keep=5"]) == 0
    assert rundir.read_json(os.path.join(workdir, "config.json")) == first_config
    with open(os.path.join(workdir, "config_changes.jsonl")) as f:
        assert [json.loads(line)["changed"] for line in f] == [{"run.keep": [3, 5]}]
    train = records(workdir, "teacher", "train")
    steps = [r["step"] for r in train]
    assert steps == sorted(set(steps)) and steps[-1] == 2 * SPE
    assert [s["stage"] for s in report.load_results(workdir)] == ["teacher", "student"]
    assert os.path.exists(os.path.join(workdir, "report.md"))
    # A third start finds every stage complete and trains nothing.
    mtimes = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(workdir, "stages", "*",
                                                                      "summary.json"))}
    assert imagenet_eskd.main(argv) == 0
    assert mtimes == {p: os.path.getmtime(p) for p in mtimes}


# ------------------------------------------------------------------------------------------------
# Configs and config errors.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("teacher", imagenet_cfg.TEACHERS)
@pytest.mark.parametrize("mode", ("scratch", "full", "eskd"))
def test_imagenet_grid_cells_carry_the_paper_numbers_and_validate(tmp_path, teacher, mode):
    npz = tmp_path / "t.npz"
    npz.write_bytes(b"")
    config = imagenet_cfg.get_config(f"teacher={teacher},mode={mode},path={npz}")
    effective = "scratch" if teacher == "none" or mode == "scratch" else mode
    paper_teacher = "none" if effective == "scratch" else teacher
    assert config.kd.mode == effective and config.student.model == "resnet18"
    assert config.teacher.source == ("none" if effective == "scratch" else "torchvision")
    assert config.paper.student_error == imagenet_cfg.PAPER_STUDENT_ERROR[(paper_teacher, effective)]
    assert config.paper.teacher_error == imagenet_cfg.PAPER_TEACHER_ERROR.get(paper_teacher)
    assert (config.optimizer.lr, config.optimizer.momentum, config.optimizer.weight_decay) == (
        0.1, 0.9, 1e-4)
    assert (config.num_epochs, tuple(config.optimizer.decay_epochs)) == (90, (30, 60))
    assert (config.kd.temperature, config.kd.weight, config.kd.ce_weight) == (4.0, 0.9, 0.1)
    assert (config.kd.stop_epoch == 60) == (effective == "eskd")
    validate.validate_config(config, "kd")


def test_paper_table_values():
    assert imagenet_cfg.PAPER_STUDENT_ERROR[("none", "scratch")] == 30.24
    assert [imagenet_cfg.PAPER_STUDENT_ERROR[(t, "full")] for t in ("resnet18", "resnet34",
                                                                    "resnet50")] == [30.57, 30.79,
                                                                                     30.95]
    assert [imagenet_cfg.PAPER_STUDENT_ERROR[(t, "eskd")] for t in ("resnet18", "resnet34",
                                                                    "resnet50")] == [29.01, 29.16,
                                                                                     29.35]
    assert imagenet_cfg.PAPER_TEACHER_ERROR == {"resnet18": 30.24, "resnet34": 26.70,
                                                "resnet50": 23.85}


def test_every_config_cell_validates(tmp_path):
    npz = tmp_path / "t.npz"
    npz.write_bytes(b"")
    for module in (mnist1d_eskd, digits_eskd):
        for teacher in ("none", "small", "medium", "large"):
            for arg in ("mode=full", "mode=eskd", "mode=eskd,reading=early_teacher", "smoke"):
                validate.validate_config(module.get_config(f"teacher={teacher},{arg}"), "kd")
        chain = module.get_config("teacher=large,mode=eskd,ta=medium+small")
        assert len(chain.assistants) == 2
        validate.validate_config(chain, "kd")
    for module in (mnist1d_fitnet, digits_fitnet):
        validate.validate_config(module.get_config(), "fitnet")
        validate.validate_config(module.get_config("smoke"), "fitnet")
    for arg in ("", "student=resnet34", "smoke"):
        validate.validate_config(fitnet_cfg.get_config(f"path={npz}" + (f",{arg}" if arg else "")),
                                 "fitnet")
    early = imagenet_cfg.get_config("teacher=resnet50,mode=eskd,reading=early_teacher,source=train")
    assert early.teacher.early_epoch == 35 and early.kd.stop_epoch is None
    validate.validate_config(early, "kd")
    chain = imagenet_cfg.get_config(f"teacher=resnet50,mode=full,ta=resnet34,path={npz}")
    assert tuple(chain.assistants) == ("resnet34",) and chain.paper.student_error is None


def test_imagenet_fitnet_student_is_thinner_and_deeper_than_its_teacher():
    """The paper's FitNets are thinner (fewer channels at the hint) and deeper (more layers) than
    their teachers, and r ends in the hint layer's non-linearity (post-ReLU stage outputs)."""
    config = fitnet_cfg.get_config()
    x = jnp.zeros((1, 64, 64, 3))

    def shapes(spec):
        module = specs.build_model(spec, 1000)
        variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
        _, feats = jax.eval_shape(module.apply, variables, x)
        kernels = [k for p, k in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
                   if p[-1].key == "kernel"]
        return sum(k.size for k in jax.tree.leaves(variables["params"])), len(kernels), feats

    t_params, t_layers, t_feats = shapes(config.teacher.model)
    s_params, s_layers, s_feats = shapes(config.student.model)
    assert config.student.model == "resnet101:width=32" and config.teacher.model == "resnet50"
    assert s_layers > t_layers and s_params < t_params / 2
    hint, guided = t_feats[config.fitnet.hint_layer], s_feats[config.fitnet.guided_layer]
    assert guided.shape[1:3] == hint.shape[1:3] and guided.shape[-1] * 2 == hint.shape[-1]
    assert config.fitnet.regressor_relu and (config.fitnet.temperature, config.fitnet.weight_start,
                                              config.fitnet.weight_end) == (3.0, 4.0, 1.0)


def expect_config_error(tmp_path, main, argv, *patterns):
    workdir = str(tmp_path / "never")
    with pytest.raises(errors.ConfigError) as info:
        main(argv + [f"--workdir={workdir}"])
    for pattern in patterns:
        assert pattern in str(info.value), str(info.value)
    assert not os.path.exists(workdir)  # checked before any work
    return str(info.value)


SMOKE = f"--config={DIGITS_ESKD}:smoke"


@pytest.mark.parametrize("override, patterns", [
    ("--config.kd.nonexistent=1", ("unknown config key 'nonexistent' in config.kd",
                                   "valid keys there: ce_weight, mode, reading, stop_epoch")),
    ("--config.foo=1", ("unknown config key 'foo' in config;", "dataset")),
    ("--config.kd.mode=bogus", ("config.kd.mode='bogus' is not valid",
                                "'scratch', 'full', 'eskd'")),
    ("--config.kd.reading=late", ("config.kd.reading='late' is not valid",
                                  "'stop_kd', 'early_teacher'")),
    ("--config.dataset.name=cifar10", ("config.dataset.name='cifar10' is not valid",
                                       "'imagenet2012', 'mnist1d', 'digits'")),
    ("--config.student.model=resnet7", ("config.student.model='resnet7'",
                                        "Unknown model name 'resnet7'", "resnet18")),
    ("--config.teacher.source=hub", ("config.teacher.source='hub' is not valid",
                                     "'none', 'train', 'checkpoint', 'torchvision'")),
    ("--config.optimizer.name=lion", ("config.optimizer.name='lion' is not valid", "'sgd'")),
    ("--config.num_epochs=abc", ("--config.num_epochs=abc", "invalid literal for int()")),
    ("--config.seed=4294967296", ("config.seed=4294967296 must be below 2**32",)),
])
def test_bad_config_values_give_clear_errors(tmp_path, override, patterns):
    expect_config_error(tmp_path, imagenet_eskd.main, [SMOKE, override], *patterns)


def test_contradictory_configs_give_clear_errors(tmp_path):
    expect_config_error(tmp_path, imagenet_eskd.main, [
        f"--config={DIGITS_ESKD}:teacher=large,mode=eskd,smoke", "--config.kd.stop_epoch=2"],
        "config.kd.stop_epoch=2 must be an integer epoch in [1, 2)")
    expect_config_error(tmp_path, imagenet_eskd.main, [
        f"--config={DIGITS_ESKD}:teacher=none,smoke", "--config.teacher.source=train"],
        "kd.mode='scratch' trains on labels only")
    expect_config_error(tmp_path, imagenet_eskd.main, [
        f"--config={DIGITS_ESKD}:teacher=large,mode=full,source=checkpoint,smoke"],
        "config.teacher.path is required for teacher.source='checkpoint'")
    expect_config_error(tmp_path, imagenet_eskd.main, [
        f"--config={IMAGENET_ESKD}:teacher=resnet34,mode=eskd,reading=early_teacher"],
        "torchvision publishes only final weights")
    expect_config_error(tmp_path, imagenet_eskd.main, [
        f"--config={IMAGENET_ESKD}:teacher=resnet34", "--config.teacher.path=/no/such/file.npz"],
        "config.teacher.path='/no/such/file.npz' does not exist")
    expect_config_error(tmp_path, imagenet_eskd.main, [f"--config={DIGITS_FITNET}:smoke"],
                        "config.experiment='fitnet' but this entry point runs 'kd'")
    expect_config_error(tmp_path, imagenet_fitnet.main, [
        f"--config={DIGITS_FITNET}:smoke", "--config.teacher.precomputed=True",
        "--config.teacher.store=/tmp/s"], "FitNet stage 1 needs the teacher's hint features")
    expect_config_error(tmp_path, imagenet_fitnet.main, [
        f"--config={DIGITS_FITNET}:smoke", "--config.run.teacher_devices=1"],
        "FitNet stage 1 needs the teacher's hint features and a teacher on its own devices")
    expect_config_error(tmp_path, imagenet_eskd.main, [
        f"--config={DIGITS_ESKD}:teacher=large,mode=full,smoke", "--config.run.teacher_devices=-1"],
        "config.run.teacher_devices=-1")
    expect_config_error(tmp_path, imagenet_eskd.main, [
        f"--config={DIGITS_ESKD}:teacher=large,mode=full,precomputed,smoke"],
        "config.teacher.store is required with teacher.precomputed=True")
    expect_config_error(tmp_path, imagenet_eskd.main, [
        f"--config={DIGITS_ESKD}:teacher=large,mode=full,smoke",
        "--config.teacher.store_format=topk"], "config.teacher.store_k is required")
    expect_config_error(tmp_path, imagenet_eskd.main, [
        f"--config={IMAGENET_ESKD}:teacher=resnet50,mode=full", "--config.dataset.resize_size=200"],
        "config.dataset.resize_size=200 is below image_size=224")


@pytest.mark.parametrize("override, message", [
    ("--config.fitnet.guided_layer=stage9",
     "config.fitnet.guided_layer='stage9' is not a feature of the model; available: "),
    ("--config.fitnet.hint_layer=stage9",
     "config.fitnet.hint_layer='stage9' is not a feature of the model; available: "),
    ("--config.fitnet.hint_layer=stage2",
     "FitNet regressor output (8, 8, 64) != teacher hint 'stage2' (4, 4, 64)")])
def test_fitnet_layers_are_checked_before_the_teacher_trains(tmp_path, override, message):
    """On shapes alone: a teacher trained here (hours on ImageNet) is not trained in vain."""
    with pytest.raises(errors.ConfigError) as info:
        imagenet_fitnet.main([f"--config={DIGITS_FITNET}:smoke", override,
                              f"--workdir={tmp_path}"])
    assert message in str(info.value)
    assert not os.path.exists(tmp_path / "stages")


def test_train_teacher_and_precompute_errors(tmp_path):
    expect_config_error(tmp_path, train_teacher.main, [f"--config={DIGITS_ESKD}:teacher=none,smoke"],
                        "config.teacher.model must be a model spec")
    with pytest.raises(errors.ConfigError, match=r"precompute needs a trained teacher"):
        precompute_teacher_logits.main([cell("teacher=resnet50,mode=full"),
                                        f"--store={tmp_path / 's'}"])
    with pytest.raises(errors.ConfigError, match=r"--store=DIR \(or config.teacher.store\) is "
                                                   r"required"):
        precompute_teacher_logits.main([cell("teacher=resnet50,mode=full", str(tmp_path))])


def test_reading_labels():
    config = imagenet_cfg.get_config("teacher=resnet50,mode=eskd,reading=early_teacher,source=train")
    assert recipes.reading_label(config, "eskd") == "early_teacher (teacher from its epoch 35)"
    assert recipes.reading_label(config, "eskd", first_teacher=False).startswith("none")
    config = imagenet_cfg.get_config("teacher=resnet50,mode=eskd")
    assert recipes.reading_label(config, "eskd") == "stop_kd (KD term off from epoch 60)"
    assert recipes.reading_label(config, "full") == "none"


def test_command_line_errors(tmp_path):
    with pytest.raises(errors.ConfigError, match=r"--config=FILE\[:ARG\] is required"):
        imagenet_eskd.main([f"--workdir={tmp_path}"])
    with pytest.raises(errors.ConfigError, match=r"--workdir=DIR is required"):
        imagenet_eskd.main([SMOKE])
    with pytest.raises(errors.ConfigError, match=r"config arg teacher='huge'; valid: none, small"):
        imagenet_eskd.main([f"--config={DIGITS_ESKD}:teacher=huge", f"--workdir={tmp_path}"])
    with pytest.raises(errors.ConfigError, match=r"unknown config arg 'colour'.*valid args:"):
        imagenet_eskd.main([f"--config={DIGITS_ESKD}:colour=red", f"--workdir={tmp_path}"])
    with pytest.raises(errors.ConfigError, match=r"Unknown command line flag 'wrokdir'"):
        imagenet_eskd.main([SMOKE, f"--wrokdir={tmp_path}"])
    with pytest.raises(errors.ConfigError, match=r"--config=experiments/configs/nonexist.py: no "
                                                   r"such config file; the configs are in"):
        imagenet_eskd.main(["--config=experiments/configs/nonexist.py", f"--workdir={tmp_path}"])
    # The config file's own error, in one line (not ml_collections' traceback around it).
    with pytest.raises(errors.ConfigError) as info:
        imagenet_eskd.main([f"--config={DIGITS_ESKD}:teacher=huge", f"--workdir={tmp_path}"])
    assert "\n" not in str(info.value) and "teacher='huge'" in str(info.value)


def test_parse_arg_types_and_switches():
    a = base.parse_arg("teacher=resnet50,smoke,n=3,lr=0.5", teacher="x", smoke=False, n=1, lr=0.1)
    assert (a.teacher, a.smoke, a.n, a.lr) == ("resnet50", True, 3, 0.5)
    with pytest.raises(ValueError, match=r"config arg 'teacher' needs a value"):
        base.parse_arg("teacher", teacher="x")
    with pytest.raises(ValueError, match=r"config arg n='x': expected an integer"):
        base.parse_arg("n=x", n=1)


def test_model_specs():
    assert specs.parse_model_spec("cnn1d:width=8,depth=6", "k") == ("cnn1d", {"width": 8,
                                                                                "depth": 6})
    with pytest.raises(errors.ConfigError, match=r"attribute 'width' must be key=value"):
        specs.parse_model_spec("cnn1d:width", "student.model")
    with pytest.raises(errors.ConfigError, match=r"config.student.model='cnn1d:colour=1'.*"
                                                   r"unexpected keyword"):
        specs.build_model("cnn1d:colour=1", 10)
    assert specs.build_model("resnet18", 10, "bfloat16").dtype == jnp.bfloat16
    assert specs.build_model("resnet18:stem=cifar,conv=onednn", 10).conv == "onednn"
    with pytest.raises(errors.ConfigError, match=r"config.student.model='wrn_16_2:conv=mkl'.*"
                                                   r"conv must be one of \['onednn', 'xla'\]"):
        specs.build_model("wrn_16_2:conv=mkl", 10)


# ------------------------------------------------------------------------------------------------
# Recipes and learning-rate schedules (no training).
# ------------------------------------------------------------------------------------------------


def term_weight(term, step):
    w = term.weight
    return float(w(jnp.asarray(step)) if callable(w) else w)


def test_kd_recipes_per_mode():
    kd = base.kd_config().kd
    kd.stop_epoch, kd.ce_weight, kd.weight = 3, 0.1, 0.9
    (ce,) = recipes.kd_recipe(kd, "scratch", 10)
    assert ce.name == "ce" and term_weight(ce, 0) == 1.0
    ce, kdt = recipes.kd_recipe(kd, "full", 10)
    assert [term_weight(ce, s) for s in (0, 100)] == [pytest.approx(0.1)] * 2
    assert [term_weight(kdt, s) for s in (0, 100)] == [pytest.approx(0.9)] * 2
    ce, kdt = recipes.kd_recipe(kd, "eskd", 10)  # stop_kd: off from step 30
    assert [term_weight(kdt, s) for s in (0, 29, 30, 99)] == pytest.approx([0.9, 0.9, 0.0, 0.0])
    assert [term_weight(ce, s) for s in (0, 29, 30, 99)] == pytest.approx([0.1, 0.1, 1.0, 1.0])
    kd.reading = "early_teacher"  # the early stopping is in the teacher: full-KD weights
    ce, kdt = recipes.kd_recipe(kd, "eskd", 10)
    assert [term_weight(kdt, s) for s in (0, 99)] == pytest.approx([0.9, 0.9])


def test_learning_rate_schedules():
    opt = base.kd_config().optimizer
    opt.lr, opt.lr_batch, opt.decay_epochs, opt.decay_factor = 0.1, 256, (3, 6), 0.1
    step = recipes.learning_rate_schedule(opt, steps_per_epoch=10, num_epochs=9, batch_size=1024)
    assert [float(step(s)) for s in (0, 29, 30, 59, 60, 89)] == pytest.approx(
        [0.4, 0.4, 0.04, 0.04, 0.004, 0.004])
    opt.warmup_epochs = 1
    warm = recipes.learning_rate_schedule(opt, steps_per_epoch=10, num_epochs=9, batch_size=256)
    assert [float(warm(s)) for s in (0, 5, 10, 29, 30, 60)] == pytest.approx(
        [0.0, 0.05, 0.1, 0.1, 0.01, 0.001])
    opt.warmup_epochs = 0
    cosine = recipes.learning_rate_schedule(opt, steps_per_epoch=10, num_epochs=9, batch_size=256,
                                            kind="cosine")
    assert [float(cosine(s)) for s in (0, 45, 90)] == pytest.approx([0.1, 0.05, 0.0], abs=1e-7)


def test_checkpoint_directory_resolution(tmp_path, teacher_dir):
    stage = os.path.join(teacher_dir, "stages", "teacher")
    assert rundir.resolve_checkpoint_dir(teacher_dir, None) == os.path.join(stage, "final")
    assert rundir.resolve_checkpoint_dir(stage, 1) == os.path.join(stage, "epochs", "epoch_1")
    final = os.path.join(stage, "final")
    assert rundir.resolve_checkpoint_dir(final, 2) == final  # its meta says epoch 2
    with pytest.raises(errors.ConfigError, match=r"did not keep that epoch; kept epochs: "
                                                   r"\['epoch_1'\]"):
        rundir.resolve_checkpoint_dir(teacher_dir, 5)
    with pytest.raises(errors.ConfigError, match=r"holds one exported state \(epoch 2\)"):
        rundir.resolve_checkpoint_dir(final, 1)
    with pytest.raises(errors.ConfigError, match=r"is neither a train_teacher workdir"):
        rundir.resolve_checkpoint_dir(str(tmp_path), None)
    wrong = models.create("cnn2d", 10, width=32)
    with pytest.raises(ValueError, match=r"do not fit the model"):
        rundir.load_variables(final, rundir.abstract_variables(wrong, np.zeros((1, 8, 8, 1),
                                                                               np.float32)))


@pytest.mark.slow
@pytest.mark.parametrize("entry, config", [
    (imagenet_eskd, "mnist1d_eskd.py:teacher=small,mode=eskd,smoke"),
    (imagenet_fitnet, "mnist1d_fitnet.py:smoke"),
    (imagenet_fitnet, "digits_fitnet.py:smoke"),
    (imagenet_eskd, "digits_eskd.py:teacher=medium,mode=eskd,reading=early_teacher,smoke"),
])
def test_small_config_smoke_cells_run(tmp_path, entry, config):
    workdir = str(tmp_path / "run")
    path = os.path.join(REPO, "experiments", "configs", config)
    assert entry.main([f"--config={path}", f"--workdir={workdir}"]) == 0
    results = report.load_results(workdir)
    assert results[-1]["final"]["accuracy"] > 0
    assert os.path.exists(os.path.join(workdir, "report.md"))


def write_fake_ilsvrc(manual_dir, classes=2, per_class=4, num_val=8):
    """ILSVRC-layout tars of solid-colour JPEGs (train: one inner tar per synset; validation files
    named as the real ones, so TFDS's shipped validation labels apply)."""
    import io
    import tarfile

    import tensorflow_datasets as tfds
    from PIL import Image

    with open(os.path.join(os.path.dirname(tfds.__file__), "datasets", "imagenet2012",
                           "labels.txt")) as f:
        synsets = f.read().split()

    def jpeg(k):
        buffer = io.BytesIO()
        Image.new("RGB", (40 + k, 36), ((40 * k) % 256, 90, 200)).save(buffer, format="JPEG")
        return buffer.getvalue()

    def add(tar, name, payload):
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))

    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as outer:
        for c in range(classes):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for k in range(per_class):
                    add(tar, f"{synsets[c]}_{k + 1}.JPEG", jpeg(c * per_class + k))
            add(outer, f"{synsets[c]}.tar", inner.getvalue())
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as tar:
        for k in range(num_val):
            add(tar, f"ILSVRC2012_val_{k + 1:08d}.JPEG", jpeg(k))


@pytest.mark.slow
def test_imagenet_eskd_on_a_tiny_tfds_imagenet(tmp_path):
    """The real ImageNet path: TFDS imagenet2012 (built from fake tars), torchvision-layout
    ResNet-18 teacher (random, 1000 classes), ResNet-18 student, ESKD, 32 x 32 crops."""
    from kdjax.data import imagenet

    manual, data_dir = tmp_path / "manual", tmp_path / "tfds"
    manual.mkdir()
    write_fake_ilsvrc(str(manual))
    imagenet.main(["--manual_dir", str(manual), "--data_dir", str(data_dir)])
    npz = str(tmp_path / "resnet18.npz")
    np.savez(npz, **random_state_dict(18, 1000))
    workdir = str(tmp_path / "run")
    assert imagenet_eskd.main([
        f"--config={IMAGENET_ESKD}:teacher=resnet18,mode=eskd,path={npz}",
        f"--config.dataset.data_dir={data_dir}", "--config.dataset.image_size=32",
        "--config.dataset.resize_size=36", "--config.dataset.batch_size=8",
        "--config.dataset.eval_batch_size=8", "--config.dataset.num_threads=0",
        "--config.num_epochs=2", "--config.optimizer.decay_epochs=(1,)",
        "--config.kd.stop_epoch=1", "--config.run.progress=False", f"--workdir={workdir}"]) == 0
    s = summary(workdir, "student")
    assert s["steps"] == 2 and s["final"]["num_examples"] == 8
    assert s["paper_error"] == 29.01 and s["paper_teacher_error"] == 30.24
    text = open(os.path.join(workdir, "report.md")).read()
    assert "| 29.01 |" in text and "stop_kd (KD term off from epoch 1)" in text


def test_teacher_lr_sets_the_teacher_stage_learning_rate(tmp_path):
    """``teacher.lr`` replaces ``optimizer.lr`` for the teacher's own training only: the first SGD
    update (momentum buffer empty, schedule at its peak) is -lr * batch / lr_batch * grad."""

    def first_update(teacher_lr):
        config = digits_fitnet.get_config("smoke").unlock()
        config.optimizer.schedule, config.optimizer.weight_decay = "constant", 0.0
        config.teacher.lr = teacher_lr
        ctx = stages.make_context(config, str(tmp_path / f"w{teacher_lr}"))
        tx = teachers.teacher_stage(ctx).tx
        grads = {"w": jnp.ones((3,))}
        updates, _ = tx.update(grads, tx.init(grads), grads)
        return float(updates["w"][0])

    scale = 128 / 256   # smoke batch / optimizer.lr_batch
    for lr in (0.3, 0.05):
        np.testing.assert_allclose(first_update(lr), -lr * scale, rtol=1e-6)
    assert digits_fitnet.get_config().teacher.lr == digits_eskd.get_config("teacher=large").optimizer.lr
    config = digits_fitnet.get_config("smoke").unlock()
    config.teacher.lr = -1.0
    with pytest.raises(errors.ConfigError, match=r"config.teacher.lr=-1.0 must be a positive number"):
        validate.validate_config(config, "fitnet")
