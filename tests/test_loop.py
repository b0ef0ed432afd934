"""kdjax.loop.fit on scikit-learn digits: learns, logs, evaluates exactly, resumes bit-identically,
handles non-finite updates and SIGTERM; the subprocess SIGTERM / SIGKILL runs are marked slow."""

import glob
import json
import os
import signal
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fit_worker
from kdjax import (checkpointing, data, logit_store, loop, metrics, models, recipe, sharding,
                   teachers, train)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
STEPS = 40


pytestmark = pytest.mark.usefixtures("compile_cache")   # conftest.py


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted STEPS-step run of the fit_worker configuration: final params + history."""
    result = fit_worker.run(str(tmp_path_factory.mktemp("reference")), STEPS)
    return {"params": fit_worker.flat_params(result.state.params), "history": result.history,
            "state": jax.device_get(result.state)}


def assert_bitwise_equal(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert a[key].tobytes() == b[key].tobytes(), f"{key} differs"


def read_tb_events(directory):
    """{event file name: its Event protos in order} of the TensorBoard event files in
    ``directory`` (TFRecord framing)."""
    metrics._summary_writer_class()  # import tensorboardX without torch before its proto module
    from tensorboardX.proto import event_pb2

    files = {}
    for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            raw = f.read()
        events, pos = [], 0
        while pos < len(raw):
            (length,) = struct.unpack("<Q", raw[pos:pos + 8])
            events.append(event_pb2.Event.FromString(raw[pos + 12:pos + 12 + length]))
            pos += 12 + length + 4
        files[os.path.basename(path)] = events
    return files


def read_tb_scalars(directory):
    """{(tag, step): value} from TensorBoard event files."""
    return {(value.tag, event.step): value.simple_value
            for events in read_tb_events(directory).values() for event in events
            for value in event.summary.value}


def mlp_forward_f64(params, images):
    """The kdjax MLP (2 ReLU layers + head) in float64 NumPy."""
    x = np.asarray(images, np.float64).reshape(len(images), -1)
    for layer in ("dense1", "dense2"):
        x = np.maximum(x @ np.asarray(params[layer]["kernel"], np.float64)
                       + np.asarray(params[layer]["bias"], np.float64), 0.0)
    return x @ np.asarray(params["head"]["kernel"], np.float64) + np.asarray(
        params["head"]["bias"], np.float64)


# --------------------------------------------------------------------------------------------
# Metric files.
# --------------------------------------------------------------------------------------------


def test_metric_writer_records_nonfinite_as_null_and_tensorboard_skips_them(tmp_path):
    with metrics.MetricWriter(tmp_path) as writer:
        record = writer.write("train", 3, {"loss": np.float32(0.5), "bad": float("nan"),
                                           "count": np.int64(7)})
        writer.write("eval", 3, {"accuracy": 0.75})
    assert record["kind"] == "train" and record["step"] == 3 and record["bad"] is None
    assert record["loss"] == 0.5 and record["count"] == 7 and isinstance(record["count"], int)
    records = metrics.read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in records] == [("train", 3), ("eval", 3)]
    assert records[0]["bad"] is None and records[1]["accuracy"] == 0.75
    scalars = read_tb_scalars(tmp_path / "tb")
    assert scalars == {("train/loss", 3): 0.5, ("train/count", 3): 7.0, ("eval/accuracy", 3): 0.75}


def test_metric_writer_disabled_writes_nothing_and_rejects_unknown_kind(tmp_path):
    with metrics.MetricWriter(tmp_path / "off", enabled=False) as writer:
        assert writer.write("train", 1, {"loss": 1.0})["loss"] == 1.0
        with pytest.raises(ValueError, match=r"kind must be one of \('train', 'eval'\); got 'test'"):
            writer.write("test", 1, {})
    assert not os.path.exists(tmp_path / "off")


def test_read_and_truncate_jsonl(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert metrics.read_jsonl(path) == []
    lines = [json.dumps({"kind": "train", "step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    path.write_text("\n".join(lines) + '\n{"kind": "train", "st')  # torn last line: ignored
    assert [r["step"] for r in metrics.read_jsonl(path)] == [1, 2, 3]
    assert [r["step"] for r in metrics.truncate_jsonl(path, 2)] == [1, 2]
    assert path.read_text() == "".join(
        json.dumps(r, sort_keys=True) + "\n" for r in metrics.read_jsonl(path))
    assert [r["step"] for r in metrics.read_jsonl(path)] == [1, 2]
    path.write_text(lines[0] + "\n{garbled\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not valid JSON .*the metrics "
                                         r"file is damaged. Move it aside"):
        metrics.read_jsonl(path)
    path.write_text(lines[0] + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"line 2 is not a metrics record \(a JSON object with "
                                         r"'step'\): '\[1, 2\]'"):
        metrics.read_jsonl(path)


# --------------------------------------------------------------------------------------------
# Learning, logging, eval.
# --------------------------------------------------------------------------------------------


def test_fit_learns_logs_jsonl_and_tensorboard_and_eval_matches_numpy(tmp_path, digits, capsys):
    test = digits["test"]
    result = fit_worker.run(str(tmp_path), 200, checkpoint_every=0, eval_every=100, log_every=50,
                            progress=True, name="digits-mlp")
    bar = capsys.readouterr().err
    assert "digits-mlp" in bar and "200/200" in bar and "step/s" in bar
    # Learns: chance is 0.1 on 10 balanced classes.
    assert [r["step"] for r in result.eval_history] == [100, 200]
    assert result.eval_history[-1]["accuracy"] > 0.85
    assert result.best == max(result.eval_history, key=lambda r: r["accuracy"])
    assert not result.stopped_early and result.skipped_steps == 0
    assert int(result.state.step) == 200
    # Eval equals a float64 NumPy recomputation over the 359 real test rows (the 3 padded
    # batches of 128 hold 384 rows; padding must not count).
    params = jax.device_get(result.state.params)
    logits = mlp_forward_f64(params, test["image"])
    labels = test["label"]
    log_z = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    final = result.eval_history[-1]
    assert final["num_examples"] == len(labels) == 359
    assert final["accuracy"] == np.mean(logits.argmax(1) == labels)
    np.testing.assert_allclose(final["ce"], np.mean(log_z - logits[np.arange(len(labels)), labels]),
                               rtol=1e-5)
    # metrics.jsonl: one object per line, eval lines marked.
    with open(tmp_path / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    train_lines = [r for r in lines if r["kind"] == "train"]
    eval_lines = [r for r in lines if r["kind"] == "eval"]
    assert [r["step"] for r in train_lines] == [50, 100, 150, 200]
    assert [r["step"] for r in eval_lines] == [100, 200]
    assert {"loss/ce", "loss/total", "weight/ce", "accuracy", "grad_norm", "skipped",
            "steps_per_sec", "time"} <= set(train_lines[0])
    assert train_lines[-1]["loss/ce"] < train_lines[0]["loss/ce"]
    assert [{k: v for k, v in r.items() if k != "kind"} for r in train_lines] == result.history
    assert eval_lines[-1]["accuracy"] == final["accuracy"]
    # TensorBoard event files hold the same scalars.
    scalars = read_tb_scalars(tmp_path / "tb")
    for r in train_lines:
        np.testing.assert_allclose(scalars[("train/loss/ce", r["step"])], r["loss/ce"], rtol=1e-6)
    np.testing.assert_allclose(scalars[("eval/accuracy", 200)], final["accuracy"], rtol=1e-6)
    # Final checkpoint written (the best-by-accuracy eval step is kept as well).
    assert os.path.isdir(tmp_path / "checkpoints" / "200")


def _log_softmax(x):
    m = x.max(1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(1, keepdims=True))


def _write_store(path, split, logits):
    spec = logit_store.StoreSpec(dataset="digits", split=split, num_examples=len(logits),
                                 num_classes=logits.shape[1], teacher="linear-test",
                                 preprocessing="none", dtype="float32")
    with logit_store.LogitStoreWriter(path, spec) as writer:
        writer.write(np.arange(len(logits)), logits)
    logit_store.finalize(path, 1)
    return logit_store.LogitStore.open(path, split=split, num_examples=len(logits))


def test_precomputed_teacher_kd_and_eval_teacher_metrics_match_numpy(tmp_path, digits):
    w = np.random.default_rng(1).normal(size=(64, 10)).astype(np.float32)
    logits = {split: digits[split]["image"].reshape(-1, 64) @ w for split in ("train", "test")}
    stores = {split: _write_store(str(tmp_path / split), split, logits[split])
              for split in ("train", "test")}
    seen = []

    def transform(batch):  # runs after the store of the batch's split added its logits
        split = "train" if "epoch" in batch else "test"
        rows = np.asarray(batch["mask"], bool) if "mask" in batch else slice(None)
        seen.append(np.array_equal(batch["teacher_logits"][rows],
                                   logits[split][batch["id"][rows]]))
        return batch

    result = fit_worker.run(str(tmp_path / "run"), 10, checkpoint_every=0,
                            teacher=teachers.precomputed(),
                            recipe=(recipe.ce(0.5), recipe.kd(temperature=2.0, weight=0.5)),
                            train_store=stores["train"], eval_store=stores["test"],
                            batch_transform=transform)
    assert len(seen) >= 13 and all(seen)  # 10 train batches (and those prefetched), 3 eval
    assert {"loss/kd", "loss/ce", "teacher_accuracy"} <= set(result.history[-1])
    ev = result.eval_history[-1]
    student = mlp_forward_f64(jax.device_get(result.state.params), digits["test"]["image"])
    teacher = logits["test"].astype(np.float64)
    labels = digits["test"]["label"]
    assert ev["teacher_accuracy"] == np.mean(teacher.argmax(1) == labels)
    assert ev["agreement"] == np.mean(teacher.argmax(1) == student.argmax(1))
    log_t, log_s = _log_softmax(teacher), _log_softmax(student)
    np.testing.assert_allclose(ev["kl"], np.mean((np.exp(log_t) * (log_t - log_s)).sum(1)),
                               rtol=1e-4)


def test_a_store_of_a_teacher_with_other_classes_is_refused_before_any_step(tmp_path, digits):
    """A top-k store of a 7-class teacher carries no logits whose width the step could check: fit
    compares the store's class count with the 10-class student's before it trains."""
    n = len(digits["train"]["label"])
    spec = logit_store.StoreSpec(dataset="digits", split="train", num_examples=n, num_classes=7,
                                 teacher="seven-class", preprocessing="none", format="topk", k=3)
    path = str(tmp_path / "store")
    with logit_store.LogitStoreWriter(path, spec) as writer:
        writer.write(np.arange(n), np.random.default_rng(0).normal(size=(n, 7)))
    logit_store.finalize(path, 1)
    store = logit_store.LogitStore.open(path)
    for arg in ("train_store", "eval_store"):
        # The train store alone (no eval), or the eval store alone (train batches unread).
        run = {"train_store": dict(train_store=store, eval_iter_fn=None),
               "eval_store": dict(eval_store=store, eval_every=3)}[arg]
        with pytest.raises(ValueError, match=f"{arg} is a logit store of a 7-class teacher "
                                             r"\(seven-class\) but the student has 10 classes"):
            fit_worker.run(str(tmp_path / arg), 3, checkpoint_every=0,
                           teacher=teachers.precomputed(), recipe=(recipe.kd(2.0),), **run)
        assert not os.path.exists(tmp_path / arg / "checkpoints" / "3")


def test_batch_transform_serves_train_and_eval_batches(tmp_path):
    seen = {"train": 0, "eval": 0}

    def transform(batch):  # train batches carry 'epoch', eval batches do not
        seen["train" if "epoch" in batch else "eval"] += 1
        return batch

    fit_worker.run(str(tmp_path / "a"), 3, checkpoint_every=0, batch_transform=transform)
    assert seen["train"] >= 3 and seen["eval"] == 3  # 359 test rows: 3 padded batches of 128


# --------------------------------------------------------------------------------------------
# Resume.
# --------------------------------------------------------------------------------------------


def test_resume_midway_is_bit_identical_to_an_uninterrupted_run(tmp_path, reference):
    half = fit_worker.run(str(tmp_path), STEPS // 2)
    assert int(half.state.step) == STEPS // 2
    assert sorted(int(p) for p in os.listdir(tmp_path / "checkpoints")) == [10, 20]
    resumed = fit_worker.run(str(tmp_path), STEPS)
    assert int(resumed.state.step) == STEPS
    assert_bitwise_equal(fit_worker.flat_params(resumed.state.params), reference["params"])
    # Optimizer moments and the rng are restored too.
    for a, b in zip(jax.tree.leaves(jax.device_get(resumed.state)),
                    jax.tree.leaves(reference["state"])):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    # The history (re-read from metrics.jsonl for the first half) matches the reference.
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("time", "steps_per_sec")}
                       for r in h]
    assert strip(resumed.history) == strip(reference["history"])


def test_nnx_student_fits_and_resumes_like_its_linen_twin(tmp_path, reference):
    """fit() on an NNX MLP holding the Linen MLP's initial weights: 20 steps, then a resume from
    the checkpoint (nnx.State parameters through orbax) to 40, equal to the Linen reference run."""
    from flax import nnx

    class NnxMLP(nnx.Module):
        def __init__(self, rngs):
            self.dense1 = nnx.Linear(64, 100, rngs=rngs)
            self.dense2 = nnx.Linear(100, 100, rngs=rngs)
            self.head = nnx.Linear(100, 10, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.dense1(x.reshape(x.shape[0], -1)))
            return self.head(nnx.relu(self.dense2(x)))

    linen, _ = train.init_train_state(models.create("mlp", 10), optax.adam(1e-3),
                                      np.zeros((1, 8, 8, 1), np.float32), seed=0,
                                      mesh=sharding.make_mesh(devices=jax.devices()[:1]))
    model = NnxMLP(nnx.Rngs(1))
    for name, leaves in jax.device_get(linen.params).items():
        for key, value in leaves.items():
            getattr(getattr(model, name), key)[...] = jnp.asarray(value)
    half = fit_worker.run(str(tmp_path), STEPS // 2, student=model)
    assert int(half.state.step) == STEPS // 2
    resumed = fit_worker.run(str(tmp_path), STEPS, student=model)
    assert int(resumed.state.step) == STEPS
    got = fit_worker.flat_params(nnx.to_pure_dict(resumed.state.params))
    assert sorted(got) == sorted(reference["params"])
    for key, value in reference["params"].items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    nnx.update(model, resumed.state.params, resumed.state.batch_stats)  # as README says
    np.testing.assert_array_equal(model.head.kernel[...], got["head/kernel"])
    with pytest.raises(TypeError, match="init_params is for Linen students"):
        fit_worker.run(str(tmp_path / "x"), 1, student=model, init_params={"params": {}})


def test_fit_with_the_teacher_on_its_own_devices_equals_the_teacher_in_the_step(tmp_path):
    """fit(teacher_mesh=...) (teachers.on_devices: the teacher on devices 4-7, ahead of the
    student's steps on 0-3; train and eval batches) logs what the in-step live teacher gives."""
    teacher_module = models.create("mlp", 10, width=32)
    t_vars = teacher_module.init(jax.random.PRNGKey(3), np.zeros((1, 8, 8, 1), np.float32))
    common = dict(teacher=teachers.from_linen(teacher_module), teacher_variables=t_vars,
                  recipe=(recipe.ce(0.5), recipe.kd(4.0, 0.5)), eval_every=10,
                  mesh=sharding.make_mesh(devices=jax.devices()[:4]))
    inside = fit_worker.run(str(tmp_path / "inside"), 10, **common)
    ahead = fit_worker.run(str(tmp_path / "ahead"), 10,
                           teacher_mesh=sharding.make_mesh(devices=jax.devices()[4:]), **common)
    for a, b in zip(ahead.history + ahead.eval_history, inside.history + inside.eval_history):
        assert set(a) == set(b)
        for key in a:
            if key not in ("time", "steps_per_sec"):
                np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert "teacher_accuracy" in ahead.eval_history[-1] and "loss/kd" in ahead.history[-1]
    with pytest.raises(ValueError, match="teacher_mesh runs a live teacher .* the teacher is "
                                         "missing"):
        fit_worker.run(str(tmp_path / "x"), 1, teacher_mesh=common["mesh"])
    with pytest.raises(ValueError, match="teacher_mesh runs a live teacher .* the teacher is "
                                         "precomputed"):
        fit_worker.run(str(tmp_path / "p"), 1, teacher=teachers.precomputed(),
                       teacher_mesh=common["mesh"])
    with pytest.raises(ValueError, match="a batch of 32 rows does not split over the teacher's 3"):
        fit_worker.run(str(tmp_path / "z"), 1, **dict(
            common, teacher_mesh=sharding.make_mesh(devices=jax.devices()[5:])))
    with pytest.raises(ValueError, match=r"the recipe reads its features \['stage1'\] "):
        fit_worker.run(str(tmp_path / "y"), 1, **dict(
            common, recipe=(recipe.ce(), recipe.hint("stage1", "stage1")),
            teacher_mesh=sharding.make_mesh(devices=jax.devices()[4:])))


def test_resume_drops_log_lines_past_the_checkpoint_and_finished_run_is_a_no_op(tmp_path):
    fit_worker.run(str(tmp_path), 12, checkpoint_every=10, log_every=2)
    # Pretend the process died after step 12 but before a checkpoint: drop the final step 12.
    ckpt = checkpointing.Checkpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [10, 12]
    ckpt.close()
    os.rename(tmp_path / "checkpoints" / "12", tmp_path / "12.aside")
    result = fit_worker.run(str(tmp_path), 12, checkpoint_every=10, log_every=2)
    steps = [r["step"] for r in metrics.read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [2, 4, 6, 8, 10, 12]  # 12 was logged twice but kept once
    assert [r["step"] for r in result.history] == steps
    # TensorBoard gets the same cut: the resumed writer starts with a session START at the
    # checkpoint's step (purge_step), so its readers drop what the first run logged after it.
    from tensorboardX.proto.event_pb2 import SessionLog

    by_start = {}
    for events in read_tb_events(tmp_path / "tb").values():  # one file per run
        start, = [e.step for e in events if e.session_log.status == SessionLog.START]
        by_start[start] = [e.step for e in events
                           if e.summary.value and e.summary.value[0].tag == "train/loss/ce"]
    assert by_start == {0: [2, 4, 6, 8, 10, 12], 10: [12]}
    again = fit_worker.run(str(tmp_path), 12, checkpoint_every=10, log_every=2)
    assert int(again.state.step) == 12 and not again.stopped_early
    assert [r["step"] for r in again.history] == steps


def test_sigterm_in_process_checkpoints_and_resumes_bit_identical(tmp_path, reference):
    calls = []

    def sigterm_at_batch_12(batch):
        calls.append(1)
        if len(calls) == 12:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    stopped = fit_worker.run(str(tmp_path), STEPS, batch_transform=sigterm_at_batch_12)
    assert stopped.stopped_early
    stop_step = int(stopped.state.step)
    assert 1 <= stop_step < STEPS
    ckpt = checkpointing.Checkpointer(tmp_path / "checkpoints")
    assert ckpt.latest_step() == stop_step
    ckpt.close()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the watcher restored the handler
    resumed = fit_worker.run(str(tmp_path), STEPS)
    assert not resumed.stopped_early
    assert_bitwise_equal(fit_worker.flat_params(resumed.state.params), reference["params"])


# --------------------------------------------------------------------------------------------
# Non-finite updates.
# --------------------------------------------------------------------------------------------


def poison(batches_to_poison):
    """batch_transform that sets the images of the given (0-based) train batches to NaN."""
    calls = []

    def transform(batch):
        calls.append(1)
        if len(calls) - 1 in batches_to_poison:
            batch = dict(batch, image=np.full_like(batch["image"], np.nan))
        return batch
    return transform


def test_nonfinite_stop_names_step_and_term_and_writes_no_later_checkpoint(tmp_path):
    with pytest.raises(loop.NonFiniteLossError) as info:
        fit_worker.run(str(tmp_path), 20, checkpoint_every=5, log_every=100,
                       batch_transform=poison({7}))
    assert info.value.step == 7 and info.value.terms == ["ce"]
    message = str(info.value)
    assert "Non-finite update at step 7 (0-based; the update was not applied)" in message
    assert "loss term(s) ['ce'] went NaN/Inf" in message
    assert "Nothing from this step on was checkpointed; the last checkpoint is step 5" in message
    assert "pass nonfinite='skip' to skip such updates" in message
    ckpt = checkpointing.Checkpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [5]
    ckpt.close()


def test_nonfinite_gradient_with_finite_loss_is_named_gradient(tmp_path):
    import jax.numpy as jnp

    # sqrt(0 * x) has value 0 but gradient 0 * inf = NaN.
    sqrt_zero = recipe.Term("sqrt0", lambda s, t, b, step: jnp.sqrt(0.0 * s.logits.sum(-1) ** 2),
                            needs_teacher=False)
    with pytest.raises(loop.NonFiniteLossError,
                       match=r"step 0 .*the loss was finite but the gradient norm was not") as info:
        fit_worker.run(str(tmp_path), 3, checkpoint_every=0, recipe=(recipe.ce(), sqrt_zero))
    assert info.value.terms == ["gradient"]
    assert not os.listdir(tmp_path / "checkpoints")


def test_nonfinite_skip_counts_logs_and_never_checkpoints_nan(tmp_path, caplog):
    caplog.set_level("WARNING", logger="kdjax.loop")
    result = fit_worker.run(str(tmp_path), 12, checkpoint_every=4, log_every=4,
                            batch_transform=poison({2, 9}), nonfinite="skip")
    assert result.skipped_steps == 2
    assert [r["skipped"] for r in result.history] == [1, 1, 2]
    warnings = [r.getMessage() for r in caplog.records if "Skipped non-finite" in r.getMessage()]
    assert len(warnings) == 2 and "step 2" in warnings[0] and "step 9" in warnings[1]
    ckpt = checkpointing.Checkpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [4, 8, 12]
    for step in ckpt.all_steps():
        restored, _ = ckpt.restore(checkpointing.abstract_state(result.state), step=step)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.params))
    ckpt.close()


