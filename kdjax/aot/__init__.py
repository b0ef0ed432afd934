"""Ahead-of-time compilation for TPU slices without a TPU: will a program fit, what will it cost.

``libtpu`` (the ``jax[tpu]`` wheel's runtime, Python 3.12 here) describes real TPU slices to
``jax.experimental.topologies``; a program lowered with shardings over those devices compiles on
any CPU host (``jit(f).lower(*abstract_args).compile()``), nothing allocated. This package

* names the slices (:mod:`kdjax.aot.topology`: Cloud TPU accelerator types such as ``v5p-64`` or
  ``v5litepod-16``, libtpu's ``v5e:4x4``, multi-slice) and their chips (:mod:`kdjax.aot.chips`:
  HBM, peak FLOP/s and HBM bandwidth per device, with sources);
* compiles a jitted program for them and reads the compiled program back
  (:mod:`kdjax.aot.analysis`: per-device memory against HBM, FLOPs and bytes per call, the
  collectives in the compiled HLO, a roofline time), refusing programs that still hold a CPU-only
  custom call (kdjax's oneDNN convolution).

``python -m experiments.compile_check`` applies it to every program of an experiment config.
"""

from kdjax.aot.analysis import (HostCustomCallError, ProgramReport, collectives, compile_program,
                                cpu_custom_calls)
from kdjax.aot.chips import CHIPS, Chip
from kdjax.aot.topology import Slice, parse_slice, slice_devices

__all__ = ["CHIPS", "Chip", "HostCustomCallError", "ProgramReport", "Slice", "collectives",
           "compile_program", "cpu_custom_calls", "parse_slice", "slice_devices"]
