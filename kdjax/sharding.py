"""Device meshes and partition rules for the student, the teacher and the batch.

kdjax uses one 2-D mesh with axes ``('data', 'fsdp')``:

* the batch is split over **both** axes (every device sees ``global_batch / num_devices`` rows);
* parameters are either replicated (pure data parallelism) or, FSDP/ZeRO-3 style, split along one
  dimension over the ``'fsdp'`` axis and all-gathered by XLA where a layer needs them.

The rules below look only at a leaf's shape, so the optimizer state (whose leaves mirror the
parameters) gets the same sharding as the parameters without a separate rule, and the teacher can use
a different mode than the student (e.g. an FSDP-sharded teacher with a replicated student).

This is the ``pjit`` model: shardings are explicit ``NamedSharding``s given to ``jax.jit`` and XLA's
GSPMD partitioner inserts the collectives. The mesh's axes are ``AxisType.Auto`` for that reason.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P, Sharding

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)
ParamMode = Literal["replicate", "fsdp"]


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A ``('data', 'fsdp')`` mesh over ``devices`` (default: every device of every process).

    ``data=-1`` takes all devices not used by ``fsdp``. The product must equal the device count.
    Devices of several TPU slices (``slice_index``; multi-slice over the data-centre network) are
    laid out so that the data axis spans the slices and each fsdp group stays within one:
    ``data`` must then be a multiple of the slice count.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"fsdp={fsdp} must be a positive divisor of the device count {n}.")
    if data == -1:
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but {n} are available; "
            f"pass data=-1 to use all of them.")
    slices = sorted({getattr(d, "slice_index", 0) or 0 for d in devices})
    if len(slices) == 1:
        return jax.make_mesh((data, fsdp), (DATA, FSDP), (AxisType.Auto, AxisType.Auto),
                             devices=devices)
    # Multi-slice (several TPU slices over the data-centre network): the data axis spans the
    # slices, so only the gradient all-reduce crosses between them; fsdp stays within a slice.
    if data % len(slices):
        raise ValueError(f"mesh data={data} must be a multiple of the {len(slices)} slices the "
                         f"devices come from (the data axis spans the slices).")
    from jax.experimental import mesh_utils

    grid = mesh_utils.create_hybrid_device_mesh((data // len(slices), fsdp), (len(slices), 1),
                                                devices)
    return Mesh(grid, (DATA, FSDP), axis_types=(AxisType.Auto, AxisType.Auto))


def check_mesh(mesh: Mesh) -> Mesh:
    """``mesh``, or ValueError unless its axes are ``('data', 'fsdp')`` (what every rule here
    names)."""
    if tuple(mesh.axis_names) != BATCH_AXES:
        raise ValueError(f"kdjax needs a mesh with axes {BATCH_AXES}; this one has "
                         f"{tuple(mesh.axis_names)}. Build it with kdjax.sharding.make_mesh("
                         f"data=..., fsdp=..., devices=...).")
    return mesh


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh; other axes whole."""
    return NamedSharding(check_mesh(mesh), P(BATCH_AXES))


def leaf_spec(shape: tuple[int, ...], mesh: Mesh, mode: ParamMode,
              min_size: int = 2 ** 14) -> P:
    """PartitionSpec for one parameter-like leaf.

    ``fsdp`` mode shards the largest dimension divisible by the fsdp axis size, for leaves with at
    least ``min_size`` elements (small leaves such as biases and BatchNorm scales stay replicated:
    gathering them costs more than it saves).
    """
    if mode not in ("replicate", "fsdp"):
        raise ValueError(f"unknown sharding mode {mode!r}; use 'replicate' or 'fsdp'.")
    n = check_mesh(mesh).shape[FSDP]
    if mode == "replicate" or n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % n == 0:
            return P(*([None] * dim + [FSDP]))
    return P()


def tree_shardings(tree: Any, mesh: Mesh, mode: ParamMode = "replicate",
                   min_size: int = 2 ** 14) -> Any:
    """A pytree of ``NamedSharding`` matching ``tree`` (arrays or ``ShapeDtypeStruct``s)."""
    return jax.tree.map(
        lambda x: NamedSharding(mesh, leaf_spec(tuple(x.shape), mesh, mode, min_size)), tree)


def with_shardings(shapes: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct``s of ``shapes`` (arrays or structs) carrying ``shardings`` (one
    ``Sharding`` for all leaves or a matching tree): abstract arguments for ``jit(...).lower``."""
    if isinstance(shardings, Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings),
                            shapes)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, shardings)


def _device_dtype(key: str, local: np.ndarray) -> np.ndarray:
    """Cast to the dtype JAX will use (int64 -> int32 without x64), refusing values that don't fit."""
    target = jax.dtypes.canonicalize_dtype(local.dtype)
    if target == local.dtype:
        return local
    if np.issubdtype(local.dtype, np.integer) and local.size:
        info = np.iinfo(target)
        if local.min() < info.min or local.max() > info.max:
            raise ValueError(
                f"batch[{key!r}] has values in [{local.min()}, {local.max()}] that do not fit "
                f"{target} (jax_enable_x64 is off); enable x64 or keep this key on the host.")
    return local.astype(target)


def to_global(local_batch: Mapping[str, Any], shardings: Sharding | Mapping[str, Sharding],
              ) -> dict[str, jax.Array]:
    """Assemble each process's rows of every batch key into one global array.

    Every process passes its own ``[B_local, ...]`` rows; the result is ``[B_local * P, ...]``
    (``P`` processes), laid out in process order, with ``shardings`` (one for all keys, or one
    per key). Works unchanged on one process.
    """
    out = {}
    for key, value in local_batch.items():
        if isinstance(shardings, Mapping):
            if key not in shardings:
                raise ValueError(
                    f"the sharding dict has no entry for batch key {key!r} (keys: "
                    f"{sorted(shardings)}); give one Sharding for all keys or one per key.")
            target = shardings[key]
        else:
            target = shardings
        out[key] = jax.make_array_from_process_local_data(
            target, _device_dtype(key, np.asarray(value)))
    return out


def global_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """:func:`to_global` with every key split over the mesh's batch axes."""
    return to_global(local_batch, batch_sharding(mesh))
