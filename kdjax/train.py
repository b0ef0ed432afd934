"""The distillation train step and eval step: one ``jax.jit`` each, with explicit shardings.

``step(state, teacher_variables, batch) -> (state, metrics)``:

1. the teacher (live model or precomputed store outputs in the batch) runs *outside* the
   differentiated function, under ``stop_gradient``; its variables are an input only;
2. the student runs in train mode; the recipe's terms give the loss (see :mod:`kdjax.recipe`);
3. ``optax`` updates the student's parameters; BatchNorm statistics come from the forward pass;
4. if ``guard_nonfinite`` and the loss or the gradient norm is not finite, the state is left as it
   was (the update is skipped) and ``state.skipped`` counts it; ``metrics['finite']`` says so.

Shardings are explicit (the ``pjit`` model): the state follows :func:`kdjax.sharding.tree_shardings`
(replicated or FSDP), the teacher its own rule, the batch is split over all devices, and metrics are
replicated. The state's buffers are donated.

Students are Linen modules (:func:`linen_student`) or Flax NNX modules (:func:`nnx_student`)
returning ``logits`` or ``(logits, features)`` (see :mod:`kdjax.models`); teachers are anything
:mod:`kdjax.teachers` wraps.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from kdjax import losses, recipe as recipe_lib, sharding, teachers
from kdjax.recipe import StudentOutput, Term
from kdjax.teachers import Teacher

StudentApply = Callable[[Any, Any, jax.Array, bool, jax.Array], tuple[StudentOutput, Any]]


class TrainState(flax.struct.PyTreeNode):
    """Everything a run needs to continue: step, student params/BatchNorm stats, optimizer, rng.

    ``rng`` is a raw ``uint32[2]`` key; the step's dropout key is ``fold_in(rng, step)``, so a
    resumed run draws the same randomness. ``skipped`` counts updates skipped as non-finite.
    """
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    skipped: jax.Array


def _student_output(out) -> StudentOutput:
    logits, features = out if isinstance(out, tuple) else (out, {})
    return StudentOutput(logits.astype(jnp.float32), features)


def linen_student(module) -> StudentApply:
    """``apply(params, batch_stats, x, train, rng) -> (StudentOutput, new_batch_stats)``."""
    def apply(params, batch_stats, x, train, rng):
        variables = {"params": params, "batch_stats": batch_stats}
        if train:
            out, updates = module.apply(variables, x, train=True, mutable=["batch_stats"],
                                        rngs={"dropout": rng})
            new_stats = updates.get("batch_stats", batch_stats)
        else:
            out, new_stats = module.apply(variables, x, train=False), batch_stats
        return _student_output(out), new_stats
    return apply


def is_nnx(model) -> bool:
    """Whether ``model`` is a Flax NNX module (else a Linen one is expected)."""
    from flax import nnx
    return isinstance(model, nnx.Module)


def nnx_student(model) -> tuple[StudentApply, dict[str, Any]]:
    """A Flax NNX student (returning ``logits`` or ``(logits, features)``, and sowing more feature
    taps as ``nnx.Intermediate``: :func:`kdjax.teachers.nnx_forward`) as a pure function: returns
    ``(apply, variables)``.

    ``nnx.split`` separates the module into its graph, its ``nnx.Param`` state (``variables
    ['params']``, what the optimizer updates), its ``nnx.BatchStat`` state (``variables
    ['batch_stats']``) and everything else (RNG streams, other variables), which stays as it is
    now. ``apply`` (the :func:`linen_student` signature) merges a copy, switches it to train mode
    (``model.train()``: batch statistics, dropout on) or eval mode, reseeds each of its RNG streams
    from ``rng`` (so dropout draws new masks every step, and a resumed run the same ones), and
    returns the new BatchNorm statistics. The module itself is never modified; put trained values
    back with ``nnx.update(model, state.params, state.batch_stats)``.
    """
    from flax import nnx

    graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    tags = sorted({node.tag for _, node in nnx.iter_graph(model) if isinstance(node, nnx.RngStream)})

    def apply(params, batch_stats, x, train, rng):
        module = nnx.merge(graphdef, params, batch_stats, rest, copy=True)
        if train:
            module.train()
            key = jax.random.wrap_key_data(rng) if rng.dtype == jnp.uint32 else rng
            nnx.reseed(module, policy="match_shape",  # stacked layers (nnx.vmap) hold key arrays
                       **{t: jax.random.fold_in(key, i) for i, t in enumerate(tags)})
        else:
            module.eval()
        out = teachers.nnx_forward(module, x)  # sown nnx.Intermediate values join the features
        return _student_output(out), (nnx.state(module, nnx.BatchStat) if train else batch_stats)
    return apply, {"params": params, "batch_stats": batch_stats}


def student_apply(student) -> StudentApply:
    """:func:`nnx_student`'s apply for an NNX module, else :func:`linen_student`'s."""
    return nnx_student(student)[0] if is_nnx(student) else linen_student(student)


def _state_init(module, tx: optax.GradientTransformation, sample_input, seed: int):
    """``(init, args)``: ``init(*args)`` builds a fresh :class:`TrainState` (see
    :func:`init_train_state`)."""
    def fresh(params, batch_stats, state_key):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                          opt_state=tx.init(params), rng=state_key,
                          skipped=jnp.zeros((), jnp.int32))

    if is_nnx(module):
        def init(key, variables):
            return fresh(variables["params"], variables["batch_stats"], jax.random.split(key)[1])
        # Host copies: every process passes the same values (jit inputs, as the key is).
        return init, (jax.random.PRNGKey(seed), jax.device_get(nnx_student(module)[1]))

    def init(key):
        init_key, state_key = jax.random.split(key)
        variables = module.init({"params": init_key, "dropout": init_key}, sample_input,
                                train=False)
        return fresh(variables["params"], variables.get("batch_stats", {}), state_key)
    return init, (jax.random.PRNGKey(seed),)


def abstract_train_state(module, tx: optax.GradientTransformation, sample_input, *, seed: int,
                         mesh: Mesh, mode: sharding.ParamMode = "replicate",
                         ) -> tuple[TrainState, Any]:
    """:func:`init_train_state` without computing anything: ``(state, state_shardings)`` with
    ``jax.ShapeDtypeStruct`` leaves that carry their shardings (for ``jit(...).lower``: ahead-of-time
    compilation, :mod:`kdjax.aot`). ``sample_input`` may be a ``ShapeDtypeStruct``."""
    init, args = _state_init(module, tx, sample_input, seed)
    shapes = jax.eval_shape(init, *args)
    shardings = sharding.tree_shardings(shapes, mesh, mode)
    return sharding.with_shardings(shapes, shardings), shardings


def init_train_state(module, tx: optax.GradientTransformation, sample_input: jax.Array, *,
                     seed: int, mesh: Mesh, mode: sharding.ParamMode = "replicate",
                     ) -> tuple[TrainState, Any]:
    """Initialise a student directly into its shardings; returns ``(state, state_shardings)``.

    ``module``: a Linen module, initialised here from ``seed`` on ``sample_input`` (one example
    batch ``[b, ...]``: only its shape and dtype matter); or an NNX module, whose current
    variables (from the ``nnx.Rngs`` it was built with) are the start. ``seed`` also seeds the
    state's ``rng`` (dropout).
    """
    init, args = _state_init(module, tx, sample_input, seed)
    shardings = sharding.tree_shardings(jax.eval_shape(init, *args), mesh, mode)
    return jax.jit(init, out_shardings=shardings)(*args), shardings


def put_teacher(variables: Any, mesh: Mesh, mode: sharding.ParamMode = "replicate"):
    """Place frozen teacher variables on the mesh; returns ``(variables, shardings)``."""
    shardings = sharding.tree_shardings(variables, mesh, mode)
    return jax.device_put(variables, shardings), shardings


def _accuracy(logits, labels, mask):
    return losses.masked_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), mask)


def _check_class_counts(student_logits, teacher_out):
    if teacher_out is not None and teacher_out.logits is not None:
        cs, ct = student_logits.shape[-1], teacher_out.logits.shape[-1]
        if cs != ct:
            raise ValueError(
                f"teacher has {ct} classes but the student has {cs}; the teacher and student "
                f"must share the label space (set the student's num_classes to {ct}, or use a "
                f"teacher trained on the same classes).")


def _jit_step(fn, mesh: Mesh, state_shardings, teacher_shardings, **jit_kwargs):
    """``jax.jit(fn(state, teacher_variables, batch))`` with the state's, the teacher's (replicated
    when not given) and the batch's shardings."""
    teacher_shardings = (sharding.replicated(mesh) if teacher_shardings is None
                         else teacher_shardings)
    return jax.jit(fn, in_shardings=(state_shardings, teacher_shardings,
                                     sharding.batch_sharding(mesh)), **jit_kwargs)


