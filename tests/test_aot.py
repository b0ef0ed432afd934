"""Ahead-of-time TPU compilation (kdjax.aot, experiments.compile_check) without a TPU.

Slice names, the chip table and the HLO collective parser are plain Python and always run. The
tests that compile need libtpu (it describes TPU slices on a CPU host; Python 3.12 with jax 0.12):
they skip without it, and fail when ``KDJAX_REQUIRE_LIBTPU`` is set (CI's Python 3.12 run).
"""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import compile_check
from experiments.configs import digits_eskd, digits_fitnet
from kdjax import aot, sharding
from kdjax.aot import analysis
from kdjax.aot.chips import CHIPS, GiB
from kdjax.kernels import onednn

REQUIRE_ENV = "KDJAX_REQUIRE_LIBTPU"


@pytest.fixture(scope="module")
def libtpu():
    if importlib.util.find_spec("libtpu") is None:
        reason = "libtpu is not installed (pip install -e '.[tpu]' on Python 3.12)"
        if os.environ.get(REQUIRE_ENV) not in (None, "", "0"):
            pytest.fail(f"{REQUIRE_ENV} is set but {reason}", pytrace=False)
        pytest.skip(reason)


needs_libtpu = pytest.mark.usefixtures("libtpu")


# ------------------------------------------------------------------------------- slices and chips

@pytest.mark.parametrize("name, topology, chips, devices", [
    ("v5e-16", "v5e:4x4", 16, 16), ("v5litepod-16", "v5e:4x4", 16, 16), ("v5e-1", "v5e:1x1", 1, 1),
    ("v5e-8", "v5e:2x4", 8, 8), ("v6e-8", "v6e:2x4", 8, 8), ("v4-8", "v4:2x2x1", 4, 4),
    ("v4-32", "v4:2x2x4", 16, 16), ("v5p-64", "v5p:2x4x4", 32, 32), ("v5p-128", "v5p:4x4x4", 64, 64),
    ("v2-8", "v2:2x2", 4, 8), ("v3-32", "v3:4x4", 16, 32), ("v5e:2x2", "v5e:2x2", 4, 4),
    ("v4:2x2x2", "v4:2x2x2", 8, 8),
])
def test_parse_slice(name, topology, chips, devices):
    s = aot.parse_slice(name)
    assert (s.topology, s.num_chips, s.num_devices) == (topology, chips, devices)
    assert aot.parse_slice(s.accelerator_type).topology == topology  # Cloud TPU's name round-trips


@pytest.mark.parametrize("name, message", [
    ("v7-8", "unknown TPU slice"), ("v5e-12", "not a slice size"), ("v4-2", "4 chips or more"),
    ("v4-7", "two per chip"), ("v5e:2x2x2", "have 2 axes"), ("v4:2x2", "have 3 axes"),
])
def test_parse_slice_refuses(name, message):
    with pytest.raises(ValueError, match=message):
        aot.parse_slice(name)


def test_chip_table_is_per_device():
    # v2/v3 devices are TensorCores: half a chip's 16 / 32 GiB; the rest are whole chips.
    assert CHIPS["v2"].hbm_bytes == 8 * GiB and CHIPS["v3"].hbm_bytes == 16 * GiB
    assert CHIPS["v5e"].hbm_bytes == 16 * GiB and CHIPS["v5p"].hbm_bytes == 95 * GiB
    assert all(c.source and c.peak_flops > 1e13 and c.hbm_bandwidth > 1e11 for c in CHIPS.values())


HLO = """
ENTRY %main {
  %all-reduce.1 = (f32[64]{0:T(128)}, f32[64]{0:T(128)}) all-reduce(%a, %b), channel_id=2, to_apply=%add
  %ag-start = (bf16[8,128]{1,0}, bf16[32,128]{1,0}) all-gather-start(%c), dimensions={0}
  %ag-done = bf16[32,128]{1,0} all-gather-done(%ag-start)
  %rs = f32[4,16]{1,0} reduce-scatter(%d), dimensions={0}, to_apply=%add
  ROOT %cp = s32[] collective-permute(%e), source_target_pairs={{0,1}}
  %not = f32[4] add(%x, %y)
}
"""


def test_collectives_counts_ops_and_result_bytes():
    assert analysis.collectives(HLO) == {
        "all-reduce": {"count": 1, "bytes": 2 * 64 * 4},
        "all-gather": {"count": 1, "bytes": 32 * 128 * 2},  # the -done's result, counted once
        "reduce-scatter": {"count": 1, "bytes": 4 * 16 * 4},
        "collective-permute": {"count": 1, "bytes": 4}}


# ------------------------------------------------------------------------------------ compiling

