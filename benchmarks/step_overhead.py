"""What distillation costs on top of plain training, and how kdjax's step compares with PyTorch.

Measured side by side in one process (interleaved rounds in rotating order, median per variant,
after warm-up):
ResNet-18 student, ResNet-34 teacher with the CIFAR stem (3x3/1 conv, no max-pool, as CIFAR KD
codebases use for 32x32 inputs; ``--stem imagenet`` for the 7x7/2 + max-pool stem), CIFAR-size inputs (32x32x3, 100 classes), batch 64, SGD with
momentum; KD recipe = 0.1 CE + 0.9 KD (T = 4).

* ``precomputed_overhead`` = KD step reading stored teacher logits / plain CE step (target <= 1.05)
* ``live_overhead`` = KD step with the live teacher inside it / (CE step + teacher forward) (<= 1.00)
* ``vs_pytorch`` = kdjax live-KD step / the same step written plainly in PyTorch (<= 1.0)
* ``onednn_speedup`` = live-KD step with XLA's convolutions / with oneDNN's (``--conv``: on CPU the
  models use :mod:`kdjax.kernels.onednn` when it is built, as PyTorch uses oneDNN)
* ``fraction_of_peak``: XLA's ``cost_analysis()`` flops of each step / its time / the peak
  (``--peak-gflops``: 333 for this 2-core AVX-512 CPU; on a GPU the script measures a matmul peak).

Usage: ``python benchmarks/step_overhead.py --json PATH [--profile DIR]`` (``--profile`` writes a
trace with one span per XLA op of each step). The process environment matters and the JSON records
it: ``XLA_FLAGS``, and the allocator. XLA:CPU allocates each step's buffers afresh, and under glibc's
default malloc those large blocks are new ``mmap``s whose 4 KiB pages fault in on every step
(~115,000 minor faults per ResNet-18 step, printed per variant); tcmalloc, which Cloud TPU VMs
preload, keeps them mapped. ``--allocator auto`` (the default) therefore restarts the script with
tcmalloc preloaded when it is installed (``apt-get install libtcmalloc-minimal4``), as PyTorch's
``torch.backends.xeon.run_cpu --enable-tcmalloc`` launcher does; ``--allocator system`` keeps glibc's.
Both frameworks share the process and so the allocator.
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import platform
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax import models, recipe, sharding, teachers, train
from kdjax.kernels import onednn

BATCH, SIZE, CLASSES, TEMPERATURE, ALPHA, LR = 64, 32, 100, 4.0, 0.9, 0.1


def make_batch(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32),
            "label": rng.integers(0, CLASSES, BATCH).astype(np.int32)}


def flops_of(jitted, *args) -> float:
    cost = jitted.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0


def jax_variants(dtype, stem: str, conv: str):
    """Returns ({name: zero-arg callable running one step}, {name: flops per call}).

    ``conv`` is the models' convolution (``'xla'`` or ``'onednn'``). XLA's ``cost_analysis()`` does
    not see inside oneDNN's custom calls, so flops are counted for ``conv='xla'`` only (empty dict
    otherwise; the math is the same, so the XLA twin's counts serve).
    """
    mesh = sharding.make_mesh()
    tx = optax.sgd(LR, momentum=0.9)
    student = models.create("resnet18", CLASSES, stem=stem, dtype=dtype, conv=conv)
    teacher_module = models.create("resnet34", CLASSES, stem=stem, dtype=dtype, conv=conv)
    t_vars = teacher_module.init(jax.random.PRNGKey(1), jnp.zeros((1, SIZE, SIZE, 3)))
    t_vars, t_sh = train.put_teacher(t_vars, mesh)
    live = teachers.from_linen(teacher_module)
    apply = train.linen_student(student)
    sample = jnp.zeros((1, SIZE, SIZE, 3))
    batch = sharding.global_batch(make_batch(0), mesh)
    # The stored teacher logits, as the logit store would hand them over (float16).
    stored = dict(batch, teacher_logits=jax.jit(lambda v, b: live(v, b).logits.astype(
        jnp.float16))(t_vars, batch))
    kd_recipe = (recipe.ce(1 - ALPHA), recipe.kd(TEMPERATURE, ALPHA))
    specs = {"ce": ((recipe.ce(),), None, {}, batch),
             "kd_precomputed": (kd_recipe, teachers.precomputed(), {}, stored),
             "kd_live": (kd_recipe, live, t_vars, batch)}
    runs, flops = {}, {}
    for name, (rec, teacher, tv, b) in specs.items():
        state, st_sh = train.init_train_state(student, tx, sample, seed=0, mesh=mesh)
        step = train.make_train_step(apply, tx, rec, teacher, mesh=mesh, state_shardings=st_sh,
                                     teacher_shardings=t_sh if tv else None,
                                     guard_nonfinite=False)
        if conv == "xla":
            flops[name] = flops_of(step, state, tv, b)
        holder = {"state": state}

        def run(step=step, holder=holder, tv=tv, b=b):
            holder["state"], metrics = step(holder["state"], tv, b)
            jax.block_until_ready(metrics)
        runs[name] = run
    teacher_fwd = jax.jit(lambda v, b: live(v, b).logits)
    if conv == "xla":
        flops["teacher_forward"] = flops_of(teacher_fwd, t_vars, batch)
    runs["teacher_forward"] = lambda: jax.block_until_ready(teacher_fwd(t_vars, batch))
    return runs, flops


def torch_variant(stem: str):
    """The live-KD step written plainly in PyTorch (same architectures, batch, optimizer)."""
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count())

    class Block(tnn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(cout)
            self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = tnn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False),
                                           tnn.BatchNorm2d(cout))

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return F.relu(out + (x if self.down is None else self.down(x)))

    class ResNet(tnn.Module):
        def __init__(self, layers, classes):
            super().__init__()
            self.conv1 = (tnn.Conv2d(3, 64, 7, 2, 3, bias=False) if stem == "imagenet"
                          else tnn.Conv2d(3, 64, 3, 1, 1, bias=False))
            self.bn1 = tnn.BatchNorm2d(64)
            blocks, cin = [], 64
            for i, (n, cout) in enumerate(zip(layers, (64, 128, 256, 512))):
                for j in range(n):
                    blocks.append(Block(cin, cout, 2 if (j == 0 and i > 0) else 1))
                    cin = cout
            self.blocks = tnn.Sequential(*blocks)
            self.fc = tnn.Linear(512, classes)

        def forward(self, x):
            x = F.relu(self.bn1(self.conv1(x)))
            if stem == "imagenet":
                x = F.max_pool2d(x, 3, 2, 1)
            return self.fc(self.blocks(x).mean((2, 3)))

    torch.manual_seed(0)
    student, teacher = ResNet((2, 2, 2, 2), CLASSES), ResNet((3, 4, 6, 3), CLASSES).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(student.parameters(), lr=LR, momentum=0.9)
    b = make_batch(0)
    x = torch.from_numpy(b["image"]).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(b["label"]).long()

    def run():
        with torch.no_grad():
            t_logits = teacher(x)
        s_logits = student(x)
        kd = F.kl_div(F.log_softmax(s_logits / TEMPERATURE, -1),
                      F.log_softmax(t_logits / TEMPERATURE, -1), log_target=True,
                      reduction="batchmean") * TEMPERATURE ** 2
        loss = (1 - ALPHA) * F.cross_entropy(s_logits, y) + ALPHA * kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return run, torch.__version__


def measure(runs: dict, rounds: int, warmup: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per call, and median minor page faults per call, of each run.

    Each round runs every variant once, in an order rotated by one from the round before, so that
    no variant always follows the same one (PyTorch's idle OpenMP threads, freed memory).
    """
    for run in runs.values():
        for _ in range(warmup):
            run()
    names = list(runs)
    times = {name: [] for name in names}
    faults = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return ({name: statistics.median(ts) for name, ts in times.items()},
            {name: statistics.median(fs) for name, fs in faults.items()})


