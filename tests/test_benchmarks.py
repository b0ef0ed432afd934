"""benchmarks/step_overhead.py: how it turns timings into the reported ratios, and an end-to-end
run of the script on a shrunken setup (with the measured peak that GPUs use: --measure-peak)."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "step_overhead.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("step_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ratios_are_medians_of_per_round_ratios(bench):
    # The machine's speed drifts between rounds: 1x, 3x, 1x for the CE step and 1x, 1x, 3x for
    # the teacher. Within each round the live step costs 0.9 of the two; medians of each variant
    # taken separately (1.0, 1.0, 3.6) would say 1.8.
    times = {"ce": [1.0, 3.0, 1.0], "teacher_forward": [1.0, 1.0, 3.0],
             "kd_live": [1.8, 3.6, 3.6], "kd_precomputed": [1.1, 3.0, 1.2]}
    faults = {k: [0, 4, 2] for k in times}
    flops = {"ce": 2e9, "kd_live": 6e9}
    r = bench.summarize(times, faults, flops, peak=4e9, batch=64)
    assert r["live_overhead"] == pytest.approx(0.9)
    assert r["ratio_range_over_rounds"]["live_overhead"] == pytest.approx([0.9, 0.9])
    assert r["precomputed_overhead"] == pytest.approx(1.1)
    assert r["ratio_range_over_rounds"]["precomputed_overhead"] == pytest.approx([1.0, 1.2])
    assert r["targets"] == {"precomputed_overhead": {"target": 1.05, "met": False},
                            "live_overhead": {"target": 1.0, "met": True}}
    # Variants that did not run give no ratio (here: PyTorch, XLA's convolutions).
    assert "vs_pytorch" not in r and "onednn_speedup" not in r
    assert r["seconds"]["kd_live"] == pytest.approx(3.6)
    assert r["images_per_second"]["ce"] == pytest.approx(64.0)
    assert r["fraction_of_peak"] == pytest.approx({"ce": 0.5, "kd_live": 6e9 / 3.6 / 4e9})
    assert r["page_faults_per_step"]["ce"] == 2
    assert r["peak_gflops"] == pytest.approx(4.0)


def test_vs_pytorch_and_onednn_speedup(bench):
    times = {"kd_live": [2.0, 2.0, 2.0], "torch_kd_live": [2.0, 2.5, 1.6],
             "kd_live_xla_conv": [3.0, 3.2, 2.8]}
    r = bench.summarize(times, {k: [0] * 3 for k in times}, {}, peak=1.0, batch=8)
    assert r["vs_pytorch"] == pytest.approx(1.0)
    assert r["ratio_range_over_rounds"]["vs_pytorch"] == pytest.approx([0.8, 1.25])
    assert r["targets"]["vs_pytorch"] == {"target": 1.0, "met": True}
    assert r["onednn_speedup"] == pytest.approx(1.5)
    assert "onednn_speedup" not in r["targets"]


def test_torch_twin_only_where_it_compares(bench, capsys):
    try:
        import torch
    except ImportError:
        torch = None
    assert bench.torch_device("cpu") == ("cpu" if torch else None)
    # A TPU has no PyTorch twin; a GPU needs a CUDA build of torch.
    assert bench.torch_device("tpu") is None
    cuda = torch is not None and torch.cuda.is_available()
    assert bench.torch_device("gpu") == ("cuda" if cuda else None)
    assert "skipping vs_pytorch" in capsys.readouterr().out


def test_measured_matmul_peak(bench):
    import jax.numpy as jnp

    flops = bench.measured_matmul_peak(jnp.float32, n=256)
    assert 1e8 < flops < 1e13  # this CPU: ~1e11


def test_cpu_description_names_the_model_and_vector_isa(bench):
    cpu = bench.cpu_description()
    flags = set(open("/proc/cpuinfo").read().split())
    assert cpu["model"] and cpu["isa"] == sorted(cpu["isa"])
    assert ("avx2" in cpu["isa"]) == ("avx2" in flags)
    assert ("avx512f" in cpu["isa"]) == ("avx512f" in flags)
    assert not set(cpu["isa"]) - {f for f in flags if f in ("avx2", "fma") or f.startswith(("avx512", "amx"))}


@pytest.mark.slow
def test_script_end_to_end(tmp_path, bench):
    """The script as a user runs it, shrunk (batch 8, width 8, 2 rounds); it gives itself a second
    CPU device for the teacher-device variant."""
    out = tmp_path / "r.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, str(SCRIPT), "--json", str(out), "--batch", "8", "--width", "8",
           "--rounds", "2", "--warmup", "1", "--measure-peak", "256", "--allocator", "system"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    variants = {"ce", "kd_precomputed", "kd_live", "teacher_forward", "kd_live_teacher_device",
                "plain_jax_kd_live"}
    assert variants <= set(r["seconds"]) and set(r["seconds"]) == set(r["images_per_second"])
    assert variants - {"kd_live_teacher_device", "plain_jax_kd_live"} <= set(r["fraction_of_peak"])
    assert {"vs_plain_jax", "plain_jax_live_overhead"} <= set(r["ratio_range_over_rounds"])
    assert r["peak_measured"] and r["peak_gflops"] > 0.1 and r["ld_preload"] == ""
    assert r["cpu"] == bench.cpu_description()
    assert r["devices"] == 2 and "--xla_force_host_platform_device_count=2" in r["xla_flags"]
    for key in ("precomputed_overhead", "live_overhead", "live_teacher_device_overhead"):
        lo, hi = r["ratio_range_over_rounds"][key]
        target = r["targets"][key]
        assert lo <= r[key] <= hi and target["met"] == (r[key] <= target["target"])
    if r["torch"] is not None:
        assert r["torch_device"] == "cpu" and "vs_pytorch" in r
    assert (r["conv"] == "onednn") == ("onednn_speedup" in r)
    if r["conv"] == "onednn":  # the oneDNN the kernel runs on, and where it came from
        from kdjax.kernels import onednn
        assert r["onednn"].startswith(onednn.version() + " (")
    assert r["teacher"] == "resnet34"
    assert "live_overhead" in proc.stdout and "GFLOP/s (measured)" in proc.stdout


def test_resnet50_teacher_variants_run(bench):
    """``--teacher resnet50`` builds the steps around a live ResNet-50 (same student, same stored-
    logit step; main() then runs no PyTorch twin, which exists for ResNet-34 only)."""
    runs, _ = bench.jax_variants(bench.jnp.float32, "cifar", "xla", batch_size=2, width=4,
                                 teacher="resnet50")
    assert {"ce", "kd_precomputed", "kd_live", "teacher_forward"} <= set(runs)
    runs["kd_live"]()  # runs, with the bottleneck teacher inside the step


@pytest.mark.slow
def test_data_parallel_script_end_to_end(tmp_path):
    """benchmarks/data_parallel.py shrunk (batch 8, width 8, 2 rounds) on a 2-device CPU mesh."""
    out = tmp_path / "dp.json"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "LD_PRELOAD")}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "data_parallel.py"), "--json", str(out),
           "--batch", "8", "--width", "8", "--rounds", "2", "--warmup", "1"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["devices"] == 2 and "--xla_force_host_platform_device_count=2" in r["xla_flags"]
    convs = [k.removeprefix("mesh_over_single_") for k in r if k.startswith("mesh_over_single_")]
    assert "xla" in convs
    for conv in convs:
        lo, hi = r["ratio_range_over_rounds"][f"mesh_over_single_{conv}"]
        assert 0 < lo <= r[f"mesh_over_single_{conv}"] <= hi
        assert f"{conv:7s} one device" in proc.stdout


@pytest.mark.slow
def test_detection_step_script_end_to_end(tmp_path):
    """benchmarks/detection_step.py shrunk (batches 1 and 2, one step, one round): both arms timed,
    and the fitted line through two points is exactly fixed = 2 t1 - t2, per image = t2 - t1."""
    out = tmp_path / "det.json"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "LD_PRELOAD")}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "detection_step.py"), "--json", str(out),
           "--batches", "1,2", "--steps", "1", "--rounds", "1"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert set(r["arms"]) == {"scratch", "kd_large"}
    for arm in r["arms"].values():
        t1, t2 = arm["ms"]["1"], arm["ms"]["2"]
        assert arm["per_image_ms"] == pytest.approx(t2 - t1, rel=1e-6, abs=1e-9)
        assert arm["fixed_ms"] == pytest.approx(2 * t1 - t2, rel=1e-6, abs=1e-9)
        assert arm["gflops"]["2"] > arm["gflops"]["1"] > 0
    assert "ms fixed +" in proc.stdout
