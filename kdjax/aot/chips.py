"""TPU chips: per-device HBM, peak FLOP/s and HBM bandwidth, with the source of each figure.

A *device* is what JAX sees: one chip on v4, v5e, v5p and v6e (v4 and v5p as "megacore": both
TensorCores of a chip form one device), one TensorCore on v2 and v3 (two devices per chip, each
with half the chip's HBM and FLOP/s). ``peak_flops`` is the dense bfloat16 matrix-unit peak. On a
TPU, float32 matmuls and convolutions at JAX's default precision also run as bfloat16 passes on
the matrix units, so the roofline uses the same peak for a float32 program (at
``precision=HIGHEST`` they take several passes: the estimate is then optimistic).
"""

from __future__ import annotations

import dataclasses

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation, per JAX device (see the module docstring)."""
    name: str              # kdjax's short name: 'v5e'
    device_kind: str       # jax.Device.device_kind of its devices: 'TPU v5 lite'
    hbm_bytes: int         # HBM per device
    peak_flops: float      # dense bfloat16 FLOP/s per device
    hbm_bandwidth: float   # HBM bytes/s per device
    devices_per_chip: int
    source: str


_CLOUD = "Cloud TPU documentation, system architecture page of {}: per-chip HBM, bandwidth, bf16 peak"
_PAPER = ("Jouppi et al., 'A domain-specific supercomputer for training deep neural networks', "
          "CACM 63(7), 2020, Table 3 (per chip: {}); halved per TensorCore")

CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("v2", "TPU v2", 8 * GiB, 23e12, 350e9, 2, _PAPER.format("16 GiB, 46 TFLOP/s, 700 GB/s")),
    Chip("v3", "TPU v3", 16 * GiB, 61.5e12, 450e9, 2,
         _PAPER.format("32 GiB, 123 TFLOP/s, 900 GB/s")),
    Chip("v4", "TPU v4", 32 * GiB, 275e12, 1200e9, 1, _CLOUD.format("TPU v4")),
    Chip("v5e", "TPU v5 lite", 16 * GiB, 197e12, 819e9, 1, _CLOUD.format("TPU v5e")),
    Chip("v5p", "TPU v5", 95 * GiB, 459e12, 2765e9, 1, _CLOUD.format("TPU v5p")),
    Chip("v6e", "TPU v6 lite", 32 * GiB, 918e12, 1640e9, 1, _CLOUD.format("TPU v6e (Trillium)")),
)}


def chip_of(device_kind: str) -> Chip:
    """The :class:`Chip` whose devices report ``device_kind``; ValueError naming the known ones."""
    for chip in CHIPS.values():
        if chip.device_kind == device_kind:
            return chip
    raise ValueError(f"no chip figures for device kind {device_kind!r}; kdjax.aot.chips knows "
                     f"{sorted(c.device_kind for c in CHIPS.values())}.")
