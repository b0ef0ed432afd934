"""Test session setup: 8 virtual CPU devices so sharding tests run on one CPU host.

Must run before jax is imported anywhere, which pytest guarantees for conftest.py.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
