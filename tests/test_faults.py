"""The fault catalogue of docs/fault_tolerance.md: every bad input and fault tried against fit(),
with the message the user sees; crashes at each phase resume bit-identically.

Entries covered by other helpers' tests are referenced from the catalogue, not repeated here.
"""

import dataclasses
import errno
import os
import signal
import threading

import jax
import numpy as np
import optax
import pytest
from etils import epath

import fit_worker
from kdjax import checkpointing, data, logit_store, models, teachers
from kdjax.checkpointing import CheckpointDiskFullError, CheckpointSaveError

STEPS = 40


pytestmark = pytest.mark.usefixtures("compile_cache")   # conftest.py


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    result = fit_worker.run(str(tmp_path_factory.mktemp("reference")), STEPS)
    return fit_worker.flat_params(result.state.params)


def assert_bitwise_equal(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), f"{key} differs"


def checkpoint_steps(workdir):
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        return ckpt.all_steps()
    finally:
        ckpt.close()


def train_iter(arrays, global_batch=32, **kwargs):
    return data.make_train_iterator(data.ArraySource(arrays), global_batch_size=global_batch,
                                    seed=0, **kwargs)


# --------------------------------------------------------------------------------------------
# fit() argument validation: raised before anything is compiled or written.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, error, message", [
    (dict(nonfinite="ignore"), ValueError,
     r"nonfinite must be one of \('stop', 'skip'\) \('stop' raises NonFiniteLossError, 'skip' "
     r"skips the update and goes on\); got 'ignore'"),
    (dict(eval_every=10, eval_iter_fn=None), ValueError,
     r"eval_every=10 but no eval_iter_fn was given; pass eval_iter_fn=lambda: "
     r"make_eval_iterator\(...\) or set eval_every=0"),
    (dict(num_steps=0), ValueError, r"num_steps must be an integer >= 1; got 0"),
    (dict(log_every=0), ValueError, r"log_every must be an integer >= 1; got 0"),
    (dict(checkpoint_every=-5), ValueError, r"checkpoint_every must be an integer >= 0; got -5"),
    (dict(keep=0), ValueError, r"keep must be an integer >= 1; got 0"),
    (dict(best_metric="acc"), ValueError,
     r"best_metric 'acc' is not an eval metric of this run; use one of \('accuracy', 'ce'\)"),
    (dict(best_metric="kl"), ValueError, r"best_metric 'kl' is not an eval metric of this run"),
    (dict(best_mode="up"), ValueError, r"best_mode must be None \(inferred from best_metric\)"),
    (dict(param_mode="zero3"), ValueError, r"param_mode must be 'replicate' or 'fsdp'; got 'zero3'"),
    (dict(teacher_variables={"params": {}}), ValueError,
     r"teacher_variables were given without a teacher"),
    (dict(teacher=teachers.from_linen(models.create("mlp", 10))), ValueError,
     r"a live teacher needs its frozen variables: pass teacher_variables="),
    (dict(teacher=object()), TypeError, r"teacher must be a kdjax.teachers.Teacher"),
    (dict(eval_batch_transform=3), TypeError,
     r"fit\(\) no longer takes eval_batch_transform: pass the eval split's logit store as "
     r"eval_store="),
    (dict(train_store=3), TypeError, r"train_store must be a kdjax.logit_store.LogitStore"),
    (dict(prefetch=0), ValueError, r"prefetch must be an integer >= 1; got 0"),
    (dict(train_iter=[{"image": np.zeros((32, 8, 8, 1))}]), TypeError,
     r"train_iter must be a checkpointable iterator with __next__, get_state and set_state"),
    (dict(tx="adam"), TypeError, r"tx must be an optax.GradientTransformation"),
    (dict(student="mlp"), TypeError, r"student must be a Flax Linen module"),
    (dict(eval_iter_fn=[1]), TypeError, r"eval_iter_fn must be a function returning a fresh"),
    (dict(batch_transform="add"), TypeError, r"batch_transform must be a function batch -> batch"),
    (dict(sample_input=0.0), ValueError, r"sample_input must be an example batch \[b, ...\]"),
])
def test_fit_argument_errors(tmp_path, overrides, error, message):
    overrides = dict(overrides)
    num_steps = overrides.pop("num_steps", 5)
    with pytest.raises(error, match=message):
        fit_worker.run(str(tmp_path), num_steps, **overrides)
    assert not os.path.exists(tmp_path / "checkpoints")  # nothing written