def _host_metrics(**overrides):
    m = {"loss/ce": 0.5, "loss/kd": 0.25, "loss/total": 0.75, "weight/ce": 1.0, "weight/kd": 1.0,
         "accuracy": 0.5, "grad_norm": 1.0, "finite": True, "skipped": 0}
    m.update(overrides)
    return {k: np.asarray(v) for k, v in m.items()}


@pytest.mark.parametrize("overrides, terms, what", [
    (dict(**{"loss/kd": np.inf, "loss/total": np.inf}), ["kd"], r"loss term\(s\) \['kd'\] went"),
    (dict(**{"weight/kd": np.inf, "loss/total": np.inf}), ["total"],
     r"every loss term was finite but their weighted sum was not \(check the term weights"),
    (dict(grad_norm=np.nan), ["gradient"], "the loss was finite but the gradient norm was not"),
])
def test_nonfinite_step_diagnosis(overrides, terms, what):
    """The metrics of the steps between two fetches are checked in order; the first bad one is
    named with its 0-based index (first_step + position)."""
    pending = [_host_metrics(), _host_metrics(finite=False, **overrides)]
    with pytest.raises(loop.NonFiniteLossError, match=r"Non-finite update at step 8 .*" + what) as e:
        loop._drain(pending, 7, loop._Window(), "stop", lambda: 5)
    assert e.value.step == 8 and e.value.terms == terms
    window = loop._Window()
    loop._drain([_host_metrics(**{"loss/ce": 0.5}), _host_metrics(finite=False, skipped=1,
                                                                   **overrides),
                 _host_metrics(**{"loss/ce": 0.25}, skipped=1)], 7, window, "skip", lambda: 5)
    record = window.record()
    # The logged value is the mean over the finite steps of the window only.
    assert record["loss/ce"] == 0.375 and record["skipped"] == 1
    assert window.steps == 3 and window.finite_steps == 2


