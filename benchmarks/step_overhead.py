"""What distillation costs on top of plain training, and how kdjax's step compares with PyTorch.

Setup: ResNet-18 student, ResNet-34 teacher with the CIFAR stem (3x3/1 conv, no max-pool, as CIFAR
KD codebases use for 32x32 inputs; ``--stem imagenet`` for the 7x7/2 + max-pool stem), CIFAR-size
inputs (32x32x3, 100 classes), batch 64, SGD with momentum; KD recipe = 0.1 CE + 0.9 KD (T = 4).
All variants run in one process, after warm-up, in rounds: each round runs every variant once (in
an order rotated from the round before). Each ratio is computed within each round and the median
over rounds is reported, with its range, so that the machine's speed drifting between rounds (2x
on a shared CPU) cancels out of it:

* ``precomputed_overhead`` = KD step reading stored teacher logits / plain CE step (target <= 1.05)
* ``live_overhead`` = KD step with the live teacher inside it / (CE step + teacher forward) (<= 1.00)
* ``live_teacher_device_overhead``: the same live KD step with the teacher on a device of its own
  (:func:`kdjax.teachers.on_devices`: here CPU device 1 on the same cores, from
  ``--xla_force_host_platform_device_count=2``, which the script sets unless ``XLA_FLAGS`` names a
  count; a second GPU on a GPU machine), dispatched one batch ahead so that it runs while the
  student's step does; each call waits for both. Skipped with one device.
* ``vs_pytorch`` = kdjax live-KD step / the same step written plainly in PyTorch (<= 1.0), on the
  CPU, or on the GPU with a CUDA build of torch (skipped with a message otherwise)
* ``onednn_speedup`` = live-KD step with XLA's convolutions / with oneDNN's (``--conv``: on CPU the
  models use :mod:`kdjax.kernels.onednn` when it is built, as PyTorch uses oneDNN)
* ``vs_plain_jax`` = kdjax live-KD step / the same step written plainly in JAX, Flax and optax (the
  same modules, no ``kdjax.train``): what kdjax's step machinery costs; and
  ``plain_jax_live_overhead`` = that plain step / (CE step + teacher forward): how much of
  ``live_overhead`` a hand-written step pays too
* ``fraction_of_peak``: XLA's ``cost_analysis()`` flops of each step / its median time / the peak
  (``--peak-gflops``: 333 for this 2-core AVX-512 CPU; on a GPU, or with ``--measure-peak``, the
  FLOP/s of a large matmul measured by the script); ``images_per_second`` per variant. The peak is
  float32's: with ``--teacher-dtype bfloat16`` (the teacher in bfloat16, in both frameworks; on
  CPUs with AVX512-BF16, whose bfloat16 peak is twice float32's) the fraction can exceed 1.

Usage: ``python benchmarks/step_overhead.py --json PATH [--profile DIR]`` (``--profile`` writes a
trace with one span per XLA op of each step). The process environment matters and the JSON records
it: ``XLA_FLAGS``, and the allocator. XLA:CPU allocates each step's buffers afresh, and under glibc's
default malloc those large blocks are new ``mmap``s whose 4 KiB pages fault in on every step
(~115,000 minor faults per ResNet-18 step, printed per variant); tcmalloc, which Cloud TPU VMs
preload, keeps them mapped. ``--allocator auto`` (the default) therefore restarts the script with
tcmalloc preloaded when it is installed (``apt-get install libtcmalloc-minimal4``), as PyTorch's
``torch.backends.xeon.run_cpu --enable-tcmalloc`` launcher does; ``--allocator system`` keeps glibc's.
Both frameworks share the process and so the allocator. ``--batch`` and ``--width`` shrink the
setup (tests run it that way); the reported figures use the defaults.
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
from kdjax.kernels import build, onednn

SIZE, CLASSES, TEMPERATURE, ALPHA, LR = 32, 100, 4.0, 0.9, 0.1
# What each reported ratio divides (numerator, denominator terms), and its target.
RATIOS = {"precomputed_overhead": ("kd_precomputed", ("ce",)),
          "live_overhead": ("kd_live", ("ce", "teacher_forward")),
          "live_teacher_device_overhead": ("kd_live_teacher_device", ("ce", "teacher_forward")),
          "vs_pytorch": ("kd_live", ("torch_kd_live",)),
          "vs_plain_jax": ("kd_live", ("plain_jax_kd_live",)),
          "plain_jax_live_overhead": ("plain_jax_kd_live", ("ce", "teacher_forward")),
          "onednn_speedup": ("kd_live_xla_conv", ("kd_live",))}
TARGETS = {"precomputed_overhead": 1.05, "live_overhead": 1.00,
           "live_teacher_device_overhead": 1.00, "vs_pytorch": 1.0}


def make_batch(seed: int, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(batch, SIZE, SIZE, 3)).astype(np.float32),
            "label": rng.integers(0, CLASSES, batch).astype(np.int32)}


def flops_of(jitted, *args) -> float:
    cost = jitted.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0


def jax_variants(dtype, stem: str, conv: str, batch_size: int = 64, width: int = 64,
                 teacher_dtype=None, teacher_device: bool = False, teacher: str = "resnet34"):
    """Returns ({name: zero-arg callable running one step}, {name: flops per call}).

    Every variant runs on the first device; with ``teacher_device`` and a second device, also
    ``kd_live_teacher_device`` (the teacher on the second device, one batch ahead).

    ``dtype``: the student's compute dtype; ``teacher_dtype`` (default ``dtype``): the live
    teacher's, through ``teachers.from_linen(compute_dtype=...)``.

    ``teacher``: the live teacher's architecture (``resnet34``, or ``resnet50``, the ImageNet
    configs' largest; the student's step reading stored logits is the same either way).

    ``conv`` is the models' convolution (``'xla'`` or ``'onednn'``). XLA's ``cost_analysis()`` does
    not see inside oneDNN's custom calls, so flops are counted for ``conv='xla'`` only (empty dict
    otherwise; the math is the same, so the XLA twin's counts serve).
    """
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    tx = optax.sgd(LR, momentum=0.9)
    student = models.create("resnet18", CLASSES, stem=stem, dtype=dtype, conv=conv, width=width)
    teacher_module = models.create(teacher, CLASSES, stem=stem, dtype=dtype, conv=conv,
                                   width=width)
    t_vars = teacher_module.init(jax.random.PRNGKey(1), jnp.zeros((1, SIZE, SIZE, 3)))
    t_vars, t_sh = train.put_teacher(t_vars, mesh)
    live = teachers.from_linen(teacher_module, compute_dtype=teacher_dtype or dtype)
    apply = train.linen_student(student)
    sample = jnp.zeros((1, SIZE, SIZE, 3))
    batch = sharding.global_batch(make_batch(0, batch_size), mesh)
    # The stored teacher logits, as the logit store would hand them over (float16).
    stored = dict(batch, teacher_logits=jax.jit(lambda v, b: live(v, b).logits.astype(
        jnp.float16))(t_vars, batch))
    kd_recipe = (recipe.ce(1 - ALPHA), recipe.kd(TEMPERATURE, ALPHA))
    specs = {"ce": ((recipe.ce(),), None, {}, batch),
             "kd_precomputed": (kd_recipe, teachers.precomputed(), {}, stored),
             "kd_live": (kd_recipe, live, t_vars, batch)}

    def state_and_step(rec, teacher, tv):
        state, st_sh = train.init_train_state(student, tx, sample, seed=0, mesh=mesh)
        return state, train.make_train_step(apply, tx, rec, teacher, mesh=mesh,
                                            state_shardings=st_sh,
                                            teacher_shardings=t_sh if tv else None,
                                            guard_nonfinite=False)

    runs, flops = {}, {}
    for name, (rec, teacher, tv, b) in specs.items():
        state, step = state_and_step(rec, teacher, tv)
        if conv == "xla":
            flops[name] = flops_of(step, state, tv, b)
        holder = {"state": state}

        def run(step=step, holder=holder, tv=tv, b=b):
            holder["state"], metrics = step(holder["state"], tv, b)
            jax.block_until_ready(metrics)
        runs[name] = run
    if teacher_device and len(jax.devices()) > 1:
        add_logits = teachers.on_devices(live, jax.device_get(t_vars), sharding.make_mesh(
            devices=jax.devices()[1:2]), student_mesh=mesh)
        state, step = state_and_step(kd_recipe, teachers.precomputed(), {})
        holder = {"state": state, "next": add_logits(batch)}

        def run_ahead(step=step, holder=holder):
            current, holder["next"] = holder["next"], add_logits(batch)  # the next batch's teacher
            holder["state"], metrics = step(holder["state"], {}, current)
            jax.block_until_ready((metrics, holder["next"]))
        runs["kd_live_teacher_device"] = run_ahead
    teacher_fwd = jax.jit(lambda v, b: live(v, b).logits)
    if conv == "xla":
        flops["teacher_forward"] = flops_of(teacher_fwd, t_vars, batch)
    runs["teacher_forward"] = lambda: jax.block_until_ready(teacher_fwd(t_vars, batch))
    runs["plain_jax_kd_live"] = plain_jax_kd_step(student, teacher_module, teacher_dtype or dtype,
                                                  tx, t_vars, batch, sharding.replicated(mesh))
    return runs, flops


def plain_jax_kd_step(student, teacher, teacher_dtype, tx, t_vars, batch, placement):
    """The live-KD step written plainly with Flax's ``apply`` and optax (no kdjax.train, recipe or
    teacher wrappers): the same modules, loss, optimizer, donation and device (``placement``, one
    device's sharding); returns a zero-arg callable running one step."""
    teacher = teacher.clone(dtype=teacher_dtype)
    variables = student.init(jax.random.PRNGKey(0), batch["image"][:1])
    state = jax.device_put({"params": variables["params"], "batch_stats": variables["batch_stats"],
                            "opt": tx.init(variables["params"])}, placement)

    def step(state, t_vars, batch):
        t_cast = jax.tree.map(lambda x: x.astype(teacher_dtype), t_vars)
        t_logits, _ = teacher.apply(t_cast, batch["image"].astype(teacher_dtype), train=False)
        t_logits = jax.lax.stop_gradient(t_logits.astype(jnp.float32))

        def loss_fn(params):
            (logits, _), updates = student.apply(
                {"params": params, "batch_stats": state["batch_stats"]}, batch["image"],
                train=True, mutable=["batch_stats"])
            logits = logits.astype(jnp.float32)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
            log_pt = jax.nn.log_softmax(t_logits / TEMPERATURE)
            kd = (jnp.exp(log_pt) * (log_pt - jax.nn.log_softmax(logits / TEMPERATURE))).sum(-1)
            return (1 - ALPHA) * ce + ALPHA * TEMPERATURE ** 2 * kd.mean(), updates
        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        deltas, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], deltas),
                "batch_stats": updates["batch_stats"], "opt": opt}, loss

    jitted = jax.jit(step, donate_argnums=0, out_shardings=placement)
    holder = {"state": state}

    def run():
        holder["state"], loss = jitted(holder["state"], t_vars, batch)
        jax.block_until_ready(loss)
    return run