def preload_tcmalloc_or_continue(choice: str) -> None:
    """For ``--allocator auto|tcmalloc``: re-executes this script with tcmalloc in ``LD_PRELOAD``.

    Returns (and the run continues as it is) when tcmalloc is already loaded, when ``choice`` is
    ``system``, or when ``auto`` finds no tcmalloc; ``tcmalloc`` without the library is an error.
    """
    preload = os.environ.get("LD_PRELOAD", "")
    if choice == "system" or "tcmalloc" in preload:
        return
    lib = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    if lib is None:
        if choice == "tcmalloc":
            sys.exit("--allocator tcmalloc: no tcmalloc found (apt-get install libtcmalloc-minimal4)")
        print("tcmalloc not found: timing under glibc malloc (apt-get install libtcmalloc-minimal4)")
        return
    env = dict(os.environ, LD_PRELOAD=" ".join(filter(None, (lib, preload))))
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def gpu_matmul_peak(dtype) -> float:
    """Measured FLOP/s of a large matmul on the default device (the denominator on a GPU)."""
    n = 8192
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    jax.block_until_ready(f(a))
    t0 = time.perf_counter()
    for _ in range(10):
        out = f(a)
    jax.block_until_ready(out)
    return 10 * 2 * n ** 3 / (time.perf_counter() - t0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-gflops", type=float, default=333.0,
                        help="f32 peak of this CPU (2 cores x 2.6 GHz x 64 FLOP/cycle)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    parser.add_argument("--stem", choices=("cifar", "imagenet"), default="cifar",
                        help="ResNet stem: cifar (3x3/1, no pool) or imagenet (7x7/2 + max-pool)")
    parser.add_argument("--conv", choices=("auto", "xla", "onednn"), default="auto",
                        help="the models' convolution; auto: oneDNN on CPU when built "
                             "(python -m kdjax.kernels.build), else XLA's")
    parser.add_argument("--profile", metavar="DIR",
                        help="after timing, write a jax.profiler trace of one call of each JAX "
                             "variant to DIR (TensorBoard's profile plugin or ui.perfetto.dev)")
    parser.add_argument("--allocator", choices=("auto", "tcmalloc", "system"), default="auto",
                        help="auto: restart with tcmalloc preloaded when it is installed (see above)")
    args = parser.parse_args()
    preload_tcmalloc_or_continue(args.allocator)  # before JAX starts its runtime

    dtype = jnp.dtype(args.dtype)
    conv = args.conv
    if conv == "auto":
        conv = "onednn" if jax.default_backend() == "cpu" and onednn.available() else "xla"
    runs, flops = jax_variants(dtype, args.stem, "xla")
    if conv == "onednn":  # XLA's flop counts serve (same math); keep XLA's live step beside it
        runs = dict(jax_variants(dtype, args.stem, "onednn")[0], kd_live_xla_conv=runs["kd_live"])
        flops["kd_live_xla_conv"] = flops["kd_live"]
    torch_version = None
    if not args.no_torch:
        try:
            runs["torch_kd_live"], torch_version = torch_variant(args.stem)
        except ImportError:
            print("torch is not installed: skipping vs_pytorch (pip install torch==2.13.0)")
    t, faults = measure(runs, args.rounds, args.warmup)
    if args.profile:
        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
            for name in flops:
                with jax.profiler.TraceAnnotation(name):
                    runs[name]()

    backend = jax.default_backend()
    peak = (gpu_matmul_peak(dtype) if backend == "gpu" else args.peak_gflops * 1e9)
    result = {
        "precomputed_overhead": t["kd_precomputed"] / t["ce"],
        "live_overhead": t["kd_live"] / (t["ce"] + t["teacher_forward"]),
        "conv": conv,
        "seconds": t,
        "gflops_per_step": {k: v / 1e9 for k, v in flops.items()},
        "fraction_of_peak": {k: flops[k] / t[k] / peak for k in flops},
        "peak_gflops": peak / 1e9,
        "images_per_second": {k: BATCH / t[k] for k in t},
        "page_faults_per_step": faults,
        "backend": backend, "devices": jax.device_count(), "jax": jax.__version__,
        "torch": torch_version, "dtype": args.dtype, "stem": args.stem, "machine": platform.processor() or platform.machine(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "ld_preload": os.environ.get("LD_PRELOAD", ""), "batch": BATCH, "rounds": args.rounds,
    }
    if "kd_live_xla_conv" in t:
        result["onednn_speedup"] = t["kd_live_xla_conv"] / t["kd_live"]
    if "torch_kd_live" in t:
        result["vs_pytorch"] = t["kd_live"] / t["torch_kd_live"]
    print(f"{'conv':>22}: {conv}")
    print(f"{'LD_PRELOAD':>22}: {result['ld_preload'] or '(none: glibc malloc)'}")
    for key in ("precomputed_overhead", "live_overhead", "vs_pytorch", "onednn_speedup"):
        if key in result:
            print(f"{key:>22}: {result[key]:.3f}")
    for k in t:
        frac = result["fraction_of_peak"].get(k)
        print(f"{k:>22}: {1e3 * t[k]:8.1f} ms  {BATCH / t[k]:7.1f} img/s"
              + (f"  {100 * frac:5.1f}% of peak" if frac is not None else "")
              + f"  {faults[k]:8.0f} page faults")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