def test_settings_given_to_fit_as_keywords_name_fit_options(tmp_path, digits):
    """fit's settings are a FitOptions: the old keywords are refused with the way to pass them,
    and an options object checks itself when built or replaced."""
    from kdjax import loop, recipe

    kwargs = dict(workdir=str(tmp_path), student=models.create("mlp", 10), tx=optax.adam(1e-3),
                  recipe=(recipe.ce(),), train_iter=train_iter(digits["train"]), num_steps=1,
                  sample_input=np.zeros((1, 8, 8, 1), np.float32), seed=0)
    with pytest.raises(TypeError, match=(
            r"fit\(\) takes \['eval_every', 'keep'\] in its options now: pass "
            r"options=kdjax.loop.FitOptions\(eval_every=..., keep=...\)")):
        loop.fit(**kwargs, keep=2, eval_every=5)
    with pytest.raises(TypeError, match="options must be a kdjax.loop.FitOptions; got dict"):
        loop.fit(**kwargs, options={"keep": 2})
    options = loop.FitOptions(keep=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.keep = 0
    with pytest.raises(ValueError, match=r"keep must be an integer >= 1; got 0"):
        options.replace(keep=0)
    assert options.replace(best_metric="ce").rank_mode == "min" and options.rank_mode == "max"
    assert not os.path.exists(tmp_path / "checkpoints")


def test_fit_outside_the_main_thread_needs_handle_preemption_false(tmp_path):
    outcomes = []

    def target(**kwargs):
        try:
            outcomes.append(int(fit_worker.run(str(tmp_path), 2, checkpoint_every=0,
                                               **kwargs).state.step))
        except RuntimeError as e:
            outcomes.append(str(e))
    for kwargs in ({}, {"handle_preemption": False}):
        thread = threading.Thread(target=target, kwargs=kwargs)
        thread.start()
        thread.join(120)
    assert outcomes == ["fit() installs a SIGTERM handler for preemption, which Python allows "
                        "only in the main thread; call fit() from the main thread or pass "
                        "handle_preemption=False.", 2]


# --------------------------------------------------------------------------------------------
# Bad data.
# --------------------------------------------------------------------------------------------


def test_wrong_input_shape_names_both_shapes(tmp_path, digits):
    flat = {"image": digits["train"]["image"].reshape(-1, 64), "label": digits["train"]["label"]}
    with pytest.raises(ValueError, match=(
            r"train_iter batch\['image'\] has shape \(32, 64\), i.e. examples of shape \(64,\), but "
            r"the student was initialised for examples of shape \(8, 8, 1\) \(sample_input "
            r"\[b, 8, 8, 1\]\)")):
        fit_worker.run(str(tmp_path), 5, train_iter=train_iter(flat))


def test_wrong_eval_input_shape_is_named_as_eval(tmp_path, digits):
    flat = data.ArraySource({"image": digits["test"]["image"].reshape(-1, 64),
                             "label": digits["test"]["label"]})
    with pytest.raises(ValueError, match=r"eval_iter_fn\(\) batch\['image'\] has shape \(128, 64\)"):
        fit_worker.run(str(tmp_path), 2, checkpoint_every=0, eval_iter_fn=lambda: (
            data.make_eval_iterator(flat, global_batch_size=128)))


def test_labels_outside_the_students_classes(tmp_path):
    with pytest.raises(ValueError, match=(
            r"train_iter batch has labels in \[0, 9\] but the student has 5 classes \(labels must "
            r"be in \[0, 5\)\); build the student with the dataset's number of classes")):
        fit_worker.run(str(tmp_path), 5, student=models.create("mlp", 5))


def test_batch_not_divisible_by_the_devices(tmp_path, digits):
    assert jax.device_count() == 8
    with pytest.raises(ValueError, match=(
            r"train_iter batch has 12 rows per process \(12 global\), not divisible by the 8 "
            r"devices of the mesh; use a global batch size that is a multiple of 8")):
        fit_worker.run(str(tmp_path), 5, train_iter=train_iter(digits["train"], 12))


def test_finite_train_iterator_running_out(tmp_path, digits):
    # 1438 training images, batches of 32: one epoch is 44 batches.
    with pytest.raises(ValueError, match=(
            r"train_iter ran out after 44 steps but num_steps=50; use an endless iterator "
            r"\(make_train_iterator\(num_epochs=None\)\) or lower num_steps")):
        fit_worker.run(str(tmp_path), 50, checkpoint_every=0,
                       train_iter=train_iter(digits["train"], num_epochs=1))


def test_empty_eval_iterator(tmp_path):
    with pytest.raises(ValueError, match=r"eval_iter yielded no batches; eval_iter_fn must return "
                                         r"a fresh iterator"):
        fit_worker.run(str(tmp_path), 2, checkpoint_every=0, eval_iter_fn=lambda: iter([]))


def test_eval_iterator_with_no_real_rows(tmp_path, digits):
    def all_padding():
        for batch in data.make_eval_iterator(data.ArraySource(digits["test"]),
                                             global_batch_size=128):
            yield dict(batch, mask=np.zeros_like(batch["mask"]))
    with pytest.raises(ValueError, match=r"the eval pass had no real rows \(every mask was "
                                         r"False\); check the eval iterator's mask"):
        fit_worker.run(str(tmp_path), 2, checkpoint_every=0, eval_iter_fn=all_padding)


# --------------------------------------------------------------------------------------------
# Teacher / student mismatches.
# --------------------------------------------------------------------------------------------


def test_live_teacher_with_other_class_count(tmp_path):
    teacher = models.create("mlp", 5)
    shapes = jax.eval_shape(teacher.init, jax.random.PRNGKey(0), np.zeros((1, 8, 8, 1), np.float32))
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    from kdjax import recipe

    with pytest.raises(ValueError, match=(
            r"teacher has 5 classes but the student has 10; the teacher and student must share "
            r"the label space")):
        fit_worker.run(str(tmp_path), 5, teacher=teachers.from_linen(teacher),
                       teacher_variables=variables, recipe=(recipe.ce(), recipe.kd()))


def _store(path, num_examples, num_classes):
    spec = logit_store.StoreSpec(dataset="digits", split="train", num_examples=num_examples,
                                 num_classes=num_classes, teacher="random", preprocessing="none",
                                 dtype="float32")
    logits = np.random.default_rng(0).normal(size=(num_examples, num_classes)).astype(np.float32)
    with logit_store.LogitStoreWriter(path, spec) as writer:
        writer.write(np.arange(num_examples), logits)
    logit_store.finalize(path, 1)
    return logit_store.LogitStore.open(path)


def test_precomputed_store_with_other_class_count(tmp_path, digits):
    from kdjax import recipe

    store = _store(str(tmp_path / "store"), len(digits["train"]["label"]), 5)
    with pytest.raises(ValueError, match=r"train_store is a logit store of a 5-class "
                                         r"teacher \(random\) but the student has 10 classes"):
        fit_worker.run(str(tmp_path / "run"), 5, teacher=teachers.precomputed(),
                       recipe=(recipe.ce(), recipe.kd()), train_store=store, eval_iter_fn=None)


def test_precomputed_teacher_without_the_store_transform(tmp_path):
    from kdjax import recipe

    with pytest.raises(ValueError, match=(
            r"precomputed teacher: the batch has neither 'teacher_logits' nor "
            r"'teacher_topk_values'; add the store's outputs to each batch with "
            r"LogitStore.add_to_batch")):
        fit_worker.run(str(tmp_path), 5, teacher=teachers.precomputed(),
                       recipe=(recipe.ce(), recipe.kd()), eval_iter_fn=None)


def test_store_arguments_follow_the_teacher_data_contract(tmp_path):
    """Each split's store is passed by name, with a precomputed teacher: a train store with an
    eval needs the eval split's store, an eval store needs an eval, a store needs
    teachers.precomputed(). All refused before anything is compiled or written."""
    store = _store(str(tmp_path / "store"), 1438, 10)
    with pytest.raises(ValueError, match=(
            r"train_store is the logit store of split 'train', but the eval batches need the "
            r"teacher outputs of their own split \(their example ids index another store\); pass "
            r"eval_store=LogitStore.open\(<store of the eval split>\) \(or eval_iter_fn=None\)")):
        fit_worker.run(str(tmp_path / "run"), 5, teacher=teachers.precomputed(), train_store=store)
    with pytest.raises(ValueError, match=r"eval_store was given but no eval_iter_fn"):
        fit_worker.run(str(tmp_path / "run"), 5, teacher=teachers.precomputed(),
                       eval_store=store, eval_iter_fn=None)
    with pytest.raises(ValueError, match=(
            r"train_store holds a precomputed teacher's outputs, which only "
            r"teachers.precomputed\(\) reads, but the teacher is missing")):
        fit_worker.run(str(tmp_path / "run"), 5, train_store=store, eval_iter_fn=None)
    live = models.create("mlp", 10)
    variables = live.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 1), np.float32))
    with pytest.raises(ValueError, match=r"eval_store holds .* but the teacher is live"):
        fit_worker.run(str(tmp_path / "run"), 5, teacher=teachers.from_linen(live),
                       teacher_variables=variables, eval_store=store)
    assert not os.path.exists(tmp_path / "run")


