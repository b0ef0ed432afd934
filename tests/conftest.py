"""Test session setup: 8 virtual CPU devices so sharding tests run on one CPU host.

Must run before jax is imported anywhere, which pytest guarantees for conftest.py.
"""
import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """JAX's persistent compilation cache in the session's temp dir, for modules that run many
    ``fit()`` calls or worker subprocesses with identical steps (see tests/fit_worker.py)."""
    import fit_worker

    directory = str(tmp_path_factory.getbasetemp() / "jax_compilation_cache")
    with fit_worker.compilation_cache(directory):
        yield directory


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's digits as kdjax arrays (train/test)."""
    from kdjax import data

    return data.digits_arrays()