def torch_variant(stem: str, device: str = "cpu", batch_size: int = 64, width: int = 64,
                  teacher_dtype: str = "float32", student_dtype: str = "float32"):
    """The live-KD step written plainly in PyTorch (same architectures, batch, optimizer), on
    ``device`` (``'cpu'``, or ``'cuda'`` beside JAX on a GPU); the teacher in ``teacher_dtype``,
    the student computing in ``student_dtype`` with float32 parameters (``torch.autocast``, as
    kdjax's ``dtype`` / ``param_dtype``)."""
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count())
    widths = tuple(width * m for m in (1, 2, 4, 8))

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
            self.conv1 = (tnn.Conv2d(3, width, 7, 2, 3, bias=False) if stem == "imagenet"
                          else tnn.Conv2d(3, width, 3, 1, 1, bias=False))
            self.bn1 = tnn.BatchNorm2d(width)
            blocks, cin = [], width
            for i, (n, cout) in enumerate(zip(layers, widths)):
                for j in range(n):
                    blocks.append(Block(cin, cout, 2 if (j == 0 and i > 0) else 1))
                    cin = cout
            self.blocks = tnn.Sequential(*blocks)
            self.fc = tnn.Linear(widths[-1], classes)

        def forward(self, x):
            x = F.relu(self.bn1(self.conv1(x)))
            if stem == "imagenet":
                x = F.max_pool2d(x, 3, 2, 1)
            return self.fc(self.blocks(x).mean((2, 3)))

    torch.manual_seed(0)
    student = ResNet((2, 2, 2, 2), CLASSES).to(device)
    t_dtype = getattr(torch, teacher_dtype)
    teacher = ResNet((3, 4, 6, 3), CLASSES).to(device=device, dtype=t_dtype).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(student.parameters(), lr=LR, momentum=0.9)
    b = make_batch(0, batch_size)
    x = torch.from_numpy(b["image"]).permute(0, 3, 1, 2).contiguous().to(device)
    y = torch.from_numpy(b["label"]).long().to(device)

    def run():
        with torch.no_grad():
            t_logits = teacher(x.to(t_dtype)).float()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=student_dtype == "bfloat16"):
            s_logits = student(x).float()
        kd = F.kl_div(F.log_softmax(s_logits / TEMPERATURE, -1),
                      F.log_softmax(t_logits / TEMPERATURE, -1), log_target=True,
                      reduction="batchmean") * TEMPERATURE ** 2
        loss = (1 - ALPHA) * F.cross_entropy(s_logits, y) + ALPHA * kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
    return run, torch.__version__