# --------------------------------------------------------------------------------------------
# init_params.
# --------------------------------------------------------------------------------------------


def test_init_params_partial_merge_and_errors():
    from kdjax import sharding, train

    student = models.create("mlp", 10)
    tx = optax.adam(1e-3)
    mesh = sharding.make_mesh()
    state, shardings = train.init_train_state(student, tx, np.zeros((1, 8, 8, 1), np.float32),
                                              seed=0, mesh=mesh)
    head = {"kernel": np.full((100, 10), 0.5, np.float32), "bias": np.arange(10, dtype=np.float32)}
    merged = loop.merge_init_params(state, {"params": {"head": head}}, tx, shardings)
    np.testing.assert_array_equal(merged.params["head"]["kernel"], head["kernel"])
    np.testing.assert_array_equal(merged.params["head"]["bias"], head["bias"])
    np.testing.assert_array_equal(merged.params["dense1"]["kernel"], state.params["dense1"]["kernel"])
    assert merged.params["head"]["kernel"].sharding == shardings.params["head"]["kernel"]
    assert int(merged.step) == 0
    with pytest.raises(ValueError, match=r"leaves the student does not have: \['hed/bias'\]"):
        loop.merge_init_params(state, {"params": {"hed": {"bias": head["bias"]}}}, tx, shardings)
    with pytest.raises(ValueError, match=r"leaf 'head/bias' is \(3,\) float32 but the student's is "
                                         r"\(10,\) float32"):
        loop.merge_init_params(state, {"params": {"head": {"bias": np.zeros(3, np.float32)}}},
                               tx, shardings)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['weights'\]"):
        loop.merge_init_params(state, {"weights": {}}, tx, shardings)


