"""Frozen teachers: live (a model run in inference mode inside the step) or precomputed (a store).

A teacher is a pure function ``teacher.fn(teacher_variables, batch) -> TeacherOutput`` and is
never differentiated: the train step calls it outside ``jax.value_and_grad`` and every output
passes through ``jax.lax.stop_gradient``. Teacher variables are an *input* of the step, never an
output, and never part of the optimizer state, so they cannot change.

Constructors:

* :func:`from_linen` - a Flax Linen module returning ``logits`` or ``(logits, features)``;
  run with ``train=False`` (BatchNorm running averages, no dropout).
* :func:`from_nnx` - a Flax NNX module, put in eval mode, split into ``(graphdef, state)``; what it
  sows as ``nnx.Intermediate`` joins its features (:func:`nnx_forward`).
* :func:`from_apply_fn` - any ``apply_fn(variables, x) -> logits | (logits, features)``.
* :func:`precomputed` - logits that :mod:`kdjax.logit_store` added to the batch on the host
  (``teacher_logits [B, C]`` or ``teacher_topk_values/indices [B, k]``), or that
  :func:`on_devices` computed on the teacher's own devices ahead of the student's step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from kdjax import sharding


class TeacherOutput(NamedTuple):
    """What a teacher gives the losses. Absent parts are ``None``.

    logits: ``[B, C]`` full logits. topk_values / topk_indices: ``[B, k]`` (precomputed top-k).
    features: dict of named feature maps (live teachers with taps).
    """
    logits: jax.Array | None = None
    features: Mapping[str, jax.Array] | None = None
    topk_values: jax.Array | None = None
    topk_indices: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Teacher:
    """``fn(variables, batch) -> TeacherOutput``; ``live`` tells whether it runs a model."""
    fn: Callable[[Any, Mapping[str, jax.Array]], TeacherOutput]
    live: bool

    def __call__(self, variables, batch) -> TeacherOutput:
        out = self.fn(variables, batch)
        return jax.tree.map(jax.lax.stop_gradient, out)


def _cast_floats(tree, dtype):
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _as_output(out) -> TeacherOutput:
    if isinstance(out, tuple) and len(out) == 2:
        logits, features = out
    else:
        logits, features = out, None
    return TeacherOutput(logits=logits.astype(jnp.float32), features=features)


def from_apply_fn(apply_fn: Callable, *, compute_dtype=None, input_key: str = "image") -> Teacher:
    """A live teacher from ``apply_fn(variables, x) -> logits | (logits, features)``.

    ``compute_dtype`` (e.g. ``jnp.bfloat16``) casts the variables and the input before the call;
    logits come back as float32 either way.
    """
    def fn(variables, batch):
        if input_key not in batch:
            raise ValueError(f"the teacher reads batch[{input_key!r}] but the batch has keys "
                             f"{sorted(batch)}; pass input_key= to teachers.from_linen / "
                             f"from_nnx / from_apply_fn (it is separate from the step's).")
        x = batch[input_key]
        if compute_dtype is not None:
            variables, x = _cast_floats(variables, compute_dtype), x.astype(compute_dtype)
        return _as_output(apply_fn(variables, x))
    return Teacher(fn=fn, live=True)


def from_linen(module, **kwargs) -> Teacher:
    """A live teacher from a Linen module, applied with ``train=False`` (inference mode).

    ``compute_dtype`` also becomes the module's ``dtype`` when it has that field (kdjax's models,
    Flax's layers: their compute dtype), so that its convolutions and matmuls really run in it:
    casting the inputs alone would be undone by a float32 module promoting them back. On CPUs with
    AVX512-BF16 or AMX, a bfloat16 teacher built with ``conv='onednn'`` runs its convolutions on
    oneDNN's bfloat16 kernels (:mod:`kdjax.kernels.onednn`); elsewhere on XLA's.
    """
    compute_dtype = kwargs.get("compute_dtype")
    if compute_dtype is not None and "dtype" in {f.name for f in dataclasses.fields(module)}:
        module = module.clone(dtype=compute_dtype)
    return from_apply_fn(lambda variables, x: module.apply(variables, x, train=False), **kwargs)


def nnx_forward(module, x: jax.Array):
    """Calls Flax NNX ``module`` on ``x``, adding what it sows to its feature taps.

    A value sown with ``self.sow(nnx.Intermediate, name, value)`` (captured by ``nnx.capture``)
    becomes the feature ``'<path>/<name>'`` (the sowing submodule's attribute path: ``'stage1'``
    from the top module, ``'block1/out'`` from ``self.block1``); a name sown more than once keeps
    its last value (``sow``'s default tuple of values; with a custom ``reduce_fn`` the reduced
    value); features the module returns win over sown ones of the same name. Returns what the
    module returns when it sows nothing, else ``(logits, features)``.
    """
    from flax import nnx
    from flax.traverse_util import flatten_dict

    out, sown = nnx.capture(module, nnx.Intermediate)(x)
    taps = {"/".join(map(str, path)): value[-1] if isinstance(value, tuple) else value
            for path, value in flatten_dict(nnx.to_pure_dict(sown)).items()}
    if not taps:
        return out
    logits, features = out if isinstance(out, tuple) else (out, {})
    return logits, {**taps, **features}


def from_nnx(model, **kwargs) -> tuple[Teacher, Any]:
    """A live teacher from a Flax NNX module: returns ``(teacher, variables)``.

    The module is switched to eval mode (``model.eval()``: running BatchNorm averages, dropout
    off) and split into a static graph definition and a state pytree; the state is what the train
    step receives as ``teacher_variables`` (and what sharding rules apply to).
    """
    from flax import nnx

    model.eval()
    graphdef, state = nnx.split(model)

    def apply_fn(state, x):
        return nnx_forward(nnx.merge(graphdef, state), x)
    return from_apply_fn(apply_fn, **kwargs), state


def on_devices(teacher: Teacher, variables: Any, mesh: Mesh, *, student_mesh: Mesh,
               mode: sharding.ParamMode = "replicate", min_size: int = 2 ** 14,
               ) -> Callable[[dict], dict]:
    """A live teacher on devices of its own, computing each batch's logits ahead of the student.

    Returns ``add_logits(batch) -> batch`` for global batches on ``student_mesh`` (use it as
    ``kdjax.data.prefetch_to_device(..., device_fn=add_logits)`` or ``fit(teacher_mesh=...)``): it
    copies the batch to ``mesh``, runs ``teacher`` there on ``variables`` (placed on ``mesh`` once,
    replicated, or with ``mode='fsdp'`` its leaves of ``min_size`` elements or more split over the
    mesh's ``fsdp`` axis: :func:`kdjax.sharding.leaf_spec`) and adds ``teacher_logits [B, C]`` (float32, the
    student's batch sharding), which the student's step reads through :func:`precomputed`. Calls
    only dispatch work, so when batches are prepared ahead (prefetch) the teacher computes the
    next batch while the student's step runs on its own devices. The logits are the in-step
    teacher's (the same program on other devices; equal to float32 rounding, tested); features
    (hint terms) need the teacher inside the step. The batch size must divide by both meshes'
    device counts. The teacher is traced in the thread that calls ``add_logits`` (prefetch's), so
    JAX settings made with context managers in the caller's thread (``jax.default_matmul_precision``
    and the like) do not reach it; set them with ``jax.config.update``.

    On a CPU this overlaps the two on the same cores: with
    ``XLA_FLAGS=--xla_force_host_platform_device_count=2``, the student on CPU device 0 and the
    teacher on device 1 (``benchmarks/step_overhead.py``: ``live_teacher_device_overhead``).
    One process only: ``mesh`` and ``student_mesh`` must hold this process's devices.
    """
    if not teacher.live:
        raise ValueError("on_devices needs a live teacher (teachers.from_linen / from_nnx / "
                         "from_apply_fn); precomputed outputs already come with the batch.")
    local = set(jax.local_devices())
    for name, m in (("mesh", mesh), ("student_mesh", student_mesh)):
        if not set(m.devices.flat) <= local:
            raise ValueError(
                f"on_devices: {name} holds devices of other processes; a teacher on its own "
                f"devices runs within one process. On several hosts run the teacher inside the "
                f"step (FSDP-shard it with teacher_mode='fsdp' if it is large).")
    forward, shardings = logits_program(teacher, variables, mesh, mode, min_size)
    variables = jax.device_put(variables, shardings)
    on_teacher, on_student = sharding.batch_sharding(mesh), sharding.batch_sharding(student_mesh)

    def add_logits(batch: dict) -> dict:
        rows = next(iter(batch.values())).shape[0]
        if rows % mesh.devices.size:
            raise ValueError(
                f"on_devices: a batch of {rows} rows does not split over the teacher's "
                f"{mesh.devices.size} devices; use a batch size that both the teacher's and the "
                f"student's device counts divide (or another teacher mesh).")
        logits = forward(variables, jax.device_put(dict(batch), on_teacher))
        return {**batch, "teacher_logits": jax.device_put(logits, on_student)}
    return add_logits


def logits_program(teacher: Teacher, variables: Any, mesh: Mesh,
                   mode: sharding.ParamMode = "replicate", min_size: int = 2 ** 14):
    """The program :func:`on_devices` runs on the teacher's mesh: ``(forward, shardings)`` with
    ``forward(variables, batch) -> logits [B, C]`` jitted over ``mesh`` (the batch split over its
    devices) and ``shardings`` the variables' (``mode``; ``variables`` may be
    ``jax.ShapeDtypeStruct``s)."""
    shardings = sharding.tree_shardings(variables, mesh, mode, min_size)
    on_teacher = sharding.batch_sharding(mesh)
    forward = jax.jit(lambda v, b: teacher(v, b).logits, in_shardings=(shardings, on_teacher),
                      out_shardings=on_teacher)
    return forward, shardings


def precomputed() -> Teacher:
    """A teacher whose outputs were added to the batch by :mod:`kdjax.logit_store` or by
    :func:`on_devices`."""
    def fn(_, batch):
        logits = batch.get("teacher_logits")
        values = batch.get("teacher_topk_values")
        if logits is None and values is None:
            raise ValueError(
                "precomputed teacher: the batch has neither 'teacher_logits' nor "
                "'teacher_topk_values'; add the store's outputs to each batch with "
                "LogitStore.add_to_batch(batch) before the step (kdjax.loop.fit does it for its "
                "train_store= / eval_store=).")
        if values is not None and "teacher_topk_indices" not in batch:
            raise ValueError(
                "precomputed teacher: the batch has 'teacher_topk_values' but no "
                "'teacher_topk_indices' (the classes the values belong to); add both, as "
                "LogitStore.add_to_batch does.")
        return TeacherOutput(
            logits=None if logits is None else logits.astype(jnp.float32),
            topk_values=None if values is None else values.astype(jnp.float32),
            topk_indices=batch.get("teacher_topk_indices"))
    return Teacher(fn=fn, live=False)