def torch_device(backend: str) -> str | None:
    """Where the PyTorch twin runs beside JAX's ``backend``, or None (with a message) if it can't:
    comparing a GPU step with a CPU one would mean nothing."""
    try:
        import torch
    except ImportError:
        print("torch is not installed: skipping vs_pytorch (pip install torch==2.13.0)")
        return None
    if backend == "cpu":
        return "cpu"
    if backend == "gpu" and torch.cuda.is_available():
        return "cuda"
    print(f"torch {torch.__version__} cannot run on this {backend}: skipping vs_pytorch "
          "(on a GPU, install a CUDA build of torch)")
    return None


def measure(runs: dict, rounds: int, warmup: int) -> tuple[dict[str, list], dict[str, list]]:
    """Seconds per call, and minor page faults per call, of each run in each round.

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
    return times, faults


def summarize(times: dict[str, list], faults: dict[str, list], flops: dict[str, float],
              peak: float, batch: int) -> dict:
    """The report: each ratio of :data:`RATIOS` whose variants ran, as the median over rounds of
    the ratio within each round (the variants of a round ran seconds apart, so drift of the
    machine's speed cancels), with its range over rounds and whether it meets :data:`TARGETS`;
    per variant the median seconds, images/s, fraction of ``peak`` (FLOP/s) and page faults."""
    t = {k: statistics.median(v) for k, v in times.items()}
    result, spread = {}, {}
    for key, (num, dens) in RATIOS.items():
        if num in times and all(d in times for d in dens):
            per_round = [times[num][r] / sum(times[d][r] for d in dens)
                         for r in range(len(times[num]))]
            result[key] = statistics.median(per_round)
            spread[key] = [min(per_round), max(per_round)]
    result.update(
        ratio_range_over_rounds=spread,
        targets={k: {"target": v, "met": result[k] <= v} for k, v in TARGETS.items()
                 if k in result},
        seconds=t,
        gflops_per_step={k: v / 1e9 for k, v in flops.items()},
        fraction_of_peak={k: flops[k] / t[k] / peak for k in flops if k in t},
        peak_gflops=peak / 1e9,
        images_per_second={k: batch / v for k, v in t.items()},
        page_faults_per_step={k: statistics.median(v) for k, v in faults.items()})
    return result


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


def write_json(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def measured_matmul_peak(dtype, n: int = 8192) -> float:
    """FLOP/s of an ``n x n`` matmul: the denominator of ``fraction_of_peak``.

    On a GPU, XLA's matmul. On a CPU, the faster of XLA's matmul and NumPy's BLAS (XLA:CPU's own
    dot reaches about half the machine's FMA peak, so it alone would make a oneDNN step read above
    100%)."""
    def rate(f, a, reps=5):
        jax.block_until_ready(f(a))
        t0 = time.perf_counter()
        for _ in range(reps):
            out = f(a)
        jax.block_until_ready(out)
        return reps * 2 * n ** 3 / (time.perf_counter() - t0)

    best = rate(jax.jit(lambda a: a @ a), jnp.ones((n, n), dtype))
    if jax.default_backend() == "cpu" and np.dtype(dtype) == np.float32:
        best = max(best, rate(lambda a: a @ a, np.ones((n, n), np.float32)))
    return best


def cpu_description() -> dict:
    """The CPU's model name and its vector ISA flags (AVX2, AVX-512*, AMX*) from /proc/cpuinfo."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return {"model": platform.processor() or platform.machine(), "isa": []}
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                  if line.startswith("model name")), platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines()
                  if line.startswith("flags")), [])
    isa = sorted(f for f in set(flags) if f in ("avx2", "fma") or f.startswith(("avx512", "amx")))
    return {"model": model, "isa": isa}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-gflops", type=float, default=333.0,
                        help="f32 peak of this CPU (2 cores x 2.6 GHz x 64 FLOP/cycle); "
                             "ignored where the peak is measured (GPUs, --measure-peak)")
    parser.add_argument("--measure-peak", type=int, nargs="?", const=8192, metavar="N",
                        help="measure the peak with an N x N matmul (default 8192; always so on "
                             "a GPU) instead of taking --peak-gflops")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype of the student (and of the teacher, by default)")
    parser.add_argument("--teacher-dtype", choices=("float32", "bfloat16"),
                        help="compute dtype of the live teacher (default: --dtype), in both "
                             "frameworks")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=64,
                        help="stem channels of both ResNets (stages: x1, x2, x4, x8)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    parser.add_argument("--teacher", choices=("resnet34", "resnet50"), default="resnet34",
                        help="the live teacher (the PyTorch twin has resnet34 only: with resnet50 "
                             "it is skipped)")
    parser.add_argument("--stem", choices=("cifar", "imagenet"), default="cifar",
                        help="ResNet stem: cifar (3x3/1, no pool) or imagenet (7x7/2 + max-pool)")
    parser.add_argument("--conv", choices=("auto", "xla", "onednn"), default="auto",
                        help="the models' convolution; auto: oneDNN on CPU when it can be built "
                             "(DNNL_ROOT picks the oneDNN: docs/kernels.md), else XLA's")
    parser.add_argument("--profile", metavar="DIR",
                        help="after timing, write a jax.profiler trace of one call of each JAX "
                             "variant to DIR (TensorBoard's profile plugin or ui.perfetto.dev)")
    parser.add_argument("--allocator", choices=("auto", "tcmalloc", "system"), default="auto",
                        help="auto: restart with tcmalloc preloaded when it is installed (see above)")
    args = parser.parse_args(argv)
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        # A second CPU device for kd_live_teacher_device (read when JAX starts its runtime).
        os.environ["XLA_FLAGS"] = " ".join(filter(None, (
            os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=2")))
    preload_tcmalloc_or_continue(args.allocator)  # before JAX starts its runtime

    dtype = jnp.dtype(args.dtype)
    teacher_dtype = args.teacher_dtype or args.dtype
    backend = jax.default_backend()
    conv = args.conv
    if conv == "auto":
        conv = "onednn" if backend == "cpu" and onednn.available() else "xla"
    setup = (args.batch, args.width, jnp.dtype(teacher_dtype))
    runs, flops = jax_variants(dtype, args.stem, "xla", *setup, teacher_device=conv == "xla",
                               teacher=args.teacher)
    if conv == "onednn":  # XLA's flop counts serve (same math); keep XLA's live step beside it
        runs = dict(jax_variants(dtype, args.stem, "onednn", *setup, teacher_device=True,
                                 teacher=args.teacher)[0],
                    kd_live_xla_conv=runs["kd_live"])
        flops["kd_live_xla_conv"] = flops["kd_live"]
    torch_version = None
    device = None if args.no_torch or args.teacher != "resnet34" else torch_device(backend)
    if device is not None:
        runs["torch_kd_live"], torch_version = torch_variant(args.stem, device, args.batch,
                                                             args.width, teacher_dtype, args.dtype)
    times, faults = measure(runs, args.rounds, args.warmup)
    if args.profile:
        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
            for name in flops:
                with jax.profiler.TraceAnnotation(name):
                    runs[name]()

    if backend == "gpu" or args.measure_peak:
        peak = measured_matmul_peak(dtype, args.measure_peak or 8192)
    else:
        peak = args.peak_gflops * 1e9
    result = summarize(times, faults, flops, peak, args.batch)
    result.update(
        conv=conv, teacher=args.teacher, onednn=(f"{onednn.version()} ({build.find_onednn().origin})" if conv == "onednn"
                           else None), peak_measured=backend == "gpu" or bool(args.measure_peak),
        backend=backend, device_kind=jax.devices()[0].device_kind, devices=jax.device_count(),
        jax=jax.__version__, torch=torch_version, torch_device=device, dtype=args.dtype,
        teacher_dtype=teacher_dtype,
        stem=args.stem, width=args.width, machine=platform.processor() or platform.machine(),
        cpu=cpu_description(),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
        ld_preload=os.environ.get("LD_PRELOAD", ""), batch=args.batch, rounds=args.rounds)
    print(f"{'conv':>22}: {conv}" + (f", oneDNN {result['onednn']}" if result["onednn"] else ""))
    print(f"{'LD_PRELOAD':>22}: {result['ld_preload'] or '(none: glibc malloc)'}")
    for key, (lo, hi) in result["ratio_range_over_rounds"].items():
        target = result["targets"].get(key)
        verdict = (f"  target <= {target['target']:.2f}: {'met' if target['met'] else 'NOT met'}"
                   if target else "")
        print(f"{key:>22}: {result[key]:.3f}  (rounds {lo:.3f}-{hi:.3f}){verdict}")
    t = result["seconds"]
    for k in t:
        frac = result["fraction_of_peak"].get(k)
        print(f"{k:>22}: {1e3 * t[k]:8.1f} ms  {args.batch / t[k]:7.1f} img/s"
              + (f"  {100 * frac:5.1f}% of peak" if frac is not None else "")
              + f"  {result['page_faults_per_step'][k]:8.0f} page faults")
    how = "measured" if result["peak_measured"] else "given"
    print(f"{'peak':>22}: {peak / 1e9:.0f} GFLOP/s ({how})")
    print(f"{'cpu':>22}: {result['cpu']['model']} ({' '.join(result['cpu']['isa'])})")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
