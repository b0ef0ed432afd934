"""Compile a jitted program for TPU devices ahead of time and read back what it will cost.

Per device (the compiled program is the per-device SPMD program):

* memory, from ``compiled.memory_analysis()``: arguments, outputs, aliased (donated arguments
  reused as outputs), temporaries and the generated code; ``total = arguments + outputs - aliased
  + temporaries + code`` is what the program needs in HBM at its peak;
* ``flops`` and ``bytes_accessed`` per call, from ``compiled.cost_analysis()`` (XLA's own count);
* when the TPU compiler itself refuses the program (temporaries beyond the HBM it can use, a
  little below the chip's), a report that does not fit, with the temporaries it asked for;
* the collectives of the compiled HLO (:func:`collectives`): kind, count, bytes of their results;
* a roofline time per call, ``max(flops / peak FLOP/s, bytes_accessed / HBM bandwidth)``: an
  **estimate** (a lower bound that ignores collectives' latency and imperfect overlap).
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import jax

from kdjax.aot.chips import Chip, GiB
from kdjax.kernels import onednn

#: HLO collective ops (their ``-start``/``-done`` halves are counted once).
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
          "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+(" + "|".join(COLLECTIVES)
                 + r")(-start|-done)?\(", re.M)
_OOM = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM")
_UNITS = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


class HostCustomCallError(ValueError):
    """A program compiled for TPU still holds a custom call that only a CPU runs."""


def _shape_bytes(shape: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype.startswith("f8") or dtype in ("s4", "u4"):
            size = 1
        else:
            size = _BYTES.get(dtype, 0)
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += size * n
    return total


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """``{kind: {'count', 'bytes'}}`` of the collectives in compiled HLO text: each synchronous op
    or async ``-start`` counts once; bytes are its result's (an async op's, from its ``-done``)."""
    out: dict[str, dict[str, int]] = {}
    for shape, kind, half in _OP.findall(hlo_text):
        entry = out.setdefault(kind, {"count": 0, "bytes": 0})
        if half != "-done":
            entry["count"] += 1
        if half != "-start":
            entry["bytes"] += _shape_bytes(shape)
    return out


def cpu_custom_calls(lowered) -> list[str]:
    """The custom calls of a lowered program that only a CPU runs: kdjax's oneDNN convolution
    (its FFI targets, or the custom-partitioning calls under its name scope
    :data:`kdjax.kernels.onednn.SCOPE`)."""
    text = lowered.as_text(debug_info=True)
    locs = dict(re.findall(r"^(#loc\d*) = (.*)$", text, re.M))
    targets = {t for t, _ in onednn.TARGETS.values()}
    found = []
    for line in text.splitlines():
        call = re.search(r"stablehlo\.custom_call @([\w.$-]+)", line)
        if not call:
            continue
        ref = re.search(r"loc\((#loc\d*)\)\s*$", line)
        where = line + (locs.get(ref[1], "") if ref else "")
        if call[1] in targets or onednn.SCOPE in where:
            found.append(call[1])
    return found


def check_no_cpu_custom_calls(lowered, name: str) -> None:
    """Raises :class:`HostCustomCallError` naming ``name`` if :func:`cpu_custom_calls` finds any."""
    found = cpu_custom_calls(lowered)
    if found:
        raise HostCustomCallError(
            f"{name}: the TPU program still contains {len(found)} CPU-only custom call(s) "
            f"({sorted(set(found))}: kdjax's oneDNN convolution). Trace it for the TPU "
            f"(kdjax.kernels.onednn.lowering_for('tpu'), as compile_program does) with a freshly "
            f"jitted function, or build the model with conv='xla'.")


@dataclasses.dataclass
class ProgramReport:
    """What one compiled program costs per device (module docstring)."""
    name: str
    chip: Chip
    num_devices: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    flops: float
    bytes_accessed: float
    collectives: dict[str, dict[str, int]]
    compile_seconds: float
    input_bytes: list[int] = dataclasses.field(default_factory=list)  # per positional argument
    compiler_oom: str = ""  # the TPU compiler's refusal: temporaries beyond the usable HBM


    @property
    def total_bytes(self) -> int:
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.code_bytes)

    @property
    def fits(self) -> bool:
        return not self.compiler_oom and self.total_bytes <= self.chip.hbm_bytes

    @property
    def roofline_seconds(self) -> float:
        """Estimated time per call: the larger of compute and HBM-traffic time."""
        return max(self.flops / self.chip.peak_flops, self.bytes_accessed / self.chip.hbm_bandwidth)

    @property
    def bound(self) -> str:
        compute = self.flops / self.chip.peak_flops
        return "compute" if compute >= self.bytes_accessed / self.chip.hbm_bandwidth else "HBM"

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "chip"}
        out.update(chip=self.chip.name, total_bytes=self.total_bytes, hbm_bytes=self.chip.hbm_bytes,
                   fits=self.fits, roofline_seconds=self.roofline_seconds, bound=self.bound)
        return out


def compile_program(name: str, fn, *args, chip: Chip) -> ProgramReport:
    """Lowers ``fn`` (a ``jax.jit``-ed function whose shardings, or ``args``' ``ShapeDtypeStruct``
    shardings, name TPU devices) for the TPU, refuses CPU-only custom calls, compiles it and
    reads back its :class:`ProgramReport`. ``fn`` must be freshly jitted: JAX reuses a trace it
    made for another platform."""
    with onednn.lowering_for("tpu"):
        lowered = fn.lower(*args)
    check_no_cpu_custom_calls(lowered, name)
    inputs = [device_bytes(a) for a in args]
    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # the TPU compiler refuses temporaries beyond the usable HBM
        oom = _OOM.search(str(e))
        if oom is None:
            raise
        return ProgramReport(
            name=name, chip=chip, num_devices=len(jax.tree.leaves(args)[0].sharding.device_set),
            argument_bytes=sum(inputs), output_bytes=0, alias_bytes=0,
            temp_bytes=int(float(oom[1]) * _UNITS[oom[2]]), code_bytes=0, flops=0.0,
            bytes_accessed=0.0, collectives={}, compile_seconds=time.perf_counter() - start,
            input_bytes=inputs, compiler_oom=" ".join(str(e).split("\n")[0].split()))
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list on older jax
    devices = len(jax.tree.leaves(compiled.input_shardings)[0].device_set)
    return ProgramReport(
        name=name, chip=chip, num_devices=devices,
        argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
        code_bytes=int(mem.generated_code_size_in_bytes), flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        collectives=collectives(compiled.as_text()), compile_seconds=seconds,
        input_bytes=inputs)


def device_bytes(tree) -> int:
    """Bytes one device holds of ``tree`` (``ShapeDtypeStruct``s with shardings, or arrays): each
    leaf's shard shape (its largest shard) times its item size."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = tuple(leaf.shape)
        shard = leaf.sharding.shard_shape(shape) if getattr(leaf, "sharding", None) else shape
        n = 1
        for d in shard:
            n *= int(d)
        total += n * jax.numpy.dtype(leaf.dtype).itemsize
    return total
