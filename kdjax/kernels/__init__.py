"""Compiled kernels that XLA does not provide at full speed on some backend.

:mod:`kdjax.kernels.onednn`: oneDNN 2-D convolutions for XLA:CPU (a drop-in
``lax.conv_general_dilated``), compiled on first use by :mod:`kdjax.kernels.build`.
"""

from typing import Callable

from kdjax.kernels import onednn

#: The convolutions a model's ``conv`` attribute can name, as ``flax.linen.Conv``'s
#: ``conv_general_dilated``: ``'xla'`` is ``None``, Flax's default (``lax.conv_general_dilated``);
#: ``'onednn'`` runs oneDNN on CPU and XLA's convolution elsewhere.
CONVOLUTIONS: dict[str, Callable | None] = {"xla": None, "onednn": onednn.conv_general_dilated}


def convolution(name: str) -> Callable | None:
    """The convolution :data:`CONVOLUTIONS` names; ``ValueError`` listing the choices otherwise."""
    if name not in CONVOLUTIONS:
        raise ValueError(f"conv must be one of {sorted(CONVOLUTIONS)} ('onednn': oneDNN on CPU, XLA's "
                         f"convolution elsewhere); got conv={name!r}.")
    return CONVOLUTIONS[name]