def _digits_config(arg="teacher=medium,mode=full", **overrides):
    c = (digits_fitnet if arg == "fitnet" else digits_eskd).get_config("" if arg == "fitnet" else arg)
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


@needs_libtpu
def test_live_and_precomputed_kd_steps_compile_for_v5e_with_memory_report():
    report = compile_check.check(_digits_config(), "v5e:2x2", kinds=("train", "eval"))
    rows = {r["name"]: r for r in report["programs"]}
    assert (report["chip"], report["devices"], report["hosts"]) == ("v5e", 4, 1)
    assert set(rows) == {"teacher: train step", "teacher: eval step", "student: train step",
                         "student: eval step"}
    live = rows["student: train step"]
    assert live["total_bytes"] == (live["argument_bytes"] + live["output_bytes"] - live["alias_bytes"]
                                   + live["temp_bytes"] + live["code_bytes"])
    assert live["alias_bytes"] > 0  # the donated state
    assert live["fits"] and live["hbm_bytes"] == 16 * GiB
    # Per device: the student's and the teacher's FLOPs on a quarter of the batch; the
    # live-KD step does more work than the teacher's own CE step minus its backward pass.
    assert live["flops"] > 0 and live["bytes_accessed"] > 0
    assert live["collectives"]["all-reduce"]["count"] >= 1  # gradients over the data axis
    assert live["roofline_seconds"] == pytest.approx(max(
        live["flops"] / CHIPS["v5e"].peak_flops, live["bytes_accessed"] / CHIPS["v5e"].hbm_bandwidth))
    assert live["calls"] == 60 * (1437 // 128) and live["epoch_calls"] == 1437 // 128
    assert report["total_seconds"] == pytest.approx(sum(r["total_seconds"] for r in rows.values()))

    pre = compile_check.check(_digits_config(**{"teacher.precomputed": True,
                                                "teacher.store_format": "topk",
                                                "teacher.store_k": 3}), "v5e:2x2")
    names = [r["name"] for r in pre["programs"]]
    assert "precompute: teacher cnn2d:width=16 -> topk store" in names
    step = next(r for r in pre["programs"] if r["name"] == "student: train step")
    assert step["fits"] and step["flops"] < live["flops"]  # no teacher forward in the step
    assert step["input_bytes"][1] == 0  # no teacher variables: the top-k rows come in the batch


@needs_libtpu
def test_a_view_store_precompute_is_counted_over_every_epoch():
    """teacher.store_views: the precompute program runs over every (epoch, id) of the train split
    (kdjax.data.view_num_batches) plus the eval split's one pass."""
    import math

    from kdjax import data

    settings = {"teacher.precomputed": True, "teacher.store_format": "topk", "teacher.store_k": 3}
    c = _digits_config(**settings)
    epochs, batch = c.num_epochs, c.dataset.eval_batch_size
    views = compile_check.check(_digits_config(**settings, **{"teacher.store_views": f"epochs:0-{epochs - 1}"}),
                                "v5e:2x2", kinds=("precompute",))
    row, = views["programs"]
    sizes = {split: len(a["label"]) for split, a in data.digits_arrays().items()}
    assert row["calls"] == math.ceil(sizes["train"] * epochs / batch) + math.ceil(sizes["test"] / batch)


@needs_libtpu
def test_fsdp_shards_the_state_and_the_teacher_to_a_quarter():
    big = {"student.model": "mlp:width=1024", "teacher.model": "mlp:width=2048",
           "teacher.source": "checkpoint"}
    dp = compile_check.check(_digits_config("teacher=large,mode=full", **big), "v5e:2x2",
                             kinds=("train",))
    fs = compile_check.check(_digits_config("teacher=large,mode=full", **big,
                                            **{"run.mesh_fsdp": 4, "run.param_mode": "fsdp",
                                               "run.teacher_mode": "fsdp"}), "v5e:2x2",
                             kinds=("train",))
    (a,), (b,) = dp["programs"], fs["programs"]
    for arg in (0, 1):  # the student's state and the teacher: at most 1/4 of replicated + 5%
        assert b["input_bytes"][arg] <= a["input_bytes"][arg] / 4 * 1.05
    assert "all-gather" in b["collectives"] and "all-gather" not in a["collectives"]


@needs_libtpu
def test_teacher_on_own_devices_and_fitnet_hint_stage_compile():
    report = compile_check.check(_digits_config(**{"run.teacher_devices": 2,
                                                   "teacher.source": "checkpoint"}), "v5e:2x2")
    rows = {r["name"]: r for r in report["programs"]}
    teacher = rows["student: teacher cnn2d:width=16 on its own devices"]
    assert teacher["beside"] == "student: train step" and teacher["total_seconds"] == 0
    assert teacher["num_devices"] == 2 and rows["student: train step"]["num_devices"] == 2
    fit = compile_check.check(_digits_config("fitnet", **{"teacher.source": "checkpoint"}),
                              "v5e:2x2", kinds=("train",))
    assert [r["name"] for r in fit["programs"]] == ["fitnet_stage1: train step",
                                                     "fitnet_stage2: train step"]


@needs_libtpu
def test_command_refuses_a_batch_that_does_not_fit(tmp_path, capsys):
    args = ["--config=experiments/configs/digits_eskd.py:teacher=none", "--topology=v5e-4",
            "--config.student.model=cnn2d:width=64", "--config.dataset.batch_size=4194304",
            "--config.dataset.eval_batch_size=4"]
    assert compile_check.main(args) == 1
    err = capsys.readouterr().err
    assert "error: student: train step needs" in err and "GiB of 16 GiB HBM per device on v5e" in err
    assert "run.param_mode=fsdp" in err and "smaller dataset.batch_size" in err

    path = tmp_path / "report.json"
    assert compile_check.main(["--config=experiments/configs/digits_eskd.py:teacher=none",
                               "--topology=v5e-4", f"--json={path}"]) == 0
    out = capsys.readouterr().out
    assert "| student: train step | 128 |" in out and "estimated" in out
    saved = json.loads(path.read_text())
    assert saved["fits"] and saved["libtpu_topology"] == "v5e:2x2"
    assert {r["name"] for r in saved["programs"]} == {"student: train step", "student: eval step"}


def test_command_names_bad_topology_and_missing_flag():
    from experiments.validate import ConfigError

    with pytest.raises(ConfigError, match="--topology is required"):
        compile_check.main(["--config=experiments/configs/digits_eskd.py:teacher=none"])
    with pytest.raises(ConfigError, match="unknown TPU slice 'v9-8'"):
        compile_check.main(["--config=experiments/configs/digits_eskd.py:teacher=none",
                            "--topology=v9-8"])


@needs_libtpu
def test_multislice_mesh_puts_the_data_axis_across_slices():
    devices = aot.slice_devices(aot.parse_slice("v5e:2x2"), num_slices=2)
    mesh = sharding.make_mesh(data=-1, fsdp=2, devices=devices)
    assert mesh.devices.shape == (4, 2)
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert (slices[:2] == 0).all() and (slices[2:] == 1).all()  # fsdp within a slice
    with pytest.raises(ValueError, match="multiple of the 2 slices"):
        sharding.make_mesh(data=1, fsdp=8, devices=devices)


@needs_libtpu
def test_onednn_model_compiles_for_tpu_on_xla_convolutions_and_the_guard_names_cpu_calls():
    if not onednn.available():
        pytest.skip("the oneDNN kernel is not built (tests/test_kernels_onednn.py requires it)")
    spec = aot.parse_slice("v5e:2x2")
    mesh = sharding.make_mesh(devices=aot.slice_devices(spec))
    x = sharding.with_shardings(jax.ShapeDtypeStruct((8, 8, 8, 4), jnp.float32),
                                sharding.batch_sharding(mesh))
    w = sharding.with_shardings(jax.ShapeDtypeStruct((3, 3, 4, 4), jnp.float32),
                                sharding.replicated(mesh))

    def conv():
        return jax.jit(jax.grad(lambda x, w: onednn.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")).sum(), argnums=1))

    traced_for_cpu = conv().lower(x, w)  # traced on this CPU host: the oneDNN custom calls
    assert analysis.cpu_custom_calls(traced_for_cpu)
    with pytest.raises(analysis.HostCustomCallError, match="CPU-only custom call.*oneDNN"):
        analysis.check_no_cpu_custom_calls(traced_for_cpu, "conv step")
    report = aot.compile_program("conv step", conv(), x, w, chip=spec.chip)  # XLA's convolution
    assert report.flops > 0 and report.fits


@needs_libtpu
def test_benchmark_compiles_the_colab_demo_for_colab_tpus(tmp_path, capsys):
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import tpu_compile

    out = tmp_path / "colab.json"
    assert tpu_compile.main(["--sections", "colab", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["topology"], r["program"]) for r in rows} == {
        (t, p) for t in ("v5e-1", "v6e-1", "v2-8") for p in ("teacher", "scratch", "kd", "eskd")}
    assert all(r["fits"] and r["flops"] > 0 for r in rows)
    kd = {r["topology"]: r for r in rows if r["program"] == "kd"}
    assert kd["v2-8"]["num_devices"] == 8 and kd["v5e-1"]["num_devices"] == 1
    assert "| v2-8 | eskd |" in capsys.readouterr().out
