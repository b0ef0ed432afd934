"""Helpers shared by the checkpoint modules: the package logger, process-0 logging, one-line error
text and agreement across processes."""

from __future__ import annotations

import logging

import jax
import numpy as np
from jax.experimental import multihost_utils

logger = logging.getLogger(__package__)  # "kdjax.checkpointing", for every module of the package


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    text = text if len(text) <= limit else text[:limit] + " ..."
    return f"{type(exc).__name__}: {text}"


def _all_processes_agree(ok: bool) -> bool:
    """True iff ``ok`` is True on every process (a tiny all-gather on multi-host)."""
    if jax.process_count() == 1:
        return ok
    flags = multihost_utils.process_allgather(np.asarray([ok], dtype=np.int32))
    return bool(np.all(flags))


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        logger.warning(message)


def _info(message: str) -> None:
    if jax.process_index() == 0:
        logger.info(message)