def test_init_params_start_a_fresh_run_and_are_ignored_on_resume(tmp_path):
    start = {"params": {"head": {"bias": np.full(10, 3.0, np.float32)}}}
    result = fit_worker.run(str(tmp_path), 1, checkpoint_every=0, init_params=start)
    # Adam's first update moves every parameter by at most ~lr; the bias started at 3.
    np.testing.assert_allclose(np.asarray(result.state.params["head"]["bias"]), 3.0, atol=1e-2)
    zero = {"params": {"head": {"bias": np.zeros(10, np.float32)}}}
    resumed = fit_worker.run(str(tmp_path), 2, checkpoint_every=0, init_params=zero)
    np.testing.assert_allclose(np.asarray(resumed.state.params["head"]["bias"]), 3.0, atol=2e-2)


def test_init_params_are_copied_so_born_again_training_keeps_the_teachers_arrays(tmp_path):
    """Born-again training: the student starts from its teacher's own variables, the very arrays
    passed as teacher_variables. fit copies init_params into the state, so donating the state to
    the step deletes neither them nor the caller's (it used to: a donated-buffer error, or a
    crash on several devices)."""
    first = fit_worker.run(str(tmp_path / "teacher"), 2, checkpoint_every=0)
    variables = {"params": first.state.params, "batch_stats": first.state.batch_stats}
    before = jax.device_get(variables)
    again = fit_worker.run(str(tmp_path / "student"), 3, checkpoint_every=0,
                           teacher=teachers.from_linen(models.create("mlp", 10)),
                           teacher_variables=variables, init_params=variables,
                           recipe=(recipe.ce(0.5), recipe.kd(4.0, 0.5)))
    assert int(again.state.step) == 3
    assert not any(x.is_deleted() for x in jax.tree.leaves(variables))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables), before)


