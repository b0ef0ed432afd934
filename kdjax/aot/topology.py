"""TPU slices by name, and their devices from libtpu without a TPU.

Names (:func:`parse_slice`):

* Cloud TPU accelerator types: ``v2-8``, ``v3-32``, ``v4-32``, ``v5p-64`` (the number counts
  TensorCores, two per chip), ``v5litepod-16`` / ``v5e-16`` and ``v6e-8`` (the number counts
  chips);
* libtpu's topologies, chips along each axis: ``v5e:4x4``, ``v4:2x2x4``, ``v5p:2x4x4``.

An accelerator type's chips are laid out as Cloud TPU lays them out: 2-D generations (v2, v3,
v5e, v6e) ``1x1, 2x2, 2x4, 4x4, 4x8, 8x8, ...``; 3-D ones (v4, v5p) ``2x2x1, 2x2x2, 2x2x4, 2x4x4,
4x4x4, ...``. v4 and v5p are described as megacore chips (one JAX device each, as on their TPU
VMs); an 8-chip v5e or v6e slice is one host with 8 chips, larger ones hosts of 4 chips.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from kdjax.aot.chips import CHIPS, Chip

#: Generations whose accelerator-type number counts TensorCores (two per chip).
_CORE_COUNTED = ("v2", "v3", "v4", "v5p")
_THREE_D = ("v4", "v5p")
_ALIASES = {"v5litepod": "v5e"}


@dataclasses.dataclass(frozen=True)
class Slice:
    """One slice: its chip, libtpu topology name (``'v5e:4x4'``) and chip count."""
    name: str
    chip: Chip
    topology: str
    num_chips: int

    @property
    def num_devices(self) -> int:
        return self.num_chips * self.chip.devices_per_chip

    @property
    def accelerator_type(self) -> str:
        """Cloud TPU's name for this slice: ``'v5litepod-16'``, ``'v4-32'``."""
        gen = {"v5e": "v5litepod"}.get(self.chip.name, self.chip.name)
        per = 2 if self.chip.name in _CORE_COUNTED else 1
        return f"{gen}-{self.num_chips * per}"


def _bounds(num_chips: int, three_d: bool) -> list[int]:
    """Chips per axis: double the smallest axis (the last of equals) until ``num_chips``."""
    dims = [2, 2, 1] if three_d else [1, 1]
    if three_d and num_chips < 4:
        raise ValueError(f"{num_chips} chips: v4 / v5p slices have 4 chips or more")
    while math.prod(dims) < num_chips:
        smallest = min(dims)
        dims[max(i for i, d in enumerate(dims) if d == smallest)] *= 2
    if math.prod(dims) != num_chips:
        raise ValueError(f"{num_chips} chips is not a slice size (a power of two)")
    return dims


def parse_slice(name: str) -> Slice:
    """The :class:`Slice` an accelerator type or libtpu topology names (module docstring);
    ValueError with the accepted forms otherwise."""
    forms = ("an accelerator type such as v5litepod-16, v5e-16, v4-32, v5p-64, v6e-8, v2-8, or a "
             "libtpu topology such as v5e:4x4, v4:2x2x4")
    m = re.fullmatch(r"(v2|v3|v4|v5p|v5e|v5litepod|v6e)(?:-(\d+)|:(\d+(?:x\d+){1,2}))", name.strip())
    if not m:
        raise ValueError(f"unknown TPU slice {name!r}; use {forms}.")
    gen = _ALIASES.get(m[1], m[1])
    chip = CHIPS[gen]
    if m[2]:
        count = int(m[2])
        per_chip = 2 if gen in _CORE_COUNTED else 1
        if count % per_chip:
            raise ValueError(f"{name}: {gen} accelerator types count TensorCores, two per chip; "
                             f"use an even number (e.g. {gen}-8).")
        try:
            dims = _bounds(count // per_chip, gen in _THREE_D)
        except ValueError as e:
            raise ValueError(f"{name}: {e}; use {forms}.") from None
    else:
        dims = [int(d) for d in m[3].split("x")]
        if len(dims) != (3 if gen in _THREE_D else 2):
            raise ValueError(f"{name}: {gen} topologies have {3 if gen in _THREE_D else 2} axes "
                             f"(e.g. {'v4:2x2x4' if gen in _THREE_D else 'v5e:4x4'}).")
    topology = f"{gen}:" + "x".join(map(str, dims))
    return Slice(name=name, chip=chip, topology=topology, num_chips=math.prod(dims))


def slice_devices(spec: Slice, num_slices: int = 1) -> list:
    """The devices of ``num_slices`` copies of ``spec`` as libtpu describes them (no TPU needed):
    targets for ahead-of-time compilation. Each device has ``process_index`` (its host) and, with
    several slices, ``slice_index``.

    Raises RuntimeError naming the install command when libtpu is missing (it needs Python 3.12).
    """
    # Only a description is loaded, no chip is opened: libtpu need not ask the GCE metadata server
    # what machine this is, nor hold its one-process lock (parallel test workers, a training run).
    # Nor warn that this host is no TPU VM (these describe the local host, never the slice).
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", spec.accelerator_type)
    from jax.experimental import topologies

    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1; got {num_slices}.")
    kwargs = {}
    if spec.chip.name in _THREE_D:
        kwargs["chip_config_name"] = "megacore"
    if spec.chip.name in ("v5e", "v6e") and spec.num_chips == 8:
        kwargs["chips_per_host_bounds"] = (2, 4, 1)  # v5litepod-8 / v6e-8: one host, 8 chips
    if num_slices > 1:
        kwargs["num_slices"] = num_slices
    try:
        desc = topologies.get_topology_desc(topology_name=spec.topology, platform="tpu", **kwargs)
    except Exception as e:  # libtpu missing or refusing the name
        if "tpu" in str(e).lower() and ("unknown backend" in str(e).lower()
                                        or "not found" in str(e).lower()
                                        or "no module" in str(e).lower()):
            raise RuntimeError(
                f"compiling for {spec.name} needs libtpu, which describes TPU slices without a "
                f"TPU: pip install -e '.[tpu]' (Python 3.12; the pin jax[tpu] uses). ({e})") from None
        raise
    return list(desc.devices)