def test_store_for_another_split_is_refused_at_open(tmp_path, digits):
    assert len(digits["train"]["label"]) == 1438 and len(digits["test"]["label"]) == 359
    store = _store(str(tmp_path / "store"), 1438, 10)
    with pytest.raises(ValueError, match=(
            r"was written for num_examples 1438 but the run's split has num_examples = 359")):
        logit_store.LogitStore.open(store.path, num_examples=len(digits["test"]["label"]))


# --------------------------------------------------------------------------------------------
# Faults during a run: disk full, crash during a step / a checkpoint save / an eval.
# Each run is then restarted with the same arguments and must end bit-identical to a run that
# never failed.
# --------------------------------------------------------------------------------------------


def _fail_tmp_writes_of_step(monkeypatch, step, error):
    """Every file write into the partial directory of checkpoint ``step`` raises ``error``."""
    path_cls = type(epath.Path("/"))
    original = path_cls.write_text

    def write_text(self, *args, **kwargs):
        if f"/{step}.orbax-checkpoint-tmp" in str(self):
            raise error
        return original(self, *args, **kwargs)
    monkeypatch.setattr(path_cls, "write_text", write_text)


def test_disk_full_during_a_save_keeps_the_previous_checkpoint_and_resumes(
        tmp_path, monkeypatch, reference):
    _fail_tmp_writes_of_step(monkeypatch, 20, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(CheckpointDiskFullError) as info:
        fit_worker.run(str(tmp_path), STEPS)
    monkeypatch.undo()
    message = str(info.value)
    assert "No space left on device while writing checkpoint step 20" in message
    assert "The last complete checkpoint (step 10) is intact" in message
    assert checkpoint_steps(tmp_path) == [10]
    resumed = fit_worker.run(str(tmp_path), STEPS)
    assert_bitwise_equal(fit_worker.flat_params(resumed.state.params), reference)


def test_crash_during_a_step_resumes_from_the_last_checkpoint(tmp_path, reference):
    calls = []

    def crash_at_batch_25(batch):
        calls.append(1)
        if len(calls) == 26:
            raise RuntimeError("simulated crash in the input pipeline")
        return batch

    with pytest.raises(RuntimeError, match="simulated crash in the input pipeline"):
        fit_worker.run(str(tmp_path), STEPS, batch_transform=crash_at_batch_25)
    assert checkpoint_steps(tmp_path) == [10, 20]
    resumed = fit_worker.run(str(tmp_path), STEPS)
    assert_bitwise_equal(fit_worker.flat_params(resumed.state.params), reference)


def test_crash_while_committing_a_checkpoint_resumes_from_the_previous(tmp_path, monkeypatch,
                                                                         reference):
    path_cls = type(epath.Path("/"))
    original = path_cls.rename

    def rename(self, target):
        if self.name.startswith("30.orbax-checkpoint-tmp"):
            raise RuntimeError("simulated crash before the commit rename")
        return original(self, target)

    monkeypatch.setattr(path_cls, "rename", rename)
    with pytest.raises(CheckpointSaveError, match=(
            r"Writing checkpoint step 30 to .* failed \(RuntimeError: simulated crash before the "
            r"commit rename\)")):
        fit_worker.run(str(tmp_path), STEPS, async_checkpoint=False)
    monkeypatch.undo()
    assert checkpoint_steps(tmp_path) == [10, 20]  # the partial step 30 is never listed
    resumed = fit_worker.run(str(tmp_path), STEPS)
    assert_bitwise_equal(fit_worker.flat_params(resumed.state.params), reference)
    assert checkpoint_steps(tmp_path)[-1] == STEPS


def _eval_iter_fn(digits, crash_on_call=None, sigterm_on_call=None):
    """Eval iterators over the digits test split; the given call raises / sends SIGTERM midway."""
    source = data.ArraySource(digits["test"])
    calls = []

    def make():
        calls.append(1)
        for i, batch in enumerate(data.make_eval_iterator(source, global_batch_size=128)):
            if i == 1 and len(calls) == crash_on_call:
                raise RuntimeError("simulated crash during eval")
            if i == 1 and len(calls) == sigterm_on_call:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch
    return make


def test_crash_during_eval_resumes_from_the_last_checkpoint(tmp_path, digits, reference):
    with pytest.raises(RuntimeError, match="simulated crash during eval"):
        fit_worker.run(str(tmp_path), STEPS, eval_every=20,
                       eval_iter_fn=_eval_iter_fn(digits, crash_on_call=2))
    # Step 20 was checkpointed after its eval (best-by-accuracy tracking), 30 periodically; the
    # crash in step 40's eval came before step 40's checkpoint.
    assert checkpoint_steps(tmp_path) == [10, 20, 30]
    resumed = fit_worker.run(str(tmp_path), STEPS, eval_every=20,
                             eval_iter_fn=_eval_iter_fn(digits))
    assert_bitwise_equal(fit_worker.flat_params(resumed.state.params), reference)
    assert [r["step"] for r in resumed.eval_history] == [20, 40]
    assert resumed.best["step"] in (20, 40)


def test_sigterm_during_eval_finishes_the_eval_checkpoints_and_resumes(tmp_path, digits,
                                                                       reference):
    stopped = fit_worker.run(str(tmp_path), STEPS, eval_every=10,
                             eval_iter_fn=_eval_iter_fn(digits, sigterm_on_call=2))
    assert stopped.stopped_early and int(stopped.state.step) == 20
    assert [r["step"] for r in stopped.eval_history] == [10, 20]  # the eval finished
    assert checkpoint_steps(tmp_path)[-1] == 20
    resumed = fit_worker.run(str(tmp_path), STEPS, eval_every=10,
                             eval_iter_fn=_eval_iter_fn(digits))
    assert_bitwise_equal(fit_worker.flat_params(resumed.state.params), reference)
    assert [r["step"] for r in resumed.eval_history] == [10, 20, 30, 40]


def test_corrupt_latest_checkpoint_falls_back_and_still_ends_bit_identical(tmp_path, reference,
                                                                          caplog):
    fit_worker.run(str(tmp_path), 30)
    # Garble the largest file of step 30 (the parameters / optimizer state).
    files = [p for p in (tmp_path / "checkpoints" / "30").rglob("*") if p.is_file()]
    victim = max(files, key=lambda p: p.stat().st_size)
    raw = bytearray(victim.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 8):
        raw[i] ^= 0xFF
    victim.write_bytes(bytes(raw))
    caplog.set_level("WARNING")
    resumed = fit_worker.run(str(tmp_path), STEPS)
    assert any("Checkpoint step 30" in r.getMessage() and "is corrupt" in r.getMessage()
               for r in caplog.records)
    assert os.path.isdir(tmp_path / "checkpoints" / "30.corrupt")
    assert_bitwise_equal(fit_worker.flat_params(resumed.state.params), reference)