def test_topk_indices_outside_the_students_classes_are_refused(tmp_path, digits):
    """Any transform (here a closure, not a store's bound method) that adds top-k teacher classes
    the student does not have is refused at its first batch, not reported as a NaN loss."""
    def add_topk(batch):
        n = len(batch["label"])
        return {**batch, "teacher_topk_values": np.zeros((n, 2), np.float32),
                "teacher_topk_indices": np.tile(np.array([[3, 12]], np.int32), (n, 1))}
    with pytest.raises(ValueError, match=r"batch_transform added teacher_topk_indices in \[3, 12\] "
                                         r"but the student has 10 classes"):
        fit_worker.run(str(tmp_path / "run"), 2, checkpoint_every=0, eval_iter_fn=None,
                       teacher=teachers.precomputed(), recipe=(recipe.kd(2.0),),
                       batch_transform=add_topk)


def test_teacher_best_metric_with_a_topk_eval_store_is_refused(tmp_path, digits):
    """A top-k store gives no teacher eval metrics: ranking checkpoints by 'agreement' is refused
    before training (a top-k eval_store) or at the first eval (a batch_transform adding top-k
    outputs), with the metrics the run does have."""
    stores = {}
    for split in ("train", "test"):
        n = len(digits[split]["label"])
        spec = logit_store.StoreSpec(dataset="digits", split=split, num_examples=n,
                                     num_classes=10, teacher="t", preprocessing="none",
                                     format="topk", k=3)
        with logit_store.LogitStoreWriter(str(tmp_path / split), spec) as writer:
            writer.write(np.arange(n), np.random.default_rng(0).normal(size=(n, 10)))
        logit_store.finalize(str(tmp_path / split), 1)
        stores[split] = logit_store.LogitStore.open(str(tmp_path / split))
    common = dict(checkpoint_every=0, eval_every=2, best_metric="agreement",
                  teacher=teachers.precomputed(), recipe=(recipe.ce(), recipe.kd(2.0)))
    match = (r"best_metric 'agreement' is not among this run's eval metrics \[.*'accuracy'.*\]: "
             r"teacher metrics need a teacher with full logits at eval")
    with pytest.raises(ValueError, match=match):
        fit_worker.run(str(tmp_path / "a"), 4, train_store=stores["train"],
                       eval_store=stores["test"], **common)
    assert not os.path.exists(tmp_path / "a" / "metrics.jsonl")
    with pytest.raises(ValueError, match=match):
        fit_worker.run(str(tmp_path / "b"), 4, batch_transform=lambda b: stores[
            "train" if "epoch" in b else "test"].add_to_batch(b), **common)
    assert not os.path.isdir(tmp_path / "b" / "checkpoints" / "2")


