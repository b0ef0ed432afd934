"""kdjax: knowledge distillation in JAX/Flax.

Submodules are imported on demand so that ``import kdjax.losses`` costs only JAX:
``losses`` and ``schedules`` are pure JAX; ``models``, ``teachers``, ``sharding`` and ``train``
add Flax/optax; ``data``, ``logit_store`` and ``checkpointing`` add TFDS/grain/orbax.
"""

__version__ = "0.1.0"
