"""One run of the grid: a detector trained on labels (teacher or scratch student) or distilled.

:class:`Run` names a run; :func:`run_one` trains (or resumes, or reuses) it in its own directory
``<workdir>/runs/<key>/seed_<s>/``:

* ``checkpoints/`` - :class:`kdjax.checkpointing.Checkpointer` (train state and the data iterator's
  position) every ``run.checkpoint_every_steps``, after the last step and at a preemption (SIGTERM,
  :class:`kdjax.preemption.PreemptionWatcher`): a started run resumes exactly where it stopped;
* ``metrics.jsonl`` and ``tb/`` - :class:`kdjax.metrics.MetricWriter`: the mean of every loss term
  over each ``run.log_every_steps`` window, and the final COCO mAP;
* ``final/`` - the detector's variables (:func:`experiments.rundir.save_variables`), the teacher that
  students read;
* ``record.json`` - the run's result, written last: a run with it is complete and is reused.

Everything runs in one process per run; the jitted train and eval steps are cached per
(size, teacher, parts) in the process, so the seeds of a cell compile once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import time
from typing import Any

import jax
import numpy as np

from experiments import rundir

RUNS_DIR = "runs"
RECORD_FILE = "record.json"
#: A file in the workdir that makes every run not yet started return at once (preemption of a
#: multi-process grid: see :mod:`experiments.detection_kd.jobs`).
STOP_FILE = "PREEMPTED"


@dataclasses.dataclass(frozen=True)
class Run:
    """A run: ``role`` ``'teacher'`` (trained on labels, ``seed`` the grid's teacher seed) or
    ``'student'``; a student with ``teacher`` (a size) is distilled with Chen et al.'s ``parts``
    (:data:`kdjax.detection.distill.PARTS`) on, else trained from scratch."""
    role: str
    size: str
    seed: int
    teacher: str | None = None
    parts: tuple[str, ...] = ()

    @property
    def arm(self) -> str:
        """``'teacher'``, ``'scratch'``, ``'kd_<teacher>'`` (all parts) or ``'kd_<teacher>_<parts>'``."""
        from kdjax.detection.distill import PARTS

        if self.role == "teacher":
            return "teacher"
        if self.teacher is None:
            return "scratch"
        if set(self.parts) == set(PARTS):
            return f"kd_{self.teacher}"
        return f"kd_{self.teacher}_{'+'.join(self.parts)}"

    @property
    def key(self) -> str:
        """``<size>/<arm>``, e.g. ``tiny/kd_large_hint``."""
        return f"{self.size}/{self.arm}"

    def directory(self, workdir: str) -> str:
        return os.path.join(workdir, RUNS_DIR, self.size, self.arm, f"seed_{self.seed}")


def teacher_run(config, size: str) -> Run:
    return Run("teacher", size, int(config.grid.teacher_seed))


# ------------------------------------------------------------------------------------------------
# Data, models and the jitted programs (cached per process).
# ------------------------------------------------------------------------------------------------


def dataset(config) -> dict[str, dict[str, np.ndarray]]:
    """:func:`kdjax.data.detection_digits.digits_detection_arrays` of ``config.data``, its ground
    truth checked on the host (:func:`kdjax.detection.targets.check_ground_truth`)."""
    from kdjax.data.detection_digits import NUM_DIGIT_CLASSES, digits_detection_arrays
    from kdjax.detection.targets import check_ground_truth

    d = config.data
    arrays = digits_detection_arrays(d.num_train, d.num_test, canvas_size=d.canvas_size,
                                     max_objects=d.max_objects, scales=tuple(d.scales),
                                     max_overlap=d.max_overlap, clutter=d.clutter, noise=d.noise,
                                     seed=d.seed)
    for split in arrays.values():
        check_ground_truth(split["boxes"], split["labels"], split["valid"], NUM_DIGIT_CLASSES,
                           (d.canvas_size, d.canvas_size))
    return arrays


def detector(config, size: str):
    """The :class:`~kdjax.detection.model.FasterRCNN` of ``size`` with ``config.model``'s settings."""
    from kdjax.data.detection_digits import NUM_DIGIT_CLASSES
    from kdjax.detection import model

    return model.create(size, NUM_DIGIT_CLASSES, **config.model.to_dict())


def chen_config(config, parts: tuple[str, ...]):
    """``config.chen`` as a :class:`~kdjax.detection.distill.ChenConfig` with only ``parts`` on."""
    from kdjax.detection import distill

    return distill.ablation(*parts, base=distill.ChenConfig(**config.chen.to_dict()))


def optimizer(config, num_steps: int):
    """Adam with a linear warmup and cosine decay to 0 over ``num_steps``, after clipping the global
    gradient norm (kdjax's choice for every run)."""
    import optax

    t = config.train
    warmup = min(int(t.warmup_steps), max(num_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(0.0, t.lr, warmup, max(num_steps, warmup + 1))
    return optax.chain(optax.clip_by_global_norm(t.clip_norm), optax.adam(schedule))


def tap_channels(module) -> int:
    """Channels of a detector's tap (its last backbone stage: ``width * 2**(log2(stride) - 1)``)."""
    return module.width * 2 ** (int(np.log2(module.stride)) - 1)


@dataclasses.dataclass(frozen=True)
class Programs:
    """What a run's cell compiles once: the modules, optimizer and jitted steps."""
    student: Any
    teacher: Any
    adapter: Any
    tx: Any
    mesh: Any
    train_step: Any
    eval_step: Any
    state_shardings: Any
    teacher_shardings: Any


@functools.lru_cache(maxsize=None)
def programs(config_json: str, size: str, teacher: str | None, parts: tuple[str, ...],
             num_steps: int) -> Programs:
    """The cell's :class:`Programs` (``config_json``: the config as JSON, hashable)."""
    import ml_collections

    from kdjax import sharding
    from kdjax.detection import distill
    from kdjax.detection import train as det_train

    config = ml_collections.ConfigDict(json.loads(config_json))
    mesh = sharding.make_mesh(devices=jax.devices())
    student, tx = detector(config, size), optimizer(config, num_steps)
    t_module = adapter = chen = t_shardings = None
    if teacher is not None:
        t_module, chen = detector(config, teacher), chen_config(config, parts)
        if chen.hint_weight > 0:
            adapter = distill.adaptation_layer(tap_channels(t_module))
        t_shardings = sharding.replicated(mesh)
    state_shape = jax.eval_shape(lambda: det_train.init_detection_state(
        student, tx, seed=0, mesh=mesh, adapter=adapter)[0])
    state_shardings = sharding.tree_shardings(state_shape, mesh, "replicate")
    t = config.train
    step = det_train.make_detection_train_step(
        student, tx, mesh=mesh, state_shardings=state_shardings, teacher=t_module,
        teacher_shardings=t_shardings, config=chen, adapter=adapter,
        rpn_batch_size=t.rpn_batch_size, roi_batch_size=t.roi_batch_size)
    return Programs(student, t_module, adapter, tx, mesh, step, eval_step(config_json, size),
                    state_shardings, t_shardings)


@functools.lru_cache(maxsize=None)
def eval_step(config_json: str, size: str):
    """The jitted eval step of a size (:func:`kdjax.detection.train.make_detection_eval_step`), one
    per process for every run of that size."""
    import ml_collections

    from kdjax import sharding
    from kdjax.detection import train as det_train

    config = ml_collections.ConfigDict(json.loads(config_json))
    return det_train.make_detection_eval_step(detector(config, size),
                                              mesh=sharding.make_mesh(devices=jax.devices()))


def load_detector(config, run: Run, workdir: str) -> dict:
    """``{'params': ...}`` of a finished run's detector (its ``final/`` export)."""
    from experiments.rundir import load_variables

    module = detector(config, run.size)
    side = 2 * module.stride
    expected = jax.eval_shape(lambda: module.init(jax.random.key(0), jax.numpy.zeros((1, side, side, 3))))
    return {"params": load_variables(os.path.join(run.directory(workdir), rundir.FINAL_DIR),
                                     {"params": expected["params"], "batch_stats": {}})["params"]}


def evaluate(config, prog: Programs, variables, test: dict[str, np.ndarray]) -> dict:
    """COCO mAP (:func:`kdjax.detection.train.detection_map`) of ``variables`` on the test split, and
    ``samples``: the detections (score >= 0.5) on its first ``config.run.sample_images`` canvases."""
    from kdjax import sharding
    from kdjax.data import ArraySource, make_eval_iterator
    from kdjax.data.detection_digits import NUM_DIGIT_CLASSES, keep_record
    from kdjax.detection.train import detection_map

    def batches():
        return make_eval_iterator(ArraySource(test), global_batch_size=config.train.eval_batch_size,
                                  transform=keep_record)

    result = detection_map(prog.eval_step, variables, batches(), NUM_DIGIT_CLASSES, prog.mesh)
    first = next(iter(batches()))["image"]
    det = jax.device_get(prog.eval_step(variables, sharding.global_batch({"image": first},
                                                                        prog.mesh)["image"]))
    samples = []
    for i in range(min(int(config.run.sample_images), len(test["image"]))):
        keep = det.valid[i] & (det.scores[i] >= 0.5)
        samples.append({"boxes": det.boxes[i][keep].round(2).tolist(),
                        "scores": det.scores[i][keep].round(3).tolist(),
                        "classes": det.classes[i][keep].tolist()})
    return {"map": result["map"], "map50": result["map50"], "map75": result["map75"],
            "ap50_per_class": [float(v) for v in result["ap50_per_class"]], "samples": samples}


# ------------------------------------------------------------------------------------------------
# The loop.
# ------------------------------------------------------------------------------------------------


def _mean_window(window: list[dict]) -> dict[str, float]:
    """Mean of every metric over the finite steps of a log window (fetched from the device)."""
    fetched = jax.device_get(window)
    finite = [m for m in fetched if bool(m["finite"])] or fetched
    keys = [k for k in fetched[0] if k.startswith("loss/") or k == "grad_norm"]
    out = {k: float(np.mean([m[k] for m in finite])) for k in keys}
    out["skipped"] = int(fetched[-1]["skipped"])
    return out


def train_loop(directory: str, prog: Programs, state, teacher_variables, train_iter,
               num_steps: int, *, log_every: int, checkpoint_every: int) -> tuple[Any, bool, dict]:
    """Trains ``state`` to ``num_steps`` (resuming from ``directory/checkpoints``): returns
    ``(state, stopped_early, last logged train record)``."""
    from kdjax import checkpointing, metrics as metrics_lib, sharding
    from kdjax.detection.train import BATCH_KEYS
    from kdjax.loop import InFlight
    from kdjax.preemption import PreemptionWatcher

    last_record: dict = {}
    with contextlib.ExitStack() as stack:
        ckpt = checkpointing.Checkpointer(os.path.join(directory, "checkpoints"), max_to_keep=1,
                                          async_save=False)
        stack.callback(ckpt.close)
        restored = ckpt.restore(checkpointing.abstract_state(state), data_iterator=train_iter)
        if restored is not None:
            state = restored[0]
        start = int(jax.device_get(state.step))
        if start:
            metrics_lib.truncate_jsonl(os.path.join(directory, metrics_lib.JSONL_NAME), start)
            print(f"{directory}: resuming from step {start} of {num_steps}", flush=True)
        writer = stack.enter_context(metrics_lib.MetricWriter(directory, purge_step=start))
        watcher = stack.enter_context(PreemptionWatcher())
        window, inflight = [], InFlight()
        for step in range(start, num_steps):
            batch = next(train_iter)
            state, metrics = prog.train_step(state, teacher_variables, sharding.global_batch(
                {k: batch[k] for k in BATCH_KEYS}, prog.mesh))
            window.append(metrics)
            inflight.push(metrics)
            done = step + 1
            last = done == num_steps
            if last or done % log_every == 0:
                last_record = writer.write("train", done, _mean_window(window))
                window = []
            stop = not last and watcher.should_stop(done)
            if last or stop or done % checkpoint_every == 0:
                ckpt.save(done, state, data_iterator=train_iter, force=True)
            if stop:
                ckpt.wait()
                return state, True, last_record
    return state, False, last_record


def run_one(config_json: str, run: Run, workdir: str) -> dict:
    """Trains (resumes, or reuses) ``run``; returns its record (module docstring), or
    ``{'key', 'seed', 'preempted': True}`` when a preemption stopped it (or it never started)."""
    import ml_collections

    from kdjax import metrics as metrics_lib
    from kdjax.data import ArraySource, make_train_iterator
    from kdjax.data.detection_digits import keep_record
    from kdjax.detection import train as det_train

    config = ml_collections.ConfigDict(json.loads(config_json))
    directory = run.directory(workdir)
    path = os.path.join(directory, RECORD_FILE)
    if os.path.exists(path):
        return {**rundir.read_json(path), "reused": True}
    if os.path.exists(os.path.join(workdir, STOP_FILE)):
        return {"key": run.key, "seed": run.seed, "preempted": True}
    start = time.perf_counter()
    arrays = dataset(config)
    num_steps = int(config.train.teacher_steps if run.role == "teacher" else config.train.steps)
    prog = programs(config_json, run.size, run.teacher, tuple(run.parts), num_steps)
    t_vars = {}
    if run.teacher is not None:
        t_vars = jax.device_put(load_detector(config, teacher_run(config, run.teacher), workdir),
                                prog.teacher_shardings)
    state, _ = det_train.init_detection_state(prog.student, prog.tx, seed=run.seed, mesh=prog.mesh,
                                              adapter=prog.adapter)
    train_iter = make_train_iterator(ArraySource(arrays["train"]),
                                     global_batch_size=config.train.batch_size, seed=run.seed,
                                     transform=keep_record)
    r = config.run
    state, stopped, last = train_loop(directory, prog, state, t_vars, train_iter, num_steps,
                                      log_every=r.log_every_steps,
                                      checkpoint_every=r.checkpoint_every_steps)
    if stopped:
        return {"key": run.key, "seed": run.seed, "preempted": True}
    variables = {"params": jax.device_get(state.params["detector"])}
    result = evaluate(config, prog, variables, arrays["test"])
    with metrics_lib.MetricWriter(directory) as writer:
        writer.write("eval", num_steps, {k: result[k] for k in ("map", "map50", "map75")})
    rundir.save_variables(os.path.join(directory, rundir.FINAL_DIR), {"params": variables["params"]},
                          {"size": run.size, "role": run.role, "step": num_steps})
    record = {**dataclasses.asdict(run), "parts": list(run.parts), "key": run.key, "arm": run.arm,
              "steps": num_steps, "skipped": int(jax.device_get(state.skipped)),
              "final_train": last, **result, "wall_s": time.perf_counter() - start,
              "num_devices": int(prog.mesh.devices.size)}
    rundir.write_json(path, record)
    return record
