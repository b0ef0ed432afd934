"""Tests for kdjax.preemption and the preempt -> checkpoint -> resume cycle."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import local_processes
from kdjax.checkpointing import Checkpointer, abstract_state
from kdjax.preemption import PreemptionWatcher

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


def _wait_for_signal(watcher, timeout=5.0):
    deadline = time.monotonic() + timeout
    while watcher.received_signal is None and time.monotonic() < deadline:
        time.sleep(0.001)


# --------------------------------------------------------------------------------------------
# The watcher itself.
# --------------------------------------------------------------------------------------------


def test_sigterm_sets_flag_should_stop_latches_and_handler_is_restored():
    previous = signal.getsignal(signal.SIGTERM)
    with PreemptionWatcher() as watcher:
        assert watcher.mode == "single_process"
        assert watcher.handled_signals == (signal.SIGTERM,)
        assert signal.getsignal(signal.SIGTERM) != previous
        assert not watcher.should_stop(0)
        os.kill(os.getpid(), signal.SIGTERM)
        _wait_for_signal(watcher)
        assert watcher.received_signal == signal.SIGTERM
        assert watcher.should_stop(1)
        assert watcher.should_stop(2)  # stays True
        assert watcher.stop_step == 1
    assert signal.getsignal(signal.SIGTERM) == previous
    assert watcher.handled_signals == ()
    watcher.close()  # idempotent


def test_sigint_is_graceful_only_when_asked_for():
    previous = signal.getsignal(signal.SIGINT)
    with PreemptionWatcher(signals=(signal.SIGTERM, signal.SIGINT)) as watcher:
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt
        _wait_for_signal(watcher)
        assert watcher.received_signal == signal.SIGINT
        assert watcher.should_stop(7) and watcher.stop_step == 7
    assert signal.getsignal(signal.SIGINT) is previous


def test_only_the_first_signal_is_recorded():
    with PreemptionWatcher(signals=(signal.SIGTERM, signal.SIGINT)) as watcher:
        os.kill(os.getpid(), signal.SIGINT)
        _wait_for_signal(watcher)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert watcher.received_signal == signal.SIGINT


def test_no_signal_means_no_stop():
    with PreemptionWatcher() as watcher:
        assert not any(watcher.should_stop(s) for s in range(5))
        assert watcher.stop_step is None and watcher.received_signal is None


@pytest.mark.parametrize(
    "signals, match",
    [
        ((), "signals must name at least one signal"),
        ((signal.SIGKILL,), r"signals \['SIGKILL'\] cannot be caught"),
        (("TERM",), "signals must be signal numbers"),
        ((99999,), "signals must be signal numbers"),
    ],
)
def test_bad_signals_are_rejected(signals, match):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ValueError, match=match):
        PreemptionWatcher(signals=signals)
    assert signal.getsignal(signal.SIGTERM) == before


def test_watcher_must_be_created_in_the_main_thread():
    errors = []

    def create():
        try:
            PreemptionWatcher()
        except RuntimeError as e:
            errors.append(str(e))

    thread = threading.Thread(target=create)
    thread.start()
    thread.join()
    assert errors and "must be created in the main thread" in errors[0]


# --------------------------------------------------------------------------------------------
# A tiny training loop: preempt, checkpoint, resume, compare with an uninterrupted run.
# --------------------------------------------------------------------------------------------

TX = optax.adam(0.05)
TRUE_W = np.array([1.0, -2.0, 3.0, 0.5], np.float32)


def _example(i):
    x = np.random.default_rng(int(i)).standard_normal(4).astype(np.float32)
    return {"x": x, "y": np.float32(x @ TRUE_W + 0.1)}


@jax.jit
def _sgd_step(state, batch):
    rng, noise_key = jax.random.split(state["rng"])

    def loss_fn(params):
        pred = batch["x"] @ params["w"] + params["b"]
        noise = 0.01 * jax.random.normal(noise_key, pred.shape)
        return jnp.mean((pred + noise - batch["y"]) ** 2)

    grads = jax.grad(loss_fn)(state["params"])
    updates, opt_state = TX.update(grads, state["opt_state"], state["params"])
    return {
        "params": optax.apply_updates(state["params"], updates),
        "opt_state": opt_state,
        "rng": rng,
        "step": state["step"] + 1,
    }


def train(workdir, total_steps, *, save_every=4, sigterm_at=None, step_sleep=0.0, log=print):
    """Runs (or resumes) the loop in ``workdir``; returns ``(state, preempted_at_or_None)``."""
    data = iter(grain.MapDataset.range(100_000).seed(0).shuffle().map(_example).batch(8)
                .to_iter_dataset())
    params = {"w": jnp.zeros(4), "b": jnp.zeros(())}
    state = {"params": params, "opt_state": TX.init(params), "rng": jax.random.key(0),
             "step": jnp.zeros((), jnp.int32)}
    ckpt = Checkpointer(workdir, save_interval_steps=save_every, max_to_keep=2)
    restored = ckpt.restore(abstract_state(state), data_iterator=data)
    if restored is not None:
        state, _ = restored
    with PreemptionWatcher() as watcher:
        while int(state["step"]) < total_steps:
            state = _sgd_step(state, next(data))
            step = int(state["step"])
            log(f"step {step}")
            if step == sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)
            if watcher.should_stop(step):
                ckpt.save(step, state, data_iterator=data, force=True)
                ckpt.close()
                log(f"preempted at step {step}")
                return state, step
            ckpt.save(step, state, data_iterator=data)
            time.sleep(step_sleep)
    ckpt.close()
    return state, None


def _params_hex(state):
    return "".join(np.asarray(x).tobytes().hex() for x in jax.tree.leaves(state["params"]))


def main():
    """Subprocess entry: ``main WORKDIR TOTAL_STEPS STEP_SLEEP``; prints progress and params."""
    workdir, total, sleep = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    state, preempted = train(workdir, total, step_sleep=sleep,
                             log=lambda m: print(m, flush=True))
    if preempted is None:
        print(f"final {_params_hex(state)}", flush=True)


def test_in_process_preemption_resumes_bit_identical(tmp_path):
    reference, _ = train(tmp_path / "reference", 14, log=lambda m: None)
    lines = []
    state, preempted = train(tmp_path / "run", 14, sigterm_at=6, log=lines.append)
    assert preempted == 6 and lines[-1] == "preempted at step 6"
    assert (tmp_path / "run" / "6").is_dir()  # off-interval step written because of the signal
    assert int(state["step"]) == 6
    lines.clear()
    resumed, preempted = train(tmp_path / "run", 14, log=lines.append)
    assert preempted is None and lines[0] == "step 7"
    assert _params_hex(resumed) == _params_hex(reference)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference)):
        a, b = (jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                else x for x in (a, b))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _run_main(args, **kwargs):
    code = f"import sys; sys.path.insert(0, {TESTS!r}); import test_preemption as t; t.main()"
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_subprocess_sigterm_mid_run_checkpoints_exits_zero_and_resumes_bit_identical(tmp_path):
    run_dir = tmp_path / "run"
    reference = _run_main([tmp_path / "reference", 30, 0])  # uninterrupted, runs alongside
    proc = _run_main([run_dir, 30, 0.05])
    for line in proc.stdout:
        if line.strip() == "step 8":
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    stopped = [ln for ln in out.splitlines() if ln.startswith("preempted at step ")]
    assert len(stopped) == 1, out
    stop_step = int(stopped[0].split()[-1])
    assert 8 <= stop_step < 30
    assert (run_dir / str(stop_step)).is_dir()
    assert not [p for p in run_dir.iterdir() if "tmp" in p.name]

    resume = _run_main([run_dir, 30, 0])
    resumed_out, resumed_err = resume.communicate(timeout=120)
    reference_out, reference_err = reference.communicate(timeout=120)
    assert resume.returncode == 0, resumed_err[-3000:]
    assert reference.returncode == 0, reference_err[-3000:]
    assert resumed_out.splitlines()[0] == f"step {stop_step + 1}"
    final = [ln for ln in resumed_out.splitlines() if ln.startswith("final ")]
    assert final and final == [ln for ln in reference_out.splitlines() if ln.startswith("final ")]


# --------------------------------------------------------------------------------------------
# Two processes (jax.distributed on CPU): every process stops at the same step.
# --------------------------------------------------------------------------------------------

_TWO_PROCESS_LOOP = textwrap.dedent("""
    import os, sys, time
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    pid, port, workdir, mode, stop_after = (int(sys.argv[1]), sys.argv[2], sys.argv[3],
                                            sys.argv[4], int(sys.argv[5]))
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if mode == "process_allgather":
        jax.config.update("jax_enable_preemption_service", False)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=pid)
    import jax.numpy as jnp, numpy as np, grain
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jax.experimental import multihost_utils
    from kdjax.checkpointing import Checkpointer, abstract_state
    from kdjax.preemption import PreemptionWatcher
    mesh = jax.make_mesh((4,), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    w = jax.make_array_from_callback((8,), sharding, lambda i: np.arange(8, dtype=np.float32)[i])
    # Every leaf lives on the global mesh (scalars replicated) so the restore target is global.
    step0 = jax.device_put(jnp.zeros((), jnp.int32), NamedSharding(mesh, P()))
    state = {"w": w, "step": step0}
    train_step = jax.jit(lambda s: {"w": s["w"] * 0.5 + 1.0, "step": s["step"] + 1})
    it = iter(grain.MapDataset.range(pid * 1000, pid * 1000 + 500).to_iter_dataset())
    ckpt = Checkpointer(workdir, save_interval_steps=1000)
    restored = ckpt.restore(abstract_state(state), data_iterator=it)
    step = 0
    if restored is not None:
        state, step = restored
        print(f"[{pid}] resumed at {step}", flush=True)
    with PreemptionWatcher() as watcher:
        print(f"[{pid}] mode {watcher.mode}", flush=True)
        while step < stop_after:
            state = train_step(state); next(it); step += 1
            print(f"[{pid}] step {step}", flush=True)
            time.sleep(0.03)
            if watcher.should_stop(step):
                ckpt.save(step, state, data_iterator=it, force=True)
                print(f"[{pid}] stopped at {step}", flush=True)
                break
            ckpt.save(step, state, data_iterator=it)  # off-interval: a no-op, as in a real loop
    ckpt.close()
    full = multihost_utils.process_allgather(state["w"], tiled=True)
    print(f"[{pid}] final {step} {np.asarray(full).tobytes().hex()} next {next(it)}", flush=True)
    jax.distributed.shutdown()
""")


def _two_processes(script, workdir, mode, stop_after, sigterm_process_1_at=None):
    port = local_processes.free_port()
    procs = [subprocess.Popen([sys.executable, str(script), str(pid), str(port), str(workdir),
                               mode, str(stop_after)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for pid in (0, 1)]
    consumed = ""
    if sigterm_process_1_at is not None:
        for line in procs[1].stdout:
            consumed += line
            if line.strip() == f"[1] step {sigterm_process_1_at}":
                procs[1].send_signal(signal.SIGTERM)
                break
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [outs[0][0], consumed + outs[1][0]]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["jax_sync_point", "process_allgather"])
def test_two_processes_stop_at_the_same_step_and_resume(tmp_path, mode):
    script = tmp_path / "loop.py"
    script.write_text(_TWO_PROCESS_LOOP)
    workdir = tmp_path / "ck"
    first = _two_processes(script, workdir, mode, 400, sigterm_process_1_at=5)
    assert all(f"mode {mode}" in out for out in first)
    stops = [int(ln.split()[-1]) for out in first for ln in out.splitlines() if "stopped at" in ln]
    assert len(stops) == 2 and stops[0] == stops[1] >= 5, first
    stop = stops[0]
    iterator_files = sorted(p.name for p in (workdir / str(stop) / "data").iterdir()
                            if p.name.startswith("process_"))
    assert iterator_files == ["process_0-of-2.json", "process_1-of-2.json"]

    def expected_w(steps):
        w = np.arange(8, dtype=np.float32)
        for _ in range(steps):
            w = w * np.float32(0.5) + np.float32(1.0)
        return w

    # The 2-process checkpoint loads in this single process onto an 8-device mesh.
    mesh = jax.make_mesh((8,), ("x",))
    target = {"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=NamedSharding(mesh, P("x"))),
              "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))}
    with Checkpointer(workdir) as ckpt:
        restored, step = ckpt.restore(target)
    assert step == stop and int(restored["step"]) == stop
    assert np.asarray(restored["w"]).tobytes() == expected_w(stop).tobytes()

    second = _two_processes(script, workdir, mode, stop + 3)
    expected = expected_w(stop + 3)
    for pid, out in enumerate(second):
        assert f"[{pid}] resumed at {stop}" in out
        final = [ln for ln in out.splitlines() if ln.startswith(f"[{pid}] final ")][0].split()
        assert final[2] == str(stop + 3)
        assert final[3] == expected.tobytes().hex()
        assert final[5] == str(pid * 1000 + stop + 3)  # iterator resumed per process