def apply_gradients(state: TrainState, grads: Any, loss: jax.Array,
                    tx: optax.GradientTransformation, batch_stats: Any, guard_nonfinite: bool,
                    ) -> tuple[TrainState, jax.Array, jax.Array]:
    """One optimizer update of ``state`` (inside a jitted step): ``(new_state, grad_norm, finite)``.

    ``finite`` is whether the loss, the gradient norm and the update norm are all finite; with
    ``guard_nonfinite`` a non-finite update is skipped (params, statistics and optimizer state kept,
    ``step`` advanced, ``skipped`` counted). ``batch_stats`` are the forward's new statistics.
    """
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    grad_norm = optax.global_norm(grads)
    # The updates too: an optimizer can turn finite gradients into NaN (eps=0, a bad schedule).
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
              & jnp.isfinite(optax.global_norm(updates)))
    new_state = state.replace(step=state.step + 1,
                              params=optax.apply_updates(state.params, updates),
                              batch_stats=batch_stats, opt_state=new_opt_state)
    if guard_nonfinite:
        kept = state.replace(step=state.step + 1, skipped=state.skipped + 1)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, kept)
    return new_state, grad_norm, finite


def make_train_step(student_apply: StudentApply, tx: optax.GradientTransformation,
                    recipe: Sequence[Term], teacher: Teacher | None = None, *, mesh: Mesh,
                    state_shardings: Any, teacher_shardings: Any = None,
                    input_key: str = "image", guard_nonfinite: bool = True, donate: bool = True):
    """Build the jitted, sharded ``step(state, teacher_variables, batch) -> (state, metrics)``.

    batch: ``{input_key: [B, ...], 'label': [B] int32, 'mask': [B] bool (optional), ...}``
    (plus ``teacher_logits``/top-k keys for a precomputed teacher); ``B`` must divide by the
    device count. ``teacher_variables``: the frozen teacher's variables (``{}`` when precomputed).
    metrics: ``loss/<term>``, ``weight/<term>``, ``loss/total``, ``accuracy``,
    ``teacher_accuracy`` (if the teacher gives full logits), ``grad_norm``, ``finite``, ``skipped``.
    """
    recipe = recipe_lib.validate(recipe)
    if recipe_lib.needs_teacher(recipe) and teacher is None:
        raise ValueError("the recipe has teacher terms (e.g. kd, hint) but no teacher was given; "
                         "pass teacher=kdjax.teachers.from_linen(...) or teachers.precomputed().")

    def step_fn(state: TrainState, teacher_variables, batch):
        mask = batch.get("mask")
        dropout_rng = jax.random.fold_in(state.rng, state.step)
        teacher_out = teacher(teacher_variables, batch) if teacher is not None else None

        def loss_fn(params):
            student_out, new_stats = student_apply(params, state.batch_stats, batch[input_key],
                                                   True, dropout_rng)
            _check_class_counts(student_out.logits, teacher_out)
            total, metrics = recipe_lib.evaluate(recipe, student_out, teacher_out, batch,
                                                 state.step)
            return total, (metrics, new_stats, student_out.logits)

        (loss, (metrics, new_stats, logits)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        new_state, grad_norm, finite = apply_gradients(state, grads, loss, tx, new_stats,
                                                       guard_nonfinite)
        metrics.update(accuracy=_accuracy(logits, batch["label"], mask), grad_norm=grad_norm,
                       finite=finite, skipped=new_state.skipped)
        if teacher_out is not None and teacher_out.logits is not None:
            metrics["teacher_accuracy"] = _accuracy(teacher_out.logits, batch["label"], mask)
        return new_state, metrics

    return _jit_step(step_fn, mesh, state_shardings, teacher_shardings,
                     out_shardings=(state_shardings, sharding.replicated(mesh)),
                     donate_argnums=(0,) if donate else ())


def make_eval_step(student_apply: StudentApply, teacher: Teacher | None = None, *, mesh: Mesh,
                   state_shardings: Any, teacher_shardings: Any = None,
                   input_key: str = "image"):
    """Build ``eval_step(state, teacher_variables, batch) -> sums`` (masked, summed, not averaged).

    Sums over real rows (``mask``): ``count``, ``correct``, ``ce``; with a teacher giving full
    logits also ``teacher_correct``, ``agreement`` (same top-1 as the teacher) and ``kl``
    (``KL(p_t || p_s)`` at T = 1, the "how well does the student mimic" measure). Add the sums over
    an epoch and divide by ``count``: padding never counts.
    """
    def eval_fn(state: TrainState, teacher_variables, batch):
        mask = batch.get("mask")
        mask = jnp.ones(batch["label"].shape, bool) if mask is None else mask

        def total(per_row):  # over real rows; a padding row's value (even NaN) never enters
            return jnp.where(mask, per_row, 0).astype(jnp.float32).sum()
        out, _ = student_apply(state.params, state.batch_stats, batch[input_key], False,
                               state.rng)
        labels = batch["label"]
        sums = {"count": total(jnp.ones_like(labels)),
                "correct": total(jnp.argmax(out.logits, -1) == labels),
                "ce": total(losses.cross_entropy(out.logits, labels))}
        if teacher is not None:
            t = teacher(teacher_variables, batch)
            if t.logits is not None:
                _check_class_counts(out.logits, t)
                t_top1 = jnp.argmax(t.logits, -1)
                sums.update(teacher_correct=total(t_top1 == labels),
                            agreement=total(t_top1 == jnp.argmax(out.logits, -1)),
                            kl=total(losses.kd_kl(out.logits, t.logits, 1.0)))
        return sums

    return _jit_step(eval_fn, mesh, state_shardings, teacher_shardings,
                     out_shardings=sharding.replicated(mesh))


def make_steps(student, tx: optax.GradientTransformation, recipe: Sequence[Term],
               teacher: Teacher | None = None, teacher_variables: Any = None, *, mesh: Mesh,
               state_shardings: Any, teacher_mode: sharding.ParamMode = "replicate",
               input_key: str = "image", evaluate: bool = True):
    """The train and eval steps of ``student`` (Linen or NNX) with ``teacher``, as
    :func:`kdjax.loop.fit` runs them: ``(train_step, eval_step or None, teacher_shardings)``.

    ``teacher_variables`` (arrays or ``jax.ShapeDtypeStruct``s; None for a precomputed teacher)
    only give the teacher's shardings here (``teacher_mode``); put the arrays there with
    ``jax.device_put(teacher_variables, teacher_shardings)``. The train step guards non-finite
    updates (:func:`make_train_step`).
    """
    t_shardings = sharding.tree_shardings({} if teacher_variables is None else teacher_variables,
                                          mesh, teacher_mode)
    apply = student_apply(student)
    common = dict(mesh=mesh, state_shardings=state_shardings, teacher_shardings=t_shardings,
                  input_key=input_key)
    train_step = make_train_step(apply, tx, recipe, teacher, guard_nonfinite=True, **common)
    eval_step = make_eval_step(apply, teacher, **common) if evaluate else None
    return train_step, eval_step, t_shardings