# --------------------------------------------------------------------------------------------
# Subprocess kill and resume (slow: three interpreter starts each).
# --------------------------------------------------------------------------------------------


def _start_worker(workdir, num_steps, sleep, cache_dir):
    # Same XLA_FLAGS (8 CPU devices) as this test process, so the same programs run.
    env = dict(os.environ, **fit_worker.cache_env(cache_dir))
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, os.path.join(HERE, "fit_worker.py"), str(workdir), str(num_steps),
         "--checkpoint-every", "10", "--sleep", str(sleep)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(proc, workdir, step, timeout=120):
    """Polls metrics.jsonl until a train record at >= step exists; returns the records."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        records = [r for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
                   if r["kind"] == "train"]
        if records and records[-1]["step"] >= step:
            return records
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"worker did not reach step {step} in {timeout} s")


def _finish(proc, timeout=180):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, out


def _final_params(workdir):
    with np.load(os.path.join(workdir, "final_params.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.slow
def test_subprocess_sigterm_checkpoints_exits_zero_and_resumes_bit_identical(tmp_path, reference,
                                                                             compile_cache):
    workdir = tmp_path / "run"
    proc = _start_worker(workdir, STEPS, 0.1, compile_cache)
    try:
        _wait_for_step(proc, workdir, 15)
        proc.send_signal(signal.SIGTERM)
        code, out = _finish(proc)
    finally:
        proc.kill()
    assert code == 0, out[-3000:]
    done = [line for line in out.splitlines() if line.startswith("FIT_DONE")]
    assert len(done) == 1 and "stopped_early=True" in done[0], out[-3000:]
    stop_step = int(done[0].split()[1].split("=")[1])
    assert 15 <= stop_step < STEPS
    ckpt = checkpointing.Checkpointer(workdir / "checkpoints")
    assert ckpt.latest_step() == stop_step
    ckpt.close()
    code, out = _finish(_start_worker(workdir, STEPS, 0.0, compile_cache))
    assert code == 0 and f"FIT_DONE step={STEPS} stopped_early=False" in out, out[-3000:]
    assert_bitwise_equal(_final_params(workdir), reference["params"])


@pytest.mark.slow
def test_subprocess_sigkill_resumes_from_last_periodic_checkpoint_bit_identical(
        tmp_path, reference, compile_cache):
    workdir = tmp_path / "run"
    proc = _start_worker(workdir, STEPS, 0.1, compile_cache)
    try:
        _wait_for_step(proc, workdir, 25)
        proc.send_signal(signal.SIGKILL)
        code, _ = _finish(proc)
    finally:
        proc.kill()
    assert code == -signal.SIGKILL
    ckpt = checkpointing.Checkpointer(workdir / "checkpoints")
    last = ckpt.latest_step()
    ckpt.close()
    # Periodic checkpoints only (no graceful save on SIGKILL); 20 is usually the newest, but an
    # asynchronous write of 20 may not have committed yet on a loaded machine.
    assert last in (10, 20, 30)
    code, out = _finish(_start_worker(workdir, STEPS, 0.0, compile_cache))
    assert code == 0 and f"FIT_DONE step={STEPS} stopped_early=False" in out, out[-3000:]
    assert_bitwise_equal(_final_params(workdir), reference["params"])
    steps = [r["step"] for r in metrics.read_jsonl(workdir / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(5, STEPS + 1, 5))


class _Leaf:
    """A pytree leaf that records when ``jax.block_until_ready`` waits on it."""

    def __init__(self, name, waited):
        self.name, self._waited = name, waited

    def block_until_ready(self):
        self._waited.append(self.name)
        return self


def test_in_flight_waits_for_the_oldest_beyond_its_limit():
    waited = []
    inflight = loop.InFlight(limit=2)
    for i in range(5):
        inflight.push({"loss": _Leaf(i, waited), "z": _Leaf(-1, waited)})  # waits on one leaf
        assert len(inflight) == min(i + 1, 2)
    assert waited == [0, 1, 2]  # pushing #2 waits for #0, #3 for #1, #4 for #2
    for bad in (0, -1, 1.5, None):
        with pytest.raises(ValueError, match="limit must be a positive integer"):
            loop.InFlight(bad)


def test_fit_keeps_at_most_a_few_steps_dispatched_ahead(tmp_path, monkeypatch):
    """fit logs every 50 steps but never lets more than InFlight's limit run ahead: unbounded, XLA's
    CPU client could deadlock a multi-device collective (see loop.InFlight)."""
    sizes = []

    class Recording(loop.InFlight):
        def push(self, outputs):
            super().push(outputs)
            sizes.append(len(self))

    monkeypatch.setattr(loop, "InFlight", Recording)
    assert jax.device_count() == 8  # the data-parallel step all-reduces over 8 CPU devices
    # 300 updates fetched once, at the end: unbounded, jax 0.10's CPU client deadlocked here and
    # aborted the process (reproduced before InFlight existed).
    result = fit_worker.run(str(tmp_path), 300, checkpoint_every=0, log_every=300)
    assert int(result.state.step) == 300
    # 300 updates, then the final eval's 3 batches (359 test rows, 128 per batch).
    assert len(sizes) == 303 and max(sizes) == 16
