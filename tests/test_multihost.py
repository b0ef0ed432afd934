"""Two JAX processes (2 CPU devices each, gloo collectives, loopback only) run fit() on digits and
reach the parameters of a single process with 4 devices; only process 0 writes the logs."""

import glob
import json
import os
import sys

import jax
import numpy as np
import pytest

import fit_worker
import local_processes
from kdjax import checkpointing, sharding

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# Within the first epoch (1438 records, 44 global batches of 32): one process and two processes
# then put the same records in every global batch (in another row order).
STEPS = 30
TIMEOUT_S = 240


def _run_two_processes(workdir, cache_dir):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(fit_worker.cache_env(cache_dir), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    return local_processes.run(lambda i, port: [
        sys.executable, os.path.join(HERE, "fit_worker.py"), str(workdir), str(STEPS),
        "--checkpoint-every", "10", "--num-processes", "2", "--process-id", str(i),
        "--port", str(port)], env=env, timeout=TIMEOUT_S)


@pytest.mark.slow
def test_two_processes_match_one_process_and_only_process_0_logs(tmp_path, compile_cache):
    outputs = _run_two_processes(tmp_path / "multi", compile_cache)
    assert f"FIT_DONE step={STEPS} stopped_early=False" in outputs[0]
    assert "FIT_DONE" not in outputs[1]  # process 1 prints nothing: process 0 reports

    mesh = sharding.make_mesh(devices=jax.devices()[:4])
    single = fit_worker.run(str(tmp_path / "single"), STEPS, mesh=mesh, process_index=0,
                            process_count=1)
    expected = fit_worker.flat_params(single.state.params)
    with np.load(tmp_path / "multi" / "final_params.npz") as f:
        got = {k: f[k] for k in f.files}
    assert sorted(got) == sorted(expected)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)

    # Only process 0 wrote the logs: every record once, one TensorBoard event file.
    with open(tmp_path / "multi" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(5, STEPS + 1, 5))
    assert [r["step"] for r in records if r["kind"] == "eval"] == [STEPS]
    np.testing.assert_allclose([r["loss/ce"] for r in train],
                               [r["loss/ce"] for r in single.history], rtol=1e-4)
    assert train[-1]["loss/ce"] < 0.5 * train[0]["loss/ce"]  # it trained: not two inits compared
    assert len(glob.glob(str(tmp_path / "multi" / "tb" / "events.out.tfevents.*"))) == 1
    # Both processes took part in checkpointing: the steps are complete and restorable here.
    ckpt = checkpointing.Checkpointer(tmp_path / "multi" / "checkpoints")
    assert ckpt.all_steps() == [10, 20, 30]
    ckpt.close()
